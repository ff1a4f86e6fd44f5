//! Control requests against real cores and real SQLite files, without a `Poll`: alice is a host
//! (relay plus member, as `Roles::Host`), bob a second member on his own in-memory link to the
//! same relay, and `host::pump` moves the frames.

use crate::clock::Now;
use crate::relay::ConnId;
use std::sync::OnceLock;
use std::time::Instant;

use super::*;
use crate::crypto::Identity;
use crate::host::{self, Cores, Link, CLOSED_BY_RELAY};
use crate::member::{self, Member};
use crate::proto::control::RecordBody;
use crate::relay::{Limits, Relay};

const T0: u64 = 1_000_000;
const CLIENT: Token = Token(20);

fn identity(i: usize) -> Identity {
    static PEMS: [OnceLock<String>; 2] = [const { OnceLock::new() }; 2];
    let pem = PEMS[i].get_or_init(|| {
        let id = Identity::generate(&mut rand::thread_rng(), 2048).expect("key generation");
        id.to_pem().expect("pem").as_str().to_owned()
    });
    Identity::from_pem(pem).expect("stored pem parses")
}

struct Net {
    _dir: tempfile::TempDir,
    roles: Roles,
    store: Store,
    info: Info,
    bob: Member,
    bob_link: Link,
    bob_store: Store,
    /// Alice's state changes, in order.
    states: Vec<([u8; 16], MsgState, Option<String>)>,
    now: Now,
}

impl Cores for Net {
    fn relay(&mut self) -> (&mut Relay, &mut Store) {
        match &mut self.roles {
            Roles::Host { relay, .. } => (relay, &mut self.store),
            _ => unreachable!("the test net is a host"),
        }
    }
    fn members(&self) -> usize {
        2
    }
    fn member(&mut self, i: usize) -> (&mut Link, &mut Member, &mut Store) {
        match (&mut self.roles, i) {
            (Roles::Host { member, link, .. }, 0) => (link, member, &mut self.store),
            _ => (&mut self.bob_link, &mut self.bob, &mut self.bob_store),
        }
    }
    fn member_out(&mut self, i: usize, out: member::Out) {
        if let (0, member::Out::State(id, st, why)) = (i, out) {
            self.states.push((id, st, why));
        }
    }
}

impl Net {
    /// Alice's host with bob attached and logged in.
    fn new() -> Net {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("alice.db")).expect("alice store");
        let bob_store = Store::open(&dir.path().join("bob.db")).expect("bob store");
        let relay = Relay::load(&store, Limits::default()).expect("relay");
        let member = Member::load("alice".into(), identity(0), &store).expect("alice");
        let bob = Member::load("bob".into(), identity(1), &bob_store).expect("bob");
        let info = Info {
            fingerprint: identity(0).public().fingerprint(),
            listen: Some("127.0.0.1:1".parse().expect("addr")),
            started: Instant::now(),
            state_dir: dir.path().to_path_buf(),
        };
        let mut net = Net {
            _dir: dir,
            roles: Roles::Host {
                relay,
                member,
                link: Link::new(ConnId(1)),
            },
            store,
            info,
            bob,
            bob_link: Link::new(ConnId(2)),
            bob_store,
            states: Vec::new(),
            now: Now::at(T0),
        };
        net.attach_all();
        net
    }

    fn attach_all(&mut self) {
        let now = self.now;
        if let Roles::Host {
            relay,
            member,
            link,
        } = &mut self.roles
        {
            link.attach(relay, member, now);
            self.bob_link.attach(relay, &mut self.bob, now);
        }
        self.pump();
    }

    fn pump(&mut self) {
        let now = self.now;
        host::pump(self, now);
        // A committed turn: what the relay held in memory is written, then answered.
        let (relay, store) = self.relay();
        relay.sync(now.mono, store, true);
        host::pump(self, now);
    }

    fn request(&mut self, req: CtlRequest) -> Reply {
        request(&mut self.roles, &mut self.store, &self.info, req, self.now)
    }

    fn alice(&self) -> &Member {
        self.roles.member().expect("alice")
    }
}

fn send(to: &str, wait: Wait, timeout_ms: u64) -> CtlRequest {
    CtlRequest::Send {
        to: vec![to.into()],
        all: false,
        text: "hi".into(),
        wait,
        timeout_ms,
    }
}

fn tail(last: Option<u64>, with: Option<&str>, follow: bool) -> CtlRequest {
    CtlRequest::Tail {
        last,
        since: None,
        with: with.map(str::to_string),
        follow,
        kinds: Vec::new(),
    }
}

fn error_of(r: Reply) -> (ErrorKind, String) {
    match r {
        Reply::Now(CtlResponse::Error { kind, message, .. }) => (kind, message),
        other => panic!("expected an error reply, got {other:?}"),
    }
}

fn relay_only() -> (tempfile::TempDir, Roles, Store, Info) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("relay.db")).expect("store");
    let relay = Relay::load(&store, Limits::default()).expect("relay");
    let info = Info {
        fingerprint: identity(0).public().fingerprint(),
        listen: None,
        started: Instant::now(),
        state_dir: dir.path().to_path_buf(),
    };
    (dir, Roles::Relay(relay), store, info)
}

#[test]
fn a_relay_refuses_member_requests() {
    let (_dir, mut roles, mut store, info) = relay_only();
    let mut ask = |req| request(&mut roles, &mut store, &info, req, Now::at(T0));
    let (kind, msg) = error_of(ask(send("bob", Wait::None, 0)));
    assert_eq!(kind, ErrorKind::Failed);
    assert_eq!(
        msg,
        "this chatd is a relay only; start it with --user NAME to send messages"
    );
    let (_, msg) = error_of(ask(tail(None, None, false)));
    assert!(msg.contains("keeps no message history"), "{msg}");
    let (_, msg) = error_of(ask(CtlRequest::Forget {
        user: "nobody".into(),
    }));
    assert_eq!(msg, "no user named nobody is registered on this relay");
    let (_, msg) = error_of(ask(CtlRequest::Forget {
        user: "Bad Name".into(),
    }));
    assert!(msg.starts_with("invalid user name"), "{msg}");
}

#[test]
fn send_to_an_unknown_user_fails_and_sends_nothing() {
    let mut net = Net::new();
    // Keys on demand: carol has no pin, so the send waits for the relay's answer.
    assert!(matches!(
        net.request(send("carol", Wait::None, 0)),
        Reply::Park(_)
    ));
    net.pump();
    // The relay has no carol: asked again, the send fails.
    let (kind, msg) = error_of(net.request(send("carol", Wait::None, 0)));
    assert_eq!(kind, ErrorKind::Failed);
    assert!(msg.contains("carol"), "{msg}");
    assert_eq!(net.store.outbox_messages().expect("outbox"), 0);
}

#[test]
fn send_without_wait_answers_at_once() {
    let mut net = Net::new();
    match net.request(send("bob", Wait::None, 0)) {
        Reply::Now(CtlResponse::Sent(sent)) => {
            assert_eq!(sent.len(), 1);
            assert_eq!(sent[0].to, "bob");
            assert_eq!(sent[0].state, MsgState::Queued);
        }
        other => panic!("{other:?}"),
    }
}

/// Feed alice's state changes to the waiters, as the loop does.
fn advance(net: &mut Net, waiters: &mut Waiters) -> Vec<(Token, CtlResponse)> {
    let mut replies = Vec::new();
    for (id, st, why) in std::mem::take(&mut net.states) {
        replies.extend(waiters.advance(id, st, why.as_deref()));
    }
    replies
}

#[test]
fn send_wait_delivered_answers_when_the_receipt_comes() {
    let mut net = Net::new();
    let Reply::Wait(pending) = net.request(send("bob", Wait::Delivered, 5_000)) else {
        panic!("a --wait send waits");
    };
    let mut waiters = Waiters::default();
    waiters.add(CLIENT, pending);
    assert!(
        advance(&mut net, &mut waiters).is_empty(),
        "nothing moved yet"
    );
    net.pump();
    let replies = advance(&mut net, &mut waiters);
    match &replies[..] {
        [(CLIENT, CtlResponse::Sent(sent))] => {
            assert_eq!(sent[0].state, MsgState::Delivered)
        }
        other => panic!("{other:?}"),
    }
    assert!(
        waiters.expire(Now::at(T0 + 10_000)).is_empty(),
        "answered once"
    );
}

#[test]
fn send_wait_times_out_while_the_recipient_is_away() {
    let mut net = Net::new();
    let now = net.now;
    if let Roles::Host { relay, .. } = &mut net.roles {
        net.bob_link.close(relay, &mut net.bob, now);
    }
    net.pump();
    let Reply::Wait(pending) = net.request(send("bob", Wait::Delivered, 2_000)) else {
        panic!("a --wait send waits");
    };
    let mut waiters = Waiters::default();
    waiters.add(CLIENT, pending);
    net.pump();
    assert!(advance(&mut net, &mut waiters).is_empty(), "relayed only");
    assert!(waiters.expire(Now::at(T0 + 1_999)).is_empty());
    match &waiters.expire(Now::at(T0 + 2_000))[..] {
        [(
            CLIENT,
            CtlResponse::Error {
                kind: ErrorKind::Timeout,
                message,
                sent,
            },
        )] => {
            assert!(message.starts_with("timed out after 2 s waiting for delivered"));
            assert_eq!(sent[0].state, MsgState::Relayed);
            // Only what chatd knows: the relay has it, nothing promises delivery.
            assert!(
                message.contains("cannot tell whether it will be delivered"),
                "{message}"
            );
            assert!(!message.contains("will still be delivered"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_failed_turn_drops_only_its_own_waiters() {
    let mut net = Net::new();
    let mut waiters = Waiters::default();
    let Reply::Wait(old) = net.request(send("bob", Wait::Delivered, 9_000)) else {
        panic!("waits");
    };
    waiters.add(Token(21), old);
    waiters.begin_turn();
    let Reply::Wait(new) = net.request(send("bob", Wait::Delivered, 1_000)) else {
        panic!("waits");
    };
    waiters.add(CLIENT, new);
    waiters.fail_turn();
    let expired: Vec<Token> = waiters
        .expire(Now::at(u64::MAX))
        .into_iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(expired, [Token(21)]);
}

/// A client that reads `room` records between pages.
struct Client {
    got: Vec<CtlResponse>,
    unread: usize,
    room: usize,
}

impl Sink for Client {
    fn room(&self) -> bool {
        self.unread < self.room
    }
    fn emit(&mut self, resp: &CtlResponse) {
        self.unread += 1;
        self.got.push(resp.clone());
    }
}

fn seqs(got: &[CtlResponse]) -> Vec<u64> {
    got.iter()
        .filter_map(|r| match r {
            CtlResponse::Record(r) => Some(r.seq),
            _ => None,
        })
        .collect()
}

fn presence(net: &mut Net, n: usize) {
    for i in 0..n {
        let user = if i % 2 == 0 { "bob" } else { "carol" };
        let body = RecordBody::Presence {
            user: user.into(),
            online: i % 4 < 2,
        };
        net.store.append(T0, user, body).expect("append");
    }
}

#[test]
fn tail_pages_history_as_the_client_reads() {
    let mut net = Net::new();
    let before = net.store.last_seq().expect("last seq");
    presence(&mut net, 150);
    let Reply::Tail(mut cur) = net.request(tail(None, None, false)) else {
        panic!("a tail gets a cursor");
    };
    let mut client = Client {
        got: Vec::new(),
        unread: 0,
        room: 10,
    };
    let mut pages = 0;
    loop {
        pages += 1;
        match cur.page(&net.store, &mut client) {
            Paged::More => client.unread = 0,
            Paged::Done => break,
            Paged::Follow(f) => panic!("not a follower: {f:?}"),
        }
        assert!(pages < 100, "the tail never ends");
    }
    assert_eq!(client.got.last(), Some(&CtlResponse::End));
    let got = seqs(&client.got);
    let want: Vec<u64> = (1..=before + 150).collect();
    assert_eq!(got, want, "every record once, in order");
    assert!(pages >= 15, "paged by what the client read: {pages}");
}

#[test]
fn tail_last_with_and_follow() {
    let mut net = Net::new();
    presence(&mut net, 20);
    let last = net.store.last_seq().expect("last seq");
    let Reply::Tail(mut cur) = net.request(tail(Some(3), Some("carol"), true)) else {
        panic!("a tail gets a cursor");
    };
    let mut client = Client {
        got: Vec::new(),
        unread: 0,
        room: usize::MAX,
    };
    let Paged::Follow(mut follow) = cur.page(&net.store, &mut client) else {
        panic!("a -f tail follows after its history");
    };
    assert_eq!(seqs(&client.got), [last - 4, last - 2, last]);
    let bob = net
        .store
        .append(
            T0,
            "bob",
            RecordBody::Presence {
                user: "bob".into(),
                online: true,
            },
        )
        .expect("append");
    let carol = net
        .store
        .append(
            T0,
            "carol",
            RecordBody::Presence {
                user: "carol".into(),
                online: true,
            },
        )
        .expect("append");
    assert!(!follow.take(&bob), "not the peer it follows");
    assert!(follow.take(&carol));
    assert!(!follow.take(&carol), "nothing twice");
}

#[test]
fn tail_refuses_a_bad_name() {
    let mut net = Net::new();
    let (_, msg) = error_of(net.request(tail(None, Some("No Such"), false)));
    assert_eq!(msg, "invalid user name \"No Such\"");
}

#[test]
fn one_status_for_chatctl_and_systemd() {
    let mut net = Net::new();
    let Reply::Now(CtlResponse::Status(view)) = net.request(CtlRequest::Status) else {
        panic!("status");
    };
    assert_eq!(view.roles, ["relay", "member"]);
    assert_eq!(view.user.as_deref(), Some("alice"));
    assert!(view.connected);
    assert_eq!(view.relay_error, None);
    assert_eq!(view.peers_online, 1);
    assert_eq!(view.listen.as_deref(), Some("127.0.0.1:1"));
    assert_eq!(
        Status::of(&net.roles, &net.info).line(),
        "relay listening on 127.0.0.1:1, 2 members online; \
         member alice: attached to the local relay, 1 peer online"
    );
}

#[test]
fn forgetting_the_hosts_own_member_closes_and_relinks_the_local_link() {
    let mut net = Net::new();
    let Reply::Now(CtlResponse::Done(msg)) = net.request(CtlRequest::Forget {
        user: "alice".into(),
    }) else {
        panic!("forget alice");
    };
    assert!(msg.starts_with("forgot alice"), "{msg}");
    net.pump();
    assert!(!net.alice().connected());
    assert_eq!(net.alice().relay_error(), Some(CLOSED_BY_RELAY));
    let line = Status::of(&net.roles, &net.info).line();
    assert!(
        line.ends_with("member alice: not connected: relay refused: relay closed the local link"),
        "{line}"
    );
    let Roles::Host {
        relay,
        member,
        link,
    } = &mut net.roles
    else {
        unreachable!()
    };
    assert_eq!(link.relink_at(), Some(T0 + host::RELINK_MS));
    link.tick(relay, member, Now::at(T0 + host::RELINK_MS - 1));
    assert!(!link.is_up());
    link.tick(relay, member, Now::at(T0 + host::RELINK_MS));
    assert!(link.is_up());
    net.now = Now::at(T0 + host::RELINK_MS);
    net.pump();
    assert!(net.alice().connected(), "alice claims her name again");
}

/// `who` streams: a directory longer than one chunk comes as `Peers` frames of
/// `WHO_FRAME_ENTRIES` entries (at most the protocol's `WHO_CHUNK`), in name order across them, then `End`, and every frame encodes under the
/// frame cap whatever the directory's size.
#[test]
fn who_streams_in_chunks_then_end() {
    let (_dir, _, mut store, info) = relay_only();
    let key = identity(0).public().der().to_vec();
    store.begin().unwrap();
    for i in 0..1300 {
        store.bind(&format!("u{i:05}"), &key).unwrap();
    }
    store.commit().unwrap();
    let mut roles = Roles::Relay(Relay::load(&store, Limits::default()).unwrap());
    let frames = relay_list(&mut roles, &mut store, &info);
    let sizes: Vec<usize> = frames
        .iter()
        .map(|f| match f {
            CtlResponse::Peers(p) => p.len(),
            CtlResponse::End => 0,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    let mut want = vec![WHO_FRAME_ENTRIES; 1300 / WHO_FRAME_ENTRIES];
    want.push(1300 % WHO_FRAME_ENTRIES);
    want.push(0);
    assert_eq!(sizes, want);
    assert_eq!(frames.last(), Some(&CtlResponse::End));
    let names: Vec<String> = frames
        .iter()
        .flat_map(|f| match f {
            CtlResponse::Peers(p) => p.iter().map(|v| v.user.clone()).collect(),
            _ => Vec::new(),
        })
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    for f in &frames {
        let mut buf = Vec::new();
        crate::proto::encode_frame(f, &mut buf).expect("each frame fits the cap");
    }

    // Nothing known: just `End`.
    let (_dir, mut roles, mut store, info) = relay_only();
    assert_eq!(
        relay_list(&mut roles, &mut store, &info),
        [CtlResponse::End]
    );
}

/// `who` on a relay, paged to the end as the loop pages it.
fn relay_list(roles: &mut Roles, store: &mut Store, info: &Info) -> Vec<CtlResponse> {
    let Reply::List(mut list) = request(roles, store, info, CtlRequest::Who, Now::at(T0)) else {
        panic!("who on a relay must page");
    };
    let relay = roles.relay().expect("relay");
    let mut frames = Vec::new();
    while !relay_page(relay, &mut list, &mut frames) {}
    frames
}

/// A send to a name with no pin waits for the relay's lookup answer at most
/// `LOOKUP_TIMEOUT_MS`, then fails with nothing stored; and it is tried again only once the
/// member heard back.
#[test]
fn a_send_parked_on_a_lookup_fails_when_the_relay_does_not_answer() {
    let mut net = Net::new();
    let Reply::Park(parked) = net.request(send("carol", Wait::None, 0)) else {
        panic!("a send to a name with no pin waits for the lookup");
    };
    let mut waiters = Waiters::default();
    waiters.park(CLIENT, parked);
    assert!(waiters.take_parked().is_none(), "nothing heard back yet");
    assert_eq!(waiters.next_deadline(), Some(T0 + LOOKUP_TIMEOUT_MS));
    assert!(waiters
        .expire(Now::at(T0 + LOOKUP_TIMEOUT_MS - 1))
        .is_empty());
    let replies = waiters.expire(Now::at(T0 + LOOKUP_TIMEOUT_MS));
    match &replies[..] {
        [(CLIENT, CtlResponse::Error { kind, message, .. })] => {
            assert_eq!(*kind, ErrorKind::Failed);
            assert!(
                message.contains("carol") && message.contains("nothing was sent"),
                "{message}"
            );
        }
        other => panic!("expected one failure, got {other:?}"),
    }
    assert_eq!(waiters.next_deadline(), None);
    assert_eq!(net.store.outbox_messages().expect("outbox"), 0);

    // Heard back: the parked request comes out once, to be asked again.
    let Reply::Park(parked) = net.request(send("dave", Wait::None, 0)) else {
        panic!("dave has no pin either");
    };
    waiters.park(CLIENT, parked);
    waiters.looked();
    let again = waiters.take_parked().expect("heard back");
    assert!(
        matches!(&again[..], [(CLIENT, CtlRequest::Send { to, .. }, _)] if to == &["dave".to_string()])
    );
    assert!(waiters.take_parked().is_none());
}
