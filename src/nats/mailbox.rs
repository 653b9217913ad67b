//! Mailboxes on JetStream: a stream with one subject per mailbox.

use std::path::PathBuf;

use async_nats::jetstream::context::{GetStreamErrorKind, PublishErrorKind};
use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use futures_util::StreamExt;
use uuid::Uuid;

use super::{dec, decode, enc, nats_err, Bus, NatsBus, Reader, DUPLICATE_WINDOW, NET};
use crate::backend::{GroupImp, GroupMeta, MailboxBackend, Prepared, ReaderImp};
use crate::{Error, Message, Receipt, Result};

/// A mailbox on JetStream. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Mailbox {
    bus: Bus,
    name: String,
}

/// One message on its way to a stream.
pub(crate) struct Outgoing {
    /// The record, `{"seq":0,...}`.
    pub(crate) payload: Vec<u8>,
    pub(crate) id: uuid::Uuid,
    pub(crate) key: Option<String>,
}

impl Mailbox {
    pub(crate) fn new(bus: Bus, name: &str) -> Mailbox {
        Mailbox {
            bus,
            name: name.to_owned(),
        }
    }

    pub(crate) fn bus(&self) -> &Bus {
        &self.bus
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    fn conn(&self) -> &NatsBus {
        self.bus.conn()
    }

    /// `<url>/<name>`, which names the mailbox in messages.
    pub(crate) fn path(&self) -> PathBuf {
        PathBuf::from(format!("{}/{}", self.conn().url(), self.name))
    }
}

impl MailboxBackend for Mailbox {
    /// The payload is the record without a checksum: `{"seq":0,` and the tail.
    fn record_len(&self, tail_len: usize) -> usize {
        PAYLOAD_PREFIX.len() + tail_len
    }

    fn append(&self, batch: Vec<Prepared>) -> Result<Vec<Receipt>> {
        let batch = batch
            .into_iter()
            .map(|p| {
                let mut payload = Vec::with_capacity(PAYLOAD_PREFIX.len() + p.tail.len());
                payload.extend_from_slice(PAYLOAD_PREFIX);
                payload.extend_from_slice(&p.tail);
                Outgoing {
                    payload,
                    id: p.id,
                    key: p.key,
                }
            })
            .collect();
        self.conn().publish(&self.name, batch)
    }

    fn first_seq(&self) -> Result<u64> {
        Ok(self.conn().bounds(&self.name)?.0)
    }

    fn last_seq(&self) -> Result<u64> {
        Ok(self.conn().bounds(&self.name)?.1)
    }

    fn reader(&self) -> ReaderImp {
        ReaderImp::Nats(Reader::new(self.clone()))
    }

    /// JetStream answers a duplicate `Nats-Msg-Id` only on publish: look for it.
    fn find_key(&self, key: &str) -> Result<Option<(u64, Uuid)>> {
        for m in Reader::new(self.clone()) {
            let m = m?;
            if m.idempotency_key.as_deref() == Some(key) {
                return Ok(Some((m.seq, m.id)));
            }
        }
        Ok(None)
    }

    /// The server keeps the storage: no segments to count.
    fn storage(&self) -> Result<(u64, u64)> {
        Ok((0, 0))
    }

    fn create_group(&self, name: &str, meta: &GroupMeta, from_end: bool) -> Result<()> {
        super::group::create(self, name, meta, from_end)
    }

    fn open_group(&self, name: &str) -> Result<Option<(GroupMeta, GroupImp)>> {
        Ok(super::Group::open(self, name)?.map(|g| (g.meta().clone(), GroupImp::Nats(g))))
    }

    fn group_names(&self) -> Result<Vec<String>> {
        self.conn().consumer_names(&self.name)
    }
}

/// What a stored record starts with: the seq is the stream's, not in the payload.
const PAYLOAD_PREFIX: &[u8] = b"{\"seq\":0,";

impl NatsBus {
    /// Creates the mailbox's stream; `false` if it already existed.
    pub(crate) fn create_stream(&self, mailbox: &str, max_record: usize) -> Result<bool> {
        if self.stream_limit(mailbox)?.is_some() {
            return Ok(false);
        }
        let config = stream::Config {
            name: self.stream_name(mailbox),
            subjects: vec![self.subject(mailbox)],
            description: Some(format!("agentbus mailbox {mailbox:?}")),
            max_message_size: i32::try_from(max_record).unwrap_or(i32::MAX),
            duplicate_window: DUPLICATE_WINDOW,
            num_replicas: self.replicas().unwrap_or(1),
            storage: stream::StorageType::File,
            ..Default::default()
        };
        let js = self.js.clone();
        let name = mailbox.to_owned();
        self.run(NET, async move {
            js.create_stream(config)
                .await
                .map_err(|e| nats_err(format!("create stream for mailbox {name}"), e))
        })?;
        Ok(true)
    }

    /// The mailbox's record limit and replicas, or `None` if it has no stream.
    pub(crate) fn stream_limit(&self, mailbox: &str) -> Result<Option<(usize, usize)>> {
        let js = self.js.clone();
        let name = self.stream_name(mailbox);
        self.run(NET, async move {
            match js.get_stream(&name).await {
                Ok(s) => {
                    let config = &s.cached_info().config;
                    let limit = config.max_message_size.max(0) as usize;
                    Ok(Some((limit, config.num_replicas.max(1))))
                }
                Err(e)
                    if matches!(e.kind(), GetStreamErrorKind::JetStream(j)
                        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
                {
                    Ok(None)
                }
                Err(e) => Err(nats_err(format!("look up stream {name}"), e)),
            }
        })
    }

    /// Refuses a mailbox whose stream has other replicas than the URL's `?replicas`:
    /// the URL asks for a failure tolerance the mailbox does not have (README
    /// "Scaling out").
    pub(crate) fn check_replicas(&self, mailbox: &str, has: usize) -> Result<()> {
        match self.replicas() {
            Some(want) if want != has => {
                let stream = self.stream_name(mailbox);
                Err(Error::InvalidSetting {
                    setting: "replicas",
                    reason: format!(
                        "mailbox {mailbox:?} (stream {stream}) has {has} replica(s) but the \
                         URL asks for {want}: change the stream (`nats stream edit {stream} \
                         --replicas {want}`) or the URL"
                    ),
                })
            }
            _ => Ok(()),
        }
    }

    /// The mailboxes of this namespace, sorted.
    pub(crate) fn mailbox_names(&self) -> Result<Vec<String>> {
        let js = self.js.clone();
        let prefix = format!("{}_MB_", enc(&self.namespace));
        let mut names = self.run(NET, async move {
            let mut names = Vec::new();
            let mut list = js.stream_names();
            while let Some(name) = list.next().await {
                let name = name.map_err(|e| nats_err("list streams", e))?;
                if let Some(mb) = name.strip_prefix(&prefix).and_then(dec) {
                    names.push(mb);
                }
            }
            Ok::<_, Error>(names)
        })?;
        names.sort();
        Ok(names)
    }

    /// Publishes `batch` in order (pipelined: all are sent before the first ack is
    /// awaited) and returns a receipt per message once the server has stored it.
    pub(crate) fn publish(&self, mailbox: &str, batch: Vec<Outgoing>) -> Result<Vec<Receipt>> {
        let js = self.js.clone();
        let subject = self.subject(mailbox);
        let stream = self.stream_name(mailbox);
        let name = mailbox.to_owned();
        self.run(NET, async move {
            let op = || format!("publish to mailbox {name}");
            // The stream exists (the mailbox was opened): "no stream" is the 503 of a
            // stream whose leader is being elected.
            let publish_err = |e: async_nats::jetstream::context::PublishError| {
                if e.kind() == PublishErrorKind::StreamNotFound {
                    Error::Unavailable {
                        operation: op(),
                        reason: format!("{e} (no server answers for the stream now)"),
                    }
                } else {
                    nats_err(op(), e)
                }
            };
            let mut pending = Vec::with_capacity(batch.len());
            for m in batch {
                let mut headers = HeaderMap::new();
                if let Some(key) = &m.key {
                    headers.insert("Nats-Msg-Id", key.as_str());
                }
                let ack = js
                    .publish_with_headers(subject.clone(), headers, m.payload.into())
                    .await
                    .map_err(publish_err)?;
                pending.push((m.id, ack));
            }
            let mut receipts = Vec::with_capacity(pending.len());
            for (id, ack) in pending {
                let ack = ack.await.map_err(publish_err)?;
                let id = if ack.duplicate {
                    // The original receipt: its id is in the stored record.
                    let s = js
                        .get_stream_no_info(&stream)
                        .await
                        .map_err(|e| nats_err(op(), e))?;
                    let stored = s
                        .get_raw_message(ack.sequence)
                        .await
                        .map_err(|e| nats_err(op(), e))?;
                    serde_json::from_slice::<Message>(&stored.payload)
                        .map(|m| m.id)
                        .unwrap_or(id)
                } else {
                    id
                };
                receipts.push(Receipt {
                    id,
                    seq: ack.sequence,
                    mailbox: name.clone(),
                    duplicate: ack.duplicate,
                });
            }
            Ok(receipts)
        })
    }

    /// (first seq, last seq) of the mailbox: (last + 1, last) when it is empty.
    pub(crate) fn bounds(&self, mailbox: &str) -> Result<(u64, u64)> {
        let js = self.js.clone();
        let name = self.stream_name(mailbox);
        self.run(NET, async move {
            let s = js
                .get_stream(&name)
                .await
                .map_err(|e| nats_err(format!("read stream {name}"), e))?;
            let state = &s.cached_info().state;
            let last = state.last_sequence;
            let first = if state.messages == 0 {
                last + 1
            } else {
                state.first_sequence
            };
            Ok((first, last))
        })
    }

    /// The message stored at `seq`; `None` if there is none (deleted, or not yet sent).
    pub(crate) fn get(&self, mailbox: &str, seq: u64) -> Result<Option<Message>> {
        let js = self.js.clone();
        let name = self.stream_name(mailbox);
        let url = self.url.clone();
        self.run(NET, async move {
            let s = js
                .get_stream_no_info(&name)
                .await
                .map_err(|e| nats_err(format!("read stream {name}"), e))?;
            match s.get_raw_message(seq).await {
                Ok(stored) => {
                    let msg_id = stored.headers.get("Nats-Msg-Id").map(|v| v.as_str());
                    decode(&url, &name, seq, &stored.payload, msg_id).map(Some)
                }
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
                Err(e) => Err(nats_err(format!("read seq {seq} of stream {name}"), e)),
            }
        })
    }
}
