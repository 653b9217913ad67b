//! Reading a stream in seq order, one stored message at a time.

use super::Mailbox;
use crate::backend::ReadBackend;
use crate::{Error, Filter, Message, Result};

/// A mailbox's messages on JetStream, by stream sequence. Messages deleted from the
/// stream are passed over; the end is wherever the stream ended when last asked.
#[derive(Debug)]
pub(crate) struct Reader {
    mailbox: Mailbox,
    from_seq: u64,
    filter: Filter,
    started: bool,
    /// The seq to read next.
    expected: u64,
    /// The last seq the stream held when we last asked.
    last: u64,
}

impl Reader {
    pub(crate) fn new(mailbox: Mailbox) -> Reader {
        Reader {
            mailbox,
            from_seq: 1,
            filter: Filter::new(),
            started: false,
            expected: 1,
            last: 0,
        }
    }
}

impl Iterator for Reader {
    type Item = Result<Message>;

    fn next(&mut self) -> Option<Result<Message>> {
        let conn = self.mailbox.bus().conn();
        let name = self.mailbox.name();
        if !self.started {
            self.started = true;
            match conn.bounds(name) {
                Ok((first, last)) => {
                    self.last = last;
                    self.expected = self.from_seq.max(first);
                }
                Err(e) => {
                    self.started = false;
                    return Some(Err(e));
                }
            }
        }
        loop {
            if self.expected > self.last {
                match conn.bounds(name) {
                    Ok((_, last)) => self.last = last,
                    Err(e) => return Some(Err(e)),
                }
                if self.expected > self.last {
                    return None;
                }
            }
            match conn.get(name, self.expected) {
                Ok(got) => {
                    self.expected += 1;
                    match got {
                        Some(m) if self.filter.matches(&m) => return Some(Ok(m)),
                        _ => continue,
                    }
                }
                // A record that is not a message: reported once, then passed.
                Err(e @ Error::Corrupt { .. }) => {
                    self.expected += 1;
                    return Some(Err(e));
                }
                // The server did not answer: the same seq is asked for again next time.
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

impl ReadBackend for Reader {
    fn set_from_seq(&mut self, seq: u64) {
        self.from_seq = seq.max(1);
    }

    fn filter_mut(&mut self) -> &mut Filter {
        &mut self.filter
    }
}
