//! Delivery semantics under damage (issue 3, points 1, 2, 3 and 7), run against the real `chatd`
//! and `chatctl` binaries on loopback.
//!
//! DESIGN.md "Delivery semantics": every message that `chatctl send` reported as queued appears
//! exactly once in the recipient's history, in send order per sender, whatever process dies when.
//! These tests do the damage for real: they SIGKILL or SIGTERM the relay, the recipient's daemon
//! and a sender's daemon while messages flow, stop the relay, and fill the sender's disk.
//!
//! | point | test | how |
//! |---|---|---|
//! | 1 crash safety under traffic | `crash_safety_under_traffic_sigkill`, `crash_safety_under_traffic_sigterm` | 3 long-lived `chatctl --json send` stdin pipes, > 2,000 messages; the relay, the recipient's and one sender's daemon are killed and restarted at different points |
//! | 2 reconnect | `members_reconnect_with_backoff_and_flush_what_was_queued` | relay stopped and restarted on the same port |
//! | 3 durable outbox | `outbox_survives_a_sender_crash_while_the_relay_is_down` | SIGKILL of the sender while its messages wait for the relay |
//! | 7 storage faults | `full_disk_fails_send_clearly_and_recovers` | a real 4 MiB tmpfs as alice's state directory, filled with a filler file (needs `mount`; prints `SKIP` and passes if the test may not mount) |
//!
//! The in-process variant of point 7 (a store error injected through `Store::fail_writes`) is in
//! `tests/storage_faults.rs`; the load test (point 9) is in `tests/load.rs`.
//!
//! Nothing here sleeps to synchronise: every wait polls a condition with a deadline. Every child
//! process (daemons, `chatctl` pipes) is killed in a Drop guard, and helper threads stop when the
//! test ends. Timings go to stdout (`--nocapture` shows them).

mod common;

use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Assert that `out` exited with `code`, showing the whole output otherwise.
fn assert_exit(out: &Output, code: i32, what: &str) {
    if out.status.code() != Some(code) {
        fail(&format!(
            "{what}: expected exit {code}, got {}",
            describe(out)
        ));
    }
}

/// `chatctl --json send TO -- TEXT` on `d`: must exit 0 with one `queued` result; returns its id.
fn send_queued(d: &Daemon, to: &str, text: &str) -> String {
    let out = d.ctl(&["--json", "send", to, "--", text]);
    assert_exit(&out, 0, &format!("{} sends {text:?}", d.label()));
    let v = parse_json_lines(&out.stdout);
    assert_eq!(v.len(), 1, "one result line per recipient: {v:?}");
    assert_eq!(v[0]["to"], to, "{v:?}");
    assert_eq!(
        v[0]["state"], "queued",
        "without --wait a send answers `queued`: {v:?}"
    );
    let id = v[0]["id"].as_str().unwrap_or_default().to_string();
    assert!(is_hex_id(&id), "{v:?}");
    id
}

/// How often each text occurs among `d`'s incoming messages from `from`.
fn counts_from(d: &Daemon, from: &str) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for (f, t) in d.incoming() {
        if f == from {
            *m.entry(t).or_insert(0) += 1;
        }
    }
    m
}

/// Wait until `d` has received every one of `texts` from `from`; then wait until `sender`'s outbox
/// is empty (the relay took custody of everything, so no retransmission is still to come), and
/// assert each text arrived exactly once and in the given order.
fn assert_received_once_in_order(d: &Daemon, sender: &Daemon, from: &str, texts: &[String]) {
    let what = format!(
        "{} to receive {} messages from {from}",
        d.label(),
        texts.len()
    );
    wait_until(DEADLINE, &what, || {
        let c = counts_from(d, from);
        texts.iter().all(|t| c.contains_key(t))
    });
    let what = format!("{}'s outbox to drain", sender.label());
    wait_until(DEADLINE, &what, || sender.outbox_pending() == 0);
    let got: Vec<String> = d
        .incoming()
        .into_iter()
        .filter(|(f, t)| f == from && texts.contains(t))
        .map(|(_, t)| t)
        .collect();
    if got != texts {
        fail(&format!(
            "{} must hold each message from {from} exactly once, in send order:\n  sent {texts:?}\n  got  {got:?}",
            d.label()
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// Point 1: crash safety under traffic.

const RECIPIENT: &str = "rcpt";
const SENDERS: usize = 3;
const PER_SENDER: usize = 700;
/// The sender whose daemon the crash tests kill.
const VICTIM: usize = 0;

/// The text of message `n` of sender `s`, sent in `chatctl` run (attempt) `a`.
fn crash_text(s: usize, n: usize, a: usize) -> String {
    format!("s{s}-{n:05}-a{a}")
}

/// Parse a text made by [`crash_text`].
fn parse_crash_text(t: &str) -> Option<(usize, usize, usize)> {
    let mut it = t.split('-');
    let s = it.next()?.strip_prefix('s')?.parse().ok()?;
    let n = it.next()?.parse().ok()?;
    let a = it.next()?.strip_prefix('a')?.parse().ok()?;
    if it.next().is_some() {
        return None;
    }
    Some((s, n, a))
}

/// What the sender threads learned, shared with the test's main thread.
#[derive(Default)]
struct Ledger {
    /// Per sender: the acknowledged (n, attempt), in acknowledgement order.
    acked: Vec<Vec<(usize, usize)>>,
    /// Per sender: the last attempt number used (attempts are 1..=last).
    attempts: Vec<usize>,
    /// Per sender: how many `chatctl` runs ended with exit 3 (daemon gone).
    lost_daemon: Vec<usize>,
    /// Anything a sender thread found wrong.
    errors: Vec<String>,
    /// Senders that sent everything.
    finished: usize,
}

/// Lines a crash-test sender has written to `chatctl send` and not seen answered.
const IN_FLIGHT: usize = 4;

/// One sender: a long-lived `chatctl --json send RECIPIENT` reading its messages from stdin. A
/// message counts as acknowledged only when its JSON result line was printed. When the daemon
/// goes away, chatctl exits 3; the next run starts at the next unacknowledged n under a new
/// attempt tag (a message may have been stored without its answer reaching chatctl, so the
/// same n may arrive under an unacknowledged tag too: at most once, that is allowed).
fn sender_thread(
    s: usize,
    socket: PathBuf,
    ledger: Arc<Mutex<Ledger>>,
    total: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) {
    let mut next = 0;
    let mut attempt = 0;
    let note = |msg: String| ledger.lock().expect("ledger").errors.push(msg);
    while next < PER_SENDER && !stop.load(Ordering::SeqCst) {
        attempt += 1;
        ledger.lock().expect("ledger").attempts[s] = attempt;
        let mut cmd = chatctl_cmd();
        cmd.arg("--socket")
            .arg(&socket)
            .args(["--json", "send", RECIPIENT])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut guard = ChildGuard::new(cmd.spawn().expect("start chatctl send"));
        let mut stdin = guard.child().stdin.take().expect("stdin piped");
        let stdout = guard.child().stdout.take().expect("stdout piped");
        let mut stderr = guard.child().stderr.take().expect("stderr piped");
        let input: Vec<String> = (next..PER_SENDER)
            .map(|n| crash_text(s, n, attempt) + "\n")
            .collect();
        // Lines go in as results come out, at most IN_FLIGHT ahead: chatctl still sends what is
        // there as a burst, but the traffic lasts long enough for the crash events to land in
        // it (all at once, the senders would be done before the events that take them down).
        // A chatctl that dies before reading everything is expected here.
        let (credit, credits) = mpsc::channel::<()>();
        let writer = thread::spawn(move || {
            let mut lines = input.into_iter();
            for line in lines.by_ref().take(IN_FLIGHT) {
                if stdin.write_all(line.as_bytes()).is_err() {
                    return;
                }
            }
            while credits.recv().is_ok() {
                let Some(line) = lines.next() else { return };
                if stdin.write_all(line.as_bytes()).is_err() {
                    return;
                }
            }
        });
        let (tx, rx) = mpsc::channel();
        let reader = thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let err_reader = thread::spawn(move || {
            let mut v = String::new();
            let _ = stderr.read_to_string(&mut v);
            v
        });
        loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    let v: Value = match serde_json::from_str(&line) {
                        Ok(v) => v,
                        Err(e) => {
                            note(format!("sender {s}: non-JSON result line {line:?}: {e}"));
                            break;
                        }
                    };
                    let ok = v["to"] == RECIPIENT
                        && v["state"] == "queued"
                        && is_hex_id(v["id"].as_str().unwrap_or_default());
                    if !ok {
                        note(format!("sender {s}: unexpected result line {line}"));
                        break;
                    }
                    ledger.lock().expect("ledger").acked[s].push((next, attempt));
                    next += 1;
                    total.fetch_add(1, Ordering::SeqCst);
                    let _ = credit.send(());
                }
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    note(format!(
                        "sender {s}: chatctl printed nothing for 60 s (attempt {attempt}, at n={next}); a hang"
                    ));
                    break;
                }
            }
        }
        // The writer ends once its lines are written or no more results come.
        drop(credit);
        let status = guard.wait_bounded(Duration::from_secs(30));
        let _ = writer.join();
        let _ = reader.join();
        let err = err_reader.join().unwrap_or_default();
        match status.and_then(|s| s.code()) {
            Some(0) if next == PER_SENDER => {}
            Some(0) => note(format!(
                "sender {s}: chatctl exited 0 at n={next} without answering every line; stderr: {err}"
            )),
            Some(3) => {
                ledger.lock().expect("ledger").lost_daemon[s] += 1;
                // The daemon is being restarted by the test: try again shortly (a poll).
                thread::sleep(Duration::from_millis(30));
            }
            other => {
                note(format!(
                    "sender {s}: chatctl exited {other:?} at n={next} (attempt {attempt}); stderr: {err}"
                ));
                thread::sleep(Duration::from_millis(30));
            }
        }
    }
    if next == PER_SENDER {
        ledger.lock().expect("ledger").finished += 1;
    }
}

/// Which daemon a crash event hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Relay,
    Recipient,
    Sender,
}

/// How a daemon is taken down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum How {
    /// SIGKILL: a crash.
    Kill,
    /// SIGTERM: a clean stop, which must exit 0.
    Term,
}

/// One step of a crash event.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// Take the daemon down (SIGKILL or SIGTERM).
    Down(Target),
    /// Start it again and wait until it answers `status`. A member is not waited for until it
    /// is connected: its relay may be down, and it reconnects by itself.
    Up(Target),
    /// Let traffic go on until this share of all messages is acknowledged.
    Await(f64),
}

use Step::{Await, Down, Up};
use Target::{Recipient, Relay, Sender};

/// The crash events: when (a share of all messages acknowledged) and what happens. Varied on
/// purpose: each daemon alone, two or three at once, a member coming back while the relay is
/// still down, and a daemon taken down again right after it came back (before its peers have
/// logged in again).
const SCHEDULE: &[(f64, &[Step])] = &[
    (0.04, &[Down(Relay), Up(Relay)]),
    (0.10, &[Down(Recipient), Up(Recipient)]),
    (0.16, &[Down(Sender), Up(Sender)]),
    (
        0.24,
        &[Down(Relay), Down(Recipient), Up(Recipient), Up(Relay)],
    ),
    (0.32, &[Down(Sender), Down(Relay), Up(Sender), Up(Relay)]),
    (0.38, &[Down(Relay), Up(Relay), Down(Relay), Up(Relay)]),
    // A backlog of several delivery windows builds up for the recipient; the relay dies holding
    // it; the recipient dies again while it drains it.
    (
        0.44,
        &[
            Down(Recipient),
            Await(0.60),
            Down(Relay),
            Up(Relay),
            Up(Recipient),
            Down(Recipient),
            Up(Recipient),
        ],
    ),
    (
        0.66,
        &[
            Down(Recipient),
            Up(Recipient),
            Down(Recipient),
            Up(Recipient),
        ],
    ),
    (0.72, &[Down(Sender), Up(Sender), Down(Sender), Up(Sender)]),
    (
        0.80,
        &[
            Down(Relay),
            Down(Recipient),
            Down(Sender),
            Up(Relay),
            Up(Recipient),
            Up(Sender),
        ],
    ),
    (0.90, &[Down(Recipient), Up(Recipient)]),
];

/// Take `d` down the way `how` says (SIGTERM must exit 0).
fn take_down(d: &mut Daemon, how: How) {
    match how {
        How::Kill => d.kill(),
        How::Term => {
            let status = d.stop();
            if status.code() != Some(0) {
                fail(&format!(
                    "{} must exit 0 on SIGTERM, got {status:?}",
                    d.label()
                ));
            }
        }
    }
}

fn crash_safety_under_traffic(how: How) {
    let t0 = Instant::now();
    let mut relay = Daemon::relay();
    let mut rcpt = Daemon::member(RECIPIENT, &relay.addr());
    let mut senders: Vec<Daemon> = (0..SENDERS)
        .map(|s| Daemon::member(&format!("s{s}"), &relay.addr()))
        .collect();
    for d in &senders {
        let what = format!("{} to know {RECIPIENT}", d.label());
        wait_until(DEADLINE, &what, || d.peer(RECIPIENT).is_some());
    }
    let total_msgs = SENDERS * PER_SENDER;
    println!(
        "[{how:?}] setup: relay + {SENDERS} senders + recipient ready in {:.1?}",
        t0.elapsed()
    );

    let ledger = Arc::new(Mutex::new(Ledger {
        acked: vec![Vec::new(); SENDERS],
        attempts: vec![0; SENDERS],
        lost_daemon: vec![0; SENDERS],
        ..Ledger::default()
    }));
    let total = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_guard = StopOnDrop(Arc::clone(&stop));
    let t_send = Instant::now();
    let threads: Vec<_> = senders
        .iter()
        .enumerate()
        .map(|(s, d)| {
            let (socket, ledger, total, stop) = (
                d.socket(),
                Arc::clone(&ledger),
                Arc::clone(&total),
                Arc::clone(&stop),
            );
            thread::spawn(move || sender_thread(s, socket, ledger, total, stop))
        })
        .collect();

    // Done when every sender sent everything, or as soon as one of them found something wrong
    // (reported below).
    let all_done = || {
        let l = ledger.lock().expect("ledger");
        l.finished == SENDERS || !l.errors.is_empty()
    };
    let sending_deadline = Duration::from_secs(150);
    for (i, (share, steps)) in SCHEDULE.iter().enumerate() {
        let at = (share * total_msgs as f64) as usize;
        let what = format!("{at} messages acknowledged (event {i})");
        wait_until(sending_deadline, &what, || {
            total.load(Ordering::SeqCst) >= at || all_done()
        });
        let acked_now = total.load(Ordering::SeqCst);
        let t = Instant::now();
        for step in steps.iter() {
            let d = match step {
                Await(share) => {
                    let at = (share * total_msgs as f64) as usize;
                    let what = format!("{at} messages acknowledged (within event {i})");
                    wait_until(sending_deadline, &what, || {
                        total.load(Ordering::SeqCst) >= at || all_done()
                    });
                    continue;
                }
                Down(Relay) | Up(Relay) => &mut relay,
                Down(Recipient) | Up(Recipient) => &mut rcpt,
                Down(Sender) | Up(Sender) => &mut senders[VICTIM],
            };
            match step {
                Down(_) => take_down(d, how),
                Up(_) => d.start_stopped_unconnected(),
                Await(_) => unreachable!("handled above"),
            }
        }
        println!(
            "[{how:?}] event {i} at {acked_now}/{total_msgs} acknowledged: {steps:?} in {:.1?}",
            t.elapsed()
        );
    }
    wait_until(sending_deadline, "every sender to finish", all_done);
    let errors = ledger.lock().expect("ledger").errors.clone();
    if !errors.is_empty() {
        fail(&format!(
            "[{how:?}] sender errors:\n  {}",
            errors.join("\n  ")
        ));
    }
    for t in threads {
        t.join().expect("sender thread");
    }
    let send_time = t_send.elapsed();
    let ledger = Arc::try_unwrap(ledger)
        .ok()
        .expect("sender threads ended")
        .into_inner()
        .expect("ledger");
    if !ledger.errors.is_empty() {
        fail(&format!(
            "[{how:?}] sender errors:\n  {}",
            ledger.errors.join("\n  ")
        ));
    }
    println!(
        "[{how:?}] sending: {total_msgs} acknowledged in {send_time:.1?} ({:.0}/s); chatctl runs per sender {:?}, of which ended by a lost daemon {:?}",
        total_msgs as f64 / send_time.as_secs_f64(),
        ledger.attempts,
        ledger.lost_daemon
    );
    let lost_victim = ledger.lost_daemon[VICTIM];
    assert!(
        lost_victim >= 1,
        "the victim sender's chatctl must have lost its daemon at least once (exit 3); it did not, so the test did not test that"
    );

    // Every acknowledged text, per sender, in acknowledgement order.
    let acked: Vec<Vec<(usize, String)>> = ledger
        .acked
        .iter()
        .enumerate()
        .map(|(s, v)| v.iter().map(|&(n, a)| (n, crash_text(s, n, a))).collect())
        .collect();
    let acked_set: HashSet<&str> = acked.iter().flatten().map(|(_, t)| t.as_str()).collect();
    assert_eq!(acked_set.len(), total_msgs, "each n acknowledged once");

    // Wait until the recipient holds every acknowledged text and every sender's outbox is empty
    // (so nothing is still to be retransmitted).
    // Generous, yet short enough that a loss is reported here rather than by nextest's
    // three-minute kill (a normal run needs well under a second).
    let t_drain = Instant::now();
    let drain_deadline = Duration::from_secs(120);
    let mut last_report = Instant::now();
    loop {
        let have: HashSet<String> = rcpt.incoming().into_iter().map(|(_, t)| t).collect();
        let mut missing: Vec<&str> = acked_set
            .iter()
            .copied()
            .filter(|t| !have.contains(*t))
            .collect();
        let pending: Vec<u64> = senders.iter().map(Daemon::outbox_pending).collect();
        if missing.is_empty() && pending.iter().all(|p| *p == 0) {
            break;
        }
        if t_drain.elapsed() >= drain_deadline {
            missing.sort_unstable();
            fail(&format!(
                "[{how:?}] after {drain_deadline:?}, {} acknowledged messages never arrived \
                 (e.g. {:?}); senders' outbox_pending {pending:?}",
                missing.len(),
                &missing[..missing.len().min(20)]
            ));
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            println!(
                "[{how:?}] still missing {} messages; outbox_pending {pending:?}",
                missing.len()
            );
            last_report = Instant::now();
        }
        thread::sleep(Duration::from_millis(250));
    }
    println!(
        "[{how:?}] delivery finished {:.1?} after the last send",
        t_drain.elapsed()
    );

    // The verdict, on the recipient's whole history.
    let incoming = rcpt.incoming();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut problems = Vec::new();
    let mut per_sender_order: Vec<Vec<usize>> = vec![Vec::new(); SENDERS];
    let mut unacked_delivered = 0;
    for (from, text) in &incoming {
        *seen.entry(text.clone()).or_insert(0) += 1;
        let Some((s, n, a)) = parse_crash_text(text) else {
            problems.push(format!("unexpected text {text:?} from {from}"));
            continue;
        };
        if s >= SENDERS || *from != format!("s{s}") || n >= PER_SENDER || a > ledger.attempts[s] {
            problems.push(format!("text {text:?} from {from} was never sent"));
            continue;
        }
        if acked_set.contains(text.as_str()) {
            per_sender_order[s].push(n);
        } else {
            unacked_delivered += 1;
        }
    }
    for (text, count) in &seen {
        if *count > 1 {
            problems.push(format!("{text:?} is in the history {count} times"));
        }
    }
    for t in &acked_set {
        if !seen.contains_key(*t) {
            problems.push(format!("acknowledged {t:?} is missing"));
        }
    }
    for (s, ns) in per_sender_order.iter().enumerate() {
        if let Some(w) = ns.windows(2).find(|w| w[0] >= w[1]) {
            problems.push(format!(
                "sender s{s}: acknowledged messages out of order: n={} before n={}",
                w[0], w[1]
            ));
        }
    }
    if !problems.is_empty() {
        let shown: Vec<&String> = problems.iter().take(40).collect();
        fail(&format!(
            "[{how:?}] {} problems in the recipient's history ({} records):\n  {}",
            problems.len(),
            incoming.len(),
            shown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n  ")
        ));
    }
    println!(
        "[{how:?}] verdict: {} acknowledged messages each exactly once and in order per sender; {unacked_delivered} unacknowledged ones arrived (at most once each); total {:.1?}",
        acked_set.len(),
        t0.elapsed()
    );
}

#[test]
fn crash_safety_under_traffic_sigkill() {
    crash_safety_under_traffic(How::Kill);
}

#[test]
fn crash_safety_under_traffic_sigterm() {
    crash_safety_under_traffic(How::Term);
}

// ---------------------------------------------------------------------------------------------
// Point 2: reconnect with backoff.

#[test]
fn members_reconnect_with_backoff_and_flush_what_was_queued() {
    let mut relay = Daemon::relay();
    let addr = relay.addr();
    let alice = Daemon::member("alice", &addr);
    let bob = Daemon::member("bob", &addr);
    alice.wait_peer_online("bob", true);
    let mark = alice.log().len();

    let status = relay.stop();
    assert_eq!(status.code(), Some(0), "the relay exits 0 on SIGTERM");
    for d in [&alice, &bob] {
        let what = format!("{} to show connected: false with a relay_error", d.label());
        let s = wait_for(DEADLINE, &what, || {
            d.try_status().filter(|s| {
                s["connected"] == Value::Bool(false)
                    && s["relay_error"].as_str().is_some_and(|e| !e.is_empty())
            })
        });
        println!(
            "{} while the relay is down: relay_error = {}",
            d.label(),
            s["relay_error"]
        );
    }

    // Sends during the outage are accepted (queued) and wait in the outbox.
    let texts: Vec<String> = (1..=3).map(|i| format!("during the outage {i}")).collect();
    for t in &texts {
        send_queued(&alice, "bob", t);
    }
    assert_eq!(
        alice.outbox_pending(),
        3,
        "three messages wait in the outbox"
    );

    // Backoff: at least three attempts logged; the first about half a second, then growing.
    let delays = wait_for(DEADLINE, "alice to log three reconnect delays", || {
        let d = reconnect_delays(&alice.log()[mark..]);
        (d.len() >= 3).then_some(d)
    });
    println!("alice's reconnect delays (s): {delays:?}");
    assert!(
        delays[0] <= 1.0,
        "the first reconnect comes within about 1 s, got {delays:?}"
    );
    let distinct: HashSet<String> = delays.iter().map(|d| format!("{d:.1}")).collect();
    assert!(
        distinct.len() >= 2,
        "reconnect delays must grow, got {delays:?}"
    );
    assert!(
        delays[0] <= delays[1] && delays[1] <= delays[2] && delays[0] < delays[2],
        "reconnect delays must grow (exponential backoff), got {delays:?}"
    );
    assert!(
        delays.iter().all(|d| *d <= 30.0),
        "reconnect delays are capped at about 30 s, got {delays:?}"
    );

    // The relay comes back on the same port; the members reconnect by themselves.
    relay.start_stopped();
    assert_eq!(relay.addr(), addr, "the relay is back on the same port");
    alice.wait_connected();
    bob.wait_connected();
    let s = alice.status();
    assert!(
        s["relay_error"].is_null(),
        "relay_error clears once connected: {s}"
    );
    assert_received_once_in_order(&bob, &alice, "alice", &texts);
}

// ---------------------------------------------------------------------------------------------
// Point 3: the outbox survives a crash of the sender.

#[test]
fn outbox_survives_a_sender_crash_while_the_relay_is_down() {
    let mut relay = Daemon::relay();
    let mut alice = Daemon::member("alice", &relay.addr());
    let bob = Daemon::member("bob", &relay.addr());
    alice.wait_peer_online("bob", true);

    relay.kill();
    wait_until(DEADLINE, "alice to notice the relay is gone", || {
        alice
            .try_status()
            .is_some_and(|s| s["connected"] == Value::Bool(false))
    });
    let texts: Vec<String> = (1..=5).map(|i| format!("durable {i}")).collect();
    for t in &texts {
        send_queued(&alice, "bob", t);
    }
    assert_eq!(alice.outbox_pending(), 5);

    // Crash alice with the five messages only in her outbox, and start her again while the
    // relay is still down.
    alice.kill();
    alice.start_stopped_unconnected();
    let s = alice.status();
    assert_eq!(s["connected"], Value::Bool(false), "{s}");
    assert_eq!(s["outbox_pending"], 5, "the outbox survived the crash: {s}");

    relay.start_stopped();
    alice.wait_connected();
    assert_received_once_in_order(&bob, &alice, "alice", &texts);
    // And alice's own history holds each sent message once.
    let outs = alice.texts("out");
    for t in &texts {
        assert_eq!(
            outs.iter().filter(|o| *o == t).count(),
            1,
            "alice's history holds {t:?} once: {outs:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Point 7: storage faults on a real, small file system.

/// A tmpfs mounted by the test; lazily unmounted (and its mount point removed) on drop.
struct Mount {
    path: PathBuf,
}

impl Mount {
    /// Mount a `size` tmpfs (mode 0700, as chatd wants its state directory) on `path`.
    fn tmpfs(path: &Path, size: &str) -> Result<Mount, String> {
        fs::create_dir_all(path).map_err(|e| format!("mkdir {}: {e}", path.display()))?;
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount exited {:?}: {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Mount {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_dir(&self.path);
    }
}

/// Write zeros to `path` until the file system is full; returns the bytes written.
fn fill_up(path: &Path) -> u64 {
    let mut f = fs::File::create(path).expect("create the filler file");
    let mut written = 0u64;
    for chunk in [64 * 1024, 4096, 512, 1] {
        let buf = vec![0u8; chunk];
        loop {
            match f.write(&buf) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("writing the filler: {e}"),
            }
        }
    }
    let _ = f.sync_all();
    written
}

#[test]
fn full_disk_fails_send_clearly_and_recovers() {
    let relay = Daemon::relay();
    let bob = Daemon::member("bob", &relay.addr());
    let addr = relay.addr();
    let prepared = Daemon::spawn_prepared(
        "alice",
        Role::Member,
        &["--user", "alice", "--connect", &addr],
        |dir| Mount::tmpfs(&dir.join("state"), "4m"),
    );
    // Bindings are dropped in reverse order: the mount goes first (lazy unmount works under a
    // running daemon), then alice is killed and her directory removed.
    let (mut alice, mount) = match prepared {
        Ok(x) => x,
        Err(e) => {
            println!("SKIP: cannot mount tmpfs: {e}");
            return;
        }
    };
    alice.wait_ready();
    alice.wait_connected();
    alice.wait_peer_online("bob", true);

    // Before the fault: three messages, delivered and receipted, so alice has nothing left to
    // write.
    let before: Vec<String> = (1..=3)
        .map(|i| format!("before the disk filled {i}"))
        .collect();
    for t in &before {
        send_queued(&alice, "bob", t);
    }
    assert_received_once_in_order(&bob, &alice, "alice", &before);
    wait_until(
        DEADLINE,
        "alice to record the three delivered receipts",
        || {
            alice
                .tail(&[])
                .iter()
                .filter(|r| r["kind"] == "receipt" && r["state"] == "delivered")
                .count()
                >= 3
        },
    );

    let filler = mount.path.join("filler");
    let bytes = fill_up(&filler);
    println!("filled alice's 4 MiB state file system with {bytes} bytes");

    // A send now must fail with a clear storage error, and claim nothing.
    let out = alice.ctl(&["--json", "send", "bob", "--", "while the disk is full"]);
    println!("send on a full disk: {}", describe(&out));
    assert_exit(&out, 1, "send while the state directory is full");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.starts_with("chatctl: ") && err.to_lowercase().contains("full"),
        "the error names the full disk: {err:?}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("queued"),
        "nothing is claimed queued: {}",
        describe(&out)
    );
    let s = wait_for(DEADLINE, "alice to answer status", || alice.try_status());
    assert_eq!(s["outbox_pending"], 0, "nothing was queued: {s}");

    // Incoming messages while the disk is full: alice cannot store them, so she must not
    // acknowledge them; the relay keeps them.
    let mark = alice.log().len();
    send_queued(&bob, "alice", "to alice while her disk is full");
    wait_until(
        DEADLINE,
        "alice to fail a commit for the incoming message",
        || alice.log()[mark..].contains("database commit failed"),
    );

    // Free the space: everything works again and nothing was lost.
    fs::remove_file(&filler).expect("remove the filler");
    let after = ["after the disk was freed".to_string()];
    send_queued(&alice, "bob", &after[0]);
    alice.wait_connected();
    let mut expect = before.clone();
    expect.extend(after.iter().cloned());
    assert_received_once_in_order(&bob, &alice, "alice", &expect);
    let bob_got = counts_from(&bob, "alice");
    assert!(
        !bob_got.contains_key("while the disk is full"),
        "the failed send must never arrive: {bob_got:?}"
    );
    let incoming = ["to alice while her disk is full".to_string()];
    assert_received_once_in_order(&alice, &bob, "bob", &incoming);
    let outs = alice.texts("out");
    for t in &expect {
        assert_eq!(
            outs.iter().filter(|o| *o == t).count(),
            1,
            "alice's history holds {t:?} once: {outs:?}"
        );
    }
    assert!(
        !outs.iter().any(|o| o == "while the disk is full"),
        "the failed send is not in alice's history: {outs:?}"
    );
    alice.kill();
}

/// Issue 9: with forward first, a relay can die after it forwarded an item and before it wrote
/// it. The relay here aborts in that very window (`CHATD_TEST_ABORT_BEFORE_COMMIT`), again and
/// again, while alice sends 300 messages to bob in six bursts; each time it is started again.
/// Every message must reach bob exactly once and in order, and alice's outbox must drain.
#[test]
fn a_relay_killed_between_forward_and_commit_loses_and_duplicates_nothing() {
    const BURSTS: usize = 6;
    const PER: usize = 50;
    let mut relay = Daemon::relay();
    let alice = Daemon::member("alice", &relay.addr());
    let bob = Daemon::member("bob", &relay.addr());
    alice.wait_peer_online("bob", true);
    let mut crashes = 0;
    for b in 0..BURSTS {
        // Armed: the relay aborts in its first or second turn with items in memory only.
        relay.set_env(
            "CHATD_TEST_ABORT_BEFORE_COMMIT",
            Some(if b % 2 == 0 { "1" } else { "2" }),
        );
        // Not waited for: alice's outbox from the last burst may make it abort at once.
        relay.restart_no_wait();
        let lines: String = (b * PER..(b + 1) * PER)
            .map(|i| format!("m{i:04}\n"))
            .collect();
        let out = alice.ctl_stdin(&["send", "bob"], lines.as_bytes());
        assert!(out.status.success(), "{}", describe(&out));
        wait_until(DEADLINE, "the armed relay to abort", || !relay.is_running());
        crashes += 1;
    }
    // Unarmed: everything gets through.
    relay.set_env("CHATD_TEST_ABORT_BEFORE_COMMIT", None);
    relay.restart();
    let n = BURSTS * PER;
    wait_until(
        Duration::from_secs(60),
        "bob to have every message and alice an empty outbox",
        || bob.texts("in").len() >= n && alice.outbox_pending() == 0,
    );
    assert_eq!(crashes, BURSTS);
    let aborts = relay
        .log()
        .matches("aborting between forward and commit")
        .count();
    assert!(aborts >= BURSTS, "{aborts} aborts logged");
    let got = bob.texts("in");
    let want: Vec<String> = (0..n).map(|i| format!("m{i:04}")).collect();
    assert_eq!(got, want, "every message once, in order");
}
