//! The send path's record encoder and id generator, written for speed.
//!
//! `encode_tail` produces exactly what `serde_json` would for a [`Message`] (a unit test
//! compares the two), but copies the fields that can never need escaping (the UUID, the
//! RFC 3339 timestamp, names validated to `[A-Za-z0-9._-]`) as they are, and copies free
//! text as is unless it holds a byte that JSON must escape. On a 200-byte record this
//! halves the cost of a send, which is otherwise dominated by per-byte escaping.

use std::io::Write;
use std::sync::Mutex;

use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::Message;

/// Appends the JSON object of `m` without its opening `{` and without `seq` (which the
/// caller adds under the lock), i.e. `"id":…,…}`.
///
/// # Errors
///
/// Only for what JSON cannot hold: an artifact path that is not UTF-8.
pub(crate) fn encode_tail(m: &Message, out: &mut Vec<u8>) -> serde_json::Result<()> {
    out.extend_from_slice(b"\"id\":\"");
    let mut id = [0u8; uuid::fmt::Hyphenated::LENGTH];
    out.extend_from_slice(m.id.hyphenated().encode_lower(&mut id).as_bytes());
    out.extend_from_slice(b"\",\"ts\":\"");
    m.ts.format_into(out, &Rfc3339)
        .expect("a UTC timestamp formats as RFC 3339");
    out.extend_from_slice(b"\",\"from\":");
    string(out, &m.from);
    out.extend_from_slice(b",\"type\":");
    string(out, &m.kind);
    let opt = |out: &mut Vec<u8>, key: &[u8], v: &Option<String>| {
        if let Some(v) = v {
            out.extend_from_slice(key);
            string(out, v);
        }
    };
    opt(out, b",\"subject\":", &m.subject);
    opt(out, b",\"body\":", &m.body);
    if let Some(p) = &m.payload {
        out.extend_from_slice(b",\"payload\":");
        serde_json::to_writer(&mut *out, p)?;
    }
    if !m.artifacts.is_empty() {
        out.extend_from_slice(b",\"artifacts\":");
        serde_json::to_writer(&mut *out, &m.artifacts)?;
    }
    opt(out, b",\"correlation_id\":", &m.correlation_id);
    opt(out, b",\"causation_id\":", &m.causation_id);
    opt(out, b",\"idempotency_key\":", &m.idempotency_key);
    if m.priority != 0 {
        let _ = write!(out, ",\"priority\":{}", m.priority);
    }
    if !m.headers.is_empty() {
        out.extend_from_slice(b",\"headers\":");
        serde_json::to_writer(&mut *out, &m.headers)?;
    }
    out.push(b'}');
    Ok(())
}

/// A JSON string: copied as is when nothing in it needs escaping, else via serde_json.
fn string(out: &mut Vec<u8>, s: &str) {
    if !needs_escape(s.as_bytes()) {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(&mut *out, s).expect("strings serialize");
    }
}

/// Whether any byte is a control character, `"` or `\\`: the bytes JSON escapes.
/// Eight bytes at a time (SWAR), since this runs over every message body.
fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // High bit set in each byte of `x` that is zero (exact for the lowest such byte,
    // and zero overall iff no byte is zero).
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let x = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        // A byte is below 0x20 iff its top 3 bits are clear: keep only those bits
        // (`x & 0xe0…`) and look for a zero byte.
        let control = zero(x & 0xe0e0_e0e0_e0e0_e0e0);
        let quote = zero(x ^ (ONES * u64::from(b'"')));
        let backslash = zero(x ^ (ONES * u64::from(b'\\')));
        if control | quote | backslash != 0 {
            return true;
        }
    }
    chunks
        .remainder()
        .iter()
        .any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

/// The last timestamp and counter handed out, for monotonic ids within the process.
static LAST: Mutex<(u64, u64)> = Mutex::new((0, 0));

/// A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then a 42-bit counter that is
/// random at the start of each millisecond and incremented within it (method 1 of the
/// RFC, so ids from one process strictly increase), then 32 random bits. Randomness
/// comes from a per-process seed and a fast generator, not a syscall per id.
pub(crate) fn new_id(unix_ms: u64) -> Uuid {
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    let (ms, counter) = if unix_ms > last.0 {
        // Start low in the counter space so increments within the ms cannot overflow.
        (unix_ms, random() >> 23)
    } else {
        (last.0, last.1 + 1)
    };
    *last = (ms, counter);
    drop(last);
    let tail = random();
    let mut b = [0u8; 16];
    b[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    // version 7 + the top 12 counter bits; variant 10 + the next 30 bits; 32 random bits.
    let rand_a = ((counter >> 30) & 0x0fff) as u16 | 0x7000;
    b[6..8].copy_from_slice(&rand_a.to_be_bytes());
    let var_hi = ((counter & 0x3fff_ffff) << 32) | (tail & 0xffff_ffff) | (0b10 << 62);
    b[8..].copy_from_slice(&var_hi.to_be_bytes());
    Uuid::from_bytes(b)
}

/// splitmix64 over a per-process seed from the OS (through std's hasher keys).
fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static SEED: OnceLock<u64> = OnceLock::new();
    static STATE: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(std::process::id().into());
        h.finish()
    });
    let mut z = seed.wrapping_add(
        STATE
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15),
    );
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Artifact, NewMessage};

    fn serde_tail(m: &Message) -> Vec<u8> {
        let json = serde_json::to_vec(m).unwrap();
        json[b"{\"seq\":0,".len()..].to_vec()
    }

    #[test]
    fn the_fast_encoder_matches_serde_byte_for_byte() {
        let plain = NewMessage::new("task").from("writer").body("hello world");
        let full = NewMessage::new("review.request")
            .from("a-b.c_d")
            .subject("quote \" backslash \\ newline \n tab \t control \u{1} unicode é ✓")
            .body("line1\nline2")
            .payload(serde_json::json!({"n": 1, "s": "x\"y", "list": [1, 2.5, null]}))
            .artifact(Artifact {
                path: "/tmp/a \"b\".md".into(),
                size: 5,
                sha256: "ab".repeat(32),
            })
            .correlation_id("c\"1")
            .causation_id("c2")
            .idempotency_key("k")
            .priority(-7)
            .header("lang", "en")
            .header("x\"y", "z\\w");
        for m in [plain, full, NewMessage::new("t")] {
            let m = m.into_message("anonymous").unwrap();
            let mut fast = Vec::new();
            encode_tail(&m, &mut fast).unwrap();
            assert_eq!(
                String::from_utf8(fast).unwrap(),
                String::from_utf8(serde_tail(&m)).unwrap()
            );
        }
    }

    #[test]
    fn a_path_json_cannot_hold_is_an_error_not_a_panic() {
        use std::os::unix::ffi::OsStrExt;
        let path = std::path::PathBuf::from(std::ffi::OsStr::from_bytes(b"/tmp/\xff.md"));
        let m = NewMessage::new("t")
            .artifact(Artifact {
                path,
                size: 1,
                sha256: "00".repeat(32),
            })
            .into_message("a")
            .unwrap();
        assert!(encode_tail(&m, &mut Vec::new()).is_err());
    }

    #[test]
    fn needs_escape_agrees_with_the_byte_by_byte_rule() {
        let slow = |b: &[u8]| b.iter().any(|&c| c < 0x20 || c == b'"' || c == b'\\');
        let mut samples: Vec<Vec<u8>> = vec![b"".to_vec(), b"plain text here!".to_vec()];
        for special in [0u8, 0x1f, 0x20, b'"', b'\\', 0x7f, 0x80, 0xff, b'!', b'#'] {
            for pos in 0..20 {
                let mut v = vec![b'a'; 20];
                v[pos] = special;
                samples.push(v);
            }
        }
        for s in samples {
            assert_eq!(needs_escape(&s), slow(&s), "{s:?}");
        }
    }

    #[test]
    fn ids_are_version_7_unique_and_strictly_increasing() {
        // Ids are monotonic process-wide: other tests running in parallel take ids at
        // the real time, so use a time ahead of it (a time behind it would be treated
        // as a clock that went backwards, correctly, and keep the later timestamp).
        let real_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let now = real_ms + 30 * 86_400_000;
        let ids: Vec<Uuid> = (0..10_000).map(|i| new_id(now + i / 1000)).collect();
        assert!(ids.iter().all(|u| u.get_version_num() == 7));
        assert!(ids
            .iter()
            .all(|u| u.get_variant() == uuid::Variant::RFC4122));
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        // The timestamp is the millisecond given.
        assert!(
            new_id(now - 5_000) > ids[9_999],
            "a clock going back keeps ids increasing"
        );
        let (secs, nanos) = ids[0].get_timestamp().unwrap().to_unix();
        assert_eq!(secs * 1000 + u64::from(nanos) / 1_000_000, now);
    }
}
