//! The async face (feature `tokio`): `recv_async` and `Stream`s wake on new messages
//! without blocking the runtime's thread.
#![cfg(feature = "tokio")]

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agentbus::{Bus, Durability, NewMessage, WatchMode};
use futures_core::Stream;

fn bus(dir: &std::path::Path, poll: Duration) -> Bus {
    Bus::builder()
        .durability(Durability::Flush)
        .poll_interval(poll)
        .init(dir)
        .unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn recv_async_wakes_on_a_send_and_leaves_the_runtime_free() {
    let dir = tempfile::tempdir().unwrap();
    // A one-minute poll interval: the wake-up must come from the notify event.
    let bus = bus(dir.path(), Duration::from_secs(60));
    let main = bus.create_mailbox("main").unwrap();
    let mut rx = bus.follow(&["main"]).unwrap();

    // On a single-threaded runtime, a ticker only runs if recv_async yields the thread.
    let ticks = Arc::new(AtomicU32::new(0));
    let ticker = {
        let ticks = ticks.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                ticks.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let sender = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        main.send(NewMessage::new("ping").body("async")).unwrap();
    });
    let env = tokio::time::timeout(Duration::from_secs(20), rx.recv_async())
        .await
        .expect("woken by the event")
        .unwrap();
    assert_eq!(env.message.body.as_deref(), Some("async"));
    assert!(
        ticks.load(Ordering::Relaxed) >= 5,
        "the runtime was blocked while waiting"
    );
    ticker.abort();
    sender.join().unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn a_consumer_stream_yields_deliveries_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus(dir.path(), Duration::from_millis(50));
    let jobs = bus.create_mailbox("jobs").unwrap();
    let group = jobs.create_group("g").unwrap();
    let mut stream = group
        .consumer_with("w", WatchMode::Auto)
        .unwrap()
        .into_stream();
    let sender = std::thread::spawn(move || {
        for i in 0..5 {
            jobs.send(NewMessage::new("job").body(i.to_string()))
                .unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let mut seqs = Vec::new();
    while seqs.len() < 5 {
        let next = poll_fn(|cx| Pin::new(&mut stream).poll_next(cx));
        let d = tokio::time::timeout(Duration::from_secs(20), next)
            .await
            .expect("a delivery")
            .expect("streams never end")
            .unwrap();
        d.ack().unwrap();
        seqs.push(d.seq());
    }
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
    sender.join().unwrap();
    assert_eq!(group.stats().unwrap().acked, 5);
}
