//! Message filters, shared by readers, receivers and consumer groups.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Error, Message, Result};

/// Which messages to take: by type (or every type but some), sender, minimum priority,
/// header values and correlation id. An empty filter takes everything; each part that
/// is set must match.
///
/// ```
/// use agentbus::Filter;
/// let urgent_tasks = Filter::new().of_type("task").min_priority(5).header("team", "docs");
/// // Everything but alerts, including types added later.
/// let no_alerts = Filter::new().not_type("alert");
/// ```
///
/// # Type patterns
///
/// A type entry ([`of_type`](Self::of_type), [`not_type`](Self::not_type)) is a
/// *pattern* when one of its `.`-separated tokens is exactly `*` or `>`, as in NATS
/// subjects; any other entry matches exactly that type, as before. A type is split on
/// every `.` into tokens (`draft.ready` is `draft`, `ready`; `a..b` is `a`, empty, `b`):
///
/// - `*` matches exactly one token, whatever it holds (even an empty one), never a
///   `.`: `draft.*` matches `draft.ready`, not `draft` nor `draft.ready.v2`;
///   `*.done` matches `review.done`.
/// - `>` matches one or more tokens, and only as the last token: `draft.>` matches
///   `draft.ready` and `draft.ready.v2` (every type that starts with `draft.`), not
///   `draft`. A lone `>` matches every type.
/// - Every other token matches itself only: there are no partial wildcards, so
///   `draft*` is no pattern.
///
/// Message types are names (`[A-Za-z0-9][A-Za-z0-9._-]{0,127}`, checked when sending
/// and when reading), so no type contains `*` or `>`: a pattern can never be mistaken
/// for a type. An entry that could match no type at all (`draft*`, `a.>.b`, a `>`
/// that is not the last token, characters outside the rule) is refused by
/// [`check`](Self::check), which groups and the CLI apply; a reader or receiver given
/// one just matches nothing with it.
///
/// ```
/// use agentbus::Filter;
/// let drafts = Filter::new().of_type("draft.>"); // draft.ready, draft.ready.v2, ...
/// let any_done = Filter::new().of_type("*.done"); // review.done, task.done, ...
/// let quiet = Filter::new().not_type("debug.>"); // everything but debug.*, debug.*.*, ...
/// assert!(Filter::new().of_type("draft*").check().is_err()); // no partial wildcards
/// ```
///
/// A group stores its filter in `group.json` (the consumer's description on
/// JetStream). Releases before type patterns read a pattern as a plain type, which no
/// message has, so their consumers would pass over every message: a group whose filter
/// has a pattern or a `not_type` is therefore written with group format 2 (FORMAT.md),
/// which those releases refuse to open instead.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[must_use]
pub struct Filter {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    types: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    not_types: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    senders: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    min_priority: Option<i32>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    correlation_id: Option<String>,
}

impl Filter {
    /// A filter that takes everything.
    pub fn new() -> Self {
        Filter::default()
    }

    /// Also accept messages of this type (any of the types given); `kind` may be a
    /// pattern such as `draft.*` or `draft.>` (see [Type patterns](Self#type-patterns)).
    pub fn of_type(mut self, kind: impl Into<String>) -> Self {
        self.types.push(kind.into());
        self
    }

    /// Refuse messages of this type (call again to refuse several); the other types
    /// pass, including ones added later. `kind` may be a pattern (see
    /// [Type patterns](Self#type-patterns)). A group stores it in `group.json`
    /// (`not_types`), with group format 2: older releases refuse to open such a group
    /// rather than deliver the types it refuses.
    pub fn not_type(mut self, kind: impl Into<String>) -> Self {
        self.not_types.push(kind.into());
        self
    }

    /// Also accept messages from this agent (any of the senders given).
    pub fn sender(mut self, agent: impl Into<String>) -> Self {
        self.senders.push(agent.into());
        self
    }

    /// Only messages with at least this priority.
    pub fn min_priority(mut self, priority: i32) -> Self {
        self.min_priority = Some(priority);
        self
    }

    /// Only messages whose header `key` equals `value` (all headers given must match).
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key.into(), value.into());
        self
    }

    /// Only messages with this correlation id.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// True when the filter takes every message.
    pub fn is_empty(&self) -> bool {
        *self == Filter::default()
    }

    /// Whether the filter has a type pattern or an exclusion: what releases before
    /// them would misread in a stored group.
    pub(crate) fn misread_by_old_releases(&self) -> bool {
        !self.not_types.is_empty() || self.types.iter().any(|t| is_pattern(t))
    }

    /// Checks every type entry: a plain type must be a valid name, and a pattern must
    /// be one that can match some type (see [Type patterns](Self#type-patterns)).
    /// [`Mailbox::create_group_with`](crate::Mailbox::create_group_with) and the CLI
    /// apply it; readers and receivers do not, and an entry that breaks it matches
    /// nothing there.
    ///
    /// ```
    /// use agentbus::Filter;
    /// assert!(Filter::new().of_type("draft.>").not_type("*.debug").check().is_ok());
    /// assert!(Filter::new().of_type("draft.>.v2").check().is_err()); // `>` not last
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`] of kind `"type filter"`, naming the entry and what is
    /// wrong with it.
    pub fn check(&self) -> Result<()> {
        self.types
            .iter()
            .chain(&self.not_types)
            .try_for_each(|entry| check_type_entry(entry))
    }

    /// Whether `message` passes.
    pub fn matches(&self, message: &Message) -> bool {
        let kind = message.kind.as_str();
        (self.types.is_empty() || self.types.iter().any(|t| type_matches(t, kind)))
            && !self.not_types.iter().any(|t| type_matches(t, kind))
            && (self.senders.is_empty() || self.senders.contains(&message.from))
            && self.min_priority.is_none_or(|p| message.priority >= p)
            && self
                .headers
                .iter()
                .all(|(k, v)| message.headers.get(k) == Some(v))
            && self
                .correlation_id
                .as_ref()
                .is_none_or(|c| message.correlation_id.as_ref() == Some(c))
    }
}

/// Whether `entry` is a type pattern: one of its tokens is exactly `*` or `>`.
fn is_pattern(entry: &str) -> bool {
    entry.split('.').any(|t| t == "*" || t == ">")
}

/// Whether type `kind` matches filter entry `entry`: equal, or matched by the pattern
/// token by token (see [`Filter`], "Type patterns").
pub(crate) fn type_matches(entry: &str, kind: &str) -> bool {
    if !entry.as_bytes().iter().any(|b| matches!(b, b'*' | b'>')) {
        return entry == kind;
    }
    let (mut want, mut have) = (entry.split('.'), kind.split('.'));
    loop {
        match (want.next(), have.next()) {
            // One or more tokens: `have` just gave one, the rest is whatever it is.
            (Some(">"), Some(_)) => return want.next().is_none(),
            (Some("*"), Some(_)) => {}
            (Some(w), Some(h)) if w == h => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Refuses a type entry that can match no type.
fn check_type_entry(entry: &str) -> Result<()> {
    let refuse = |reason| {
        Err(Error::InvalidName {
            kind: "type filter",
            name: entry.to_owned(),
            reason,
        })
    };
    let tokens: Vec<&str> = entry.split('.').collect();
    if tokens[..tokens.len() - 1].contains(&">") {
        return refuse("'>' may only be the last token (it matches the rest of the type)");
    }
    if tokens
        .iter()
        .any(|t| *t != "*" && *t != ">" && t.contains(['*', '>']))
    {
        return refuse(
            "'*' and '>' are wildcards only as whole tokens ('draft.*', 'draft.>'); \
             no type contains them",
        );
    }
    // What a pattern stands for must itself be a type: put one in for each wildcard.
    let example: Vec<&str> = tokens
        .iter()
        .map(|t| if *t == "*" || *t == ">" { "x" } else { t })
        .collect();
    match crate::validate_name("type filter", &example.join(".")) {
        Ok(()) => Ok(()),
        Err(Error::InvalidName { reason, .. }) => refuse(reason),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every documented case, both ways.
    #[test]
    fn patterns_match_exactly_what_the_docs_say() {
        let table: &[(&str, &str, bool)] = &[
            // Plain entries: equality, as before.
            ("draft", "draft", true),
            ("draft", "draft.ready", false),
            ("draft.ready", "draft.ready", true),
            ("draft.ready", "draft", false),
            // `*`: exactly one token.
            ("draft.*", "draft.ready", true),
            ("draft.*", "draft", false),
            ("draft.*", "draft.ready.v2", false),
            ("draft.*", "drafts.ready", false),
            ("draft.*", "draft.", true), // one empty token
            ("*.done", "review.done", true),
            ("*.done", "done", false),
            ("*.done", "a.b.done", false),
            ("*", "task", true),
            ("*", "draft.ready", false),
            ("a.*.c", "a.b.c", true),
            ("a.*.c", "a..c", true),
            ("a.*.c", "a.b.b.c", false),
            ("*.*", "a.b", true),
            ("*.*", "a", false),
            // `>`: one or more trailing tokens.
            ("draft.>", "draft.ready", true),
            ("draft.>", "draft.ready.v2", true),
            ("draft.>", "draft.", true),
            ("draft.>", "draft", false),
            ("draft.>", "drafts.ready", false),
            ("draft.>", "xdraft.ready", false),
            (">", "task", true),
            (">", "a.b.c", true),
            ("*.>", "a.b", true),
            ("*.>", "a", false),
            ("a.*.>", "a.b.c.d", true),
            ("a.*.>", "a.b", false),
            // Malformed entries match nothing.
            ("a.>.c", "a.b.c", false),
            ("draft*", "draft", false),
            ("draft*", "drafts", false),
            ("dr*ft", "draft", false),
        ];
        for (entry, kind, want) in table {
            assert_eq!(type_matches(entry, kind), *want, "{entry:?} on {kind:?}");
        }
    }

    #[test]
    fn check_refuses_entries_that_match_no_type() {
        for good in [
            "task", "draft.*", "draft.>", ">", "*", "*.done", "a.*.>", "a..b", "a.*",
        ] {
            assert!(Filter::new().of_type(good).check().is_ok(), "{good}");
            assert!(Filter::new().not_type(good).check().is_ok(), "{good}");
        }
        for bad in [
            "a.>.b", ">.a", "draft*", "dr>ft", "**", ".*", "", "a b", "-x", "a/b",
        ] {
            let err = Filter::new().of_type(bad).check().unwrap_err();
            assert!(
                matches!(&err, Error::InvalidName { kind: "type filter", name, .. } if name == bad),
                "{bad}: {err}"
            );
            assert!(Filter::new().not_type(bad).check().is_err(), "{bad}");
        }
    }

    /// Against a second, independent reading of the rules: a pattern as a regular
    /// language over characters, walked by backtracking.
    #[test]
    fn patterns_agree_with_a_character_level_reading() {
        use proptest::prelude::*;
        /// `*` = any run without '.', `>` = anything at all (at least one token is
        /// always there after the '.' before it), others literal.
        fn reference(entry: &str, kind: &str) -> bool {
            let tokens: Vec<&str> = entry.split('.').collect();
            if !tokens.iter().any(|t| *t == "*" || *t == ">") {
                return entry == kind;
            }
            if tokens[..tokens.len() - 1].contains(&">") {
                return false;
            }
            fn walk(tokens: &[&str], rest: &str) -> bool {
                let Some((first, more)) = tokens.split_first() else {
                    return rest.is_empty();
                };
                let (this, after) = match rest.find('.') {
                    Some(i) => (&rest[..i], Some(&rest[i + 1..])),
                    None => (rest, None),
                };
                match *first {
                    ">" => true,
                    "*" => match after {
                        Some(a) => !more.is_empty() && walk(more, a),
                        None => more.is_empty(),
                    },
                    lit => {
                        this == lit
                            && match after {
                                Some(a) => !more.is_empty() && walk(more, a),
                                None => more.is_empty(),
                            }
                    }
                }
            }
            walk(&tokens, kind)
        }
        let token = prop_oneof![
            Just(String::new()),
            Just("a".to_string()),
            Just("b".to_string()),
            Just("ab".to_string()),
        ];
        let kind = prop::collection::vec(token.clone(), 1..5).prop_map(|t| t.join("."));
        let entry_token = prop_oneof![token, Just("*".to_string()), Just(">".to_string())];
        let entry = prop::collection::vec(entry_token, 1..5).prop_map(|t| t.join("."));
        proptest!(|(entry in entry, kind in kind)| {
            prop_assert_eq!(type_matches(&entry, &kind), reference(&entry, &kind));
        });
    }
}
