//! Hostile input and limits (issue 3, points 4, 5 and 6), against the real `chatd` and `chatctl`.
//!
//! The attackers are raw sockets in this process: they speak the frame format and MessagePack
//! messages of `chatd::proto` directly (and log in for real with an RSA identity where the attack
//! needs a logged-in connection), so they can send what no honest client would. The victims are
//! real daemons: a relay under attack keeps serving a real alice and bob, whose `chatctl send
//! --wait delivered` must keep succeeding during and between the attacks.
//!
//! How "cut off" is seen: by the attacker, as end of stream or a reset on its socket (read with a
//! read timeout and a deadline); by the operator, as a line in the daemon's log (each attack runs
//! alone on its daemon, so "one more line matching X than before" belongs to it). Nothing sleeps
//! to synchronise: every wait polls with a deadline.
//!
//! | point | tests |
//! |---|---|
//! | 4 relay port | `relay_port_hostile_input_is_cut_off_while_members_chat` (garbage, over-cap length, wrong frame type, truncated frame then silence, no handshake, hundreds of connections; RSS), `relay_cuts_off_a_client_that_sends_but_never_reads`, `relay_memory_stays_bounded_when_a_client_floods_small_frames`, `a_relay_with_a_large_directory_still_logs_members_in` |
//! | 5 control socket | `control_socket_hostile_input_and_client_limit`, `control_socket_refuses_another_uid` |
//! | 6 limits | max_connections: `max_connections_refuses_the_extra_connection_and_frees_slots`; frame size: the over-cap cases of points 4 and 5; max_queue: `max_queue_refuses_the_sender_with_a_clear_reason`; handshake_timeout, idle_timeout: `handshake_and_idle_timeouts_close_silent_connections`; max_write_buffer: `relay_cuts_off_a_client_that_sends_but_never_reads`, `max_write_buffer_cuts_off_a_slow_reader_and_its_messages_stay_queued`, `max_write_buffer_does_not_cut_off_a_prompt_tail_of_a_long_history`; max_control_clients: `control_socket_hostile_input_and_client_limit`; the config file: `limits_are_settable_in_chatd_toml` |
//!
//! Issue 10 (a hostile relay against a member; the relay is `FakeRelay`, a test-only relay that
//! speaks the real protocol to a real member):
//!
//! | point | tests |
//! |---|---|
//! | 1 write buffer | `a_relay_that_stops_reading_is_dropped_at_max_write_buffer` (and `core.rs`: `an_outbox_larger_than_max_write_buffer_drains_to_a_reading_relay`) |
//! | 2 held envelopes, forget | `held_envelopes_are_bounded_and_forget_drops_them` (RSS) |
//! | 3 no stalled loop | `status_answers_promptly_during_a_wide_fan_out` |
//! | 4 sticky warning, key records | `a_relay_cannot_erase_a_key_change_by_presenting_the_pinned_key_again` |
//! | 5 presence churn, `--kind` | `presence_churn_cannot_bury_messages` |
//! | 6 no silent `relayed` | `a_recipient_that_lost_its_session_key_gets_the_message_anyway`, `a_relay_cannot_forge_or_replay_a_rekey_request`, `forget_on_the_relay_fails_the_dropped_messages_for_their_senders` |
//! | 7 relay bounds | `max_queue_bytes_refuses_a_sender_once_the_bytes_are_queued`, `control_idle_timeout_closes_a_silent_control_client_only` |
//!
//! Some of these fail today because of daemon bugs; each failure message says what went wrong
//! and `docs/LIMITS.md` ("Known problems") lists them. They stay failing until the daemon is fixed.
//!
//! `docs/LIMITS.md` describes each limit and what a user sees when it is hit; these tests check
//! those descriptions.

mod common;

use chatd::crypto::{login_transcript, Identity};
use chatd::proto::control::{CtlRequest, CtlResponse};
use chatd::proto::frame::{self, Decoded, MAX_FRAME};
use chatd::proto::relay::{Envelope, FromRelay, ItemKey, Kind, Peer, Routed, ToRelay};
use chatd::proto::{encode_frame, from_payload};
use common::*;
use rand::RngCore;
use serde_json::Value;
use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Raw frame clients
// ---------------------------------------------------------------------------------------------

/// A stream whose read timeout can be set (TCP to a relay, Unix to a control socket).
trait Timed: Read + Write {
    fn set_timeout(&self, d: Duration);
}

impl Timed for TlsClient {
    fn set_timeout(&self, d: Duration) {
        let _ = self
            .tcp()
            .set_read_timeout(Some(d.max(Duration::from_millis(1))));
        let _ = self.tcp().set_write_timeout(Some(Duration::from_secs(5)));
    }
}

/// The fake relay's side of a member's TLS link.
type ServerTls = rustls::StreamOwned<rustls::ServerConnection, TcpStream>;

impl Timed for ServerTls {
    fn set_timeout(&self, d: Duration) {
        let _ = self
            .sock
            .set_read_timeout(Some(d.max(Duration::from_millis(1))));
        let _ = self.sock.set_write_timeout(Some(Duration::from_secs(5)));
    }
}

impl Timed for UnixStream {
    fn set_timeout(&self, d: Duration) {
        let _ = self.set_read_timeout(Some(d.max(Duration::from_millis(1))));
        let _ = self.set_write_timeout(Some(Duration::from_secs(5)));
    }
}

/// What the next read found.
#[derive(Debug)]
enum Next {
    /// One whole frame's payload.
    Frame(Vec<u8>),
    /// End of stream or a reset: the other side closed the connection.
    Closed,
    /// Nothing (more) within the time given.
    Quiet,
}

/// A raw, blocking frame connection an attacker controls completely.
struct Raw<S: Timed> {
    s: S,
    buf: Vec<u8>,
    closed: bool,
}

impl Raw<TlsClient> {
    /// A TLS connection to the relay at `addr`, handshake done: what follows is frames.
    fn tcp(addr: &str) -> Raw<TlsClient> {
        let s = TlsClient::connect(addr).unwrap_or_else(|e| fail(&format!("connect {addr}: {e}")));
        Raw::new(s)
    }

    /// Sign the login transcript for this connection (its nonce and TLS session).
    fn sign_login(&self, nonce: &[u8; 32], user: &str, id: &Identity) -> Vec<u8> {
        id.sign(
            &mut rand::rngs::OsRng,
            &login_transcript(nonce, user, &self.s.exporter()),
        )
        .expect("sign the login transcript")
    }
}

impl Raw<UnixStream> {
    fn unix(path: &Path) -> Raw<UnixStream> {
        let s = UnixStream::connect(path)
            .unwrap_or_else(|e| fail(&format!("connect {}: {e}", path.display())));
        Raw::new(s)
    }
}

impl<S: Timed> Raw<S> {
    fn new(s: S) -> Raw<S> {
        s.set_timeout(Duration::from_secs(1));
        Raw {
            s,
            buf: Vec::new(),
            closed: false,
        }
    }

    /// Write bytes; false if the other side has already closed (EPIPE, reset). A write that
    /// times out (the other side is not reading) counts as still open.
    fn write(&mut self, bytes: &[u8]) -> bool {
        match self.s.write_all(bytes).and_then(|_| self.s.flush()) {
            Ok(()) => true,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                true
            }
            Err(_) => {
                self.closed = true;
                false
            }
        }
    }

    /// Write one message as a frame.
    fn send<T: serde::Serialize>(&mut self, msg: &T) -> bool {
        let mut buf = Vec::new();
        encode_frame(msg, &mut buf).expect("encode a frame");
        self.write(&buf)
    }

    /// The next frame, waiting at most `timeout`.
    fn next(&mut self, timeout: Duration) -> Next {
        let deadline = Instant::now() + timeout;
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            // The client side trusts nothing either: twice the cap is plenty for anything valid.
            match frame::decode(&self.buf, 2 * MAX_FRAME) {
                Ok(Decoded::Frame { payload, consumed }) => {
                    let p = payload.to_vec();
                    self.buf.drain(..consumed);
                    return Next::Frame(p);
                }
                Ok(Decoded::NeedMore) => {}
                Err(e) => fail(&format!("the daemon sent an invalid frame: {e}")),
            }
            if self.closed {
                return Next::Closed;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Next::Quiet;
            }
            self.s.set_timeout(left);
            match self.s.read(&mut chunk) {
                Ok(0) => self.closed = true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Next::Quiet
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A reset (the daemon closed with our bytes unread) is a close too.
                Err(_) => self.closed = true,
            }
        }
    }

    /// Read until the other side closes; return the frames that came first. Fails the test if
    /// the connection is still open at `timeout`.
    fn wait_closed(&mut self, what: &str, timeout: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut frames = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left) {
                Next::Frame(p) => frames.push(p),
                Next::Closed => return frames,
                Next::Quiet => fail(&format!(
                    "{what}: the connection was still open after {timeout:?} (frames seen: {})",
                    frames.len()
                )),
            }
        }
    }

    /// Whether the connection is still open: nothing arrives within `d` and it is not closed.
    fn still_open(&mut self, d: Duration) -> bool {
        matches!(self.next(d), Next::Quiet)
    }
}

impl Raw<TlsClient> {
    /// The next message from a relay.
    fn recv_relay(&mut self, timeout: Duration) -> Option<FromRelay> {
        match self.next(timeout) {
            Next::Frame(p) => Some(
                from_payload(&p)
                    .unwrap_or_else(|e| fail(&format!("relay sent a non-FromRelay frame: {e}"))),
            ),
            Next::Closed | Next::Quiet => None,
        }
    }

    /// Read the relay's first frame, which must be a challenge.
    fn challenge(&mut self) -> [u8; 32] {
        match self.recv_relay(DEADLINE) {
            Some(FromRelay::Challenge { nonce, .. }) => nonce,
            other => fail(&format!("expected a Challenge first, got {other:?}")),
        }
    }

    /// Whether the relay sends this connection a challenge within `d` (it was accepted).
    fn gets_challenge(&mut self, d: Duration) -> bool {
        matches!(self.recv_relay(d), Some(FromRelay::Challenge { .. }))
    }

    /// Read until closed; the relay's `Error` frames among what came.
    fn wait_closed_errors(&mut self, what: &str) -> Vec<(String, String)> {
        self.wait_closed(what, DEADLINE)
            .iter()
            .filter_map(|p| match from_payload::<FromRelay>(p) {
                Ok(FromRelay::Error { code, reason }) => Some((code.to_string(), reason)),
                _ => None,
            })
            .collect()
    }
}

/// A connection to `addr` is closed before its TLS handshake completes: it gets nothing, not
/// even the relay's key.
fn assert_refused(addr: &str, what: &str) {
    if let Ok(c) = TlsClient::connect(addr) {
        let mut c = Raw::new(c);
        let frames = c.wait_closed(what, DEADLINE);
        fail(&format!(
            "{what}: TLS handshake completed ({} frames followed)",
            frames.len()
        ));
    }
}

/// A fresh RSA identity for a raw client (2048 bits, as the test daemons use).
fn identity() -> Identity {
    Identity::generate(&mut rand::thread_rng(), 2048).expect("generate an identity")
}

/// Connect to the relay at `addr` and send a real `Login` as `user`; the answer is not read.
fn send_login(addr: &str, user: &str, id: &Identity) -> Raw<TlsClient> {
    let mut c = Raw::tcp(addr);
    let nonce = c.challenge();
    let signature = c.sign_login(&nonce, user, id);
    c.send(&ToRelay::Login {
        user: user.to_string(),
        key: id.public().der().to_vec(),
        signature,
    });
    c
}

/// Connect to the relay at `addr` and log in as `user` for real; returns after `Welcome`.
fn login(addr: &str, user: &str, id: &Identity) -> Raw<TlsClient> {
    let mut c = send_login(addr, user, id);
    loop {
        match c.recv_relay(DEADLINE) {
            Some(FromRelay::Welcome { .. }) => return c,
            // Presence of others may not come before Welcome, but be lenient.
            Some(FromRelay::Presence(_)) => continue,
            other => fail(&format!("{user}: expected Welcome, got {other:?}")),
        }
    }
}

/// An envelope the relay will route (it cannot read it, so junk ciphertext is as good as any).
fn junk_envelope(from: &str, to: &str, counter: u64, size: usize) -> Routed {
    let mut id = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut id);
    let mut ciphertext = vec![0u8; size];
    rand::thread_rng().fill_bytes(&mut ciphertext);
    Routed::Message(Envelope {
        id,
        from: from.to_string(),
        to: to.to_string(),
        time_ms: 0,
        session: [7u8; 16],
        counter,
        key_packet: None,
        ciphertext,
    })
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut v);
    v
}

// ---------------------------------------------------------------------------------------------
// Daemon observation
// ---------------------------------------------------------------------------------------------

/// Lines of `d`'s log that satisfy `pred`.
fn count_lines(d: &Daemon, pred: &dyn Fn(&str) -> bool) -> usize {
    d.log().lines().filter(|l| pred(l)).count()
}

/// Wait until `d`'s log holds at least `n` lines satisfying `pred`; return the last such line.
fn wait_lines(d: &Daemon, what: &str, n: usize, pred: &dyn Fn(&str) -> bool) -> String {
    wait_for(DEADLINE, &format!("{} to log {what}", d.label()), || {
        let log = d.log();
        let hits: Vec<&str> = log.lines().filter(|l| pred(l)).collect();
        (hits.len() >= n).then(|| hits.last().map(|s| s.to_string()).unwrap_or_default())
    })
}

/// Run `attack`, then wait for one more log line matching `pred` than there was before it.
fn expect_new_line(
    d: &Daemon,
    what: &str,
    pred: &dyn Fn(&str) -> bool,
    attack: impl FnOnce(),
) -> String {
    let before = count_lines(d, pred);
    attack();
    wait_lines(d, what, before + 1, pred)
}

/// Resident set size of a process, in KiB (`VmRSS` in `/proc/PID/status`).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| fail(&format!("read /proc/{pid}/status: {e}")));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| fail(&format!("no VmRSS in /proc/{pid}/status")))
}

/// The most the relay's RSS may grow during an attack run: generous (buffers, SQLite cache,
/// allocator slack), yet far below what unbounded buffering of the attacks would need.
const RSS_GROWTH_LIMIT_KIB: u64 = 64 * 1024;

fn assert_exit(out: &Output, code: i32, what: &str) {
    if out.status.code() != Some(code) {
        fail(&format!(
            "{what}: expected exit {code}, got {}",
            describe(out)
        ));
    }
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

/// `from` sends `text` to `to` and waits until it is delivered (exit 0 required).
fn deliver(from: &Daemon, to: &str, text: &str) {
    let out = from.ctl(&["send", "--wait", "delivered", to, text]);
    assert_exit(&out, 0, &format!("{} send {text:?} to {to}", from.label()));
}

/// A relay with extra flags, ready.
fn relay_with(flags: &[&str]) -> Daemon {
    let mut args = vec!["--listen", "127.0.0.1:0"];
    args.extend_from_slice(flags);
    let mut d = Daemon::spawn("relay", Role::Relay, &args);
    d.wait_ready();
    d
}

fn incoming_texts(d: &Daemon) -> Vec<String> {
    d.texts("in")
}

// ---------------------------------------------------------------------------------------------
// Point 4: hostile bytes on the relay port
// ---------------------------------------------------------------------------------------------

/// What each side's chatter sent and had confirmed, or why a send failed.
type ChatResult = Result<(Vec<String>, Vec<String>), String>;

/// Alice and bob chat in the background until told to stop; returns the texts each side's
/// `send --wait delivered` confirmed.
struct Chatter {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<ChatResult>>,
}

impl Chatter {
    fn start(alice: &Daemon, bob: &Daemon) -> Chatter {
        let stop = Arc::new(AtomicBool::new(false));
        let a_sock = alice.socket();
        let b_sock = bob.socket();
        let flag = Arc::clone(&stop);
        let handle = thread::spawn(move || {
            let mut a_sent = Vec::new();
            let mut b_sent = Vec::new();
            let mut i = 0;
            while !flag.load(Ordering::SeqCst) {
                for (sock, to, sent) in [
                    (&a_sock, "bob", &mut a_sent),
                    (&b_sock, "alice", &mut b_sent),
                ] {
                    let text = format!("during-attack-{to}-{i}");
                    let mut cmd = chatctl_cmd();
                    cmd.arg("--socket").arg(sock).args([
                        "send",
                        "--wait",
                        "delivered",
                        "--timeout",
                        "15",
                        to,
                        &text,
                    ]);
                    let out = run_bounded(cmd, None, CTL_DEADLINE);
                    if !out.status.success() {
                        return Err(format!(
                            "send {text:?} during the attacks failed: {}",
                            describe(&out)
                        ));
                    }
                    sent.push(text);
                }
                i += 1;
            }
            Ok((a_sent, b_sent))
        });
        Chatter {
            stop,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> (Vec<String>, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        match self.handle.take().expect("chatter running").join() {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => fail(&e),
            Err(_) => fail("the chatter thread panicked"),
        }
    }
}

impl Drop for Chatter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A relay log line about cutting off a connection for bad bytes.
fn cut_for_bad_bytes(l: &str) -> bool {
    l.contains("connection ")
        && (l.contains("exceeds the")
            || l.contains("malformed frame")
            || l.contains("protocol violation")
            || l.contains("handshake timeout"))
}

#[test]
fn relay_port_hostile_input_is_cut_off_while_members_chat() {
    let relay = relay_with(&["--handshake-timeout", "1", "--max-write-buffer", "65536"]);
    let addr = relay.addr();
    let alice = Daemon::member("alice", &addr);
    let bob = Daemon::member("bob", &addr);
    alice.wait_peer_online("bob", true);
    bob.wait_peer_online("alice", true);
    deliver(&alice, "bob", "before the attacks");
    deliver(&bob, "alice", "before the attacks, back");
    let rss_before = rss_kib(relay.pid());
    let chatter = Chatter::start(&alice, &bob);
    let mut round = 0;
    let mut between = |what: &str| {
        round += 1;
        deliver(&alice, "bob", &format!("after {what} {round}"));
        deliver(&bob, "alice", &format!("after {what} {round}, back"));
    };

    // 1. Random garbage instead of frames.
    expect_new_line(&relay, "a cut-off for garbage", &cut_for_bad_bytes, || {
        let mut c = Raw::tcp(&addr);
        c.write(&random_bytes(4096));
        c.wait_closed("garbage", DEADLINE);
    });
    between("garbage");

    // 2. A length prefix above the 1 MiB cap: refused before anything is allocated for it.
    let line = expect_new_line(
        &relay,
        "a cut-off for an over-cap length",
        &|l| l.contains("connection ") && l.contains("frame of 1048577 bytes exceeds"),
        || {
            let mut c = Raw::tcp(&addr);
            c.challenge();
            let mut bytes = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
            bytes.extend_from_slice(&[0u8; 64]);
            c.write(&bytes);
            c.wait_closed("over-cap length prefix", DEADLINE);
        },
    );
    assert!(line.contains("1048576-byte limit"), "{line}");
    between("over-cap length");

    // 3. A well-formed frame of the wrong type for the state: Send before Login.
    expect_new_line(
        &relay,
        "a protocol violation",
        &|l| l.contains("protocol violation: expected Login, got Send"),
        || {
            let mut c = Raw::tcp(&addr);
            c.challenge();
            c.send(&ToRelay::Send(junk_envelope("alice", "bob", 0, 32)));
            let errors = c.wait_closed_errors("Send before Login");
            assert!(
                errors.iter().any(|(code, _)| code == "protocol"),
                "the relay says why it closes: {errors:?}"
            );
        },
    );
    between("wrong frame type");

    // 4. A truncated frame, then silence: the handshake timeout ends it.
    expect_new_line(
        &relay,
        "a handshake timeout for a truncated frame",
        &|l| l.contains("handshake timeout: no login"),
        || {
            let mut c = Raw::tcp(&addr);
            c.challenge();
            let mut bytes = 100u32.to_be_bytes().to_vec();
            bytes.extend_from_slice(&[0x81; 10]);
            c.write(&bytes);
            let errors = c.wait_closed_errors("truncated frame then silence");
            assert!(
                errors.iter().any(|(code, _)| code == "timeout"),
                "the relay says why it closes: {errors:?}"
            );
        },
    );
    between("truncated frame");

    // 5. A client that never finishes the handshake.
    expect_new_line(
        &relay,
        "a handshake timeout",
        &|l| l.contains("handshake timeout: no login"),
        || {
            let mut c = Raw::tcp(&addr);
            c.challenge();
            let errors = c.wait_closed_errors("no login");
            assert!(
                errors.iter().any(|(code, _)| code == "timeout"),
                "the relay says why it closes: {errors:?}"
            );
        },
    );
    between("no handshake");

    // 6. Hundreds of connections opened and dropped; half of them leave a truncated frame.
    let truncated = |l: &str| l.contains("connection ") && l.contains("middle of a frame");
    let before = count_lines(&relay, &truncated);
    let mut half = 0;
    for wave in 0..15 {
        let mut conns = Vec::new();
        for i in 0..20 {
            let mut c = Raw::tcp(&addr);
            if i % 2 == 0 {
                // Read the challenge first so the close is a clean FIN, not a reset.
                c.challenge();
                c.write(&[0, 0, 0, 50, 1, 2, 3]);
                half += 1;
            }
            conns.push(c);
        }
        drop(conns);
        if wave == 7 {
            between("half the connection storm");
        }
    }
    wait_lines(
        &relay,
        "a line per truncated connection of the storm",
        before + half,
        &truncated,
    );
    between("connection storm");

    check_chat_and_rss(chatter, &alice, &bob, &relay, rss_before);
}

/// Stop the chatter; every message it confirmed delivered is in the history exactly once; the
/// relay's RSS grew less than the limit since `rss_before`.
fn check_chat_and_rss(
    chatter: Chatter,
    alice: &Daemon,
    bob: &Daemon,
    relay: &Daemon,
    rss_before: u64,
) {
    let (a_sent, b_sent) = chatter.finish();
    assert!(
        !a_sent.is_empty() && !b_sent.is_empty(),
        "the members chatted during the attacks"
    );
    for (d, sent) in [(bob, &a_sent), (alice, &b_sent)] {
        let got = incoming_texts(d);
        for t in sent.iter() {
            let n = got.iter().filter(|g| *g == t).count();
            assert_eq!(n, 1, "{} has {t:?} {n} times", d.label());
        }
    }
    let rss_after = rss_kib(relay.pid());
    assert!(
        rss_after.saturating_sub(rss_before) < RSS_GROWTH_LIMIT_KIB,
        "relay RSS grew from {rss_before} KiB to {rss_after} KiB during the attacks"
    );
    eprintln!(
        "relay RSS {rss_before} KiB before, {rss_after} KiB after the attacks; \
         {} + {} messages delivered during them",
        a_sent.len(),
        b_sent.len()
    );
}

/// Fail at once if `relay`'s RSS grew by the limit or more since `before` (so a leaking relay is
/// caught long before it can hurt the machine).
fn guard_rss(relay: &Daemon, before: u64, what: &str) {
    let now = rss_kib(relay.pid());
    if now.saturating_sub(before) >= RSS_GROWTH_LIMIT_KIB {
        fail(&format!(
            "relay RSS grew from {before} KiB to {now} KiB {what}; memory is not bounded"
        ));
    }
}

#[test]
fn relay_cuts_off_a_client_that_sends_but_never_reads() {
    let relay = relay_with(&["--max-write-buffer", "65536"]);
    let addr = relay.addr();
    let alice = Daemon::member("alice", &addr);
    let bob = Daemon::member("bob", &addr);
    alice.wait_peer_online("bob", true);
    deliver(&alice, "bob", "before the slow reader");
    let slow_id = identity();
    let rss_before = rss_kib(relay.pid());
    let chatter = Chatter::start(&alice, &bob);

    // `slowpoke` logs in, then floods Pings and never reads anything: every Ping earns a Pong,
    // so the relay soon has more to write to it than the 64 KiB cap plus the kernel's socket
    // buffers. (Deliveries alone cannot do it: the relay's delivery window is bounded in bytes
    // to half the cap, so a member that does not read never has much more than that waiting.)
    let cut =
        |l: &str| l.contains("cutting off connection") && l.contains("max_write_buffer 65536");
    let line = expect_new_line(&relay, "the slow reader cut off", &cut, || {
        let mut slow = login(&addr, "slowpoke", &slow_id);
        let mut ping = Vec::new();
        encode_frame(&ToRelay::Ping, &mut ping).expect("encode Ping");
        let burst: Vec<u8> = ping
            .iter()
            .copied()
            .cycle()
            .take(ping.len() * 20_000)
            .collect();
        let start = Instant::now();
        let mut bursts = 0;
        while !relay.log().contains("max_write_buffer 65536") {
            if start.elapsed() > DEADLINE {
                fail(&format!(
                    "the relay never cut off a client that does not read ({bursts} bursts of \
                     20,000 Pings sent)"
                ));
            }
            guard_rss(&relay, rss_before, "while a client did not read");
            if !slow.write(&burst) {
                break;
            }
            bursts += 1;
        }
        slow.wait_closed("the slow reader", DEADLINE);
    });
    assert!(line.contains("its messages stay queued"), "{line}");
    deliver(&alice, "bob", "after the slow reader");
    check_chat_and_rss(chatter, &alice, &bob, &relay, rss_before);
}

#[test]
fn relay_memory_stays_bounded_when_a_client_floods_small_frames() {
    // A client that has not logged in streams 9-byte Ping frames as fast as it can. The first one
    // is a protocol violation (only Login is allowed before login), so the relay should cut it off
    // at once; whatever it does, its memory must stay bounded while the flood lasts.
    let relay = relay_with(&[]);
    let addr = relay.addr();
    let rss_before = rss_kib(relay.pid());
    let mut batch = Vec::new();
    for _ in 0..8192 {
        encode_frame(&ToRelay::Ping, &mut batch).expect("encode Ping");
    }
    let violation = |l: &str| l.contains("protocol violation: expected Login, got Ping");
    expect_new_line(&relay, "the flooding client cut off", &violation, || {
        let mut c = Raw::tcp(&addr);
        c.challenge();
        let start = Instant::now();
        let mut sent = 0usize;
        while c.write(&batch) {
            sent += batch.len();
            if sent % (batch.len() * 16) == 0 {
                guard_rss(
                    &relay,
                    rss_before,
                    &format!(
                        "while one connection streamed {} MiB of Ping frames before login, \
                         {:?} after it started, without being cut off",
                        sent >> 20,
                        start.elapsed()
                    ),
                );
            }
            if start.elapsed() > DEADLINE {
                fail(&format!(
                    "the relay did not cut off a client that sent {} MiB of frames before login",
                    sent >> 20
                ));
            }
        }
        c.wait_closed("the flooding client", DEADLINE);
    });
    guard_rss(&relay, rss_before, "after a flood of small frames");
    status_works(&relay, "after a flood of small frames");
}

// ---------------------------------------------------------------------------------------------
// Point 5: hostile bytes on the control socket
// ---------------------------------------------------------------------------------------------

fn status_works(d: &Daemon, what: &str) {
    let out = d.ctl(&["--json", "status"]);
    if !out.status.success() {
        fail(&format!(
            "{}: `chatctl status` failed {what}: {}",
            d.label(),
            describe(&out)
        ));
    }
}

/// A control connection that asked `status` and got the answer: it is accepted and counted.
fn held_control_client(d: &Daemon) -> Raw<UnixStream> {
    let mut c = Raw::unix(&d.socket());
    c.send(&CtlRequest::Status);
    match c.next(DEADLINE) {
        Next::Frame(p) => match from_payload::<CtlResponse>(&p) {
            Ok(CtlResponse::Status(_)) => c,
            other => fail(&format!("expected a status answer, got {other:?}")),
        },
        other => fail(&format!("expected a status answer, got {other:?}")),
    }
}

fn control_cut(l: &str) -> bool {
    l.contains("control client ") && (l.contains("exceeds the") || l.contains("malformed request"))
}

#[test]
fn control_socket_hostile_input_and_client_limit() {
    let max = 8;
    let d = relay_with(&["--max-control-clients", &max.to_string()]);
    let sock = d.socket();
    let rss_before = rss_kib(d.pid());

    // Random garbage.
    expect_new_line(&d, "a cut-off for control garbage", &control_cut, || {
        let mut c = Raw::unix(&sock);
        c.write(&random_bytes(4096));
        c.wait_closed("control garbage", DEADLINE);
    });
    status_works(&d, "after garbage");

    // A length prefix above the cap.
    expect_new_line(
        &d,
        "a cut-off for an over-cap control frame",
        &|l| l.contains("control client ") && l.contains("frame of 1048577 bytes exceeds"),
        || {
            let mut c = Raw::unix(&sock);
            c.write(&((MAX_FRAME + 1) as u32).to_be_bytes());
            c.wait_closed("over-cap control frame", DEADLINE);
        },
    );
    status_works(&d, "after an over-cap length");

    // A valid frame that is not a CtlRequest (a relay-protocol Ping): answered with an error
    // naming the problem, then closed.
    expect_new_line(
        &d,
        "a malformed control request",
        &|l| l.contains("control client ") && l.contains("malformed request"),
        || {
            let mut c = Raw::unix(&sock);
            c.send(&ToRelay::Ping);
            let frames = c.wait_closed("a non-request frame", DEADLINE);
            let said = frames
                .iter()
                .filter_map(|p| from_payload::<CtlResponse>(p).ok())
                .any(|r| {
                    matches!(r, CtlResponse::Error { ref message, .. }
                        if message.contains("malformed request"))
                });
            assert!(
                said,
                "the daemon answers a malformed request with an error first"
            );
        },
    );
    status_works(&d, "after a malformed request");

    // A truncated frame, then the client goes away.
    expect_new_line(
        &d,
        "a truncated control frame",
        &|l| l.contains("control client ") && l.contains("middle of a frame"),
        || {
            let mut c = Raw::unix(&sock);
            c.write(&[0, 0, 0, 40, 0x81]);
            c.s.shutdown(std::net::Shutdown::Write).expect("shutdown");
            c.wait_closed("truncated control frame", DEADLINE);
        },
    );
    status_works(&d, "after a truncated frame");

    // A truncated frame, then silence: it holds one slot (there is no control timeout) but the
    // daemon keeps answering everyone else.
    let mut stuck = Raw::unix(&sock);
    stuck.write(&[0, 0, 0, 40, 0x81, 0x82]);
    status_works(&d, "while a client sits on a truncated frame");
    assert!(stuck.still_open(Duration::from_millis(200)));
    drop(stuck);

    // Hundreds of connections opened and dropped, some mid-frame.
    for i in 0..300 {
        let mut c = Raw::unix(&sock);
        if i % 3 == 0 {
            c.write(&[0, 0]);
        }
    }
    // Until the daemon has seen those closes they count against --max-control-clients, so a
    // chatctl right after the storm may be refused: poll.
    wait_until(
        DEADLINE,
        "status to answer after 300 connections opened and dropped",
        || d.ctl(&["status"]).status.success(),
    );
    // None of them still holds a slot: max-1 held clients leave room for chatctl (polled, since
    // the daemon may not have seen every close yet).
    wait_until(
        DEADLINE,
        "the dropped control connections to free their slots",
        || {
            let held: Vec<_> = (0..max - 1).map(|_| held_control_client(&d)).collect();
            let ok = d.ctl(&["--json", "status"]).status.success();
            drop(held);
            ok
        },
    );

    // More than --max-control-clients at once: the extra one is refused with a log line, and the
    // user running chatctl is told why.
    let held: Vec<_> = (0..max).map(|_| held_control_client(&d)).collect();
    let mut refused = None;
    let line = expect_new_line(
        &d,
        "a refused control client",
        &|l| l.contains("refused control connection") && l.contains("max_control_clients"),
        || refused = Some(d.ctl(&["status"])),
    );
    assert!(line.contains(&format!("limit of {max} clients")), "{line}");
    let out = refused.expect("ran chatctl");
    assert!(!out.status.success(), "over the limit: {}", describe(&out));
    drop(held);
    wait_until(DEADLINE, "chatctl status to work again", || {
        d.ctl(&["status"]).status.success()
    });
    let rss_after = rss_kib(d.pid());
    assert!(
        rss_after.saturating_sub(rss_before) < RSS_GROWTH_LIMIT_KIB,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    // The user over the limit must learn that a limit was hit (DESIGN "Bounded everything":
    // hitting a bound gives a clear error, never a silent drop).
    let err = stderr_of(&out);
    assert!(
        err.contains("max_control_clients") || err.contains("too many"),
        "chatctl over the control-client limit exits {:?} saying only {err:?}: \
         nothing says a limit was hit",
        out.status.code()
    );
}

/// Restores the modes changed for the other-uid test.
struct ModeGuard(Vec<(std::path::PathBuf, u32)>);

impl Drop for ModeGuard {
    fn drop(&mut self) {
        for (p, m) in &self.0 {
            let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(*m));
        }
    }
}

/// A command that runs `argv` as uid/gid 65534 (nobody), if this test can switch uid.
fn as_nobody() -> Result<Command, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not running as root, cannot switch to another uid".into());
    }
    let usable = |c: &mut Command| {
        c.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let mut probe = Command::new("setpriv");
    probe.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        CHATCTL,
        "--version",
    ]);
    if usable(&mut probe) {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
        return Ok(c);
    }
    let mut probe = Command::new("runuser");
    probe.args(["-u", "nobody", "--", CHATCTL, "--version"]);
    if usable(&mut probe) {
        let mut c = Command::new("runuser");
        c.args(["-u", "nobody", "--"]);
        return Ok(c);
    }
    Err(format!(
        "neither setpriv nor runuser can run {CHATCTL} as uid 65534"
    ))
}

#[test]
fn control_socket_refuses_another_uid() {
    let mut cmd = match as_nobody() {
        Ok(c) => c,
        Err(why) => {
            println!("SKIP: control_socket_refuses_another_uid: {why}");
            return;
        }
    };
    let d = relay_with(&[]);
    let sock = d.socket();
    // chatd keeps its socket in a 0700 directory, so another uid cannot even reach it: the
    // file system is the first line of defence. To test the second one (the SO_PEERCRED check
    // in the daemon), open the directory and the socket to everyone for this test only.
    let dir = sock.parent().expect("socket dir").to_path_buf();
    let mode = |p: &Path| {
        std::fs::metadata(p)
            .unwrap_or_else(|e| fail(&format!("stat {}: {e}", p.display())))
            .permissions()
            .mode()
            & 0o7777
    };
    let _guard = ModeGuard(vec![(sock.clone(), mode(&sock)), (dir.clone(), mode(&dir))]);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)).expect("chmod dir");
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).expect("chmod sock");

    cmd.arg(CHATCTL)
        .arg("--socket")
        .arg(&sock)
        .args(["--json", "status"])
        .env_remove("CHATD_SOCKET");
    let mut out = None;
    expect_new_line(
        &d,
        "the refusal of uid 65534",
        &|l| l.contains("refused control connection from uid 65534"),
        || out = Some(run_bounded(cmd, None, CTL_DEADLINE)),
    );
    let out = out.expect("ran chatctl as nobody");
    assert!(
        !out.status.success() && out.stdout.is_empty(),
        "another uid gets no answer: {}",
        describe(&out)
    );
    status_works(&d, "for its own uid after refusing another");
}

// ---------------------------------------------------------------------------------------------
// Point 6: limits
// ---------------------------------------------------------------------------------------------

#[test]
fn max_connections_refuses_the_extra_connection_and_frees_slots() {
    // The held connections never log in: a long handshake timeout keeps them for the test.
    let relay = relay_with(&["--max-connections", "2", "--handshake-timeout", "60"]);
    let addr = relay.addr();
    let full = |l: &str| l.contains("refused connection from") && l.contains("max_connections");

    let mut c1 = Raw::tcp(&addr);
    assert!(c1.gets_challenge(DEADLINE), "first connection accepted");
    let mut c2 = Raw::tcp(&addr);
    assert!(c2.gets_challenge(DEADLINE), "second connection accepted");
    let line = expect_new_line(&relay, "the third connection refused", &full, || {
        assert_refused(&addr, "the connection over the limit");
    });
    assert!(line.contains("limit of 2 connections"), "{line}");

    // A member that comes while the relay is full is told it is not connected, and gets in
    // once a slot frees up.
    let carol = Daemon::member_unconnected("carol", &addr);
    wait_lines(&relay, "carol refused", 2, &full);
    let st = carol.status();
    assert_eq!(st["connected"], false, "{st}");
    eprintln!(
        "a member refused for max_connections sees relay_error {}",
        st["relay_error"]
    );
    drop(c1);
    carol.wait_connected();

    // Connections opened and dropped do not leak slots.
    drop(carol);
    drop(c2);
    for _ in 0..100 {
        let _ = TcpStream::connect(&addr);
    }
    wait_until(
        DEADLINE,
        "two connections to be accepted after the storm",
        || {
            // A slot still held by the storm refuses the handshake: try again.
            let (Ok(a), Ok(b)) = (TlsClient::connect(&addr), TlsClient::connect(&addr)) else {
                return false;
            };
            let (mut a, mut b) = (Raw::new(a), Raw::new(b));
            a.gets_challenge(Duration::from_secs(2)) && b.gets_challenge(Duration::from_secs(2))
        },
    );
}

#[test]
fn max_queue_refuses_the_sender_with_a_clear_reason() {
    let relay = relay_with(&["--max-queue", "3"]);
    let addr = relay.addr();
    let alice = Daemon::member("alice", &addr);
    let mut bob = Daemon::member("bob", &addr);
    alice.wait_peer_online("bob", true);
    bob.stop();
    alice.wait_peer_online("bob", false);
    for i in 1..=3 {
        let out = alice.ctl(&["send", "--wait", "relay", "bob", &format!("queued {i}")]);
        assert_exit(&out, 0, &format!("send {i} of 3 to offline bob"));
    }
    let out = alice.ctl(&["send", "--wait", "relay", "bob", "queued 4"]);
    assert_exit(&out, 1, "the 4th send to a full queue");
    let err = stderr_of(&out);
    assert!(
        err.starts_with("chatctl: ") && err.contains("queue") && err.contains("full"),
        "the reason names the full queue: {err:?}"
    );
    assert!(
        err.contains("bob"),
        "the reason names the recipient: {err:?}"
    );
    assert!(out.stdout.is_empty(), "{}", describe(&out));
    // The failure is in the history as a `failed` receipt with its reason.
    let failed: Vec<Value> = alice
        .tail(&[])
        .into_iter()
        .filter(|r| r["kind"] == "receipt" && r["state"] == "failed")
        .collect();
    assert_eq!(failed.len(), 1, "one failed receipt: {failed:?}");
    let reason = failed[0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("queue_full"), "receipt reason: {reason:?}");
    let line = wait_lines(&alice, "the refusal", 1, &|l| l.contains("queue_full"));
    eprintln!("sender's stderr: {err}\nsender's log: {line}");

    // Without --wait the send is accepted into the outbox (exit 0, as the contract says), and
    // the refusal arrives later as a `failed` receipt naming the reason: never a silent drop.
    let sent = alice.ctl_json(&["send", "bob", "queued 5"]);
    let id = sent[0]["id"]
        .as_str()
        .expect("send --json has an id")
        .to_string();
    assert_eq!(sent[0]["state"], "queued", "{sent:?}");
    let receipt = wait_for(DEADLINE, "a failed receipt for the 5th message", || {
        alice
            .tail(&[])
            .into_iter()
            .find(|r| r["kind"] == "receipt" && r["id"] == id.as_str() && r["state"] == "failed")
    });
    let reason = receipt["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("queue_full"), "receipt reason: {reason:?}");
    let plain = alice.ctl(&["tail", "-n", "1"]);
    eprintln!(
        "plain tail of the failed receipt: {}",
        String::from_utf8_lossy(&plain.stdout).trim()
    );

    bob.start_stopped();
    for i in 1..=3 {
        bob.wait_message(&format!("queued {i}"));
    }
    // The refused one never arrives; the queue has room again.
    deliver(&alice, "bob", "after the queue drained");
    let got = incoming_texts(&bob);
    assert_eq!(
        got,
        [
            "queued 1",
            "queued 2",
            "queued 3",
            "after the queue drained"
        ],
        "bob's history"
    );
}

#[test]
fn handshake_and_idle_timeouts_close_silent_connections() {
    let relay = relay_with(&["--handshake-timeout", "1", "--idle-timeout", "1"]);
    let addr = relay.addr();
    let (id_quiet, id_pinger) = (identity(), identity());

    // Handshake: a connection that reads its challenge and says nothing.
    let line = expect_new_line(
        &relay,
        "a handshake timeout",
        &|l| l.contains("handshake timeout: no login"),
        || {
            let mut c = Raw::tcp(&addr);
            c.challenge();
            let start = Instant::now();
            let errors = c.wait_closed_errors("a silent new connection");
            let took = start.elapsed();
            assert!(
                took >= Duration::from_millis(900),
                "closed after {took:?}, before the 1 s handshake timeout"
            );
            assert!(
                errors.iter().any(|(code, _)| code == "timeout"),
                "{errors:?}"
            );
        },
    );
    eprintln!("handshake timeout log line: {line}");

    // Idle: a logged-in connection that goes silent is closed after about a second, while one
    // that keeps pinging stays.
    let mut pinger = login(&addr, "pinger", &id_pinger);
    let line = expect_new_line(
        &relay,
        "an idle timeout",
        &|l| l.contains("idle timeout"),
        || {
            let mut quiet = login(&addr, "quiet", &id_quiet);
            let start = Instant::now();
            loop {
                // Pace the pinger with a read timeout (it expects only its Pong back).
                pinger.send(&ToRelay::Ping);
                let mut ponged = false;
                while !ponged {
                    match pinger.recv_relay(Duration::from_secs(5)) {
                        Some(FromRelay::Pong) => ponged = true,
                        Some(FromRelay::Presence(_)) => {}
                        other => fail(&format!("the pinging connection got {other:?}")),
                    }
                }
                match quiet.next(Duration::from_millis(300)) {
                    Next::Quiet => {}
                    Next::Frame(p) => match from_payload::<FromRelay>(&p) {
                        Ok(FromRelay::Error { code, .. }) => {
                            assert_eq!(code, "timeout");
                        }
                        Ok(FromRelay::Presence(_)) => {}
                        other => fail(&format!("the quiet connection got {other:?}")),
                    },
                    Next::Closed => break,
                }
                if start.elapsed() > DEADLINE {
                    fail("the idle connection was never closed");
                }
            }
            let took = start.elapsed();
            assert!(
                took >= Duration::from_millis(900),
                "closed after {took:?}, before the 1 s idle timeout"
            );
        },
    );
    eprintln!("idle timeout log line: {line}");
    pinger.send(&ToRelay::Ping);
    assert!(
        matches!(pinger.recv_relay(DEADLINE), Some(FromRelay::Pong)),
        "a connection that keeps talking is not idle"
    );
}

#[test]
fn a_backlog_larger_than_the_write_buffer_drains_without_cutting_off_the_member() {
    // 1 MiB: as large as one frame, so any single message fits. 40 queued items of 512 KiB are
    // 20 MiB: more than the cap plus what the kernel's socket buffers take at once.
    let relay = relay_with(&["--max-write-buffer", "1048576"]);
    let addr = relay.addr();
    let (id_victim, id_sender) = (identity(), identity());
    let cut = |l: &str| l.contains("cutting off connection") && l.contains("max_write_buffer");

    let victim = login(&addr, "victim", &id_victim);
    let mut sender = login(&addr, "sender", &id_sender);
    let count = 40u64;
    let mut keys = Vec::new();
    // The relay delivers in a window bounded in bytes (half of max_write_buffer), so a member
    // that does not read never has more than about one window waiting: it is not cut off, and
    // nothing piles up in the relay's memory. (A reader that never reads while the relay has to
    // write to it anyway is cut off: see the Ping flood in the slow-reader test.)
    let cuts_at_start = count_lines(&relay, &cut);
    {
        for i in 0..count {
            let item = junk_envelope("sender", "victim", i, 512 * 1024);
            keys.push(item.key());
            sender.send(&ToRelay::Send(item));
            // Every item is taken into custody (stored) before the relay says so.
            loop {
                match sender.recv_relay(DEADLINE) {
                    Some(FromRelay::Accepted(k)) if k == *keys.last().expect("key") => break,
                    Some(FromRelay::Presence(_)) => {}
                    other => fail(&format!("sending item {i}: got {other:?}")),
                }
            }
        }
    }
    assert_eq!(
        count_lines(&relay, &cut),
        cuts_at_start,
        "a member with a backlog was cut off although the window is bounded in bytes"
    );
    drop(victim);

    // The victim comes back and reads promptly, acknowledging each item, reconnecting if it is
    // cut off (as chatd does): every item arrives, in order, exactly once.
    let cuts_before = count_lines(&relay, &cut);
    let mut got: Vec<ItemKey> = Vec::new();
    let mut seen = HashSet::new();
    let start = Instant::now();
    let mut logins = 0;
    // 20 MiB over loopback to a prompt reader takes well under a second; allow ten.
    while got.len() < keys.len() {
        if start.elapsed() > Duration::from_secs(10) {
            fail(&format!(
                "the victim, reading promptly and acknowledging every item, got {} of {} queued \
                 items in {logins} logins: the relay cut it off as a slow reader {} times (the \
                 whole delivery window is queued for writing at login, far above \
                 max_write_buffer, and the acks of a cut-off connection are lost)",
                got.len(),
                keys.len(),
                count_lines(&relay, &cut) - cuts_before
            ));
        }
        let mut c = login(&addr, "victim", &id_victim);
        logins += 1;
        loop {
            match c.recv_relay(Duration::from_secs(5)) {
                Some(FromRelay::Deliver(item)) => {
                    let k = item.key();
                    if seen.insert(k) {
                        got.push(k);
                    }
                    c.send(&ToRelay::Ack(k));
                    if got.len() == keys.len() {
                        break;
                    }
                }
                Some(FromRelay::Presence(_)) => {}
                Some(FromRelay::Error { .. }) | None => break,
                other => fail(&format!("victim got {other:?}")),
            }
        }
    }
    assert_eq!(got, keys, "every queued item, in order");
    assert!(keys.iter().all(|k| k.kind == Kind::Message));
    let cuts_after = count_lines(&relay, &cut);
    assert_eq!(
        cuts_after,
        cuts_before,
        "a member that reads promptly is not cut off as a slow reader when it drains its \
         queue, but it was cut off {} times and needed {logins} logins for {count} items",
        cuts_after - cuts_before
    );
}

#[test]
fn max_write_buffer_does_not_cut_off_a_prompt_tail_of_a_long_history() {
    // The write buffer cap applies to control clients too (a `tail -f` that stops reading is cut
    // off). A `chatctl tail` that reads as fast as it can is not a slow reader, however long the
    // history it asks for.
    let relay = relay_with(&[]);
    let addr = relay.addr();
    let alice = Daemon::member("alice", &addr);
    let mut bob = Daemon::spawn(
        "bob",
        Role::Member,
        &[
            "--user",
            "bob",
            "--connect",
            &addr,
            "--max-write-buffer",
            "262144",
        ],
    );
    bob.wait_ready();
    bob.wait_connected();
    alice.wait_peer_online("bob", true);
    // 64 messages of 60,000 bytes: about 3.8 MB of history, 15 times the cap.
    let lines: String = (0..64)
        .map(|i| format!("{i:02} {}\n", "x".repeat(60_000 - 3)))
        .collect();
    let out = alice.ctl_stdin(&["send", "--wait", "delivered", "bob"], lines.as_bytes());
    assert_exit(&out, 0, "alice sends 64 long messages");
    let out = bob.ctl(&["--json", "tail", "-n", "1000"]);
    let cut = bob
        .log()
        .lines()
        .filter(|l| l.contains("cutting off connection"))
        .count();
    if !out.status.success() {
        fail(&format!(
            "bob's `chatctl tail -n 1000`, reading promptly, failed ({} cut-off lines in bob's \
             log: the daemon queues the whole history for writing in one turn, far above \
             max_write_buffer): {}",
            cut,
            describe(&Output {
                status: out.status,
                stdout: Vec::new(),
                stderr: out.stderr.clone(),
            })
        ));
    }
    let got = parse_json_lines(&out.stdout)
        .into_iter()
        .filter(|r| r["kind"] == "message" && r["dir"] == "in")
        .count();
    assert_eq!(got, 64, "every message in the tail");
}

#[test]
fn a_relay_with_a_large_directory_still_logs_members_in() {
    // `Welcome` lists every bound name with its key. Claim enough names that the directory is
    // larger than one frame (1 MiB; about 350 bytes per name with a 2048-bit key and a 32-byte
    // name), then check that a new member can still log in. The registration bounds would stop
    // one key claiming that many names (see `one_key_cannot_claim_every_name`), so this relay
    // is configured to allow it, and to push its directory at login up to 5,000 names (by
    // default it stops at 256, and a login gets none).
    let relay = relay_with(&[
        "--max-names-per-key",
        "4000",
        "--new-names-per-minute",
        "4000",
        "--directory-push-max",
        "5000",
    ]);
    let addr = relay.addr();
    let key = Arc::new(identity());
    let names = 3100;
    let t0 = Instant::now();
    let workers: Vec<_> = (0..16)
        .map(|w| {
            let (addr, key) = (addr.clone(), Arc::clone(&key));
            thread::spawn(move || {
                for i in (w..names).step_by(16) {
                    let user = format!("n{i:05}-{}", "x".repeat(25));
                    let mut c = Raw::tcp(&addr);
                    let nonce = c.challenge();
                    let signature = c.sign_login(&nonce, &user, &key);
                    c.send(&ToRelay::Login {
                        user,
                        key: key.public().der().to_vec(),
                        signature,
                    });
                    // Leave at once: the binding stays, the Welcome need not be read.
                    let _ = c.s.tcp().shutdown(std::net::Shutdown::Write);
                }
            })
        })
        .collect();
    for w in workers {
        if w.join().is_err() {
            fail("a name-claiming worker panicked");
        }
    }
    wait_until(DEADLINE, "the relay to bind every claimed name", || {
        relay.who().len() >= names
    });
    eprintln!("{names} names bound in {:?}", t0.elapsed());
    // A newcomer logs in (a raw client, so the wait is short and exact: chatd would retry for
    // ever): it must get its Welcome.
    let too_large = |l: &str| l.contains("cannot encode frame");
    let before = count_lines(&relay, &too_large);
    let carol_id = identity();
    let mut c = Raw::tcp(&addr);
    let nonce = c.challenge();
    let signature = c.sign_login(&nonce, "carol", &carol_id);
    c.send(&ToRelay::Login {
        user: "carol".into(),
        key: carol_id.public().der().to_vec(),
        signature,
    });
    match c.recv_relay(Duration::from_secs(10)) {
        Some(FromRelay::Welcome { peers, .. }) => {
            // The rest of a large directory follows in `Directory` frames.
            let mut seen = peers.len();
            while seen < names {
                match c.recv_relay(Duration::from_secs(10)) {
                    Some(FromRelay::Directory(more)) => {
                        assert!(!more.is_empty(), "empty Directory frame");
                        seen += more.len();
                    }
                    other => fail(&format!(
                        "directory incomplete after {seen} of {names} names: got {other:?}"
                    )),
                }
            }
            assert_eq!(seen, names, "every other bound name exactly once");
        }
        other => {
            let log = relay.log();
            let line = log.lines().rfind(|l| too_large(l)).unwrap_or("(none)");
            fail(&format!(
                "a new member cannot log in to a relay with {names} bound names: instead of a \
                 Welcome it got {other:?} within 10 s; the relay logged {} new \
                 `cannot encode frame` lines, the last: {line}",
                count_lines(&relay, &too_large) - before
            ))
        }
    }
}

#[test]
fn limits_are_settable_in_chatd_toml() {
    let cfg_dir = tempfile::tempdir().expect("tempdir");
    let cfg = cfg_dir.path().join("chatd.toml");
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:0\"\n\
         max_connections = 1\n\
         max_queue = 5\n\
         handshake_timeout = 3\n\
         idle_timeout = 60\n\
         max_write_buffer = 2097152\n\
         max_control_clients = 2\n",
    )
    .expect("write chatd.toml");
    let cfg_s = cfg.to_str().expect("utf-8 path").to_string();
    let mut relay = Daemon::spawn("relay (config file)", Role::Relay, &["-c", &cfg_s]);
    relay.wait_ready();
    let addr = relay.addr();

    // max_connections = 1 and handshake_timeout = 3 from the file.
    let mut c1 = Raw::tcp(&addr);
    assert!(c1.gets_challenge(DEADLINE));
    let start = Instant::now();
    expect_new_line(
        &relay,
        "max_connections from the file",
        &|l| l.contains("limit of 1 connections (max_connections)"),
        || {
            assert_refused(&addr, "the second connection");
        },
    );
    let errors = c1.wait_closed_errors("handshake_timeout from the file");
    assert!(
        errors.iter().any(|(code, _)| code == "timeout"),
        "{errors:?}"
    );
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_secs(10),
        "closed after {took:?}: not the file's 3 s (the default is 10 s)"
    );

    // max_control_clients = 2 from the file.
    let held: Vec<_> = (0..2).map(|_| held_control_client(&relay)).collect();
    expect_new_line(
        &relay,
        "max_control_clients from the file",
        &|l| l.contains("limit of 2 clients (max_control_clients)"),
        || {
            let out = relay.ctl(&["status"]);
            assert!(!out.status.success(), "{}", describe(&out));
        },
    );
    drop(held);
    status_works(&relay, "after the held control clients left");
    relay.stop();

    // A bad limit in the file stops chatd at start with a message naming the key.
    for (text, key) in [
        ("listen = \"127.0.0.1:0\"\nmax_queue = 0\n", "max_queue"),
        (
            "listen = \"127.0.0.1:0\"\nmax_connexions = 5\n",
            "max_connexions",
        ),
        (
            "listen = \"127.0.0.1:0\"\nidle_timeout = \"soon\"\n",
            "idle_timeout",
        ),
    ] {
        std::fs::write(&cfg, text).expect("write chatd.toml");
        let mut cmd = Command::new(CHATD);
        cmd.args(["-c", &cfg_s, "--state-dir"])
            .arg(cfg_dir.path().join("state"))
            .arg("--socket")
            .arg(cfg_dir.path().join("ctl.sock"));
        let out = run_bounded(cmd, None, CTL_DEADLINE);
        assert_exit(&out, 2, &format!("chatd with {text:?}"));
        let err = stderr_of(&out);
        assert!(err.contains(key), "the error names {key}: {err:?}");
    }
}

/// Issue 8 point 5: one key registering many names (10,000 in under a minute before) is stopped
/// at `max_names_per_key` with `too_many_names`, a new key is stopped by `new_names_per_minute`
/// with `registration_rate`, and the names already bound keep working.
#[test]
fn one_key_cannot_claim_every_name() {
    let relay = relay_with(&["--max-names-per-key", "3", "--new-names-per-minute", "5"]);
    let addr = relay.addr();
    let login = |key: &Identity, user: &str| -> Vec<FromRelay> {
        let mut c = send_login(&addr, user, key);
        c.recv_relay(DEADLINE).into_iter().collect()
    };
    let code = |answer: &[FromRelay]| match answer.first() {
        Some(FromRelay::Error { code, .. }) => Some(code.to_string()),
        _ => None,
    };
    let one = identity();
    for user in ["n1", "n2", "n3"] {
        let answer = login(&one, user);
        assert!(
            matches!(answer[0], FromRelay::Welcome { .. }),
            "{user}: {answer:?}"
        );
    }
    assert_eq!(code(&login(&one, "n4")).as_deref(), Some("too_many_names"));
    // A name the key holds still logs in.
    assert!(matches!(login(&one, "n2")[0], FromRelay::Welcome { .. }));
    let two = identity();
    for user in ["m1", "m2"] {
        assert!(
            matches!(login(&two, user)[0], FromRelay::Welcome { .. }),
            "{user}"
        );
    }
    let refused = login(&two, "m3");
    assert_eq!(
        code(&refused).as_deref(),
        Some("registration_rate"),
        "{refused:?}"
    );
    let names: Vec<String> = relay
        .who()
        .iter()
        .map(|p| p["user"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        names,
        ["m1", "m2", "n1", "n2", "n3"],
        "nothing refused was bound"
    );
    assert!(
        relay.log().contains("(max_names_per_key)")
            && relay.log().contains("(new_names_per_minute)")
    );
}

/// Issue 10 point 1: a relay that stops reading while it keeps sending (every delivery makes the
/// member queue an `Ack`) no longer grows the member without bound. Its write buffer to the
/// relay is capped at `max_write_buffer`: past it the member drops the link, says why, and
/// reconnects with backoff. The "relay" here is a socket in this test that logs bob in, then
/// floods him with deliveries and never reads again.
#[test]
fn a_relay_that_stops_reading_is_dropped_at_max_write_buffer() {
    use chatd::proto::relay::Receipt;
    use std::net::TcpListener;
    use std::os::fd::AsRawFd;

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fake relay");
    // A small receive buffer on the accepted sockets, so the member's backlog builds up quickly.
    let small: libc::c_int = 4096;
    // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int and its size.
    unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&small as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    let addr = listener.local_addr().expect("address").to_string();
    listener.set_nonblocking(true).expect("nonblocking");
    let accept = |what: &str| -> TcpStream {
        wait_for(DEADLINE, what, || match listener.accept() {
            Ok((s, _)) => Some(s),
            Err(_) => None,
        })
    };
    let bob = Daemon::spawn(
        "bob",
        Role::Member,
        &[
            "--user",
            "bob",
            "--connect",
            &addr,
            "--max-write-buffer",
            "65536",
        ],
    );

    let s = accept("bob to connect to the fake relay");
    s.set_nonblocking(false).expect("blocking");
    let fake_id = identity();
    let mut s = tls_accept(s, &fake_id).expect("bob's TLS handshake with the fake relay");
    s.sock
        .set_write_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let send = |s: &mut rustls::StreamOwned<rustls::ServerConnection, TcpStream>,
                m: &FromRelay|
     -> io::Result<()> {
        let mut buf = Vec::new();
        encode_frame(m, &mut buf).expect("encode");
        s.write_all(&buf)
    };
    let mut nonce = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut nonce);
    let challenge = FromRelay::Challenge {
        nonce,
        version: "fake".into(),
    };
    send(&mut s, &challenge).expect("send the challenge");
    s.sock.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let login = frame::read_from(&mut s, MAX_FRAME).expect("read the login");
    assert!(matches!(
        login.as_deref().map(from_payload::<ToRelay>),
        Some(Ok(ToRelay::Login { .. }))
    ));
    let welcome = FromRelay::Welcome {
        user: "bob".into(),
        peers: Vec::new(),
    };
    send(&mut s, &welcome).expect("send the welcome");
    // From here on, never read: send receipts for messages bob never sent (each is dropped and
    // acknowledged) until bob gives up on us.
    let bogus = FromRelay::Deliver(Routed::Receipt(Receipt {
        id: [9; 16],
        from: "zed".into(),
        to: "bob".into(),
        session: [8; 16],
        counter: 0,
        tag: [7; 16],
    }));
    let mut one = Vec::new();
    encode_frame(&bogus, &mut one).expect("encode");
    let burst = one.repeat(256);
    let start = Instant::now();
    let mut sent = 0usize;
    while !bob.log().contains("is not reading") {
        if start.elapsed() > Duration::from_secs(60) {
            fail(&format!(
                "bob never dropped a relay that does not read ({sent} bytes sent)"
            ));
        }
        match s.write_all(&burst) {
            Ok(()) => sent += burst.len(),
            // Bob closed the link (or stopped reading for a moment): look at his log again.
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
    let log = bob.log();
    assert!(
        log.contains("(max_write_buffer 65536) for 10 s; dropping the link"),
        "{log}"
    );
    // Backpressure held the backlog near the cap: bob stopped reading once it was passed.
    let unread: usize = log
        .split("is not reading: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| fail(&format!("no byte count in bob's log: {log}")));
    assert!(
        unread < 65536 + 512 * 1024,
        "bob held {unread} bytes for the relay"
    );
    let status = bob.status();
    assert!(
        status["relay_error"]
            .as_str()
            .is_some_and(|e| e.contains("relay stopped reading")),
        "{status}"
    );
    // And he comes back, with backoff, on a new connection.
    drop(s);
    let _again = accept("bob to reconnect after dropping the link");
}

/// Issue 8: 2,000 members, each following five others, disconnect at once. Before, every leave
/// went to every member (2,000 x 2,000 `Presence` frames queued in one turn: about 1.6 GB with
/// their keys, and the relay aborted on allocation at 7,200). Now a leave goes only to the
/// followers still connected, coalesced per turn, so the relay's peak RSS stays within
/// `RSS_GROWTH_LIMIT_KIB` (64 MiB) of what it used before the logins: 2,000 connections at the
/// few KiB each costs (about 5 KiB measured: read buffers, subscriptions, SQLite's cache) leave
/// room, a quadratic fan-out does not fit.
#[test]
fn two_thousand_members_disconnect_at_once_and_the_relay_stays_small() {
    const N: usize = 2000;
    if (raise_nofile() as u64) < (N as u64) + 200 {
        eprintln!("skipped: the open-file limit is below {}", N + 200);
        return;
    }
    let mut relay = Daemon::spawn(
        "relay for 2,000",
        Role::Relay,
        &[
            "--listen",
            "127.0.0.1:0",
            "--max-names-per-key",
            "5000",
            "--new-names-per-minute",
            "5000",
            "--max-connections",
            "4096",
        ],
    );
    relay.wait_ready();
    let addr = relay.addr();
    let before = relay
        .proc_kib("VmRSS")
        .unwrap_or_else(|| fail("no VmRSS for the relay"));
    let id = identity();
    let name = |i: usize| format!("m{:04}", i % N);
    let mut conns: Vec<_> = (0..N).map(|i| login(&addr, &name(i), &id)).collect();
    for (i, c) in conns.iter_mut().enumerate() {
        c.send(&ToRelay::Lookup((1..=5).map(|k| name(i + k)).collect()));
    }
    for (i, c) in conns.iter_mut().enumerate() {
        loop {
            match c.recv_relay(DEADLINE) {
                Some(FromRelay::Keys { peers, unknown }) => {
                    assert_eq!((peers.len(), unknown.len()), (5, 0), "{}", name(i));
                    break;
                }
                // The joins of the names it follows that logged in after it.
                Some(FromRelay::Presence(_)) => continue,
                other => fail(&format!("{}: expected Keys, got {other:?}", name(i))),
            }
        }
    }
    assert_eq!(relay.status()["peers_online"], N as u64);
    drop(conns);
    wait_until(DEADLINE, "the relay to see everyone leave", || {
        relay.try_status().is_some_and(|s| s["peers_online"] == 0)
    });
    let peak = relay
        .proc_kib("VmHWM")
        .unwrap_or_else(|| fail("no VmHWM for the relay"));
    eprintln!("relay RSS before the logins {before} KiB, peak {peak} KiB");
    assert!(
        peak.saturating_sub(before) < RSS_GROWTH_LIMIT_KIB,
        "relay peak RSS grew from {before} KiB to {peak} KiB"
    );
    // Still serving: a new member logs in.
    drop(login(&addr, "latecomer", &identity()));
}

// ---------------------------------------------------------------------------------------------
// Issue 12, point 5: TLS handshakes are bounded like logins
// ---------------------------------------------------------------------------------------------

/// How long until the relay closes `s` (EOF or reset), reading and dropping whatever it sends;
/// None if it is still open after `within`.
fn closed_after(s: &mut TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while start.elapsed() < within {
        let left = within.saturating_sub(start.elapsed());
        let _ = s.set_read_timeout(Some(left.max(Duration::from_millis(1))));
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}

/// A real client's first flight: the ClientHello a member would send.
fn client_hello() -> Vec<u8> {
    let mut session = tls_client_session();
    let mut hello = Vec::new();
    while session.wants_write() {
        session.write_tls(&mut hello).expect("ClientHello bytes");
    }
    assert!(hello.len() > 100, "a ClientHello of {} bytes", hello.len());
    hello
}

/// A handshake that never starts, one that stops halfway, one that crawls and garbage instead
/// of a ClientHello are each cut off (the first three by `handshake_timeout`, garbage at once),
/// a flood of them is held to `max_connections`, and a member logged in all along keeps being
/// served and a new one gets in afterwards.
#[test]
fn tls_handshakes_that_do_not_complete_are_cut_off() {
    let relay = relay_with(&["--handshake-timeout", "2", "--max-connections", "8"]);
    let addr = relay.addr();
    let mut pinger = login(&addr, "pinger", &identity());
    let timeout = Duration::from_secs(2);
    let early = Duration::from_millis(1800);
    let hello = client_hello();

    // Silent: TCP only.
    let mut silent = TcpStream::connect(&addr).expect("connect");
    // Half a ClientHello.
    let mut half = TcpStream::connect(&addr).expect("connect");
    half.write_all(&hello[..hello.len() / 2])
        .expect("half a hello");
    let took = closed_after(&mut silent, DEADLINE).expect("a silent connection is closed");
    assert!(took >= early, "silent connection closed after {took:?}");
    let took = closed_after(&mut half, DEADLINE).expect("half a handshake is closed");
    assert!(
        took < timeout + DEADLINE,
        "half a handshake closed after {took:?}"
    );

    // Slow: the whole ClientHello, 8 bytes every 150 ms, so it is not done by the timeout.
    let mut slow = TcpStream::connect(&addr).expect("connect");
    let start = Instant::now();
    let mut cut = None;
    for chunk in hello.chunks(8) {
        if slow.write_all(chunk).is_err() {
            cut = Some(start.elapsed());
            break;
        }
        if let Some(t) = closed_after(&mut slow, Duration::from_millis(150)) {
            cut = Some(start.elapsed() - Duration::from_millis(150) + t);
            break;
        }
    }
    let cut = cut.unwrap_or_else(|| fail("a crawling handshake was never cut off"));
    assert!(
        cut >= early && cut < Duration::from_secs(10),
        "a crawling handshake was cut off after {cut:?}"
    );

    // Garbage: closed at once, long before the timeout, without an answer worth reading.
    let mut junk = TcpStream::connect(&addr).expect("connect");
    junk.write_all(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
        .expect("send garbage");
    let took = closed_after(&mut junk, DEADLINE).expect("garbage is closed");
    assert!(took < early, "garbage closed after {took:?}");
    let mut frame_len = TcpStream::connect(&addr).expect("connect");
    // A plaintext chatd frame (an old member) is garbage to TLS too.
    let mut ping = Vec::new();
    encode_frame(&ToRelay::Ping, &mut ping).expect("encode");
    frame_len.write_all(&ping).expect("send a plaintext frame");
    let took = closed_after(&mut frame_len, DEADLINE).expect("a plaintext frame is closed");
    assert!(took < early, "a plaintext client closed after {took:?}");

    // Flood: 40 connections that never handshake. The relay holds at most 8 (pinger is one);
    // the rest are refused, and every held one is cut off at the timeout.
    let full = |l: &str| l.contains("at the limit of 8 connections");
    let before = count_lines(&relay, &full);
    let mut flood: Vec<TcpStream> = (0..40)
        .filter_map(|_| TcpStream::connect(&addr).ok())
        .collect();
    wait_until(DEADLINE, "the flood to meet max_connections", || {
        count_lines(&relay, &full) > before
    });
    for s in &mut flood {
        s.write_all(&hello[..10]).ok();
    }
    for (i, s) in flood.iter_mut().enumerate() {
        if closed_after(s, DEADLINE).is_none() {
            fail(&format!("flood connection {i} is still open"));
        }
    }

    // The logged-in member was served all along, and a newcomer gets in.
    pinger.send(&ToRelay::Ping);
    loop {
        match pinger.recv_relay(DEADLINE) {
            Some(FromRelay::Pong) => break,
            Some(FromRelay::Presence(_)) => {}
            other => fail(&format!("the logged-in member got {other:?}")),
        }
    }
    let _newcomer = login(&addr, "newcomer", &identity());
}

/// A login signed for one TLS session is refused on another (issue 12, point 4): someone who
/// forwards or replays a member's login through a session of their own gets `bad_login`, and the
/// same login signed for its own session is accepted.
#[test]
fn a_login_signed_for_another_tls_session_is_refused() {
    let relay = Daemon::relay();
    let addr = relay.addr();
    let id = identity();
    let mut first = Raw::tcp(&addr);
    let mut second = Raw::tcp(&addr);
    let nonce = second.challenge();
    let _ = first.challenge();
    // Signed over the second connection's challenge, but the first session's exporter value.
    let forwarded = first.sign_login(&nonce, "mallory", &id);
    second.send(&ToRelay::Login {
        user: "mallory".into(),
        key: id.public().der().to_vec(),
        signature: forwarded,
    });
    let errors = second.wait_closed_errors("a login bound to another session");
    assert!(
        errors
            .iter()
            .any(|(code, reason)| code == "bad_login" && reason.contains("signature")),
        "{errors:?}"
    );
    assert!(relay.who().is_empty(), "nothing was bound");
    // The honest login on the first connection still works.
    let _ = login(&addr, "mallory", &id);
}

// ---------------------------------------------------------------------------------------------
// Issue 10: a hostile relay against a real member
// ---------------------------------------------------------------------------------------------

/// A test-only relay that speaks the real protocol to one real member and obeys the test: it
/// sends a challenge, takes the login without checking it (a hostile relay need not), welcomes
/// the member with the peers the test gives, then sends whatever the test says and reads what the
/// member sends, answering its pings. The member cannot tell it from a relay that was taken over.
struct FakeRelay {
    listener: std::net::TcpListener,
    conn: Option<Raw<ServerTls>>,
    /// Its key: the member pins it on first contact, as it would a real relay's.
    id: Identity,
}

impl FakeRelay {
    fn bind() -> FakeRelay {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the fake relay");
        listener.set_nonblocking(true).expect("nonblocking");
        FakeRelay {
            listener,
            conn: None,
            id: identity(),
        }
    }

    fn addr(&self) -> String {
        self.listener.local_addr().expect("address").to_string()
    }

    /// Wait for the member to connect, and log it in as `user` with `peers` in the welcome.
    fn accept(&mut self, user: &str, peers: Vec<Peer>) {
        let s = wait_for(DEADLINE, "the member to connect to the fake relay", || {
            self.listener.accept().ok().map(|(s, _)| s)
        });
        s.set_nonblocking(false).expect("blocking");
        let tls =
            tls_accept(s, &self.id).unwrap_or_else(|e| fail(&format!("TLS with the member: {e}")));
        let mut c = Raw::new(tls);
        let mut nonce = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut nonce);
        c.send(&FromRelay::Challenge {
            nonce,
            version: "fake".into(),
        });
        match c.next(DEADLINE) {
            Next::Frame(p) => match from_payload::<ToRelay>(&p) {
                Ok(ToRelay::Login { user: u, .. }) if u == user => {}
                other => fail(&format!("expected {user}'s Login, got {other:?}")),
            },
            other => fail(&format!("expected a Login, got {other:?}")),
        }
        // As a relay must: at most 512 peers in the Welcome, the rest in Directory frames.
        let mut rest = peers;
        let first: Vec<Peer> = rest.drain(..rest.len().min(512)).collect();
        c.send(&FromRelay::Welcome {
            user: user.into(),
            peers: first,
        });
        for chunk in rest.chunks(512) {
            c.send(&FromRelay::Directory(chunk.to_vec()));
        }
        self.conn = Some(c);
    }

    /// From now on, in a thread, read and discard whatever the member sends, answering its
    /// pings, so it never waits for the relay to read nor finds it silent. The test talks to
    /// the member no more through this relay.
    fn drain_in_background(&mut self) {
        let mut c = self
            .conn
            .take()
            .unwrap_or_else(|| fail("the fake relay has no member connected"));
        thread::spawn(move || loop {
            match c.next(Duration::from_secs(3600)) {
                Next::Frame(p) => {
                    if matches!(from_payload::<ToRelay>(&p), Ok(ToRelay::Ping)) {
                        c.send(&FromRelay::Pong);
                    }
                }
                Next::Quiet => {}
                Next::Closed => return,
            }
        });
    }

    fn conn(&mut self) -> &mut Raw<ServerTls> {
        self.conn
            .as_mut()
            .unwrap_or_else(|| fail("the fake relay has no member connected"))
    }

    fn send(&mut self, msg: &FromRelay) {
        if !self.conn().send(msg) {
            fail("the member closed the link to the fake relay");
        }
    }

    /// Send many frames as fast as the member reads them (one long write, patient).
    fn flood(&mut self, frames: &[u8]) {
        let c = self.conn();
        let _ = c.s.sock.set_write_timeout(Some(Duration::from_secs(120)));
        if let Err(e) = c.s.write_all(frames) {
            fail(&format!("the member stopped reading the flood: {e}"));
        }
        c.s.set_timeout(Duration::from_secs(1));
    }

    /// The member's next frame that is not a ping (pings are answered), within `timeout`.
    fn recv(&mut self, timeout: Duration) -> Option<ToRelay> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.conn().next(left) {
                Next::Frame(p) => match from_payload::<ToRelay>(&p) {
                    Ok(ToRelay::Ping) => {
                        self.send(&FromRelay::Pong);
                    }
                    // A member looks up its contacts at every login (issue 8): this relay
                    // leaves them unanswered, as a relay that knows nobody new may.
                    Ok(ToRelay::Lookup(_)) => {}
                    Ok(m) => return Some(m),
                    Err(e) => fail(&format!("the member sent a non-ToRelay frame: {e}")),
                },
                Next::Closed | Next::Quiet => return None,
            }
        }
    }
}

/// A directory entry for `user` with `id`'s key.
fn peer_entry(user: &str, id: &Identity, online: bool) -> Peer {
    Peer {
        user: user.into(),
        key: id.public().der().to_vec(),
        online,
    }
}

/// `tail --json` records of `d` of one kind (the last 1000).
fn records_of(d: &Daemon, kind: &str) -> Vec<Value> {
    d.tail(&["--kind", kind])
}

/// Point 4: a relay presents another key for alice, then her pinned key again. The warning stays
/// (`changed`, sending refused) until `chatctl trust`, and each step is a `key` record that
/// `tail --json` shows; a relay flipping between the two keys adds no record per flip.
#[test]
fn a_relay_cannot_erase_a_key_change_by_presenting_the_pinned_key_again() {
    let mut relay = FakeRelay::bind();
    let bob = Daemon::spawn(
        "bob",
        Role::Member,
        &["--user", "bob", "--connect", &relay.addr()],
    );
    let (alice, mallory) = (identity(), identity());
    relay.accept("bob", vec![peer_entry("alice", &alice, true)]);
    bob.wait_connected();
    let fp = |id: &Identity| id.public().fingerprint().to_string();
    relay.send(&FromRelay::Presence(peer_entry("alice", &mallory, true)));
    for _ in 0..3 {
        relay.send(&FromRelay::Presence(peer_entry("alice", &alice, true)));
        relay.send(&FromRelay::Presence(peer_entry("alice", &mallory, true)));
    }
    relay.send(&FromRelay::Presence(peer_entry("alice", &alice, true)));
    wait_until(DEADLINE, "bob to record the return of alice's key", || {
        records_of(&bob, "key")
            .iter()
            .any(|r| r["event"] == "returned")
    });
    let view = bob
        .peer("alice")
        .unwrap_or_else(|| fail("bob does not know alice"));
    assert_eq!(view["trust"], "changed", "{view}");
    assert_eq!(view["presented"], fp(&mallory), "{view}");
    let out = bob.ctl(&["send", "alice", "hi"]);
    assert_exit(
        &out,
        5,
        "send to alice after the relay presented her old key again",
    );

    let keys = records_of(&bob, "key");
    let events: Vec<(&str, &str)> = keys
        .iter()
        .map(|r| {
            (
                r["event"].as_str().unwrap_or("?"),
                r["fingerprint"].as_str().unwrap_or("?"),
            )
        })
        .collect();
    let (a, m) = (fp(&alice), fp(&mallory));
    assert_eq!(
        events,
        [
            ("pinned", a.as_str()),
            ("changed", m.as_str()),
            ("returned", a.as_str())
        ],
        "{keys:?}"
    );
    assert_eq!(keys[1]["other"], a);
    assert_eq!(keys[2]["other"], m);
    // --kind filters: no key record among the presence ones, none of them among the keys.
    assert!(records_of(&bob, "presence")
        .iter()
        .all(|r| r["kind"] == "presence"));

    let out = bob.ctl(&["trust", "alice", &a]);
    assert_exit(&out, 0, "trust alice's pinned key");
    let view = bob
        .peer("alice")
        .unwrap_or_else(|| fail("bob forgot alice"));
    assert_eq!(view["trust"], "trusted", "{view}");
    let last = records_of(&bob, "key");
    assert_eq!(last.len(), 4, "{last:?}");
    assert_eq!(last[3]["event"], "trusted");
    assert_eq!(last[3]["fingerprint"], a);
    // Plain output says it too, and a bad kind is a usage error.
    let plain = bob.ctl(&["tail", "--kind", "key"]);
    assert_exit(&plain, 0, "plain tail --kind key");
    assert!(String::from_utf8_lossy(&plain.stdout).contains("KEY CHANGED for alice"));
    assert_exit(
        &bob.ctl(&["tail", "--kind", "nonsense"]),
        2,
        "tail --kind nonsense",
    );
}

/// Point 5: a relay toggles alice online and offline 100,000 times (the reproduction of the issue). Bob's history gets a handful
/// of presence records (a change is recorded once it has lasted 2 s, at most 4 a minute per
/// peer), his messages stay in `tail -n 10`, and `tail --kind message` shows only messages.
#[test]
fn presence_churn_cannot_bury_messages() {
    let mut relay = FakeRelay::bind();
    let bob = Daemon::spawn(
        "bob",
        Role::Member,
        &["--user", "bob", "--connect", &relay.addr()],
    );
    let alice = identity();
    relay.accept("bob", vec![peer_entry("alice", &alice, true)]);
    bob.wait_connected();
    for text in ["one", "two"] {
        assert_exit(&bob.ctl(&["send", "alice", text]), 0, "send to alice");
    }
    let start = Instant::now();
    let mut frames = Vec::new();
    const TOGGLES: usize = 100_000;
    for i in 0..TOGGLES {
        let p = FromRelay::Presence(peer_entry("alice", &alice, i % 2 == 0));
        encode_frame(&p, &mut frames).expect("encode");
    }
    relay.flood(&frames);
    // A new peer after the flood: once bob knows carol, he has read every toggle.
    relay.send(&FromRelay::Presence(peer_entry("carol", &identity(), true)));
    wait_until(DEADLINE, "bob to read the whole flood", || {
        bob.peer("carol").is_some()
    });
    assert_eq!(
        bob.peer("alice").map(|p| p["online"].clone()),
        Some(Value::Bool(false))
    );
    // The last state is recorded once it settled (2 s); wait for it.
    wait_until(DEADLINE, "bob to record alice's last state", || {
        records_of(&bob, "presence")
            .iter()
            .rev()
            .find(|r| r["user"] == "alice")
            .is_some_and(|r| r["online"] == false)
    });
    let minutes = start.elapsed().as_secs() / 60 + 1;
    let alice_records = records_of(&bob, "presence")
        .iter()
        .filter(|r| r["user"] == "alice")
        .count() as u64;
    assert!(
        alice_records <= 4 * minutes + 1,
        "{alice_records} presence records for alice from {TOGGLES} toggles in {minutes} min"
    );
    let last10 = bob.ctl_json(&["tail", "-n", "10"]);
    let texts: Vec<&str> = last10.iter().filter_map(|r| r["text"].as_str()).collect();
    assert_eq!(texts, ["one", "two"], "{last10:?}");
    let messages = records_of(&bob, "message");
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert!(messages.iter().all(|r| r["kind"] == "message"));
    let mixed = records_of(&bob, "message,presence");
    assert!(mixed
        .iter()
        .all(|r| r["kind"] == "message" || r["kind"] == "presence"));
    // Carol's join may or may not have settled into a record yet: count alice's only.
    let alice_in_mixed = mixed
        .iter()
        .filter(|r| r["kind"] == "presence" && r["user"] == "alice")
        .count() as u64;
    let messages_in_mixed = mixed.iter().filter(|r| r["kind"] == "message").count();
    assert_eq!(
        (messages_in_mixed, alice_in_mixed),
        (2, alice_records),
        "{mixed:?}"
    );
}

/// Deliver `n` junk envelopes of `size` bytes "from" `from` to bob, and read bob's `Ack` for
/// each (every envelope is settled: held, or refused at once; none is left to clog the relay).
fn deliver_junk(relay: &mut FakeRelay, from: &str, n: usize, size: usize) {
    let mut frame = Vec::new();
    let mut ids = std::collections::HashSet::new();
    for i in 0..n {
        frame.clear();
        let env = junk_envelope(from, "bob", i as u64, size);
        ids.insert(env.key().id);
        encode_frame(&FromRelay::Deliver(env), &mut frame).expect("encode");
        relay.flood(&frame);
    }
    // Only these envelopes' acks count: acks of earlier ones (held envelopes judged again when
    // their sender is introduced) may still be on the way, and counting them raced the check.
    let mut acks = 0;
    while acks < n {
        match relay.recv(DEADLINE) {
            Some(ToRelay::Ack(k)) if ids.contains(&k.id) => acks += 1,
            Some(_) => {}
            None => fail(&format!(
                "bob acknowledged {acks} of {n} envelopes from {from}"
            )),
        }
    }
}

/// Point 2: a relay delivers 300 envelopes of 1 MB "from" a name it never introduced (the
/// issue's reproduction), then 300 of 60 KB, then some from bob's own name and from an invalid
/// name. What can never be opened is refused at once; at most `max_held_per_sender` (100) are
/// held; bob's memory stays bounded while they arrive and while they are released in batches;
/// and `chatctl forget` drops a pin and what is held, saying how much.
///
/// The RSS bound, 48 MiB of growth: what bob may hold is on disk (at most 8 MiB from one sender
/// by default), a release reads 16 envelopes (about 1 MiB) at a time, and a 1 MiB frame is read
/// into a buffer of about that size; the rest is SQLite's page cache and allocator slack. Before
/// the bounds, the same attack grew a member by about 300 MiB.
#[test]
fn held_envelopes_are_bounded_and_forget_drops_them() {
    let mut relay = FakeRelay::bind();
    let bob = Daemon::spawn(
        "bob",
        Role::Member,
        &["--user", "bob", "--connect", &relay.addr()],
    );
    relay.accept("bob", Vec::new());
    bob.wait_connected();
    let before = rss_kib(bob.pid());
    let count = |what: &str| count_lines(&bob, &|l: &str| l.contains(what));

    deliver_junk(&mut relay, "zed", 300, 1_000_000);
    assert_eq!(count("more than any text of at most 64 KiB"), 300);
    deliver_junk(&mut relay, "zed", 300, 60_000);
    assert_eq!(count("holding message"), 100, "{}", bob.log());
    assert_eq!(
        count("already holding 100 messages from zed, the most max_held_per_sender allows"),
        200
    );
    deliver_junk(&mut relay, "bob", 3, 100);
    assert_eq!(count("as from ourselves (bob)"), 3);
    deliver_junk(&mut relay, "Not-Valid", 3, 100);
    assert_eq!(count("is not a valid name"), 3);
    let held = rss_kib(bob.pid());

    // The relay introduces zed: the 100 are judged again (junk: rejected), in batches.
    relay.send(&FromRelay::Presence(peer_entry("zed", &identity(), true)));
    wait_until(DEADLINE, "bob to judge what he held from zed", || {
        count("unknown session and no key packet") == 100
    });
    let after = rss_kib(bob.pid());
    eprintln!("bob's RSS: {before} KiB before, {held} KiB holding, {after} KiB after release");
    for (what, kib) in [("holding", held), ("releasing", after)] {
        assert!(
            kib.saturating_sub(before) < 48 * 1024,
            "bob grew from {before} KiB to {kib} KiB {what} envelopes"
        );
    }
    status_works(&bob, "after the held envelopes");

    // forget: a pinned name with nothing held, then an unpinned one with something held.
    let out = bob.ctl(&["forget", "zed"]);
    assert_exit(&out, 0, "forget zed");
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        said.contains("dropped the pin SHA256:") && said.contains("0 held messages"),
        "{said}"
    );
    assert!(bob.peer("zed").is_none(), "zed is still in who");
    assert_eq!(
        records_of(&bob, "key").last().map(|r| r["event"].clone()),
        Some("forgotten".into())
    );
    deliver_junk(&mut relay, "yan", 3, 1000);
    let out = bob.ctl(&["forget", "yan"]);
    assert_exit(&out, 0, "forget yan");
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(said.contains("no pin; dropped 3 held messages ("), "{said}");
    let out = bob.ctl(&["forget", "yan"]);
    assert_exit(&out, 1, "forget yan again");
    assert!(
        stderr_of(&out).contains("nothing to forget"),
        "{}",
        stderr_of(&out)
    );
}

/// Point 7: `max_queue_bytes` bounds the bytes queued for one user. A raw client logged in as
/// mallory queues envelopes for an offline victim until the relay refuses with `queue_full`
/// naming the byte limit; one item larger than the whole limit is refused as `too_large` (it
/// could never fit); other users' queues are untouched, and the victim gets what was accepted.
#[test]
fn max_queue_bytes_refuses_a_sender_once_the_bytes_are_queued() {
    let relay = relay_with(&["--max-queue-bytes", "100000"]);
    let addr = relay.addr();
    let (id_mallory, id_victim) = (identity(), identity());
    // The victim registers and goes away, so everything for them is queued.
    drop(login(&addr, "victim", &id_victim));
    let mut m = login(&addr, "mallory", &id_mallory);
    let mut accepted = 0;
    let refusal = loop {
        let item = junk_envelope("mallory", "victim", accepted, 30_000);
        m.send(&ToRelay::Send(item));
        match m.recv_relay(DEADLINE) {
            Some(FromRelay::Accepted(_)) => accepted += 1,
            Some(FromRelay::Refused { code, reason, .. }) => break (code.to_string(), reason),
            Some(FromRelay::Presence(_)) => {}
            other => fail(&format!("expected Accepted or Refused, got {other:?}")),
        }
        if accepted > 10 {
            fail("the relay queued more than 300 KB for one user with max_queue_bytes 100000");
        }
    };
    assert_eq!(
        accepted, 3,
        "three 30 KB items fit in 100,000 bytes, a fourth does not"
    );
    assert_eq!(refusal.0, "queue_full", "{refusal:?}");
    assert!(refusal.1.contains("max_queue_bytes"), "{refusal:?}");
    let big = junk_envelope("mallory", "mallory", 99, 200_000);
    m.send(&ToRelay::Send(big));
    match m.recv_relay(DEADLINE) {
        Some(FromRelay::Refused { code, reason, .. }) => {
            assert_eq!(code, "too_large", "{reason}");
            assert!(reason.contains("max_queue_bytes"), "{reason}");
        }
        other => fail(&format!("expected too_large, got {other:?}")),
    }
    // The victim logs in and gets the three accepted items.
    let mut v = login(&addr, "victim", &id_victim);
    let mut got = 0;
    while got < 3 {
        match v.recv_relay(DEADLINE) {
            Some(FromRelay::Deliver(_)) => got += 1,
            Some(FromRelay::Presence(_)) => {}
            other => fail(&format!("victim got {other:?} after {got} deliveries")),
        }
    }
}

/// Point 7: `control_idle_timeout` closes a control client that connects and says nothing, so
/// local clients cannot hold every `max_control_clients` slot; a `tail -f` and a `send --wait`
/// that outlive the timeout are not idle and are served to the end; `chatctl send` reading
/// stdin survives a pause longer than the timeout.
#[test]
fn control_idle_timeout_closes_a_silent_control_client_only() {
    let relay = Daemon::relay();
    let alice = Daemon::spawn(
        "alice",
        Role::Member,
        &[
            "--user",
            "alice",
            "--connect",
            &relay.addr(),
            "--control-idle-timeout",
            "1",
        ],
    );
    alice.wait_connected();
    let mut bob = Daemon::member("bob", &relay.addr());
    alice.wait_peer_online("bob", true);
    let follower = alice.follow(&["-f", "-n", "0"]);
    let start = Instant::now();
    let mut silent = Raw::unix(&alice.socket());
    match silent.next(DEADLINE) {
        Next::Closed => {}
        other => fail(&format!(
            "a silent control client was not closed: {other:?}"
        )),
    }
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "closed after {:?}, before the 1 s timeout",
        start.elapsed()
    );
    assert!(alice
        .log()
        .contains("no request for 1 s (control_idle_timeout)"));
    // The follower outlived the timeout and still gets new records.
    deliver(&bob, "alice", "to the follower");
    let mut seen = Vec::new();
    follower.wait_record("the message after the idle timeout", &mut seen, |r| {
        r["text"] == "to the follower"
    });
    // stdin lines with a pause longer than the timeout between them.
    let mut cmd = alice.ctl_cmd(&["send", "bob"]);
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("spawn chatctl send");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"first line\n").expect("write");
    bob.wait_message("first line");
    // A pause longer than the timeout: a client opened now is closed as idle before the next
    // line is written.
    let mut clock = Raw::unix(&alice.socket());
    assert!(
        matches!(clock.next(DEADLINE), Next::Closed),
        "the second silent client was not closed"
    );
    stdin.write_all(b"second line\n").expect("write");
    drop(stdin);
    let out = wait_for(DEADLINE, "chatctl send to finish", || {
        child.try_wait().ok().flatten()
    });
    assert!(out.success(), "chatctl send with a pause exited {out}");
    bob.wait_message("second line");
    // A `send --wait` that waits longer than the timeout is not idle: it times out as asked.
    bob.stop();
    let out = alice.ctl(&[
        "send",
        "--wait",
        "delivered",
        "--timeout",
        "3",
        "bob",
        "away",
    ]);
    assert_exit(&out, 4, "send --wait delivered to an absent bob, 3 s");
}

/// Point 6: `chatctl forget bob` on the relay drops bob's queue; each message in it becomes
/// `failed` for its sender, with the reason, instead of `relayed` forever: at once for a sender
/// who is online, at the next login for one who is not (the relay keeps the notice).
#[test]
fn forget_on_the_relay_fails_the_dropped_messages_for_their_senders() {
    let relay = Daemon::relay();
    let addr = relay.addr();
    let alice = Daemon::member("alice", &addr);
    let mut carol = Daemon::member("carol", &addr);
    let mut bob = Daemon::member("bob", &addr);
    alice.wait_peer_online("bob", true);
    carol.wait_peer_online("bob", true);
    bob.stop();
    alice.wait_peer_online("bob", false);
    let id_of = |d: &Daemon, text: &str| -> String {
        let sent = d.ctl_json(&["send", "--wait", "relay", "bob", text]);
        sent[0]["id"]
            .as_str()
            .unwrap_or_else(|| fail("no id"))
            .to_string()
    };
    let from_alice = id_of(&alice, "for bob, from alice");
    let from_carol = id_of(&carol, "for bob, from carol");
    carol.stop();
    let out = relay.ctl(&["forget", "bob"]);
    assert_exit(&out, 0, "forget bob on the relay");
    let failed = |d: &Daemon, id: &str| {
        wait_for(
            DEADLINE,
            &format!("{} to see {id} failed", d.label()),
            || {
                d.tail(&["--kind", "receipt"])
                    .into_iter()
                    .find(|r| r["id"] == id && r["state"] == "failed")
            },
        )
    };
    let r = failed(&alice, &from_alice);
    let reason = r["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("forgotten: the relay operator forgot bob"),
        "{reason}"
    );
    carol.start_stopped();
    let r = failed(&carol, &from_carol);
    assert!(r["reason"]
        .as_str()
        .unwrap_or_default()
        .starts_with("forgotten:"));
    // Told once: a second login of carol brings no second notice.
    carol.stop();
    carol.start_stopped();
    carol.wait_connected();
    status_works(&carol, "after the second login");
    let fails = carol
        .tail(&["--kind", "receipt"])
        .into_iter()
        .filter(|r| r["state"] == "failed")
        .count();
    assert_eq!(fails, 1);
}

/// Point 6: a recipient that lost its session keys (here: its `recv_sessions` table deleted
/// while it was stopped, as a restore from an old backup would) cannot open the next message of
/// the session, which has no key packet. It asks the sender, with a signed `Rekey`, to send the
/// key again; the sender sends the message again with the key packet, and it arrives: the
/// sender's `send --wait delivered` succeeds instead of the message staying `relayed` forever.
#[test]
fn a_recipient_that_lost_its_session_key_gets_the_message_anyway() {
    let relay = Daemon::relay();
    let addr = relay.addr();
    let alice = Daemon::member("alice", &addr);
    let mut bob = Daemon::member("bob", &addr);
    alice.wait_peer_online("bob", true);
    // The first message sets up the session; its receipt stops the key packet riding along.
    deliver(&alice, "bob", "first, with the key packet");
    bob.stop();
    let db = bob.state_dir().join("chatd.db");
    {
        let conn = rusqlite::Connection::open(&db).expect("open bob's database");
        let n = conn
            .execute("DELETE FROM recv_sessions", [])
            .expect("delete bob's session keys");
        assert!(n >= 1, "bob had no receiving session to lose");
    }
    bob.start_stopped();
    alice.wait_peer_online("bob", true);
    deliver(&alice, "bob", "second, in the same session");
    bob.wait_message("second, in the same session");
    assert!(bob
        .log()
        .contains("asking alice to send the session's key again"));
    assert!(alice.log().contains("bob lost the key of session"));
    assert_eq!(
        incoming_texts(&bob),
        ["first, with the key packet", "second, in the same session"]
    );
    // New messages use a new session: they arrive without another request.
    deliver(&alice, "bob", "third");
    assert_eq!(
        count_lines(&bob, &|l| l.contains("asked alice to send the key")),
        1
    );
}

/// Point 6, the relay's side of a rekey: a forged request (bad signature) is acknowledged and
/// ignored; a genuine one (signed by alice's key, which bob pinned) gets the message sent again
/// with its session's key packet; a replay of the genuine one is ignored.
#[test]
fn a_relay_cannot_forge_or_replay_a_rekey_request() {
    use chatd::crypto::sign_rekey;
    use chatd::proto::relay::Rekey;

    let mut relay = FakeRelay::bind();
    let bob = Daemon::spawn(
        "bob",
        Role::Member,
        &["--user", "bob", "--connect", &relay.addr()],
    );
    let alice = identity();
    relay.accept("bob", vec![peer_entry("alice", &alice, true)]);
    bob.wait_connected();
    assert_exit(&bob.ctl(&["send", "alice", "hello"]), 0, "send to alice");
    let env = match relay.recv(DEADLINE) {
        Some(ToRelay::Send(Routed::Message(env))) => env,
        other => fail(&format!("expected bob's message, got {other:?}")),
    };
    assert!(
        env.key_packet.is_some(),
        "a new session's first message has its key packet"
    );
    relay.send(&FromRelay::Accepted(ItemKey {
        kind: Kind::Message,
        id: env.id,
    }));
    // The Ack of the rekey request, and how many messages were sent again before it.
    let ack_of = |relay: &mut FakeRelay, what: &str| -> usize {
        let mut again = 0;
        loop {
            match relay.recv(DEADLINE) {
                Some(ToRelay::Ack(k)) if k.kind == Kind::Rekey && k.id == env.id => return again,
                Some(ToRelay::Send(Routed::Message(e))) => {
                    assert_eq!(e.id, env.id, "the same message again");
                    assert_eq!(e.ciphertext, env.ciphertext, "not sealed again");
                    assert!(e.key_packet.is_some(), "now with the key packet");
                    again += 1;
                }
                other => fail(&format!("{what} rekey: expected its Ack, got {other:?}")),
            }
        }
    };
    let forged = Rekey {
        id: env.id,
        from: "alice".into(),
        to: "bob".into(),
        session: env.session,
        signature: vec![7; 256],
    };
    relay.send(&FromRelay::Deliver(Routed::Rekey(forged)));
    assert_eq!(ack_of(&mut relay, "forged"), 0);
    assert!(bob
        .log()
        .contains("ignored a rekey request from alice: its signature does not verify"));
    let genuine = sign_rekey(
        &mut rand::rngs::OsRng,
        &alice,
        &env.id,
        "alice",
        "bob",
        &env.session,
    )
    .expect("sign");
    relay.send(&FromRelay::Deliver(Routed::Rekey(genuine.clone())));
    assert_eq!(ack_of(&mut relay, "genuine"), 1);
    relay.send(&FromRelay::Deliver(Routed::Rekey(genuine)));
    assert_eq!(ack_of(&mut relay, "replayed"), 0);
    assert!(bob
        .log()
        .contains("ignored a rekey request from alice: answered already"));
}

/// Point 3: `send --all` to 5,000 online peers (the issue used 20,000; a quarter keeps the test
/// near half a minute here; the fake relay gives them all one key, which costs the member the
/// same RSA work as 5,000 keys) makes 5,000 new sessions, an RSA encryption and signature each. That work is done 16 sessions a turn, so a
/// `chatctl status` issued meanwhile answers within seconds (the bound is generous for a busy
/// machine; before, it waited for the whole fan-out, 37 s in the issue), and the send still
/// goes to everyone, all or nothing.
#[test]
fn status_answers_promptly_during_a_wide_fan_out() {
    const PEERS: usize = 5_000;
    let mut relay = FakeRelay::bind();
    let bob = Daemon::spawn(
        "bob",
        Role::Member,
        &[
            "--user",
            "bob",
            "--connect",
            &relay.addr(),
            "--max-fanout",
            "20000",
        ],
    );
    let key = identity();
    let peers: Vec<Peer> = (0..PEERS)
        .map(|i| peer_entry(&format!("peer{i}"), &key, true))
        .collect();
    relay.accept("bob", peers);
    relay.drain_in_background();
    wait_until(DEADLINE, "bob to see every peer online", || {
        bob.try_status()
            .is_some_and(|s| s["peers_online"] == PEERS as u64)
    });
    // Into a file: thousands of lines would fill a pipe nobody reads until the end.
    let lines = bob.dir().join("send-all.out");
    let file = std::fs::File::create(&lines).expect("create the output file");
    let mut send = bob.ctl_cmd(&["--json", "send", "--all", "to everyone"]);
    send.stdout(std::process::Stdio::from(file))
        .stderr(std::process::Stdio::piped());
    let child = send.spawn().expect("spawn chatctl send --all");
    let mut child = ChildGuard(Some(child));
    let mut during = Vec::new();
    let start = Instant::now();
    loop {
        let asked = Instant::now();
        let status = bob.status();
        let took = asked.elapsed();
        assert!(status["connected"] == true, "{status}");
        let running = child.running();
        if running {
            during.push(took);
        }
        assert!(
            took < Duration::from_secs(5),
            "status took {took:?} during the fan-out"
        );
        if !running {
            break;
        }
        if start.elapsed() > Duration::from_secs(600) {
            fail("send --all to 5,000 peers did not finish in 10 minutes");
        }
    }
    let out = child.output();
    assert_exit(&out, 0, "send --all to 5,000 peers");
    let printed = std::fs::read(&lines).expect("read the output file");
    assert_eq!(parse_json_lines(&printed).len(), PEERS);
    assert!(
        during.len() >= 3,
        "only {} status answers while the fan-out ran",
        during.len()
    );
    let worst = during.iter().max().copied().unwrap_or_default();
    eprintln!(
        "fan-out to {PEERS} peers took {:?}; {} status answers meanwhile, the slowest {worst:?}",
        start.elapsed(),
        during.len()
    );
}

/// A child process killed when the guard is dropped (a test that fails leaves none behind).
struct ChildGuard(Option<std::process::Child>);

impl ChildGuard {
    fn running(&mut self) -> bool {
        self.0
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn output(&mut self) -> Output {
        let c = self.0.take().unwrap_or_else(|| fail("no child"));
        c.wait_with_output().expect("child output")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
