//! Storage faults, in process (issue 3, point 7): a store error injected through the store's own
//! interface, `chatd::store::Store::fail_writes` (doc-hidden, for tests), under the real member
//! core `chatd::member::Member` and a real SQLite file (`Store::open` on a temporary path).
//!
//! These tests play the daemon's part of a turn by hand: `Store::begin`, the request, then
//! `Store::commit` (and, when the commit fails, `Member::reload`, as `daemon::commit_failed`
//! does). Two ways a write can fail are covered:
//!
//! - `send_fails_with_a_store_error_while_writes_fail_and_works_after`: every write fails from the
//!   start of the request, so `Member::send` itself returns `MemberError::Store` and nothing is
//!   stored (not in the history, not in the outbox, not after reopening the file).
//! - `a_failed_commit_after_a_successful_send_keeps_nothing`: the request's writes succeed but the
//!   turn's commit fails (as on a full disk, where SQLite only notices at commit): the whole turn
//!   is rolled back and the member recovers once writing works again.
//!
//! The same fault on a real file system (a full 4 MiB tmpfs under the real `chatd`) is
//! `full_disk_fails_send_clearly_and_recovers` in `tests/delivery.rs`.

use chatd::clock::Now;
use chatd::crypto::Identity;
use chatd::member::{Member, MemberError, Out};
use chatd::proto::control::{MsgState, RecordBody};
use chatd::store::{Pin, Store, StoreError};
use std::path::Path;

/// A fresh 2048-bit identity (the smallest the crate accepts; key generation is the slow part).
fn identity() -> Identity {
    Identity::generate(&mut rand::thread_rng(), 2048).expect("key generation")
}

/// A store at `path` where alice knows bob (pinned, as after a login that introduced him), and
/// alice's member core loaded from it. Alice is offline: a send only queues.
fn alice_knowing_bob(path: &Path) -> (Store, Member) {
    let bob = identity();
    let mut store = Store::open(path).expect("open the store");
    store
        .put_pin(&Pin {
            user: "bob".into(),
            key: bob.public().der().to_vec(),
            trust: chatd::store::PinTrust::Pinned,
            presented: None,
        })
        .expect("pin bob");
    let alice = Member::load("alice".into(), identity(), &store).expect("load alice");
    (store, alice)
}

/// Texts of the message records in the store's history.
fn history_texts(store: &Store) -> Vec<String> {
    store
        .records(0, None, None)
        .expect("read the history")
        .into_iter()
        .filter_map(|r| match r.body {
            RecordBody::Message { text, .. } => Some(text),
            _ => None,
        })
        .collect()
}

/// Drain the member's outputs; return how many history records it announced.
fn drain_records(m: &mut Member) -> usize {
    let mut n = 0;
    while let Some(out) = m.poll() {
        if matches!(out, Out::Record(_)) {
            n += 1;
        }
    }
    n
}

/// One daemon turn around `send`: begin, send, commit. Returns the send's result and the
/// commit's.
fn turn(
    store: &mut Store,
    m: &mut Member,
    text: &str,
) -> (
    Result<Vec<chatd::proto::control::Sent>, MemberError>,
    Result<(), StoreError>,
) {
    store.begin().expect("begin the turn");
    let sent = m.send(&["bob".to_string()], false, text, Now::at(1_000), store);
    (sent, store.commit())
}

#[test]
fn send_fails_with_a_store_error_while_writes_fail_and_works_after() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("chatd.db");
    let (mut store, mut alice) = alice_knowing_bob(&path);
    drain_records(&mut alice);

    // Writes fail: the send fails with a store error and says nothing was sent.
    store.fail_writes(true);
    let (sent, _commit) = turn(&mut store, &mut alice, "while writes fail");
    match sent {
        Err(MemberError::Store(e)) => {
            let msg = MemberError::Store(e).to_string();
            assert!(
                msg.contains("nothing was sent"),
                "the error says nothing was sent: {msg}"
            );
        }
        other => panic!("send while writes fail must be MemberError::Store, got {other:?}"),
    }
    store.fail_writes(false);
    assert_eq!(
        drain_records(&mut alice),
        0,
        "a failed send announces no history record"
    );
    assert_eq!(store.outbox_messages().unwrap(), 0, "nothing was queued");
    assert!(
        history_texts(&store).is_empty(),
        "nothing is in the history: {:?}",
        history_texts(&store)
    );

    // Writes work again: the same member sends.
    let (sent, commit) = turn(&mut store, &mut alice, "after the fault");
    commit.expect("the turn commits");
    let sent = sent.expect("send works again");
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].to, "bob");
    assert_eq!(sent[0].state, MsgState::Queued);
    assert_eq!(
        drain_records(&mut alice),
        1,
        "the sent message is announced"
    );
    assert_eq!(store.outbox_messages().unwrap(), 1);
    assert_eq!(history_texts(&store), ["after the fault"]);

    // And it is on disk: a reopened store (a restarted daemon) holds exactly that.
    drop(store);
    let reopened = Store::open(&path).expect("reopen the store");
    assert_eq!(reopened.outbox_messages().unwrap(), 1);
    assert_eq!(history_texts(&reopened), ["after the fault"]);
}

#[test]
fn a_failed_commit_after_a_successful_send_keeps_nothing() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("chatd.db");
    let (mut store, mut alice) = alice_knowing_bob(&path);
    drain_records(&mut alice);

    // One message that makes it, so there is something that must stay intact.
    let (sent, commit) = turn(&mut store, &mut alice, "kept");
    sent.expect("first send");
    commit.expect("first commit");
    drain_records(&mut alice);

    // The request's writes succeed, the commit fails: the turn is rolled back.
    store.begin().expect("begin");
    let sent = alice
        .send(
            &["bob".to_string()],
            false,
            "lost with its turn",
            Now::at(2_000),
            &mut store,
        )
        .expect("the request itself succeeds");
    assert_eq!(sent[0].state, MsgState::Queued);
    store.fail_writes(true);
    let commit = store.commit();
    assert!(
        matches!(commit, Err(StoreError::Injected)),
        "the commit fails: {commit:?}"
    );
    // What the daemon does then: take back the turn's output and rebuild the core from disk.
    alice.reload(&store).expect("reload the member");
    store.fail_writes(false);
    assert!(alice.poll().is_none(), "reload drops the turn's outputs");
    assert_eq!(
        store.outbox_messages().unwrap(),
        1,
        "only the first message"
    );
    assert_eq!(history_texts(&store), ["kept"]);

    // Writing works again: the member sends, and both committed messages are on disk.
    let (sent, commit) = turn(&mut store, &mut alice, "after the failed commit");
    sent.expect("send after the failed commit");
    commit.expect("commit after the failed commit");
    drop(store);
    let reopened = Store::open(&path).expect("reopen the store");
    assert_eq!(reopened.outbox_messages().unwrap(), 2);
    assert_eq!(
        history_texts(&reopened),
        ["kept", "after the failed commit"]
    );
}
