//! The in-memory link between a relay core and member cores in one process: a host's own member,
//! the bench, the fuzz targets and core tests all wire their cores together through it, so they
//! all close alike.
//!
//! Owns: moving frames both ways without the codec (relay `Out::Send` to `Member::handle`,
//! member `Out::Frame` to `Relay::handle`) until both sides are quiet, and the one meaning of a
//! close. Whichever side closes (the relay's `Out::Close`, the member's `Out::Close`, or the
//! caller's [`Link::close`]), the member gets `link_down`, the relay gets `disconnect`, and the
//! link attaches again [`RELINK_MS`] later, on [`Link::tick`]. Frames a member produces while its
//! link is down are lost, as they would be on a dead socket.
//!
//! Must never: touch a socket or read a clock (time is passed in), make up protocol frames, or
//! own a core or a store (the caller does: a host shares one database between its two cores).

use crate::clock::Now;
use log::warn;

use crate::member::{self, Member};
use crate::proto::from_payload;
use crate::proto::relay::{FromRelay, Routed, ToRelay};
use crate::relay::{self, ConnId, Relay};
use crate::store::Store;

/// How long a closed link waits before it attaches again. Long enough that a relay that keeps
/// refusing the member is not spun on; short enough that a user hardly notices.
pub const RELINK_MS: u64 = 1000;

/// What the member shows as its relay error after the relay closed the link. These are the words
/// a host has always shown (`chatctl status`, `STATUS=`), kept so users see no change.
pub const CLOSED_BY_RELAY: &str = "relay refused: relay closed the local link";

enum State {
    /// Both cores think the link is open.
    Up,
    /// Closed (or never attached); attach again at `relink_at`, if set.
    Down { relink_at: Option<u64> },
}

/// One member's in-memory connection to the relay, known to the relay as [`Link::id`].
pub struct Link {
    id: ConnId,
    state: State,
}

impl Link {
    /// A link the relay will know as connection `id`; down until [`Link::attach`].
    pub fn new(id: ConnId) -> Link {
        Link {
            id,
            state: State::Down { relink_at: None },
        }
    }

    /// The relay's connection id for this link.
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// Both cores see the link open.
    pub fn is_up(&self) -> bool {
        matches!(self.state, State::Up)
    }

    /// When a closed link attaches again, if it will.
    pub fn relink_at(&self) -> Option<u64> {
        match self.state {
            State::Up => None,
            State::Down { relink_at } => relink_at,
        }
    }

    /// Open the link: the relay sends its challenge, the member expects it.
    pub fn attach(&mut self, relay: &mut Relay, member: &mut Member, now: Now) {
        relay.connect(self.id, now.mono);
        member.link_up(now);
        self.state = State::Up;
    }

    /// Close the link from outside (e.g. the cores were rebuilt after a failed commit); it
    /// attaches again [`RELINK_MS`] from `now`.
    pub fn close(&mut self, relay: &mut Relay, member: &mut Member, now: Now) {
        self.down(now);
        member.link_down();
        relay.disconnect(self.id);
    }

    /// Attach again if a close asked for it and the time has come.
    pub fn tick(&mut self, relay: &mut Relay, member: &mut Member, now: Now) {
        if self.relink_at().is_some_and(|t| now.mono >= t) {
            self.attach(relay, member, now);
        }
    }

    fn down(&mut self, now: Now) {
        self.state = State::Down {
            relink_at: Some(now.mono + RELINK_MS),
        };
    }
}

/// The cores a [`pump`] moves frames between, and where their other output goes. A host
/// returns the same store for both sides.
pub trait Cores {
    /// The relay and the store it writes to.
    fn relay(&mut self) -> (&mut Relay, &mut Store);
    /// How many members are linked to the relay.
    fn members(&self) -> usize;
    /// Member `i`, its link and the store it writes to.
    fn member(&mut self, i: usize) -> (&mut Link, &mut Member, &mut Store);
    /// Relay output for a connection that is no link here (a TCP peer of a host).
    fn relay_out(&mut self, out: relay::Out) {
        let _ = out;
    }
    /// Member `i`'s records and state changes (frames and closes are the link's business).
    fn member_out(&mut self, i: usize, out: member::Out) {
        let _ = (i, out);
    }
}

/// Move frames between the relay and the linked members until neither side has anything more
/// to say. All of one side's output is moved before the other side runs, as the daemon always
/// has: a member hears a whole burst from the relay before its answers go back.
pub fn pump<C: Cores + ?Sized>(c: &mut C, now: Now) {
    let ids: Vec<ConnId> = (0..c.members()).map(|i| c.member(i).0.id()).collect();
    loop {
        let mut progressed = false;
        // `None` stands for the relay's close, in its place among the frames.
        let mut down: Vec<Vec<Option<FromRelay>>> = vec![Vec::new(); ids.len()];
        let mut foreign = Vec::new();
        {
            let (relay, _) = c.relay();
            while let Some(out) = relay.poll() {
                progressed = true;
                let id = match &out {
                    relay::Out::Send(id, _)
                    | relay::Out::AfterCommit(id, _)
                    | relay::Out::Deliver(id, _)
                    | relay::Out::Close(id) => *id,
                };
                let Some(i) = ids.iter().position(|l| *l == id) else {
                    foreign.push(out);
                    continue;
                };
                // A linked member writes in the relay's transaction (a host shares its store;
                // a harness commits both together), so what waits for the commit need not wait
                // for it here; and it takes messages, not bytes.
                down[i].push(match out {
                    relay::Out::Send(_, m) | relay::Out::AfterCommit(_, m) => Some(m),
                    relay::Out::Deliver(_, bytes) => match from_payload::<Routed>(&bytes) {
                        Ok(item) => Some(FromRelay::Deliver(item)),
                        Err(e) => {
                            warn!("dropped an undecodable delivery on the host link: {e}");
                            continue;
                        }
                    },
                    relay::Out::Close(_) => None,
                });
            }
        }
        for out in foreign {
            c.relay_out(out);
        }
        for (i, msgs) in down.into_iter().enumerate() {
            if msgs.is_empty() {
                continue;
            }
            let (link, member, store) = c.member(i);
            if !link.is_up() {
                continue;
            }
            let mut closed = false;
            for msg in msgs {
                match msg {
                    Some(msg) => member.handle(msg, now, store),
                    None => {
                        warn!(
                            "the relay closed the local link; attaching again in {} s",
                            RELINK_MS / 1000
                        );
                        member.set_relay_error(CLOSED_BY_RELAY.into());
                        closed = true;
                    }
                }
            }
            if closed {
                link.down(now);
                member.link_down();
                c.relay().0.disconnect(ids[i]);
            }
        }
        for (i, id) in ids.iter().enumerate() {
            let mut up: Vec<ToRelay> = Vec::new();
            let mut close = false;
            let mut other = Vec::new();
            let (link, member, _) = c.member(i);
            while let Some(out) = member.poll() {
                progressed = true;
                match out {
                    member::Out::Frame(f) => up.push(f),
                    member::Out::Close => close = true,
                    out => other.push(out),
                }
            }
            let live = link.is_up();
            let close = close && live;
            if close {
                link.down(now);
                member.link_down();
            }
            for out in other {
                c.member_out(i, out);
            }
            if !live {
                continue;
            }
            let (relay, store) = c.relay();
            for f in up {
                relay.handle(*id, f, now.mono, store);
            }
            if close {
                relay.disconnect(*id);
            }
        }
        if !progressed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    //! The whole system in memory and in virtual time: a relay, two members on host links, every
    //! random choice seeded. Run twice, it must come out the same to the byte, so a failing core
    //! test can be replayed exactly.

    use std::sync::OnceLock;

    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;
    use crate::clock::Now;
    use crate::crypto::Identity;
    use crate::proto::control::{MsgState, Record};
    use crate::relay::Limits;

    /// Two identities, generated once per process from a fixed seed.
    fn identity(i: usize) -> Identity {
        static PEMS: [OnceLock<String>; 2] = [const { OnceLock::new() }; 2];
        let pem = PEMS[i].get_or_init(|| {
            let mut rng = StdRng::seed_from_u64(100 + i as u64);
            let id = Identity::generate(&mut rng, 2048).expect("key generation");
            id.to_pem().expect("pem").as_str().to_owned()
        });
        Identity::from_pem(pem).expect("stored pem parses")
    }

    struct Node {
        link: Link,
        member: Member,
        store: Store,
    }

    struct World {
        relay: Relay,
        rstore: Store,
        nodes: Vec<Node>,
        /// Every record and state change the members announced, in order.
        seen: Vec<(usize, String)>,
        /// Messages of alice's that became `Delivered`.
        delivered: usize,
    }

    impl Cores for World {
        fn relay(&mut self) -> (&mut Relay, &mut Store) {
            (&mut self.relay, &mut self.rstore)
        }
        fn members(&self) -> usize {
            self.nodes.len()
        }
        fn member(&mut self, i: usize) -> (&mut Link, &mut Member, &mut Store) {
            let n = &mut self.nodes[i];
            (&mut n.link, &mut n.member, &mut n.store)
        }
        fn member_out(&mut self, i: usize, out: member::Out) {
            if let (0, member::Out::State(_, MsgState::Delivered, _)) = (i, &out) {
                self.delivered += 1;
            }
            self.seen.push((i, format!("{out:?}")));
        }
    }

    impl World {
        /// A relay, alice and bob, every random choice seeded from `seed`; nobody logged in.
        fn new(seed: u64) -> World {
            let rstore = Store::open_in_memory().unwrap();
            let mut relay = Relay::load(&rstore, Limits::default()).unwrap();
            relay.seed_rng(seed);
            let mut nodes = Vec::new();
            for (i, name) in ["alice", "bob"].into_iter().enumerate() {
                let store = Store::open_in_memory().unwrap();
                let mut member = Member::load(name.into(), identity(i), &store).unwrap();
                member.seed_rng(seed + 1 + i as u64);
                nodes.push(Node {
                    link: Link::new(ConnId(1 + i as u64)),
                    member,
                    store,
                });
            }
            World {
                relay,
                rstore,
                nodes,
                seen: Vec::new(),
                delivered: 0,
            }
        }

        /// One event-loop turn of every daemon: `f` acts, everything moves until quiet, the
        /// relay writes everything it still holds only in memory (the stricter form a shutdown
        /// or a batching harness uses; a daemon's turn writes only what is due), and every store
        /// commits.
        fn turn(&mut self, now: Now, f: impl FnOnce(&mut World)) {
            self.rstore.begin().unwrap();
            for n in self.nodes.iter_mut() {
                n.store.begin().unwrap();
            }
            f(self);
            pump(self, now);
            self.relay.sync(now.mono, &mut self.rstore, true);
            pump(self, now);
            self.rstore.commit().unwrap();
            for n in self.nodes.iter_mut() {
                n.store.commit().unwrap();
            }
        }
    }

    /// Log in, talk both ways, let the keepalive and a relink happen; return everything that
    /// could differ between runs: what the members announced and both histories.
    fn run(seed: u64) -> (Vec<(usize, String)>, Vec<Vec<Record>>) {
        let mut w = World::new(seed);
        let mut now = Now::at(1_000_000);
        for n in w.nodes.iter_mut() {
            n.link.attach(&mut w.relay, &mut n.member, now);
        }
        pump(&mut w, now);
        assert!(
            w.nodes.iter().all(|n| n.member.connected()),
            "both logged in"
        );

        let bob = ["bob".to_string()];
        let alice = ["alice".to_string()];
        for (k, text) in ["hello bob", "second"].into_iter().enumerate() {
            now = now.plus(10);
            let a = &mut w.nodes[0];
            a.member.send(&bob, false, text, now, &mut a.store).unwrap();
            pump(&mut w, now);
            now = now.plus(10);
            let b = &mut w.nodes[1];
            let reply = format!("reply {k}");
            b.member
                .send(&alice, false, &reply, now, &mut b.store)
                .unwrap();
            pump(&mut w, now);
        }
        // Virtual time: the members' keepalives fall due, and the relay sees them.
        let due = w
            .nodes
            .iter()
            .filter_map(|n| n.member.next_deadline())
            .min()
            .unwrap();
        now = Now::at(due);
        for n in w.nodes.iter_mut() {
            n.member.tick(now, &mut n.store);
        }
        pump(&mut w, now);
        // Bob's link breaks and comes back after RELINK_MS; a message waits for him meanwhile.
        {
            let b = &mut w.nodes[1];
            b.link.close(&mut w.relay, &mut b.member, now);
        }
        let a = &mut w.nodes[0];
        a.member
            .send(&bob, false, "while you were away", now, &mut a.store)
            .unwrap();
        pump(&mut w, now);
        now = now.plus(RELINK_MS);
        let b = &mut w.nodes[1];
        b.link.tick(&mut w.relay, &mut b.member, now);
        pump(&mut w, now);

        let histories = w
            .nodes
            .iter()
            .map(|n| n.store.records(0, None, None).unwrap())
            .collect();
        (w.seen, histories)
    }

    thread_local! {
        /// The statements each store of `statements_of_a_turn` ran: relay, alice, bob.
        static RAN: std::cell::RefCell<[Vec<String>; 3]> = Default::default();
    }

    fn ran(i: usize, e: rusqlite::trace::TraceEvent<'_>) {
        if let rusqlite::trace::TraceEvent::Stmt(_, sql) = e {
            // One line per statement, so a failure lists them readably.
            let sql = sql.split_whitespace().collect::<Vec<_>>().join(" ");
            RAN.with(|r| r.borrow_mut()[i].push(sql));
        }
    }

    /// Every statement the stores run while alice sends `texts` in one turn, on a session
    /// already open both ways (its RSA work and key rows are behind it), until each is
    /// delivered and alice holds the receipt, or, with bob away, until the relay has queued
    /// them: `[relay, alice, bob]`.
    fn statements_of_a_turn(texts: &[&str], bob_online: bool) -> [Vec<String>; 3] {
        let mut w = World::new(7);
        let mut now = Now::at(1_000_000);
        w.turn(now, |w| {
            for n in w.nodes.iter_mut() {
                n.link.attach(&mut w.relay, &mut n.member, now);
            }
        });
        now = now.plus(10);
        w.turn(now, |w| {
            let a = &mut w.nodes[0];
            a.member
                .send(&["bob".into()], false, "first", now, &mut a.store)
                .unwrap();
        });
        assert_eq!(w.delivered, 1, "the session is open both ways");
        if !bob_online {
            w.turn(now, |w| {
                let b = &mut w.nodes[1];
                b.link.close(&mut w.relay, &mut b.member, now);
            });
        }
        w.rstore.trace_statements(|e| ran(0, e));
        w.nodes[0].store.trace_statements(|e| ran(1, e));
        w.nodes[1].store.trace_statements(|e| ran(2, e));
        RAN.with(|r| *r.borrow_mut() = Default::default());
        now = now.plus(10);
        w.turn(now, |w| {
            let a = &mut w.nodes[0];
            for text in texts {
                a.member
                    .send(&["bob".into()], false, text, now, &mut a.store)
                    .unwrap();
            }
        });
        let delivered = if bob_online { texts.len() } else { 0 };
        assert_eq!(w.delivered, 1 + delivered, "delivered in the turn");
        RAN.with(|r| std::mem::take(&mut *r.borrow_mut()))
    }

    /// What one more message in a turn costs a store: each statement of `more` beyond those of
    /// `fewer` (which sent `extra` fewer messages), by the first statement of `shapes` it
    /// starts with, per message; what matches none is listed under `"unexpected: ..."`.
    fn per_message(
        fewer: &[String],
        more: &[String],
        extra: usize,
        shapes: &[&'static str],
    ) -> std::collections::BTreeMap<String, usize> {
        let mut count = std::collections::BTreeMap::<String, i64>::new();
        for (ran, sign) in [(more, 1), (fewer, -1)] {
            for sql in ran {
                let shape = shapes.iter().find(|p| sql.starts_with(**p));
                let key = shape.map_or_else(|| format!("unexpected: {sql}"), |p| p.to_string());
                *count.entry(key).or_default() += sign;
            }
        }
        count
            .into_iter()
            .filter(|(_, n)| *n != 0)
            .map(|(k, n)| {
                let whole = usize::try_from(n).ok().filter(|n| n % extra == 0);
                match whole {
                    Some(n) => (k, n / extra),
                    // Fewer with more messages, or not the same for each: list it as such.
                    None => (format!("{k} (changed by {n} for {extra} messages)"), 0),
                }
            })
            .collect()
    }

    /// Issue 9 point 3, and point 2 at the relay: a message's path writes each thing once and
    /// reads back nothing it wrote. A store that read a message's bytes or text back to send
    /// them, a relay that wrote (and deleted) what its recipient acknowledged in the same
    /// turn, or a statement more per message, fails here with the statements listed.
    #[test]
    fn a_turn_of_messages_reads_back_nothing_it_wrote_and_the_relay_writes_nothing() {
        let one = statements_of_a_turn(&["a"], true);
        let three = statements_of_a_turn(&["a", "b", "c"], true);
        let [relay, alice, bob] = &three;
        assert!(relay.is_empty(), "the relay ran {relay:#?}");
        for (who, ran) in [("alice", alice), ("bob", bob)] {
            let read_back: Vec<_> = ran
                .iter()
                .filter(|s| {
                    let s = s.to_ascii_lowercase();
                    s.contains("returning")
                        || ((s.starts_with("select") || s.starts_with("with"))
                            && (s.contains("item") || s.contains("body") || s.contains("text")))
                })
                .collect();
            assert!(read_back.is_empty(), "{who} read back {read_back:#?}");
        }
        // Alice stores it (the row, whose insert is the check that its id is free, and its
        // history record; no lookup before sealing), marks it relayed
        // (the row's recipient read, then the row updated by rowid) and delivered (the receipt
        // checked against its row, then that row updated by rowid), with a record each. Bob stores it
        // with its receipt (the insert is the check that it is new; no lookup before it), adds
        // its record, and clears the receipt when the relay takes it. (An `UPDATE ... RETURNING` for the relayed step would be one
        // statement fewer, but SQLite buffers its rows in a temporary table: 80% more
        // instructions.)
        let alice_shapes = [
            "INSERT OR IGNORE INTO messages",
            "INSERT INTO history",
            "SELECT rowid, peer, state = 'queued' FROM messages",
            "UPDATE messages SET unsent = NULL, state = CASE",
            "SELECT peer, session, counter, state, rowid FROM messages",
            "UPDATE messages SET state = ?2",
        ];
        // The receipt's update goes to the row its check found, not through the id again.
        assert!(
            alice
                .iter()
                .filter(|s| s.starts_with("UPDATE messages SET state = ?2"))
                .all(|s| s.ends_with("WHERE rowid = ?3 AND id = ?1")),
            "alice's state updates: {alice:#?}"
        );
        let want = |shapes: &[&str], times: &[usize]| {
            shapes
                .iter()
                .map(|s| s.to_string())
                .zip(times.iter().copied())
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        assert_eq!(
            per_message(&one[1], alice, 2, &alice_shapes),
            want(&alice_shapes, &[1, 3, 1, 1, 1, 1]),
            "alice's statements per message; she ran {alice:#?}"
        );
        let bob_shapes = [
            "INSERT OR IGNORE INTO messages",
            "INSERT INTO history",
            "UPDATE messages SET unsent = NULL, item = NULL",
        ];
        assert_eq!(
            per_message(&one[2], bob, 2, &bob_shapes),
            want(&bob_shapes, &[1, 1, 1]),
            "bob's statements per message; he ran {bob:#?}"
        );
        // The relay's trace is live: with bob away, the same turn is written to his queue.
        let away = statements_of_a_turn(&["a"], false);
        assert!(
            away[0]
                .iter()
                .any(|s| s.starts_with("INSERT OR IGNORE INTO queue")),
            "with bob away the relay ran {:#?}",
            away[0]
        );
    }

    #[test]
    fn a_seeded_run_in_virtual_time_repeats_exactly() {
        let first = run(42);
        let texts: Vec<String> = first.1[1]
            .iter()
            .filter_map(|r| match &r.body {
                crate::proto::control::RecordBody::Message { text, .. } => Some(text.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(
            texts,
            [
                "hello bob",
                "reply 0",
                "second",
                "reply 1",
                "while you were away"
            ],
            "bob's history holds the whole conversation"
        );
        assert_eq!(first, run(42), "the same seed and clock give the same run");
        assert_ne!(
            first.0,
            run(43).0,
            "the seed does reach the cores (ids differ)"
        );
    }
}
