//! End to end (issue 9's target): N lines on the standard input of `chatctl send bob`, from alice
//! to bob through a relay, all three real `chatd` processes, each committing with fsync as it
//! always does. The target is at least 10,000 messages per second for 10,000 lines. Run:
//!
//! ```text
//! cargo bench --bench e2e                                # 10,000 lines, 3 runs
//! cargo bench --bench e2e -- --lines 2000 --runs 5       # smaller, more runs
//! cargo bench --bench e2e -- --help                      # every option
//! ```
//!
//! `cargo bench` builds the release `chatd` and `chatctl` with the bench (cargo gives their paths
//! to benches as `CARGO_BIN_EXE_*`); `--chatd PATH` and `--chatctl PATH` run other builds.
//!
//! A relay (`--listen 127.0.0.1:0`) and two members, alice and bob, each in its own temporary
//! directory with its own control socket, stopped in `Drop` (SIGTERM, SIGKILL after 3 s) and killed by `PR_SET_PDEATHSIG`. Once both
//! members are connected and see each other online, one `chatctl send --wait delivered` sets up
//! the session and pins the keys, so the runs measure the per-message path only. Each run:
//!
//! 1. Writes N lines of about 100 bytes, unique to the run, into the standard input of one
//!    `chatctl --socket ALICE send bob` and closes it. The clock starts at the first byte.
//! 2. Polls bob's daemon every 20 ms with `chatctl --json tail -n 1 --kind message --since SEQ`
//!    (SEQ: bob's newest record before the run); once the run's last line is there, one
//!    `tail --kind message --since SEQ` checks that all N lines are, each once. That poll's
//!    return is the time to "all at bob", so the figure errs by at most a poll, on the slow side.
//! 3. Notes when `chatctl send` exits (its standard output closes), requires exit status 0 and
//!    counts its output lines (one `queued bob ID` per line sent).
//! 4. Waits for bob's `delivered` receipt of the last message at alice, then reads each daemon's
//!    CPU time (user plus system, from its CPU-time clock) over the run, per message.
//!
//! Every run has a 120 s deadline; a daemon that exits, a `chatctl` that fails or a deadline that
//! passes ends the bench with a message (and the daemons' logs) and a non-zero exit status.
//!
//! Everything shares the machine: the three daemons, `chatctl send` and the polling `chatctl`s
//! (a few milliseconds of CPU each, 50 a second), so the rate is that of one machine doing all of
//! it. The daemons use 2048-bit identity keys, as the tests do, to start quickly: the
//! per-message path seals and opens with the session key and never touches RSA.

mod common;

use std::collections::HashSet;
use std::error::Error;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

const USAGE: &str = "\
cargo bench --bench e2e -- [OPTIONS]

  --lines N      lines written to `chatctl send bob`'s standard input per run [10000]
  --runs R       runs; each is printed, then the medians [3]
  --chatd PATH, --chatctl PATH   binaries to run [the ones cargo built with the bench]";

type Res<T> = Result<T, Box<dyn Error>>;

/// One run, from the first byte written to the last receipt at alice.
const RUN_DEADLINE: Duration = Duration::from_secs(120);
/// A daemon's start (key generation included) and the members' login and directory.
const START_DEADLINE: Duration = Duration::from_secs(60);
/// One `chatctl` query; above `send --wait`'s timeout, which the warm-up gives as 60 s.
const CTL_DEADLINE: Duration = Duration::from_secs(90);
/// Between polls: small against a run of about a second, and few enough `chatctl`s that they
/// do not weigh much on the CPU the daemons share with them.
const POLL: Duration = Duration::from_millis(20);
/// Bytes of one line with its newline.
const LINE_BYTES: usize = 100;

struct Opts {
    chatd: PathBuf,
    chatctl: PathBuf,
    runs: usize,
    lines: usize,
}

/// What the command line asks for: a bench to run, or the usage text.
enum Parsed {
    Run(Opts),
    Help,
}

fn parse_opts() -> Result<Parsed, String> {
    let mut o = Opts {
        chatd: PathBuf::from(env!("CARGO_BIN_EXE_chatd")),
        chatctl: PathBuf::from(env!("CARGO_BIN_EXE_chatctl")),
        runs: 3,
        lines: 10_000,
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
            "--chatd" => o.chatd = PathBuf::from(value("--chatd")?),
            "--chatctl" => o.chatctl = PathBuf::from(value("--chatctl")?),
            "--runs" => o.runs = num(value("--runs")?, "--runs")?,
            "--lines" => o.lines = num(value("--lines")?, "--lines")?,
            "--help" | "-h" => return Ok(Parsed::Help),
            // cargo bench passes --bench to every harness = false target.
            "--bench" => {}
            other => return Err(format!("unknown option {other:?}\n\n{USAGE}")),
        }
    }
    for p in [&o.chatd, &o.chatctl] {
        if !p.is_file() {
            return Err(format!("{} does not exist", p.display()));
        }
    }
    Ok(Parsed::Run(o))
}

// ---------------------------------------------------------------------------------------------
// Child processes.

/// A child that is not a daemon (`chatctl send`), killed and reaped on drop.
struct Guard(Option<Child>);

impl Guard {
    fn child(&mut self) -> Res<&mut Child> {
        Ok(self.0.as_mut().ok_or("the child was already reaped")?)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Read `pipe` to its end on a thread, and send what it held, tagged with `which`.
fn drain(mut pipe: impl Read + Send + 'static, which: usize, tx: mpsc::Sender<(usize, Vec<u8>)>) {
    thread::spawn(move || {
        let mut v = Vec::new();
        let _ = pipe.read_to_end(&mut v);
        let _ = tx.send((which, v));
    });
}

/// Run `cmd` to its end with no input, killed at `limit`. Its pipes closing is what ends the
/// wait, so a quick query costs no polling delay.
fn run_bounded(mut cmd: Command, limit: Duration) -> Res<Output> {
    let desc = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = Guard(Some(
        cmd.spawn().map_err(|e| format!("cannot run {desc}: {e}"))?,
    ));
    let (tx, rx) = mpsc::channel();
    let c = child.child()?;
    drain(c.stdout.take().ok_or("stdout not piped")?, 0, tx.clone());
    drain(c.stderr.take().ok_or("stderr not piped")?, 1, tx);
    let deadline = Instant::now() + limit;
    let mut pipes = [Vec::new(), Vec::new()];
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((which, v)) => pipes[which] = v,
            // Dropping the guard kills it.
            Err(_) => return Err(format!("{desc} did not finish within {limit:?}").into()),
        }
    }
    let status = child.child()?.wait()?;
    child.0 = None;
    let [stdout, stderr] = pipes;
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Each line of `stdout` as JSON.
fn json_lines(stdout: &[u8]) -> Res<Vec<Value>> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| format!("not JSON ({e}): {l}").into()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The daemons.

/// A running `chatd` in its own temporary directory, stopped (SIGTERM, then SIGKILL after 3 s) and reaped on drop.
struct Daemon {
    label: String,
    chatctl: PathBuf,
    child: Child,
    // Dropped after `Drop::drop` stopped the child, so the daemon never sees its directory go.
    dir: tempfile::TempDir,
}

impl Daemon {
    /// Start `chatd ROLE_ARGS` with its state, socket, log and HOME in a new directory.
    fn start(o: &Opts, label: &str, role_args: &[&str]) -> Res<Daemon> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("chatd-e2e-{label}-"))
            .tempdir()?;
        // chatd insists the control socket's directory is private.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700))?;
        let home = dir.path().join("home");
        fs::create_dir_all(&home)?;
        let log = fs::File::create(dir.path().join("chatd.log"))?;
        let mut cmd = Command::new(&o.chatd);
        cmd.args(role_args)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--socket")
            .arg(dir.path().join("ctl.sock"))
            .args(["--key-bits", "2048"])
            // Warnings only: a log line per message would be measured with the messages.
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        common::isolated_env(&mut cmd, &home);
        common::die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", o.chatd.display()))?;
        Ok(Daemon {
            label: label.to_string(),
            chatctl: o.chatctl.clone(),
            child,
            dir,
        })
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("ctl.sock")
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("chatd.log")).unwrap_or_default()
    }

    /// `chatctl --socket SOCK ARGS`, not run yet.
    fn ctl_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.chatctl);
        cmd.env_remove("CHATD_SOCKET")
            .arg("--socket")
            .arg(self.socket())
            .args(args);
        cmd
    }

    /// `chatctl --socket SOCK --json ARGS`, required to exit 0, each output line parsed.
    fn ctl_json(&self, args: &[&str]) -> Res<Vec<Value>> {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let out = run_bounded(self.ctl_cmd(&full), CTL_DEADLINE)?;
        if !out.status.success() {
            return Err(format!(
                "chatctl {} on {}: {}: {}",
                full.join(" "),
                self.label,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )
            .into());
        }
        json_lines(&out.stdout)
    }

    /// `status --json`, or None while the daemon does not answer yet.
    fn try_status(&self) -> Option<Value> {
        self.ctl_json(&["status"]).ok()?.into_iter().next()
    }

    /// An error if the daemon exited, with the end of its log.
    fn check_alive(&mut self) -> Res<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(st) => Err(format!(
                "{} exited ({st}); its log ends:\n{}",
                self.label,
                log_tail(&self.log())
            )
            .into()),
        }
    }

    fn cpu(&self) -> Option<Duration> {
        common::cpu_time(self.child.id())
    }

    /// Poll `f` until it gives a value, failing at `limit` with `what` or when the daemon exits.
    fn wait_for<T>(
        &mut self,
        limit: Duration,
        what: &str,
        mut f: impl FnMut(&Daemon) -> Res<Option<T>>,
    ) -> Res<T> {
        let deadline = Instant::now() + limit;
        loop {
            self.check_alive()?;
            if let Some(v) = f(self)? {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                return Err(format!("{what}: not within {limit:?}").into());
            }
            thread::sleep(POLL);
        }
    }

    /// The highest seq in the history, 0 when it is empty.
    fn last_seq(&self) -> Res<u64> {
        let last = self.ctl_json(&["tail", "-n", "1"])?;
        Ok(last.first().and_then(|r| r["seq"].as_u64()).unwrap_or(0))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        common::stop(&mut self.child, Duration::from_secs(3));
    }
}

fn log_tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// The three daemons, ready: the relay's port known, both members connected and seeing each
/// other online.
struct Net {
    relay: Daemon,
    alice: Daemon,
    bob: Daemon,
}

impl Net {
    fn start(o: &Opts) -> Res<Net> {
        let mut relay = Daemon::start(o, "relay", &["--listen", "127.0.0.1:0"])?;
        let port = relay.wait_for(START_DEADLINE, "the relay's listen address", |d| {
            Ok(d.try_status().and_then(|s| {
                let a: std::net::SocketAddr = s["listen"].as_str()?.parse().ok()?;
                (a.port() != 0).then_some(a.port())
            }))
        })?;
        let connect = format!("127.0.0.1:{port}");
        let alice = Daemon::start(o, "alice", &["--user", "alice", "--connect", &connect])?;
        let bob = Daemon::start(o, "bob", &["--user", "bob", "--connect", &connect])?;
        let mut net = Net { relay, alice, bob };
        for (d, peer) in [(&mut net.alice, "bob"), (&mut net.bob, "alice")] {
            let what = format!("{} connected to the relay", d.label);
            d.wait_for(START_DEADLINE, &what, |d| {
                Ok(d.try_status().filter(|s| s["connected"] == true).map(drop))
            })?;
            let what = format!("{} seeing {peer} online in `chatctl who`", d.label);
            d.wait_for(START_DEADLINE, &what, |d| {
                let who = d.ctl_json(&["who"])?;
                Ok(who
                    .iter()
                    .any(|p| p["user"] == peer && p["online"] == true)
                    .then_some(()))
            })?;
        }
        Ok(net)
    }

    fn check_alive(&mut self) -> Res<()> {
        self.relay.check_alive()?;
        self.alice.check_alive()?;
        self.bob.check_alive()
    }

    /// The daemons' CPU times, relay first.
    fn cpu(&self) -> Res<[Duration; 3]> {
        let get = |d: &Daemon| d.cpu().ok_or(format!("no CPU time for {}", d.label));
        Ok([get(&self.relay)?, get(&self.alice)?, get(&self.bob)?])
    }

    /// Everyone's log, for a failure.
    fn logs(&self) -> String {
        [&self.relay, &self.alice, &self.bob]
            .iter()
            .map(|d| {
                format!(
                    "----- {} (last lines) -----\n{}",
                    d.label,
                    log_tail(&d.log())
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

// ---------------------------------------------------------------------------------------------
// One run.

struct RunResult {
    lines: usize,
    at_bob: Duration,
    send_exit: Duration,
    send_output_lines: usize,
    /// Relay, alice, bob: CPU time over the run per message.
    cpu_per_msg: [Duration; 3],
}

/// A token no earlier run of this or another bench has used, so `--since` plus the prefix
/// pick exactly this run's lines.
fn nonce() -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ (u64::from(std::process::id()) << 40)
}

/// `n` lines of `LINE_BYTES` (newline included) that start with `prefix`, and the last one's
/// text.
fn make_lines(prefix: &str, n: usize) -> (Vec<u8>, String) {
    const FILL: &[u8] = b"the quick brown fox jumps over the lazy dog 0123456789 ";
    let mut buf = Vec::with_capacity(n * LINE_BYTES);
    let mut last = String::new();
    for i in 0..n {
        let mut line = format!("{prefix}{i:06} ").into_bytes();
        let mut k = i;
        while line.len() < LINE_BYTES - 1 {
            line.push(FILL[k % FILL.len()]);
            k += 1;
        }
        last = String::from_utf8_lossy(&line).into_owned();
        buf.extend_from_slice(&line);
        buf.push(b'\n');
    }
    (buf, last)
}

/// What bob holds of the run: the run's incoming messages from alice after `since`, counted
/// once each, and whether `last` is the newest of them (then none came after the poll that saw
/// it).
fn count_at_bob(bob: &Daemon, since: u64, prefix: &str, last: &str) -> Res<(usize, usize, bool)> {
    let since = since.to_string();
    let recs = bob.ctl_json(&[
        "tail", "--kind", "message", "--with", "alice", "--since", &since,
    ])?;
    let mut texts = HashSet::new();
    let mut total = 0;
    let mut newest = "";
    for r in &recs {
        let text = r["text"].as_str().unwrap_or_default();
        if r["dir"] == "in" && r["from"] == "alice" && text.starts_with(prefix) {
            total += 1;
            texts.insert(text);
            newest = text;
        }
    }
    Ok((texts.len(), total, newest == last))
}

fn run_once(o: &Opts, net: &mut Net, run: usize) -> Res<RunResult> {
    let prefix = format!("e2e {:016x} run {run} line ", nonce());
    let (input, last) = make_lines(&prefix, o.lines);
    let since = net.bob.last_seq()?;
    let alice_since = net.alice.last_seq()?.to_string();
    let since_s = since.to_string();

    let mut cmd = net.alice.ctl_cmd(&["send", "bob"]);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    common::die_with_parent(&mut cmd);
    let cpu0 = net.cpu()?;
    let mut send = Guard(Some(
        cmd.spawn()
            .map_err(|e| format!("cannot start chatctl send: {e}"))?,
    ));
    let c = send.child()?;
    let mut stdin = c.stdin.take().ok_or("stdin not piped")?;
    let stdout = c.stdout.take().ok_or("stdout not piped")?;
    let (err_tx, err_rx) = mpsc::channel();
    drain(c.stderr.take().ok_or("stderr not piped")?, 0, err_tx);
    // Its standard output closing is the moment chatctl exits; the last line names the last id.
    let out_reader = thread::spawn(move || -> (usize, String, Instant) {
        let mut n = 0;
        let mut last_line = String::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            n += 1;
            last_line = line;
        }
        (n, last_line, Instant::now())
    });
    let (t0_tx, t0_rx) = mpsc::channel();
    let writer = thread::spawn(move || -> io::Result<()> {
        let _ = t0_tx.send(Instant::now());
        stdin.write_all(&input)?;
        // Dropping stdin closes it: the end of the lines.
        Ok(())
    });
    let t0 = t0_rx.recv_timeout(CTL_DEADLINE)?;
    let deadline = t0 + RUN_DEADLINE;

    let fail = |net: &Net, what: String| -> Box<dyn Error> {
        format!("run {run}: {what}\n{}", net.logs()).into()
    };
    let mut exited: Option<ExitStatus> = None;
    let mut last_seen = false;
    let at_bob = loop {
        net.check_alive()?;
        if exited.is_none() {
            exited = send.child()?.try_wait()?;
        }
        if let Some(st) = exited.filter(|s| !s.success()) {
            let stderr = err_rx.recv_timeout(CTL_DEADLINE).unwrap_or_default().1;
            return Err(fail(
                net,
                format!(
                    "chatctl send exited with {st}: {}",
                    String::from_utf8_lossy(&stderr).trim()
                ),
            ));
        }
        if !last_seen {
            let newest = net.bob.ctl_json(&[
                "tail", "-n", "1", "--kind", "message", "--with", "alice", "--since", &since_s,
            ])?;
            last_seen = newest.first().is_some_and(|r| r["text"] == last.as_str());
        }
        let polled = Instant::now();
        if last_seen {
            let (unique, total, last_is_newest) = count_at_bob(&net.bob, since, &prefix, &last)?;
            if total > unique {
                return Err(fail(
                    net,
                    format!("bob stored {} lines twice", total - unique),
                ));
            }
            if unique == o.lines {
                // Stored in order: all were there at the poll that saw the last one. Otherwise
                // all were there only by now.
                break if last_is_newest {
                    polled
                } else {
                    Instant::now()
                };
            }
        }
        if Instant::now() >= deadline {
            let (unique, _, _) = count_at_bob(&net.bob, since, &prefix, &last)?;
            return Err(fail(
                net,
                format!(
                    "bob holds {unique} of the {} lines after {RUN_DEADLINE:?}",
                    o.lines
                ),
            ));
        }
        thread::sleep(POLL);
    };

    // The send must end on its own; it has had all its input for a while.
    let status = loop {
        if let Some(st) = exited {
            break st;
        }
        if Instant::now() >= deadline {
            return Err(fail(
                net,
                format!("chatctl send still runs after {RUN_DEADLINE:?}"),
            ));
        }
        thread::sleep(POLL);
        exited = send.child()?.try_wait()?;
    };
    send.0 = None;
    let stderr = err_rx.recv_timeout(CTL_DEADLINE).unwrap_or_default().1;
    if !status.success() {
        return Err(fail(
            net,
            format!(
                "chatctl send exited with {status}: {}",
                String::from_utf8_lossy(&stderr).trim()
            ),
        ));
    }
    writer
        .join()
        .map_err(|_| "the writer thread panicked")?
        .map_err(|e| format!("run {run}: writing chatctl send's stdin: {e}"))?;
    let (send_output_lines, last_line, closed) = out_reader
        .join()
        .map_err(|_| "the reader thread panicked")?;

    // The run's work ends with alice storing bob's receipt of the last message; the CPU time of
    // the receipts belongs to the messages.
    let last_id = last_line
        .split_whitespace()
        .nth(2)
        .ok_or_else(|| {
            fail(
                net,
                format!("chatctl send's last line {last_line:?} has no id"),
            )
        })?
        .to_string();
    let left = deadline.saturating_duration_since(Instant::now());
    let receipt = net.alice.wait_for(left, "alice's delivered receipt", |d| {
        let recs = d.ctl_json(&[
            "tail",
            "-n",
            "3",
            "--kind",
            "receipt",
            "--since",
            &alice_since,
        ])?;
        Ok(recs
            .iter()
            .any(|r| r["id"] == last_id.as_str() && r["state"] == "delivered")
            .then_some(()))
    });
    if let Err(e) = receipt {
        return Err(fail(net, format!("{e} (the last message, {last_id})")));
    }
    let cpu1 = net.cpu()?;
    let n = o.lines as u32;
    let per = |i: usize| cpu1[i].saturating_sub(cpu0[i]) / n;
    Ok(RunResult {
        lines: o.lines,
        at_bob: at_bob - t0,
        send_exit: closed - t0,
        send_output_lines,
        cpu_per_msg: [per(0), per(1), per(2)],
    })
}

// ---------------------------------------------------------------------------------------------

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn run(o: &Opts) -> Res<()> {
    println!(
        "e2e bench: {} lines of {LINE_BYTES} B alice -> relay -> bob, {} runs  [{}]",
        o.lines,
        o.runs,
        o.chatd.display()
    );
    let mut net = Net::start(o)?;
    let warm = run_bounded(
        net.alice.ctl_cmd(&[
            "send",
            "--wait",
            "delivered",
            "--timeout",
            "60",
            "bob",
            "warm-up",
        ]),
        CTL_DEADLINE,
    )?;
    if !warm.status.success() {
        return Err(format!(
            "the warm-up message: chatctl send exited with {}: {}\n{}",
            warm.status,
            String::from_utf8_lossy(&warm.stderr).trim(),
            net.logs()
        )
        .into());
    }
    let mut results = Vec::new();
    for r in 1..=o.runs {
        let res = run_once(o, &mut net, r)?;
        let [relay, alice, bob] = res.cpu_per_msg.map(|d| d.as_secs_f64() * 1e6);
        println!(
            "  run {r}: {} lines, all at bob in {:.3} s = {:.0} msg/s; chatctl send exited at {:.3} s (status 0, {} output lines); CPU per message: relay {relay:.1} µs, alice {alice:.1} µs, bob {bob:.1} µs",
            res.lines,
            res.at_bob.as_secs_f64(),
            res.lines as f64 / res.at_bob.as_secs_f64(),
            res.send_exit.as_secs_f64(),
            res.send_output_lines,
        );
        if res.send_output_lines != res.lines {
            println!(
                "  run {r}: chatctl send printed {} lines for {} messages",
                res.send_output_lines, res.lines
            );
        }
        results.push(res);
    }
    let med = |f: &dyn Fn(&RunResult) -> f64| median(results.iter().map(f).collect());
    let at_bob = med(&|r| r.at_bob.as_secs_f64());
    println!(
        "median over {} runs: all at bob in {at_bob:.3} s, {:.0} msg/s (target: 10000); chatctl send exited at {:.3} s",
        o.runs,
        med(&|r| r.lines as f64 / r.at_bob.as_secs_f64()),
        med(&|r| r.send_exit.as_secs_f64()),
    );
    let cpu = |i: usize| med(&|r: &RunResult| r.cpu_per_msg[i].as_secs_f64() * 1e6);
    println!(
        "median CPU per message: relay {:.1} µs, alice {:.1} µs, bob {:.1} µs",
        cpu(0),
        cpu(1),
        cpu(2)
    );
    Ok(())
}

fn main() -> ExitCode {
    let o = match parse_opts() {
        Ok(Parsed::Run(o)) => o,
        Ok(Parsed::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("e2e bench: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&o) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("e2e bench: {e}");
            ExitCode::FAILURE
        }
    }
}
