//! Load (issue 3, point 9): 200 members on one relay exchange messages for 30 s; afterwards
//! nothing is lost and nothing is duplicated, and the throughput and the relay's peak memory are
//! measured and printed.
//!
//! Long (on a 2-core machine about one minute with `--release`, under two minutes in the dev
//! profile; most of it is starting 200 daemons and their key generation), so `#[ignore]`d. Run it
//! with either of:
//!
//! ```text
//! cargo test --release --test load -- --ignored --nocapture
//! cargo nextest run --run-ignored ignored-only --test load --no-capture
//! ```
//!
//! What it does: one relay and 200 real `chatd` members (`--key-bits 2048`), started in parallel
//! batches. Test threads talk to the members' control sockets with the library client
//! (`chatd::client::Client`, the same requests `chatctl send` makes, without a process per
//! message). Each member sends, at a steady rate (`LOAD_RATE` messages per member per second,
//! default 1), to a random other member; a message counts as acknowledged when `send` answered
//! `queued`. After 30 s (`LOAD_SECS`) of sending, the test waits until every acknowledged message
//! is in its recipient's history, then checks every recipient's whole history: each acknowledged
//! message exactly once, nothing that was not sent, and per sender in send order.
//!
//! Printed: members' start-up time, messages acknowledged and the send rate, delivered messages
//! per second (acknowledged messages over the time from the first send to the last delivery),
//! how long the backlog took to drain, and the peak RSS (`VmHWM`) of the relay and of the largest
//! member.

mod common;

use chatd::client::Client;
use chatd::proto::control::{CtlRequest, CtlResponse, Dir, MsgState, RecordBody, Wait};
use common::*;
use rand::Rng;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const MEMBERS: usize = 200;
/// Daemons started at once.
const BATCH: usize = 25;
/// Threads driving the members' control sockets.
const THREADS: usize = 8;

fn name(i: usize) -> String {
    format!("m{i:03}")
}

fn env_f64(key: &str, default: f64) -> f64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One acknowledged message.
#[derive(Clone, Debug)]
struct Acked {
    from: usize,
    to: usize,
    /// Per-sender counter, increasing in send order.
    k: u64,
    text: String,
}

/// The incoming messages of `socket`'s history with a seq above `since`: `(seq, from, text)`.
fn incoming_since(socket: &PathBuf, since: u64) -> Vec<(u64, String, String)> {
    let mut c = Client::connect(socket).unwrap_or_else(|e| panic!("connect {socket:?}: {e}"));
    c.send(&CtlRequest::Tail {
        last: None,
        since: Some(since),
        with: None,
        follow: false,
        kinds: vec![chatd::proto::control::RecordKind::Message],
    })
    .expect("send tail");
    let mut out = Vec::new();
    loop {
        match c.recv().expect("tail reply") {
            CtlResponse::Record(r) => {
                if let RecordBody::Message {
                    from,
                    dir: Dir::In,
                    text,
                    ..
                } = r.body
                {
                    out.push((r.seq, from, text));
                } else {
                    out.push((r.seq, String::new(), String::new()));
                }
            }
            CtlResponse::End => return out,
            other => panic!("unexpected tail reply {other:?}"),
        }
    }
}

/// `status` over the library client.
fn status(socket: &PathBuf) -> chatd::proto::control::StatusView {
    let mut c = Client::connect(socket).unwrap_or_else(|e| panic!("connect {socket:?}: {e}"));
    match c.request(&CtlRequest::Status).expect("status") {
        CtlResponse::Status(s) => s,
        other => panic!("unexpected status reply {other:?}"),
    }
}

#[test]
#[ignore = "long: 200 daemons for 30 s; run with --ignored (see the file's doc comment)"]
fn two_hundred_members_for_thirty_seconds_lose_and_duplicate_nothing() {
    let secs = env_f64("LOAD_SECS", 30.0);
    let rate = env_f64("LOAD_RATE", 1.0);
    let nofile = raise_nofile();
    let mem_available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    println!(
        "load: {MEMBERS} members, {secs} s at {rate} msg/s per member; open-file limit {nofile}; \
         {} MiB of memory available",
        mem_available / 1024
    );
    assert!(
        nofile >= (2 * MEMBERS + 100) as libc::rlim_t,
        "need an open-file limit of at least {} (ulimit -n), have {nofile}",
        2 * MEMBERS + 100
    );

    let t0 = Instant::now();
    let relay = Daemon::relay();
    let addr = relay.addr();
    let mut members: Vec<Daemon> = Vec::with_capacity(MEMBERS);
    for batch in (0..MEMBERS).collect::<Vec<_>>().chunks(BATCH) {
        let start = members.len();
        for &i in batch {
            let user = name(i);
            members.push(Daemon::spawn(
                &user,
                Role::Member,
                &["--user", &user, "--connect", &addr],
            ));
        }
        for d in &mut members[start..] {
            d.wait_ready();
            d.wait_connected();
        }
    }
    let sockets: Vec<PathBuf> = members.iter().map(Daemon::socket).collect();
    // Everyone knows everyone (peers online as seen by each member) before the clock starts.
    wait_until(
        Duration::from_secs(60),
        "every member to see the 199 others online",
        || {
            sockets
                .iter()
                .all(|s| status(s).peers_online as usize == MEMBERS - 1)
        },
    );
    let startup = t0.elapsed();
    println!("load: relay and {MEMBERS} members up and introduced in {startup:.1?}");

    // Sending.
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_guard = StopOnDrop(Arc::clone(&stop));
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let t_send = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let duration = Duration::from_secs_f64(secs);
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let mine: Vec<usize> = (0..MEMBERS).filter(|i| i % THREADS == t).collect();
            let sockets = sockets.clone();
            let (acked, errors, stop) =
                (Arc::clone(&acked), Arc::clone(&errors), Arc::clone(&stop));
            thread::spawn(move || {
                let mut rng = rand::thread_rng();
                let mut clients: Vec<Client> = mine
                    .iter()
                    .map(|&i| Client::connect(&sockets[i]).expect("connect a member"))
                    .collect();
                let mut counters = vec![0u64; mine.len()];
                let start = Instant::now();
                let mut round = 0u32;
                while start.elapsed() < duration && !stop.load(Ordering::SeqCst) {
                    for (j, &from) in mine.iter().enumerate() {
                        let mut to = rng.gen_range(0..MEMBERS - 1);
                        if to >= from {
                            to += 1;
                        }
                        let k = counters[j];
                        counters[j] += 1;
                        let text = format!("{}>{}#{k:06}", name(from), name(to));
                        let req = CtlRequest::Send {
                            to: vec![name(to)],
                            all: false,
                            text: text.clone(),
                            wait: Wait::None,
                            timeout_ms: 30_000,
                        };
                        match clients[j].request(&req) {
                            Ok(CtlResponse::Sent(list))
                                if list.len() == 1 && list[0].state == MsgState::Queued =>
                            {
                                acked
                                    .lock()
                                    .expect("acked")
                                    .push(Acked { from, to, k, text });
                            }
                            other => errors.lock().expect("errors").push(format!(
                                "{} -> {}: {other:?}",
                                name(from),
                                name(to)
                            )),
                        }
                    }
                    round += 1;
                    // Pace the rounds (rate limiting, not synchronisation).
                    let next = interval * round;
                    if let Some(wait) = next.checked_sub(start.elapsed()) {
                        thread::sleep(wait);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("sender thread");
    }
    let send_time = t_send.elapsed();
    let acked = std::mem::take(&mut *acked.lock().expect("acked"));
    let errors = std::mem::take(&mut *errors.lock().expect("errors"));
    assert!(
        errors.is_empty(),
        "{} sends failed, e.g. {:?}",
        errors.len(),
        &errors[..errors.len().min(10)]
    );
    println!(
        "load: {} messages acknowledged in {send_time:.1?} ({:.0}/s offered and accepted)",
        acked.len(),
        acked.len() as f64 / send_time.as_secs_f64()
    );
    assert!(!acked.is_empty(), "nothing was sent");

    // Expected, per recipient.
    let mut expect: Vec<HashMap<String, &Acked>> = vec![HashMap::new(); MEMBERS];
    for a in &acked {
        expect[a.to].insert(a.text.clone(), a);
    }
    // Delivery: read each member's history incrementally until everything acknowledged is there.
    let mut got: Vec<Vec<(u64, String, String)>> = vec![Vec::new(); MEMBERS];
    let mut since = vec![0u64; MEMBERS];
    let mut last_report = Instant::now();
    let mut read = |got: &mut Vec<Vec<(u64, String, String)>>| {
        for i in 0..MEMBERS {
            let new = incoming_since(&sockets[i], since[i]);
            if let Some(last) = new.last() {
                since[i] = last.0;
            }
            got[i].extend(new.into_iter().filter(|(_, f, _)| !f.is_empty()));
        }
    };
    let t_drain = Instant::now();
    wait_until(
        Duration::from_secs(120),
        "every acknowledged message to reach its recipient",
        || {
            read(&mut got);
            let missing: usize = (0..MEMBERS)
                .map(|i| {
                    let have: std::collections::HashSet<&str> =
                        got[i].iter().map(|(_, _, t)| t.as_str()).collect();
                    expect[i]
                        .keys()
                        .filter(|t| !have.contains(t.as_str()))
                        .count()
                })
                .sum();
            if last_report.elapsed() >= Duration::from_secs(5) {
                println!("load: {missing} acknowledged messages not delivered yet");
                last_report = Instant::now();
            }
            missing == 0
        },
    );
    let delivered_at = t_send.elapsed();
    let drain = t_drain.elapsed();
    // Nothing left in flight: every outbox empty, then one last read for late duplicates.
    wait_until(Duration::from_secs(60), "every outbox to drain", || {
        sockets.iter().all(|s| status(s).outbox_pending == 0)
    });
    read(&mut got);

    // The verdict.
    let mut problems = Vec::new();
    let mut delivered = 0usize;
    for i in 0..MEMBERS {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        let mut last_k: HashMap<usize, u64> = HashMap::new();
        for (_, from, text) in &got[i] {
            *counts.entry(text.as_str()).or_insert(0) += 1;
            match expect[i].get(text) {
                None => problems.push(format!("{}: unexpected {text:?} from {from}", name(i))),
                Some(a) => {
                    if *from != name(a.from) {
                        problems.push(format!("{}: {text:?} claims to be from {from}", name(i)));
                    }
                    if let Some(prev) = last_k.insert(a.from, a.k) {
                        if prev >= a.k {
                            problems.push(format!(
                                "{}: from {} message #{} after #{prev} (out of order)",
                                name(i),
                                name(a.from),
                                a.k
                            ));
                        }
                    }
                }
            }
        }
        for (text, n) in &counts {
            if *n > 1 {
                problems.push(format!("{}: {text:?} arrived {n} times", name(i)));
            }
        }
        for text in expect[i].keys() {
            if !counts.contains_key(text.as_str()) {
                problems.push(format!("{}: {text:?} was lost", name(i)));
            }
        }
        delivered += counts.len();
    }
    let relay_hwm = relay.proc_kib("VmHWM").unwrap_or(0);
    let relay_rss = relay.proc_kib("VmRSS").unwrap_or(0);
    let member_hwm = members
        .iter()
        .filter_map(|d| d.proc_kib("VmHWM"))
        .max()
        .unwrap_or(0);
    let members_rss: u64 = members.iter().filter_map(|d| d.proc_kib("VmRSS")).sum();
    println!(
        "load: {delivered} of {} messages delivered exactly once; {:.0} messages/s delivered \
         (first send to last delivery {delivered_at:.1?}); backlog drained {drain:.1?} after sending stopped",
        acked.len(),
        delivered as f64 / delivered_at.as_secs_f64()
    );
    println!(
        "load: relay peak RSS (VmHWM) {:.1} MiB, RSS now {:.1} MiB; largest member peak RSS {:.1} MiB, \
         all {MEMBERS} members together {:.0} MiB; total {:.1?}",
        relay_hwm as f64 / 1024.0,
        relay_rss as f64 / 1024.0,
        member_hwm as f64 / 1024.0,
        members_rss as f64 / 1024.0,
        t0.elapsed()
    );
    if !problems.is_empty() {
        panic!(
            "{} problems, e.g.:\n  {}",
            problems.len(),
            problems[..problems.len().min(40)].join("\n  ")
        );
    }
    assert_eq!(delivered, acked.len());
    // A loose bound, far above the measured ~15 MiB: the relay keeps nothing per message once it
    // is acknowledged, so its memory must not grow with the traffic.
    assert!(
        relay_hwm < 256 * 1024,
        "the relay's peak RSS is {relay_hwm} KiB for {MEMBERS} members"
    );
}
