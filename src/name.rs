//! Validation of mailbox, group, lease and agent names.

use crate::{Error, Result};

/// The longest name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// Checks `name` against the naming rule `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`.
///
/// The rule keeps every name a single, ordinary path component: no `/`, no `..`, no
/// leading dot (so hidden and temporary files never collide with names), no control
/// characters, nothing that needs quoting in a shell.
///
/// ```
/// use agentbus::validate_name;
/// assert!(validate_name("mailbox", "project.tasks").is_ok());
/// assert!(validate_name("mailbox", "../etc").is_err());
/// ```
///
/// # Errors
///
/// [`Error::InvalidName`] naming `kind`, the name and the part of the rule it breaks.
pub fn validate_name(kind: &'static str, name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        "must not be empty"
    } else if name.len() > MAX_NAME_LEN {
        "must be at most 128 characters"
    } else if !name.as_bytes()[0].is_ascii_alphanumeric() {
        "must start with a letter or digit"
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        "may contain only ASCII letters, digits, '.', '_' and '-'"
    } else {
        return Ok(());
    };
    Err(Error::InvalidName {
        kind,
        name: name.to_owned(),
        reason,
    })
}

pub(crate) fn is_valid(name: &str) -> bool {
    validate_name("", name).is_ok()
}
