//! Throughput of the per-message path through the real cores and real SQLite files, without
//! sockets: alice seals, the relay stores and routes, bob opens, stores and sends a receipt, alice
//! records `relayed` and `delivered`. Writes are group-committed per batch, as the daemon commits
//! per event-loop turn. Run: `cargo bench --bench core` (add `-- 20000` for more messages per
//! run, `-- --runs 9` for more runs, `-- --batch 256` for more messages per commit: 64 is the
//! figure the target is set against, 256 the longest burst `chatctl send --wait none`
//! pipelines). Each run starts from new databases and keys; each run's figure is printed, then
//! the median, which is the figure to quote.
//!
//! What it shows: after the first message of a session (one RSA wrap and signature, one unwrap),
//! a message costs symmetric crypto and SQLite only; the RSA operations per run are printed.

use std::time::Instant;

use chatd::clock::Now;
use chatd::crypto::Identity;
use chatd::host::{self, Cores, Link};
use chatd::member::{self, Member};
use chatd::proto::control::MsgState;
use chatd::relay::{ConnId, Limits, Relay};
use chatd::store::Store;

const ALICE: u64 = 1;
const BOB: u64 = 2;

struct Node {
    member: Member,
    store: Store,
    link: Link,
}

/// The relay and both members, wired by `host::pump`.
struct Net {
    relay: Relay,
    rstore: Store,
    nodes: Vec<Node>,
    delivered: usize,
}

impl Cores for Net {
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
    fn member_out(&mut self, _: usize, out: member::Out) {
        if let member::Out::State(_, MsgState::Delivered, _) = out {
            self.delivered += 1;
        }
    }
}

/// The count that follows `flag`: a whole number above 0.
fn count(value: Option<String>, flag: &str) -> Result<usize, String> {
    value
        .and_then(|n| n.parse().ok())
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{flag} needs a count above 0"))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut total = 5_000;
    let mut runs = 5;
    let mut batch = 64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = count(args.next(), "--runs")?,
            "--batch" => batch = count(args.next(), "--batch")?,
            // `cargo bench` passes `--bench` to every harness-less bench.
            "--bench" => {}
            n => total = n.parse().map_err(|_| format!("not a message count: {n}"))?,
        }
    }
    let mut rates = Vec::new();
    for run in 1..=runs {
        print!("run {run} of {runs}: ");
        rates.push(one_run(total, batch)?);
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "median over {runs} runs: {:.0} messages/s (target 30,000)",
        rates[rates.len() / 2]
    );
    println!("RSA private-key operations on the message path: 1 key-packet signature and 1 unwrap per session (one session per run)");
    Ok(())
}

/// One run from new databases and keys: messages per second over `total` messages.
fn one_run(total: usize, batch: usize) -> Result<f64, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let mut rng = rand::thread_rng();
    let rstore = Store::open(&dir.path().join("relay.db"))?;
    let relay = Relay::load(&rstore, Limits::default())?;
    let mut nodes = Vec::new();
    for (name, conn) in [("alice", ALICE), ("bob", BOB)] {
        let store = Store::open(&dir.path().join(format!("{name}.db")))?;
        let id = Identity::generate(&mut rng, 2048)?;
        let member = Member::load(name.into(), id, &store)?;
        nodes.push(Node {
            member,
            store,
            link: Link::new(ConnId(conn)),
        });
    }
    let mut net = Net {
        relay,
        rstore,
        nodes,
        delivered: 0,
    };
    let mut now = Now::at(1_000_000);
    for n in net.nodes.iter_mut() {
        n.link.attach(&mut net.relay, &mut n.member, now);
    }
    host::pump(&mut net, now);
    let text = "x".repeat(200);
    let start = Instant::now();
    let mut sent = 0;
    while sent < total {
        now = now.plus(1);
        net.rstore.begin()?;
        for n in net.nodes.iter_mut() {
            n.store.begin()?;
        }
        for _ in 0..batch.min(total - sent) {
            let a = &mut net.nodes[0];
            a.member
                .send(&["bob".to_string()], false, &text, now, &mut a.store)?;
            sent += 1;
        }
        host::pump(&mut net, now);
        // The batch's commit: anything the relay still holds only in memory is written first
        // (with bob acknowledging within the pump, normally nothing).
        net.relay.sync(now.mono, &mut net.rstore, true);
        host::pump(&mut net, now);
        net.rstore.commit()?;
        for n in net.nodes.iter_mut() {
            n.store.commit()?;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{sent} messages of {} bytes, batches of {batch}: {:.0} messages/s end to end \
         (seal, relay store+route, open, store, receipt), {delivered} delivered",
        text.len(),
        sent as f64 / secs,
        delivered = net.delivered
    );
    if net.delivered != sent {
        return Err(format!("only {} of {sent} delivered", net.delivered).into());
    }
    Ok(sent as f64 / secs)
}
