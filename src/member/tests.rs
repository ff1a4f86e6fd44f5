//! Two-core tests: real members wired to a real relay in memory (STYLE principle 8).
//!
//! [`Net`] plays the daemons' part: it moves the relay's `Out::Send`s to the members and the
//! members' `Out::Frame`s to the relay, in one FIFO "wire", until nothing moves. A [`Filter`]
//! sees every frame once on its way and may pass, drop, duplicate, delay (reorder) or alter it.
//! Connections are numbered; a frame in flight on a connection that has since closed is lost,
//! as it would be on TCP.

use super::link::{LOGIN_TIMEOUT_MS, PING_AFTER_MS, SILENT_RELAY_MS};
use super::send::RETRY_REFUSED_MS;
use super::*;
use crate::store::{Store, StoreError};
use std::collections::HashMap;
use std::sync::OnceLock;

use rand::RngCore;

use crate::crypto::{
    make_key_packet, seal_envelope, unwrap_key_packet, CryptoError, Header, PublicKey, SessionKey,
};
use crate::proto::control::{Dir, MsgState, Record};
use crate::proto::relay::{ItemKey, Kind, Receipt};
use crate::proto::{to_payload, MAX_TEXT};

use crate::relay::{ConnId, Limits, Out as RelayOut, Relay};

const ALICE: usize = 0;
const BOB: usize = 1;
const CAROL: usize = 2;
const DAVE: usize = 3;
const MALLORY: usize = 4;
const CAROL2: usize = 5;

/// Test identities, generated once per test process (key generation is the slow part).
/// `Identity` is deliberately not `Clone`, so the cache holds PEM.
fn identity(i: usize) -> Identity {
    static PEMS: [OnceLock<String>; 6] = [const { OnceLock::new() }; 6];
    let pem = PEMS[i].get_or_init(|| {
        let id = Identity::generate(&mut rand::thread_rng(), 2048).expect("key generation");
        id.to_pem().expect("pem").as_str().to_owned()
    });
    Identity::from_pem(pem).expect("stored pem parses")
}

fn public(i: usize) -> PublicKey {
    identity(i).public().clone()
}

/// A frame in transit, or the relay's close of a connection.
#[derive(Clone, Debug)]
enum Msg {
    Up(ToRelay),
    Down(FromRelay),
    Close,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Pass,
    Drop,
    Duplicate,
    /// Send it after everything now on the wire (reordering).
    Delay,
}

/// Sees each frame once, with the name of the member it goes to or comes from.
type Filter = Box<dyn FnMut(&str, &mut Msg) -> Verdict>;

struct Packet {
    node: usize,
    conn: ConnId,
    msg: Msg,
    /// Already shown to the filter.
    filtered: bool,
}

struct Node {
    name: String,
    key: usize,
    member: Member,
    store: Store,
    conn: Option<ConnId>,
    /// `Out::Record`s, in order.
    records: Vec<Record>,
    /// `Out::State`s, in order.
    states: Vec<([u8; 16], MsgState, Option<String>)>,
    /// `Out::Close`s.
    closes: usize,
    /// Frames the member produced while it had no link (lost, as on a dead socket).
    stray: Vec<ToRelay>,
}

struct Net {
    relay: Relay,
    rstore: Store,
    nodes: Vec<Node>,
    owners: HashMap<ConnId, usize>,
    next_conn: ConnId,
    now: u64,
    wire: VecDeque<Packet>,
    filter: Option<Filter>,
    /// Every frame that arrived, with the member's name.
    trace: Vec<(String, Msg)>,
}

impl Net {
    fn new() -> Net {
        Net::with_limits(Limits::default())
    }

    fn with_limits(limits: Limits) -> Net {
        let rstore = Store::open_in_memory().unwrap();
        let relay = Relay::load(&rstore, limits).unwrap();
        Net {
            relay,
            rstore,
            nodes: Vec::new(),
            owners: HashMap::new(),
            next_conn: ConnId(1),
            now: 1_000_000,
            wire: VecDeque::new(),
            filter: None,
            trace: Vec::new(),
        }
    }

    /// A member named `name` with test identity `key` and a fresh store, not connected.
    fn add(&mut self, name: &str, key: usize) -> usize {
        let store = Store::open_in_memory().unwrap();
        let member = Member::load(name.into(), identity(key), &store).unwrap();
        self.nodes.push(Node {
            name: name.into(),
            key,
            member,
            store,
            conn: None,
            records: Vec::new(),
            states: Vec::new(),
            closes: 0,
            stray: Vec::new(),
        });
        self.nodes.len() - 1
    }

    /// Add, connect and let the login finish.
    fn join(&mut self, name: &str, key: usize) -> usize {
        let n = self.add(name, key);
        self.connect(n);
        self.transfer();
        n
    }

    /// Open a new connection for node `n` (the login happens on `transfer`).
    fn connect(&mut self, n: usize) {
        assert!(self.nodes[n].conn.is_none(), "already connected");
        let conn = self.next_conn;
        self.next_conn.0 += 1;
        self.owners.insert(conn, n);
        self.nodes[n].conn = Some(conn);
        self.nodes[n].member.link_up(Now::at(self.now));
        self.relay.connect(conn, self.now);
    }

    /// The connection breaks: both ends notice.
    fn disconnect(&mut self, n: usize) {
        if let Some(c) = self.nodes[n].conn.take() {
            self.nodes[n].member.link_down();
            self.relay.disconnect(c);
        }
    }

    fn reconnect(&mut self, n: usize) {
        self.disconnect(n);
        self.connect(n);
        self.transfer();
    }

    /// The member's daemon restarts: same identity and store, fresh memory. Left disconnected.
    fn restart(&mut self, n: usize) {
        self.disconnect(n);
        let node = &mut self.nodes[n];
        node.member = Member::load(node.name.clone(), identity(node.key), &node.store).unwrap();
    }

    /// End node `n`'s turn, which a failed write must have abandoned: its commit fails, and the
    /// core is rebuilt from disk as the daemon does after a failed commit (the tests then drop
    /// the link, as the daemon does too).
    fn abandoned_commit(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        let commit = node.store.commit();
        assert!(
            matches!(commit, Err(StoreError::Abandoned(_))),
            "the turn must not commit: {commit:?}"
        );
        node.member.reload(&node.store).unwrap();
    }

    /// Move every core's output onto the wire (or into the node's logs).
    fn pump(&mut self) {
        while let Some(o) = self.relay.poll() {
            let (conn, msg) = match o {
                RelayOut::Send(c, m) | RelayOut::AfterCommit(c, m) => (c, Msg::Down(m)),
                RelayOut::Deliver(c, bytes) => (
                    c,
                    Msg::Down(FromRelay::Deliver(
                        crate::proto::from_payload(&bytes).expect("a delivery decodes"),
                    )),
                ),
                RelayOut::Close(c) => (c, Msg::Close),
            };
            let node = *self
                .owners
                .get(&conn)
                .expect("relay output for an unknown connection");
            self.wire.push_back(Packet {
                node,
                conn,
                msg,
                filtered: false,
            });
        }
        for n in 0..self.nodes.len() {
            let mut close = false;
            let node = &mut self.nodes[n];
            while let Some(o) = node.member.poll() {
                match o {
                    Out::Frame(f) => match node.conn {
                        Some(conn) => self.wire.push_back(Packet {
                            node: n,
                            conn,
                            msg: Msg::Up(f),
                            filtered: false,
                        }),
                        None => node.stray.push(f),
                    },
                    Out::Close => {
                        node.closes += 1;
                        close = true;
                    }
                    Out::Record(r) => node.records.push(r),
                    Out::State(id, s, why) => node.states.push((id, s, why)),
                    Out::Looked | Out::Listed { .. } => {}
                    // The net sends with `Member::send`, which seals at once.
                    Out::Sealed(..) => {}
                }
            }
            if close {
                self.disconnect(n);
            }
        }
    }

    /// Deliver one packet. False when the network is quiet.
    fn step(&mut self) -> bool {
        self.pump();
        let Some(mut p) = self.wire.pop_front() else {
            return false;
        };
        if !p.filtered {
            p.filtered = true;
            if let Some(f) = self.filter.as_mut() {
                match f(&self.nodes[p.node].name, &mut p.msg) {
                    Verdict::Pass => {}
                    Verdict::Drop => return true,
                    Verdict::Duplicate => self.wire.push_front(Packet {
                        node: p.node,
                        conn: p.conn,
                        msg: p.msg.clone(),
                        filtered: true,
                    }),
                    Verdict::Delay => {
                        self.wire.push_back(p);
                        return true;
                    }
                }
            }
        }
        self.now += 1;
        let now = self.now;
        let node = &mut self.nodes[p.node];
        let live = node.conn == Some(p.conn);
        match p.msg {
            Msg::Up(m) if live => {
                self.trace.push((node.name.clone(), Msg::Up(m.clone())));
                self.relay.handle(p.conn, m, now, &mut self.rstore);
                // Each relay step is a committed turn here: what it holds in memory is written.
                self.relay.sync(now, &mut self.rstore, true);
            }
            Msg::Down(m) if live => {
                self.trace.push((node.name.clone(), Msg::Down(m.clone())));
                node.member.handle(m, Now::at(now), &mut node.store);
            }
            Msg::Close => {
                if live {
                    self.trace.push((node.name.clone(), Msg::Close));
                    node.conn = None;
                    node.member.link_down();
                }
                self.relay.disconnect(p.conn);
            }
            // In flight on a connection that is gone: lost.
            Msg::Up(_) | Msg::Down(_) => {}
        }
        true
    }

    /// Let presence changes settle: the clock moves past `presence::SETTLE_MS`, every member
    /// ticks (writing the presence records that are due), and the network runs until quiet.
    fn settle(&mut self) {
        self.transfer();
        self.now += super::presence::SETTLE_MS;
        for node in &mut self.nodes {
            node.member.tick(Now::at(self.now), &mut node.store);
        }
        self.transfer();
    }

    /// Run until nothing moves.
    fn transfer(&mut self) {
        for _ in 0..100_000 {
            if !self.step() {
                return;
            }
        }
        panic!("the network never went quiet");
    }

    /// Put a frame from "the relay" on node `n`'s wire, past the filter.
    fn inject(&mut self, n: usize, msg: FromRelay) {
        let conn = self.nodes[n].conn.expect("inject needs a connection");
        self.wire.push_back(Packet {
            node: n,
            conn,
            msg: Msg::Down(msg),
            filtered: true,
        });
    }

    fn try_send(&mut self, n: usize, to: &[&str], text: &str) -> Result<Vec<Sent>, MemberError> {
        let to: Vec<String> = to.iter().map(|s| s.to_string()).collect();
        let node = &mut self.nodes[n];
        node.member
            .send(&to, false, text, Now::at(self.now), &mut node.store)
    }

    /// Send one message and return its id; nothing moves until `transfer`.
    fn send(&mut self, n: usize, to: &str, text: &str) -> [u8; 16] {
        let sent = self.try_send(n, &[to], text).expect("send");
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].state, MsgState::Queued);
        sent[0].id
    }

    fn forget(&mut self, user: &str) {
        assert!(self.relay.forget(user, &mut self.rstore).unwrap());
    }

    fn history(&self, n: usize) -> Vec<Record> {
        self.nodes[n].store.records(0, None, None).unwrap()
    }

    /// (from, text) of every incoming message in node `n`'s history.
    fn inbox(&self, n: usize) -> Vec<(String, String)> {
        self.history(n)
            .into_iter()
            .filter_map(|r| match r.body {
                RecordBody::Message {
                    from,
                    dir: Dir::In,
                    text,
                    ..
                } => Some((from, text)),
                _ => None,
            })
            .collect()
    }

    /// (id, state, reason) of every receipt record in node `n`'s history.
    fn receipts(&self, n: usize) -> Vec<([u8; 16], MsgState, Option<String>)> {
        self.history(n)
            .into_iter()
            .filter_map(|r| match r.body {
                RecordBody::Receipt {
                    id, state, reason, ..
                } => Some((id, state, reason)),
                _ => None,
            })
            .collect()
    }

    /// (user, online) of every presence record in node `n`'s history.
    fn presence(&self, n: usize) -> Vec<(String, bool)> {
        presence_of(&self.history(n))
    }

    /// The states node `n` reported for message `id`.
    fn states(&self, n: usize, id: [u8; 16]) -> Vec<MsgState> {
        self.nodes[n]
            .states
            .iter()
            .filter(|(i, _, _)| *i == id)
            .map(|(_, s, _)| *s)
            .collect()
    }

    /// Envelopes that reached the relay from members named `from`.
    fn sent(&self, from: &str) -> Vec<Envelope> {
        self.trace
            .iter()
            .filter(|(name, _)| name == from)
            .filter_map(|(_, m)| match m {
                Msg::Up(ToRelay::Send(Routed::Message(e))) => Some(e.clone()),
                _ => None,
            })
            .collect()
    }

    /// Acks that reached the relay from members named `from`.
    fn acks(&self, from: &str) -> Vec<ItemKey> {
        self.trace
            .iter()
            .filter(|(name, _)| name == from)
            .filter_map(|(_, m)| match m {
                Msg::Up(ToRelay::Ack(k)) => Some(*k),
                _ => None,
            })
            .collect()
    }

    /// Error codes the relay sent to members named `name`.
    fn errors_to(&self, name: &str) -> Vec<String> {
        self.trace
            .iter()
            .filter(|(who, _)| who == name)
            .filter_map(|(_, m)| match m {
                Msg::Down(FromRelay::Error { code, .. }) => Some(code.to_string()),
                _ => None,
            })
            .collect()
    }

    fn who(&self, n: usize, user: &str) -> PeerView {
        self.nodes[n]
            .member
            .who()
            .into_iter()
            .find(|p| p.user == user)
            .unwrap_or_else(|| panic!("{} does not know {user}", self.nodes[n].name))
    }
}

fn presence_of(records: &[Record]) -> Vec<(String, bool)> {
    records
        .iter()
        .filter_map(|r| match &r.body {
            RecordBody::Presence { user, online } => Some((user.clone(), *online)),
            _ => None,
        })
        .collect()
}

/// Alice and bob, both online, each with the other pinned.
fn pair() -> (Net, usize, usize) {
    let mut net = Net::new();
    let a = net.join("alice", ALICE);
    let b = net.join("bob", BOB);
    net.settle();
    (net, a, b)
}

fn msg_key(id: [u8; 16]) -> ItemKey {
    ItemKey {
        kind: Kind::Message,
        id,
    }
}

fn inbox_of(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

fn kind(m: &Msg) -> &'static str {
    match m {
        Msg::Down(f) => msg_name(f),
        Msg::Up(ToRelay::Login { .. }) => "Login",
        Msg::Up(ToRelay::Send(_)) => "Send",
        Msg::Up(ToRelay::Ack(_)) => "Ack",
        Msg::Up(ToRelay::Ping) => "Ping",
        Msg::Up(ToRelay::Lookup(_)) => "Lookup",
        Msg::Up(ToRelay::List { .. }) => "List",
        Msg::Close => "Close",
    }
}

// Predicates for filters.
fn deliver_message(m: &Msg) -> bool {
    matches!(m, Msg::Down(FromRelay::Deliver(Routed::Message(_))))
}
fn deliver_receipt(m: &Msg) -> bool {
    matches!(m, Msg::Down(FromRelay::Deliver(Routed::Receipt(_))))
}
fn accepted_message(m: &Msg) -> bool {
    matches!(
        m,
        Msg::Down(FromRelay::Accepted(ItemKey {
            kind: Kind::Message,
            ..
        }))
    )
}
fn send_message(m: &Msg) -> bool {
    matches!(m, Msg::Up(ToRelay::Send(Routed::Message(_))))
}
fn send_receipt(m: &Msg) -> bool {
    matches!(m, Msg::Up(ToRelay::Send(Routed::Receipt(_))))
}

/// Give `verdict` to the first `count` frames of `who` that match `pred`; pass the rest.
fn first(who: &'static str, pred: fn(&Msg) -> bool, count: usize, verdict: Verdict) -> Filter {
    let mut left = count;
    Box::new(move |name, msg| {
        if left > 0 && name == who && pred(msg) {
            left -= 1;
            verdict
        } else {
            Verdict::Pass
        }
    })
}

/// Alter the first frame of `who` that matches `pred` with `change`.
fn tamper(
    who: &'static str,
    pred: fn(&Msg) -> bool,
    mut change: impl FnMut(&mut Envelope) + 'static,
) -> Filter {
    let mut done = false;
    Box::new(move |name, msg| {
        if !done && name == who && pred(msg) {
            if let Msg::Up(ToRelay::Send(Routed::Message(e)))
            | Msg::Down(FromRelay::Deliver(Routed::Message(e))) = msg
            {
                change(e);
                done = true;
            }
        }
        Verdict::Pass
    })
}

/// An envelope from `from` to `to` in a fresh session, its key packet signed by `signer`.
fn hand_sealed(
    signer: &Identity,
    from: &str,
    to: &str,
    to_key: &PublicKey,
    text: &str,
) -> Envelope {
    let mut id = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut id);
    hand_sealed_as(signer, from, to, to_key, id, text)
}

/// As [`hand_sealed`], with the message id `id`.
fn hand_sealed_as(
    signer: &Identity,
    from: &str,
    to: &str,
    to_key: &PublicKey,
    id: [u8; 16],
    text: &str,
) -> Envelope {
    let mut rng = rand::thread_rng();
    let key = SessionKey::random(&mut rng);
    let mut session = [0u8; 16];
    rng.fill_bytes(&mut session);
    let kp = make_key_packet(&mut rng, signer, from, to, to_key, &session, &key).unwrap();
    let mut e = Envelope {
        id,
        from: from.into(),
        to: to.into(),
        time_ms: 5,
        session,
        counter: 0,
        key_packet: Some(kp),
        ciphertext: Vec::new(),
    };
    e.ciphertext = seal_envelope(&key, &Header::of(&e), text.as_bytes());
    e
}

/// A validly sealed copy of `like` under its sender's session key (read from the sender's
/// store), with a new id and the given counter: what a replay with a fresh id looks like.
fn reseal(net: &Net, sender: usize, like: &Envelope, counter: u64, text: &str) -> Envelope {
    let raw = net.nodes[sender]
        .store
        .session(true, &like.to, &like.session)
        .unwrap()
        .expect("sender stored its session key");
    let key = SessionKey::from_bytes(&raw).unwrap();
    let mut e = like.clone();
    rand::thread_rng().fill_bytes(&mut e.id);
    e.counter = counter;
    e.key_packet = None;
    e.ciphertext = seal_envelope(&key, &Header::of(&e), text.as_bytes());
    e
}

// ---- login, directory, presence ----

#[test]
fn login_is_challenge_then_login_then_welcome() {
    let mut net = Net::new();
    let a = net.add("alice", ALICE);
    net.connect(a);
    assert!(!net.nodes[a].member.connected());
    net.transfer();
    assert!(net.nodes[a].member.connected());
    let kinds: Vec<&str> = net.trace.iter().map(|(_, m)| kind(m)).collect();
    assert_eq!(kinds, ["Challenge", "Login", "Welcome"]);
    match &net.trace[1].1 {
        Msg::Up(ToRelay::Login { user, key, .. }) => {
            assert_eq!(user, "alice");
            assert_eq!(key, public(ALICE).der());
        }
        other => panic!("{other:?}"),
    }
    assert!(net.nodes[a].member.relay_error().is_none());
    assert_eq!(net.relay.online_count(), 1);
    assert_eq!(net.nodes[a].closes, 0);
}

#[test]
fn directory_reaches_a_joining_member_and_presence_reaches_the_others() {
    let (mut net, a, b) = pair();
    // Bob learned alice from the Welcome, online, and pinned her key on first sight.
    let alice = net.who(b, "alice");
    assert!(alice.online);
    assert_eq!(alice.trust, "pinned");
    assert_eq!(alice.fingerprint, public(ALICE).fingerprint().to_string());
    assert_eq!(alice.presented, None);
    assert_eq!(
        net.nodes[b].member.pinned("alice"),
        Some(public(ALICE).fingerprint())
    );
    // Alice heard bob join, as an emitted and a stored record.
    assert_eq!(net.presence(a), [("bob".to_string(), true)]);
    assert_eq!(presence_of(&net.nodes[a].records), net.presence(a));
    assert_eq!(net.nodes[a].member.peers_online(), 1);
    // The pin is durable.
    assert_eq!(net.nodes[a].store.pins().unwrap()[0].user, "bob");

    let c = net.join("carol", CAROL);
    net.settle();
    net.disconnect(c);
    net.transfer();
    assert!(!net.who(a, "carol").online, "who sees presence at once");
    net.settle();
    let want = [("carol".to_string(), true), ("carol".to_string(), false)];
    assert_eq!(net.presence(a)[1..], want);
    assert_eq!(net.presence(b), want);
    assert!(!net.who(a, "carol").online);
    // Carol's own history has bob's and alice's presence only from the directory: no records.
    assert!(net.presence(c).is_empty());
    // Carol comes back: joined again, and she still knows both.
    net.connect(c);
    net.settle();
    assert_eq!(net.presence(a).last(), Some(&("carol".to_string(), true)));
    assert_eq!(net.nodes[c].member.peers_online(), 2);
}

#[test]
fn link_down_marks_every_peer_offline() {
    let (mut net, a, _b) = pair();
    assert_eq!(net.nodes[a].member.peers_online(), 1);
    net.disconnect(a);
    assert!(!net.nodes[a].member.connected());
    assert_eq!(net.nodes[a].member.peers_online(), 0);
}

// ---- the happy path ----

#[test]
fn message_is_opened_and_the_sender_sees_relayed_then_delivered() {
    let (mut net, a, b) = pair();
    let id = net.send(a, "bob", "hello, bob");
    // Sealed and stored before anything moves.
    assert_eq!(net.nodes[a].store.outbox_messages().unwrap(), 1);
    assert!(matches!(
        net.history(a).last().map(|r| &r.body),
        Some(RecordBody::Message { dir: Dir::Out, text, .. }) if text == "hello, bob"
    ));
    net.transfer();

    let got: Vec<RecordBody> = net
        .history(b)
        .into_iter()
        .map(|r| r.body)
        .filter(|b| matches!(b, RecordBody::Message { .. }))
        .collect();
    assert_eq!(
        got,
        [RecordBody::Message {
            id,
            from: "alice".into(),
            to: "bob".into(),
            dir: Dir::In,
            text: "hello, bob".into(),
        }]
    );
    // The record was also emitted for `tail -f`.
    assert!(net.nodes[b]
        .records
        .iter()
        .any(|r| matches!(&r.body, RecordBody::Message { id: i, .. } if *i == id)));
    assert_eq!(net.states(a, id), [MsgState::Relayed, MsgState::Delivered]);
    assert_eq!(
        net.receipts(a),
        [
            (id, MsgState::Relayed, None),
            (id, MsgState::Delivered, None)
        ]
    );
    assert_eq!(
        net.nodes[a].store.outgoing(&id).unwrap().unwrap().3,
        MsgState::Delivered
    );
    // Everything acknowledged everywhere.
    assert_eq!(net.relay.queued_count(), 0);
    assert!(net.nodes[a].store.outbox().unwrap().is_empty());
    assert!(net.nodes[b].store.outbox().unwrap().is_empty());
    // The relay only ever saw ciphertext.
    let e = &net.sent("alice")[0];
    assert!(!e.ciphertext.windows(5).any(|w| w == b"hello"));
    assert!(net.nodes.iter().all(|n| n.stray.is_empty()));
}

#[test]
fn messages_both_ways_and_in_send_order() {
    let (mut net, a, b) = pair();
    for i in 0..5 {
        net.send(a, "bob", &format!("a{i}"));
    }
    net.send(b, "alice", "b0");
    net.transfer();
    let want: Vec<(&str, &str)> = vec![
        ("alice", "a0"),
        ("alice", "a1"),
        ("alice", "a2"),
        ("alice", "a3"),
        ("alice", "a4"),
    ];
    assert_eq!(net.inbox(b), inbox_of(&want));
    assert_eq!(net.inbox(a), inbox_of(&[("bob", "b0")]));
    assert_eq!(net.relay.queued_count(), 0);
}

#[test]
fn send_to_several_and_to_all() {
    let mut net = Net::new();
    let a = net.join("alice", ALICE);
    let b = net.join("bob", BOB);
    let c = net.join("carol", CAROL);
    let sent = net
        .try_send(a, &["bob", "carol", "bob"], "hi both")
        .unwrap();
    assert_eq!(sent.len(), 2, "a repeated recipient gets one copy");
    net.transfer();
    assert_eq!(net.inbox(b), inbox_of(&[("alice", "hi both")]));
    assert_eq!(net.inbox(c), inbox_of(&[("alice", "hi both")]));
    net.disconnect(c);
    net.transfer();
    let node = &mut net.nodes[a];
    let sent = node
        .member
        .send(
            &[],
            true,
            "to all online",
            Now::at(net.now),
            &mut node.store,
        )
        .unwrap();
    assert_eq!(
        sent.iter().map(|s| s.to.as_str()).collect::<Vec<_>>(),
        ["bob"]
    );
    net.transfer();
    assert_eq!(net.inbox(b).len(), 2);
}

/// Inside a turn, storing a delivered message takes no savepoint: a write that fails part-way
/// (its id stored, its receipt not) abandons the turn, so nothing of it is kept. A kept id
/// would make the redelivery look like a duplicate, and the message would be lost.
#[test]
fn a_delivered_message_failing_part_way_in_a_turn_is_kept_whole_on_redelivery() {
    let (mut net, a, b) = pair();
    net.send(a, "bob", "first");
    net.transfer();
    net.nodes[b].store.begin().unwrap();
    // The second message's writes: its id (let through), then its receipt (fails).
    net.nodes[b].store.fail_write_after(1);
    let id = net.send(a, "bob", "second");
    net.transfer();
    net.abandoned_commit(b);
    assert!(!net.nodes[b].store.has_message(&id).unwrap(), "no id kept");
    assert_eq!(net.inbox(b), inbox_of(&[("alice", "first")]));
    net.reconnect(b);
    assert_eq!(
        net.inbox(b),
        inbox_of(&[("alice", "first"), ("alice", "second")])
    );
    assert_eq!(net.states(a, id), [MsgState::Relayed, MsgState::Delivered]);
}

/// The same for a send to one recipient inside a turn: its message row written and its outbox
/// row failing leaves no message behind (one would be sent again with the next key packet).
#[test]
fn a_send_failing_part_way_in_a_turn_keeps_nothing() {
    let (mut net, a, b) = pair();
    net.send(a, "bob", "first");
    net.transfer();
    let session = net.sent("alice")[0].session;
    net.nodes[a].store.begin().unwrap();
    // The send's writes: the message (let through), its outbox row (fails), its record.
    net.nodes[a].store.fail_write_after(1);
    let e = net.try_send(a, &["bob"], "lost").unwrap_err();
    assert!(matches!(e, MemberError::Store(_)), "{e:?}");
    net.abandoned_commit(a);
    assert!(
        net.nodes[a]
            .store
            .unsettled("bob", &session)
            .unwrap()
            .is_empty(),
        "no message row left to send again"
    );
    assert!(net.nodes[a].store.outbox().unwrap().is_empty());
    net.reconnect(a);
    net.send(a, "bob", "after");
    net.transfer();
    assert_eq!(
        net.inbox(b),
        inbox_of(&[("alice", "first"), ("alice", "after")])
    );
}

/// And for a verified receipt: its state written and its outbox row failing leaves the message
/// `relayed`, and the receipt, not acknowledged, comes again and makes it `delivered` once.
#[test]
fn a_receipt_failing_part_way_in_a_turn_is_taken_again_whole() {
    let (mut net, a, _b) = pair();
    let held = std::rc::Rc::new(std::cell::RefCell::new(None));
    let keep = held.clone();
    let mut once = true;
    net.filter = Some(Box::new(move |name, m| {
        if name == "alice" && deliver_receipt(m) && std::mem::take(&mut once) {
            *keep.borrow_mut() = Some(m.clone());
            return Verdict::Drop;
        }
        Verdict::Pass
    }));
    let id = net.send(a, "bob", "x");
    net.transfer();
    let Some(Msg::Down(receipt)) = held.borrow_mut().take() else {
        panic!("the receipt was held back");
    };
    net.nodes[a].store.begin().unwrap();
    // The receipt's writes: the state (let through), the outbox row (fails), the record.
    net.nodes[a].store.fail_write_after(1);
    net.inject(a, receipt);
    net.transfer();
    net.abandoned_commit(a);
    assert_eq!(
        net.nodes[a].store.outgoing(&id).unwrap().map(|o| o.3),
        Some(MsgState::Relayed),
        "not delivered without its record"
    );
    net.reconnect(a);
    let delivered = |net: &Net| {
        net.receipts(a)
            .iter()
            .filter(|r| r.0 == id && r.1 == MsgState::Delivered)
            .count()
    };
    assert_eq!(delivered(&net), 1);
    assert_eq!(
        net.nodes[a].store.outgoing(&id).unwrap().map(|o| o.3),
        Some(MsgState::Delivered)
    );
}

#[test]
fn send_errors_store_nothing() {
    let (mut net, a, b) = pair();
    net.disconnect(b);
    net.transfer();
    let before = net.history(a).len();
    assert!(matches!(
        net.try_send(a, &["alice"], "x"),
        Err(MemberError::SelfSend)
    ));
    // Keys on demand: the first try asks the relay, the answer makes the second one fail.
    assert!(matches!(
        net.try_send(a, &["nobody"], "x"),
        Err(MemberError::KeysPending(u)) if u == ["nobody"]
    ));
    net.transfer();
    assert!(matches!(
        net.try_send(a, &["nobody"], "x"),
        Err(MemberError::UnknownUser(u)) if u == "nobody"
    ));
    assert!(matches!(
        net.try_send(a, &["Bob"], "x"),
        Err(MemberError::BadUser(_))
    ));
    assert!(matches!(
        net.try_send(a, &[], "x"),
        Err(MemberError::NoRecipient)
    ));
    let long = "x".repeat(MAX_TEXT + 1);
    assert!(matches!(
        net.try_send(a, &["bob"], &long),
        Err(MemberError::TextTooLong(n)) if n == MAX_TEXT + 1
    ));
    // A good and a bad recipient together: nothing is sent to either.
    assert!(net.try_send(a, &["bob", "nobody"], "x").is_err());
    let node = &mut net.nodes[a];
    assert!(matches!(
        node.member
            .send(&[], true, "x", Now::at(0), &mut node.store),
        Err(MemberError::NoPeersOnline)
    ));
    assert_eq!(net.history(a).len(), before);
    assert!(net.nodes[a].store.outbox().unwrap().is_empty());
    net.transfer();
    assert!(net.sent("alice").is_empty());
    // The limit itself is fine.
    let max = "y".repeat(MAX_TEXT);
    net.try_send(a, &["bob"], &max).unwrap();
}

// ---- delivery semantics under faults ----

#[test]
fn dropped_deliver_is_delivered_once_after_reconnect() {
    let (mut net, a, b) = pair();
    net.filter = Some(first("bob", deliver_message, 1, Verdict::Drop));
    let id = net.send(a, "bob", "lost once");
    net.transfer();
    assert!(net.inbox(b).is_empty());
    assert_eq!(net.states(a, id), [MsgState::Relayed]);
    assert_eq!(
        net.relay.queued_count(),
        1,
        "the relay keeps it until bob acks"
    );
    net.reconnect(b);
    assert_eq!(net.inbox(b), inbox_of(&[("alice", "lost once")]));
    assert_eq!(net.states(a, id), [MsgState::Relayed, MsgState::Delivered]);
    assert_eq!(net.relay.queued_count(), 0);
    // Another reconnect delivers nothing again.
    net.reconnect(b);
    assert_eq!(net.inbox(b).len(), 1);
}

#[test]
fn duplicate_deliver_is_stored_once() {
    let (mut net, a, b) = pair();
    net.filter = Some(first("bob", deliver_message, 1, Verdict::Duplicate));
    let id = net.send(a, "bob", "twice on the wire");
    net.transfer();
    assert_eq!(net.inbox(b), inbox_of(&[("alice", "twice on the wire")]));
    // Both copies are acknowledged; one receipt is sent.
    assert_eq!(net.acks("bob"), [msg_key(id), msg_key(id)]);
    assert_eq!(net.states(a, id), [MsgState::Relayed, MsgState::Delivered]);
    assert_eq!(net.receipts(a).len(), 2);
    assert_eq!(net.relay.queued_count(), 0);
}

#[test]
fn duplicate_receipt_changes_nothing() {
    let (mut net, a, _b) = pair();
    net.filter = Some(first("alice", deliver_receipt, 1, Verdict::Duplicate));
    let id = net.send(a, "bob", "x");
    net.transfer();
    assert_eq!(net.states(a, id), [MsgState::Relayed, MsgState::Delivered]);
    assert_eq!(net.receipts(a).len(), 2);
    assert_eq!(net.relay.queued_count(), 0);
}

#[test]
fn reordered_delivers_are_each_stored_once() {
    let (mut net, a, b) = pair();
    net.filter = Some(first("bob", deliver_message, 1, Verdict::Delay));
    let first_id = net.send(a, "bob", "one");
    let second_id = net.send(a, "bob", "two");
    net.transfer();
    // The wire reordered them (the relay itself never does), and each is stored once.
    assert_eq!(
        net.inbox(b),
        inbox_of(&[("alice", "two"), ("alice", "one")])
    );
    for id in [first_id, second_id] {
        assert_eq!(net.states(a, id).last(), Some(&MsgState::Delivered));
    }
    assert_eq!(net.relay.queued_count(), 0);
}

#[test]
fn dropped_accepted_resends_from_the_outbox_after_reconnect() {
    let (mut net, a, b) = pair();
    net.disconnect(b);
    net.transfer();
    net.filter = Some(first("alice", accepted_message, 1, Verdict::Drop));
    let id = net.send(a, "bob", "custody unclear");
    net.transfer();
    assert!(net.states(a, id).is_empty(), "alice never heard Accepted");
    assert_eq!(net.nodes[a].store.outbox_messages().unwrap(), 1);
    assert_eq!(net.relay.queued_count(), 1);
    net.reconnect(a);
    assert_eq!(net.sent("alice").len(), 2, "resent after login");
    assert_eq!(net.states(a, id), [MsgState::Relayed]);
    assert_eq!(net.nodes[a].store.outbox_messages().unwrap(), 0);
    assert_eq!(net.relay.queued_count(), 1, "the relay held one copy");
    net.connect(b);
    net.transfer();
    assert_eq!(net.inbox(b), inbox_of(&[("alice", "custody unclear")]));
    assert_eq!(net.states(a, id), [MsgState::Relayed, MsgState::Delivered]);
}

#[test]
fn resend_after_the_recipient_acked_is_dropped_by_message_id() {
    // Bob is online: he stores the message and acks it, so the relay forgets it. Alice hears
    // neither Accepted nor the receipt, and resends after reconnecting: the relay queues and
    // delivers it again, and bob must drop it by id.
    let (mut net, a, b) = pair();
    let mut drop_accepted = first("alice", accepted_message, 1, Verdict::Drop);
    let mut drop_receipt = first("alice", deliver_receipt, 1, Verdict::Drop);
    net.filter = Some(Box::new(move |who, m| {
        match (drop_accepted(who, m), drop_receipt(who, m)) {
            (Verdict::Pass, Verdict::Pass) => Verdict::Pass,
            _ => Verdict::Drop,
        }
    }));
    let id = net.send(a, "bob", "said once");
    net.transfer();
    assert_eq!(net.inbox(b).len(), 1);
    assert!(net.states(a, id).is_empty());
    net.reconnect(a);
    assert_eq!(net.sent("alice").len(), 2);
    assert_eq!(net.inbox(b), inbox_of(&[("alice", "said once")]));
    assert_eq!(net.acks("bob"), [msg_key(id), msg_key(id)]);
    assert_eq!(net.states(a, id), [MsgState::Delivered]);
    assert_eq!(net.relay.queued_count(), 0);
    assert!(net.nodes[a].store.outbox().unwrap().is_empty());
    assert!(net.nodes[b].store.outbox().unwrap().is_empty());
}

#[test]
fn dropped_send_is_resent_after_reconnect() {
    let (mut net, a, b) = pair();
    net.filter = Some(first("alice", send_message, 1, Verdict::Drop));
    let id = net.send(a, "bob", "retry me");
    net.transfer();
    assert!(net.inbox(b).is_empty());
    assert_eq!(net.relay.queued_count(), 0);
    net.reconnect(a);
    assert_eq!(net.inbox(b), inbox_of(&[("alice", "retry me")]));
    assert_eq!(net.states(a, id), [MsgState::Relayed, MsgState::Delivered]);
}

#[test]
fn dropped_receipt_is_resent_by_the_recipient_after_reconnect() {
    let (mut net, a, b) = pair();
    net.filter = Some(first("bob", send_receipt, 1, Verdict::Drop));
    let id = net.send(a, "bob", "x");
    net.transfer();
    assert_eq!(net.inbox(b).len(), 1);
    assert_eq!(net.states(a, id), [MsgState::Relayed]);
    assert_eq!(net.nodes[b].store.outbox().unwrap().len(), 1);
    net.reconnect(b);
    assert_eq!(net.states(a, id), [MsgState::Relayed, MsgState::Delivered]);
    assert!(net.nodes[b].store.outbox().unwrap().is_empty());
    assert_eq!(net.inbox(b).len(), 1);
}

#[test]
fn offline_recipient_gets_queued_messages_on_login() {
    let mut net = Net::new();
    let a = net.join("alice", ALICE);
    let b = net.join("bob", BOB);
    net.disconnect(b);
    net.transfer();
    let one = net.send(a, "bob", "while you were out");
    let two = net.send(a, "bob", "and again");
    net.transfer();
    assert_eq!(net.relay.queued_count(), 2);
    assert_eq!(net.states(a, one), [MsgState::Relayed]);
    assert_eq!(net.states(a, two), [MsgState::Relayed]);
    net.connect(b);
    net.transfer();
    assert_eq!(
        net.inbox(b),
        inbox_of(&[("alice", "while you were out"), ("alice", "and again")])
    );
    assert_eq!(net.states(a, two), [MsgState::Relayed, MsgState::Delivered]);
    assert_eq!(net.relay.queued_count(), 0);
}

#[test]
fn sent_while_disconnected_is_flushed_on_login() {
    let (mut net, a, b) = pair();
    net.disconnect(a);
    net.transfer();
    let id = net.send(a, "bob", "written offline");
    net.transfer();
    assert!(net.nodes[a].stray.is_empty(), "nothing sent without a link");
    assert!(net.states(a, id).is_empty());
    net.connect(a);
    net.transfer();
    assert_eq!(net.inbox(b), inbox_of(&[("alice", "written offline")]));
    assert_eq!(net.states(a, id), [MsgState::Relayed, MsgState::Delivered]);
}

#[test]
fn recipient_restart_opens_queued_messages_with_the_stored_session_key() {
    let (mut net, a, b) = pair();
    net.send(a, "bob", "first");
    net.transfer();
    net.disconnect(b);
    net.transfer();
    net.send(a, "bob", "second");
    net.transfer();
    let sent = net.sent("alice");
    assert!(
        sent[1].key_packet.is_none(),
        "the second envelope relies on the stored session key"
    );
    net.restart(b);
    net.connect(b);
    net.transfer();
    assert_eq!(
        net.inbox(b),
        inbox_of(&[("alice", "first"), ("alice", "second")])
    );
}

#[test]
fn sender_restart_starts_a_new_session_and_old_receipts_still_count() {
    let (mut net, a, b) = pair();
    net.disconnect(b);
    net.transfer();
    let old = net.send(a, "bob", "before restart");
    net.transfer();
    net.restart(a);
    net.connect(a);
    net.transfer();
    let new = net.send(a, "bob", "after restart");
    net.transfer();
    net.connect(b);
    net.transfer();
    assert_eq!(
        net.inbox(b),
        inbox_of(&[("alice", "before restart"), ("alice", "after restart")])
    );
    let sent = net.sent("alice");
    assert_eq!(sent.len(), 2);
    assert_ne!(sent[0].session, sent[1].session);
    assert!(sent[1].key_packet.is_some());
    assert_eq!(sent[1].counter, 0);
    // The receipt for the old session's message verifies against the stored sending key.
    assert_eq!(net.states(a, old), [MsgState::Relayed, MsgState::Delivered]);
    assert_eq!(net.states(a, new), [MsgState::Relayed, MsgState::Delivered]);
}

// ---- sessions ----

#[test]
fn a_session_is_reused_and_drops_its_key_packet_after_a_receipt() {
    let (mut net, a, _b) = pair();
    net.send(a, "bob", "one");
    net.transfer();
    net.send(a, "bob", "two");
    net.transfer();
    let sent = net.sent("alice");
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].session, sent[1].session);
    assert_eq!((sent[0].counter, sent[1].counter), (0, 1));
    assert!(sent[0].key_packet.is_some());
    assert!(sent[1].key_packet.is_none());
}

#[test]
fn key_packet_rides_along_until_a_receipt_arrives() {
    let (mut net, a, b) = pair();
    net.disconnect(b);
    net.transfer();
    net.send(a, "bob", "one");
    net.send(a, "bob", "two");
    net.transfer();
    let sent = net.sent("alice");
    assert_eq!(sent[0].session, sent[1].session);
    assert!(sent.iter().all(|e| e.key_packet.is_some()));
    // Even if the first one is lost, the second opens on its own.
    net.filter = Some(first("bob", deliver_message, 1, Verdict::Drop));
    net.connect(b);
    net.transfer();
    assert_eq!(net.inbox(b), inbox_of(&[("alice", "two")]));
    net.filter = None;
    net.reconnect(b);
    assert_eq!(net.inbox(b).len(), 2);
}

// ---- what a recipient refuses ----

#[test]
fn tampered_ciphertext_is_not_stored_but_acknowledged() {
    let (mut net, a, b) = pair();
    net.filter = Some(tamper("alice", send_message, |e| e.ciphertext[0] ^= 1));
    let id = net.send(a, "bob", "altered in transit");
    net.transfer();
    assert!(net.inbox(b).is_empty());
    assert_eq!(
        net.acks("bob"),
        [msg_key(id)],
        "acked so it is not redelivered"
    );
    assert_eq!(net.relay.queued_count(), 0);
    assert_eq!(net.states(a, id), [MsgState::Relayed], "never delivered");
    assert!(
        net.nodes[b].store.outbox().unwrap().is_empty(),
        "no receipt"
    );
    net.reconnect(b);
    assert!(net.inbox(b).is_empty());
    // The session still works for the next message.
    net.send(a, "bob", "intact");
    net.transfer();
    assert_eq!(net.inbox(b), inbox_of(&[("alice", "intact")]));
}

#[test]
fn tampered_header_is_not_stored() {
    type Change = fn(&mut Envelope);
    let changes: [(&str, Change); 4] = [
        ("time", |e| e.time_ms += 1),
        ("counter", |e| e.counter += 7),
        ("tag", |e| {
            let n = e.ciphertext.len();
            e.ciphertext[n - 1] ^= 0x80
        }),
        ("truncated", |e| e.ciphertext.truncate(3)),
    ];
    for (what, change) in changes {
        let (mut net, a, b) = pair();
        net.filter = Some(tamper("bob", deliver_message, change));
        let id = net.send(a, "bob", "header bound");
        net.transfer();
        assert!(net.inbox(b).is_empty(), "{what}");
        assert_eq!(net.acks("bob"), [msg_key(id)], "{what}");
        assert_eq!(net.relay.queued_count(), 0, "{what}");
    }
}

#[test]
fn tampered_sender_or_session_fails_the_key_packet_signature() {
    let mut net = Net::new();
    let a = net.join("alice", ALICE);
    let b = net.join("bob", BOB);
    net.join("carol", CAROL);
    type Change = fn(&mut Envelope);
    let changes: [Change; 2] = [|e| e.from = "carol".into(), |e| e.session[0] ^= 1];
    for change in changes {
        net.filter = Some(tamper("bob", deliver_message, change));
        let id = net.send(a, "bob", "x");
        net.transfer();
        assert!(net.inbox(b).is_empty());
        assert!(net.acks("bob").contains(&msg_key(id)));
        assert!(
            net.nodes[b].member.receiving.is_empty(),
            "no session key kept"
        );
        // The next message starts a session of its own (the first one never got a receipt).
        net.nodes[a].member.sending.clear();
    }
    assert_eq!(net.relay.queued_count(), 0);
}

/// A message's id is its session's prefix and its counter, so a session's ids are
/// consecutive; the recipient knows them ahead and could send one to the sender first. The
/// sender's insert then refuses the id: the message is sealed again under the next counter and
/// a random id, and goes through as any other.
#[test]
fn ids_follow_the_session_and_a_taken_one_is_replaced() {
    let (mut net, a, b) = pair();
    net.send(a, "bob", "first");
    net.send(a, "bob", "second");
    net.transfer();
    let sent = net.sent("alice");
    let next = |e: &Envelope| {
        let mut id = e.id;
        id[12..].copy_from_slice(&((e.counter + 1) as u32).to_be_bytes());
        id
    };
    assert_eq!(sent[0].id[..12], sent[0].session[..12]);
    assert_eq!(sent[1].id, next(&sent[0]), "consecutive ids in one session");

    // Bob sends alice a message under the id of her next one to him.
    let taken = next(&sent[1]);
    let squat = hand_sealed_as(
        &identity(BOB),
        "bob",
        "alice",
        &public(ALICE),
        taken,
        "squat",
    );
    net.inject(a, FromRelay::Deliver(Routed::Message(squat)));
    net.transfer();
    assert!(net.nodes[a].store.has_message(&taken).unwrap());
    let id = net.send(a, "bob", "third");
    assert_ne!(id, taken, "a taken id is not used again");
    net.transfer();
    // The insert found the id taken after the message was sealed under it: that seal was
    // dropped, and its counter is never sealed again (the nonce under the session's key).
    let third = net.sent("alice")[2].clone();
    assert_eq!(third.id, id);
    assert_eq!(third.session, sent[1].session);
    assert_eq!(
        third.counter,
        sent[1].counter + 2,
        "the counter sealed under the taken id is spent"
    );
    assert_eq!(net.states(a, id), [MsgState::Relayed, MsgState::Delivered]);
    assert_eq!(
        net.inbox(b),
        inbox_of(&[("alice", "first"), ("alice", "second"), ("alice", "third")])
    );
}

#[test]
fn replayed_session_counter_with_a_new_id_is_rejected() {
    let (mut net, a, b) = pair();
    net.send(a, "bob", "original");
    net.transfer();
    let orig = net.sent("alice")[0].clone();
    // A valid seal under the real session key, with a fresh id but a used counter, arriving
    // in one turn with a genuine message: the replay is refused by the insert, and the turn,
    // which wrote the genuine one, commits.
    let replay = reseal(&net, a, &orig, orig.counter, "replayed");
    let genuine = reseal(&net, a, &orig, 500, "genuine");
    net.nodes[b].store.begin().unwrap();
    net.inject(b, FromRelay::Deliver(Routed::Message(replay.clone())));
    net.inject(b, FromRelay::Deliver(Routed::Message(genuine)));
    net.transfer();
    net.nodes[b].store.commit().unwrap();
    assert_eq!(
        net.inbox(b),
        inbox_of(&[("alice", "original"), ("alice", "genuine")])
    );
    assert!(
        net.acks("bob").contains(&msg_key(replay.id)),
        "a replay is acked"
    );
    let receipt_for_replay = net.trace.iter().any(|(name, m)| {
        name == "bob"
            && matches!(m, Msg::Up(ToRelay::Send(Routed::Receipt(r))) if r.id == replay.id)
    });
    assert!(!receipt_for_replay, "no receipt is sent for a replay");
    assert!(
        net.nodes[b]
            .store
            .outbox()
            .unwrap()
            .iter()
            .all(|(k, _)| k.id != replay.id),
        "nor kept to send"
    );
    // Control: the same forgery with an unused counter is accepted, so it was the counter.
    let fresh = reseal(&net, a, &orig, 1_000, "fresh counter");
    net.inject(b, FromRelay::Deliver(Routed::Message(fresh)));
    net.transfer();
    assert_eq!(
        net.inbox(b),
        inbox_of(&[
            ("alice", "original"),
            ("alice", "genuine"),
            ("alice", "fresh counter")
        ])
    );
}

#[test]
fn replay_check_survives_a_restart() {
    let (mut net, a, b) = pair();
    net.send(a, "bob", "original");
    net.transfer();
    let orig = net.sent("alice")[0].clone();
    net.restart(b);
    net.connect(b);
    net.transfer();
    let replay = reseal(&net, a, &orig, orig.counter, "replayed");
    net.inject(b, FromRelay::Deliver(Routed::Message(replay)));
    net.transfer();
    assert_eq!(net.inbox(b), inbox_of(&[("alice", "original")]));
}

#[test]
fn envelope_addressed_to_someone_else_is_rejected() {
    let mut net = Net::new();
    let a = net.join("alice", ALICE);
    let b = net.join("bob", BOB);
    let c = net.join("carol", CAROL);
    net.send(a, "carol", "for carol only");
    net.transfer();
    let env = net.sent("alice")[0].clone();
    assert_eq!(net.inbox(c), inbox_of(&[("alice", "for carol only")]));
    net.inject(b, FromRelay::Deliver(Routed::Message(env.clone())));
    net.transfer();
    assert!(net.inbox(b).is_empty());
    assert_eq!(net.acks("bob"), [msg_key(env.id)]);
    assert!(net.nodes[b]
        .store
        .session(false, "alice", &env.session)
        .unwrap()
        .is_none());
    assert!(net.nodes[b].store.outbox().unwrap().is_empty());
}

#[test]
fn key_packet_signed_by_another_key_is_rejected_before_any_private_key_operation() {
    let (mut net, _a, b) = pair();
    let mallory = identity(MALLORY);
    let forged = hand_sealed(&mallory, "alice", "bob", &public(BOB), "from mallory");
    net.inject(b, FromRelay::Deliver(Routed::Message(forged.clone())));

    // A packet whose wrapped key is garbage that RSA-OAEP could never decrypt, signed by someone
    // else: if the private key ran first, the error would be Unwrap.
    let mut garbage = forged.clone();
    rand::thread_rng().fill_bytes(&mut garbage.id);
    let kp = garbage.key_packet.as_mut().unwrap();
    kp.wrapped = vec![0xee; 3];
    let garbage_kp = kp.clone();
    assert!(matches!(
        unwrap_key_packet(
            &mut rand::thread_rng(),
            &identity(BOB),
            &public(ALICE),
            &garbage,
            &garbage_kp
        ),
        Err(CryptoError::BadSignature)
    ));
    net.inject(b, FromRelay::Deliver(Routed::Message(garbage.clone())));
    net.transfer();

    assert!(net.inbox(b).is_empty());
    for e in [&forged, &garbage] {
        assert!(net.acks("bob").contains(&msg_key(e.id)));
        assert!(
            net.nodes[b]
                .store
                .session(false, "alice", &e.session)
                .unwrap()
                .is_none(),
            "no session key kept"
        );
    }
    assert!(net.nodes[b].member.receiving.is_empty());
    assert!(
        net.nodes[b].store.outbox().unwrap().is_empty(),
        "no receipt"
    );

    // Control: the same construction signed by alice's real key is accepted.
    let genuine = hand_sealed(&identity(ALICE), "alice", "bob", &public(BOB), "from alice");
    net.inject(b, FromRelay::Deliver(Routed::Message(genuine)));
    net.transfer();
    assert_eq!(net.inbox(b), inbox_of(&[("alice", "from alice")]));
}

#[test]
fn judging_writes_nothing_and_settling_writes_it_all() {
    let (mut net, _a, b) = pair();
    let env = hand_sealed(&identity(ALICE), "alice", "bob", &public(BOB), "judge me");
    let node = &mut net.nodes[b];
    let m = &mut node.member;
    let judged = m
        .receiving
        .judge(&m.user, &m.identity, &m.peers, &env, &node.store);
    assert!(matches!(judged.verdict, super::receive::Verdict::Open(_)));
    // Judged only: the session key is not stored or cached, the message is not stored.
    assert!(node
        .store
        .session(false, "alice", &env.session)
        .unwrap()
        .is_none());
    assert!(!node.store.has_message(&env.id).unwrap());
    assert!(node.store.outbox().unwrap().is_empty());
    assert!(m.receiving.is_empty());
    assert!(drain(m).is_empty());

    let mut out = Vec::new();
    assert!(m.receiving.settle(
        env.clone(),
        judged,
        Now::at(net.now),
        &mut node.store,
        &mut out
    ));
    assert!(node
        .store
        .session(false, "alice", &env.session)
        .unwrap()
        .is_some());
    assert!(node.store.has_message(&env.id).unwrap());
    assert_eq!(node.store.outbox().unwrap().len(), 1, "the receipt");
    assert!(!m.receiving.is_empty());
    assert!(matches!(
        out[..],
        [
            Out::Record(_),
            Out::Frame(ToRelay::Ack(_)),
            Out::Frame(ToRelay::Send(Routed::Receipt(_)))
        ]
    ));
}

/// A redelivery of a stored message is not looked up before it is opened (the insert refuses
/// its id): settled, it is acknowledged again and nothing else. Any other verdict on a stored id
/// is `Duplicate`, looked up then.
#[test]
fn a_redelivery_is_found_by_its_insert_and_only_acknowledged() {
    use super::receive::Verdict;
    let (mut net, _a, b) = pair();
    let env = hand_sealed(&identity(ALICE), "alice", "bob", &public(BOB), "once");
    let node = &mut net.nodes[b];
    let m = &mut node.member;
    let now = Now::at(net.now);
    let judged = m
        .receiving
        .judge(&m.user, &m.identity, &m.peers, &env, &node.store);
    let mut out = Vec::new();
    assert!(m
        .receiving
        .settle(env.clone(), judged, now, &mut node.store, &mut out));
    let records = node.store.records(0, None, None).unwrap().len();

    let again = m
        .receiving
        .judge(&m.user, &m.identity, &m.peers, &env, &node.store);
    assert!(
        matches!(again.verdict, Verdict::Open(_)),
        "no lookup before opening: {:?}",
        again.verdict
    );
    let mut out = Vec::new();
    assert!(m
        .receiving
        .settle(env.clone(), again, now, &mut node.store, &mut out));
    assert!(
        matches!(out[..], [Out::Frame(ToRelay::Ack(k))] if k == msg_key(env.id)),
        "only acknowledged: {out:?}"
    );
    assert_eq!(node.store.records(0, None, None).unwrap().len(), records);
    assert_eq!(node.store.outbox().unwrap().len(), 1, "one receipt");

    // The same id with a ciphertext that does not open: a redelivery all the same.
    let mut bent = env.clone();
    bent.ciphertext[0] ^= 1;
    let judged = m
        .receiving
        .judge(&m.user, &m.identity, &m.peers, &bent, &node.store);
    assert!(
        matches!(judged.verdict, Verdict::Duplicate),
        "{:?}",
        judged.verdict
    );
}

#[test]
fn message_without_key_packet_for_an_unknown_session_is_rejected() {
    let (mut net, _a, b) = pair();
    let mut e = hand_sealed(&identity(ALICE), "alice", "bob", &public(BOB), "x");
    e.key_packet = None;
    net.inject(b, FromRelay::Deliver(Routed::Message(e.clone())));
    net.transfer();
    assert!(net.inbox(b).is_empty());
    assert_eq!(net.acks("bob"), [msg_key(e.id)]);
}

#[test]
fn forged_receipt_is_not_believed() {
    let (mut net, a, b) = pair();
    net.disconnect(b);
    net.transfer();
    let id = net.send(a, "bob", "x");
    net.transfer();
    let env = net.sent("alice")[0].clone();
    // The relay (who saw the header) claims bob got it.
    let forged = Receipt {
        id,
        from: "bob".into(),
        to: "alice".into(),
        session: env.session,
        counter: env.counter,
        tag: [7; 16],
    };
    net.inject(a, FromRelay::Deliver(Routed::Receipt(forged)));
    net.transfer();
    assert_eq!(net.states(a, id), [MsgState::Relayed]);
    assert!(net.acks("alice").contains(&ItemKey {
        kind: Kind::Receipt,
        id
    }));
    // The real one still counts.
    net.connect(b);
    net.transfer();
    assert_eq!(net.states(a, id), [MsgState::Relayed, MsgState::Delivered]);
}

// ---- identity and trust ----

#[test]
fn impersonation_is_refused_and_the_real_alice_stays_online() {
    let (mut net, a, b) = pair();
    let m = net.join("alice", MALLORY);
    assert_eq!(net.errors_to("alice"), ["name_taken"]);
    assert!(!net.nodes[m].member.connected());
    assert_eq!(net.nodes[m].closes, 1);
    assert!(net.nodes[m].conn.is_none());
    assert!(net.nodes[m]
        .member
        .relay_error()
        .unwrap()
        .contains(&identity(MALLORY).public().fingerprint().to_string()));
    let welcomes = net
        .trace
        .iter()
        .filter(|(who, m)| who == "alice" && matches!(m, Msg::Down(FromRelay::Welcome { .. })))
        .count();
    assert_eq!(welcomes, 1, "only the real alice was ever welcomed");
    // The real alice: still logged in, still online for bob, no presence flicker.
    assert!(net.nodes[a].member.connected());
    assert!(net.who(b, "alice").online);
    assert!(net.presence(b).is_empty());
    assert_eq!(net.who(b, "alice").trust, "pinned");
    let id = net.send(a, "bob", "still me");
    net.transfer();
    assert_eq!(net.inbox(b), inbox_of(&[("alice", "still me")]));
    assert_eq!(net.states(a, id), [MsgState::Relayed, MsgState::Delivered]);
}

#[test]
fn key_change_blocks_sending_until_trusted() {
    let mut net = Net::new();
    let a = net.join("alice", ALICE);
    let c = net.join("carol", CAROL);
    let old = public(CAROL).fingerprint();
    let new = public(CAROL2).fingerprint();
    assert_eq!(net.nodes[a].member.pinned("carol"), Some(old));

    // Carol loses her key; the relay operator forgets her; she returns with a new one.
    net.forget("carol");
    net.transfer();
    assert_eq!(net.errors_to("carol"), ["forgotten"]);
    assert!(!net.nodes[c].member.connected());
    let c2 = net.join("carol", CAROL2);
    assert!(net.nodes[c2].member.connected());

    let view = net.who(a, "carol");
    assert_eq!(view.trust, "changed");
    assert!(view.online);
    assert_eq!(view.fingerprint, old.to_string());
    assert_eq!(view.presented, Some(new.to_string()));
    // The change is durable.
    let pin = net.nodes[a].store.pins().unwrap().remove(0);
    assert_eq!(pin.presented.as_deref(), Some(public(CAROL2).der()));

    match net.try_send(a, &["carol"], "are you you?") {
        Err(MemberError::KeyChanged {
            user,
            pinned,
            presented,
        }) => {
            assert_eq!(user, "carol");
            assert_eq!(pinned, old);
            assert_eq!(presented, new);
        }
        other => panic!("expected KeyChanged, got {other:?}"),
    }
    assert_eq!(net.nodes[a].store.outbox_messages().unwrap(), 0);

    // The wrong fingerprint changes nothing.
    let node = &mut net.nodes[a];
    let wrong = public(MALLORY).fingerprint().to_string();
    assert!(matches!(
        node.member
            .trust("carol", &wrong, Now::at(0), &mut node.store),
        Err(MemberError::FingerprintMismatch { .. })
    ));
    assert!(matches!(
        node.member
            .trust("carol", "SHA256:nope", Now::at(0), &mut node.store),
        Err(MemberError::BadFingerprint(_))
    ));
    assert!(matches!(
        node.member
            .trust("nobody", &wrong, Now::at(0), &mut node.store),
        Err(MemberError::UnknownUser(_))
    ));
    assert_eq!(net.who(a, "carol").trust, "changed");

    let node = &mut net.nodes[a];
    node.member
        .trust("carol", &new.to_string(), Now::at(net.now), &mut node.store)
        .unwrap();
    let view = net.who(a, "carol");
    assert_eq!(view.trust, "trusted");
    assert_eq!(view.fingerprint, new.to_string());
    assert_eq!(view.presented, None);

    let id = net.send(a, "carol", "welcome back");
    net.transfer();
    assert_eq!(net.inbox(c2), inbox_of(&[("alice", "welcome back")]));
    assert_eq!(net.states(a, id), [MsgState::Relayed, MsgState::Delivered]);
    assert!(net.inbox(c).is_empty());

    // Trust survives a restart.
    net.restart(a);
    assert_eq!(net.who(a, "carol").trust, "trusted");
    assert_eq!(net.nodes[a].member.pinned("carol"), Some(new));
}

#[test]
fn messages_from_a_changed_key_are_held_until_trusted() {
    let mut net = Net::new();
    let a = net.join("alice", ALICE);
    net.join("carol", CAROL);
    net.forget("carol");
    net.transfer();
    let c2 = net.join("carol", CAROL2);
    let id = net.send(c2, "alice", "it's me, new key");
    net.transfer();
    assert!(
        net.inbox(a).is_empty(),
        "not accepted from an untrusted key"
    );
    // Held in alice's own database and acknowledged, so it cannot clog the relay's window.
    assert!(net.acks("alice").contains(&msg_key(id)), "held and acked");
    assert_eq!(net.relay.queued_count(), 0);
    assert_eq!(net.nodes[a].store.held_size(Some("carol")).unwrap().0, 1);
    assert_eq!(net.states(c2, id), [MsgState::Relayed]);

    // Held across a restart of alice, once.
    net.restart(a);
    net.connect(a);
    net.transfer();
    assert!(net.inbox(a).is_empty());
    assert_eq!(net.nodes[a].store.held_size(Some("carol")).unwrap().0, 1);

    let new = public(CAROL2).fingerprint().to_string();
    let node = &mut net.nodes[a];
    node.member
        .trust("carol", &new, Now::at(net.now), &mut node.store)
        .unwrap();
    net.transfer();
    assert_eq!(net.inbox(a), inbox_of(&[("carol", "it's me, new key")]));
    assert_eq!(net.states(c2, id), [MsgState::Relayed, MsgState::Delivered]);
    assert_eq!(net.relay.queued_count(), 0);
    assert!(net.nodes[a].store.held_size(Some("carol")).unwrap().0 == 0);
}

/// A redelivery of a stored message is acknowledged as one even when its sender's key has
/// changed since (not held again), and is never acknowledged while the store cannot write: the
/// insert that finds it out is a write (issue 9: no lookup before it).
#[test]
fn a_redelivery_is_acknowledged_after_a_key_change_and_retried_while_writes_fail() {
    let mut net = Net::new();
    let a = net.join("alice", ALICE);
    let c = net.join("carol", CAROL);
    let id = net.send(c, "alice", "before the change");
    net.transfer();
    assert_eq!(net.inbox(a), inbox_of(&[("carol", "before the change")]));
    let env = net
        .sent("carol")
        .into_iter()
        .find(|e| e.id == id)
        .expect("carol's envelope");
    let acked = |net: &Net| {
        net.acks("alice")
            .iter()
            .filter(|k| **k == msg_key(id))
            .count()
    };
    assert_eq!(acked(&net), 1);

    // While alice's store fails every write, the redelivery is left unacknowledged.
    net.nodes[a].store.fail_writes(true);
    net.inject(a, FromRelay::Deliver(Routed::Message(env.clone())));
    net.transfer();
    assert_eq!(acked(&net), 1, "not acknowledged while writes fail");
    net.nodes[a].store.fail_writes(false);
    net.inject(a, FromRelay::Deliver(Routed::Message(env.clone())));
    net.transfer();
    assert_eq!(acked(&net), 2, "acknowledged once the store writes again");

    // Carol's key changes: the same envelope again is a duplicate, not a message to hold.
    net.forget("carol");
    net.transfer();
    net.join("carol", CAROL2);
    net.transfer();
    assert_eq!(net.who(a, "carol").trust, "changed");
    net.inject(a, FromRelay::Deliver(Routed::Message(env)));
    net.transfer();
    assert_eq!(acked(&net), 3);
    assert_eq!(net.nodes[a].store.held_size(Some("carol")).unwrap().0, 0);
    assert_eq!(net.inbox(a).len(), 1);
}

#[test]
fn refused_by_the_relay_becomes_a_failed_receipt() {
    let mut net = Net::new();
    let a = net.join("alice", ALICE);
    let d = net.join("dave", DAVE);
    net.disconnect(d);
    net.transfer();
    // Alice still has dave pinned, but the relay no longer knows him.
    net.forget("dave");
    let id = net.send(a, "dave", "anyone there?");
    net.transfer();
    assert_eq!(net.states(a, id), [MsgState::Failed]);
    let why = net.nodes[a].states[0].2.clone().unwrap_or_default();
    assert!(
        why.contains("unknown_user"),
        "the waiting client is told why: {why}"
    );
    let receipts = net.receipts(a);
    assert_eq!(receipts.len(), 1);
    assert_eq!((receipts[0].0, receipts[0].1), (id, MsgState::Failed));
    let reason = receipts[0].2.clone().unwrap();
    assert!(reason.contains("unknown_user"), "{reason}");
    assert!(
        net.nodes[a].store.outbox().unwrap().is_empty(),
        "not retried"
    );
    assert_eq!(
        net.nodes[a].store.outgoing(&id).unwrap().unwrap().3,
        MsgState::Failed
    );
    // Not retried on reconnect either.
    net.reconnect(a);
    assert_eq!(net.sent("alice").len(), 1);
    assert!(
        net.nodes[a].member.connected(),
        "a refusal does not cut the link"
    );
}

#[test]
fn full_relay_queue_fails_the_message_with_a_reason() {
    let mut net = Net::with_limits(Limits {
        max_queue: 1,
        ..Limits::default()
    });
    let a = net.join("alice", ALICE);
    let b = net.join("bob", BOB);
    net.disconnect(b);
    net.transfer();
    let one = net.send(a, "bob", "fits");
    let two = net.send(a, "bob", "does not fit");
    net.transfer();
    assert_eq!(net.states(a, one), [MsgState::Relayed]);
    assert_eq!(net.states(a, two), [MsgState::Failed]);
    let reason = net.receipts(a).last().unwrap().2.clone().unwrap();
    assert!(reason.starts_with("queue_full"), "{reason}");
    net.connect(b);
    net.transfer();
    assert_eq!(net.inbox(b), inbox_of(&[("alice", "fits")]));
}

// ---- the member's own protocol checks and timers ----

fn lone(name: &str, key: usize) -> (Member, Store) {
    let store = Store::open_in_memory().unwrap();
    let m = Member::load(name.into(), identity(key), &store).unwrap();
    (m, store)
}

fn drain(m: &mut Member) -> Vec<Out> {
    std::iter::from_fn(|| m.poll()).collect()
}

#[test]
fn relay_protocol_violations_close_the_link() {
    let (mut m, mut s) = lone("alice", ALICE);
    m.link_up(Now::at(0));
    m.handle(
        FromRelay::Welcome {
            user: "alice".into(),
            peers: vec![],
        },
        Now::at(1),
        &mut s,
    );
    assert!(matches!(drain(&mut m)[..], [Out::Close]));
    assert!(!m.connected());

    m.link_up(Now::at(2));
    m.receive(b"garbage", Now::at(3), &mut s);
    assert!(matches!(drain(&mut m)[..], [Out::Close]));
    assert!(m.relay_error().unwrap().contains("malformed"));

    // A welcome for someone else.
    m.link_up(Now::at(4));
    m.handle(
        FromRelay::Challenge {
            nonce: [1; 32],
            version: "x".into(),
        },
        Now::at(5),
        &mut s,
    );
    assert!(matches!(
        drain(&mut m)[..],
        [Out::Frame(ToRelay::Login { .. })]
    ));
    m.handle(
        FromRelay::Welcome {
            user: "mallory".into(),
            peers: vec![],
        },
        Now::at(6),
        &mut s,
    );
    assert!(matches!(drain(&mut m)[..], [Out::Close]));
    assert!(!m.connected());

    // An Error frame at any point closes, and says why.
    m.link_up(Now::at(7));
    m.handle(
        FromRelay::Error {
            code: "x".into(),
            reason: "because".into(),
        },
        Now::at(8),
        &mut s,
    );
    assert!(matches!(drain(&mut m)[..], [Out::Close]));
    assert!(m.relay_error().unwrap().contains("because"));
}

#[test]
fn a_second_challenge_after_login_closes_the_link() {
    let (mut net, a, _b) = pair();
    net.inject(
        a,
        FromRelay::Challenge {
            nonce: [0; 32],
            version: "x".into(),
        },
    );
    net.transfer();
    assert_eq!(net.nodes[a].closes, 1);
    assert!(!net.nodes[a].member.connected());
}

#[test]
fn timers_ping_then_give_up_on_a_silent_relay() {
    let (mut net, a, _b) = pair();
    let t = net.now;
    let node = &mut net.nodes[a];
    let (m, st) = (&mut node.member, &mut node.store);
    m.tick(Now::at(t + 1_000), st);
    assert!(drain(m).is_empty());
    m.tick(Now::at(t + PING_AFTER_MS + 1), st);
    assert!(matches!(drain(m)[..], [Out::Frame(ToRelay::Ping)]));
    m.tick(Now::at(t + PING_AFTER_MS + 2), st);
    assert!(drain(m).is_empty(), "one ping per quiet period");
    m.tick(Now::at(t + SILENT_RELAY_MS + 1), st);
    assert!(matches!(drain(m)[..], [Out::Close]));

    // A login that never completes.
    let (mut m, mut s) = lone("bob", BOB);
    m.link_up(Now::at(0));
    m.tick(Now::at(LOGIN_TIMEOUT_MS), &mut s);
    assert!(drain(&mut m).is_empty());
    m.tick(Now::at(LOGIN_TIMEOUT_MS + 1), &mut s);
    assert!(matches!(drain(&mut m)[..], [Out::Close]));
    assert!(m.relay_error().is_some());
    // Down: no timers.
    m.link_down();
    m.tick(Now::at(u64::MAX), &mut s);
    assert!(drain(&mut m).is_empty());
}

#[test]
fn reload_forgets_the_receipt_retry_timer() {
    // Issue 7, point 8: `reload`'s doc promises that the retry timer is forgotten with the rest
    // of what the database may not hold.
    let (mut m, mut s) = lone("bob", BOB);
    let login = |m: &mut Member, s: &mut Store, t: u64| {
        m.link_up(Now::at(t));
        let challenge = FromRelay::Challenge {
            nonce: [1; 32],
            version: "x".into(),
        };
        m.handle(challenge, Now::at(t), s);
        let alice = Peer {
            user: "alice".into(),
            key: public(ALICE).der().to_vec(),
            online: true,
        };
        let welcome = FromRelay::Welcome {
            user: "bob".into(),
            peers: vec![alice],
        };
        m.handle(welcome, Now::at(t), s);
        assert!(m.connected());
        drain(m);
    };
    let refused = |key| FromRelay::Refused {
        key,
        code: "queue_full".into(),
        reason: "alice's queue is full".into(),
    };
    let receipt = Routed::Receipt(Receipt {
        id: [9; 16],
        from: "bob".into(),
        to: "alice".into(),
        session: [1; 16],
        counter: 0,
        tag: [0; 16],
    });
    s.outbox_push(receipt.key(), &to_payload(&receipt).unwrap())
        .unwrap();
    login(&mut m, &mut s, 0);

    // Control: a refused receipt is offered again when the timer fires.
    m.handle(refused(receipt.key()), Now::at(1), &mut s);
    assert!(drain(&mut m).is_empty());
    m.tick(Now::at(1 + RETRY_REFUSED_MS), &mut s);
    assert!(matches!(
        drain(&mut m)[..],
        [Out::Frame(ToRelay::Send(Routed::Receipt(_)))]
    ));

    // Armed again, then a failed commit: the reload forgets the timer (the login after it
    // offers the whole outbox anyway).
    let t = 2 + RETRY_REFUSED_MS;
    m.handle(refused(receipt.key()), Now::at(t), &mut s);
    m.reload(&s).unwrap();
    login(&mut m, &mut s, t + 1);
    m.tick(Now::at(t + RETRY_REFUSED_MS), &mut s);
    let out = drain(&mut m);
    assert!(out.is_empty(), "the timer outlived the reload: {out:?}");
}

#[test]
fn pong_keeps_the_link_alive() {
    let (mut net, a, _b) = pair();
    let t = net.now;
    let node = &mut net.nodes[a];
    node.member
        .tick(Now::at(t + PING_AFTER_MS + 1), &mut node.store);
    net.now = t + PING_AFTER_MS + 1;
    net.transfer();
    assert!(net
        .trace
        .iter()
        .any(|(w, m)| w == "alice" && matches!(m, Msg::Down(FromRelay::Pong))));
    let node = &mut net.nodes[a];
    let m = &mut node.member;
    m.tick(Now::at(t + SILENT_RELAY_MS + 1), &mut node.store);
    let out = drain(m);
    assert!(
        !out.iter().any(|o| matches!(o, Out::Close)),
        "the pong counted as a sign of life: {out:?}"
    );
}

#[test]
fn a_session_is_replaced_after_its_message_budget() {
    let (mut net, a, b) = pair();
    net.send(a, "bob", "one");
    net.transfer();
    // Skip ahead instead of sending 100,000 messages.
    net.nodes[a]
        .member
        .sending
        .skip_to("bob", SESSION_MESSAGES - 1);
    net.send(a, "bob", "last of the session");
    net.send(a, "bob", "first of the next");
    net.transfer();
    let sent = net.sent("alice");
    assert_eq!(sent.len(), 3);
    assert_eq!(sent[1].session, sent[0].session);
    assert_eq!(sent[1].counter, SESSION_MESSAGES - 1);
    assert_ne!(sent[2].session, sent[1].session);
    assert_eq!(sent[2].counter, 0);
    assert!(sent[2].key_packet.is_some());
    assert_eq!(
        net.inbox(b),
        inbox_of(&[
            ("alice", "one"),
            ("alice", "last of the session"),
            ("alice", "first of the next")
        ])
    );
}

#[test]
fn held_messages_do_not_stall_other_senders() {
    let mut net = Net::new();
    let a = net.join("alice", ALICE);
    let b = net.join("bob", BOB);
    net.join("carol", CAROL);
    net.forget("carol");
    net.transfer();
    let c2 = net.join("carol", CAROL2);
    for i in 0..crate::relay::DELIVERY_WINDOW {
        net.send(c2, "alice", &format!("held {i}"));
    }
    net.transfer();
    // A full window's worth: the first max_held_per_sender are held, the rest dropped (and
    // acknowledged, so they do not clog the window either).
    let window = crate::relay::DELIVERY_WINDOW as u64;
    let per_sender = HoldLimits::default().per_sender;
    assert!(per_sender < window);
    assert_eq!(
        net.nodes[a].store.held_size(Some("carol")).unwrap().0,
        per_sender
    );
    assert_eq!(net.relay.queued_count(), 0, "everything was acknowledged");
    net.send(b, "alice", "from bob, whose key never changed");
    net.transfer();
    assert_eq!(
        net.inbox(a),
        inbox_of(&[("bob", "from bob, whose key never changed")])
    );
}

#[test]
fn refused_receipt_is_not_lost() {
    let mut net = Net::with_limits(Limits {
        max_queue: 1,
        ..Limits::default()
    });
    let a = net.join("alice", ALICE);
    let b = net.join("bob", BOB);
    let c = net.join("carol", CAROL);
    net.disconnect(b);
    net.transfer();
    let id = net.send(a, "bob", "please confirm");
    net.transfer();
    assert_eq!(net.states(a, id), [MsgState::Relayed]);
    // Alice goes away and carol fills her one-item queue on the relay.
    net.disconnect(a);
    net.transfer();
    net.send(c, "alice", "filler");
    net.transfer();
    // Bob stores alice's message; his receipt finds alice's queue full.
    net.connect(b);
    net.transfer();
    assert_eq!(net.inbox(b), inbox_of(&[("alice", "please confirm")]));
    assert!(net.trace.iter().any(|(who, m)| who == "bob"
        && matches!(m, Msg::Down(FromRelay::Refused { code, .. }) if code == "queue_full")));
    // Alice returns and drains her queue; bob reconnects later. The receipt should get through.
    net.connect(a);
    net.transfer();
    assert_eq!(net.inbox(a), inbox_of(&[("carol", "filler")]));
    net.reconnect(b);
    assert_eq!(net.states(a, id), [MsgState::Relayed, MsgState::Delivered]);
}

#[test]
fn message_from_a_forgotten_stranger_does_not_stay_queued_forever() {
    let mut net = Net::new();
    let b = net.join("bob", BOB);
    net.disconnect(b);
    net.transfer();
    // Carol registers while bob is away, writes to him, and is then forgotten.
    let c = net.join("carol", CAROL);
    net.send(c, "bob", "from carol");
    net.transfer();
    net.forget("carol");
    net.transfer();
    net.connect(b);
    net.transfer();
    assert!(net.inbox(b).is_empty());
    assert_eq!(
        net.relay.queued_count(),
        0,
        "bob cannot ever accept it; it should not stay queued"
    );
}

#[test]
fn key_change_seen_in_the_welcome_after_being_away() {
    let mut net = Net::new();
    let a = net.join("alice", ALICE);
    net.join("carol", CAROL);
    net.disconnect(a);
    net.transfer();
    net.forget("carol");
    net.transfer();
    net.join("carol", CAROL2);
    net.connect(a);
    net.transfer();
    assert_changed_to(&mut net, a, "carol", CAROL2);
}

/// A relay that presents another key and then the pinned one again cannot erase the warning:
/// bob stays `changed` (sending refused, messages held) until `trust`, and every step is a `key`
/// record in the history.
#[test]
fn the_pinned_key_presented_again_keeps_the_warning_until_trust() {
    let (mut net, a, _b) = pair();
    let presence = |key: usize, online: bool| {
        FromRelay::Presence(Peer {
            user: "bob".into(),
            key: public(key).der().to_vec(),
            online,
        })
    };
    net.inject(a, presence(MALLORY, true));
    net.transfer();
    assert_eq!(net.who(a, "bob").trust, "changed");
    assert!(net.try_send(a, &["bob"], "x").is_err());
    net.inject(a, presence(BOB, true));
    net.transfer();
    let view = net.who(a, "bob");
    assert_eq!(view.trust, "changed", "the warning must stay");
    assert_eq!(
        view.presented,
        Some(public(MALLORY).fingerprint().to_string())
    );
    assert!(net.nodes[a].store.pins().unwrap()[0].presented.is_some());
    assert!(matches!(
        net.try_send(a, &["bob"], "x"),
        Err(MemberError::KeyChanged { .. })
    ));
    // The same flip again adds no record: only news is written.
    net.inject(a, presence(MALLORY, true));
    net.inject(a, presence(BOB, true));
    net.transfer();
    let bob = public(BOB).fingerprint().to_string();
    let mallory = public(MALLORY).fingerprint().to_string();
    let node = &mut net.nodes[a];
    let msg = node
        .member
        .trust("bob", &bob, Now::at(net.now), &mut node.store)
        .unwrap();
    assert!(msg.contains("is trusted"), "{msg}");
    assert_eq!(net.who(a, "bob").trust, "trusted");
    assert_eq!(net.who(a, "bob").presented, None);
    net.try_send(a, &["bob"], "x").unwrap();
    let keys: Vec<(String, String, Option<String>)> = net
        .history(a)
        .into_iter()
        .filter_map(|r| match r.body {
            RecordBody::Key {
                user,
                event,
                fingerprint,
                other,
            } if user == "bob" => Some((event.to_string(), fingerprint, other)),
            _ => None,
        })
        .collect();
    assert_eq!(
        keys,
        [
            ("pinned".to_string(), bob.clone(), None),
            ("changed".to_string(), mallory.clone(), Some(bob.clone())),
            ("returned".to_string(), bob.clone(), Some(mallory.clone())),
            ("trusted".to_string(), bob.clone(), None),
        ]
    );
}

/// Trusting the key the relay presents while the relay shows the old pinned key again leaves the
/// peer `changed`, now with the old key as the warning: what the relay shows is never trusted
/// without the user.
#[test]
fn trusting_the_new_key_while_the_old_one_is_shown_stays_changed() {
    let (mut net, a, _b) = pair();
    let presence = |key: usize| {
        FromRelay::Presence(Peer {
            user: "bob".into(),
            key: public(key).der().to_vec(),
            online: true,
        })
    };
    net.inject(a, presence(MALLORY));
    net.inject(a, presence(BOB));
    net.transfer();
    let mallory = public(MALLORY).fingerprint().to_string();
    let node = &mut net.nodes[a];
    let msg = node
        .member
        .trust("bob", &mallory, Now::at(net.now), &mut node.store)
        .unwrap();
    assert!(msg.contains("stays `changed`"), "{msg}");
    let view = net.who(a, "bob");
    assert_eq!(view.trust, "changed");
    assert_eq!(view.fingerprint, mallory);
    assert_eq!(view.presented, Some(public(BOB).fingerprint().to_string()));
}

#[test]
fn unusable_directory_entries_are_ignored() {
    let (mut net, a, _b) = pair();
    for (user, key) in [
        ("zed", b"not a key".to_vec()),
        ("Not-Valid", public(MALLORY).der().to_vec()),
        ("alice", public(MALLORY).der().to_vec()),
    ] {
        net.inject(
            a,
            FromRelay::Presence(Peer {
                user: user.into(),
                key,
                online: true,
            }),
        );
    }
    net.transfer();
    let names: Vec<String> = net.nodes[a]
        .member
        .who()
        .into_iter()
        .map(|p| p.user)
        .collect();
    assert_eq!(names, ["bob"]);
    assert!(net.nodes[a].member.connected());
}

/// `next_deadline` names exactly the instant at which `tick` acts: the daemon sleeps until it,
/// so a deadline that is late stalls a timer and one that is early spins the loop.
#[test]
fn next_deadline_is_when_tick_acts() {
    let (mut m, mut s) = lone("bob", BOB);
    assert_eq!(m.next_deadline(), None, "no link, no timers");
    m.link_up(Now::at(100));
    let login = m.next_deadline().unwrap();
    assert_eq!(login, 100 + LOGIN_TIMEOUT_MS + 1);
    m.tick(Now::at(login - 1), &mut s);
    assert!(drain(&mut m).is_empty());
    m.tick(Now::at(login), &mut s);
    assert!(matches!(drain(&mut m)[..], [Out::Close]));
    m.link_down();
    assert_eq!(m.next_deadline(), None);

    // Established: the keepalive comes first, then (if nothing is heard) the silence timer.
    let (mut net, a, _b) = pair();
    let t = net.now;
    let node = &mut net.nodes[a];
    let (m, st) = (&mut node.member, &mut node.store);
    let ping = m.next_deadline().unwrap();
    assert!(ping > t && ping <= t + PING_AFTER_MS + 1, "{ping} vs {t}");
    m.tick(Now::at(ping - 1), st);
    assert!(drain(m).is_empty());
    m.tick(Now::at(ping), st);
    assert!(matches!(drain(m)[..], [Out::Frame(ToRelay::Ping)]));
    let silent = m.next_deadline().unwrap();
    assert!(silent > ping, "the next timer is later: {silent} vs {ping}");
}

/// `send --all` reaches at most `max_fanout` peers: with more online it fails, naming both
/// numbers, and nothing is sealed, stored or sent; at the limit it goes to all of them.
#[test]
fn send_all_above_max_fanout_sends_nothing() {
    let mut net = Net::new();
    let a = net.join("alice", ALICE);
    let b = net.join("bob", BOB);
    let c = net.join("carol", CAROL);
    net.transfer();
    let before = net.history(a).len();
    let node = &mut net.nodes[a];
    node.member.set_max_fanout(1);
    let err = node
        .member
        .send(&[], true, "to everyone", Now::at(net.now), &mut node.store)
        .unwrap_err();
    assert!(
        matches!(err, MemberError::FanoutTooLarge { online: 2, max: 1 }),
        "{err:?}"
    );
    assert!(err.to_string().contains("max_fanout"), "{err}");
    assert!(node.member.poll().is_none(), "nothing to send");
    net.transfer();
    assert_eq!(net.history(a).len(), before, "nothing stored");
    assert!(net.inbox(b).is_empty() && net.inbox(c).is_empty());
    let node = &mut net.nodes[a];
    node.member.set_max_fanout(2);
    let sent = node
        .member
        .send(&[], true, "to everyone", Now::at(net.now), &mut node.store)
        .unwrap();
    assert_eq!(sent.len(), 2);
}

fn links(net: &Net, n: usize) -> Vec<RecordBody> {
    net.history(n)
        .into_iter()
        .map(|r| r.body)
        .filter(|b| matches!(b, RecordBody::Link { .. }))
        .collect()
}

/// Logging in writes one `Link` record naming the peers online then; an established link going
/// down writes one with the daemon's reason at the next tick, which is due at once (`link_down`
/// has no store); a connection that never logged in writes none, so a relay that stays away
/// does not fill the history with a record per retry.
#[test]
fn link_records_say_who_is_online_when_up_and_why_when_down() {
    let mut net = Net::new();
    let a = net.join("alice", ALICE);
    let b = net.join("bob", BOB);
    let up = |online: &[&str]| RecordBody::Link {
        up: true,
        reason: None,
        online: online.iter().map(|s| s.to_string()).collect(),
        peers_online: online.len() as u64,
    };
    assert_eq!(links(&net, a), [up(&[])]);
    assert_eq!(links(&net, b), [up(&["alice"])]);

    let now = Now::at(net.now);
    let node = &mut net.nodes[a];
    node.member.link_down();
    node.member
        .set_relay_error("relay stopped answering".into());
    assert_eq!(
        node.member.next_deadline(),
        Some(0),
        "the record is due now"
    );
    node.member.tick(now, &mut node.store);
    let recorded: Vec<Out> = std::iter::from_fn(|| node.member.poll()).collect();
    assert!(
        recorded.iter().any(
            |o| matches!(o, Out::Record(r) if matches!(&r.body, RecordBody::Link { up: false, .. }))
        ),
        "tail -f followers hear of it: {recorded:?}"
    );
    assert_eq!(node.member.next_deadline(), None, "written once");
    // Down again without having logged in: nothing new.
    node.member.link_up(now);
    node.member.link_down();
    assert_eq!(node.member.next_deadline(), None);
    node.member.tick(now, &mut node.store);
    let down = RecordBody::Link {
        up: false,
        reason: Some("relay stopped answering".into()),
        online: vec![],
        peers_online: 0,
    };
    assert_eq!(links(&net, a), [up(&[]), down]);
    // About no peer: `tail --with` leaves it out.
    let with_bob = net.nodes[a].store.records(0, Some("bob"), None).unwrap();
    assert!(with_bob
        .iter()
        .all(|r| !matches!(r.body, RecordBody::Link { .. })));
}

/// A relay that stops being a room at its second name: members learn keys only by `Lookup`.
fn large_net() -> Net {
    Net::with_limits(Limits {
        directory_push_max: 1,
        ..Limits::default()
    })
}

#[test]
fn keys_on_demand_pin_a_new_recipient_and_a_new_sender() {
    let mut net = large_net();
    let a = net.join("alice", ALICE);
    let b = net.join("bob", BOB);
    assert!(net.nodes[a].member.who().is_empty(), "no directory pushed");
    // Alice's first send to bob asks the relay; the answer pins bob (TOFU) and the send goes.
    assert!(matches!(
        net.try_send(a, &["bob"], "x"),
        Err(MemberError::KeysPending(u)) if u == ["bob"]
    ));
    assert_eq!(net.nodes[a].store.outbox_messages().unwrap(), 0);
    net.transfer();
    assert_eq!(
        net.nodes[a].member.pinned("bob"),
        Some(public(BOB).fingerprint())
    );
    let view = net.who(a, "bob");
    assert!(view.online);
    assert_eq!(view.trust, "pinned");
    net.send(a, "bob", "hello bob");
    net.transfer();
    // Bob had no key for alice: he held the message, looked her up, pinned her, opened it.
    assert_eq!(net.inbox(b), inbox_of(&[("alice", "hello bob")]));
    assert_eq!(
        net.nodes[b].member.pinned("alice"),
        Some(public(ALICE).fingerprint())
    );
    assert!(net.trace.iter().any(|(who, m)| who == "bob"
        && matches!(m, Msg::Up(ToRelay::Lookup(n)) if n == &["alice".to_string()])));
}

#[test]
fn a_key_change_is_caught_at_login_and_by_presence_on_a_large_relay() {
    let mut net = large_net();
    let a = net.join("alice", ALICE);
    net.join("carol", CAROL);
    let _ = net.try_send(a, &["carol"], "x");
    net.transfer();
    assert_eq!(
        net.nodes[a].member.pinned("carol"),
        Some(public(CAROL).fingerprint())
    );
    // Carol returns with a new key while alice is online: alice follows her, so hears it.
    net.forget("carol");
    net.transfer();
    net.join("carol", CAROL2);
    assert_changed_to(&mut net, a, "carol", CAROL2);
    // And after a restart, the login's lookup of every contact finds it again.
    net.restart(a);
    net.connect(a);
    net.transfer();
    assert_eq!(net.who(a, "carol").trust, "changed");
}

#[test]
fn a_relay_cannot_push_pins_the_member_did_not_ask_for() {
    let mut net = large_net();
    let a = net.join("alice", ALICE);
    net.join("bob", BOB);
    let bob = Peer {
        user: "bob".into(),
        key: public(BOB).der().to_vec(),
        online: true,
    };
    let node = &mut net.nodes[a];
    node.member.handle(
        FromRelay::Keys {
            peers: vec![bob],
            unknown: vec![],
        },
        Now::at(net.now),
        &mut node.store,
    );
    assert!(
        node.member.who().is_empty(),
        "an answer to no question pins nothing"
    );
}

#[test]
fn a_login_keeps_at_most_two_contact_lookups_unanswered() {
    let mut net = large_net();
    let a = net.add("alice", ALICE);
    {
        let store = &mut net.nodes[a].store;
        store.begin().unwrap();
        for i in 0..1500 {
            store
                .put_pin(&crate::store::Pin {
                    user: format!("c{i:04}"),
                    key: public(BOB).der().to_vec(),
                    trust: crate::store::PinTrust::Pinned,
                    presented: None,
                })
                .unwrap();
        }
        store.commit().unwrap();
        let node = &mut net.nodes[a];
        node.member = Member::load("alice".into(), identity(ALICE), &node.store).unwrap();
    }
    net.connect(a);
    net.transfer();
    let (mut asked, mut most, mut names) = (0i64, 0i64, 0usize);
    for (who, m) in &net.trace {
        if who != "alice" {
            continue;
        }
        match m {
            Msg::Up(ToRelay::Lookup(n)) => {
                asked += 1;
                names += n.len();
                most = most.max(asked);
            }
            Msg::Down(FromRelay::Keys { .. }) => asked -= 1,
            _ => {}
        }
    }
    assert_eq!(names, 1500, "every contact looked up once");
    assert_eq!(asked, 0, "every lookup answered");
    assert!(
        most <= 2,
        "at most two lookups unanswered at once, saw {most}"
    );
}

#[test]
fn a_directory_page_that_does_not_move_forward_ends_the_listing() {
    let mut net = large_net();
    let a = net.join("alice", ALICE);
    let t = Now::at(net.now);
    let node = &mut net.nodes[a];
    node.member.list(9, "bob", "", t).unwrap();
    drain(&mut node.member);
    let bob = Peer {
        user: "bob".into(),
        key: public(BOB).der().to_vec(),
        online: true,
    };
    node.member.handle(
        FromRelay::Listing {
            peers: vec![bob],
            more: true,
        },
        t,
        &mut node.store,
    );
    let out = drain(&mut node.member);
    assert!(
        matches!(&out[..], [Out::Listed { req: 9, page: Err(why) }] if why.contains("out of order")),
        "{out:?}"
    );
}

/// The held bounds count per sender and in total, in messages and in bytes; what passes one is
/// dropped (and acknowledged), what can never be opened is refused before any bound is looked at.
#[test]
fn held_bounds_per_sender_and_in_total() {
    let (mut net, a, _b) = pair();
    net.nodes[a].member.set_hold_limits(HoldLimits {
        per_sender: 2,
        per_sender_bytes: 10_000,
        total: 3,
        total_bytes: 1 << 20,
    });
    let junk = |from: &str, n: u8, size: usize| {
        FromRelay::Deliver(Routed::Message(Envelope {
            id: [n; 16],
            from: from.into(),
            to: "alice".into(),
            time_ms: 0,
            session: [n; 16],
            counter: 0,
            key_packet: None,
            ciphertext: vec![0; size],
        }))
    };
    let held = |net: &Net, who: Option<&str>| net.nodes[a].store.held_size(who).unwrap().0;
    for n in 1..=3 {
        net.inject(a, junk("zed", n, 10));
    }
    net.transfer();
    assert_eq!(held(&net, Some("zed")), 2, "per sender, in messages");
    net.inject(a, junk("yan", 4, 20_000));
    net.transfer();
    assert_eq!(held(&net, Some("yan")), 0, "per sender, in bytes");
    net.inject(a, junk("yan", 5, 10));
    net.inject(a, junk("xi", 6, 10));
    net.transfer();
    assert_eq!(held(&net, None), 3, "in total, in messages");
    assert_eq!(held(&net, Some("xi")), 0);
    // Never held: from ourselves, from an invalid name, longer than any text.
    net.nodes[a].member.set_hold_limits(HoldLimits::default());
    net.inject(a, junk("alice", 7, 10));
    net.inject(a, junk("Bad-Name", 8, 10));
    net.inject(a, junk("wu", 9, MAX_TEXT + 17));
    net.transfer();
    assert_eq!(held(&net, None), 3);
    assert_eq!(net.relay.queued_count(), 0);
}

/// A send that needs more new sessions than a turn makes is checked at once, sealed over the
/// next ticks, and queued all at once; until then nothing is stored or sent.
#[test]
fn a_wide_send_is_sealed_over_several_ticks() {
    let mut net = Net::new();
    let a = net.join("alice", ALICE);
    let many = super::send::SESSIONS_PER_TURN + 4;
    // One peer key for all: the RSA work per new session is the same.
    for i in 0..many {
        net.inject(
            a,
            FromRelay::Presence(Peer {
                user: format!("p{i}"),
                key: public(BOB).der().to_vec(),
                online: true,
            }),
        );
    }
    net.transfer();
    let before = net.history(a).len();
    let node = &mut net.nodes[a];
    let now = Now::at(net.now);
    let started = node
        .member
        .send_or_start(&[], true, "to all", now, &mut node.store)
        .unwrap();
    let Started::Sealing(job) = started else {
        panic!("expected a job, got {started:?}");
    };
    assert_eq!(node.member.next_deadline(), Some(0), "come back at once");
    assert_eq!(net.history(a).len(), before, "nothing stored yet");
    let node = &mut net.nodes[a];
    node.member.tick(now, &mut node.store);
    assert!(
        node.member.poll().is_none(),
        "one slice is not the whole job"
    );
    node.member.tick(now, &mut node.store);
    let mut sealed = None;
    while let Some(o) = node.member.poll() {
        if let Out::Sealed(id, r) = o {
            sealed = Some((id, r));
        }
    }
    let (id, result) = sealed.expect("the job is sealed after two slices");
    assert_eq!(id, job);
    assert_eq!(result.unwrap().len(), many);
    assert_eq!(net.history(a).len(), before + many);
}

/// `user` is `changed` at node `a`, presenting test key `key`, and a send to them is refused.
fn assert_changed_to(net: &mut Net, a: usize, user: &str, key: usize) {
    let view = net.who(a, user);
    assert_eq!(view.trust, "changed");
    assert_eq!(view.presented, Some(public(key).fingerprint().to_string()));
    assert!(matches!(
        net.try_send(a, &[user], "x"),
        Err(MemberError::KeyChanged { .. })
    ));
}
