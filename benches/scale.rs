//! Scale of one relay (issue 8, point 9): a real `chatd` relay process, M registered names and N
//! idle logged-in members. Run:
//!
//! ```text
//! cargo bench --bench scale                                  # M = 100,000 names, N = 10,000 members
//! cargo bench --bench scale -- --names 2000 --members 1000   # a quick run
//! cargo bench --bench scale -- --help                        # every option
//! ```
//!
//! `cargo bench` builds the release `chatd` and `chatctl` with the bench (cargo gives their paths
//! to benches as `CARGO_BIN_EXE_*`); `--chatd PATH` and `--chatctl PATH` run other builds.
//!
//! What it does, in order; every phase has a deadline and the whole run a cap (`--minutes`,
//! default 15), and the relay (started with `--listen 127.0.0.1:0` in a temporary directory,
//! killed in `Drop` and by `PR_SET_PDEATHSIG`) is watched all along, so a relay that dies or
//! stalls is reported, not waited for:
//!
//! 1. Raises its own open-file limit to the hard limit (the relay inherits it) and checks it can
//!    hold N member sockets plus the logins in flight (`--inflight`).
//! 2. Makes a few RSA-2048 keys (`--keys`, default 4); name `u000000` and on use key `i % keys`
//!    (today's relay lets one key bind any number of names). Logins are signed on a thread pool.
//! 3. Registers M names through the protocol: Challenge, Login, Welcome, then disconnect (RST),
//!    `--inflight` at a time. `--preseed` binds them in the relay's database through
//!    `chatd::store` before the relay starts instead, for when the relay is too slow to register
//!    M names in the time.
//! 4. Logs in N members (the first N names) that stay connected and idle (a `Ping` every 30 s, as
//!    a member sends, against the relay's 120 s idle timeout); everything the relay sends is read
//!    and counted by frame kind, without keeping it. The last `--sample` members log in after a
//!    pause, and what the members already online receive meanwhile is the cost of a join to
//!    others.
//! 5. Runs `chatctl who --json` against the relay and times it.
//! 6. Closes all N connections at once and watches the relay for a minute.
//!
//! The relay runs under an address-space limit (`--relay-mem-gib`, default 12 GiB or 60 % of
//! the available memory if less), so a relay that grows without bound fails an allocation and
//! dies, as it would on a smaller machine, instead of taking the machine with it.

mod common;

use chatd::crypto::{login_transcript, Identity};
use chatd::proto::frame::MAX_FRAME;
use chatd::proto::relay::{FromRelay, ToRelay};
use chatd::proto::{encode_frame, from_payload};
use common::{Mode, Wire};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};
use ring::signature::RsaKeyPair;
use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const USAGE: &str = "\
cargo bench --bench scale -- [OPTIONS]

  --names M          names registered before the members log in [100000]
  --members N        idle members logged in and kept connected [10000]
  --sample J         of the N, members logged in last to measure the cost of a join [100]
  --inflight W       logins in flight at once [64]
  --keys K           RSA-2048 keys shared by the names [4]
  --sign-threads T   threads signing logins [available cores]
  --minutes X        cap on the whole run [15]
  --relay-mem-gib G  address-space limit of the relay, 0 for none [min(12, 60% of MemAvailable)]
  --preseed          bind the M names in the relay's database (chatd::store) before it starts,
                     instead of registering them through the protocol
  --chatd PATH, --chatctl PATH   binaries to run [the ones cargo built with the bench]";

/// A member sends `Ping` after this long without sending (the relay's idle timeout is 120 s).
const PING_EVERY: Duration = Duration::from_secs(30);
/// Progress lines this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Frame payload bytes looked at to tell the message kind (`{"Directory": ...}` is 11 bytes in).
const HEAD: usize = 12;
/// The largest frame kept whole (Challenge, Error); anything else is only counted.
const KEEP_MAX: usize = 64 * 1024;
/// Token of the waker the signing threads use.
const WAKER: Token = Token(usize::MAX);

/// Time the signing threads spent signing, in nanoseconds, all threads together: a login phase
/// that kept them busy most of the time measured the bench, not the relay.
static SIGN_NS: AtomicU64 = AtomicU64::new(0);

struct Opts {
    names: usize,
    members: usize,
    sample: usize,
    inflight: usize,
    keys: usize,
    sign_threads: usize,
    minutes: f64,
    relay_mem_gib: f64,
    preseed: bool,
    chatd: PathBuf,
    chatctl: PathBuf,
}

fn parse_opts() -> Result<Opts, String> {
    let avail_kib = meminfo_kib("MemAvailable").unwrap_or(0);
    let mut o = Opts {
        names: 100_000,
        members: 10_000,
        sample: 100,
        inflight: 64,
        keys: 4,
        sign_threads: thread::available_parallelism().map_or(2, |n| n.get()),
        minutes: 15.0,
        relay_mem_gib: (avail_kib as f64 * 0.6 / (1024.0 * 1024.0)).clamp(1.0, 12.0),
        preseed: false,
        chatd: PathBuf::from(env!("CARGO_BIN_EXE_chatd")),
        chatctl: PathBuf::from(env!("CARGO_BIN_EXE_chatctl")),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |what: &str| args.next().ok_or_else(|| format!("{what} needs a value"));
        match a.as_str() {
            // cargo bench passes --bench to a harness = false bench.
            "--bench" => {}
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--names" => o.names = num(&a, &value(&a)?)?,
            "--members" => o.members = num(&a, &value(&a)?)?,
            "--sample" => o.sample = num(&a, &value(&a)?)?,
            "--inflight" => o.inflight = num::<usize>(&a, &value(&a)?)?.max(1),
            "--keys" => o.keys = num::<usize>(&a, &value(&a)?)?.max(1),
            "--sign-threads" => o.sign_threads = num::<usize>(&a, &value(&a)?)?.max(1),
            "--minutes" => o.minutes = num(&a, &value(&a)?)?,
            "--relay-mem-gib" => o.relay_mem_gib = num(&a, &value(&a)?)?,
            "--preseed" => o.preseed = true,
            "--chatd" => o.chatd = PathBuf::from(value(&a)?),
            "--chatctl" => o.chatctl = PathBuf::from(value(&a)?),
            other => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
        }
    }
    o.sample = o.sample.min(o.members / 2);
    Ok(o)
}

fn num<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String> {
    v.replace(['_', ','], "")
        .parse()
        .map_err(|_| format!("{flag}: not a number: {v:?}"))
}

// ---------------------------------------------------------------------------------------------
// Small helpers.

/// 12345678 -> "12,345,678".
fn n(x: u64) -> String {
    let s = x.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Bytes for people: "1.23 GiB", "456.7 MiB", "12.3 KiB", "789 B".
fn bytes(b: f64) -> String {
    const K: f64 = 1024.0;
    if b >= K * K * K {
        format!("{:.2} GiB", b / (K * K * K))
    } else if b >= K * K {
        format!("{:.1} MiB", b / (K * K))
    } else if b >= K {
        format!("{:.1} KiB", b / K)
    } else {
        format!("{b:.0} B")
    }
}

fn kib(k: Option<u64>) -> String {
    k.map_or_else(|| "?".into(), |k| bytes(k as f64 * 1024.0))
}

fn meminfo_kib(field: &str) -> Option<u64> {
    let text = fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.split(':').next() == Some(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A `/proc/PID/status` field given in kB (`VmRSS`, `VmHWM`).
fn proc_kib(pid: u32, field: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.split(':').next() == Some(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Raise the soft open-file limit to the hard one; returns the limit in force.
fn raise_nofile() -> libc::rlim_t {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    lim.rlim_cur
}

fn secs(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{:.0} ms", d.as_secs_f64() * 1000.0)
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

fn name(i: usize) -> String {
    format!("u{i:06}")
}

/// Logins per second over the first and the last `k` of a list of login times, and overall.
fn rates(times: &[Instant], start: Instant) -> String {
    let rate = |a: Instant, b: Instant, count: usize| {
        let s = b.saturating_duration_since(a).as_secs_f64();
        if s > 0.0 {
            format!("{:.0}/s", count as f64 / s)
        } else {
            "-".into()
        }
    };
    let Some(&last) = times.last() else {
        return "none".into();
    };
    let mut s = format!(
        "{} overall ({} in {})",
        rate(start, last, times.len()),
        n(times.len() as u64),
        secs(last - start)
    );
    let k = (times.len() / 10).clamp(1, 1000);
    if times.len() >= 2 * k && k >= 10 {
        s += &format!(
            "; first {k}: {}, last {k}: {}",
            rate(start, times[k - 1], k),
            rate(times[times.len() - k - 1], last, k)
        );
    }
    s
}

// ---------------------------------------------------------------------------------------------
// The relay process.

struct Relay {
    child: Child,
    pid: u32,
    dir: tempfile::TempDir,
    socket: PathBuf,
    log: PathBuf,
    chatctl: PathBuf,
    addr: SocketAddr,
    exited: Option<ExitStatus>,
    /// Largest VmRSS seen by the bench's samples (VmHWM is gone once the process is).
    rss_seen: u64,
    /// Members online at that sample.
    rss_seen_online: usize,
    /// The address-space limit it runs under, in GiB (0: none).
    mem_limit_gib: f64,
}

impl Relay {
    fn state_dir(dir: &Path) -> PathBuf {
        dir.join("state")
    }

    fn start(o: &Opts, max_connections: usize, dir: tempfile::TempDir) -> Result<Relay, String> {
        let home = dir.path().join("home");
        fs::create_dir_all(&home).map_err(|e| format!("create {home:?}: {e}"))?;
        let log = dir.path().join("relay.log");
        let socket = dir.path().join("control.sock");
        let logf = fs::File::create(&log).map_err(|e| format!("create {log:?}: {e}"))?;
        let errf = logf.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&o.chatd);
        cmd.args(["--listen", "127.0.0.1:0", "--key-bits", "2048"])
            .arg("--state-dir")
            .arg(Self::state_dir(dir.path()))
            .arg("--socket")
            .arg(&socket)
            .arg("--max-connections")
            .arg(max_connections.to_string())
            // The bench registers every name under a handful of keys, as fast as it can: lift
            // the registration bounds, which exist to stop exactly that on a real relay.
            .args([
                "--max-names-per-key",
                "100000000",
                "--new-names-per-minute",
                "100000000",
            ])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(logf)
            .stderr(errf);
        // Also clears CHATD_TEST_ABORT_BEFORE_COMMIT, a test crash point, as the other benches do.
        common::isolated_env(&mut cmd, &home);
        let limit = (o.relay_mem_gib * (1u64 << 30) as f64) as libc::rlim_t;
        let in_child = move || {
            if limit > 0 {
                let lim = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                // SAFETY: setrlimit reads the struct we pass; it is async-signal-safe.
                if unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) } != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            // The relay dies with the bench, however the bench ends.
            // SAFETY: prctl(PR_SET_PDEATHSIG) takes plain integers; it is async-signal-safe.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
            Ok(())
        };
        // SAFETY: the closure only calls setrlimit and prctl, both async-signal-safe, and
        // allocates nothing.
        unsafe { cmd.pre_exec(in_child) };
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {:?}: {e}", o.chatd))?;
        let mut relay = Relay {
            pid: child.id(),
            child,
            dir,
            socket,
            log,
            chatctl: o.chatctl.clone(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            exited: None,
            rss_seen: 0,
            rss_seen_online: 0,
            mem_limit_gib: o.relay_mem_gib,
        };
        // The bound port, from `chatctl status --json` (field `listen`).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if !relay.alive() {
                return Err(format!("the relay exited at start-up: {}", relay.death()));
            }
            if let Ok(out) = relay.ctl(&["--json", "status"], Duration::from_secs(5), &mut || {
                thread::sleep(Duration::from_millis(20))
            }) {
                let v: serde_json::Value =
                    serde_json::from_str(out.stdout.trim()).unwrap_or_default();
                if let Some(addr) = v["listen"]
                    .as_str()
                    .and_then(|a| a.parse::<SocketAddr>().ok())
                {
                    if !addr.ip().is_loopback() || addr.port() == 0 {
                        return Err(format!(
                            "the relay reports listen {addr}, not a loopback port"
                        ));
                    }
                    relay.addr = SocketAddr::from(([127, 0, 0, 1], addr.port()));
                    return Ok(relay);
                }
            }
            if Instant::now() > deadline {
                return Err("the relay did not report its listen address within 30 s".into());
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the relay process is still running (it is reaped the first time it is not).
    fn alive(&mut self) -> bool {
        if self.exited.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(st)) => {
                self.exited = Some(st);
                false
            }
            _ => true,
        }
    }

    fn kib(&mut self, field: &str) -> Option<u64> {
        let v = proc_kib(self.pid, field);
        if field == "VmRSS" {
            self.rss_seen = self.rss_seen.max(v.unwrap_or(0));
        }
        v
    }

    /// Sample VmRSS (for the largest seen) at most every 200 ms.
    fn sample(&mut self, last: &mut Instant, online: usize) {
        if last.elapsed() >= Duration::from_millis(200) {
            *last = Instant::now();
            let before = self.rss_seen;
            if self.kib("VmRSS").is_some_and(|v| v > before) {
                self.rss_seen_online = online;
            }
        }
    }

    /// The relay's warnings and errors, counted by message with numbers replaced by N.
    fn log_summary(&self) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        for l in log.lines() {
            if !(l.contains(" WARN ") || l.contains(" ERROR ") || l.contains("memory allocation")) {
                continue;
            }
            let msg = l.split_once("] ").map_or(l, |(_, m)| m);
            let mut key = String::new();
            for c in msg.chars() {
                if c.is_ascii_digit() {
                    if !key.ends_with('N') {
                        key.push('N');
                    }
                } else {
                    key.push(c);
                }
            }
            let key: String = key.chars().take(100).collect();
            *counts.entry(key).or_default() += 1;
        }
        if counts.is_empty() {
            return "no warnings or errors".into();
        }
        let mut v: Vec<(String, u64)> = counts.into_iter().collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.1));
        v.iter()
            .take(6)
            .map(|(k, c)| format!("{} x \"{k}\"", n(*c)))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// How the relay ended, with the telling lines of its log.
    fn death(&self) -> String {
        let how = match self.exited {
            Some(st) => match (st.code(), st.signal()) {
                (Some(c), _) => format!("exit code {c}"),
                (None, Some(6)) => "killed by SIGABRT (signal 6)".into(),
                (None, Some(9)) => "killed by SIGKILL (signal 9; the OOM killer?)".into(),
                (None, Some(s)) => format!("killed by signal {s}"),
                _ => format!("{st}"),
            },
            None => "still running".into(),
        };
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let how = if log.contains("memory allocation") && self.mem_limit_gib > 0.0 {
            format!(
                "{how}, out of address space (the bench runs it under a {:.1} GiB limit, \
                 --relay-mem-gib)",
                self.mem_limit_gib
            )
        } else {
            how
        };
        let lines: Vec<&str> = log.lines().collect();
        let mut tell: Vec<&str> = lines
            .iter()
            .filter(|l| {
                l.contains("memory allocation")
                    || l.contains("panicked")
                    || l.contains("ERROR")
                    || l.contains("fatal")
            })
            .copied()
            .collect();
        if tell.is_empty() {
            tell = lines[lines.len().saturating_sub(3)..].to_vec();
        }
        let tell: Vec<&str> = tell[tell.len().saturating_sub(5)..].to_vec();
        format!("{how}; log: {}", tell.join(" | "))
    }

    /// Run chatctl against the relay with a deadline, calling `service` while it runs (so the
    /// bench keeps reading its members' sockets). Output goes through files: it can be large.
    fn ctl(
        &self,
        args: &[&str],
        timeout: Duration,
        service: &mut dyn FnMut(),
    ) -> Result<CtlOut, String> {
        let out_path = self.dir.path().join("ctl.out");
        let err_path = self.dir.path().join("ctl.err");
        let out = fs::File::create(&out_path).map_err(|e| e.to_string())?;
        let err = fs::File::create(&err_path).map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        let mut child = Command::new(&self.chatctl)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .env_remove("CHATD_SOCKET")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot run {:?}: {e}", self.chatctl))?;
        let status = loop {
            if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
                break st;
            }
            if t0.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "chatctl {} did not finish within {}",
                    args.join(" "),
                    secs(timeout)
                ));
            }
            service();
        };
        let elapsed = t0.elapsed();
        Ok(CtlOut {
            status,
            elapsed,
            stdout: fs::read_to_string(&out_path).unwrap_or_default(),
            stderr: fs::read_to_string(&err_path).unwrap_or_default(),
        })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

struct CtlOut {
    status: ExitStatus,
    elapsed: Duration,
    stdout: String,
    stderr: String,
}

/// Bind `names` names in a fresh relay database, through the library's store, before the relay
/// starts: what M registrations would leave behind, without the protocol.
fn preseed(state_dir: &Path, names: usize, keys: &[Identity]) -> Result<(), String> {
    use chatd::store::Store;
    fs::create_dir_all(state_dir).map_err(|e| e.to_string())?;
    fs::set_permissions(state_dir, fs::Permissions::from_mode(0o700)).map_err(|e| e.to_string())?;
    let mut store = Store::open(&state_dir.join("chatd.db")).map_err(|e| e.to_string())?;
    store.begin().map_err(|e| e.to_string())?;
    for i in 0..names {
        store
            .bind(&name(i), keys[i % keys.len()].public().der())
            .map_err(|e| e.to_string())?;
    }
    store.commit().map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------------
// Frames, read as a stream: counted by kind, kept only when small and needed.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Challenge,
    Welcome,
    Directory,
    Presence,
    Pong,
    Error,
    Other,
}

/// The variant name at the front of a `FromRelay` payload: `{"Name": ..}` or a bare `"Name"`.
fn kind_of(head: &[u8]) -> Kind {
    let name: &[u8] = match head {
        [0x81, s, rest @ ..] if s & 0xe0 == 0xa0 => &rest[..((s & 0x1f) as usize).min(rest.len())],
        [s, rest @ ..] if s & 0xe0 == 0xa0 => &rest[..((s & 0x1f) as usize).min(rest.len())],
        _ => b"",
    };
    match name {
        b"Challenge" => Kind::Challenge,
        b"Welcome" => Kind::Welcome,
        b"Directory" => Kind::Directory,
        b"Presence" => Kind::Presence,
        b"Pong" => Kind::Pong,
        b"Error" => Kind::Error,
        _ => Kind::Other,
    }
}

/// One whole frame: its kind, its size on the wire, and its payload when small and needed.
struct Frame {
    kind: Kind,
    wire: usize,
    payload: Option<Vec<u8>>,
}

#[derive(Default)]
struct Parser {
    hdr: [u8; 4],
    hdr_len: usize,
    /// Payload length of the frame being read (valid once `hdr_len == 4`).
    len: usize,
    /// Payload bytes of it read so far.
    got: usize,
    /// Known once `HEAD` bytes (or the whole payload, if shorter) are in.
    kind: Option<Kind>,
    /// Keep the whole payload (a small Challenge or Error), not only its head.
    keep_all: bool,
    buf: Vec<u8>,
}

impl Parser {
    fn feed(&mut self, mut data: &[u8], frames: &mut Vec<Frame>) -> Result<(), String> {
        while !data.is_empty() {
            if self.hdr_len < 4 {
                let k = (4 - self.hdr_len).min(data.len());
                self.hdr[self.hdr_len..self.hdr_len + k].copy_from_slice(&data[..k]);
                self.hdr_len += k;
                data = &data[k..];
                if self.hdr_len < 4 {
                    break;
                }
                self.len = u32::from_be_bytes(self.hdr) as usize;
                if self.len > MAX_FRAME {
                    return Err(format!("frame of {} bytes above the cap", self.len));
                }
                self.got = 0;
                self.kind = None;
                self.keep_all = false;
                self.buf.clear();
            } else if self.kind.is_none() {
                let k = (HEAD.min(self.len) - self.got).min(data.len());
                self.buf.extend_from_slice(&data[..k]);
                self.got += k;
                data = &data[k..];
            } else {
                let k = (self.len - self.got).min(data.len());
                if self.keep_all {
                    self.buf.extend_from_slice(&data[..k]);
                }
                self.got += k;
                data = &data[k..];
            }
            if self.kind.is_none() && self.got == HEAD.min(self.len) {
                let kind = kind_of(&self.buf);
                self.kind = Some(kind);
                self.keep_all =
                    matches!(kind, Kind::Challenge | Kind::Error) && self.len <= KEEP_MAX;
            }
            if self.kind.is_some() && self.got == self.len {
                let kind = self.kind.take().unwrap_or(Kind::Other);
                let whole = self.buf.len() == self.len;
                frames.push(Frame {
                    kind,
                    wire: 4 + self.len,
                    payload: whole.then(|| std::mem::take(&mut self.buf)),
                });
                self.hdr_len = 0;
                self.buf.clear();
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Connections and the loop that drives them.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Log in, then disconnect.
    Register,
    /// Log in and stay.
    Member,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum St {
    /// Waiting for `Challenge`.
    Challenge,
    /// The login is being signed.
    Signing,
    /// `Login` sent, waiting for `Welcome`.
    Welcome,
    /// Logged in (members only).
    Established,
}

struct Conn {
    wire: Wire<TcpStream>,
    gen: u64,
    name: usize,
    role: Role,
    st: St,
    parser: Parser,
    out: Vec<u8>,
    last_send: Instant,
    /// Online before the join sample started: what it receives meanwhile is sent "to others".
    other: bool,
}

struct Job {
    slot: usize,
    gen: u64,
    name: usize,
    /// What the login signs (its nonce and, over TLS, the session's exporter value).
    transcript: Vec<u8>,
}

struct Signed {
    slot: usize,
    gen: u64,
    frame: Vec<u8>,
}

/// What the members and registrations received, and what went wrong.
#[derive(Default)]
struct Stats {
    rx_total: u64,
    /// Bytes by frame kind, every connection.
    rx_kind: BTreeMap<&'static str, u64>,
    /// Frames by kind.
    frames_kind: BTreeMap<&'static str, u64>,
    /// Bytes received by connections flagged `other` (the join sample).
    rx_others: u64,
    /// Refusals and failures before `Welcome`, by reason.
    failed: BTreeMap<String, u64>,
    /// Members that lost their connection after `Welcome`, by reason.
    dropped: BTreeMap<String, u64>,
    /// Established members now.
    online: usize,
    /// Connections between connect and `Welcome` (or a registration's close).
    handshaking: usize,
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Challenge => "Challenge",
        Kind::Welcome => "Welcome",
        Kind::Directory => "Directory",
        Kind::Presence => "Presence",
        Kind::Pong => "Pong",
        Kind::Error => "Error",
        Kind::Other => "other",
    }
}

/// A result of one login phase.
struct Phase {
    attempted: usize,
    ok: usize,
    times: Vec<Instant>,
    start: Instant,
    elapsed: Duration,
    timed_out: bool,
    relay_died: bool,
    /// Share of the phase the signing threads spent signing.
    sign_busy: f64,
    /// CPU time the relay process used during the phase (user + system), from its CPU-time
    /// clock (or /proc's ticks), if either could be read.
    relay_cpu: Option<Duration>,
}

impl Phase {
    fn rates(&self) -> String {
        let cpu = match self.relay_cpu {
            // What one login costs the relay itself: on a shared machine the bench's own
            // signing (about 1 ms of CPU an RSA-2048 signature) caps the rate it can offer long
            // before the relay does, so this is the figure to hold against a logins/s target.
            Some(c) if self.ok > 0 => {
                let per = c.as_secs_f64() / self.ok as f64;
                format!(
                    "; relay CPU {:.0} µs per login (one core: {:.0} logins/s)",
                    per * 1e6,
                    1.0 / per.max(1e-9)
                )
            }
            _ => String::new(),
        };
        format!(
            "{}; signing threads busy {:.0}%{cpu}",
            rates(&self.times, self.start),
            self.sign_busy * 100.0
        )
    }
}

struct Bench {
    poll: Poll,
    events: Events,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    next_gen: u64,
    jobs: mpsc::Sender<Job>,
    signed: mpsc::Receiver<Signed>,
    addr: SocketAddr,
    scratch: Vec<u8>,
    frames: Vec<Frame>,
    st: Stats,
    /// Last time any byte arrived.
    last_rx: Instant,
    last_ping_sweep: Instant,
    /// Welcome times of the phase running.
    welcomes: Vec<Instant>,
    threads: usize,
    /// TLS (this build's relay) or plain TCP (one from before TLS).
    mode: Mode,
    tls: Arc<rustls::ClientConfig>,
}

impl Bench {
    fn new(
        addr: SocketAddr,
        keys: Arc<Vec<Identity>>,
        signers: Arc<Vec<RsaKeyPair>>,
        threads: usize,
        mode: Mode,
    ) -> io::Result<Bench> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (done_tx, signed) = mpsc::channel::<Signed>();
        for _ in 0..threads {
            let (job_rx, done_tx, waker, keys, signers) = (
                Arc::clone(&job_rx),
                done_tx.clone(),
                Arc::clone(&waker),
                Arc::clone(&keys),
                Arc::clone(&signers),
            );
            thread::spawn(move || {
                let rng = ring::rand::SystemRandom::new();
                loop {
                    let job = match job_rx.lock() {
                        Ok(rx) => match rx.recv() {
                            Ok(j) => j,
                            Err(_) => return,
                        },
                        Err(_) => return,
                    };
                    let user = name(job.name);
                    let key = &keys[job.name % keys.len()];
                    let t = Instant::now();
                    let Ok(signature) =
                        ring_sign(&signers[job.name % keys.len()], &rng, &job.transcript)
                    else {
                        return;
                    };
                    SIGN_NS.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    let login = ToRelay::Login {
                        user,
                        key: key.public().der().to_vec(),
                        signature,
                    };
                    let mut frame = Vec::new();
                    if encode_frame(&login, &mut frame).is_err() {
                        return;
                    }
                    let signed = Signed {
                        slot: job.slot,
                        gen: job.gen,
                        frame,
                    };
                    if done_tx.send(signed).is_err() || waker.wake().is_err() {
                        return;
                    }
                }
            });
        }
        Ok(Bench {
            poll,
            events: Events::with_capacity(4096),
            conns: Vec::new(),
            free: Vec::new(),
            next_gen: 0,
            jobs,
            signed,
            addr,
            scratch: vec![0; 256 * 1024],
            frames: Vec::new(),
            st: Stats::default(),
            last_rx: Instant::now(),
            last_ping_sweep: Instant::now(),
            welcomes: Vec::new(),
            threads,
            mode,
            tls: common::client_config(),
        })
    }

    /// Start a login as `name`.
    fn open(&mut self, name: usize, role: Role) {
        let connect =
            TcpStream::connect(self.addr).and_then(|s| Wire::new(s, self.mode, &self.tls));
        let mut wire = match connect {
            Ok(w) => w,
            Err(e) => {
                *self.st.failed.entry(format!("connect: {e}")).or_default() += 1;
                return;
            }
        };
        let slot = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        if let Err(e) = self.poll.registry().register(
            &mut wire.sock,
            Token(slot),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            *self.st.failed.entry(format!("register: {e}")).or_default() += 1;
            self.free.push(slot);
            return;
        }
        self.next_gen += 1;
        self.conns[slot] = Some(Conn {
            wire,
            gen: self.next_gen,
            name,
            role,
            st: St::Challenge,
            parser: Parser::default(),
            out: Vec::new(),
            last_send: Instant::now(),
            other: false,
        });
        self.st.handshaking += 1;
    }

    /// Drop a connection. `why` is recorded for a login that did not finish or a member that
    /// was online; `None` for a deliberate close.
    fn close(&mut self, slot: usize, why: Option<String>, rst: bool) {
        let Some(mut c) = self.conns[slot].take() else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut c.wire.sock);
        if rst {
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: setsockopt reads `linger` for the length given, on a socket we own.
            unsafe {
                libc::setsockopt(
                    c.wire.sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                );
            }
        }
        if c.st == St::Established {
            self.st.online -= 1;
            if let Some(w) = why {
                *self.st.dropped.entry(w).or_default() += 1;
            }
        } else {
            self.st.handshaking -= 1;
            if let Some(w) = why {
                *self.st.failed.entry(w).or_default() += 1;
            }
        }
        self.free.push(slot);
    }

    fn flush(&mut self, slot: usize) {
        let Some(c) = self.conns[slot].as_mut() else {
            return;
        };
        // The ClientHello, and records TLS took but the socket did not.
        if let Err(e) = c.wire.flush_tls() {
            return self.close(slot, Some(format!("write: {e}")), false);
        }
        while !c.out.is_empty() {
            match c.wire.write(&c.out) {
                Ok(0) => return self.close(slot, Some("write: closed".into()), false),
                Ok(k) => {
                    c.out.drain(..k);
                    c.last_send = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.close(slot, Some(format!("write: {e}")), false),
            }
        }
    }

    fn readable(&mut self, slot: usize) {
        loop {
            let Some(c) = self.conns[slot].as_mut() else {
                return;
            };
            match c.wire.read(&mut self.scratch) {
                Ok(0) => {
                    let why = if c.st == St::Established {
                        "closed by the relay without an Error"
                    } else {
                        "closed by the relay before Welcome"
                    };
                    return self.close(slot, Some(why.into()), false);
                }
                Ok(k) => {
                    self.st.rx_total += k as u64;
                    if c.other {
                        self.st.rx_others += k as u64;
                    }
                    self.last_rx = Instant::now();
                    let mut frames = std::mem::take(&mut self.frames);
                    if let Err(e) = c.parser.feed(&self.scratch[..k], &mut frames) {
                        self.frames = frames;
                        return self.close(slot, Some(e), false);
                    }
                    for f in frames.drain(..) {
                        if !self.frame(slot, f) {
                            break;
                        }
                    }
                    self.frames = frames;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.close(slot, Some(format!("read: {e}")), false),
            }
        }
    }

    /// Handle one whole frame; false once the connection is gone.
    fn frame(&mut self, slot: usize, f: Frame) -> bool {
        let kn = kind_name(f.kind);
        *self.st.rx_kind.entry(kn).or_default() += f.wire as u64;
        *self.st.frames_kind.entry(kn).or_default() += 1;
        let Some(c) = self.conns[slot].as_mut() else {
            return false;
        };
        match (f.kind, c.st) {
            (Kind::Challenge, St::Challenge) => {
                let msg = f.payload.as_deref().map(from_payload::<FromRelay>);
                let Some(Ok(FromRelay::Challenge { nonce, .. })) = msg else {
                    self.close(slot, Some("malformed Challenge".into()), false);
                    return false;
                };
                c.st = St::Signing;
                let job = Job {
                    slot,
                    gen: c.gen,
                    name: c.name,
                    transcript: common::transcript(&c.wire, &nonce, &name(c.name)),
                };
                if self.jobs.send(job).is_err() {
                    self.close(slot, Some("signing threads gone".into()), false);
                    return false;
                }
                true
            }
            (Kind::Welcome, St::Welcome) => {
                self.welcomes.push(Instant::now());
                if c.role == Role::Register {
                    // The binding is stored (the relay commits before it answers): done. The
                    // rest of the directory is not read, so the close is a reset.
                    self.close(slot, None, true);
                    false
                } else {
                    c.st = St::Established;
                    self.st.handshaking -= 1;
                    self.st.online += 1;
                    true
                }
            }
            (Kind::Error, st) => {
                let msg = f.payload.as_deref().map(from_payload::<FromRelay>);
                let why = match msg {
                    Some(Ok(FromRelay::Error { code, reason })) => {
                        // Numbers and names vary; keep the reason's shape only.
                        let reason: String = reason.chars().take(60).collect();
                        format!("Error {code:?}: {reason}")
                    }
                    _ => "Error (undecodable)".into(),
                };
                let why = if st == St::Established {
                    why
                } else {
                    format!("{why} (before Welcome)")
                };
                self.close(slot, Some(why), false);
                false
            }
            (_, St::Established) => true,
            (k, _) => {
                self.close(
                    slot,
                    Some(format!("unexpected {k:?} before Welcome")),
                    false,
                );
                false
            }
        }
    }

    /// One turn of the loop: wait up to `timeout` for sockets or signatures and handle them.
    fn turn(&mut self, timeout: Duration) {
        if let Err(e) = self.poll.poll(&mut self.events, Some(timeout)) {
            if e.kind() != io::ErrorKind::Interrupted {
                panic!("poll: {e}");
            }
        }
        let ready: Vec<(usize, bool, bool)> = self
            .events
            .iter()
            .map(|e| {
                (
                    e.token().0,
                    e.is_readable() || e.is_read_closed() || e.is_error(),
                    e.is_writable(),
                )
            })
            .collect();
        for (slot, r, w) in ready {
            if slot == WAKER.0 {
                continue;
            }
            if r {
                self.readable(slot);
            }
            if w {
                self.flush(slot);
            }
        }
        while let Ok(s) = self.signed.try_recv() {
            let Some(c) = self.conns.get_mut(s.slot).and_then(Option::as_mut) else {
                continue;
            };
            if c.gen != s.gen || c.st != St::Signing {
                continue;
            }
            c.out.extend_from_slice(&s.frame);
            c.st = St::Welcome;
            self.flush(s.slot);
        }
        if self.last_ping_sweep.elapsed() >= Duration::from_secs(1) {
            self.last_ping_sweep = Instant::now();
            let mut ping = Vec::new();
            let _ = encode_frame(&ToRelay::Ping, &mut ping);
            let due: Vec<usize> = (0..self.conns.len())
                .filter(|&i| {
                    self.conns[i].as_ref().is_some_and(|c| {
                        c.st == St::Established && c.last_send.elapsed() >= PING_EVERY
                    })
                })
                .collect();
            for slot in due {
                if let Some(c) = self.conns[slot].as_mut() {
                    c.out.extend_from_slice(&ping);
                    c.last_send = Instant::now();
                }
                self.flush(slot);
            }
        }
    }

    /// Log in `names` with `role`, `window` at a time, until done, the deadline, or the relay's
    /// death. Unfinished logins are dropped at the end.
    fn logins(
        &mut self,
        relay: &mut Relay,
        label: &str,
        names: std::ops::Range<usize>,
        role: Role,
        window: usize,
        deadline: Instant,
    ) -> Phase {
        let start = Instant::now();
        let sign_ns = SIGN_NS.load(Ordering::Relaxed);
        let cpu_before = common::cpu_time(relay.pid);
        self.welcomes.clear();
        let mut next = names.start;
        let mut last_progress = Instant::now();
        let mut last_count = 0;
        let (mut timed_out, mut relay_died) = (false, false);
        let failed_before: u64 = self.st.failed.values().sum();
        let mut sampled = Instant::now();
        loop {
            relay.sample(&mut sampled, self.st.online);
            while self.st.handshaking < window && next < names.end {
                self.open(next, role);
                next += 1;
            }
            if next == names.end && self.st.handshaking == 0 {
                break;
            }
            if !relay.alive() {
                relay_died = true;
                break;
            }
            if Instant::now() >= deadline {
                timed_out = true;
                break;
            }
            // A relay that refuses everything (e.g. connect fails): stop, don't spin.
            let failed: u64 = self.st.failed.values().sum();
            if failed - failed_before > 1000 && self.welcomes.is_empty() {
                break;
            }
            self.turn(Duration::from_millis(20));
            if last_progress.elapsed() >= PROGRESS_EVERY {
                let done = self.welcomes.len();
                println!(
                    "  {label}: {}/{} logged in, {:.0}/s in the last {}; {} online; relay RSS {}; received {}",
                    n(done as u64),
                    n(names.len() as u64),
                    (done - last_count) as f64 / last_progress.elapsed().as_secs_f64(),
                    secs(last_progress.elapsed()),
                    n(self.st.online as u64),
                    kib(relay.kib("VmRSS")),
                    bytes(self.st.rx_total as f64),
                );
                last_progress = Instant::now();
                last_count = done;
            }
        }
        // Abandon what is still in flight.
        let pending: Vec<usize> = (0..self.conns.len())
            .filter(|&i| {
                self.conns[i]
                    .as_ref()
                    .is_some_and(|c| c.st != St::Established)
            })
            .collect();
        for slot in pending {
            self.close(slot, Some("abandoned at the phase's end".into()), true);
        }
        Phase {
            attempted: next - names.start,
            ok: self.welcomes.len(),
            times: std::mem::take(&mut self.welcomes),
            start,
            elapsed: start.elapsed(),
            timed_out,
            relay_died,
            sign_busy: (SIGN_NS.load(Ordering::Relaxed) - sign_ns) as f64
                / (start.elapsed().as_nanos() as f64 * self.threads as f64),
            relay_cpu: cpu_before
                .zip(common::cpu_time(relay.pid))
                .map(|(a, b)| b.saturating_sub(a)),
        }
    }

    /// Keep reading until nothing has arrived for `quiet`, or `max` has passed; true if quiet.
    fn settle(&mut self, relay: &mut Relay, quiet: Duration, max: Duration) -> bool {
        let t0 = Instant::now();
        let mut sampled = Instant::now();
        loop {
            relay.sample(&mut sampled, self.st.online);
            self.turn(Duration::from_millis(20));
            if self.last_rx.elapsed() >= quiet && self.st.handshaking == 0 {
                return true;
            }
            if t0.elapsed() >= max || !relay.alive() {
                return false;
            }
        }
    }

    /// Close every member connection at once.
    fn close_all(&mut self) -> usize {
        let mut k = 0;
        for slot in 0..self.conns.len() {
            if self.conns[slot].is_some() {
                self.close(slot, None, false);
                k += 1;
            }
        }
        k
    }
}

// ---------------------------------------------------------------------------------------------

/// The figures, printed at the end whatever happened.
#[derive(Default)]
struct Report {
    lines: Vec<String>,
}

impl Report {
    fn add(&mut self, what: &str, value: String, how: &str) {
        println!("  -> {what}: {value}");
        self.lines.push(format!("{what}: {value}\n      ({how})"));
    }
}

fn main() {
    let o = match parse_opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("scale: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&o) {
        eprintln!("scale: {e}");
        std::process::exit(1);
    }
}

fn run(o: &Opts) -> Result<(), String> {
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(o.minutes * 60.0);
    // Registration gets up to 35 % of the run and the member logins up to 30 %; the rest (join
    // sample, settling, who, the mass disconnect) has deadlines of its own, clipped to the cap.
    let reg_deadline = t0 + Duration::from_secs_f64(o.minutes * 60.0 * 0.35);
    let login_deadline = t0 + Duration::from_secs_f64(o.minutes * 60.0 * 0.65);
    // What is left of the cap, but at least `floor` (the mass disconnect must be watched).
    let left = |cap: u64, floor: u64| {
        Duration::from_secs(cap).min(
            end.saturating_duration_since(Instant::now())
                .max(Duration::from_secs(floor)),
        )
    };

    let nofile = raise_nofile();
    // Ours: N members + W in flight + a few; the relay (which inherits the limit): the same
    // plus its listener, database, log and control clients.
    let need = (o.members + o.inflight + 64) as libc::rlim_t;
    println!(
        "scale: {} names, {} members (the last {} as the join sample), {} logins in flight, {} keys, \
         {} signing threads; open-file limit {}; {} cores, {} available; relay address-space limit {}",
        n(o.names as u64),
        n(o.members as u64),
        o.sample,
        o.inflight,
        o.keys,
        o.sign_threads,
        n(nofile),
        thread::available_parallelism().map_or(0, |n| n.get()),
        kib(meminfo_kib("MemAvailable")),
        if o.relay_mem_gib > 0.0 { format!("{:.1} GiB", o.relay_mem_gib) } else { "none".into() },
    );
    if nofile < need {
        return Err(format!(
            "the open-file limit is {nofile} even after raising it to the hard limit, and {} members \
             with {} logins in flight need {need} (for this process and for the relay each): raise \
             the hard limit (ulimit -Hn, limits.conf, LimitNOFILE=) or run with fewer --members",
            o.members, o.inflight
        ));
    }

    // Keys, in parallel.
    let tk = Instant::now();
    let keys: Vec<Identity> = thread::scope(|s| {
        let hs: Vec<_> = (0..o.keys)
            .map(|_| s.spawn(|| Identity::generate(&mut rand::thread_rng(), 2048)))
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("key thread").map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()
    })?;
    // The logins are signed with ring, as fast as an RSA signature gets here: the signing
    // threads share the machine with the relay, and the faster they sign, the closer the wall
    // clock's logins per second come to what the relay can take. A login signed so must verify
    // at the relay as one signed by chatd (same PSS parameters): checked here once.
    let signers: Vec<RsaKeyPair> = keys
        .iter()
        .map(|k| {
            let der = k.to_pkcs8_der().map_err(|e| e.to_string())?;
            RsaKeyPair::from_pkcs8(&der).map_err(|e| format!("ring key: {e}"))
        })
        .collect::<Result<_, String>>()?;
    let probe = login_transcript(&[7; 32], "u000000", &[9; 32]);
    let rng = ring::rand::SystemRandom::new();
    let sig = ring_sign(&signers[0], &rng, &probe)?;
    keys[0]
        .public()
        .verify(&probe, &sig)
        .map_err(|e| format!("a ring signature does not verify as chatd's: {e}"))?;
    let tsign = Instant::now();
    for _ in 0..20 {
        ring_sign(&signers[0], &rng, &probe)?;
    }
    println!(
        "scale: {} RSA-2048 keys in {}; a login signature takes {:.2} ms on one thread",
        o.keys,
        secs(tk.elapsed()),
        tsign.elapsed().as_secs_f64() * 1000.0 / 20.0
    );
    let keys = Arc::new(keys);
    let signers = Arc::new(signers);

    let dir = tempfile::Builder::new()
        .prefix("chatd-scale-")
        .tempdir()
        .map_err(|e| format!("temporary directory: {e}"))?;
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700))
        .map_err(|e| e.to_string())?;
    if o.preseed {
        let tp = Instant::now();
        preseed(&Relay::state_dir(dir.path()), o.names, &keys)?;
        println!(
            "scale: {} names bound in the relay's database through chatd::store in {} (--preseed)",
            n(o.names as u64),
            secs(tp.elapsed())
        );
    }
    let mut relay = Relay::start(o, o.members + o.inflight + 64, dir)?;
    let rss_start = relay.kib("VmRSS");
    println!(
        "scale: relay pid {} listening on {} ({}); RSS {}",
        relay.pid,
        relay.addr,
        o.chatd.display(),
        kib(rss_start)
    );
    let mode = common::probe(relay.addr).map_err(|e| format!("probe the relay: {e}"))?;
    println!("scale: the relay speaks {mode:?}");
    let mut b = Bench::new(
        relay.addr,
        Arc::clone(&keys),
        Arc::clone(&signers),
        o.sign_threads,
        mode,
    )
    .map_err(|e| format!("poll: {e}"))?;
    let mut rep = Report::default();
    let mut died_in: Option<String> = None;

    // 1. Registration.
    let mut names_held = o.names;
    if !o.preseed {
        println!(
            "scale: registering {} names (log in, then disconnect)",
            n(o.names as u64)
        );
        let p = b.logins(
            &mut relay,
            "register",
            0..o.names,
            Role::Register,
            o.inflight,
            reg_deadline.min(end),
        );
        names_held = p.ok;
        let mut v = format!(
            "{} of {} names registered; {}",
            n(p.ok as u64),
            n(o.names as u64),
            p.rates()
        );
        if p.timed_out {
            v += &format!(
                "; STOPPED at the phase deadline ({}), {} attempted",
                secs(p.elapsed),
                n(p.attempted as u64)
            );
        }
        if p.relay_died {
            v += &format!(
                "; RELAY DIED after {} registrations: {}",
                n(p.ok as u64),
                relay.death()
            );
            died_in = Some("registration".into());
        }
        rep.add(
            "registrations per second",
            v,
            "Welcome frames received per second by registering connections, W in flight; each \
             closes (RST) as soon as its Welcome arrives, without reading the Directory frames",
        );
    }
    let failed_reg = std::mem::take(&mut b.st.failed);

    // 2. Members.
    let mut rss0 = None;
    let mut p_main = None;
    if died_in.is_none() {
        b.settle(&mut relay, Duration::from_millis(500), left(30, 1));
        rss0 = relay.kib("VmRSS");
        println!(
            "scale: the relay holds {} names; RSS {} before the members log in",
            n(names_held as u64),
            kib(rss0)
        );
        let main_end = o.members - o.sample;
        println!("scale: logging in {} idle members", n(main_end as u64));
        let p = b.logins(
            &mut relay,
            "members",
            0..main_end,
            Role::Member,
            o.inflight,
            login_deadline.min(end),
        );
        let mut v = format!(
            "{} of {} logged in into a relay holding {} names; {}",
            n(p.ok as u64),
            n(main_end as u64),
            n(names_held as u64),
            p.rates()
        );
        if p.timed_out {
            v += &format!(
                "; STOPPED at the phase deadline ({}), {} attempted",
                secs(p.elapsed),
                n(p.attempted as u64)
            );
        }
        if p.relay_died {
            let per = match rss0 {
                Some(a) if relay.rss_seen_online > 0 => format!(
                    ", {} per connection over the RSS before the logins",
                    bytes(
                        (relay.rss_seen as f64 - a as f64) * 1024.0 / relay.rss_seen_online as f64
                    )
                ),
                _ => String::new(),
            };
            v += &format!(
                "; RELAY DIED after {} logins; largest RSS sampled {} with {} members online{per}: {}",
                n(p.ok as u64),
                bytes(relay.rss_seen as f64 * 1024.0),
                n(relay.rss_seen_online as u64),
                relay.death()
            );
            died_in = Some("member logins".into());
        }
        rep.add(
            "member logins per second",
            v,
            "Welcome frames per second at the members, W logins in flight, signatures on the \
             signing threads; overall, and over the first and last tenth (at most 1,000)",
        );
        p_main = Some(p);
    }

    // 3. The join sample: what the members online receive while J more log in.
    if died_in.is_none() && o.sample > 0 && Instant::now() < end {
        let quiet = b.settle(&mut relay, Duration::from_millis(500), left(30, 1));
        let before = b.st.online;
        for c in b.conns.iter_mut().flatten() {
            c.other = c.st == St::Established;
        }
        b.st.rx_others = 0;
        let from = o.members - o.sample;
        let p = b.logins(
            &mut relay,
            "join sample",
            from..o.members,
            Role::Member,
            o.inflight,
            Instant::now() + left(90, 0),
        );
        b.settle(&mut relay, Duration::from_millis(500), left(30, 1));
        let v = if p.ok > 0 {
            format!(
                "{} per join ({} received by the {} members online during {} joins{})",
                bytes(b.st.rx_others as f64 / p.ok as f64),
                bytes(b.st.rx_others as f64),
                n(before as u64),
                p.ok,
                if quiet {
                    ""
                } else {
                    "; they were still receiving when the sample started"
                }
            )
        } else {
            "no join completed".into()
        };
        rep.add(
            "bytes sent to others per join",
            v,
            "after the first N-J members are in and quiet (500 ms without a byte), every byte \
             the members already online read while J more log in, until quiet again, / J",
        );
        if p.relay_died {
            died_in = Some("the join sample".into());
        }
    }

    // 4. Memory of N idle connections.
    let online = b.st.online;
    if died_in.is_none() {
        let quiet = b.settle(&mut relay, Duration::from_secs(1), left(30, 1));
        let rss = relay.kib("VmRSS");
        let v = match (rss0, rss) {
            (Some(a), Some(z)) if online > 0 => format!(
                "{} per connection (RSS {} with {} members online, {} before the logins{})",
                bytes((z as f64 - a as f64) * 1024.0 / online as f64),
                kib(Some(z)),
                n(online as u64),
                kib(Some(a)),
                if quiet {
                    ""
                } else {
                    "; still receiving after 30 s"
                }
            ),
            _ => "no members online".into(),
        };
        rep.add(
            "relay memory per idle connection",
            v,
            "(VmRSS with the members online and idle - VmRSS before the first member login) / \
             members online, from /proc/PID/status",
        );
    }

    // 5. `chatctl who --json` on the relay.
    if died_in.is_none() && relay.alive() {
        let r = {
            let b = &mut b;
            relay.ctl(&["--json", "who"], left(60, 5), &mut || {
                b.turn(Duration::from_millis(10))
            })
        };
        let v = match r {
            Ok(out) if out.status.success() => format!(
                "{} with {} names held: {} entries, {} of JSON",
                secs(out.elapsed),
                n(names_held as u64),
                n(out.stdout.lines().count() as u64),
                bytes(out.stdout.len() as f64)
            ),
            Ok(out) => format!(
                "FAILED after {} with {} names held: exit {:?}: {}",
                secs(out.elapsed),
                n(names_held as u64),
                out.status.code(),
                out.stderr.trim()
            ),
            Err(e) => format!("FAILED: {e}"),
        };
        rep.add(
            "chatctl who --json on the relay",
            v,
            "wall time of one `chatctl --socket S --json who` process against the relay's \
             control socket while the members stay online",
        );
    }

    // 6. Everyone leaves at once.
    if died_in.is_none() && relay.alive() && online > 0 {
        let rss_before = relay.kib("VmRSS");
        let closed = b.close_all();
        let tclose = Instant::now();
        println!(
            "scale: closed all {} member connections at once; watching the relay",
            n(closed as u64)
        );
        let mut peak = rss_before.unwrap_or(0);
        let mut settled_at = None;
        let mut last_progress = Instant::now();
        let mut last_status = Instant::now() - Duration::from_secs(10);
        let limit = left(60, 10);
        while tclose.elapsed() < limit {
            if !relay.alive() {
                break;
            }
            peak = peak.max(relay.kib("VmRSS").unwrap_or(0));
            if settled_at.is_none() && last_status.elapsed() >= Duration::from_secs(1) {
                last_status = Instant::now();
                if let Ok(out) =
                    relay.ctl(&["--json", "status"], Duration::from_secs(5), &mut || {
                        thread::sleep(Duration::from_millis(20))
                    })
                {
                    let v: serde_json::Value =
                        serde_json::from_str(out.stdout.trim()).unwrap_or_default();
                    if v["peers_online"].as_u64() == Some(0) {
                        settled_at = Some(tclose.elapsed());
                    }
                }
            }
            // A few seconds after the relay reports nobody online, the figure is taken.
            if settled_at.is_some_and(|s| tclose.elapsed() >= s + Duration::from_secs(3)) {
                break;
            }
            if last_progress.elapsed() >= PROGRESS_EVERY {
                last_progress = Instant::now();
                println!(
                    "  disconnect: {} after, relay RSS {}",
                    secs(tclose.elapsed()),
                    kib(relay.kib("VmRSS"))
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
        let v = if relay.alive() {
            format!(
                "survived; RSS {} ({} before the disconnect, at most {} sampled meanwhile); {}",
                kib(relay.kib("VmRSS")),
                kib(rss_before),
                kib(Some(peak)),
                match settled_at {
                    Some(s) => format!("it reported 0 online {} after the close", secs(s)),
                    None => format!("it did not report 0 online within {}", secs(limit)),
                }
            )
        } else {
            died_in = Some("the mass disconnect".into());
            format!(
                "RELAY DIED {} after {} members disconnected at once (RSS {} before, {} sampled at most): {}",
                secs(tclose.elapsed()),
                n(closed as u64),
                kib(rss_before),
                kib(Some(peak)),
                relay.death()
            )
        };
        rep.add(
            "relay after all members disconnect at once",
            v,
            "every member socket closed in one loop; VmRSS sampled every 100 ms until \
             `chatctl status` says peers_online 0, plus 3 s (at most 60 s)",
        );
    }

    // Peak memory, and what the members saw.
    let hwm = if relay.alive() {
        relay.kib("VmHWM")
    } else {
        None
    };
    rep.add(
        "relay peak RSS",
        match hwm {
            Some(h) => kib(Some(h)),
            None => format!(
                "{} (largest VmRSS sampled; the process is gone)",
                bytes(relay.rss_seen as f64 * 1024.0)
            ),
        },
        "VmHWM from /proc/PID/status at the end",
    );
    let mut seen = String::new();
    for (k, v) in &b.st.rx_kind {
        seen += &format!(
            "{k} {} in {} frames; ",
            bytes(*v as f64),
            n(b.st.frames_kind[k])
        );
    }
    rep.add(
        "received from the relay, all connections",
        format!("{} in total: {seen}", bytes(b.st.rx_total as f64)),
        "bytes read from every socket, split by the kind of frame",
    );
    if let Some(p) = &p_main {
        let presence = b.st.rx_kind.get("Presence").copied().unwrap_or(0);
        rep.add(
            "Presence bytes per member login, whole run",
            bytes(presence as f64 / p.ok.max(1) as f64),
            "all Presence frames the members received / member logins of the main phase",
        );
    }
    let failures = |m: &BTreeMap<String, u64>| {
        if m.is_empty() {
            "none".to_string()
        } else {
            m.iter()
                .map(|(k, v)| format!("{} x {k}", n(*v)))
                .collect::<Vec<_>>()
                .join("; ")
        }
    };
    rep.add(
        "registrations that failed",
        failures(&failed_reg),
        "by reason",
    );
    rep.add(
        "member logins that failed",
        failures(&b.st.failed),
        "by reason",
    );
    rep.add(
        "members dropped after Welcome",
        failures(&b.st.dropped),
        if died_in.is_some() {
            "by reason; the relay's death closed some of these, and the bench stopped reading \
             at once, so members still counted online were closed by it too"
        } else {
            "by reason"
        },
    );
    rep.add(
        "the relay's log",
        relay.log_summary(),
        "WARN and ERROR lines (and allocation failures) counted by message, numbers as N",
    );

    println!(
        "\nscale: results ({} names, {} members, {} total){}",
        n(o.names as u64),
        n(o.members as u64),
        secs(t0.elapsed()),
        match &died_in {
            Some(p) => format!("; THE RELAY DIED during {p}"),
            None => String::new(),
        }
    );
    for l in &rep.lines {
        println!("  {l}");
    }
    drop(relay);
    Ok(())
}

/// RSA-PSS (SHA-256, salt 32) over `msg`, as chatd signs a login.
fn ring_sign(
    key: &RsaKeyPair,
    rng: &ring::rand::SystemRandom,
    msg: &[u8],
) -> Result<Vec<u8>, String> {
    let mut sig = vec![0; key.public().modulus_len()];
    key.sign(&ring::signature::RSA_PSS_SHA256, rng, msg, &mut sig)
        .map_err(|_| "ring could not sign".to_string())?;
    Ok(sig)
}
