//! Unit tests of the relay core on its own: frames in, `Out` actions out, an in-memory store.
//! The routed items are dummies (the relay never opens them); logins are real signatures.

use super::*;
use std::sync::OnceLock;

use crate::crypto::Identity;
use crate::proto::relay::{Envelope, Kind, Receipt};
use crate::store::Store;

const ALICE: usize = 0;
const BOB: usize = 1;
const MALLORY: usize = 2;

/// Test identities, generated once per test process (key generation is the slow part).
fn identity(i: usize) -> Identity {
    static PEMS: [OnceLock<String>; 3] = [const { OnceLock::new() }; 3];
    let pem = PEMS[i].get_or_init(|| {
        let id = Identity::generate(&mut rand::thread_rng(), 2048).expect("key generation");
        id.to_pem().expect("pem").as_str().to_owned()
    });
    Identity::from_pem(pem).expect("stored pem parses")
}

/// One relay, its store and a clock.
struct T {
    relay: Relay,
    store: Store,
    now: u64,
}

impl T {
    fn new() -> T {
        T::with_limits(Limits::default())
    }

    fn with_limits(limits: Limits) -> T {
        let store = Store::open_in_memory().unwrap();
        let relay = Relay::load(&store, limits).unwrap();
        T {
            relay,
            store,
            now: 1_000,
        }
    }

    /// Everything the relay wants done, in order.
    fn drain(&mut self) -> Vec<Out> {
        std::iter::from_fn(|| self.relay.poll()).map(norm).collect()
    }

    /// Open connection `id` and return the challenge nonce it was sent.
    fn connect(&mut self, id: impl Into<ConnId>) -> [u8; 32] {
        let id: ConnId = id.into();
        self.relay.connect(id, self.now);
        match self.drain().as_slice() {
            [Out::Send(c, FromRelay::Challenge { nonce, version: _ })] if *c == id => *nonce,
            other => panic!("expected one challenge, got {other:?}"),
        }
    }

    fn handle(&mut self, id: impl Into<ConnId>, msg: ToRelay) -> Vec<Out> {
        let id: ConnId = id.into();
        self.now += 1;
        self.relay.handle(id, msg, self.now, &mut self.store);
        // A turn that commits: what the relay holds in memory is written (tests of the
        // in-memory path call `handle` and `sync` themselves).
        self.relay.sync(self.now, &mut self.store, true);
        self.drain()
    }

    /// Connect and log in as `user` with `key`; returns what the relay answered.
    fn login(&mut self, id: impl Into<ConnId>, user: &str, key: usize) -> Vec<Out> {
        let id: ConnId = id.into();
        let nonce = self.connect(id);
        self.handle(id, signed_login(&nonce, user, key))
    }

    /// Connect and log in as `user` at `at` without the committing turn's sync that
    /// [`T::handle`] runs, which would write everything held; returns what the relay answered.
    fn login_holding(
        &mut self,
        id: impl Into<ConnId>,
        user: &str,
        key: usize,
        at: u64,
    ) -> Vec<Out> {
        let id: ConnId = id.into();
        let nonce = self.connect(id);
        self.relay
            .handle(id, signed_login(&nonce, user, key), at, &mut self.store);
        self.drain()
    }

    /// Log in and check it worked; the answers are dropped.
    fn logged_in(&mut self, id: impl Into<ConnId>, user: &str, key: usize) {
        let id: ConnId = id.into();
        let out = self.login(id, user, key);
        assert!(
            matches!(out.first(), Some(Out::Send(c, FromRelay::Welcome { .. })) if *c == id),
            "{user} not welcomed: {out:?}"
        );
    }

    fn send(&mut self, id: impl Into<ConnId>, item: Routed) -> Vec<Out> {
        let id: ConnId = id.into();
        self.handle(id, ToRelay::Send(item))
    }
}

/// A `Login` as `user` with `key`, signed over the challenge `nonce`.
fn signed_login(nonce: &[u8; 32], user: &str, key: usize) -> ToRelay {
    let me = identity(key);
    let signature = me
        .sign(&mut rand::thread_rng(), &login_transcript(nonce, user, &[]))
        .unwrap();
    ToRelay::Login {
        user: user.into(),
        key: me.public().der().to_vec(),
        signature,
    }
}

/// A delivery as the message it frames (the relay hands the daemon its bytes), so tests compare
/// messages.
fn norm(o: Out) -> Out {
    match o {
        Out::Deliver(c, bytes) => Out::Send(
            c,
            FromRelay::Deliver(crate::proto::from_payload(&bytes).expect("a delivery decodes")),
        ),
        other => other,
    }
}

/// The messages sent on one connection.
fn to(out: &[Out], id: impl Into<ConnId>) -> Vec<FromRelay> {
    let id: ConnId = id.into();
    out.iter()
        .filter_map(|o| match o {
            Out::Send(c, m) | Out::AfterCommit(c, m) if *c == id => Some(m.clone()),
            _ => None,
        })
        .collect()
}

fn closed(out: &[Out], id: impl Into<ConnId>) -> bool {
    let id: ConnId = id.into();
    out.contains(&Out::Close(id))
}

/// The error code sent on `id`, if any, and checks the connection is closed after it.
fn error_code(out: &[Out], id: impl Into<ConnId>) -> Option<String> {
    let id: ConnId = id.into();
    let code = to(out, id).into_iter().find_map(|m| match m {
        FromRelay::Error { code, .. } => Some(code),
        _ => None,
    })?;
    let err_at = out
        .iter()
        .position(|o| matches!(o, Out::Send(c, FromRelay::Error { .. }) if *c == id));
    let close_at = out.iter().position(|o| *o == Out::Close(id));
    assert!(
        close_at > err_at,
        "connection {id} must be closed after its error: {out:?}"
    );
    Some(code.to_string())
}

/// A dummy message item; the relay never looks inside.
fn message(from: &str, to: &str, n: u8) -> Routed {
    Routed::Message(Envelope {
        id: [n; 16],
        from: from.into(),
        to: to.into(),
        time_ms: 1,
        session: [0xee; 16],
        counter: n as u64,
        key_packet: None,
        ciphertext: vec![n; 20],
    })
}

fn receipt(from: &str, to: &str, n: u8) -> Routed {
    Routed::Receipt(Receipt {
        id: [n; 16],
        from: from.into(),
        to: to.into(),
        session: [0xee; 16],
        counter: n as u64,
        tag: [0; 16],
    })
}

fn msg_key(n: u8) -> ItemKey {
    ItemKey {
        kind: Kind::Message,
        id: [n; 16],
    }
}

fn ping_works(t: &mut T, id: impl Into<ConnId>) {
    let id: ConnId = id.into();
    let out = t.handle(id, ToRelay::Ping);
    assert_eq!(out, [Out::Send(id, FromRelay::Pong)], "connection {id}");
}

#[test]
fn challenge_then_login_then_welcome() {
    let mut t = T::new();
    let nonce = t.connect(1);
    let other = t.connect(2);
    assert_ne!(nonce, other, "every connection gets its own challenge");
    let me = identity(ALICE);
    let signature = me
        .sign(
            &mut rand::thread_rng(),
            &login_transcript(&nonce, "alice", &[]),
        )
        .unwrap();
    let out = t.handle(
        1,
        ToRelay::Login {
            user: "alice".into(),
            key: me.public().der().to_vec(),
            signature,
        },
    );
    assert_eq!(
        out,
        [Out::Send(
            ConnId(1),
            FromRelay::Welcome {
                user: "alice".into(),
                peers: vec![]
            }
        )]
    );
    assert_eq!(t.relay.online_count(), 1);
    // The binding is durable.
    assert_eq!(
        t.store.bindings().unwrap(),
        [("alice".to_string(), me.public().der().to_vec())]
    );
    let dir = t.relay.directory("", "", usize::MAX).0;
    assert_eq!(dir.len(), 1);
    assert_eq!(dir[0].user, "alice");
    assert!(dir[0].online);
    assert_eq!(dir[0].fingerprint, me.public().fingerprint().to_string());
}

#[test]
fn welcome_lists_directory_and_presence_is_broadcast() {
    let mut t = T::new();
    t.logged_in(1, "alice", ALICE);
    let out = t.login(2, "bob", BOB);
    let alice_key = identity(ALICE).public().der().to_vec();
    let bob_key = identity(BOB).public().der().to_vec();
    assert_eq!(
        to(&out, 2),
        [FromRelay::Welcome {
            user: "bob".into(),
            peers: vec![Peer {
                user: "alice".into(),
                key: alice_key.clone(),
                online: true
            }]
        }]
    );
    assert_eq!(
        to(&out, 1),
        [FromRelay::Presence(Peer {
            user: "bob".into(),
            key: bob_key.clone(),
            online: true
        })]
    );

    t.relay.disconnect(ConnId(2));
    let out = t.drain();
    assert_eq!(
        out,
        [Out::Send(
            ConnId(1),
            FromRelay::Presence(Peer {
                user: "bob".into(),
                key: bob_key,
                online: false
            })
        )]
    );
    assert_eq!(t.relay.online_count(), 1);

    // Alice leaves; bob, offline but bound, is in her next welcome as offline.
    t.relay.disconnect(ConnId(1));
    assert!(t.drain().is_empty(), "nobody online to tell");
    let out = t.login(3, "alice", ALICE);
    match &to(&out, 3)[..] {
        [FromRelay::Welcome { peers, .. }] => {
            assert_eq!(peers.len(), 1);
            assert_eq!(peers[0].user, "bob");
            assert!(!peers[0].online);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_login_signature_is_refused_and_binds_nothing() {
    let mut t = T::new();
    let nonce = t.connect(1);
    let me = identity(ALICE);
    // Signed over another challenge: a replayed login.
    let mut wrong = nonce;
    wrong[0] ^= 1;
    let signature = me
        .sign(
            &mut rand::thread_rng(),
            &login_transcript(&wrong, "alice", &[]),
        )
        .unwrap();
    let out = t.handle(
        1,
        ToRelay::Login {
            user: "alice".into(),
            key: me.public().der().to_vec(),
            signature,
        },
    );
    assert_eq!(error_code(&out, 1).as_deref(), Some("bad_login"));
    assert!(t.store.bindings().unwrap().is_empty());
    assert!(t.relay.directory("", "", usize::MAX).0.is_empty());
    assert_eq!(t.relay.online_count(), 0);
}

#[test]
fn login_signed_for_another_name_is_refused() {
    let mut t = T::new();
    let nonce = t.connect(1);
    let me = identity(ALICE);
    let signature = me
        .sign(
            &mut rand::thread_rng(),
            &login_transcript(&nonce, "bob", &[]),
        )
        .unwrap();
    let out = t.handle(
        1,
        ToRelay::Login {
            user: "alice".into(),
            key: me.public().der().to_vec(),
            signature,
        },
    );
    assert_eq!(error_code(&out, 1).as_deref(), Some("bad_login"));
    assert!(t.relay.directory("", "", usize::MAX).0.is_empty());
}

#[test]
fn invalid_name_and_garbage_key_are_refused() {
    let mut t = T::new();
    let out = t.login(1, "Alice", ALICE);
    assert_eq!(error_code(&out, 1).as_deref(), Some("bad_login"));
    t.connect(2);
    let out = t.handle(
        2,
        ToRelay::Login {
            user: "alice".into(),
            key: b"not a key".to_vec(),
            signature: vec![0; 256],
        },
    );
    assert_eq!(error_code(&out, 2).as_deref(), Some("bad_login"));
    assert!(t.relay.directory("", "", usize::MAX).0.is_empty());
}

#[test]
fn impersonation_gets_name_taken_and_the_owner_stays_online() {
    let mut t = T::new();
    t.logged_in(1, "alice", ALICE);
    t.logged_in(2, "bob", BOB);
    let out = t.login(3, "alice", MALLORY);
    assert_eq!(error_code(&out, 3).as_deref(), Some("name_taken"));
    assert!(!closed(&out, 1), "the real alice is not touched");
    assert!(to(&out, 1).is_empty());
    assert!(to(&out, 2).is_empty(), "no presence change is announced");
    assert_eq!(t.relay.online_count(), 2);
    let alice = t
        .relay
        .directory("", "", usize::MAX)
        .0
        .into_iter()
        .find(|p| p.user == "alice")
        .unwrap();
    assert!(alice.online);
    assert_eq!(
        alice.fingerprint,
        identity(ALICE).public().fingerprint().to_string()
    );
    // The Error names both fingerprints and the way out.
    let reason = to(&out, 3)
        .into_iter()
        .find_map(|m| match m {
            FromRelay::Error { reason, .. } => Some(reason),
            _ => None,
        })
        .unwrap();
    assert!(reason.contains(&identity(MALLORY).public().fingerprint().to_string()));
    assert!(reason.contains("forget"));
    // The impostor's connection ignores anything further; the closed-out daemon disconnects it.
    assert!(t.send(3, message("alice", "bob", 1)).is_empty());
    t.relay.disconnect(ConnId(3));
    assert!(
        t.drain().is_empty(),
        "the impostor's disconnect is not alice leaving"
    );
    ping_works(&mut t, 1);
    let out = t.send(1, message("alice", "bob", 2));
    assert_eq!(to(&out, 1), [FromRelay::Accepted(msg_key(2))]);
    assert_eq!(
        to(&out, 2),
        [FromRelay::Deliver(message("alice", "bob", 2))]
    );
}

#[test]
fn second_login_with_the_same_key_replaces_the_first_quietly() {
    let mut t = T::new();
    t.logged_in(1, "alice", ALICE);
    t.logged_in(2, "bob", BOB);
    let out = t.login(3, "alice", ALICE);
    assert_eq!(error_code(&out, 1).as_deref(), Some("replaced"));
    assert!(matches!(
        to(&out, 3).first(),
        Some(FromRelay::Welcome { .. })
    ));
    assert!(to(&out, 2).is_empty(), "alice never went offline: {out:?}");
    // The old connection's disconnect does not take alice offline either.
    t.relay.disconnect(ConnId(1));
    assert!(t.drain().is_empty());
    assert_eq!(t.relay.online_count(), 2);
    let out = t.send(2, message("bob", "alice", 1));
    assert_eq!(
        to(&out, 3),
        [FromRelay::Deliver(message("bob", "alice", 1))]
    );
    assert!(to(&out, 1).is_empty());
}

#[test]
fn send_before_login_is_a_protocol_error_and_others_are_unaffected() {
    let mut t = T::new();
    t.logged_in(1, "alice", ALICE);
    t.connect(2);
    let out = t.send(2, message("bob", "alice", 1));
    assert_eq!(error_code(&out, 2).as_deref(), Some("protocol"));
    assert!(to(&out, 1).is_empty());
    let reason = match &to(&out, 2)[0] {
        FromRelay::Error { reason, .. } => reason.clone(),
        other => panic!("{other:?}"),
    };
    assert!(
        reason.contains("Login") && reason.contains("Send"),
        "{reason}"
    );
    assert_eq!(t.relay.queued_count(), 0);
    // Closing: a login on the dead connection is ignored.
    assert!(t.login_on_closing(2).is_empty());
    ping_works(&mut t, 1);
    // Ack and Ping before login are protocol errors too.
    t.connect(3);
    let out = t.handle(3, ToRelay::Ping);
    assert_eq!(error_code(&out, 3).as_deref(), Some("protocol"));
}

impl T {
    /// Alice (connection 1) sends bob message `n` at `at` (monotonic ms).
    fn send_to_bob_at(&mut self, n: u8, at: u64) {
        self.relay.handle(
            ConnId(1),
            ToRelay::Send(message("alice", "bob", n)),
            at,
            &mut self.store,
        )
    }

    /// The first id byte of each item written to the relay's store, in the store's order.
    fn stored_ids(&self) -> Vec<u8> {
        let q = self.store.queued().unwrap();
        q.iter().map(|q| q.key.id[0]).collect()
    }

    fn login_on_closing(&mut self, id: impl Into<ConnId>) -> Vec<Out> {
        let id: ConnId = id.into();
        let me = identity(ALICE);
        self.handle(
            id,
            ToRelay::Login {
                user: "alice".into(),
                key: me.public().der().to_vec(),
                signature: vec![0; 256],
            },
        )
    }
}

#[test]
fn malformed_payload_closes_only_that_connection() {
    let mut t = T::new();
    t.logged_in(1, "alice", ALICE);
    t.logged_in(2, "bob", BOB);
    t.relay.receive(ConnId(2), b"garbage", t.now, &mut t.store);
    let out = t.drain();
    assert_eq!(error_code(&out, 2).as_deref(), Some("protocol"));
    // Bob's connection went offline with the error; alice hears he left.
    assert_eq!(to(&out, 1).len(), 1);
    assert!(matches!(&to(&out, 1)[0], FromRelay::Presence(p) if p.user == "bob" && !p.online));
    assert!(!closed(&out, 1));
    ping_works(&mut t, 1);
    // A valid frame through `receive` still works on the other connection.
    let payload = crate::proto::to_payload(&ToRelay::Ping).unwrap();
    t.relay.receive(ConnId(1), &payload, t.now, &mut t.store);
    assert_eq!(t.drain(), [Out::Send(ConnId(1), FromRelay::Pong)]);
    // And a malformed first frame on a fresh connection.
    t.connect(3);
    t.relay.receive(ConnId(3), &[0xc1], t.now, &mut t.store);
    let out = t.drain();
    assert_eq!(error_code(&out, 3).as_deref(), Some("protocol"));
}

#[test]
fn login_twice_is_a_protocol_error() {
    let mut t = T::new();
    t.logged_in(1, "alice", ALICE);
    let me = identity(ALICE);
    let out = t.handle(
        1,
        ToRelay::Login {
            user: "alice".into(),
            key: me.public().der().to_vec(),
            signature: vec![],
        },
    );
    assert_eq!(error_code(&out, 1).as_deref(), Some("protocol"));
    assert_eq!(t.relay.online_count(), 0);
}

#[test]
fn routed_to_online_user_then_acknowledged() {
    let mut t = T::new();
    t.logged_in(1, "alice", ALICE);
    t.logged_in(2, "bob", BOB);
    let item = message("alice", "bob", 7);
    let out = t.send(1, item.clone());
    // Delivered at once (before the commit); Accepted only after it is in the store.
    assert_eq!(
        out,
        [
            Out::Send(ConnId(2), FromRelay::Deliver(item.clone())),
            Out::AfterCommit(ConnId(1), FromRelay::Accepted(msg_key(7))),
        ]
    );
    assert_eq!(t.store.queued().unwrap().len(), 1);
    assert_eq!(t.relay.queued_count(), 1);
    // Until bob acks, the item stays queued.
    assert!(t.handle(2, ToRelay::Ack(msg_key(7))).is_empty());
    assert_eq!(t.relay.queued_count(), 0);
    assert!(t.store.queued().unwrap().is_empty());
    // An ack for something not queued (or a second ack) is harmless.
    assert!(t.handle(2, ToRelay::Ack(msg_key(7))).is_empty());
    assert!(t.handle(1, ToRelay::Ack(msg_key(99))).is_empty());
    // Receipts route the same way and are acked under their own kind.
    let r = receipt("bob", "alice", 7);
    let out = t.send(2, r.clone());
    let rkey = ItemKey {
        kind: Kind::Receipt,
        id: [7; 16],
    };
    assert_eq!(
        out,
        [
            Out::Send(ConnId(1), FromRelay::Deliver(r)),
            Out::AfterCommit(ConnId(2), FromRelay::Accepted(rkey)),
        ]
    );
    // A message ack does not drop the receipt with the same id.
    t.handle(1, ToRelay::Ack(msg_key(7)));
    assert_eq!(t.relay.queued_count(), 1);
    t.handle(1, ToRelay::Ack(rkey));
    assert_eq!(t.relay.queued_count(), 0);
}

#[test]
fn offline_recipient_queue_survives_restart_and_is_delivered_on_login_in_order() {
    let mut t = T::new();
    t.logged_in(1, "bob", BOB);
    t.relay.disconnect(ConnId(1));
    t.logged_in(2, "alice", ALICE);
    for n in 1..=3 {
        let out = t.send(2, message("alice", "bob", n));
        assert_eq!(
            out,
            [Out::AfterCommit(ConnId(2), FromRelay::Accepted(msg_key(n)))]
        );
    }
    assert_eq!(t.relay.queued_count(), 3);
    // The relay restarts: bindings and queues come back from the store.
    let mut t = T {
        relay: Relay::load(&t.store, Limits::default()).unwrap(),
        store: t.store,
        now: t.now,
    };
    assert_eq!(t.relay.queued_count(), 3);
    assert_eq!(t.relay.directory("", "", usize::MAX).0.len(), 2);
    let out = t.login(5, "bob", BOB);
    let got = to(&out, 5);
    assert!(matches!(got[0], FromRelay::Welcome { .. }));
    assert_eq!(
        got[1..],
        [
            FromRelay::Deliver(message("alice", "bob", 1)),
            FromRelay::Deliver(message("alice", "bob", 2)),
            FromRelay::Deliver(message("alice", "bob", 3)),
        ]
    );
    // Unacknowledged items are delivered again on the next login.
    t.handle(5, ToRelay::Ack(msg_key(2)));
    t.relay.disconnect(ConnId(5));
    let out = t.login(6, "bob", BOB);
    assert_eq!(
        to(&out, 6)[1..],
        [
            FromRelay::Deliver(message("alice", "bob", 1)),
            FromRelay::Deliver(message("alice", "bob", 3)),
        ]
    );
}

#[test]
fn retransmission_is_accepted_again_and_stored_once() {
    let mut t = T::new();
    t.logged_in(1, "alice", ALICE);
    t.logged_in(2, "bob", BOB);
    t.relay.disconnect(ConnId(2));
    t.drain();
    let out = t.send(1, message("alice", "bob", 1));
    assert_eq!(
        out,
        [Out::AfterCommit(ConnId(1), FromRelay::Accepted(msg_key(1)))]
    );
    let out = t.send(1, message("alice", "bob", 1));
    assert_eq!(out, [Out::Send(ConnId(1), FromRelay::Accepted(msg_key(1)))]);
    assert_eq!(t.relay.queued_count(), 1);
    assert_eq!(t.store.queued().unwrap().len(), 1);
}

#[test]
fn sender_must_be_the_logged_in_user() {
    let mut t = T::new();
    t.logged_in(1, "alice", ALICE);
    t.logged_in(2, "bob", BOB);
    let out = t.send(1, message("bob", "bob", 1));
    match &out[..] {
        [Out::Send(ConnId(1), FromRelay::Refused { key, code, .. })] => {
            assert_eq!(*key, msg_key(1));
            assert_eq!(code, "bad_sender");
        }
        other => panic!("{other:?}"),
    }
    let out = t.send(1, receipt("bob", "alice", 2));
    assert!(
        matches!(&out[..], [Out::Send(ConnId(1), FromRelay::Refused { code, .. })] if code == "bad_sender")
    );
    assert_eq!(t.relay.queued_count(), 0);
}

#[test]
fn unknown_recipient_is_refused() {
    let mut t = T::new();
    t.logged_in(1, "alice", ALICE);
    let out = t.send(1, message("alice", "nobody", 1));
    match &out[..] {
        [Out::Send(ConnId(1), FromRelay::Refused { key, code, reason })] => {
            assert_eq!(*key, msg_key(1));
            assert_eq!(code, "unknown_user");
            assert!(reason.contains("nobody"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(t.relay.queued_count(), 0);
    // The connection stays up.
    ping_works(&mut t, 1);
}

#[test]
fn per_user_queue_limit_refuses_the_fourth_item() {
    let mut t = T::with_limits(Limits {
        max_queue: 3,
        ..Limits::default()
    });
    t.logged_in(1, "bob", BOB);
    t.relay.disconnect(ConnId(1));
    t.logged_in(2, "alice", ALICE);
    for n in 1..=3 {
        let out = t.send(2, message("alice", "bob", n));
        assert_eq!(
            out,
            [Out::AfterCommit(ConnId(2), FromRelay::Accepted(msg_key(n)))]
        );
    }
    let out = t.send(2, message("alice", "bob", 4));
    match &out[..] {
        [Out::Send(ConnId(2), FromRelay::Refused { key, code, reason })] => {
            assert_eq!(*key, msg_key(4));
            assert_eq!(code, "queue_full");
            assert!(reason.contains("bob"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(t.relay.queued_count(), 3);
    // A retransmission of a queued item is still accepted when full.
    let out = t.send(2, message("alice", "bob", 2));
    assert_eq!(out, [Out::Send(ConnId(2), FromRelay::Accepted(msg_key(2)))]);
    // Alice's own queue is separate.
    let out = t.send(2, message("alice", "alice", 9));
    assert!(out.contains(&Out::AfterCommit(
        ConnId(2),
        FromRelay::Accepted(msg_key(9))
    )));
    // Once bob acks one, there is room again.
    let out = t.login(3, "bob", BOB);
    assert_eq!(to(&out, 3).len(), 4, "welcome + three deliveries");
    t.handle(3, ToRelay::Ack(msg_key(1)));
    let out = t.send(2, message("alice", "bob", 4));
    assert!(out.contains(&Out::AfterCommit(
        ConnId(2),
        FromRelay::Accepted(msg_key(4))
    )));
}

#[test]
fn handshake_timeout_closes_only_connections_that_did_not_log_in() {
    let mut t = T::new();
    t.now = 0;
    t.logged_in(1, "alice", ALICE);
    let start = t.now;
    t.connect(2);
    let limit = Limits::default().handshake_timeout_ms;
    t.relay.tick(start + limit);
    assert!(t.drain().is_empty(), "not late yet");
    t.relay.tick(start + limit + 1);
    let out = t.drain();
    assert_eq!(error_code(&out, 2).as_deref(), Some("timeout"));
    assert!(!closed(&out, 1));
    assert!(to(&out, 1).is_empty());
    // Already closing: no second error.
    t.relay.tick(start + limit + 2);
    assert!(t.drain().is_empty());
}

#[test]
fn idle_timeout_closes_a_silent_member_and_announces_it() {
    let mut t = T::new();
    t.now = 0;
    t.logged_in(1, "alice", ALICE);
    t.logged_in(2, "bob", BOB);
    let idle = Limits::default().idle_timeout_ms;
    // Alice pings at idle-1; bob stays silent.
    t.now = idle - 1;
    ping_works(&mut t, 1);
    t.relay.tick(idle + 10);
    let out = t.drain();
    assert_eq!(error_code(&out, 2).as_deref(), Some("timeout"));
    assert!(!closed(&out, 1));
    assert!(matches!(&to(&out, 1)[..], [FromRelay::Presence(p)] if p.user == "bob" && !p.online));
    assert_eq!(t.relay.online_count(), 1);
}

#[test]
fn forget_drops_binding_and_queue_and_lets_a_new_key_claim_the_name() {
    let mut t = T::new();
    t.logged_in(1, "alice", ALICE);
    t.logged_in(2, "bob", BOB);
    t.relay.disconnect(ConnId(2));
    t.drain();
    t.send(1, message("alice", "bob", 1));
    // bob is offline with a queued item; alice is online. Forget alice: she is cut off.
    assert!(t.relay.forget("alice", &mut t.store).unwrap());
    let out = t.drain();
    assert_eq!(error_code(&out, 1).as_deref(), Some("forgotten"));
    assert!(t.relay.forget("bob", &mut t.store).unwrap());
    assert!(!t.relay.forget("bob", &mut t.store).unwrap());
    assert_eq!(t.relay.queued_count(), 0);
    assert!(t.store.queued().unwrap().is_empty());
    assert!(t.store.bindings().unwrap().is_empty());
    // A new key may take the name.
    let out = t.login(3, "bob", MALLORY);
    assert!(matches!(
        to(&out, 3).first(),
        Some(FromRelay::Welcome { .. })
    ));
    assert_eq!(
        t.relay.directory("", "", usize::MAX).0[0].fingerprint,
        identity(MALLORY).public().fingerprint().to_string()
    );
}

/// Items held in memory only for a name that is forgotten leave with it: no wake-up is left
/// for them, nothing of them is written later, and the relay's count of what it holds in memory
/// (checked against its own bookkeeping in a debug build) starts again from the items after.
#[test]
fn forget_drops_the_items_held_in_memory_for_the_name() {
    let mut t = T::new();
    t.logged_in(1, "alice", ALICE);
    t.logged_in(2, "bob", BOB);
    t.logged_in(3, "carol", MALLORY);
    t.relay.disconnect(ConnId(3));
    t.drain();
    // bob is online and does not acknowledge: both items stay in memory, held for him.
    let at = t.now + 1;
    t.send_to_bob_at(1, at);
    t.send_to_bob_at(2, at);
    t.drain();
    assert_eq!((t.relay.unsynced, t.relay.live.len()), (2, 2));
    assert!(t.relay.forget("bob", &mut t.store).unwrap());
    t.drain();
    assert_eq!((t.relay.unsynced, t.relay.live.len()), (0, 0));
    assert!(
        t.relay.arrivals.is_empty() && t.relay.held.is_empty(),
        "a wake-up was left for a forgotten item"
    );
    t.relay.sync(at + 60_000, &mut t.store, true);
    assert!(t.store.queued().unwrap().is_empty());
    // What comes after is held and written as before.
    t.relay.handle(
        ConnId(1),
        ToRelay::Send(message("alice", "carol", 3)),
        at + 1,
        &mut t.store,
    );
    assert_eq!((t.relay.unsynced, t.relay.live.len()), (1, 1));
    t.relay.sync(at + 60_000, &mut t.store, false);
    assert_eq!(t.stored_ids(), [3]);
    assert_eq!((t.relay.unsynced, t.relay.live.len()), (0, 0));
    assert!(t.relay.arrivals.is_empty() && t.relay.held.is_empty());
}

#[test]
fn forget_of_an_online_user_tells_the_others() {
    let mut t = T::new();
    t.logged_in(1, "alice", ALICE);
    t.logged_in(2, "bob", BOB);
    assert!(t.relay.forget("bob", &mut t.store).unwrap());
    let out = t.drain();
    assert_eq!(error_code(&out, 2).as_deref(), Some("forgotten"));
    assert!(matches!(&to(&out, 1)[..], [FromRelay::Presence(p)] if p.user == "bob" && !p.online));
    // The daemon's later disconnect of the closed connection changes nothing.
    t.relay.disconnect(ConnId(2));
    assert!(t.drain().is_empty());
    assert_eq!(t.relay.online_count(), 1);
    // Items for the forgotten name are now refused.
    let out = t.send(1, message("alice", "bob", 1));
    assert!(
        matches!(&out[..], [Out::Send(ConnId(1), FromRelay::Refused { code, .. })] if code == "unknown_user")
    );
}

#[test]
fn storage_failure_refuses_instead_of_accepting() {
    let mut t = T::new();
    t.logged_in(1, "alice", ALICE);
    t.logged_in(2, "bob", BOB);
    t.store.fail_writes(true);
    let out = t.send(1, message("alice", "bob", 1));
    // Forwarded before the write (bob drops the copy alice sends again), never Accepted.
    assert!(
        matches!(&out[..], [Out::Send(ConnId(2), FromRelay::Deliver(_)), Out::Send(ConnId(1), FromRelay::Refused { code, .. })] if code == "storage"),
        "never Accepted: {out:?}"
    );
    assert_eq!(t.relay.queued_count(), 0);
    // A first login cannot be bound either.
    let out = t.login(3, "carol", MALLORY);
    assert_eq!(error_code(&out, 3).as_deref(), Some("storage"));
    t.store.fail_writes(false);
    let out = t.send(1, message("alice", "bob", 1));
    assert!(
        out.contains(&Out::AfterCommit(
            ConnId(1),
            FromRelay::Accepted(msg_key(1))
        )),
        "{out:?}"
    );
}

#[test]
fn unknown_connection_is_ignored() {
    let mut t = T::new();
    t.relay.handle(ConnId(42), ToRelay::Ping, 0, &mut t.store);
    t.relay.tick(1_000_000);
    t.relay.disconnect(ConnId(42));
    assert!(t.drain().is_empty());
}

#[test]
fn malformed_frame_on_a_closing_connection_is_ignored() {
    let mut t = T::new();
    t.connect(1);
    let out = t.handle(1, ToRelay::Ping);
    assert_eq!(error_code(&out, 1).as_deref(), Some("protocol"));
    t.relay.receive(ConnId(1), b"garbage", t.now, &mut t.store);
    assert_eq!(t.drain(), [], "one error per connection");
    t.relay.receive(ConnId(42), b"garbage", t.now, &mut t.store);
    assert_eq!(t.drain(), [], "no such connection");
}

#[test]
fn a_long_queue_is_delivered_through_a_window() {
    let mut t = T::new();
    t.logged_in(1, "bob", BOB);
    t.relay.disconnect(ConnId(1));
    t.logged_in(2, "alice", ALICE);
    let total = DELIVERY_WINDOW + 2;
    for n in 0..total {
        let item = message("alice", "bob", 0);
        let Routed::Message(mut e) = item else {
            unreachable!()
        };
        e.id = (n as u128).to_be_bytes();
        t.send(2, Routed::Message(e));
    }
    assert_eq!(t.relay.queued_count(), total);
    let id_of = |n: usize| (n as u128).to_be_bytes();
    let delivered = |msgs: &[FromRelay]| -> Vec<[u8; 16]> {
        msgs.iter()
            .filter_map(|m| match m {
                FromRelay::Deliver(Routed::Message(e)) => Some(e.id),
                _ => None,
            })
            .collect()
    };
    let out = t.login(3, "bob", BOB);
    let got = delivered(&to(&out, 3));
    assert_eq!(got, (0..DELIVERY_WINDOW).map(id_of).collect::<Vec<_>>());
    // A retransmission of a queued item is not delivered again.
    let mut again = message("alice", "bob", 0);
    if let Routed::Message(e) = &mut again {
        e.id = id_of(5);
    }
    assert!(delivered(&to(&t.send(2, again), 3)).is_empty());
    // Each ack lets one more through, in order.
    let out = t.handle(
        3,
        ToRelay::Ack(ItemKey {
            kind: Kind::Message,
            id: id_of(7),
        }),
    );
    assert_eq!(delivered(&to(&out, 3)), [id_of(DELIVERY_WINDOW)]);
    let out = t.handle(
        3,
        ToRelay::Ack(ItemKey {
            kind: Kind::Message,
            id: id_of(0),
        }),
    );
    assert_eq!(delivered(&to(&out, 3)), [id_of(DELIVERY_WINDOW + 1)]);
    // Nothing left to send: an ack frees room but delivers nothing.
    let out = t.handle(
        3,
        ToRelay::Ack(ItemKey {
            kind: Kind::Message,
            id: id_of(1),
        }),
    );
    assert!(out.is_empty());
    // A new item while there is room goes out at once.
    let mut new = message("alice", "bob", 0);
    if let Routed::Message(e) = &mut new {
        e.id = id_of(1000);
    }
    assert_eq!(delivered(&to(&t.send(2, new), 3)), [id_of(1000)]);
    // A new connection starts over from the oldest unacknowledged item.
    t.relay.disconnect(ConnId(3));
    t.drain();
    let out = t.login(4, "bob", BOB);
    let got = delivered(&to(&out, 4));
    assert_eq!(got.len(), DELIVERY_WINDOW);
    assert_eq!(got[0], id_of(2));
}

/// A store that forwards every call to SQLite but fails the calls a test picks: a fault in one
/// place instead of every write (what `Store::fail_writes` does).
struct FailOne {
    inner: Store,
    fail_dequeue: bool,
}

impl RelayStore for FailOne {
    fn bindings(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.bindings()
    }
    fn bind(&mut self, user: &str, key: &[u8]) -> Result<(), StoreError> {
        self.inner.bind(user, key)
    }
    fn unbind(&mut self, user: &str) -> Result<(), StoreError> {
        self.inner.unbind(user)
    }
    fn enqueue(&mut self, user: &str, key: ItemKey, item: &[u8]) -> Result<(), StoreError> {
        self.inner.enqueue(user, key, item)
    }
    fn dequeue(&mut self, user: &str, key: ItemKey) -> Result<(), StoreError> {
        if self.fail_dequeue {
            return Err(StoreError::Injected);
        }
        self.inner.dequeue(user, key)
    }
    fn queued_sizes(&self) -> Result<Vec<(String, ItemKey, usize)>, StoreError> {
        self.inner.queued_sizes()
    }
    fn queued_item(&self, user: &str, key: ItemKey) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.queued_item(user, key)
    }
    fn add_notice(&mut self, user: &str, key: ItemKey, reason: &str) -> Result<(), StoreError> {
        self.inner.add_notice(user, key, reason)
    }
    fn take_notices(&mut self, user: &str) -> Result<Vec<(ItemKey, String)>, StoreError> {
        self.inner.take_notices(user)
    }
}

/// An acknowledgement the store could not apply leaves the item queued, in memory and on disk,
/// so a restarted relay delivers it again (the member drops the duplicate by id).
#[test]
fn a_failed_dequeue_keeps_the_item_for_redelivery() {
    fn login(
        relay: &mut Relay,
        store: &mut FailOne,
        id: impl Into<ConnId>,
        user: &str,
        key: usize,
    ) {
        let id: ConnId = id.into();
        while relay.poll().is_some() {}
        relay.connect(id, 1);
        let nonce = match relay.poll() {
            Some(Out::Send(_, FromRelay::Challenge { nonce, .. })) => nonce,
            other => panic!("expected a challenge, got {other:?}"),
        };
        let me = identity(key);
        let signature = me
            .sign(
                &mut rand::thread_rng(),
                &login_transcript(&nonce, user, &[]),
            )
            .unwrap();
        let login = ToRelay::Login {
            user: user.into(),
            key: me.public().der().to_vec(),
            signature,
        };
        relay.handle(id, login, 2, store);
    }
    let mut store = FailOne {
        inner: Store::open_in_memory().unwrap(),
        fail_dequeue: true,
    };
    let mut relay = Relay::load(&store, Limits::default()).unwrap();
    login(&mut relay, &mut store, 1, "alice", ALICE);
    login(&mut relay, &mut store, 2, "bob", BOB);
    relay.handle(
        ConnId(1),
        ToRelay::Send(message("alice", "bob", 1)),
        3,
        &mut store,
    );
    // The turn commits: the item is written before bob's ack comes.
    relay.sync(3, &mut store, true);
    let out: Vec<Out> = std::iter::from_fn(|| relay.poll()).map(norm).collect();
    assert!(to(&out, 2).contains(&FromRelay::Deliver(message("alice", "bob", 1))));
    relay.handle(ConnId(2), ToRelay::Ack(msg_key(1)), 4, &mut store);
    assert_eq!(
        relay.queued_count(),
        1,
        "the failed dequeue must not drop the item"
    );

    // A relay restarted from the same store still holds it and delivers it to bob again.
    store.fail_dequeue = false;
    let mut relay = Relay::load(&store, Limits::default()).unwrap();
    assert_eq!(relay.queued_count(), 1);
    login(&mut relay, &mut store, 3, "bob", BOB);
    let out: Vec<Out> = std::iter::from_fn(|| relay.poll()).map(norm).collect();
    assert!(to(&out, 3).contains(&FromRelay::Deliver(message("alice", "bob", 1))));
    relay.handle(ConnId(3), ToRelay::Ack(msg_key(1)), 5, &mut store);
    assert_eq!(relay.queued_count(), 0);
}

/// `next_deadline` is never later than the first instant at which `tick` closes someone, and
/// exact after a tick (it is kept, not recomputed from every connection each turn): nothing
/// closes a millisecond before it, the late connection closes at it, and an established one
/// moves it to its idle timeout.
#[test]
fn next_deadline_is_when_tick_acts() {
    let mut t = T::new();
    assert_eq!(t.relay.next_deadline(), None);
    t.logged_in(1, "alice", ALICE);
    let idle = t.now + Limits::default().idle_timeout_ms + 1;
    // Before a tick, a lower bound: here the handshake deadline of the login just made.
    assert!(t.relay.next_deadline().unwrap() <= idle);
    t.relay.tick(t.now);
    assert!(t.drain().is_empty());
    assert_eq!(t.relay.next_deadline(), Some(idle));
    t.now += 10;
    t.connect(2);
    let handshake = t.now + Limits::default().handshake_timeout_ms + 1;
    assert_eq!(t.relay.next_deadline(), Some(handshake.min(idle)));
    t.relay.tick(handshake - 1);
    assert!(t.drain().is_empty());
    t.relay.tick(handshake);
    let out = t.drain();
    assert_eq!(error_code(&out, 2).as_deref(), Some("timeout"));
    assert!(!closed(&out, 1));
}

/// The same seed gives the same challenge nonces.
#[test]
fn seeded_relays_repeat_their_challenges() {
    let nonces = || {
        let mut t = T::new();
        t.relay.seed_rng(7);
        [t.connect(1), t.connect(2)]
    };
    let first = nonces();
    assert_eq!(first, nonces());
    assert_ne!(first[0], first[1]);
}

/// One key may hold `max_names_per_key` names; the next new name is refused with
/// `too_many_names` and binds nothing, a name it already holds still logs in, and a forgotten
/// name frees its place.
#[test]
fn a_key_holds_at_most_max_names_per_key() {
    let mut t = T::with_limits(Limits {
        max_names_per_key: 2,
        ..Limits::default()
    });
    t.logged_in(1, "m1", MALLORY);
    t.logged_in(2, "m2", MALLORY);
    let out = t.login(3, "m3", MALLORY);
    assert_eq!(error_code(&out, 3).as_deref(), Some("too_many_names"));
    assert!(
        !t.relay
            .directory("", "", usize::MAX)
            .0
            .iter()
            .any(|p| p.user == "m3"),
        "m3 was not bound"
    );
    assert!(t.store.bindings().unwrap().iter().all(|(u, _)| u != "m3"));
    // Another key is not affected, nor is a name the key already holds.
    t.logged_in(4, "alice", ALICE);
    t.relay.disconnect(ConnId(1));
    t.drain();
    t.logged_in(5, "m1", MALLORY);
    // Forgetting one of its names lets the key register another.
    assert!(t.relay.forget("m2", &mut t.store).unwrap());
    t.drain();
    t.logged_in(6, "m3", MALLORY);
    // The count survives a restart (it is rebuilt from the stored bindings).
    let mut again = Relay::load(&t.store, t.relay.limits.clone()).unwrap();
    std::mem::swap(&mut t.relay, &mut again);
    let out = t.login(7, "m4", MALLORY);
    assert_eq!(error_code(&out, 7).as_deref(), Some("too_many_names"));
}

/// At most `new_names_per_minute` new names are bound in any 60 s; the next is refused with
/// `registration_rate`, logins of bound names are not counted, and a minute later it works.
#[test]
fn new_names_are_rate_limited_per_minute() {
    let mut t = T::with_limits(Limits {
        new_names_per_minute: 2,
        ..Limits::default()
    });
    t.logged_in(1, "alice", ALICE);
    t.logged_in(2, "bob", BOB);
    let out = t.login(3, "carol", MALLORY);
    assert_eq!(error_code(&out, 3).as_deref(), Some("registration_rate"));
    // Bound names log in whatever the rate.
    t.relay.disconnect(ConnId(1));
    t.drain();
    t.logged_in(4, "alice", ALICE);
    t.now += 60_000;
    t.logged_in(5, "carol", MALLORY);
}

/// Timeouts of "forever" give deadlines that never come: no overflow (a panic in debug builds)
/// and no deadline in the past (a busy loop in release builds).
#[test]
fn a_timeout_of_forever_never_falls_due() {
    let mut t = T::with_limits(Limits {
        handshake_timeout_ms: u64::MAX,
        idle_timeout_ms: u64::MAX,
        ..Limits::default()
    });
    t.connect(1);
    t.logged_in(2, "alice", ALICE);
    assert_eq!(t.relay.next_deadline(), Some(u64::MAX));
    t.relay.tick(u64::MAX - 1);
    assert!(t.drain().is_empty(), "nobody is timed out");
}

/// A relay above `directory_push_max` names: `directory_push_max` 2, and `extra` names bound
/// directly in the store before it loads (so logins cost no registrations).
fn large(extra: usize) -> T {
    let mut t = T::new();
    let key = identity(MALLORY).public().der().to_vec();
    t.store.begin().unwrap();
    for i in 0..extra {
        t.store.bind(&format!("z{i:05}"), &key).unwrap();
    }
    t.store.commit().unwrap();
    t.relay = Relay::load(
        &t.store,
        Limits {
            directory_push_max: 2,
            max_subscriptions: 3,
            max_names_per_key: 1000,
            ..Limits::default()
        },
    )
    .unwrap();
    t
}

#[test]
fn a_large_relay_sends_no_directory_at_login_and_presence_only_to_followers() {
    let mut t = large(10);
    t.logged_in(1, "alice", ALICE);
    let out = t.login(2, "bob", BOB);
    assert!(
        matches!(&to(&out, 2)[..], [FromRelay::Welcome { peers, .. }] if peers.is_empty()),
        "no directory at login on a large relay: {out:?}"
    );
    assert!(to(&out, 1).is_empty(), "alice does not follow bob: {out:?}");
    // Alice looks bob up: his key, online, and from now on his joins and leaves.
    let out = t.handle(1, ToRelay::Lookup(vec!["bob".into(), "nobody".into()]));
    match &to(&out, 1)[..] {
        [FromRelay::Keys { peers, unknown }] => {
            assert_eq!(peers.len(), 1);
            assert_eq!(peers[0].user, "bob");
            assert!(peers[0].online);
            assert_eq!(peers[0].key, identity(BOB).public().der().to_vec());
            assert_eq!(unknown, &["nobody".to_string()]);
        }
        other => panic!("expected Keys, got {other:?}"),
    }
    t.relay.disconnect(ConnId(2));
    let out = t.drain();
    assert!(
        matches!(&to(&out, 1)[..], [FromRelay::Presence(p)] if p.user == "bob" && !p.online),
        "{out:?}"
    );
    // Carol joins: nobody follows her, so nobody hears of it.
    let out = t.login(3, "carol", MALLORY);
    assert!(to(&out, 1).is_empty(), "{out:?}");
}

#[test]
fn a_room_sized_relay_tells_everyone_everything() {
    let mut t = T::new();
    t.logged_in(1, "alice", ALICE);
    let out = t.login(2, "bob", BOB);
    assert!(matches!(
        &to(&out, 2)[..],
        [FromRelay::Welcome { peers, .. }] if peers.len() == 1 && peers[0].user == "alice"
    ));
    assert!(matches!(&to(&out, 1)[..], [FromRelay::Presence(p)] if p.user == "bob" && p.online));
}

#[test]
fn subscriptions_stop_at_max_subscriptions() {
    let mut t = large(10);
    t.logged_in(1, "alice", ALICE);
    let names: Vec<String> = (0..5).map(|i| format!("z{i:05}")).collect();
    let out = t.handle(1, ToRelay::Lookup(names));
    // Every key is answered, whatever the bound.
    assert!(matches!(&to(&out, 1)[..], [FromRelay::Keys { peers, .. }] if peers.len() == 5));
    // Only the first three (max_subscriptions) are followed: log in as each of the five.
    let mut heard = Vec::new();
    for i in 0..5u64 {
        let out = t.login(10 + i, &format!("z{i:05}"), MALLORY);
        for m in to(&out, 1) {
            if let FromRelay::Presence(p) = m {
                heard.push(p.user);
            }
        }
    }
    assert_eq!(heard, ["z00000", "z00001", "z00002"]);
}

#[test]
fn presence_is_coalesced_per_turn_and_a_sender_is_announced_before_its_message() {
    let mut t = large(10);
    t.logged_in(1, "alice", ALICE);
    t.logged_in(2, "bob", BOB);
    t.handle(1, ToRelay::Lookup(vec!["bob".into()]));
    // Bob leaves and comes back in one turn (nothing is drained between): one frame.
    t.relay.disconnect(ConnId(2));
    let nonce = {
        t.relay.connect(ConnId(3), t.now);
        match t.relay.poll() {
            Some(Out::Send(_, FromRelay::Challenge { nonce, .. })) => nonce,
            other => panic!("{other:?}"),
        }
    };
    let me = identity(BOB);
    let signature = me
        .sign(
            &mut rand::thread_rng(),
            &login_transcript(&nonce, "bob", &[]),
        )
        .unwrap();
    t.relay.handle(
        ConnId(3),
        ToRelay::Login {
            user: "bob".into(),
            key: me.public().der().to_vec(),
            signature,
        },
        t.now,
        &mut t.store,
    );
    // Before the turn ends bob sends alice a message: his join must reach her first.
    let env = Routed::Message(Envelope {
        id: [7; 16],
        from: "bob".into(),
        to: "alice".into(),
        time_ms: 1,
        session: [1; 16],
        counter: 0,
        key_packet: None,
        ciphertext: vec![0; 17],
    });
    t.relay
        .handle(ConnId(3), ToRelay::Send(env), t.now, &mut t.store);
    let out = t.drain();
    let alice = to(&out, 1);
    assert!(
        matches!(&alice[..], [FromRelay::Presence(p), FromRelay::Deliver(_)] if p.user == "bob" && p.online),
        "one presence, then the message: {alice:?}"
    );
}

#[test]
fn a_mass_disconnect_sends_nothing_to_nobody_on_a_large_relay() {
    let mut t = large(0);
    for i in 0..50u64 {
        t.logged_in(100 + i, &format!("m{i:03}"), ALICE);
    }
    t.logged_in(1, "alice", BOB);
    t.handle(1, ToRelay::Lookup(vec!["m000".into()]));
    for i in 0..50u64 {
        t.relay.disconnect(ConnId(100 + i));
    }
    let out = t.drain();
    // Only alice's one follow is told, once.
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(matches!(&to(&out, 1)[..], [FromRelay::Presence(p)] if p.user == "m000"));
}

#[test]
fn list_pages_the_directory_in_name_order_with_a_prefix() {
    let mut t = large(600);
    t.logged_in(1, "alice", ALICE);
    let mut names = Vec::new();
    let mut after = String::new();
    loop {
        let out = t.handle(
            1,
            ToRelay::List {
                after: after.clone(),
                prefix: "z".into(),
            },
        );
        let [FromRelay::Listing { peers, more }] = &to(&out, 1)[..] else {
            panic!("expected a Listing: {out:?}");
        };
        assert!(peers.len() <= LIST_PAGE);
        names.extend(peers.iter().map(|p| p.user.clone()));
        if !more {
            break;
        }
        after = peers.last().unwrap().user.clone();
    }
    assert_eq!(names.len(), 600, "every z name once, and not alice");
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    let out = t.handle(
        1,
        ToRelay::List {
            after: String::new(),
            prefix: "z0059".into(),
        },
    );
    assert!(matches!(
        &to(&out, 1)[..],
        [FromRelay::Listing { peers, more: false }] if peers.len() == 10
    ));
}

/// Issue 9: forward first, write only what is not acknowledged in time.
#[test]
fn an_item_acknowledged_before_it_is_written_never_reaches_the_store() {
    let mut t = T::new();
    t.logged_in(1, "alice", ALICE);
    t.logged_in(2, "bob", BOB);
    let item = message("alice", "bob", 5);
    t.relay
        .handle(ConnId(1), ToRelay::Send(item.clone()), t.now, &mut t.store);
    let out = t.drain();
    assert_eq!(
        out,
        [Out::Send(ConnId(2), FromRelay::Deliver(item))],
        "forwarded at once, not Accepted yet"
    );
    assert!(t.store.queued().unwrap().is_empty(), "not written");
    assert_eq!(
        t.relay.next_deadline(),
        Some(t.now + SYNC_DELAY_MS),
        "the loop wakes to write it if no ack comes"
    );
    // Bob's ack: durable at bob, so alice hears Accepted now, and nothing is ever written.
    t.relay
        .handle(ConnId(2), ToRelay::Ack(msg_key(5)), t.now + 1, &mut t.store);
    t.relay.sync(t.now + 1_000, &mut t.store, false);
    let out = t.drain();
    assert_eq!(out, [Out::Send(ConnId(1), FromRelay::Accepted(msg_key(5)))]);
    assert!(t.store.queued().unwrap().is_empty());
    assert_eq!(t.relay.queued_count(), 0);
}

#[test]
fn an_item_not_acknowledged_in_time_is_written_then_accepted_after_the_commit() {
    let mut t = T::new();
    t.logged_in(1, "alice", ALICE);
    t.logged_in(2, "bob", BOB);
    t.relay.disconnect(ConnId(2));
    t.drain();
    let at = t.now;
    t.relay.handle(
        ConnId(1),
        ToRelay::Send(message("alice", "bob", 6)),
        at,
        &mut t.store,
    );
    // A retransmission while it is in memory only: no Accepted for it either, yet.
    t.relay.handle(
        ConnId(1),
        ToRelay::Send(message("alice", "bob", 6)),
        at,
        &mut t.store,
    );
    assert!(t.drain().is_empty());
    t.relay.sync(at + SYNC_DELAY_MS - 1, &mut t.store, false);
    assert!(t.drain().is_empty(), "not due yet");
    assert!(t.store.queued().unwrap().is_empty());
    t.relay.sync(at + SYNC_DELAY_MS, &mut t.store, false);
    assert_eq!(
        t.drain(),
        [Out::AfterCommit(ConnId(1), FromRelay::Accepted(msg_key(6)))],
        "once, and only after the commit"
    );
    assert_eq!(t.store.queued().unwrap().len(), 1);
    // Bob comes back: delivered from the store, and his ack drops it there.
    let out = t.login(3, "bob", BOB);
    assert!(to(&out, 3).contains(&FromRelay::Deliver(message("alice", "bob", 6))));
    t.handle(3, ToRelay::Ack(msg_key(6)));
    assert!(t.store.queued().unwrap().is_empty());
}

/// The arrival queue behind `sync` and `next_deadline`: an item is written when its own delay
/// is up, not an earlier or later one's; an acknowledged item is never written, even when the
/// same key is sent again while its old arrival still waits in the queue (a new arrival); an
/// ack in order drops its arrival at once, one out of order when it reaches the front; and
/// none of this is a timer of `tick`, which walks every connection.
#[test]
fn each_unacknowledged_item_is_written_when_its_own_delay_is_up() {
    let mut t = T::new();
    t.logged_in(1, "alice", ALICE);
    t.logged_in(2, "bob", BOB);
    let t0 = t.now;
    let ack = |t: &mut T, n: u8, at: u64| {
        t.relay
            .handle(ConnId(2), ToRelay::Ack(msg_key(n)), at, &mut t.store)
    };
    let timers = t.relay.tick_deadline();
    t.send_to_bob_at(8, t0);
    assert_eq!(t.relay.next_deadline(), Some(t0 + SYNC_DELAY_MS));
    assert_eq!(
        t.relay.tick_deadline(),
        timers,
        "a write is no timer of tick"
    );
    ack(&mut t, 8, t0);
    assert_eq!(
        t.relay.next_deadline(),
        timers,
        "acked in order: nothing to wake for"
    );
    // 9 waits unacknowledged; 1 is acknowledged out of order (its arrival stays behind 9's)
    // and sent again (a retransmission after the ack: a new arrival of the same key); then 2
    // and 3, and bob acks 2 only.
    t.send_to_bob_at(9, t0);
    t.send_to_bob_at(1, t0);
    ack(&mut t, 1, t0 + 1);
    t.send_to_bob_at(1, t0 + 2);
    t.send_to_bob_at(2, t0 + 5);
    t.send_to_bob_at(3, t0 + 6);
    ack(&mut t, 2, t0 + 7);
    // Bob leaves: what he did not acknowledge is written at its own SYNC_DELAY_MS (an online
    // recipient's items are held longer: the next test).
    t.relay.disconnect(ConnId(2));
    t.drain();
    assert_eq!(t.relay.next_deadline(), Some(t0 + SYNC_DELAY_MS));
    t.relay.sync(t0 + SYNC_DELAY_MS, &mut t.store, false);
    assert_eq!(
        t.stored_ids(),
        [9],
        "1's first arrival does not write the second 1"
    );
    assert_eq!(t.relay.next_deadline(), Some(t0 + 2 + SYNC_DELAY_MS));
    t.relay
        .sync(t0 + 2 + SYNC_DELAY_MS - 1, &mut t.store, false);
    assert_eq!(t.stored_ids(), [9], "not due yet");
    t.relay.sync(t0 + 2 + SYNC_DELAY_MS, &mut t.store, false);
    assert_eq!(t.stored_ids(), [9, 1], "the second 1, at its own time");
    // 2 was acknowledged out of order: its arrival wakes the loop once, and is dropped.
    assert_eq!(t.relay.next_deadline(), Some(t0 + 5 + SYNC_DELAY_MS));
    t.relay.sync(t0 + 5 + SYNC_DELAY_MS, &mut t.store, false);
    assert_eq!(t.stored_ids(), [9, 1]);
    assert_eq!(t.relay.next_deadline(), Some(t0 + 6 + SYNC_DELAY_MS));
    t.relay.sync(t0 + 6 + SYNC_DELAY_MS, &mut t.store, false);
    assert_eq!(t.stored_ids(), [9, 1, 3]);
    assert_eq!(t.relay.unsynced_count(), 0);
    assert_eq!(
        t.relay.next_deadline(),
        timers,
        "nothing held, nothing to write"
    );
}

#[test]
fn items_of_one_turn_are_written_in_the_order_they_came() {
    let mut t = T::new();
    t.logged_in(1, "alice", ALICE);
    t.logged_in(2, "bob", BOB);
    t.relay.disconnect(ConnId(2));
    t.drain();
    for n in 1..=40u8 {
        t.relay.handle(
            ConnId(1),
            ToRelay::Send(message("alice", "bob", n)),
            t.now,
            &mut t.store,
        );
    }
    t.relay.sync(t.now, &mut t.store, true);
    let stored: Vec<u8> = t
        .store
        .queued()
        .unwrap()
        .iter()
        .map(|q| q.key.id[0])
        .collect();
    assert_eq!(stored, (1..=40).collect::<Vec<u8>>());
}

/// Issue 9: the relay forwards the bytes it received (no decode and encode again on the way
/// out, no read of the store), and so refuses a frame with anything after the message.
#[test]
fn a_routed_item_is_forwarded_as_it_came_and_nothing_may_trail_it() {
    let mut t = T::new();
    t.logged_in(1, "alice", ALICE);
    t.logged_in(2, "bob", BOB);
    let payload = to_payload(&ToRelay::Send(message("alice", "bob", 3))).unwrap();
    assert!(payload.starts_with(crate::proto::SEND_PREFIX));
    t.relay.receive(ConnId(1), &payload, t.now, &mut t.store);
    let out: Vec<Out> = std::iter::from_fn(|| t.relay.poll()).collect();
    assert_eq!(
        out,
        [Out::Deliver(
            ConnId(2),
            payload[crate::proto::SEND_PREFIX.len()..].into()
        )]
    );
    let mut trailing = to_payload(&ToRelay::Send(message("alice", "bob", 4))).unwrap();
    trailing.push(0xc0);
    t.relay.receive(ConnId(1), &trailing, t.now, &mut t.store);
    let out = t.drain();
    assert_eq!(error_code(&out, 1).as_deref(), Some("protocol"));
    // Bob hears alice leave, and nothing else: no delivery of the bad frame's item.
    assert!(
        !out.iter().any(|o| matches!(
            o,
            Out::Send(ConnId(2), FromRelay::Deliver(_)) | Out::Deliver(..)
        )),
        "{out:?}"
    );
}

/// Issue 9, under a burst: an item whose recipient is online at its SYNC_DELAY_MS is held in
/// memory until HOLD_ONLINE_MS after it came, so an ack that comes late (the item queued behind
/// the delivery window) still keeps it off the disk, and the sender's `Accepted` comes from the
/// ack. One never acknowledged is written at HOLD_ONLINE_MS, in arrival order, and `Accepted`
/// waits for that commit; a shutdown (`all`) writes what is held at once.
#[test]
fn an_online_recipients_items_are_held_until_acknowledged_or_hold_online_ms() {
    let mut t = T::new();
    t.logged_in(1, "alice", ALICE);
    t.logged_in(2, "bob", BOB);
    let t0 = t.now;
    for n in [1, 2, 3] {
        t.send_to_bob_at(n, t0 + u64::from(n));
    }
    t.drain();
    assert_eq!(t.relay.next_deadline(), Some(t0 + 1 + SYNC_DELAY_MS));
    t.relay.sync(t0 + 3 + SYNC_DELAY_MS, &mut t.store, false);
    assert!(
        t.drain().is_empty(),
        "bob is online: nothing written, nothing accepted"
    );
    assert!(t.store.queued().unwrap().is_empty());
    assert_eq!(t.relay.unsynced_count(), 3);
    assert_eq!(t.relay.next_deadline(), Some(t0 + 1 + HOLD_ONLINE_MS));
    // Bob acknowledges 2 late: durable at bob, Accepted now, never written.
    t.relay
        .handle(ConnId(2), ToRelay::Ack(msg_key(2)), t0 + 500, &mut t.store);
    assert_eq!(
        t.drain(),
        [Out::Send(ConnId(1), FromRelay::Accepted(msg_key(2)))]
    );
    t.relay
        .sync(t0 + 1 + HOLD_ONLINE_MS - 1, &mut t.store, false);
    assert!(t.store.queued().unwrap().is_empty(), "not due yet");
    t.relay.sync(t0 + 1 + HOLD_ONLINE_MS, &mut t.store, false);
    assert_eq!(t.stored_ids(), [1], "1 waited its HOLD_ONLINE_MS");
    assert_eq!(
        t.drain(),
        [Out::AfterCommit(ConnId(1), FromRelay::Accepted(msg_key(1)))],
        "after the commit only"
    );
    // 2 was acknowledged out of order: its held arrival is dropped once it is at the front,
    // so the loop wakes for 3, not for it.
    assert_eq!(t.relay.next_deadline(), Some(t0 + 3 + HOLD_ONLINE_MS));
    // A shutdown writes what is still held, whatever its age.
    t.relay.sync(t0 + 2 + HOLD_ONLINE_MS, &mut t.store, true);
    assert_eq!(t.stored_ids(), [1, 3]);
    assert_eq!(t.relay.unsynced_count(), 0);
    assert_eq!(
        t.drain(),
        [Out::AfterCommit(ConnId(1), FromRelay::Accepted(msg_key(3)))]
    );
}

/// A recipient who leaves while items of theirs are held can no longer acknowledge them (an
/// `Ack` they wrote before their connection reset is lost with it): the next sync writes them,
/// in the order they came, and their senders hear `Accepted` after that commit, not at
/// HOLD_ONLINE_MS (issue 9: a 50->50 bench run whose receivers closed with Acks in flight
/// stalled for a second on it). A later item is written at SYNC_DELAY_MS, as any offline
/// recipient's, and after them (the store's order is the queue's after a restart).
#[test]
fn a_recipient_who_leaves_has_their_held_items_written_at_the_next_sync() {
    let mut t = T::new();
    t.logged_in(1, "alice", ALICE);
    t.logged_in(2, "bob", BOB);
    let t0 = t.now;
    // Eight, so that an order taken from the queue's hash map rather than the arrivals shows.
    for n in 1..=8 {
        t.send_to_bob_at(n, t0 + u64::from(n) - 1);
    }
    t.relay.sync(t0 + 7 + SYNC_DELAY_MS, &mut t.store, false);
    assert!(t.stored_ids().is_empty(), "held: bob is online");
    t.drain();
    t.relay.disconnect(ConnId(2));
    t.relay.sync(t0 + 20, &mut t.store, false);
    assert_eq!(
        t.stored_ids(),
        [1, 2, 3, 4, 5, 6, 7, 8],
        "written at once, in the order they came"
    );
    let accepted: Vec<Out> = t
        .drain()
        .into_iter()
        .filter(|o| {
            matches!(
                o,
                Out::AfterCommit(..) | Out::Send(_, FromRelay::Accepted(_))
            )
        })
        .collect();
    let want: Vec<Out> = (1..=8)
        .map(|n| Out::AfterCommit(ConnId(1), FromRelay::Accepted(msg_key(n))))
        .collect();
    assert_eq!(accepted, want, "Accepted after the commit only");
    assert_eq!(t.relay.unsynced_count(), 0);
    let t1 = t0 + 30;
    t.send_to_bob_at(9, t1);
    t.relay.sync(t1 + SYNC_DELAY_MS - 1, &mut t.store, false);
    assert_eq!(
        t.stored_ids(),
        [1, 2, 3, 4, 5, 6, 7, 8],
        "an arrival waits its SYNC_DELAY_MS"
    );
    t.relay.sync(t1 + SYNC_DELAY_MS, &mut t.store, false);
    assert_eq!(
        t.stored_ids(),
        [1, 2, 3, 4, 5, 6, 7, 8, 9],
        "offline, nothing held: at SYNC_DELAY_MS"
    );
}

/// At a leave, the held items are written at the next sync, and an item still within its first
/// `SYNC_DELAY_MS` at its own, after them: the store keeps the order they came in.
#[test]
fn a_leavers_young_item_is_written_at_its_own_delay_after_the_held_ones() {
    let mut t = T::new();
    t.logged_in(1, "alice", ALICE);
    t.logged_in(2, "bob", BOB);
    let t0 = t.now;
    t.send_to_bob_at(1, t0);
    t.relay.sync(t0 + SYNC_DELAY_MS, &mut t.store, false);
    t.send_to_bob_at(2, t0 + 15);
    t.relay.disconnect(ConnId(2));
    t.relay.sync(t0 + 16, &mut t.store, false);
    assert_eq!(
        t.stored_ids(),
        [1],
        "the held item at once, the young one not yet"
    );
    t.relay
        .sync(t0 + 15 + SYNC_DELAY_MS - 1, &mut t.store, false);
    assert_eq!(t.stored_ids(), [1]);
    t.relay.sync(t0 + 15 + SYNC_DELAY_MS, &mut t.store, false);
    assert_eq!(
        t.stored_ids(),
        [1, 2],
        "then at its own SYNC_DELAY_MS, after it"
    );
    assert_eq!(t.relay.unsynced_count(), 0);
}

/// A recipient who acknowledged everything and then left holds nothing back: their queue's hold
/// (which only orders a later item behind a held one) ends with the leave, and a new item for
/// them is written at its `SYNC_DELAY_MS`, not at the old hold's end.
#[test]
fn a_recipient_who_acknowledged_everything_then_left_holds_no_later_item_back() {
    let mut t = T::new();
    t.logged_in(1, "alice", ALICE);
    t.logged_in(2, "bob", BOB);
    let t0 = t.now;
    t.send_to_bob_at(1, t0);
    t.relay.sync(t0 + SYNC_DELAY_MS, &mut t.store, false);
    t.relay
        .handle(ConnId(2), ToRelay::Ack(msg_key(1)), t0 + 11, &mut t.store);
    t.relay.disconnect(ConnId(2));
    t.relay.sync(t0 + 12, &mut t.store, false);
    t.drain();
    assert!(t.stored_ids().is_empty(), "acknowledged: never written");
    let t1 = t0 + 30;
    t.send_to_bob_at(2, t1);
    t.relay.sync(t1 + SYNC_DELAY_MS, &mut t.store, false);
    assert_eq!(
        t.stored_ids(),
        [2],
        "offline, nothing held: at SYNC_DELAY_MS"
    );
}

/// A sync that writes everything (a batch commit, or memory past its bound) right after a
/// recipient left ends their hold too: a later item is written at its `SYNC_DELAY_MS`.
#[test]
fn a_full_sync_after_a_leave_holds_no_later_item_back() {
    let mut t = T::new();
    t.logged_in(1, "alice", ALICE);
    t.logged_in(2, "bob", BOB);
    let t0 = t.now;
    t.send_to_bob_at(1, t0);
    t.relay.sync(t0 + SYNC_DELAY_MS, &mut t.store, false);
    t.relay.disconnect(ConnId(2));
    t.relay.sync(t0 + 12, &mut t.store, true);
    t.drain();
    assert_eq!(t.stored_ids(), [1], "written by the full sync");
    let t1 = t0 + 30;
    t.send_to_bob_at(2, t1);
    t.relay.sync(t1 + SYNC_DELAY_MS, &mut t.store, false);
    assert_eq!(
        t.stored_ids(),
        [1, 2],
        "offline, nothing held: at SYNC_DELAY_MS"
    );
}

/// A connection replaced by a newer login of the same user does not count as a leave: what
/// is held stays held for the new connection, which can still acknowledge it.
#[test]
fn a_connection_replaced_by_a_newer_login_keeps_the_hold() {
    let mut t = T::new();
    t.logged_in(1, "alice", ALICE);
    t.logged_in(2, "bob", BOB);
    let t0 = t.now;
    t.send_to_bob_at(1, t0);
    t.relay.sync(t0 + SYNC_DELAY_MS, &mut t.store, false);
    t.drain();
    t.login_holding(3, "bob", BOB, t0 + 11);
    t.relay.disconnect(ConnId(2));
    t.relay.sync(t0 + 12, &mut t.store, false);
    t.drain();
    assert!(t.stored_ids().is_empty(), "bob is still online: held");
    t.relay
        .handle(ConnId(3), ToRelay::Ack(msg_key(1)), t0 + 13, &mut t.store);
    assert!(
        t.drain()
            .contains(&Out::Send(ConnId(1), FromRelay::Accepted(msg_key(1)))),
        "the new connection's Ack is the sender's Accepted"
    );
    t.relay.sync(t0 + HOLD_ONLINE_MS, &mut t.store, false);
    assert!(t.stored_ids().is_empty(), "acknowledged: never written");
}

/// A recipient who leaves and is back before the turn's sync can still acknowledge what is
/// held for them: nothing is written, and their `Ack` gives the sender `Accepted`.
#[test]
fn a_recipient_back_before_the_sync_keeps_their_held_items_off_the_disk() {
    let mut t = T::new();
    t.logged_in(1, "alice", ALICE);
    t.logged_in(2, "bob", BOB);
    let t0 = t.now;
    t.send_to_bob_at(1, t0);
    t.relay.sync(t0 + SYNC_DELAY_MS, &mut t.store, false);
    t.drain();
    t.relay.disconnect(ConnId(2));
    t.drain();
    let out = t.login_holding(3, "bob", BOB, t0 + SYNC_DELAY_MS);
    assert!(
        matches!(
            out.first(),
            Some(Out::Send(ConnId(3), FromRelay::Welcome { .. }))
        ),
        "{out:?}"
    );
    t.relay.sync(t0 + SYNC_DELAY_MS + 1, &mut t.store, false);
    assert!(t.stored_ids().is_empty(), "bob is back: still held");
    t.relay
        .handle(ConnId(3), ToRelay::Ack(msg_key(1)), t0 + 50, &mut t.store);
    assert_eq!(
        t.drain(),
        [Out::Send(ConnId(1), FromRelay::Accepted(msg_key(1)))]
    );
    t.relay.sync(t0 + HOLD_ONLINE_MS, &mut t.store, false);
    assert!(t.stored_ids().is_empty(), "acknowledged: never written");
}
