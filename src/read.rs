//! Reading a mailbox: the [`Messages`] iterator.

use crate::backend::ReaderImp;
use crate::{Filter, Message, Result};

/// An iterator over a mailbox's messages in `seq` order, from [`Mailbox::messages`](crate::Mailbox::messages).
///
/// Reading never changes state. A damaged record is yielded as an
/// [`Error::Corrupt`](crate::Error::Corrupt) naming its file and line, and iteration
/// continues after it; a final line still being written (or torn by a crash) is never
/// yielded. After returning `None`, the iterator can be polled again and yields
/// messages appended since.
#[derive(Debug)]
#[must_use = "iterators are lazy"]
pub struct Messages {
    reader: ReaderImp,
}

impl Messages {
    pub(crate) fn new(reader: ReaderImp) -> Self {
        Messages { reader }
    }

    /// Starts at `seq` (inclusive) instead of the beginning.
    pub fn from_seq(mut self, seq: u64) -> Self {
        self.reader.set_from_seq(seq);
        self
    }

    /// Only messages of this type; call again to accept several types. `kind` may be a
    /// pattern: `draft.*`, `draft.>` ([`Filter`], "Type patterns").
    pub fn of_type(self, kind: impl Into<String>) -> Self {
        self.narrow(|f| f.of_type(kind))
    }

    /// Every type but this one; call again to refuse several. `kind` may be a pattern.
    pub fn not_type(self, kind: impl Into<String>) -> Self {
        self.narrow(|f| f.not_type(kind))
    }

    /// Only messages from this agent; call again to accept several senders.
    pub fn sender(self, agent: impl Into<String>) -> Self {
        self.narrow(|f| f.sender(agent))
    }

    /// Only messages with this correlation id.
    pub fn correlation_id(self, id: impl Into<String>) -> Self {
        self.narrow(|f| f.correlation_id(id))
    }

    /// Only messages that pass `filter` (replacing any filter set so far).
    pub fn filter(self, filter: Filter) -> Self {
        self.narrow(|_| filter)
    }

    fn narrow(mut self, change: impl FnOnce(Filter) -> Filter) -> Self {
        let filter = self.reader.filter_mut();
        *filter = change(std::mem::take(filter));
        self
    }
}

impl Iterator for Messages {
    type Item = Result<Message>;

    fn next(&mut self) -> Option<Result<Message>> {
        self.reader.next()
    }
}
