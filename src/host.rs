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
    use crate::proto::control::Record;
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
            self.seen.push((i, format!("{out:?}")));
        }
    }

    /// Log in, talk both ways, let the keepalive and a relink happen; return everything that
    /// could differ between runs: what the members announced and both histories.
    fn run(seed: u64) -> (Vec<(usize, String)>, Vec<Vec<Record>>) {
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
        let mut w = World {
            relay,
            rstore,
            nodes,
            seen: Vec::new(),
        };
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
