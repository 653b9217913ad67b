//! Reading a stored message, whoever wrote it: what an outside writer's record must
//! hold to be delivered, and the one leniency granted (unpaired surrogate escapes).

use crate::name::is_valid;
use crate::Message;

/// Decodes a stored message record. A record whose `from` or `type` is not a valid
/// name (FORMAT.md, "Records") is refused with the reason, like any damaged record:
/// names reach file names, subjects and handler environments, so a reader never hands
/// one on unchecked. An unpaired UTF-16 surrogate escape (`"\ud800"`, which Python's
/// `json.dumps` writes for a lone surrogate) is read as U+FFFD instead of making the
/// whole record unreadable.
pub(crate) fn message(bytes: &[u8]) -> Result<Message, String> {
    let m: Message = match serde_json::from_slice(bytes) {
        Ok(m) => m,
        // serde_json's words for a lone surrogate: "lone leading surrogate in hex
        // escape", or "unexpected end of hex escape" when no escape follows one.
        Err(e) if e.to_string().contains("hex escape") => {
            serde_json::from_slice(&replace_lone_surrogates(bytes))
                .map_err(|e| format!("not a valid record: {e}"))?
        }
        Err(e) => return Err(format!("not a valid record: {e}")),
    };
    for (field, value) in [("from", &m.from), ("type", &m.kind)] {
        if !is_valid(value) {
            return Err(format!(
                "{field} {value:?} is not a valid name ([A-Za-z0-9][A-Za-z0-9._-]{{0,127}})"
            ));
        }
    }
    Ok(m)
}

/// `bytes` with every `\uXXXX` escape of an unpaired surrogate (inside strings)
/// replaced by `\ufffd`; the other bytes as they are.
fn replace_lone_surrogates(bytes: &[u8]) -> Vec<u8> {
    fn unit(b: &[u8], i: usize) -> Option<u16> {
        // `b[i..]` starts with `\u` and four hex digits?
        let hex = b.get(i..i + 6)?;
        if &hex[..2] != b"\\u" {
            return None;
        }
        u16::from_str_radix(std::str::from_utf8(&hex[2..]).ok()?, 16).ok()
    }
    let (mut out, mut i, mut in_string) = (Vec::with_capacity(bytes.len()), 0, false);
    while i < bytes.len() {
        let b = bytes[i];
        if !in_string {
            in_string = b == b'"';
            out.push(b);
            i += 1;
            continue;
        }
        match b {
            b'"' => {
                in_string = false;
                out.push(b);
                i += 1;
            }
            b'\\' => match unit(bytes, i) {
                Some(0xD800..=0xDBFF) if matches!(unit(bytes, i + 6), Some(0xDC00..=0xDFFF)) => {
                    out.extend_from_slice(&bytes[i..i + 12]);
                    i += 12;
                }
                Some(0xD800..=0xDFFF) => {
                    out.extend_from_slice(b"\\ufffd");
                    i += 6;
                }
                _ => {
                    // Any other escape: two bytes (the rest of `\uXXXX` is plain).
                    out.extend_from_slice(&bytes[i..(i + 2).min(bytes.len())]);
                    i += 2;
                }
            },
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(from: &str, subject: &str) -> Vec<u8> {
        format!(
            r#"{{"seq":1,"id":"01890000-0000-7000-8000-000000000001","ts":"2026-12-02T00:00:00Z","from":{from},"type":"t","subject":{subject}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn lone_surrogates_read_as_the_replacement_character() {
        let m = message(&record(
            r#""py""#,
            r#""a\ud800b \udc00 \\ud800 \ud83d\ude00""#,
        ))
        .unwrap();
        assert_eq!(
            m.subject.as_deref(),
            Some("a\u{fffd}b \u{fffd} \\ud800 \u{1f600}")
        );
    }

    #[test]
    fn names_that_are_not_names_are_refused() {
        for bad in [
            r#""""#,
            r#""a b""#,
            r#""x\n""#,
            r#""../etc""#,
            r#""\u0000""#,
        ] {
            let err = message(&record(bad, r#""s""#)).unwrap_err();
            assert!(err.contains("from"), "{bad}: {err}");
        }
        assert!(message(&record(r#""ok.agent-1""#, r#""s""#)).is_ok());
    }
}
