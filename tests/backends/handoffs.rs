//! Handoffs on both backends: verified artifacts, the lease moving to the receiver,
//! answers the sender sees.

use std::time::Duration;

use agentbus::{Answer, Error};

use crate::Env;

behaviours! {
    /// A handoff's artifact is verified, the lease moves to the receiver, the sender
    /// sees the answer; a changed artifact is rejected with a reason the sender sees.
    fn handoffs_are_verified_and_answered(env: &Env) {
        let writer = env.bus("writer");
        let watcher = env.bus("watcher");
        writer.create_mailbox("main").unwrap();
        let draft = env.scratch.path().join("draft.md");
        std::fs::write(&draft, "# Chapter 1\n").unwrap();
        let lease = writer.lease("chapter-1").ttl(Duration::from_secs(60)).try_acquire().unwrap();
        let t1 = lease.token();
        let sent = writer
            .handoff("main")
            .summary("chapter 1 drafted")
            .next_step("review")
            .artifact(&draft)
            .with_lease(lease)
            .send()
            .unwrap();
        let mut inbox = watcher.handoff_inbox("main").unwrap();
        let got = inbox.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(got.handoff.summary, "chapter 1 drafted");
        got.verify().unwrap();
        let moved = got.accept("watcher").unwrap().expect("the lease moved");
        assert_eq!(moved.holder.as_deref(), Some("watcher"));
        assert!(moved.token > t1);
        match sent.wait_answer(Duration::from_secs(10)).unwrap() {
            Some(Answer::Accepted { lease: Some(l), .. }) => assert_eq!(l.token, moved.token),
            other => panic!("{other:?}"),
        }

        // Same size, different bytes: rejected, and the sender learns why.
        let sent = writer.handoff("main").summary("chapter 2").artifact(&draft).send().unwrap();
        std::fs::write(&draft, "# Chapter X\n").unwrap();
        let got = inbox.recv_timeout(Duration::from_secs(10)).unwrap();
        let err = got.verify().unwrap_err();
        assert!(matches!(err, Error::ArtifactDigestMismatch { .. }), "{err}");
        got.reject("watcher", &err.to_string()).unwrap();
        match sent.wait_answer(Duration::from_secs(10)).unwrap() {
            Some(Answer::Rejected { reason, .. }) => assert!(reason.contains("draft.md"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert!(inbox.try_recv().unwrap().is_none());
    }
}
