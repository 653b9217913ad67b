//! The settings a consumer group is created with: [`GroupOptions`] and [`StartAt`].

use std::time::Duration;

use crate::{Coalesce, Filter, RetryPolicy};

/// Where a new group starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StartAt {
    /// Deliver every message the mailbox holds, from the oldest (the default).
    #[default]
    Beginning,
    /// Deliver only messages sent after the group was created.
    End,
}

/// Settings of a consumer group, fixed when it is created.
///
/// ```
/// use std::time::Duration;
/// let opts = agentbus::GroupOptions::new()
///     .max_deliveries(3)
///     .visibility(Duration::from_secs(60));
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct GroupOptions {
    pub(crate) max_deliveries: u32,
    pub(crate) visibility: Duration,
    pub(crate) dead_letter: Option<String>,
    pub(crate) start: StartAt,
    pub(crate) filter: Filter,
    pub(crate) coalesce: Option<Coalesce>,
    pub(crate) retry: Option<RetryPolicy>,
}

impl Default for GroupOptions {
    fn default() -> Self {
        GroupOptions {
            max_deliveries: 5,
            visibility: Duration::from_secs(30),
            dead_letter: None,
            start: StartAt::Beginning,
            filter: Filter::new(),
            coalesce: None,
            retry: None,
        }
    }
}

impl GroupOptions {
    /// Defaults: 5 deliveries, 30 s visibility, dead letters to `<mailbox>.dlq`, start
    /// at the beginning.
    pub fn new() -> Self {
        GroupOptions::default()
    }

    /// How many times a message is delivered before it is dead-lettered: at least 1
    /// ([`Mailbox::create_group_with`] refuses 0 with [`Error::InvalidSetting`]).
    pub fn max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = n;
        self
    }

    /// Default visibility timeout of a claim: how long a consumer has to ack, nack or
    /// extend before the message is redelivered. From 1 ms (the unit it is stored in)
    /// to 365 days; [`Mailbox::create_group_with`] refuses anything else with
    /// [`Error::InvalidSetting`].
    pub fn visibility(mut self, timeout: Duration) -> Self {
        self.visibility = timeout;
        self
    }

    /// The mailbox that receives dead letters (created if missing); default
    /// `<mailbox>.dlq`.
    pub fn dead_letter(mut self, mailbox: impl Into<String>) -> Self {
        self.dead_letter = Some(mailbox.into());
        self
    }

    /// Where the group starts reading.
    pub fn start(mut self, start: StartAt) -> Self {
        self.start = start;
        self
    }

    /// Only messages passing `filter` are delivered to this group; the others are
    /// skipped (counted in [`GroupStats::skipped`]) as the cursor passes them, for every
    /// consumer of the group. Like a JetStream consumer's filter subject; type patterns
    /// (`draft.>`) work as in [`Filter`], and a filter with one (or with a
    /// [`not_type`](Filter::not_type)) makes a group that releases before them refuse to
    /// open rather than misread.
    ///
    /// ```
    /// # fn main() -> agentbus::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// use agentbus::{Bus, Filter, GroupOptions, NewMessage};
    /// let bus = Bus::init(dir.path())?;
    /// let main = bus.create_mailbox("main")?;
    /// let opts = GroupOptions::new().filter(Filter::new().of_type("draft.>"));
    /// let editors = main.create_group_with("editors", opts)?;
    /// for kind in ["draft", "draft.ready", "review", "draft.ready.v2"] {
    ///     main.send(NewMessage::new(kind))?;
    /// }
    /// let got: Vec<String> = editors.claim("e1", 10)?.iter().map(|d| d.message.kind.clone()).collect();
    /// assert_eq!(got, ["draft.ready", "draft.ready.v2"]);
    /// assert_eq!(editors.stats()?.skipped, 2);
    /// # Ok(()) }
    /// ```
    pub fn filter(mut self, filter: Filter) -> Self {
        self.filter = filter;
        self
    }

    /// Coalesce bursts: of the messages with the same key sent within the window, the
    /// group delivers the first and settles the others as coalesced into it (counted
    /// in [`GroupStats::coalesced`], recorded in the group's state, kept in the log and
    /// delivered to other groups as usual). Stored with the group, so every consumer
    /// and every restart of it decides alike; see [`Coalesce`] for the exact rule. A
    /// coalescing group needs this release or later (group format 2), and the
    /// directory backend: JetStream answers [`Error::Unsupported`].
    pub fn coalesce(mut self, coalesce: Coalesce) -> Self {
        self.coalesce = Some(coalesce);
        self
    }

    /// How long the group waits before delivering a failed message again, and which
    /// failures it does not retry: see [`RetryPolicy`]. Without one (the default) a
    /// retry redelivers at once and an expired claim as soon as it runs out.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }
}
