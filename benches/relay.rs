//! Relay throughput and latency (issue 12, point 6): a real `chatd` relay process, driven over
//! TCP (through TLS 1.3 when the relay speaks it, found out by `common::probe`) by raw members
//! that log in for real and send junk envelopes (the relay cannot tell, it never opens them).
//! Run:
//!
//! ```text
//! cargo build --release && cargo bench --bench relay                 # target/release/chatd
//! cargo bench --bench relay -- --chatd OLD/chatd --chatd target/release/chatd   # compare
//! cargo bench --bench relay -- --help                               # every option
//! ```
//!
//! Three measurements, each repeated `--runs` times on a fresh relay (new state directory, so
//! one run's queue does not weigh on the next), each run's figure printed and the median last:
//!
//! - **throughput 1→1** and **50→50**: P senders each send `--messages` envelopes of `--size`
//!   bytes of ciphertext to their own receiver, keeping at most `--window` sent and not yet
//!   `Accepted` (the credit window a member's outbox has); each receiver `Ack`s every `Deliver`,
//!   as a member does once it stored the message. Messages per second from the first send to the
//!   last delivery, over all pairs; and the relay's CPU time over the run per message (from
//!   /proc, in 10 ms clock ticks), which the clients on the same machine do not skew.
//! - **ping-pong**: one message at a time from a to b, b answers with one back to a; the round
//!   trip (a's send to a's receipt of b's answer, both through the relay, each acknowledged)
//!   at the 50th and 99th percentile over `--pings` round trips.
//!
//! The relay commits each event-loop turn with one fsync, so these figures include the disk's
//! sync latency (the same for every build measured). The members run on threads of this process,
//! on the same machine as the relay: their own TLS and framing share the CPU with it.

mod common;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use chatd::crypto::Identity;
use chatd::proto::frame::{self, Decoded, MAX_FRAME};
use chatd::proto::relay::{Envelope, FromRelay, Routed, ToRelay};
use chatd::proto::{encode_frame, from_payload};
use common::{Mode, Wire};

const USAGE: &str = "\
cargo bench --bench relay -- [OPTIONS]

  --chatd PATH     a chatd to run as the relay (its chatctl beside it asks the port); give it
                   twice or more to compare builds: their runs alternate, and each build's
                   medians are printed with the ratio to the first [target/release/chatd]
  --runs R         runs of each measurement; the median is reported [5]
  --messages M     envelopes per sender in a throughput run [3000 for 1->1, 200 for 50->50]
  --window W       envelopes a sender has sent and not yet seen Accepted [64]
  --size B         ciphertext bytes per envelope [256]
  --pings K        round trips per ping-pong run [1000]
  --only WHAT      one of: 1to1, 50to50, pingpong";

/// Every wait has this deadline: a relay that stops answering fails the run, not the machine.
const DEADLINE: Duration = Duration::from_secs(120);

struct Opts {
    builds: Vec<PathBuf>,
    runs: usize,
    messages: Option<usize>,
    window: usize,
    size: usize,
    pings: usize,
    only: Option<String>,
}

fn parse_opts() -> Result<Opts, String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut o = Opts {
        builds: Vec::new(),
        runs: 5,
        messages: None,
        window: 64,
        size: 256,
        pings: 1000,
        only: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |what: &str| args.next().ok_or_else(|| format!("{what} needs a value"));
        let num = |v: String, what: &str| {
            v.parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{what} needs a positive number, not {v:?}"))
        };
        match a.as_str() {
            "--chatd" => o.builds.push(PathBuf::from(value("--chatd")?)),
            "--runs" => o.runs = num(value("--runs")?, "--runs")?,
            "--messages" => o.messages = Some(num(value("--messages")?, "--messages")?),
            "--window" => o.window = num(value("--window")?, "--window")?,
            "--size" => o.size = num(value("--size")?, "--size")?,
            "--pings" => o.pings = num(value("--pings")?, "--pings")?,
            "--only" => o.only = Some(value("--only")?),
            "--help" | "-h" => return Err(USAGE.into()),
            // cargo bench passes --bench to every harness = false target.
            "--bench" => {}
            other => return Err(format!("unknown option {other:?}\n\n{USAGE}")),
        }
    }
    if o.builds.is_empty() {
        o.builds.push(root.join("target/release/chatd"));
    }
    for b in &o.builds {
        for p in [b.clone(), b.with_file_name("chatctl")] {
            if !p.is_file() {
                return Err(format!(
                    "{} does not exist (cargo build --release, or give --chatd)",
                    p.display()
                ));
            }
        }
    }
    Ok(o)
}

// ---------------------------------------------------------------------------------------------
// The relay process.

/// A relay on a free loopback port in a temporary directory, killed on drop.
struct RelayProc {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl RelayProc {
    fn start(chatd: &std::path::Path) -> Result<RelayProc, String> {
        let chatctl = chatd.with_file_name("chatctl");
        let dir = tempfile::Builder::new()
            .prefix("chatd-relay-bench-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        // chatd insists the control socket's directory is private.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .map_err(|e| e.to_string())?;
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).map_err(|e| e.to_string())?;
        let socket = dir.path().join("control.sock");
        let log = std::fs::File::create(dir.path().join("relay.log")).map_err(|e| e.to_string())?;
        let child = Command::new(chatd)
            .args(["--listen", "127.0.0.1:0", "--key-bits", "2048"])
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--socket")
            .arg(&socket)
            // Every sender's names share a few keys, registered at once.
            .args([
                "--max-names-per-key",
                "100000",
                "--new-names-per-minute",
                "100000",
            ])
            .env("RUST_LOG", "warn")
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join("config"))
            .env_remove("STATE_DIRECTORY")
            .env_remove("RUNTIME_DIRECTORY")
            .env_remove("CONFIGURATION_DIRECTORY")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", chatd.display()))?;
        let mut relay = RelayProc {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = relay.child.try_wait() {
                let log = std::fs::read_to_string(relay._dir.path().join("relay.log"));
                return Err(format!(
                    "the relay exited at start-up: {st}: {}",
                    log.unwrap_or_default().trim()
                ));
            }
            let out = Command::new(&chatctl)
                .arg("--socket")
                .arg(&socket)
                .args(["--json", "status"])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output();
            if let Ok(out) = out {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
                if let Some(a) = v["listen"]
                    .as_str()
                    .and_then(|a| a.parse::<SocketAddr>().ok())
                {
                    relay.addr = SocketAddr::from(([127, 0, 0, 1], a.port()));
                    return Ok(relay);
                }
            }
            thread::sleep(Duration::from_millis(50));
        }
        Err("the relay did not report its address within 30 s".into())
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// A raw member: blocking, one thread each.

struct Member {
    wire: Wire<TcpStream>,
    buf: Vec<u8>,
    chunk: Vec<u8>,
    name: String,
    counter: u64,
}

impl Member {
    /// Connect, log in as `name` with `key`, and return once `Welcome` came.
    fn login(
        addr: SocketAddr,
        mode: Mode,
        cfg: &Arc<rustls::ClientConfig>,
        name: &str,
        key: &Identity,
    ) -> io::Result<Member> {
        let tcp = TcpStream::connect(addr)?;
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(DEADLINE))?;
        tcp.set_write_timeout(Some(DEADLINE))?;
        let mut m = Member {
            wire: Wire::new(tcp, mode, cfg)?,
            buf: Vec::new(),
            chunk: vec![0; 64 * 1024],
            name: name.to_string(),
            counter: 0,
        };
        m.wire.flush()?;
        let nonce = match m.recv()? {
            FromRelay::Challenge { nonce, .. } => nonce,
            other => {
                return Err(io::Error::other(format!(
                    "expected Challenge, got {other:?}"
                )))
            }
        };
        let t = common::transcript(&m.wire, &nonce, name);
        let signature = key
            .sign(&mut rand::thread_rng(), &t)
            .map_err(|e| io::Error::other(e.to_string()))?;
        m.send(&ToRelay::Login {
            user: name.to_string(),
            key: key.public().der().to_vec(),
            signature,
        })?;
        loop {
            match m.recv()? {
                FromRelay::Welcome { .. } => return Ok(m),
                FromRelay::Error { code, reason } => {
                    return Err(io::Error::other(format!("{name}: {code}: {reason}")))
                }
                _ => {}
            }
        }
    }

    fn send(&mut self, msg: &ToRelay) -> io::Result<()> {
        let mut f = Vec::new();
        encode_frame(msg, &mut f).map_err(|e| io::Error::other(e.to_string()))?;
        self.wire.write_all(&f)?;
        self.wire.flush()
    }

    /// An envelope of `size` junk bytes to `to`.
    fn envelope(&mut self, to: &str, size: usize) -> ToRelay {
        self.counter += 1;
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.counter.to_be_bytes());
        id[8..].copy_from_slice(&(self.name.len() as u64 ^ 0x5a5a).to_be_bytes());
        // Names differ, and ids must too: fold the name in.
        for (i, b) in self.name.bytes().enumerate() {
            id[8 + i % 8] ^= b;
        }
        ToRelay::Send(Routed::Message(Envelope {
            id,
            from: self.name.clone(),
            to: to.to_string(),
            time_ms: 0,
            session: [7; 16],
            counter: self.counter,
            key_packet: None,
            ciphertext: vec![0xab; size],
        }))
    }

    fn recv(&mut self) -> io::Result<FromRelay> {
        loop {
            match frame::decode(&self.buf, MAX_FRAME)
                .map_err(|e| io::Error::other(e.to_string()))?
            {
                Decoded::Frame { payload, consumed } => {
                    let msg = from_payload::<FromRelay>(payload)
                        .map_err(|e| io::Error::other(e.to_string()));
                    self.buf.drain(..consumed);
                    return msg;
                }
                Decoded::NeedMore => {}
            }
            let n = self.wire.read(&mut self.chunk)?;
            if n == 0 {
                return Err(io::Error::other("the relay closed the connection"));
            }
            self.buf.extend_from_slice(&self.chunk[..n]);
        }
    }
}

fn keys() -> Vec<Identity> {
    thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|_| s.spawn(|| Identity::generate(&mut rand::thread_rng(), 2048)))
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("key thread").expect("an RSA key"))
            .collect()
    })
}

/// Log in `names` on `threads` threads at once.
fn login_all(
    addr: SocketAddr,
    mode: Mode,
    names: &[String],
    keys: &[Identity],
) -> Result<Vec<Member>, String> {
    let cfg = common::client_config();
    thread::scope(|s| {
        let hs: Vec<_> = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let cfg = cfg.clone();
                s.spawn(move || Member::login(addr, mode, &cfg, n, &keys[i % keys.len()]))
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| "a login thread panicked".to_string())?
                    .map_err(|e| format!("login: {e}"))
            })
            .collect()
    })
}

// ---------------------------------------------------------------------------------------------
// The measurements.

/// Messages per second, P pairs, M messages per sender.
fn throughput(
    o: &Opts,
    chatd: &std::path::Path,
    keys: &[Identity],
    pairs: usize,
    messages: usize,
) -> Result<(f64, Option<f64>, Mode), String> {
    let relay = RelayProc::start(chatd)?;
    let mode = common::probe(relay.addr).map_err(|e| format!("probe: {e}"))?;
    let senders: Vec<String> = (0..pairs).map(|i| format!("s{i:03}")).collect();
    let receivers: Vec<String> = (0..pairs).map(|i| format!("r{i:03}")).collect();
    let rx = login_all(relay.addr, mode, &receivers, keys)?;
    let tx = login_all(relay.addr, mode, &senders, keys)?;
    let start = Arc::new(Barrier::new(2 * pairs + 1));
    let (window, size) = (o.window, o.size);
    let took = thread::scope(|s| -> Result<(Duration, Option<Duration>), String> {
        let mut hs = Vec::new();
        for mut m in rx {
            let start = Arc::clone(&start);
            hs.push(s.spawn(move || -> Result<Instant, String> {
                start.wait();
                let mut got = 0;
                while got < messages {
                    match m.recv().map_err(|e| e.to_string())? {
                        FromRelay::Deliver(item) => {
                            m.send(&ToRelay::Ack(item.key()))
                                .map_err(|e| e.to_string())?;
                            got += 1;
                        }
                        FromRelay::Error { code, reason } => {
                            return Err(format!("{code}: {reason}"))
                        }
                        _ => {}
                    }
                }
                Ok(Instant::now())
            }));
        }
        for (i, mut m) in tx.into_iter().enumerate() {
            let start = Arc::clone(&start);
            let to = format!("r{i:03}");
            hs.push(s.spawn(move || -> Result<Instant, String> {
                start.wait();
                let (mut sent, mut accepted) = (0, 0);
                while accepted < messages {
                    while sent < messages && sent - accepted < window {
                        let e = m.envelope(&to, size);
                        m.send(&e).map_err(|e| e.to_string())?;
                        sent += 1;
                    }
                    match m.recv().map_err(|e| e.to_string())? {
                        FromRelay::Accepted(_) => accepted += 1,
                        FromRelay::Refused { code, reason, .. } => {
                            return Err(format!("refused: {code}: {reason}"))
                        }
                        FromRelay::Error { code, reason } => {
                            return Err(format!("{code}: {reason}"))
                        }
                        _ => {}
                    }
                }
                Ok(Instant::now())
            }));
        }
        start.wait();
        let t0 = Instant::now();
        let cpu0 = common::cpu_time(relay.child.id());
        let mut last = t0;
        for h in hs {
            let t = h
                .join()
                .map_err(|_| "a member thread panicked".to_string())??;
            last = last.max(t);
        }
        Ok((last - t0, cpu0))
    })?;
    let (took, cpu0) = took;
    // What the relay spent on the run (its CPU time over it), per message: the clients share the
    // machine, so this is the figure that does not depend on them.
    let n = (pairs * messages) as f64;
    let per = cpu0
        .zip(common::cpu_time(relay.child.id()))
        .map(|(a, z)| z.saturating_sub(a).as_secs_f64() * 1e6 / n);
    drop(relay);
    Ok((n / took.as_secs_f64(), per, mode))
}

/// Round trips a → b → a, one at a time: their durations, sorted.
fn ping_pong(
    o: &Opts,
    chatd: &std::path::Path,
    keys: &[Identity],
) -> Result<(Vec<Duration>, Mode), String> {
    let relay = RelayProc::start(chatd)?;
    let mode = common::probe(relay.addr).map_err(|e| format!("probe: {e}"))?;
    let names = ["ping".to_string(), "pong".to_string()];
    let mut ms = login_all(relay.addr, mode, &names, keys)?;
    let (mut b, mut a) = (ms.pop().ok_or("no pong")?, ms.pop().ok_or("no ping")?);
    let (pings, size) = (o.pings, o.size);
    let mut rtts = thread::scope(|s| -> Result<Vec<Duration>, String> {
        let echo = s.spawn(move || -> Result<(), String> {
            let mut answered = 0;
            while answered < pings {
                match b.recv().map_err(|e| e.to_string())? {
                    FromRelay::Deliver(item) => {
                        b.send(&ToRelay::Ack(item.key()))
                            .map_err(|e| e.to_string())?;
                        let back = b.envelope("ping", size);
                        b.send(&back).map_err(|e| e.to_string())?;
                        answered += 1;
                    }
                    FromRelay::Error { code, reason } => return Err(format!("{code}: {reason}")),
                    _ => {}
                }
            }
            Ok(())
        });
        let mut rtts = Vec::with_capacity(pings);
        for _ in 0..pings {
            let t = Instant::now();
            let e = a.envelope("pong", size);
            a.send(&e).map_err(|e| e.to_string())?;
            loop {
                match a.recv().map_err(|e| e.to_string())? {
                    FromRelay::Deliver(item) => {
                        rtts.push(t.elapsed());
                        a.send(&ToRelay::Ack(item.key()))
                            .map_err(|e| e.to_string())?;
                        break;
                    }
                    FromRelay::Error { code, reason } => return Err(format!("{code}: {reason}")),
                    _ => {}
                }
            }
        }
        echo.join()
            .map_err(|_| "the echo thread panicked".to_string())??;
        Ok(rtts)
    })?;
    drop(relay);
    rtts.sort();
    Ok((rtts, mode))
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    let o = match parse_opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&o) {
        eprintln!("relay bench: {e}");
        std::process::exit(1);
    }
}

/// Each build's median of one figure, and its ratio to the first build's.
fn summary(o: &Opts, what: &str, unit: &str, per_build: &[Vec<f64>]) {
    let medians: Vec<f64> = per_build.iter().map(|v| median(v.clone())).collect();
    for (b, m) in o.builds.iter().zip(&medians) {
        let ratio = if medians[0] > 0.0 && o.builds.len() > 1 {
            format!(" ({:.0}% of the first build)", 100.0 * m / medians[0])
        } else {
            String::new()
        };
        println!(
            "{what}: median {m:.2} {unit} over {} runs{ratio}  [{}]",
            per_build[0].len(),
            b.display()
        );
    }
}

fn run(o: &Opts) -> Result<(), String> {
    let keys = keys();
    println!(
        "relay bench: {} build(s), {} runs each, alternating; window {}, {} B envelopes",
        o.builds.len(),
        o.runs,
        o.window,
        o.size
    );
    let want = |what: &str| o.only.as_deref().map_or(true, |w| w == what);
    for (label, pairs, default_m) in [("1to1", 1, 3000), ("50to50", 50, 200)] {
        if !want(label) {
            continue;
        }
        let m = o.messages.unwrap_or(default_m);
        let mut rates = vec![Vec::new(); o.builds.len()];
        let mut cpus = vec![Vec::new(); o.builds.len()];
        for run in 1..=o.runs {
            for (i, b) in o.builds.iter().enumerate() {
                let (rate, cpu, mode) = throughput(o, b, &keys, pairs, m)?;
                let cpu_s = cpu.map_or(String::new(), |c| {
                    format!(", relay CPU {c:.2} µs per message")
                });
                println!(
                    "  throughput {pairs}->{pairs} run {run} ({mode:?}, {}): {rate:.0} msg/s ({} messages){cpu_s}",
                    b.display(),
                    pairs * m
                );
                rates[i].push(rate);
                if let Some(c) = cpu {
                    cpus[i].push(c);
                }
            }
        }
        summary(o, &format!("throughput {pairs}->{pairs}"), "msg/s", &rates);
        if cpus.iter().all(|c| c.len() == o.runs) {
            summary(
                o,
                &format!("relay CPU per message, {pairs}->{pairs}"),
                "µs",
                &cpus,
            );
        }
    }
    if want("pingpong") {
        let mut p50s = vec![Vec::new(); o.builds.len()];
        let mut p99s = vec![Vec::new(); o.builds.len()];
        for run in 1..=o.runs {
            for (i, b) in o.builds.iter().enumerate() {
                let (rtts, mode) = ping_pong(o, b, &keys)?;
                let (p50, p99) = (pct(&rtts, 0.5), pct(&rtts, 0.99));
                println!(
                    "  ping-pong run {run} ({mode:?}, {}): p50 {:.2} ms, p99 {:.2} ms ({} round trips)",
                    b.display(),
                    p50.as_secs_f64() * 1e3,
                    p99.as_secs_f64() * 1e3,
                    rtts.len()
                );
                p50s[i].push(p50.as_secs_f64() * 1e3);
                p99s[i].push(p99.as_secs_f64() * 1e3);
            }
        }
        summary(o, "ping-pong round trip p50", "ms", &p50s);
        summary(o, "ping-pong round trip p99", "ms", &p99s);
    }
    Ok(())
}
