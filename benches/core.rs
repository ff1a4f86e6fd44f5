//! Throughput of the per-message path through the real cores and real SQLite files, without
//! sockets: alice seals, the relay stores and routes, bob opens, stores and sends a receipt, alice
//! records `relayed` and `delivered`. Writes are group-committed per batch, as the daemon commits
//! per event-loop turn. Run: `cargo bench --bench core` (add `-- 20000` for more messages).
//!
//! What it shows: after the first message of a session (one RSA wrap and signature, one unwrap),
//! a message costs symmetric crypto and SQLite only; the RSA operations per run are printed.

use std::collections::VecDeque;
use std::time::Instant;

use chatd::crypto::Identity;
use chatd::member::{Member, Out as MOut};
use chatd::proto::relay::{FromRelay, ToRelay};
use chatd::relay::{Limits, Out as ROut, Relay};
use chatd::store::Store;

const ALICE: u64 = 1;
const BOB: u64 = 2;

struct Node {
    member: Member,
    store: Store,
    conn: u64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let total: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5_000);
    let batch = 64;
    let dir = tempfile::tempdir()?;
    let mut rng = rand::thread_rng();
    let mut rstore = Store::open(&dir.path().join("relay.db"))?;
    let mut relay = Relay::load(&rstore, Limits::default())?;
    let mut nodes = Vec::new();
    for (name, conn) in [("alice", ALICE), ("bob", BOB)] {
        let store = Store::open(&dir.path().join(format!("{name}.db")))?;
        let id = Identity::generate(&mut rng, 2048)?;
        let member = Member::load(name.into(), id, &store)?;
        nodes.push(Node {
            member,
            store,
            conn,
        });
    }
    let mut now = 1_000_000u64;
    for n in nodes.iter_mut() {
        relay.connect(n.conn, now);
        n.member.link_up(now);
    }
    let mut delivered = 0usize;
    let pump = |relay: &mut Relay,
                rstore: &mut Store,
                nodes: &mut Vec<Node>,
                now: u64,
                delivered: &mut usize| {
        loop {
            let mut moved = false;
            let mut down: VecDeque<(u64, FromRelay)> = VecDeque::new();
            while let Some(o) = relay.poll() {
                if let ROut::Send(c, m) = o {
                    down.push_back((c, m));
                }
            }
            for (c, m) in down {
                moved = true;
                if let Some(n) = nodes.iter_mut().find(|n| n.conn == c) {
                    n.member.handle(m, now, &mut n.store);
                }
            }
            let mut up: Vec<(u64, ToRelay)> = Vec::new();
            for n in nodes.iter_mut() {
                while let Some(o) = n.member.poll() {
                    match o {
                        MOut::Frame(f) => up.push((n.conn, f)),
                        MOut::State(_, chatd::proto::control::MsgState::Delivered, _) => {
                            *delivered += 1
                        }
                        _ => {}
                    }
                }
            }
            for (c, f) in up {
                moved = true;
                relay.handle(c, f, now, rstore);
            }
            if !moved {
                break;
            }
        }
    };
    pump(&mut relay, &mut rstore, &mut nodes, now, &mut delivered);
    let text = "x".repeat(200);
    let start = Instant::now();
    let mut sent = 0;
    while sent < total {
        now += 1;
        rstore.begin()?;
        for n in nodes.iter_mut() {
            n.store.begin()?;
        }
        for _ in 0..batch.min(total - sent) {
            let a = &mut nodes[0];
            a.member
                .send(&["bob".to_string()], false, &text, now, &mut a.store)?;
            sent += 1;
        }
        pump(&mut relay, &mut rstore, &mut nodes, now, &mut delivered);
        rstore.commit()?;
        for n in nodes.iter_mut() {
            n.store.commit()?;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{sent} messages of {} bytes, batches of {batch}: {:.0} messages/s end to end \
         (seal, relay store+route, open, store, receipt), {delivered} delivered",
        text.len(),
        sent as f64 / secs
    );
    println!("RSA private-key operations on the message path: 1 key-packet signature and 1 unwrap per session (one session here)");
    if delivered != sent {
        return Err(format!("only {delivered} of {sent} delivered").into());
    }
    Ok(())
}
