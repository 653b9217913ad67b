//! Segment files: naming, listing, bounded line reading, and reading the tail.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::fsutil::Fs;
use super::record;
use crate::error::IoContext;
use crate::{Error, Result};

/// Segment file name for a segment whose first record has `first_seq`.
pub(crate) fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.jsonl")
}

pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".jsonl")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The first seqs of all segments in `log_dir`, ascending.
pub(crate) fn list_segments(fs: &Fs, log_dir: &Path) -> Result<Vec<u64>> {
    let mut firsts = Vec::new();
    for (name, _) in fs.list(log_dir, false)? {
        if let Some(first) = name.to_str().and_then(parse_segment_name) {
            firsts.push(first);
        }
    }
    firsts.sort_unstable();
    Ok(firsts)
}

/// What a writer (or a reader skipping ahead) needs from a record.
#[derive(Debug, Deserialize)]
pub(crate) struct RecordHead {
    pub(crate) seq: u64,
}

impl RecordHead {
    /// Whether this record may follow one with seq `prev` (`None`: it is the first
    /// record of a segment named `first`) without making a seq go out twice: a seq
    /// after it. (A jump forward leaves seqs missing, which readers report; a lost-seqs
    /// notice, see [`crate::LOST_TYPE`], is such a jump.)
    pub(crate) fn follows(&self, prev: Option<u64>, first: u64) -> bool {
        self.seq >= prev.map_or(first, |p| p + 1)
    }
}

/// Checks a line's checksum and decodes it.
pub(crate) fn decode<'de, T: Deserialize<'de>>(
    bytes: &'de [u8],
    path: &Path,
    line: u64,
) -> Result<T> {
    record::verify(bytes).map_err(|reason| Error::Corrupt {
        path: path.to_owned(),
        line,
        reason,
    })?;
    serde_json::from_slice(bytes).map_err(|e| Error::Corrupt {
        path: path.to_owned(),
        line,
        reason: format!("not a valid record: {e}"),
    })
}

/// Checks a message line's checksum and decodes it as [`crate::decode::message`] does
/// (names checked, lone surrogate escapes read as U+FFFD).
pub(crate) fn decode_message(bytes: &[u8], path: &Path, line: u64) -> Result<crate::Message> {
    let corrupt = |reason| Error::Corrupt {
        path: path.to_owned(),
        line,
        reason,
    };
    record::verify(bytes).map_err(corrupt)?;
    crate::decode::message(bytes).map_err(corrupt)
}

/// One step of [`LineReader::next`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Line {
    /// A complete line (newline excluded): its byte range in the reader's buffer and its
    /// offset in the file.
    Complete {
        start: usize,
        end: usize,
        offset: u64,
    },
    /// A line longer than the limit, skipped; `len` excludes the newline.
    TooLong { offset: u64, len: u64 },
    /// Bytes without a final newline at end of file: a write in progress or a torn tail.
    /// Not consumed: the next call reads it again (with whatever was appended since).
    Partial { offset: u64 },
    /// End of file, nothing pending.
    Eof,
}

/// Reads newline-terminated lines with positional reads, never buffering more than the
/// record limit plus one read chunk, so a hostile file cannot make it allocate more.
#[derive(Debug)]
pub(crate) struct LineReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// File offset of `buf[0]`.
    buf_off: u64,
    /// Longest accepted line, newline included.
    limit: usize,
}

const CHUNK: usize = 64 * 1024;
/// A new reader's buffer: most readers (a group refresh, a key lookup) read a record or
/// two, and zero-filling a 64 KiB buffer for each of those dominated their cost.
const FIRST_CHUNK: usize = 4 * 1024;

impl LineReader {
    pub(crate) fn new(offset: u64, limit: usize) -> Self {
        LineReader {
            buf: Vec::new(),
            start: 0,
            end: 0,
            buf_off: offset,
            limit,
        }
    }

    /// Starts over at `offset`, keeping the buffer's allocation.
    pub(crate) fn reset(&mut self, offset: u64) {
        self.start = 0;
        self.end = 0;
        self.buf_off = offset;
    }

    /// File offset of the next unconsumed byte.
    pub(crate) fn position(&self) -> u64 {
        self.buf_off + self.start as u64
    }

    pub(crate) fn bytes(&self, start: usize, end: usize) -> &[u8] {
        &self.buf[start..end]
    }

    pub(crate) fn next(&mut self, file: &File) -> io::Result<Line> {
        // Bytes of an unfinished line left from an earlier call were read then; a writer
        // may since have cut them (torn-tail repair) and written another record there.
        // Read the line afresh rather than gluing new bytes onto stale ones.
        if self.start < self.end && memchr::memchr(b'\n', &self.buf[self.start..self.end]).is_none()
        {
            self.end = self.start;
        }
        loop {
            if let Some(i) = memchr::memchr(b'\n', &self.buf[self.start..self.end]) {
                let (start, end) = (self.start, self.start + i);
                self.start = end + 1;
                let offset = self.buf_off + start as u64;
                if end - start >= self.limit {
                    return Ok(Line::TooLong {
                        offset,
                        len: (end - start) as u64,
                    });
                }
                return Ok(Line::Complete { start, end, offset });
            }
            if self.end - self.start >= self.limit {
                return self.skip_long_line(file);
            }
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.buf_off += self.start as u64;
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == self.buf.len() {
                let want = (self.buf.len() * 2).clamp(FIRST_CHUNK, self.limit + CHUNK);
                self.buf.resize(want, 0);
            }
            let room = self.buf.len() - self.end;
            let n = read_at_retry(
                file,
                &mut self.buf[self.end..],
                self.buf_off + self.end as u64,
            )?;
            if n == room && self.buf.len() < CHUNK {
                // Streaming: read in larger chunks from now on.
                self.buf.resize(self.buf.len() * 2, 0);
            }
            if n == 0 {
                if self.end == self.start {
                    return Ok(Line::Eof);
                }
                // Forget the partial bytes: a writer may yet cut them (torn-tail repair)
                // and write a different record there, so the next call reads afresh.
                self.end = self.start;
                return Ok(Line::Partial {
                    offset: self.position(),
                });
            }
            self.end += n;
        }
    }

    /// The buffered bytes from `start` hold no newline and already exceed the limit: scan
    /// forward for the line's end without keeping what is skipped.
    fn skip_long_line(&mut self, file: &File) -> io::Result<Line> {
        let offset = self.position();
        let mut scanned = (self.end - self.start) as u64;
        loop {
            let n = read_at_retry(file, &mut self.buf[..], offset + scanned)?;
            if n == 0 {
                // No end yet: leave it pending (in progress, or a torn tail).
                self.buf_off = offset;
                self.start = 0;
                self.end = 0;
                return Ok(Line::Partial { offset });
            }
            if let Some(i) = memchr::memchr(b'\n', &self.buf[..n]) {
                let len = scanned + i as u64;
                self.buf_off = offset + len + 1;
                self.start = 0;
                self.end = 0;
                return Ok(Line::TooLong { offset, len });
            }
            scanned += n as u64;
        }
    }
}

fn read_at_retry(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    loop {
        match file.read_at(buf, offset) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// The end of a segment as a writer (holding the lock) sees it.
#[derive(Debug)]
pub(crate) struct TailInfo {
    /// Length up to and including the last newline; bytes after it are a torn tail.
    pub(crate) complete_len: u64,
    /// The last complete record, if any.
    pub(crate) last: Option<RecordHead>,
    /// The seq of the record before it, if it is in the same segment and readable.
    pub(crate) prev: Option<u64>,
    /// The last record is the first line of the file.
    pub(crate) first_line: bool,
}

/// Reads backwards from `size` to find the last complete line, without reading the rest
/// of the file. `limit` is the record limit, which bounds how far back to look.
pub(crate) fn read_tail(file: &File, path: &Path, size: u64, limit: usize) -> Result<TailInfo> {
    let max_window = (2 * limit as u64 + 2).max(CHUNK as u64);
    let mut window = (CHUNK as u64).min(size);
    let mut buf = Vec::new();
    loop {
        let from = size - window;
        buf.resize(window as usize, 0);
        file.read_exact_at(&mut buf, from).ctx("read", path)?;
        let whole = from == 0;
        let grow = |w: u64| -> Result<u64> {
            if w >= max_window {
                Err(Error::Corrupt {
                    path: path.to_owned(),
                    line: line_number_at(file, size).unwrap_or(0) + 1,
                    reason: format!("no complete record within the last {w} bytes"),
                })
            } else {
                Ok((w * 2).min(size).min(max_window))
            }
        };
        let Some(nl) = memchr::memrchr(b'\n', &buf) else {
            if whole {
                return Ok(TailInfo {
                    complete_len: 0,
                    last: None,
                    prev: None,
                    first_line: false,
                });
            }
            window = grow(window)?;
            continue;
        };
        let line_start = match memchr::memrchr(b'\n', &buf[..nl]) {
            Some(p) => p + 1,
            None if whole => 0,
            None => {
                window = grow(window)?;
                continue;
            }
        };
        // The line before it, when the window holds all of it: a writer checks that
        // the sequence goes on (a wider window is not worth it for this check).
        let prev_start = match line_start.checked_sub(1) {
            None => None,
            Some(end) => match memchr::memrchr(b'\n', &buf[..end]) {
                Some(p) => Some((p + 1, end)),
                None if whole => Some((0, end)),
                None if window < max_window => {
                    window = (window * 2).min(size).min(max_window);
                    continue;
                }
                None => None,
            },
        };
        let prev = prev_start
            .and_then(|(s, e)| decode::<RecordHead>(&buf[s..e], path, 0).ok())
            .map(|h| h.seq);
        let complete_len = from + nl as u64 + 1;
        let line = &buf[line_start..nl];
        let last = decode::<RecordHead>(line, path, 0).map_err(|e| match e {
            Error::Corrupt { path, reason, .. } => Error::Corrupt {
                line: line_number_at(file, from + line_start as u64).unwrap_or(0) + 1,
                path,
                reason,
            },
            other => other,
        })?;
        return Ok(TailInfo {
            complete_len,
            last: Some(last),
            prev,
            first_line: from + line_start as u64 == 0,
        });
    }
}

/// Counts the newlines before `offset` (only used to name the line in an error).
pub(crate) fn line_number_at(file: &File, offset: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0u64;
    let mut lines = 0u64;
    while pos < offset {
        let want = ((offset - pos) as usize).min(CHUNK);
        let n = read_at_retry(file, &mut buf[..want], pos)?;
        if n == 0 {
            break;
        }
        lines += memchr::memchr_iter(b'\n', &buf[..n]).count() as u64;
        pos += n as u64;
    }
    Ok(lines)
}

/// Where a reader stopped: the segment and the byte offset of the next unread line.
#[derive(Debug)]
pub(crate) struct Segment {
    pub(crate) first: u64,
    pub(crate) path: PathBuf,
    pub(crate) file: File,
    pub(crate) reader: LineReader,
    /// Number of lines consumed so far in this segment.
    pub(crate) line: u64,
}

impl Segment {
    /// Opens the segment starting at `first` in `log_dir`; `Ok(None)` if it does not exist.
    pub(crate) fn open(
        fs: &Fs,
        log_dir: &Path,
        first: u64,
        limit: usize,
    ) -> Result<Option<Segment>> {
        let path = log_dir.join(segment_name(first));
        Ok(fs.open_read_opt(&path)?.map(|file| Segment {
            first,
            path,
            file,
            reader: LineReader::new(0, limit),
            line: 0,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(bytes: &[u8]) -> (tempfile::NamedTempFile, File) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        let file = f.reopen().unwrap();
        (f, file)
    }

    /// The next line `r` reads from `file`, which must be a complete one.
    fn complete_line(r: &mut LineReader, file: &File) -> Vec<u8> {
        let Line::Complete { start, end, .. } = r.next(file).unwrap() else {
            panic!("not a complete line")
        };
        r.bytes(start, end).to_vec()
    }

    /// `tmp` opened for appending, as a writer opens a segment.
    fn writer(tmp: &tempfile::NamedTempFile) -> File {
        std::fs::OpenOptions::new()
            .append(true)
            .open(tmp.path())
            .unwrap()
    }

    #[test]
    fn segment_names_sort_and_parse() {
        assert_eq!(segment_name(1), "00000000000000000001.jsonl");
        assert_eq!(parse_segment_name(&segment_name(987)), Some(987));
        assert_eq!(parse_segment_name("1.jsonl"), None);
        assert_eq!(parse_segment_name("0000000000000000000x.jsonl"), None);
    }

    #[test]
    fn line_reader_yields_lines_then_partial_then_resumes() {
        let (tmp, file) = file_with(b"one\ntwo\nthr");
        let mut r = LineReader::new(0, 100);
        let Line::Complete { start, end, offset } = r.next(&file).unwrap() else {
            panic!()
        };
        assert_eq!((r.bytes(start, end), offset), (&b"one"[..], 0));
        assert!(matches!(
            r.next(&file).unwrap(),
            Line::Complete { offset: 4, .. }
        ));
        assert_eq!(r.next(&file).unwrap(), Line::Partial { offset: 8 });
        assert_eq!(r.position(), 8);
        writer(&tmp).write_all(b"ee\n").unwrap();
        assert_eq!(complete_line(&mut r, &file), b"three");
        assert_eq!(r.next(&file).unwrap(), Line::Eof);
    }

    #[test]
    fn line_reader_rereads_a_partial_line_that_was_cut_and_rewritten() {
        let (tmp, file) = file_with(
            b"one
torn-record-bytes",
        );
        let mut r = LineReader::new(0, 100);
        assert!(matches!(r.next(&file).unwrap(), Line::Complete { .. }));
        assert_eq!(r.next(&file).unwrap(), Line::Partial { offset: 4 });
        // A writer repairs the torn tail and appends a shorter, different record.
        let f = writer(&tmp);
        f.set_len(4).unwrap();
        (&f).write_all(b"two\n").unwrap();
        assert_eq!(complete_line(&mut r, &file), b"two");
        assert_eq!(r.next(&file).unwrap(), Line::Eof);
    }

    #[test]
    fn stale_partial_bytes_after_a_complete_line_are_reread() {
        // One read takes a complete line and the start of a torn one.
        let (tmp, file) = file_with(b"one\ntorn-bytes");
        let mut r = LineReader::new(0, 100);
        assert!(matches!(r.next(&file).unwrap(), Line::Complete { .. }));
        // A writer cuts the torn bytes and writes a longer record in their place.
        let f = writer(&tmp);
        f.set_len(4).unwrap();
        (&f).write_all(b"a-much-longer-record\n").unwrap();
        assert_eq!(complete_line(&mut r, &file), b"a-much-longer-record");
    }

    #[test]
    fn line_reader_skips_overlong_lines_without_buffering_them() {
        let mut data = vec![b'x'; 300_000];
        data.push(b'\n');
        data.extend_from_slice(b"ok\n");
        let (_tmp, file) = file_with(&data);
        let mut r = LineReader::new(0, 1000);
        assert_eq!(
            r.next(&file).unwrap(),
            Line::TooLong {
                offset: 0,
                len: 300_000
            }
        );
        assert!(r.buf.len() <= 1000 + CHUNK);
        assert_eq!(complete_line(&mut r, &file), b"ok");
    }

    #[test]
    fn read_tail_finds_last_record_and_torn_bytes() {
        let (_tmp, file) = file_with(b"{\"seq\":1}\n{\"seq\":2,\"type\":\"k\"}\n{\"seq\":3,\"to");
        let size = file.metadata().unwrap().len();
        let t = read_tail(&file, Path::new("x"), size, 1000).unwrap();
        assert_eq!(t.complete_len, size - br#"{"seq":3,"to"#.len() as u64);
        assert_eq!(t.last.unwrap().seq, 2);

        let (_tmp, file) = file_with(b"{\"seq\":3,\"to");
        let t = read_tail(&file, Path::new("x"), 12, 1000).unwrap();
        assert_eq!((t.complete_len, t.last.is_none()), (0, true));
    }
}
