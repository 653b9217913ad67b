//! Reading a mailbox's segments: the [`Reader`] and byte-offset positions.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::fsutil::Fs;
use super::segment::{self as log, Line, RecordHead, Segment};
use crate::backend::ReadBackend;
use crate::error::IoContext;
use crate::{Error, Filter, Message, Result};

/// What a reader needs to know about a mailbox's log.
#[derive(Debug, Clone)]
pub(crate) struct LogSpec {
    /// The bus directory, through which the segments are opened.
    pub(crate) fs: Fs,
    pub(crate) dir: PathBuf,
    pub(crate) limit: usize,
    pub(crate) segment_bytes: u64,
}

/// A place in a mailbox's log: the next record to read is `seq`, found in segment
/// `segment` at byte `offset`, which is line `line + 1` of that file. Group cursors
/// store positions so that claiming never rescans a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Position {
    pub(crate) segment: u64,
    pub(crate) offset: u64,
    pub(crate) line: u64,
    pub(crate) seq: u64,
}

/// What a reader does at the end of what its segment held.
enum AtEnd {
    /// Nothing more yet.
    Wait,
    /// More to read: in this segment, or in the next one, now current.
    Continue,
    /// The next segment, now current, does not follow on: the error says what is lost.
    Damage(Error),
}

/// A mailbox's messages in `seq` order, read from its segments.
///
/// Reading never changes state. A damaged record is yielded as an [`Error::Corrupt`]
/// naming its file and line, and iteration continues after it; a final line still
/// being written (or torn by a crash) is never yielded. After returning `None`, the
/// reader can be polled again and yields messages appended since.
#[derive(Debug)]
pub(crate) struct Reader {
    spec: LogSpec,
    from_seq: u64,
    filter: Filter,
    started: bool,
    resume: Option<Position>,
    segment: Option<Segment>,
    /// The seq the next record must carry.
    expected: u64,
    /// A valid message found after a seq gap: yielded right after the gap's error.
    stashed: Option<(Message, Position)>,
    /// Where the line of the last message yielded starts.
    last_start: Option<Position>,
    /// The seqs the last error covered (no message will ever be read for them).
    last_gap: Option<(u64, u64)>,
    /// Records were read from the current segment since [`Reader::sync_read`] last ran;
    /// segments left behind are synced on the way when `syncing`.
    unsynced: bool,
    syncing: bool,
}

impl Reader {
    pub(crate) fn new(spec: LogSpec) -> Self {
        Reader {
            spec,
            from_seq: 1,
            filter: Filter::new(),
            started: false,
            resume: None,
            segment: None,
            expected: 1,
            stashed: None,
            last_start: None,
            last_gap: None,
            unsynced: false,
            syncing: false,
        }
    }

    /// Makes [`Reader::sync_read`] cover every segment this reader reads from, not only
    /// the current one.
    pub(crate) fn syncing(mut self) -> Self {
        self.syncing = true;
        self
    }

    /// Makes durable what this reader has read (fdatasync of the segments): a group
    /// calls it before it durably records a cursor past those records, so that a power
    /// cut can never leave a group ahead of its log. Cheap when writers synced already.
    pub(crate) fn sync_read(&mut self) -> Result<()> {
        if let (true, Some(seg)) = (self.unsynced, &self.segment) {
            seg.file.sync_data().ctx("fdatasync", &seg.path)?;
        }
        self.unsynced = false;
        Ok(())
    }

    /// Starts at `seq` (inclusive) instead of the beginning.
    pub(crate) fn starting_at(mut self, seq: u64) -> Self {
        self.from_seq = seq.max(1);
        self
    }

    fn matches(&self, m: &Message) -> bool {
        self.filter.matches(m)
    }

    /// Starts reading at `pos` instead of searching for a seq. If compaction removed
    /// that segment meanwhile, falls back to searching for `pos.seq`.
    pub(crate) fn at(spec: LogSpec, pos: Position) -> Self {
        let mut m = Reader::new(spec).starting_at(pos.seq);
        m.resume = Some(pos);
        m
    }

    /// Where the next record will be read from, once reading has started.
    pub(crate) fn cursor(&self) -> Option<Position> {
        if let Some((_, pos)) = &self.stashed {
            return Some(*pos);
        }
        self.segment.as_ref().map(|s| Position {
            segment: s.first,
            offset: s.reader.position(),
            line: s.line,
            seq: self.expected,
        })
    }

    /// The seq the next record read should carry.
    pub(crate) fn next_seq(&self) -> u64 {
        if let Some((m, _)) = &self.stashed {
            return m.seq;
        }
        match (&self.resume, self.started) {
            (_, true) => self.expected,
            (Some(pos), false) => pos.seq,
            (None, false) => self.from_seq,
        }
    }

    fn start(&mut self) -> Result<()> {
        self.started = true;
        if let Some(pos) = self.resume.take() {
            if let Some(mut seg) =
                Segment::open(&self.spec.fs, &self.spec.dir, pos.segment, self.spec.limit)?
                    .filter(|seg| starts_a_line(seg, pos.offset))
            {
                seg.reader = log::LineReader::new(pos.offset, self.spec.limit);
                seg.line = pos.line;
                self.segment = Some(seg);
                self.expected = pos.seq;
                return Ok(());
            }
        }
        // Compaction may remove the oldest segment between listing and opening it.
        for _ in 0..8 {
            let segments = log::list_segments(&self.spec.fs, &self.spec.dir)?;
            let Some(first) = segments
                .iter()
                .rev()
                .find(|&&f| f <= self.from_seq)
                .or(segments.first())
                .copied()
            else {
                return Ok(());
            };
            if let Some(seg) = Segment::open(&self.spec.fs, &self.spec.dir, first, self.spec.limit)?
            {
                self.segment = Some(seg);
                self.expected = first;
                return Ok(());
            }
        }
        Err(Error::io(
            "open segment",
            &self.spec.dir,
            std::io::Error::other("segments keep disappearing (concurrent compaction?)"),
        ))
    }

    fn step(&mut self) -> Option<Result<Message>> {
        self.last_gap = None;
        if let Some((m, pos)) = self.stashed.take() {
            self.last_start = Some(pos);
            return Some(Ok(m));
        }
        if !self.started {
            if let Err(e) = self.start() {
                return Some(Err(e));
            }
        }
        loop {
            let seg = self.segment.as_mut()?;
            let line = match seg.reader.next(&seg.file) {
                Ok(line) => line,
                Err(e) => return Some(Err(Error::io("read", &seg.path, e))),
            };
            match line {
                Line::Complete { start, end, offset } => {
                    let here = Position {
                        segment: seg.first,
                        offset,
                        line: seg.line,
                        seq: self.expected,
                    };
                    seg.line += 1;
                    self.unsynced = true;
                    let bytes = seg.reader.bytes(start, end);
                    let (path, line) = (&seg.path, seg.line);
                    if self.expected < self.from_seq {
                        // Skipping ahead to `from_seq`: only the seq matters here, and
                        // damage before the start is `doctor`'s to report.
                        match log::decode::<RecordHead>(bytes, path, line) {
                            Ok(head) => self.expected = head.seq + 1,
                            Err(_) => self.expected += 1,
                        }
                        if self.expected <= self.from_seq {
                            continue;
                        }
                        // That record was the first wanted one: decode it in full.
                        self.expected -= 1;
                    }
                    let message = match log::decode_message(bytes, path, line) {
                        Ok(m) => m,
                        Err(e) => {
                            // A damaged line still held one record.
                            self.last_gap = Some((self.expected, self.expected));
                            self.expected += 1;
                            return Some(Err(e));
                        }
                    };
                    // A lost-seqs notice stands for the seqs before its own.
                    let lost = message
                        .lost_seqs()
                        .is_some_and(|r| *r.start() == self.expected);
                    if message.seq != self.expected && !lost {
                        let forward = message.seq > self.expected;
                        let err = self.out_of_order(message.seq);
                        if forward && message.seq >= self.from_seq && self.matches(&message) {
                            // A gap before a valid message: report the gap, then
                            // deliver the message.
                            let pos = Position {
                                seq: message.seq,
                                ..here
                            };
                            self.stashed = Some((message, pos));
                        }
                        return Some(Err(err));
                    }
                    self.expected = message.seq + 1;
                    if message.seq >= self.from_seq && self.matches(&message) {
                        self.last_start = Some(here);
                        return Some(Ok(message));
                    }
                }
                Line::TooLong { len, .. } => {
                    seg.line += 1;
                    self.last_gap = Some((self.expected, self.expected));
                    self.expected += 1;
                    return Some(Err(Error::Corrupt {
                        path: seg.path.clone(),
                        line: seg.line,
                        reason: format!(
                            "record of {} bytes exceeds the limit of {} bytes",
                            len + 1,
                            self.spec.limit
                        ),
                    }));
                }
                Line::Partial { .. } | Line::Eof => {
                    // The next segment is named after the next seq; a segment holding
                    // no complete record yet has no successor.
                    if self.expected <= seg.first {
                        return None;
                    }
                    match self.at_segment_end() {
                        Ok(AtEnd::Wait) => return None,
                        Ok(AtEnd::Continue) => continue,
                        Ok(AtEnd::Damage(err)) => return Some(Err(err)),
                        Err(e) => return Some(Err(e)),
                    }
                }
            }
        }
    }

    /// At the end of what the current segment held when read. Once a later segment
    /// exists, writers have left this one for good (they move on only from a full
    /// segment whose torn tail they have cut); but a record may have been completed in
    /// it just after that read, so it is read once more before moving on. Moving on to
    /// a later segment than the one named after the next seq reports the seqs in between
    /// as missing, so that nothing after a gap becomes silently invisible.
    fn at_segment_end(&mut self) -> Result<AtEnd> {
        let Some(next) = self.next_segment()? else {
            return Ok(AtEnd::Wait);
        };
        let seg = self.segment.as_mut().expect("reading a segment");
        let seen = seg.reader.position();
        let partial = match seg.reader.next(&seg.file).ctx("read", &seg.path)? {
            Line::Complete { .. } | Line::TooLong { .. } => {
                seg.reader.reset(seen);
                return Ok(AtEnd::Continue);
            }
            Line::Partial { .. } => true,
            Line::Eof => false,
        };
        let first = next.first;
        if self.syncing && self.unsynced {
            seg.file.sync_data().ctx("fdatasync", &seg.path)?;
        }
        let old = std::mem::replace(seg, next);
        if first > self.expected && self.oldest_segment()? == Some(first) {
            // Everything between was removed by compaction, which removes only a
            // prefix of the log: nothing is damaged, this reader was behind.
            let err = Error::Compacted {
                path: self.spec.dir.clone(),
                missed_from: self.expected,
                first_available: first,
            };
            self.last_gap = Some((self.expected, first - 1));
            self.expected = first;
            return Ok(AtEnd::Damage(err));
        }
        if first > self.expected {
            let err = Error::Corrupt {
                path: old.path,
                line: old.line + 1,
                reason: format!(
                    "seqs {} to {} are missing: the next segment starts at {first}",
                    self.expected,
                    first - 1
                ),
            };
            self.last_gap = Some((self.expected, first - 1));
            self.expected = first;
            return Ok(AtEnd::Damage(err));
        }
        if partial {
            return Ok(AtEnd::Damage(Error::Corrupt {
                path: old.path,
                line: old.line + 1,
                reason: "incomplete record in a sealed segment".into(),
            }));
        }
        Ok(AtEnd::Continue)
    }

    /// The first seq of the oldest segment left.
    fn oldest_segment(&self) -> Result<Option<u64>> {
        Ok(log::list_segments(&self.spec.fs, &self.spec.dir)?
            .first()
            .copied())
    }

    /// The segment after the current one, if one exists yet: the one named after the
    /// next seq or, failing that, the first later one.
    fn next_segment(&self) -> Result<Option<Segment>> {
        let (fs, dir, limit) = (&self.spec.fs, &self.spec.dir, self.spec.limit);
        if let Some(next) = Segment::open(fs, dir, self.expected, limit)? {
            return Ok(Some(next));
        }
        // Only a full segment can have a successor, so readers at the tail do not list
        // the directory.
        let seg = self.segment.as_ref().expect("reading a segment");
        if seg.file.metadata().ctx("stat", &seg.path)?.len() < self.spec.segment_bytes {
            return Ok(None);
        }
        let first_later = || -> Result<Option<u64>> {
            Ok(log::list_segments(fs, dir)?
                .into_iter()
                .find(|&f| f > seg.first))
        };
        if first_later()?.is_none() {
            return Ok(None);
        }
        // A listing may miss segments created while it runs, even the successor of one
        // it shows. But a segment is created only after every earlier one: now that a
        // later segment is known to exist, so is every segment before it, and a second
        // look (which starts after they were all created) finds them.
        if let Some(next) = Segment::open(fs, dir, self.expected, limit)? {
            return Ok(Some(next));
        }
        match first_later()? {
            Some(first) => Segment::open(fs, dir, first, limit),
            None => Ok(None),
        }
    }

    /// A record whose seq is not the expected one. A forward jump means the seqs in
    /// between are missing; a backward one (a duplicate) is reported and skipped, and
    /// never moves the expected seq back.
    fn out_of_order(&mut self, found: u64) -> Error {
        let seg = self.segment.as_ref().expect("reading a segment");
        let err = Error::Corrupt {
            path: seg.path.clone(),
            line: seg.line,
            reason: format!("expected seq {}, found {found}", self.expected),
        };
        if found > self.expected {
            self.last_gap = Some((self.expected, found - 1));
        }
        self.expected = self.expected.max(found + 1);
        err
    }

    /// The seqs the error just returned covered: no message will be read for them.
    /// `None` after a message, or after an error that hides no seq (a duplicate).
    pub(crate) fn last_gap(&self) -> Option<(u64, u64)> {
        self.last_gap
    }

    /// Where the line of the message just returned starts.
    pub(crate) fn last_start(&self) -> Option<Position> {
        self.last_start
    }

    /// The first seq of the segment being read, if any.
    pub(crate) fn segment_first(&self) -> Option<u64> {
        self.segment.as_ref().map(|s| s.first)
    }

    /// Where an incomplete final line sits, if the last `next()` stopped at one: the
    /// segment path, its 1-based line number and byte offset. Used by `doctor`.
    pub(crate) fn pending_partial(&mut self) -> Result<Option<(PathBuf, u64, u64)>> {
        let Some(seg) = self.segment.as_mut() else {
            return Ok(None);
        };
        match seg.reader.next(&seg.file).ctx("read", &seg.path)? {
            Line::Partial { offset } => Ok(Some((seg.path.clone(), seg.line + 1, offset))),
            _ => Ok(None),
        }
    }
}

impl Iterator for Reader {
    type Item = Result<Message>;

    fn next(&mut self) -> Option<Result<Message>> {
        self.step()
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

/// Whether a stored position `offset` is still the start of a line of `seg`: a power
/// cut (or an outside tool) may have shortened the file since the position was stored,
/// and reading from the middle of a record would misread it. The caller then searches
/// by seq instead.
fn starts_a_line(seg: &Segment, offset: u64) -> bool {
    use std::os::unix::fs::FileExt;
    if offset == 0 {
        return true;
    }
    let mut byte = [0u8];
    matches!(seg.file.read_at(&mut byte, offset - 1), Ok(1) if byte[0] == b'\n')
}
