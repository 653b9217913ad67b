//! Leases on JetStream: one KV entry per lease, changed only by compare-and-set on
//! its revision. The revision of the write that granted a lease is its token, so tokens
//! strictly increase across every grant for as long as the bucket exists.

use std::time::Duration;

use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::{self, kv, stream};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::{dec, enc, nats_err, NatsBus, NET, REQUEST_TIMEOUT};
use crate::backend::{LeaseChange, LeaseState};
use crate::clock::{datetime_ms, ms, now_ms};
use crate::report::LeaseInfo;
use crate::{Error, Result};

/// The value of a lease entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Value {
    holder: Option<String>,
    /// The grant's token; 0 in the write that grants, whose revision is the token.
    #[serde(default)]
    token: u64,
    acquired_at: i64,
    expires_at: i64,
    #[serde(default)]
    renewals: u32,
}

fn parse(name: &str, current: Option<(u64, &[u8])>) -> Result<LeaseState> {
    let Some((revision, bytes)) = current else {
        return Ok(LeaseState::default());
    };
    let v: Value = serde_json::from_slice(bytes).map_err(|e| Error::Corrupt {
        path: format!("lease {name}").into(),
        line: revision,
        reason: format!("not a lease value: {e}"),
    })?;
    Ok(LeaseState {
        seq: revision,
        token: if v.token == 0 { revision } else { v.token },
        holder: v.holder,
        acquired_at: v.acquired_at,
        expires_at: v.expires_at,
        renewals: v.renewals,
        process_bound: false,
    })
}

/// How long a lease request for `ttl` may take: the TTL (a grant that arrives later
/// would be over before its holder sees it), at least [`MIN_LEASE_BOUND`] so that a
/// short TTL on a loaded machine is not refused for nothing, and at most
/// [`REQUEST_TIMEOUT`].
fn bound(ttl: Duration) -> Duration {
    ttl.clamp(MIN_LEASE_BOUND, REQUEST_TIMEOUT)
}

/// The least time a lease request is given, whatever its TTL.
const MIN_LEASE_BOUND: Duration = Duration::from_millis(250);

/// The first nats-server release whose compare-and-set on a replicated KV bucket is
/// atomic. Before it, two contenders on a bucket with more than one replica can both
/// win (measured: 127 double successes in 300 two-client races on 2.9.10 with three
/// replicas, none on 2.15.1), so two agents would hold one lease at once.
pub(crate) const ATOMIC_REPLICATED_CAS: (u64, u64, u64) = (2, 9, 21);

/// `"2.9.10"` (or `"2.10.0-beta.1"`) → (2, 9, 10); `None` if it does not parse.
pub(crate) fn parse_version(version: &str) -> Option<(u64, u64, u64)> {
    let core = version.trim().trim_start_matches('v');
    let core = core.split(['-', '+']).next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
    let v = (
        parts.next()??,
        parts.next()??,
        parts.next().unwrap_or(Some(0))?,
    );
    Some(v)
}

/// Refuses a lease bucket with `replicas` on a server of `version` whose replicated
/// compare-and-set is not atomic. A version that does not parse is let through (a
/// build of the server's main branch, say).
pub(crate) fn check_lease_server(version: &str, replicas: usize, bucket: &str) -> Result<()> {
    if replicas <= 1 {
        return Ok(());
    }
    match parse_version(version) {
        Some(v) if v < ATOMIC_REPLICATED_CAS => Err(Error::UnsupportedServer {
            version: version.to_owned(),
            what: format!("the lease bucket {bucket} with {replicas} replicas"),
            why: "its compare-and-set on a replicated stream is not atomic, so two \
                  contenders could hold one lease at once"
                .to_owned(),
            needed: "2.9.21",
        }),
        _ => Ok(()),
    }
}

fn encode(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("a lease value serializes")
}

/// The lease's current state (a default one if it was never granted).
pub(crate) fn state(nats: &NatsBus, name: &str) -> Result<LeaseState> {
    let owned = name.to_owned();
    let (_, state) = nats.lease_update(name, REQUEST_TIMEOUT, move |cur| {
        Ok((None, parse(&owned, cur)?))
    })?;
    Ok(state)
}

/// Grants the lease to `holder` unless someone holds it: `Ok((token, expires_at))`, or
/// the holder's state.
pub(crate) fn grant(
    nats: &NatsBus,
    name: &str,
    holder: &str,
    ttl: Duration,
) -> Result<std::result::Result<(u64, i64), LeaseState>> {
    let (owned, holder) = (name.to_owned(), holder.to_owned());
    let (revision, outcome) = nats.lease_update(name, bound(ttl), move |cur| {
        let state = parse(&owned, cur)?;
        let now = now_ms();
        if state.held_at(now) {
            return Ok((None, Err(state)));
        }
        let v = Value {
            holder: Some(holder.clone()),
            token: 0,
            acquired_at: now,
            expires_at: now.saturating_add(ms(ttl)),
            renewals: 0,
        };
        Ok((Some(encode(&v)), Ok(v.expires_at)))
    })?;
    Ok(outcome.map(|expires_at| (revision, expires_at)))
}

/// Renews, releases or transfers grant `token` of `holder`, under the same checks
/// as the directory's: only the current grant may change, and only a release is
/// allowed after expiry.
pub(crate) fn change(
    nats: &NatsBus,
    name: &str,
    holder: &str,
    token: u64,
    change: LeaseChange,
) -> Result<LeaseInfo> {
    let (owned, holder) = (name.to_owned(), holder.to_owned());
    let release = matches!(change, LeaseChange::Release);
    let limit = match &change {
        LeaseChange::Renew(ttl) | LeaseChange::Transfer(_, ttl) => bound(*ttl),
        LeaseChange::Release => REQUEST_TIMEOUT,
    };
    let (revision, v) = nats.lease_update(name, limit, move |cur| {
        let state = parse(&owned, cur)?;
        let now = now_ms();
        let stale = |reason: String| Error::StaleLease {
            name: owned.clone(),
            holder: state.holder.clone().filter(|_| state.held_at(now)),
            token: state.token,
            reason,
        };
        if token != state.token || state.holder.as_deref() != Some(holder.as_str()) {
            return Err(stale(format!(
                "token {token} of {holder:?} is not the current grant"
            )));
        }
        if !release && now >= state.expires_at {
            return Err(stale("the lease has expired; acquire it again".into()));
        }
        let v = match &change {
            LeaseChange::Renew(ttl) => Value {
                holder: Some(holder.clone()),
                token,
                acquired_at: state.acquired_at,
                expires_at: now.saturating_add(ms(*ttl)),
                renewals: state.renewals + 1,
            },
            LeaseChange::Release => Value {
                holder: None,
                token,
                acquired_at: state.acquired_at,
                expires_at: state.expires_at,
                renewals: state.renewals,
            },
            LeaseChange::Transfer(to, ttl) => Value {
                holder: Some(to.clone()),
                token: 0,
                acquired_at: now,
                expires_at: now.saturating_add(ms(*ttl)),
                renewals: 0,
            },
        };
        Ok((Some(encode(&v)), v))
    })?;
    Ok(LeaseInfo {
        name: name.to_owned(),
        token: if v.token == 0 { revision } else { v.token },
        holder: v.holder,
        acquired_at: datetime_ms(v.acquired_at),
        expires_at: datetime_ms(v.expires_at),
        renewals: v.renewals,
        process_bound: false,
    })
}

impl NatsBus {
    /// The namespace's lease bucket, opened (or created with the URL's replicas) once.
    /// A bucket whose replicas differ from the URL's, or a replicated bucket on a
    /// server whose replicated compare-and-set is not atomic, is refused.
    fn lease_store(&self) -> Result<kv::Store> {
        if let Some(store) = self.leases.get() {
            return Ok(store.clone());
        }
        let js = self.js.clone();
        let bucket = self.bucket();
        let want = self.replicas();
        let version = self.server_version();
        if let Some(n) = want {
            check_lease_server(&version, n, &bucket)?;
        }
        let (store, has) = self.run(NET, async move {
            let op = || format!("open KV bucket {bucket}");
            match js.get_stream(format!("KV_{bucket}")).await {
                Ok(mut s) => {
                    let has = s
                        .info()
                        .await
                        .map_err(|e| nats_err(op(), e))?
                        .config
                        .num_replicas;
                    let store = js
                        .get_key_value(&bucket)
                        .await
                        .map_err(|e| nats_err(op(), e))?;
                    Ok((store, has))
                }
                Err(e)
                    if !matches!(e.kind(), GetStreamErrorKind::JetStream(j)
                        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
                {
                    Err(nats_err(op(), e))
                }
                Err(_) => {
                    let replicas = want.unwrap_or(1);
                    // The bucket's stream, as `create_key_value` would make it. That
                    // call first asks for the account's limits, whose answer 2.9
                    // servers word in a way this client cannot parse.
                    js.create_stream(stream::Config {
                        name: format!("KV_{bucket}"),
                        description: Some("agentbus leases".into()),
                        subjects: vec![format!("$KV.{bucket}.>")],
                        max_messages_per_subject: 1,
                        storage: stream::StorageType::File,
                        allow_rollup: true,
                        deny_delete: true,
                        // Reads go to the leader: a replica's direct answer may lag,
                        // and a lease decision must see the latest grant.
                        allow_direct: false,
                        num_replicas: replicas,
                        discard: stream::DiscardPolicy::New,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| nats_err(format!("create KV bucket {bucket}"), e))?;
                    let store = js
                        .get_key_value(&bucket)
                        .await
                        .map_err(|e| nats_err(op(), e))?;
                    Ok((store, replicas))
                }
            }
        })?;
        let has = has.max(1);
        match want {
            Some(want) if want != has => {
                return Err(Error::InvalidSetting {
                    setting: "replicas",
                    reason: format!(
                        "the lease bucket {} has {has} replica(s) but the URL asks for \
                         {want}: change it (`nats stream edit KV_{} --replicas {want}`) or \
                         the URL",
                        self.bucket(),
                        self.bucket()
                    ),
                })
            }
            _ => check_lease_server(&self.server_version(), has, &self.bucket())?,
        }
        Ok(self.leases.get_or_init(|| store).clone())
    }

    /// Read-modify-write of a lease entry with compare-and-set on its revision:
    /// `decide` sees the current (revision, value) and returns the new value, or
    /// `None` to leave it. A concurrent writer makes the write fail; then `decide`
    /// runs again on what that writer left. Returns the revision written (or the
    /// current one) and the value `decide` last saw.
    ///
    /// The whole exchange is given `bound` ([`Error::Unavailable`] after that): a
    /// lease call never waits longer than the lease would last.
    pub(crate) fn lease_update<T: Send + 'static>(
        &self,
        lease: &str,
        bound: Duration,
        mut decide: impl FnMut(Option<(u64, &[u8])>) -> Result<(Option<Vec<u8>>, T)> + Send + 'static,
    ) -> Result<(u64, T)> {
        let store = self.lease_store()?;
        let key = enc(lease);
        let name = key.clone();
        self.run(
            NET,
            super::bounded(move || format!("update lease {name}"), bound, async move {
                let op = || format!("update lease {key}");
                loop {
                    let entry = store.entry(&key).await.map_err(|e| nats_err(op(), e))?;
                    let current = entry.as_ref().and_then(|e| match e.operation {
                        kv::Operation::Put => Some((e.revision, &e.value[..])),
                        _ => None,
                    });
                    let (write, seen) = decide(current)?;
                    let Some(bytes) = write else {
                        return Ok((entry.map_or(0, |e| e.revision), seen));
                    };
                    let written = match &entry {
                        Some(e) => {
                            store
                                .update(&key, bytes.into(), e.revision)
                                .await
                                .map_err(|e| {
                                    // A clustered server words a lost compare-and-set as error
                                    // 10164 ("wrong last sequence"), which the client does not
                                    // map to WrongLastRevision.
                                    let text = e.to_string();
                                    let lost = e.kind() == kv::UpdateErrorKind::WrongLastRevision
                                        || text.contains("wrong last sequence");
                                    (lost, text)
                                })
                        }
                        None => store.create(&key, bytes.into()).await.map_err(|e| {
                            let text = e.to_string();
                            let lost = e.kind() == kv::CreateErrorKind::AlreadyExists
                                || text.contains("wrong last sequence");
                            (lost, text)
                        }),
                    };
                    match written {
                        Ok(revision) => return Ok((revision, seen)),
                        Err((true, _)) => continue,
                        Err((false, e)) => return Err(nats_err(op(), e)),
                    }
                }
            }),
        )
    }

    /// Every lease entry: (name, revision, value).
    pub(crate) fn lease_entries(&self) -> Result<Vec<(String, u64, Vec<u8>)>> {
        let store = self.lease_store()?;
        self.run(NET, async move {
            let op = || "list leases".to_owned();
            let mut keys = store.keys().await.map_err(|e| nats_err(op(), e))?;
            let mut out = Vec::new();
            while let Some(key) = keys.next().await {
                let key = key.map_err(|e| nats_err(op(), e))?;
                if let Some(e) = store.entry(&key).await.map_err(|e| nats_err(op(), e))? {
                    if e.operation == kv::Operation::Put {
                        out.extend(dec(&key).map(|k| (k, e.revision, e.value.to_vec())));
                    }
                }
            }
            out.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(parse_version("2.9.10"), Some((2, 9, 10)));
        assert_eq!(parse_version("v2.15.1"), Some((2, 15, 1)));
        assert_eq!(parse_version("2.10.0-beta.3"), Some((2, 10, 0)));
        assert_eq!(parse_version("2.11"), Some((2, 11, 0)));
        assert_eq!(parse_version("main"), None);
        assert_eq!(parse_version(""), None);
    }

    /// Issue 15 #2: a replicated lease bucket needs a server whose replicated
    /// compare-and-set is atomic (2.9.21 and later); one replica works everywhere.
    #[test]
    fn replicated_leases_need_2_9_21() {
        for old in ["2.9.10", "2.9.20", "2.2.0"] {
            let err = check_lease_server(old, 3, "ns_LEASES").unwrap_err();
            assert_eq!(err.code(), "unsupported_server");
            let text = err.to_string();
            assert!(text.contains(old) && text.contains("2.9.21"), "{text}");
            check_lease_server(old, 1, "ns_LEASES").unwrap();
        }
        for new in ["2.9.21", "2.10.0", "2.15.1", "3.0.0", "dev"] {
            check_lease_server(new, 3, "ns_LEASES").unwrap();
        }
    }

    /// Issue 15 #10: a lease request waits no longer than the lease lasts (within
    /// sane limits).
    #[test]
    fn lease_requests_are_bounded_by_the_ttl() {
        assert_eq!(bound(Duration::from_secs(2)), Duration::from_secs(2));
        assert_eq!(bound(Duration::from_secs(60)), REQUEST_TIMEOUT);
        assert_eq!(bound(Duration::from_millis(10)), MIN_LEASE_BOUND);
    }
}
