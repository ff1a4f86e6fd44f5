//! systemd integration without libsystemd: readiness and status notifications (sd_notify(3)),
//! the service watchdog (sd_watchdog_enabled(3)) and socket activation (sd_listen_fds(3)).
//!
//! Every part is a no-op unless systemd asked for it through the environment, so chatd run by
//! hand, by another supervisor or by the tests behaves exactly as before.
//!
//! - [`notify`] and [`Notifier`] send datagrams to `$NOTIFY_SOCKET` (a path, or an abstract
//!   socket when it starts with `@`): `READY=1` once the sockets accept connections, `STATUS=`
//!   when the connection state changes, `RELOADING=1`/`READY=1` around a SIGHUP reload,
//!   `STOPPING=1` on SIGTERM/SIGINT, and `WATCHDOG=1` every half `WATCHDOG_USEC` from the event
//!   loop (so a wedged loop stops the pings and systemd restarts the service).
//! - [`stderr_is_journal`] tells `chatd` to prefix log lines with their syslog priority when
//!   journald collects them, so `journalctl -p warning` works and errors show in colour.
//! - [`listen_fds`] takes the sockets systemd passes (`LISTEN_PID`, `LISTEN_FDS`,
//!   `LISTEN_FDNAMES`, fds from 3): a listening Unix stream socket named `control` becomes the
//!   control socket, a listening TCP socket named `relay` the relay listener. Without those
//!   names (one `.socket` unit can give only one name to all its sockets) each is recognised by
//!   type: the one Unix listener and the one TCP listener. Must never: take an fd that was not
//!   passed to this very process, or keep an fd it does not use.

use std::ffi::OsStr;
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

/// The first file descriptor systemd passes (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// Where notifications go, from `$NOTIFY_SOCKET`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyTarget {
    /// A socket file.
    Path(PathBuf),
    /// A Linux abstract socket (the name without the leading `@`).
    Abstract(Vec<u8>),
}

/// Parse a `$NOTIFY_SOCKET` value; `None` for an empty or unsupported one (e.g. `vsock:`).
pub fn parse_notify_socket(value: &OsStr) -> Option<NotifyTarget> {
    let b = value.as_bytes();
    match b.first() {
        Some(b'/') => Some(NotifyTarget::Path(PathBuf::from(value))),
        Some(b'@') if b.len() > 1 => Some(NotifyTarget::Abstract(b[1..].to_vec())),
        _ => None,
    }
}

fn notify_target() -> Option<NotifyTarget> {
    let value = std::env::var_os("NOTIFY_SOCKET")?;
    let target = parse_notify_socket(&value);
    if target.is_none() && !value.is_empty() {
        warn!(
            "NOTIFY_SOCKET={} is not a socket path or abstract name; not notifying systemd",
            value.to_string_lossy()
        );
    }
    target
}

fn send_to(sock: &UnixDatagram, target: &NotifyTarget, msg: &str) -> io::Result<()> {
    let n = match target {
        NotifyTarget::Path(p) => sock.send_to(msg.as_bytes(), p)?,
        NotifyTarget::Abstract(name) => {
            let addr = SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(msg.as_bytes(), &addr)?
        }
    };
    if n != msg.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "notification datagram truncated",
        ));
    }
    Ok(())
}

fn notify_socket() -> io::Result<UnixDatagram> {
    let sock = UnixDatagram::unbound()?;
    // systemd reads its notification socket promptly; never let a stuck manager stall the loop
    // for long.
    sock.set_write_timeout(Some(Duration::from_millis(500)))?;
    Ok(sock)
}

/// Send one notification (`KEY=VALUE` lines) to `$NOTIFY_SOCKET`. Returns `Ok(false)` without
/// doing anything when the variable is unset (not started by systemd with `Type=notify`).
pub fn notify(msg: &str) -> io::Result<bool> {
    let Some(target) = notify_target() else {
        return Ok(false);
    };
    send_to(&notify_socket()?, &target, msg)?;
    Ok(true)
}

/// The watchdog ping interval asked for by `WATCHDOG_USEC` (half of it), if the watchdog is for
/// this process (`WATCHDOG_PID` unset or equal to `pid`).
pub fn watchdog_interval(usec: Option<&str>, wd_pid: Option<&str>, pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(p) = wd_pid {
        if p.trim().parse::<u32>().ok() != Some(pid) {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

/// Notifications to systemd for the life of the daemon: a cached socket, the watchdog timer,
/// and the last status line (so a status is sent only when it changes).
pub struct Notifier {
    target: Option<(UnixDatagram, NotifyTarget)>,
    watchdog: Option<Duration>,
    next_ping: Option<Instant>,
    last_status: Option<String>,
    warned: bool,
}

impl Notifier {
    /// Read `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`. Without a notify socket
    /// everything is a no-op.
    pub fn from_env() -> Notifier {
        let target = notify_target().and_then(|t| match notify_socket() {
            Ok(s) => Some((s, t)),
            Err(e) => {
                warn!("cannot create a socket to notify systemd: {e}");
                None
            }
        });
        let watchdog = target.as_ref().and_then(|_| {
            watchdog_interval(
                std::env::var("WATCHDOG_USEC").ok().as_deref(),
                std::env::var("WATCHDOG_PID").ok().as_deref(),
                std::process::id(),
            )
        });
        if let Some(w) = watchdog {
            info!(
                "systemd watchdog enabled: pinging every {} ms",
                w.as_millis()
            );
        }
        Notifier {
            target,
            watchdog,
            next_ping: None,
            last_status: None,
            warned: false,
        }
    }

    /// Whether systemd is listening for notifications.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Send `msg`; failures are logged (a warning the first time), never fatal.
    pub fn send(&mut self, msg: &str) {
        let Some((sock, target)) = &self.target else {
            return;
        };
        match send_to(sock, target, msg) {
            Ok(()) => debug!("notified systemd: {}", msg.replace('\n', " ")),
            Err(e) if !self.warned => {
                self.warned = true;
                warn!("cannot notify systemd: {e}");
            }
            Err(e) => debug!("cannot notify systemd: {e}"),
        }
    }

    /// The sockets accept connections: `READY=1` with the current status; starts the watchdog.
    pub fn ready(&mut self, status: String) {
        let status = one_line(&status);
        self.send(&format!("READY=1\nSTATUS={status}"));
        self.last_status = Some(status);
        self.next_ping = self.watchdog.map(|w| Instant::now() + w);
    }

    /// Send `STATUS=` if it differs from the last one sent.
    pub fn status(&mut self, status: String) {
        let status = one_line(&status);
        if self.last_status.as_deref() == Some(status.as_str()) {
            return;
        }
        self.send(&format!("STATUS={status}"));
        self.last_status = Some(status);
    }

    /// A reload begins (SIGHUP); [`Notifier::reloaded`] must follow.
    pub fn reloading(&mut self) {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: ts is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
        unsafe {
            libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
        }
        let usec = (ts.tv_sec as u64)
            .saturating_mul(1_000_000)
            .saturating_add(ts.tv_nsec as u64 / 1000);
        self.send(&format!(
            "RELOADING=1\nSTATUS=reloading the configuration\nMONOTONIC_USEC={usec}"
        ));
        self.last_status = None;
    }

    /// The reload is over.
    pub fn reloaded(&mut self, status: String) {
        let status = one_line(&status);
        self.send(&format!("READY=1\nSTATUS={status}"));
        self.last_status = Some(status);
    }

    /// Shutdown begins.
    pub fn stopping(&mut self) {
        self.send("STOPPING=1\nSTATUS=stopping");
        self.last_status = Some("stopping".into());
        self.next_ping = None;
    }

    /// How long the event loop may sleep before the next watchdog ping is due.
    pub fn watchdog_due_in(&self, now: Instant) -> Option<Duration> {
        self.next_ping.map(|t| t.saturating_duration_since(now))
    }

    /// Ping `WATCHDOG=1` if it is time; called once per event-loop turn.
    pub fn watchdog(&mut self, now: Instant) {
        let (Some(due), Some(every)) = (self.next_ping, self.watchdog) else {
            return;
        };
        if now >= due {
            self.send("WATCHDOG=1");
            self.next_ping = Some(now + every);
        }
    }
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// Whether stderr is connected to the journal (`$JOURNAL_STREAM` names its device and inode),
/// so log lines can carry a `<N>` syslog priority prefix instead of a timestamp of their own.
pub fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let v = v.to_string_lossy();
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    // SAFETY: an all-zero stat is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes only into st, which is valid and large enough; fd 2 may be closed,
    // which yields an error.
    let rc = unsafe { libc::fstat(libc::STDERR_FILENO, &mut st) };
    rc == 0 && st.st_dev as u64 == dev && st.st_ino as u64 == ino
}

/// The syslog priority journald understands as a `<N>` line prefix (sd-daemon(3)).
pub fn syslog_priority(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

/// What one part of the daemon shows in `STATUS=`.
pub struct MemberStatus<'a> {
    /// Own user name.
    pub user: &'a str,
    /// Logged in to the relay (or attached to the in-process one).
    pub connected: bool,
    /// The remote relay, for a member; `None` for a host's in-process member.
    pub relay: Option<&'a str>,
    /// Why it is not connected, if known.
    pub error: Option<&'a str>,
    /// Peers online.
    pub peers_online: usize,
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The `STATUS=` line: "relay listening on ADDR, N members online", "member alice: connected to
/// HOST:PORT, N peers online", "member alice: not connected: REASON"; a host shows both.
pub fn status_line(relay: Option<(String, usize)>, member: Option<MemberStatus<'_>>) -> String {
    let mut parts = Vec::new();
    if let Some((addr, online)) = relay {
        parts.push(format!(
            "relay listening on {addr}, {} online",
            plural(online, "member", "members")
        ));
    }
    if let Some(m) = member {
        let peers = plural(m.peers_online, "peer", "peers");
        parts.push(match (m.connected, m.relay) {
            (true, Some(r)) => format!("member {}: connected to {r}, {peers} online", m.user),
            (true, None) => format!(
                "member {}: attached to the local relay, {peers} online",
                m.user
            ),
            (false, relay) => {
                let why = match (m.error, relay) {
                    (Some(e), _) => e.to_string(),
                    (None, Some(r)) => format!("connecting to {r}"),
                    (None, None) => "attaching to the local relay".to_string(),
                };
                format!("member {}: not connected: {why}", m.user)
            }
        });
    }
    parts.join("; ")
}

/// The sockets systemd passed to this process, converted and ready for mio.
#[derive(Default)]
pub struct Activated {
    /// The control socket (a listening Unix stream socket).
    pub control: Option<UnixListener>,
    /// The relay listener (a listening TCP socket).
    pub relay: Option<TcpListener>,
}

/// What a passed fd is, as far as chatd cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdKind {
    /// A listening `AF_UNIX` stream socket.
    UnixListener,
    /// A listening `AF_INET`/`AF_INET6` stream socket.
    TcpListener,
    /// Anything else.
    Other,
}

impl std::fmt::Display for FdKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FdKind::UnixListener => "a listening Unix stream socket",
            FdKind::TcpListener => "a listening TCP socket",
            FdKind::Other => "not a listening stream socket",
        })
    }
}

fn sockopt_int(fd: RawFd, opt: libc::c_int) -> Option<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v and len are valid for writes of the sizes given; a bad fd only yields an error.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            &mut v as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    (rc == 0).then_some(v)
}

fn fd_kind(fd: RawFd) -> FdKind {
    let stream = sockopt_int(fd, libc::SO_TYPE) == Some(libc::SOCK_STREAM);
    let listening = sockopt_int(fd, libc::SO_ACCEPTCONN) == Some(1);
    if !(stream && listening) {
        return FdKind::Other;
    }
    match sockopt_int(fd, libc::SO_DOMAIN) {
        Some(libc::AF_UNIX) => FdKind::UnixListener,
        Some(libc::AF_INET | libc::AF_INET6) => FdKind::TcpListener,
        _ => FdKind::Other,
    }
}

/// Which of the passed sockets (by index) serve as control socket and relay listener.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// Index of the control socket.
    pub control: Option<usize>,
    /// Index of the relay listener.
    pub relay: Option<usize>,
}

fn pick(
    fds: &[(FdKind, &str)],
    name: &str,
    other_name: &str,
    kind: FdKind,
) -> Result<Option<usize>, String> {
    let named: Vec<usize> = (0..fds.len()).filter(|&i| fds[i].1 == name).collect();
    match named.as_slice() {
        [i] if fds[*i].0 == kind => return Ok(Some(*i)),
        [i] => {
            return Err(format!(
                "the socket systemd passed as \"{name}\" is {}, not {kind}",
                fds[*i].0
            ))
        }
        [] => {}
        _ => {
            return Err(format!(
                "systemd passed {} sockets named \"{name}\"; chatd uses one",
                named.len()
            ))
        }
    }
    let by_kind: Vec<usize> = (0..fds.len())
        .filter(|&i| fds[i].0 == kind && fds[i].1 != other_name)
        .collect();
    match by_kind.as_slice() {
        [] => Ok(None),
        [i] => Ok(Some(*i)),
        _ => Err(format!(
            "systemd passed {} sockets that are {kind} and none is named \"{name}\"; \
             set FileDescriptorName={name} on the one to use",
            by_kind.len()
        )),
    }
}

/// Choose the control socket and relay listener among the passed sockets: by name (`control`,
/// `relay`) first, else by type (the one Unix listener, the one TCP listener).
pub fn select(fds: &[(FdKind, &str)]) -> Result<Selection, String> {
    Ok(Selection {
        control: pick(fds, "control", "relay", FdKind::UnixListener)?,
        relay: pick(fds, "relay", "control", FdKind::TcpListener)?,
    })
}

/// Parse the activation variables for process `pid`: the number of fds passed and their names
/// (empty names when `LISTEN_FDNAMES` is absent or does not match the count). `Ok(None)` when the
/// fds are not for this process.
pub fn parse_listen_env(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    names: Option<&str>,
    pid: u32,
) -> Result<Option<Vec<String>>, String> {
    let Some(lp) = listen_pid else {
        return Ok(None);
    };
    match lp.trim().parse::<u32>() {
        Ok(p) if p == pid => {}
        Ok(p) => {
            debug!("LISTEN_PID={p} is not this process ({pid}); ignoring LISTEN_FDS");
            return Ok(None);
        }
        Err(_) => return Err(format!("LISTEN_PID={lp:?} is not a process id")),
    }
    let n = match listen_fds {
        None => return Ok(None),
        Some(s) => s
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|&n| n <= 1024)
            .ok_or_else(|| format!("LISTEN_FDS={s:?} is not a count of file descriptors"))?,
    };
    let mut out = vec![String::new(); n];
    if let Some(names) = names {
        let given: Vec<&str> = names.split(':').collect();
        if given.len() == n {
            for (o, g) in out.iter_mut().zip(given) {
                *o = g.to_string();
            }
        } else {
            warn!(
                "LISTEN_FDNAMES has {} names for {n} sockets; telling the sockets apart by type",
                given.len()
            );
        }
    }
    Ok(Some(out))
}

/// Take the sockets systemd passed to this process, if any, and unset `LISTEN_PID`,
/// `LISTEN_FDS` and `LISTEN_FDNAMES` so nothing else takes them again. Sockets chatd does not
/// use are closed with a warning. Call it first thing, before other threads exist.
pub fn listen_fds() -> Result<Activated, String> {
    let var = |k: &str| std::env::var(k).ok();
    let (pid_var, fds_var, names_var) =
        (var("LISTEN_PID"), var("LISTEN_FDS"), var("LISTEN_FDNAMES"));
    for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        // Modifying the environment races with other threads reading it; chatd calls this at
        // the start of `daemon::run`, before it starts any thread.
        std::env::remove_var(k);
    }
    let Some(names) = parse_listen_env(
        pid_var.as_deref(),
        fds_var.as_deref(),
        names_var.as_deref(),
        std::process::id(),
    )?
    else {
        return Ok(Activated::default());
    };
    let mut fds = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let fd = LISTEN_FDS_START + i as RawFd;
        // SAFETY: fcntl with F_GETFD/F_SETFD takes an integer fd and flags and touches no
        // memory; on a closed fd it fails with EBADF.
        let ok = unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            flags >= 0 && libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) == 0
        };
        if !ok {
            return Err(format!(
                "LISTEN_FDS says systemd passed fd {fd}, but it is not open: {}",
                io::Error::last_os_error()
            ));
        }
        // SAFETY: fd is open (checked above) and was passed to this process by its parent for
        // it to own (LISTEN_PID is our pid); the variables are unset, so nothing else in this
        // process takes it, and each fd is wrapped exactly once.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let label = if name.is_empty() {
            "(unnamed)"
        } else {
            name.as_str()
        };
        debug!(
            "systemd passed fd {fd} {label}: {}",
            fd_kind(owned.as_raw_fd())
        );
        fds.push(owned);
    }
    let kinds: Vec<(FdKind, &str)> = fds
        .iter()
        .zip(&names)
        .map(|(fd, n)| (fd_kind(fd.as_raw_fd()), n.as_str()))
        .collect();
    let sel = select(&kinds)?;
    let mut out = Activated::default();
    for (i, fd) in fds.into_iter().enumerate() {
        if Some(i) == sel.control {
            out.control = Some(UnixListener::from(fd));
        } else if Some(i) == sel.relay {
            out.relay = Some(TcpListener::from(fd));
        } else {
            warn!(
                "closing socket fd {} \"{}\" passed by systemd: chatd uses only a control \
                 socket and a relay listener",
                LISTEN_FDS_START + i as RawFd,
                names[i]
            );
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_socket_forms() {
        assert_eq!(
            parse_notify_socket(OsStr::new("/run/systemd/notify")),
            Some(NotifyTarget::Path("/run/systemd/notify".into()))
        );
        assert_eq!(
            parse_notify_socket(OsStr::new("@/org/x/notify")),
            Some(NotifyTarget::Abstract(b"/org/x/notify".to_vec()))
        );
        assert_eq!(parse_notify_socket(OsStr::new("")), None);
        assert_eq!(parse_notify_socket(OsStr::new("@")), None);
        assert_eq!(parse_notify_socket(OsStr::new("vsock:2:1234")), None);
        assert_eq!(parse_notify_socket(OsStr::new("relative")), None);
    }

    #[test]
    fn watchdog_is_half_the_timeout_and_only_for_us() {
        let half = Some(Duration::from_millis(100));
        assert_eq!(watchdog_interval(Some("200000"), None, 7), half);
        assert_eq!(watchdog_interval(Some("200000"), Some("7"), 7), half);
        assert_eq!(watchdog_interval(Some("200000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("200000"), Some("x"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("soon"), None, 7), None);
        assert_eq!(watchdog_interval(None, Some("7"), 7), None);
        assert_eq!(
            watchdog_interval(Some("1"), None, 7),
            Some(Duration::from_millis(1))
        );
    }

    #[test]
    fn listen_env_is_for_this_pid_only() {
        assert_eq!(parse_listen_env(None, Some("2"), None, 7), Ok(None));
        assert_eq!(parse_listen_env(Some("8"), Some("2"), None, 7), Ok(None));
        assert!(parse_listen_env(Some("x"), Some("2"), None, 7).is_err());
        assert!(parse_listen_env(Some("7"), Some("two"), None, 7).is_err());
        assert!(parse_listen_env(Some("7"), Some("-1"), None, 7).is_err());
        assert_eq!(
            parse_listen_env(Some("7"), Some("0"), None, 7),
            Ok(Some(vec![]))
        );
        assert_eq!(
            parse_listen_env(Some("7"), Some("2"), Some("control:relay"), 7),
            Ok(Some(vec!["control".into(), "relay".into()]))
        );
        // A name count that does not match is ignored: type decides.
        assert_eq!(
            parse_listen_env(Some("7"), Some("2"), Some("control"), 7),
            Ok(Some(vec![String::new(), String::new()]))
        );
    }

    #[test]
    fn selection_by_name_then_by_type() {
        use FdKind::*;
        let s = select(&[(TcpListener, "relay"), (UnixListener, "control")]).unwrap();
        assert_eq!(
            s,
            Selection {
                control: Some(1),
                relay: Some(0)
            }
        );
        // One .socket unit names all its sockets alike: type decides.
        let unit = "chatd-relay.socket";
        let s = select(&[(UnixListener, unit), (TcpListener, unit)]).unwrap();
        assert_eq!(
            s,
            Selection {
                control: Some(0),
                relay: Some(1)
            }
        );
        let s = select(&[(UnixListener, "")]).unwrap();
        assert_eq!(
            s,
            Selection {
                control: Some(0),
                relay: None
            }
        );
        assert_eq!(select(&[]).unwrap(), Selection::default());
        // Names win over type, and a named socket of the wrong type is an error.
        let s = select(&[(UnixListener, "x"), (UnixListener, "control")]).unwrap();
        assert_eq!(s.control, Some(1));
        let e = select(&[(TcpListener, "control")]).unwrap_err();
        assert!(
            e.contains("\"control\"") && e.contains("not a listening Unix"),
            "{e}"
        );
        let e = select(&[(Other, "relay")]).unwrap_err();
        assert!(e.contains("\"relay\""), "{e}");
        // Two candidates without a name: refuse rather than guess.
        let e = select(&[(TcpListener, "a"), (TcpListener, "b")]).unwrap_err();
        assert!(e.contains("FileDescriptorName=relay"), "{e}");
        // A socket named for the other role is not taken by type.
        let s = select(&[(UnixListener, "relay")]);
        assert!(s.is_err());
        let s = select(&[(Other, "x"), (UnixListener, "y")]).unwrap();
        assert_eq!(s.control, Some(1));
    }

    #[test]
    fn status_lines() {
        assert_eq!(
            status_line(Some(("0.0.0.0:9999".into(), 1)), None),
            "relay listening on 0.0.0.0:9999, 1 member online"
        );
        assert_eq!(
            status_line(Some(("[::]:9999".into(), 3)), None),
            "relay listening on [::]:9999, 3 members online"
        );
        let m = |connected, error| MemberStatus {
            user: "alice",
            connected,
            relay: Some("host:9999"),
            error,
            peers_online: 2,
        };
        assert_eq!(
            status_line(None, Some(m(true, None))),
            "member alice: connected to host:9999, 2 peers online"
        );
        assert_eq!(
            status_line(None, Some(m(false, Some("connection refused")))),
            "member alice: not connected: connection refused"
        );
        assert_eq!(
            status_line(None, Some(m(false, None))),
            "member alice: not connected: connecting to host:9999"
        );
        let host = MemberStatus {
            user: "bob",
            connected: true,
            relay: None,
            error: None,
            peers_online: 0,
        };
        assert_eq!(
            status_line(Some(("127.0.0.1:1".into(), 1)), Some(host)),
            "relay listening on 127.0.0.1:1, 1 member online; \
             member bob: attached to the local relay, 0 peers online"
        );
    }

    #[test]
    fn notifier_sends_status_only_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut n = Notifier {
            target: Some((notify_socket().unwrap(), NotifyTarget::Path(path))),
            watchdog: Some(Duration::from_millis(10)),
            next_ping: None,
            last_status: None,
            warned: false,
        };
        let mut buf = [0u8; 512];
        let mut recv = || {
            let k = rx.recv(&mut buf).unwrap();
            String::from_utf8_lossy(&buf[..k]).into_owned()
        };
        n.ready("a\nb".into());
        assert_eq!(recv(), "READY=1\nSTATUS=a b");
        n.status("a b".into());
        n.status("c".into());
        assert_eq!(recv(), "STATUS=c");
        let t0 = Instant::now();
        assert!(n.watchdog_due_in(t0).is_some());
        n.watchdog(t0 + Duration::from_millis(20));
        assert_eq!(recv(), "WATCHDOG=1");
        n.stopping();
        assert_eq!(recv(), "STOPPING=1\nSTATUS=stopping");
        assert_eq!(n.watchdog_due_in(t0), None);
        rx.set_nonblocking(true).unwrap();
        assert!(rx.recv(&mut buf).is_err(), "nothing else was sent");
    }

    #[test]
    fn abstract_notify_socket() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let name = format!("chatd-test-{}-{nanos}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let sock = notify_socket().unwrap();
        send_to(&sock, &NotifyTarget::Abstract(name.into_bytes()), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let k = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"READY=1");
    }
}
