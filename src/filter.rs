//! Message filters, shared by readers, receivers and consumer groups.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Message;

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

    /// Also accept messages of this type (any of the types given).
    pub fn of_type(mut self, kind: impl Into<String>) -> Self {
        self.types.push(kind.into());
        self
    }

    /// Refuse messages of this type (call again to refuse several); the other types
    /// pass, including ones added later. A group stores it in `group.json`
    /// (`not_types`): such a group needs this release of agentbus or later.
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

    /// Whether `message` passes.
    pub fn matches(&self, message: &Message) -> bool {
        (self.types.is_empty() || self.types.contains(&message.kind))
            && !self.not_types.contains(&message.kind)
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
