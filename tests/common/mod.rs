//! Harness for the integration tests: it runs the real `chatd` and `chatctl` binaries.
//!
//! Every daemon lives in its own temporary directory holding its state directory (`state/`), its
//! control socket (`ctl.sock`), its log (`chatd.log`, the daemon's stderr at `RUST_LOG=info`) and
//! its HOME/XDG directories, so tests are independent and can run in parallel (no fixed ports: a
//! relay listens on `127.0.0.1:0` and the tests learn the real port from `chatctl status`).
//!
//! Nothing here sleeps to synchronise: [`wait_until`] and [`wait_for`] poll a condition with a
//! generous deadline and panic with every live daemon's log when it passes. Every child process is
//! bounded: `chatctl` runs are killed at a deadline, and [`Daemon`], [`Follower`] and [`Proxy`]
//! clean up on drop (also when a test panics).

// Each test crate uses a different subset of these helpers.
#![allow(dead_code)]

use serde_json::Value;
use std::cell::{Cell, RefCell};
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// The `chatd` binary under test.
pub const CHATD: &str = env!("CARGO_BIN_EXE_chatd");
/// The `chatctl` binary under test.
pub const CHATCTL: &str = env!("CARGO_BIN_EXE_chatctl");

/// How long any awaited condition may take. Generous: the machine is shared and noisy.
pub const DEADLINE: Duration = Duration::from_secs(20);
/// How long one `chatctl` run may take before it is killed (above `--wait`'s default of 30 s).
pub const CTL_DEADLINE: Duration = Duration::from_secs(60);
/// Poll interval of the wait helpers.
const POLL: Duration = Duration::from_millis(30);

thread_local! {
    /// Logs of the daemons this test thread started, for failure messages.
    static LOGS: RefCell<Vec<(String, PathBuf)>> = const { RefCell::new(Vec::new()) };
    /// Set once a failure message already carried the logs, so drops do not print them again.
    static LOGS_DUMPED: Cell<bool> = const { Cell::new(false) };
}

/// All logs of the daemons started by this test, labelled, for a panic message.
pub fn all_logs() -> String {
    LOGS.with(|logs| {
        let mut out = String::new();
        for (label, path) in logs.borrow().iter() {
            out.push_str(&format!(
                "\n===== log of {label} ({}) =====\n",
                path.display()
            ));
            out.push_str(&read_log(path));
        }
        out
    })
}

fn read_log(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => format!("(cannot read log: {e})"),
    }
}

/// Panic with `msg` and the logs of every daemon of this test.
pub fn fail(msg: &str) -> ! {
    let logs = all_logs();
    LOGS_DUMPED.with(|d| d.set(true));
    panic!("{msg}\n{logs}");
}

/// Poll `f` every few tens of milliseconds until it returns `Some`, or panic at `timeout` with
/// `what` and the daemons' logs.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() >= timeout {
            fail(&format!("timed out after {timeout:?} waiting for: {what}"));
        }
        thread::sleep(POLL);
    }
}

/// Poll `cond` until it holds, or panic at `timeout` with `what` and the daemons' logs.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    wait_for(timeout, what, || cond().then_some(()));
}

/// Run `cmd` with `input` on stdin (or none), killing it and failing the test at `timeout`.
pub fn run_bounded(cmd: Command, input: Option<Vec<u8>>, timeout: Duration) -> Output {
    let stdin = if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    };
    run_bounded_with(cmd, stdin, input, timeout)
}

/// [`run_bounded`] with standard input from `stdin` (a file, say: all of it there at once).
pub fn run_bounded_stdin(cmd: Command, stdin: Stdio, timeout: Duration) -> Output {
    run_bounded_with(cmd, stdin, None, timeout)
}

fn run_bounded_with(
    mut cmd: Command,
    stdin: Stdio,
    input: Option<Vec<u8>>,
    timeout: Duration,
) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(stdin);
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {desc}: {e}"));
    let writer = match (input, child.stdin.take()) {
        (Some(bytes), Some(mut stdin)) => Some(thread::spawn(move || {
            // A child that exits before reading all input is the child's business.
            let _ = stdin.write_all(&bytes);
        })),
        _ => None,
    };
    let mut out_pipe = child.stdout.take().expect("stdout piped");
    let mut err_pipe = child.stderr.take().expect("stderr piped");
    let out_reader = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out_pipe.read_to_end(&mut v);
        v
    });
    let err_reader = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                fail(&format!("{desc} did not finish within {timeout:?}"));
            }
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("waiting for {desc}: {e}"),
        }
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    Output {
        status,
        stdout: out_reader.join().expect("stdout reader"),
        stderr: err_reader.join().expect("stderr reader"),
    }
}

/// A `chatctl` command with a clean environment (no `CHATD_SOCKET` leaking in).
pub fn chatctl_cmd() -> Command {
    let mut cmd = Command::new(CHATCTL);
    cmd.env_remove("CHATD_SOCKET");
    cmd
}

/// Run `chatctl ARGS` (no socket added), bounded.
pub fn chatctl(args: &[&str]) -> Output {
    let mut cmd = chatctl_cmd();
    cmd.args(args);
    run_bounded(cmd, None, CTL_DEADLINE)
}

/// Parse stdout as one JSON object per line.
pub fn parse_json_lines(stdout: &[u8]) -> Vec<Value> {
    let text = String::from_utf8(stdout.to_vec()).expect("chatctl --json output is UTF-8");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| fail(&format!("not a JSON line: {l:?}: {e}")));
            assert!(v.is_object(), "JSON line is not an object: {l}");
            v
        })
        .collect()
}

/// A short printable summary of a finished command, for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Which role a daemon was started in, to know what "ready" means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `--listen` only.
    Relay,
    /// `--user --connect`.
    Member,
    /// `--user --listen`.
    Host,
}

/// A running `chatd` in its own temporary directory. Dropping it kills (SIGKILL) and reaps it.
pub struct Daemon {
    label: String,
    role: Role,
    args: Vec<String>,
    child: Option<Child>,
    listen: Option<String>,
    dir: tempfile::TempDir,
    /// Extra environment for the next starts (`set_env`).
    env: Vec<(String, String)>,
}

impl Daemon {
    /// A relay on an ephemeral loopback port, ready (its `listen` address known).
    pub fn relay() -> Daemon {
        let mut d = Daemon::spawn("relay", Role::Relay, &["--listen", "127.0.0.1:0"]);
        d.wait_ready();
        d
    }

    /// A member `user` of the relay at `relay_addr`, ready and connected.
    pub fn member(user: &str, relay_addr: &str) -> Daemon {
        let d = Daemon::member_unconnected(user, relay_addr);
        d.wait_connected();
        d
    }

    /// A member `user` of the relay at `relay_addr`, answering `status` but maybe not connected.
    pub fn member_unconnected(user: &str, relay_addr: &str) -> Daemon {
        let mut d = Daemon::spawn(
            user,
            Role::Member,
            &["--user", user, "--connect", relay_addr],
        );
        d.wait_ready();
        d
    }

    /// A host (relay plus member `user`) on an ephemeral loopback port, ready.
    pub fn host(user: &str) -> Daemon {
        let mut d = Daemon::spawn(
            &format!("host {user}"),
            Role::Host,
            &["--user", user, "--listen", "127.0.0.1:0"],
        );
        d.wait_ready();
        d
    }

    /// Start `chatd ROLE_ARGS --state-dir --socket --key-bits 2048` in a fresh temporary directory,
    /// without waiting for anything.
    pub fn spawn(label: &str, role: Role, role_args: &[&str]) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("chatd-test-")
            .tempdir()
            .expect("create a temporary directory");
        // The control socket lives here, and chatd insists its directory is private.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700))
            .expect("chmod 700 the temporary directory");
        let mut d = Daemon {
            label: label.to_string(),
            role,
            args: role_args.iter().map(|s| s.to_string()).collect(),
            child: None,
            listen: None,
            dir,
            env: Vec::new(),
        };
        LOGS.with(|l| {
            l.borrow_mut()
                .push((d.label.clone(), d.log_path().to_path_buf()))
        });
        d.start_child();
        d
    }

    fn start_child(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.label);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the daemon log");
        let home = self.dir.path().join("home");
        fs::create_dir_all(&home).expect("create HOME");
        let mut cmd = Command::new(CHATD);
        cmd.args(&self.args)
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--socket")
            .arg(self.socket())
            .args(["--key-bits", "2048"])
            .env("RUST_LOG", "info")
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join("config"))
            .env("XDG_STATE_HOME", home.join("state"))
            .env("XDG_RUNTIME_DIR", home.join("run"))
            .env_remove("STATE_DIRECTORY")
            .env_remove("RUNTIME_DIRECTORY")
            .env_remove("CONFIGURATION_DIRECTORY")
            .env_remove("CHATD_SOCKET")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("CHATD_TEST_ABORT_BEFORE_COMMIT")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log handle"))
            .stderr(log);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CHATD}: {e}"));
        self.child = Some(child);
    }

    /// Wait until the daemon answers `status` (for a relay or host: with a `listen` address; for a
    /// member: connected to its relay). Fails early if the process exits.
    pub fn wait_ready(&mut self) {
        let what = format!("{} to answer `chatctl status`", self.label);
        let status = wait_for(DEADLINE, &what, || {
            self.assert_alive();
            self.try_status()
        });
        if matches!(self.role, Role::Relay | Role::Host) {
            let what = format!("{} to report its listen address", self.label);
            let addr = wait_for(DEADLINE, &what, || {
                self.assert_alive();
                let s = if status["listen"].is_string() {
                    status.clone()
                } else {
                    self.try_status()?
                };
                s["listen"].as_str().map(str::to_string)
            });
            assert!(
                !addr.ends_with(":0"),
                "{} reports listen {addr}, not the bound port",
                self.label
            );
            self.listen = Some(addr);
        }
    }

    /// Wait until the member reports `connected: true`.
    pub fn wait_connected(&self) {
        let what = format!("{} to be connected to its relay", self.label);
        wait_until(DEADLINE, &what, || {
            self.assert_alive();
            self.try_status()
                .is_some_and(|s| s["connected"] == Value::Bool(true))
        });
    }

    fn assert_alive(&self) {
        let Some(child) = self.child.as_ref() else {
            fail(&format!("{} is not running", self.label));
        };
        // try_wait needs &mut; waitid with WNOWAIT only looks and leaves the child to be reaped
        // by Child::wait later, so its pid cannot be reused under us.
        // SAFETY: siginfo_t is plain data; waitid with WNOHANG never blocks and only writes it.
        let exited = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let r = libc::waitid(
                libc::P_PID,
                child.id() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            );
            r == 0 && info.si_pid() != 0
        };
        if exited {
            fail(&format!("{} exited unexpectedly", self.label));
        }
    }

    /// The label used in logs and failure messages.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The temporary directory holding everything of this daemon.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `--state-dir`.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// `--socket`.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("ctl.sock")
    }

    /// Where the daemon's stderr goes.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("chatd.log")
    }

    /// The daemon's log so far (all runs, appended).
    pub fn log(&self) -> String {
        read_log(&self.log_path())
    }

    /// The address a relay or host listens on (learned from `status`).
    pub fn addr(&self) -> String {
        self.listen
            .clone()
            .unwrap_or_else(|| panic!("{} has no listen address", self.label))
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not running", self.label))
            .id()
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILL the daemon and reap it (a crash, as far as the daemon can tell).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM the daemon and wait (bounded) for it to exit; returns its exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self
            .child
            .take()
            .unwrap_or_else(|| panic!("{} is not running", self.label));
        // SAFETY: sending a signal to our own child process.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if start.elapsed() >= DEADLINE {
                let _ = child.kill();
                let _ = child.wait();
                fail(&format!("{} did not exit on SIGTERM", self.label));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Set (or with `None` remove) an environment variable for the next start.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.env.push((key.to_string(), v.to_string()));
        }
    }

    /// Kill (if running) and start again with the same state dir, socket, arguments and port,
    /// without waiting for it (a crash test's daemon may die before it would answer).
    pub fn restart_no_wait(&mut self) {
        self.kill();
        if let Some(addr) = &self.listen {
            if let Some(i) = self.args.iter().position(|a| a == "--listen") {
                self.args[i + 1] = addr.clone();
            }
        }
        self.start_child();
    }

    /// Kill (if running) and start again with the same state dir, socket and arguments, then wait
    /// until ready (a member: connected). A relay or host keeps its port.
    pub fn restart(&mut self) {
        self.kill();
        self.start_stopped();
    }

    /// Start a killed or stopped daemon again (same state dir, socket, arguments, port) and wait
    /// until ready (a member: connected).
    pub fn start_stopped(&mut self) {
        if let Some(addr) = &self.listen {
            if let Some(i) = self.args.iter().position(|a| a == "--listen") {
                self.args[i + 1] = addr.clone();
            }
        }
        self.start_child();
        self.wait_ready();
        if self.role == Role::Member {
            self.wait_connected();
        }
    }

    pub fn ctl_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = chatctl_cmd();
        cmd.arg("--socket").arg(self.socket()).args(args);
        cmd
    }

    /// Run `chatctl --socket SOCK ARGS`, bounded.
    pub fn ctl(&self, args: &[&str]) -> Output {
        run_bounded(self.ctl_cmd(args), None, CTL_DEADLINE)
    }

    /// Run `chatctl --socket SOCK ARGS` with `input` on stdin, bounded.
    pub fn ctl_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        run_bounded(self.ctl_cmd(args), Some(input.to_vec()), CTL_DEADLINE)
    }

    /// Run `chatctl --socket SOCK --json ARGS`, require exit 0, and parse each stdout line.
    pub fn ctl_json(&self, args: &[&str]) -> Vec<Value> {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let out = self.ctl(&full);
        if !out.status.success() {
            fail(&format!(
                "chatctl {full:?} on {} failed: {}",
                self.label,
                describe(&out)
            ));
        }
        parse_json_lines(&out.stdout)
    }

    /// `status --json`, or `None` if chatctl fails (e.g. the daemon is not listening yet).
    pub fn try_status(&self) -> Option<Value> {
        let out = run_bounded(self.ctl_cmd(&["--json", "status"]), None, CTL_DEADLINE);
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8(out.stdout).ok()?;
        let line = text.lines().find(|l| !l.trim().is_empty())?;
        serde_json::from_str(line).ok()
    }

    /// `status --json`, required to succeed.
    pub fn status(&self) -> Value {
        let mut v = self.ctl_json(&["status"]);
        assert_eq!(v.len(), 1, "status --json prints one object: {v:?}");
        v.remove(0)
    }

    /// Own fingerprint, from `status --json`.
    pub fn fingerprint(&self) -> String {
        self.status()["fingerprint"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: status has no fingerprint", self.label))
            .to_string()
    }

    /// `tail --json -n 1000 EXTRA`: the whole (test-sized) history.
    pub fn tail(&self, extra: &[&str]) -> Vec<Value> {
        let mut args = vec!["tail", "-n", "1000"];
        args.extend_from_slice(extra);
        self.ctl_json(&args)
    }

    /// The message records of the history.
    pub fn messages(&self) -> Vec<Value> {
        self.tail(&[])
            .into_iter()
            .filter(|r| r["kind"] == "message")
            .collect()
    }

    /// Texts of messages in the history with direction `dir` ("in" or "out").
    pub fn texts(&self, dir: &str) -> Vec<String> {
        self.messages()
            .iter()
            .filter(|r| r["dir"] == dir)
            .map(|r| r["text"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// Wait until an incoming message with exactly `text` is in the history; return its record.
    pub fn wait_message(&self, text: &str) -> Value {
        let what = format!("{} to receive {text:?}", self.label);
        wait_for(DEADLINE, &what, || {
            self.messages()
                .into_iter()
                .find(|r| r["dir"] == "in" && r["text"] == text)
        })
    }

    /// `who --json`.
    pub fn who(&self) -> Vec<Value> {
        self.ctl_json(&["who"])
    }

    /// The `who --json` entry for `user`, if any.
    pub fn peer(&self, user: &str) -> Option<Value> {
        self.who().into_iter().find(|p| p["user"] == user)
    }

    /// Wait until `who` shows `user` with `online`.
    pub fn wait_peer_online(&self, user: &str, online: bool) {
        let what = format!("{} to see {user} online={online} in `who`", self.label);
        wait_until(DEADLINE, &what, || {
            self.peer(user)
                .is_some_and(|p| p["online"] == Value::Bool(online))
        });
    }

    /// Start `chatctl --socket SOCK --json tail ARGS` (add `-f` yourself) as a child whose records
    /// can be read as they come.
    pub fn follow(&self, args: &[&str]) -> Follower {
        let mut cmd = self.ctl_cmd(&["--json", "tail"]);
        cmd.args(args).stdin(Stdio::null());
        Follower::spawn(cmd)
    }

    /// Start `chatctl --socket SOCK ARGS` with stdin a pipe ([`Follower::write_line`]) and its
    /// stdout lines read as they come (`chat` in line or JSON mode).
    pub fn converse(&self, args: &[&str]) -> Follower {
        let mut cmd = self.ctl_cmd(args);
        cmd.stdin(Stdio::piped());
        Follower::spawn(cmd)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() && !LOGS_DUMPED.with(Cell::get) {
            eprintln!(
                "\n===== log of {} (test failed) =====\n{}",
                self.label,
                self.log()
            );
        }
        let path = self.log_path();
        LOGS.with(|l| l.borrow_mut().retain(|(_, p)| *p != path));
    }
}

/// A running `chatctl --json tail ...` (or `chat`) whose stdout lines arrive on a channel.
/// Killed on drop.
pub struct Follower {
    child: Option<Child>,
    stdin: Option<std::process::ChildStdin>,
    lines: Receiver<String>,
    stderr: Arc<Mutex<Vec<u8>>>,
}

impl Follower {
    fn spawn(mut cmd: Command) -> Follower {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start chatctl");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout piped");
        let mut stderr = child.stderr.take().expect("stderr piped");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let err = Arc::new(Mutex::new(Vec::new()));
        let err2 = Arc::clone(&err);
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = stderr.read_to_end(&mut buf);
            err2.lock().expect("stderr lock").extend_from_slice(&buf);
        });
        Follower {
            child: Some(child),
            stdin,
            lines: rx,
            stderr: err,
        }
    }

    /// Write one line (a newline is added) to the child's stdin.
    pub fn write_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin piped and open");
        writeln!(stdin, "{line}")
            .and_then(|_| stdin.flush())
            .unwrap_or_else(|e| fail(&format!("cannot write to chatctl's stdin: {e}")));
    }

    /// Close the child's stdin (end of input).
    pub fn close_stdin(&mut self) {
        self.stdin.take();
    }

    /// The next stdout line as it is, or `None` if none comes within `timeout` or stdout closed.
    pub fn next_line(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// The next record, or `None` if none comes within `timeout` or stdout closed.
    pub fn next(&self, timeout: Duration) -> Option<Value> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => Some(serde_json::from_str(&line).unwrap_or_else(|e| {
                fail(&format!("tail -f printed a non-JSON line {line:?}: {e}"))
            })),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => None,
        }
    }

    /// Read records until one matches `pred` (returned) or the deadline passes (test fails).
    /// Records read on the way are appended to `seen`.
    pub fn wait_record(
        &self,
        what: &str,
        seen: &mut Vec<Value>,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let start = Instant::now();
        loop {
            let left = DEADLINE.saturating_sub(start.elapsed());
            if left.is_zero() {
                fail(&format!(
                    "tail -f: timed out waiting for {what}; saw {seen:#?}; stderr: {}",
                    self.stderr()
                ));
            }
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
                        fail(&format!("tail -f printed a non-JSON line {line:?}: {e}"))
                    });
                    seen.push(v.clone());
                    if pred(&v) {
                        return v;
                    }
                }
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => fail(&format!(
                    "tail -f closed stdout while waiting for {what}; saw {seen:#?}; stderr: {}",
                    self.stderr()
                )),
            }
        }
    }

    /// Whether the chatctl process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Wait (bounded) for chatctl to exit on its own and return its status.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let child = self.child.as_mut().expect("follower running");
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if start.elapsed() >= DEADLINE {
                fail("chatctl tail -f did not exit");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// What chatctl printed on stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().expect("stderr lock")).into_owned()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The bytes of one connection in one direction, shared with its pump thread.
type Recording = Arc<Mutex<Vec<u8>>>;

/// A TCP proxy on loopback that forwards to a target and records every byte, per connection and
/// direction. Stopped on drop.
pub struct Proxy {
    addr: String,
    recordings: Arc<Mutex<Vec<Recording>>>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    /// Listen on an ephemeral loopback port and forward every connection to `target`.
    pub fn start(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address").to_string();
        let recordings: Arc<Mutex<Vec<Recording>>> = Arc::default();
        let streams: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let target = target.to_string();
        {
            let recordings = Arc::clone(&recordings);
            let streams = Arc::clone(&streams);
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(client) = conn else { continue };
                    let Ok(upstream) = TcpStream::connect(&target) else {
                        let _ = client.shutdown(Shutdown::Both);
                        continue;
                    };
                    let up_rec = Arc::new(Mutex::new(Vec::new()));
                    let down_rec = Arc::new(Mutex::new(Vec::new()));
                    {
                        let mut r = recordings.lock().expect("recordings lock");
                        r.push(Arc::clone(&up_rec));
                        r.push(Arc::clone(&down_rec));
                    }
                    let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) else {
                        continue;
                    };
                    {
                        let mut s = streams.lock().expect("streams lock");
                        if let (Ok(c3), Ok(u3)) = (client.try_clone(), upstream.try_clone()) {
                            s.push(c3);
                            s.push(u3);
                        }
                    }
                    thread::spawn(move || pump(client, u2, &up_rec));
                    thread::spawn(move || pump(upstream, c2, &down_rec));
                }
            });
        }
        Proxy {
            addr,
            recordings,
            streams,
            stop,
        }
    }

    /// The address to connect to instead of the target.
    pub fn addr(&self) -> String {
        self.addr.clone()
    }

    /// Everything recorded so far: one buffer per connection and direction.
    pub fn recordings(&self) -> Vec<Vec<u8>> {
        self.recordings
            .lock()
            .expect("recordings lock")
            .iter()
            .map(|r| r.lock().expect("recording lock").clone())
            .collect()
    }

    /// Total bytes recorded.
    pub fn total_bytes(&self) -> usize {
        self.recordings().iter().map(Vec::len).sum()
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, rec: &Mutex<Vec<u8>>) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                rec.lock()
                    .expect("recording lock")
                    .extend_from_slice(&buf[..n]);
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(&self.addr);
        for s in self.streams.lock().expect("streams lock").iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Whether `needle` occurs in `haystack`.
pub fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Every regular file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                out.push(e.path());
            }
        }
    }
    out
}

/// Read a whole file (for scanning); panics on error.
pub fn read_file(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut v))
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    v
}

/// A marker string unique to this test run.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// Whether `s` is 32 lowercase hex digits (a message id).
pub fn is_hex_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Whether `s` is an RFC 3339 UTC timestamp: `YYYY-MM-DDTHH:MM:SS[.frac](Z|+00:00)`.
pub fn is_rfc3339_utc(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() < 20 {
        return false;
    }
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    let shape = digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && (b[10] == b'T' || b[10] == b't')
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19);
    if !shape {
        return false;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return false;
        }
        rest = &frac[n..];
    }
    rest == "Z" || rest == "z" || rest == "+00:00"
}

// ---------------------------------------------------------------------------------------------
// Added for the delivery, storage-fault and load tests (issue 3). Nothing above is changed.

/// A child process that is not a daemon (e.g. a long-lived `chatctl send` reading stdin). Killed
/// and reaped on drop, also when a test panics.
pub struct ChildGuard {
    child: Option<Child>,
}

impl ChildGuard {
    /// Guard `child`.
    pub fn new(child: Child) -> ChildGuard {
        ChildGuard { child: Some(child) }
    }

    /// The guarded child.
    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("child still guarded")
    }

    /// Wait up to `timeout` for the child to exit on its own; kill it at the deadline and return
    /// `None`.
    pub fn wait_bounded(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child().try_wait() {
                self.child = None;
                return Some(status);
            }
            if start.elapsed() >= timeout {
                if let Some(mut c) = self.child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Raises a shared flag when dropped, so helper threads of a test stop when the test ends (also
/// when it panics).
pub struct StopOnDrop(pub Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Daemon {
    /// Like [`Daemon::spawn`], but runs `prepare` on the daemon's (still empty) temporary
    /// directory before the process starts, e.g. to mount a file system on `DIR/state`. If
    /// `prepare` fails, nothing is started and its error is returned.
    pub fn spawn_prepared<T>(
        label: &str,
        role: Role,
        role_args: &[&str],
        prepare: impl FnOnce(&Path) -> Result<T, String>,
    ) -> Result<(Daemon, T), String> {
        let dir = tempfile::Builder::new()
            .prefix("chatd-test-")
            .tempdir()
            .expect("create a temporary directory");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700))
            .expect("chmod 700 the temporary directory");
        let extra = prepare(dir.path())?;
        let mut d = Daemon {
            label: label.to_string(),
            role,
            args: role_args.iter().map(|s| s.to_string()).collect(),
            child: None,
            listen: None,
            dir,
            env: Vec::new(),
        };
        LOGS.with(|l| {
            l.borrow_mut()
                .push((d.label.clone(), d.log_path().to_path_buf()))
        });
        d.start_child();
        Ok((d, extra))
    }

    /// Start a killed or stopped daemon again (same state dir, socket, arguments, port) and wait
    /// only until it answers `status`: a member need not be connected (its relay may be down).
    pub fn start_stopped_unconnected(&mut self) {
        if let Some(addr) = &self.listen {
            if let Some(i) = self.args.iter().position(|a| a == "--listen") {
                self.args[i + 1] = addr.clone();
            }
        }
        self.start_child();
        self.wait_ready();
    }

    /// The whole history, however long (`tail --json -n 100000000`).
    pub fn history(&self) -> Vec<Value> {
        self.ctl_json(&["tail", "-n", "100000000"])
    }

    /// Texts of the incoming messages of the whole history, in history order, with their
    /// senders: `(from, text)`.
    pub fn incoming(&self) -> Vec<(String, String)> {
        self.history()
            .iter()
            .filter(|r| r["kind"] == "message" && r["dir"] == "in")
            .map(|r| {
                (
                    r["from"].as_str().unwrap_or_default().to_string(),
                    r["text"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    /// `outbox_pending` from `status --json`.
    pub fn outbox_pending(&self) -> u64 {
        self.status()["outbox_pending"]
            .as_u64()
            .unwrap_or_else(|| fail(&format!("{}: status has no outbox_pending", self.label)))
    }

    /// A `/proc/PID/status` field in KiB (e.g. `VmHWM`, the peak resident set, or `VmRSS`).
    pub fn proc_kib(&self, field: &str) -> Option<u64> {
        proc_status_kib(self.pid(), field)
    }
}

/// Raise the soft open-file limit to the hard one and return the limit in force: tests that hold
/// hundreds or thousands of connections (and the daemons they start, which inherit it) need it.
pub fn raise_nofile() -> libc::rlim_t {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    lim.rlim_cur
}

/// A `/proc/PID/status` field given in kB (e.g. `VmHWM`, `VmRSS`), in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.split(':').next() == Some(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The delays of every "reconnecting in X s" line of a member's log, in order.
pub fn reconnect_delays(log: &str) -> Vec<f64> {
    const MARK: &str = "reconnecting in ";
    log.lines()
        .filter_map(|l| {
            let rest = &l[l.find(MARK)? + MARK.len()..];
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// TLS to and from a relay: the one client and server every test that speaks the relay protocol
// over a socket uses (PROTOCOL.md "Connecting").

/// The label and length of the login's TLS exporter value (PROTOCOL.md "Connecting").
pub const LOGIN_EXPORTER_LABEL: &[u8] = b"EXPORTER-chatd-login-v1";
/// See [`LOGIN_EXPORTER_LABEL`].
pub const LOGIN_EXPORTER_LEN: usize = 32;

fn tls_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A test client's verifier: takes any relay chain, but still checks the handshake signature
/// with the key it shows.
#[derive(Debug)]
struct AnyRelayKey(rustls::crypto::WebPkiSupportedAlgorithms);

impl rustls::client::danger::ServerCertVerifier for AnyRelayKey {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 offered".into()))
    }
    fn verify_tls13_signature(
        &self,
        msg: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(msg, cert, dss, &self.0)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// A client TLS session for a relay, before any byte moved: for tests that drive the handshake
/// themselves (slow or partial ones).
pub fn tls_client_session() -> rustls::ClientConnection {
    let p = tls_provider();
    let algs = p.signature_verification_algorithms;
    let cfg = rustls::ClientConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyRelayKey(algs)))
        .with_no_client_auth();
    let name =
        rustls::pki_types::ServerName::try_from(chatd::daemon::tls::RELAY_NAME).expect("a name");
    rustls::ClientConnection::new(Arc::new(cfg), name).expect("a client session")
}

/// A blocking TLS 1.3 connection to a relay, as a member's daemon makes it; bytes written and
/// read are the relay protocol's frames.
pub struct TlsClient {
    s: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
}

impl TlsClient {
    /// Connect to `addr` and complete the handshake (within [`DEADLINE`]).
    pub fn connect(addr: &str) -> std::io::Result<TlsClient> {
        TlsClient::over(TcpStream::connect(addr)?)
    }

    /// Complete a handshake over an open TCP connection.
    pub fn over(mut tcp: TcpStream) -> std::io::Result<TlsClient> {
        tcp.set_read_timeout(Some(DEADLINE))?;
        tcp.set_write_timeout(Some(DEADLINE))?;
        let mut conn = tls_client_session();
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp)?;
        }
        Ok(TlsClient {
            s: rustls::StreamOwned::new(conn, tcp),
        })
    }

    /// The session's login exporter value, which a `Login` signs.
    pub fn exporter(&self) -> Vec<u8> {
        self.s
            .conn
            .export_keying_material(vec![0u8; LOGIN_EXPORTER_LEN], LOGIN_EXPORTER_LABEL, None)
            .expect("an exporter value after the handshake")
    }

    /// The TCP socket under the session (timeouts, shutdown).
    pub fn tcp(&self) -> &TcpStream {
        &self.s.sock
    }
}

impl Read for TlsClient {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.s.read(buf)
    }
}

impl Write for TlsClient {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.s.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.s.flush()
    }
}

/// The server side of a fake relay: TLS 1.3 over `id`'s key, with the real relay's server
/// config. Completes the handshake on `tcp` (within [`DEADLINE`]).
pub fn tls_accept(
    mut tcp: TcpStream,
    id: &chatd::crypto::Identity,
) -> std::io::Result<rustls::StreamOwned<rustls::ServerConnection, TcpStream>> {
    let cfg = chatd::daemon::tls::server_config(id).map_err(std::io::Error::other)?;
    tcp.set_read_timeout(Some(DEADLINE))?;
    tcp.set_write_timeout(Some(DEADLINE))?;
    let mut conn =
        rustls::ServerConnection::new(cfg).map_err(|e| std::io::Error::other(e.to_string()))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    Ok(rustls::StreamOwned::new(conn, tcp))
}
