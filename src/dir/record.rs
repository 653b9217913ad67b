//! The line codec: `{"crc":"<8 hex>",<rest of the JSON object>}\n`.
//!
//! The CRC-32C covers every byte after the 18-byte prefix `{"crc":"xxxxxxxx",` up to
//! (not including) the newline. Lines without the prefix (written by outside tools) are
//! accepted unchecked.

/// `{"crc":"` + 8 hex digits + `",`
pub(crate) const CRC_PREFIX_LEN: usize = 18;
const CRC_OPEN: &[u8] = b"{\"crc\":\"";

/// Appends one complete line to `out`: the checksum prefix, `"seq":<seq>,`, then `tail`,
/// which is a serialized JSON object with its opening `{` removed (so it starts with the
/// next member and ends with `}`), then `\n`.
pub(crate) fn encode_line(seq: u64, tail: &[u8], out: &mut Vec<u8>) {
    let seq_buf = itoa_buf(seq);
    let seq_digits = seq_buf.as_bytes();
    let start = out.len();
    out.extend_from_slice(CRC_OPEN);
    out.extend_from_slice(b"00000000\",");
    let body_start = out.len();
    out.extend_from_slice(b"\"seq\":");
    out.extend_from_slice(seq_digits);
    out.push(b',');
    out.extend_from_slice(tail);
    let crc = crc32c::crc32c(&out[body_start..]);
    write_hex(
        crc,
        &mut out[start + CRC_OPEN.len()..start + CRC_OPEN.len() + 8],
    );
    out.push(b'\n');
}

/// Appends `value` as one line with [`encode_line`]. `value` must serialize as a JSON
/// object whose first member is `seq` (a struct whose first field is `seq: u64`).
pub(crate) fn encode_value<T: serde::Serialize>(value: &T, out: &mut Vec<u8>) {
    let json = serde_json::to_vec(value).expect("a record serializes");
    let members = json.strip_prefix(b"{\"seq\":").and_then(|rest| {
        let comma = rest.iter().position(|&b| b == b',')?;
        let seq = std::str::from_utf8(&rest[..comma]).ok()?.parse().ok()?;
        Some((seq, &rest[comma + 1..]))
    });
    let (seq, tail) = members.expect("a record serializes with `seq` first");
    encode_line(seq, tail, out);
}

/// The length of the line [`encode_line`] would produce.
pub(crate) fn encoded_len(seq: u64, tail_len: usize) -> usize {
    CRC_PREFIX_LEN + b"\"seq\":".len() + digits(seq) + 1 + tail_len + 1
}

/// Verifies the checksum of one line (without its newline), if it carries one.
pub(crate) fn verify(line: &[u8]) -> Result<(), String> {
    if !line.starts_with(CRC_OPEN) {
        return Ok(());
    }
    if line.len() < CRC_PREFIX_LEN + 1 || &line[16..18] != b"\"," {
        return Err("malformed checksum prefix".into());
    }
    let stored = parse_hex(&line[8..16]).ok_or("malformed checksum prefix")?;
    let actual = crc32c::crc32c(&line[CRC_PREFIX_LEN..]);
    if stored == actual {
        Ok(())
    } else {
        Err(format!(
            "checksum mismatch (stored {stored:08x}, computed {actual:08x})"
        ))
    }
}

fn digits(mut n: u64) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

struct SeqBuf {
    buf: [u8; 20],
    start: usize,
}

impl SeqBuf {
    fn as_bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

fn itoa_buf(mut n: u64) -> SeqBuf {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    SeqBuf { buf, start: i }
}

fn write_hex(v: u32, out: &mut [u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = HEX[((v >> (28 - 4 * i)) & 0xf) as usize];
    }
}

fn parse_hex(s: &[u8]) -> Option<u32> {
    let mut v = 0u32;
    for &c in s {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => return None,
        };
        v = (v << 4) | u32::from(d);
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_round_trips_and_is_valid_json() {
        let mut out = Vec::new();
        encode_line(42, br#""type":"x"}"#, &mut out);
        assert_eq!(out.len(), encoded_len(42, br#""type":"x"}"#.len()));
        assert_eq!(*out.last().unwrap(), b'\n');
        let line = &out[..out.len() - 1];
        verify(line).unwrap();
        let v: serde_json::Value = serde_json::from_slice(line).unwrap();
        assert_eq!(v["seq"], 42);
        assert_eq!(v["type"], "x");
        assert_eq!(v["crc"].as_str().unwrap().len(), 8);
    }

    #[test]
    fn a_struct_with_seq_first_encodes_as_the_same_line() {
        #[derive(serde::Serialize)]
        struct Rec<'a> {
            seq: u64,
            op: &'a str,
        }
        let mut out = Vec::new();
        encode_value(
            &Rec {
                seq: 1234,
                op: "ack",
            },
            &mut out,
        );
        let mut expected = Vec::new();
        encode_line(1234, br#""op":"ack"}"#, &mut expected);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            String::from_utf8(expected).unwrap()
        );
    }

    #[test]
    fn any_flipped_byte_after_the_prefix_is_detected() {
        let mut out = Vec::new();
        encode_line(7, br#""body":"hello world"}"#, &mut out);
        let line = out[..out.len() - 1].to_vec();
        for i in CRC_PREFIX_LEN..line.len() {
            let mut bad = line.clone();
            bad[i] ^= 0x01;
            assert!(verify(&bad).is_err(), "flip at {i} not detected");
        }
    }

    #[test]
    fn lines_without_a_checksum_are_accepted_unchecked() {
        assert!(verify(br#"{"seq":1,"type":"x"}"#).is_ok());
        assert!(verify(br#"{"crc":"zz"}"#).is_err());
    }

    #[test]
    fn digits_match_decimal_length() {
        for n in [0u64, 9, 10, 99, 100, 12345, u64::MAX] {
            assert_eq!(digits(n), n.to_string().len());
            assert_eq!(itoa_buf(n).as_bytes(), n.to_string().as_bytes());
        }
    }
}
