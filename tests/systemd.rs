//! chatd under systemd (issue 4, points 1 and 2), played without systemd: the test is the
//! service manager. It binds the notification socket (`NOTIFY_SOCKET`, a Unix datagram socket)
//! and reads what chatd tells it, and it passes listening sockets the way systemd does (fds from
//! 3, `LISTEN_FDS`, `LISTEN_FDNAMES`, and `LISTEN_PID` equal to chatd's pid).
//!
//! | what | test |
//! |---|---|
//! | READY=1 only once the control socket answers; RELOADING=1/READY=1 on SIGHUP; STOPPING=1 on SIGTERM; exit 0 | `notify_ready_reload_and_stopping` |
//! | WATCHDOG=1 every half WATCHDOG_USEC, for WATCHDOG_PID | `watchdog_pings_at_half_the_timeout` |
//! | STATUS= follows the member's connection, sent only on change | `status_follows_the_member_connection` |
//! | socket activation: control socket and relay listener from systemd | `socket_activation_serves_control_and_relay` |
//! | log lines under journald carry a `<N>` priority | `journal_lines_carry_syslog_priority` |
//!
//! chatd is started here directly rather than through `common::Daemon`, which removes the
//! systemd variables on purpose. Every child is killed on drop; every wait has a deadline.

mod common;

use chatd::client::Client;
use chatd::proto::control::{CtlRequest, CtlResponse, StatusView};
use common::*;
use serde_json::Value;
use std::fs::{self, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// A chatd started by this test. Dropping it kills (SIGKILL) and reaps it.
struct Proc {
    label: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    /// Spawn `cmd` with stdout and stderr going to `log`.
    fn spawn(label: &str, mut cmd: Command, log: PathBuf) -> Proc {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open the log");
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone the log handle"))
            .stderr(file);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {label}: {e}"));
        Proc {
            label: label.to_string(),
            child: Some(child),
            log,
        }
    }

    fn pid(&self) -> libc::pid_t {
        self.child.as_ref().expect("running").id() as libc::pid_t
    }

    /// Panic with `msg` and the daemon's log.
    fn fail(&self, msg: &str) -> ! {
        let log = fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(no log: {e})"));
        panic!(
            "{}: {msg}\n===== log of {} =====\n{log}\n{}",
            self.label,
            self.label,
            all_logs()
        );
    }

    /// Fail if the process has exited.
    fn assert_alive(&mut self) {
        let exited = match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => None,
            Some(Ok(Some(status))) => Some(format!("exited with {status}")),
            Some(Err(e)) => Some(format!("cannot be waited for: {e}")),
            None => Some("was already reaped".into()),
        };
        if let Some(why) = exited {
            self.fail(&format!("chatd {why}"));
        }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill takes plain integers; the pid is our own unreaped child, so it cannot have
        // been reused by another process.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig})", self.pid());
    }

    /// Wait (bounded) for the process to exit on its own.
    fn wait_exit(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            let child = self.child.as_mut().expect("running");
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    return status;
                }
                Ok(None) if start.elapsed() >= DEADLINE => {
                    self.fail(&format!("did not exit within {DEADLINE:?}"))
                }
                Ok(None) => thread::sleep(Duration::from_millis(20)),
                Err(e) => self.fail(&format!("cannot wait: {e}")),
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The service manager's end of `NOTIFY_SOCKET`.
struct Notify {
    sock: UnixDatagram,
    path: PathBuf,
    /// Every datagram received so far, in order.
    seen: Vec<String>,
}

impl Notify {
    fn bind(dir: &Path) -> Notify {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("set a read timeout");
        Notify {
            sock,
            path,
            seen: Vec::new(),
        }
    }

    /// Receive datagrams until one has the line `line` (e.g. `READY=1`) and return it. Fails at
    /// the deadline, or at once if `p` exits.
    fn wait_line(&mut self, p: &mut Proc, line: &str) -> String {
        self.wait(p, line, |d| d.lines().any(|l| l == line))
    }

    /// Receive datagrams until one satisfies `pred` and return it.
    fn wait(&mut self, p: &mut Proc, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        let mut buf = vec![0u8; 4096];
        loop {
            match self.sock.recv(&mut buf) {
                Ok(n) => {
                    let d = String::from_utf8_lossy(&buf[..n]).into_owned();
                    self.seen.push(d.clone());
                    if pred(&d) {
                        return d;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => p.fail(&format!("notify socket: {e}")),
            }
            p.assert_alive();
            if start.elapsed() >= DEADLINE {
                p.fail(&format!(
                    "no notification {what} within {DEADLINE:?}; received {:#?}",
                    self.seen
                ));
            }
        }
    }

    /// The `STATUS=` values received so far, in order.
    fn statuses(&self) -> Vec<String> {
        self.seen
            .iter()
            .flat_map(|d| d.lines())
            .filter_map(|l| l.strip_prefix("STATUS="))
            .map(str::to_string)
            .collect()
    }
}

/// The value of `KEY=` in a notification datagram.
fn field<'a>(datagram: &'a str, key: &str) -> Option<&'a str> {
    datagram
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

/// `chatd ARGS --state-dir DIR/state --socket SOCKET --key-bits 2048` with a clean environment
/// (no systemd variables but those the test sets). Each name in `own_pid_vars` is set to chatd's
/// own pid, as systemd sets `LISTEN_PID` and `WATCHDOG_PID`: the command runs through
/// `/bin/sh -c 'VAR=$$; export VAR; exec chatd ARGS'`, so the shell's pid becomes chatd's.
fn chatd_cmd(dir: &Path, socket: &Path, args: &[&str], own_pid_vars: &[&str]) -> Command {
    let mut cmd = if own_pid_vars.is_empty() {
        Command::new(CHATD)
    } else {
        let mut script = String::new();
        for v in own_pid_vars {
            script.push_str(&format!("{v}=$$; export {v}; "));
        }
        script.push_str("exec \"$0\" \"$@\"");
        let mut c = Command::new("/bin/sh");
        c.arg("-c").arg(script).arg(CHATD);
        c
    };
    let home = dir.join("home");
    fs::create_dir_all(&home).expect("create HOME");
    cmd.args(args)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--socket")
        .arg(socket)
        .args(["--key-bits", "2048"])
        .env("RUST_LOG", "info")
        .env("HOME", &home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("XDG_STATE_HOME", home.join("state"))
        .env("XDG_RUNTIME_DIR", home.join("run"));
    for v in [
        "STATE_DIRECTORY",
        "RUNTIME_DIRECTORY",
        "CONFIGURATION_DIRECTORY",
        "CHATD_SOCKET",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
    ] {
        cmd.env_remove(v);
    }
    cmd
}

/// A private (0700) temporary directory: chatd refuses a control socket directory others can
/// read.
fn tempdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("chatd-sd-")
        .tempdir()
        .expect("create a temporary directory");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).expect("chmod 700");
    dir
}

/// `status` over the control socket with `chatd::client::Client`, bounded by `timeout`.
fn status_within(socket: &Path, timeout: Duration) -> Result<StatusView, String> {
    let (tx, rx) = mpsc::channel();
    let path = socket.to_path_buf();
    thread::spawn(move || {
        let r = Client::connect(&path)
            .and_then(|mut c| c.request(&CtlRequest::Status))
            .map_err(|e| e.to_string());
        let _ = tx.send(r);
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(CtlResponse::Status(s))) => Ok(s),
        Ok(Ok(other)) => Err(format!("unexpected answer {other:?}")),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

#[test]
fn notify_ready_reload_and_stopping() {
    let dir = tempdir();
    let mut notify = Notify::bind(dir.path());
    let socket = dir.path().join("ctl.sock");
    let mut cmd = chatd_cmd(dir.path(), &socket, &["--listen", "127.0.0.1:0"], &[]);
    cmd.env("NOTIFY_SOCKET", &notify.path);
    let mut p = Proc::spawn("relay", cmd, dir.path().join("chatd.log"));

    let ready = notify.wait_line(&mut p, "READY=1");
    // READY=1 means the sockets accept connections: the control socket answers right now, and
    // the relay port takes a connection.
    let status = status_within(&socket, DEADLINE)
        .unwrap_or_else(|e| p.fail(&format!("READY=1 was sent but status failed: {e}")));
    let listen = status
        .listen
        .clone()
        .unwrap_or_else(|| p.fail("status has no listen address"));
    assert!(!listen.ends_with(":0"), "listen {listen} is the bound port");
    std::net::TcpStream::connect(&listen)
        .unwrap_or_else(|e| p.fail(&format!("READY=1 sent but {listen} refuses: {e}")));
    assert_eq!(
        field(&ready, "STATUS"),
        Some(format!("relay listening on {listen}, 0 members online").as_str()),
        "READY=1 carries the status: {ready:?}"
    );
    assert_eq!(
        notify
            .seen
            .iter()
            .filter(|d| d.lines().any(|l| l == "READY=1"))
            .count(),
        1,
        "one READY=1 at start: {:#?}",
        notify.seen
    );

    // SIGHUP: RELOADING=1 (with MONOTONIC_USEC), then READY=1 again once the reload is done.
    p.signal(libc::SIGHUP);
    let reloading = notify.wait_line(&mut p, "RELOADING=1");
    assert!(
        field(&reloading, "MONOTONIC_USEC").is_some_and(|v| v.parse::<u64>().is_ok()),
        "RELOADING=1 carries MONOTONIC_USEC: {reloading:?}"
    );
    notify.wait_line(&mut p, "READY=1");

    // SIGTERM: STOPPING=1, then a clean exit.
    p.signal(libc::SIGTERM);
    notify.wait_line(&mut p, "STOPPING=1");
    let code = p.wait_exit();
    assert!(code.success(), "chatd exits 0 on SIGTERM, got {code}");
    assert!(
        !socket.exists(),
        "chatd removes the control socket it bound itself"
    );
    // Nothing but status updates between start and STOPPING=1 (no stray READY=1 etc.).
    for d in &notify.seen {
        for l in d.lines() {
            let key = l.split('=').next().unwrap_or_default();
            assert!(
                ["READY", "STATUS", "RELOADING", "MONOTONIC_USEC", "STOPPING"].contains(&key),
                "unexpected notification line {l:?} in {:#?}",
                notify.seen
            );
        }
    }
}

#[test]
fn watchdog_pings_at_half_the_timeout() {
    let dir = tempdir();
    let mut notify = Notify::bind(dir.path());
    let socket = dir.path().join("ctl.sock");
    // WATCHDOG_PID is set to chatd's own pid, as systemd does.
    let mut cmd = chatd_cmd(
        dir.path(),
        &socket,
        &["--listen", "127.0.0.1:0"],
        &["WATCHDOG_PID"],
    );
    let usec = 2_000_000u64;
    let timeout = Duration::from_micros(usec);
    cmd.env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", usec.to_string());
    let mut p = Proc::spawn("relay", cmd, dir.path().join("chatd.log"));
    notify.wait_line(&mut p, "READY=1");
    let ready = Instant::now();
    let mut last = ready;
    for i in 1..=3 {
        notify.wait_line(&mut p, "WATCHDOG=1");
        let now = Instant::now();
        // systemd kills a service that is silent for WATCHDOG_USEC.
        assert!(
            now - last < timeout,
            "watchdog ping {i} came {:?} after the previous one, over WATCHDOG_USEC",
            now - last
        );
        last = now;
    }
    // Pinging every half WATCHDOG_USEC (1 s) takes 3 s for three pings, not less: pings on
    // every loop turn would be far more frequent. (The slack covers READY=1 read late.)
    let took = last - ready;
    assert!(
        took >= Duration::from_millis(2700),
        "three pings in {took:?}: more often than every half WATCHDOG_USEC"
    );
    p.signal(libc::SIGTERM);
    notify.wait_line(&mut p, "STOPPING=1");
    assert!(p.wait_exit().success());
}

#[test]
fn status_follows_the_member_connection() {
    let mut relay = Daemon::relay();
    let addr = relay.addr();
    let dir = tempdir();
    let mut notify = Notify::bind(dir.path());
    let socket = dir.path().join("ctl.sock");
    let mut cmd = chatd_cmd(
        dir.path(),
        &socket,
        &["--user", "bob", "--connect", &addr],
        &[],
    );
    cmd.env("NOTIFY_SOCKET", &notify.path);
    let mut p = Proc::spawn("bob", cmd, dir.path().join("chatd.log"));
    // Ready does not wait for the relay: the control socket works while it connects.
    notify.wait_line(&mut p, "READY=1");
    let connected = format!("member bob: connected to {addr}, 0 peers online");
    notify.wait(&mut p, &format!("STATUS={connected}"), |d| {
        field(d, "STATUS") == Some(connected.as_str())
    });
    relay.kill();
    let down = notify.wait(&mut p, "STATUS=member bob: not connected: ...", |d| {
        field(d, "STATUS").is_some_and(|s| s.starts_with("member bob: not connected: "))
    });
    assert!(
        field(&down, "STATUS").is_some_and(|s| s.len() > "member bob: not connected: ".len()),
        "the status says why: {down:?}"
    );
    // Only changes are sent: no two status datagrams in a row say the same.
    let statuses = notify.statuses();
    for w in statuses.windows(2) {
        assert_ne!(w[0], w[1], "status sent twice in a row: {statuses:#?}");
    }
    p.signal(libc::SIGTERM);
    notify.wait_line(&mut p, "STOPPING=1");
    assert!(p.wait_exit().success());
}

#[test]
fn socket_activation_serves_control_and_relay() {
    let dir = tempdir();
    let mut notify = Notify::bind(dir.path());
    // The sockets systemd would create from chatd-relay.socket.
    let socket = dir.path().join("ctl.sock");
    let control = UnixListener::bind(&socket).expect("bind the control socket");
    fs::set_permissions(&socket, fs::Permissions::from_mode(0o600)).expect("chmod the socket");
    let relay = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the relay socket");
    let relay_addr = relay.local_addr().expect("relay address").to_string();

    // `--socket` names the activated socket's own path: a daemon that went through the
    // stale-socket check would find it live (our listener answers) and refuse to start. And
    // `--listen` asks for another port: the activated one must be used instead.
    let mut cmd = chatd_cmd(
        dir.path(),
        &socket,
        &["--listen", "127.0.0.1:0"],
        &["LISTEN_PID"],
    );
    cmd.env("LISTEN_FDS", "2")
        .env("LISTEN_FDNAMES", "control:relay")
        .env("NOTIFY_SOCKET", &notify.path);
    let (control_fd, relay_fd) = (control.as_raw_fd(), relay.as_raw_fd());
    // SAFETY: the closure runs in the forked child before exec and calls only async-signal-safe
    // functions (fcntl, dup2, close) on integers; it allocates nothing. The listeners are first
    // copied above 10 so that placing one at 3 cannot close the other if it sits at 3 or 4; the
    // copies made by dup2 at 3 and 4 do not have FD_CLOEXEC, so they survive both execs (sh,
    // then chatd).
    unsafe {
        cmd.pre_exec(move || {
            let c = libc::fcntl(control_fd, libc::F_DUPFD, 10);
            let r = libc::fcntl(relay_fd, libc::F_DUPFD, 10);
            if c < 0 || r < 0 || libc::dup2(c, 3) < 0 || libc::dup2(r, 4) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(c);
            libc::close(r);
            Ok(())
        });
    }
    let mut p = Proc::spawn("activated relay", cmd, dir.path().join("chatd.log"));
    notify.wait_line(&mut p, "READY=1");

    // chatctl status over the activated control socket; the relay serves the activated port.
    let out = chatctl(&["--socket", &socket.to_string_lossy(), "--json", "status"]);
    if !out.status.success() {
        p.fail(&format!("chatctl status failed: {}", describe(&out)));
    }
    let status = parse_json_lines(&out.stdout);
    assert_eq!(status.len(), 1, "one status object: {status:?}");
    assert_eq!(
        status[0]["listen"],
        Value::String(relay_addr.clone()),
        "the relay listens on the socket systemd passed: {status:?}"
    );

    // A member connects to the activated TCP port and logs in.
    let bob = Daemon::member("bob", &relay_addr);
    let who = chatctl(&["--socket", &socket.to_string_lossy(), "--json", "who"]);
    let peers = parse_json_lines(&who.stdout);
    assert!(
        peers
            .iter()
            .any(|v| v["user"] == "bob" && v["online"] == Value::Bool(true)),
        "the relay lists bob online: {peers:?}\n{}",
        describe(&who)
    );
    assert_eq!(
        bob.status()["connected"],
        Value::Bool(true),
        "bob is logged in"
    );

    p.signal(libc::SIGTERM);
    notify.wait_line(&mut p, "STOPPING=1");
    assert!(p.wait_exit().success(), "exit 0 on SIGTERM");
    // The socket file belongs to systemd, which keeps listening on it: chatd leaves it.
    assert!(
        socket.exists(),
        "chatd must not remove an activated control socket"
    );
    let log = fs::read_to_string(dir.path().join("chatd.log")).unwrap_or_default();
    assert!(
        !log.contains("stale"),
        "an activated socket skips the stale-socket step:\n{log}"
    );
    drop((control, relay));
}

#[test]
fn journal_lines_carry_syslog_priority() {
    let dir = tempdir();
    let mut notify = Notify::bind(dir.path());
    let socket = dir.path().join("ctl.sock");
    let log = dir.path().join("chatd.log");
    fs::write(&log, b"").expect("create the log");
    // journald sets JOURNAL_STREAM to DEVICE:INODE of the stream it hands over as stderr.
    let meta = fs::metadata(&log).expect("stat the log");
    let mut cmd = chatd_cmd(dir.path(), &socket, &["--listen", "127.0.0.1:0"], &[]);
    cmd.env("NOTIFY_SOCKET", &notify.path)
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
    let mut p = Proc::spawn("relay", cmd, log.clone());
    notify.wait_line(&mut p, "READY=1");
    p.signal(libc::SIGTERM);
    notify.wait_line(&mut p, "STOPPING=1");
    assert!(p.wait_exit().success());
    let text = fs::read_to_string(&log).expect("read the log");
    assert!(
        text.lines().any(|l| l.starts_with("<6>chatd ")),
        "the start-up line is at info priority: {text}"
    );
    for l in text.lines() {
        let b = l.as_bytes();
        assert!(
            b.len() > 3 && b[0] == b'<' && b[1].is_ascii_digit() && b[2] == b'>' && b[3] != b'[',
            "every journal line starts with <N> and no timestamp of its own: {l:?}\n{text}"
        );
    }
}
