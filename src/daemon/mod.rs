//! The mio event loop: sockets, tokens, timers, signals. It moves bytes between sockets and the
//! sans-I/O cores and nothing more.
//!
//! Each turn: wait for readiness; open one database transaction; read every ready socket until
//! `WouldBlock` and hand whole frames to the cores; run timers; drain the cores' outputs into
//! per-connection buffers; commit; only then write the buffers out. So nothing is acknowledged
//! (to a peer or to `chatctl`) before it is durable, and a burst costs one commit. If the commit
//! fails, the turn's output is taken back, control clients get the storage error, and the cores
//! are rebuilt from the database. Must never: `?` out of the loop because of one peer, block on a
//! socket, or log message text or keys.

mod conn;
mod control;
mod setup;
pub mod systemd;

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{debug, error, info, warn};
use mio::net::{TcpListener, TcpStream, UnixListener};
use mio::{Events, Interest, Poll, Token};
use rand::Rng;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

use crate::config::{self, Config, Flags, Role, TICK};
use crate::crypto::Fingerprint;
use crate::member::{self, Member};
use crate::proto::encode_frame;
use crate::proto::frame::MAX_FRAME;
use crate::proto::relay::{FromRelay, ToRelay};
use crate::relay::{self, ConnId, Relay};
use crate::store::{Store, StoreError};
use conn::{Conn, ReadResult, Stream};
use control::{Ctl, Waiter};

const LISTENER: Token = Token(0);
const CONTROL: Token = Token(1);
const SIGNALS: Token = Token(2);
const UPSTREAM: Token = Token(3);
const FIRST_CONN: usize = 16;
/// The relay's connection id for the host's in-process member.
const LOCAL: ConnId = u64::MAX;

/// Errors that stop the daemon (start-up, or the poller itself failing).
#[derive(Debug)]
pub enum DaemonError {
    /// Configuration is invalid.
    Config(config::ConfigError),
    /// A file-system or permission problem at start-up; the message says how to fix it.
    Setup(String),
    /// The database could not be opened.
    Store(StoreError),
    /// A socket could not be created or bound.
    Bind(String, io::Error),
    /// The poller failed.
    Poll(io::Error),
}

impl std::fmt::Display for DaemonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DaemonError::Config(e) => write!(f, "{e}"),
            DaemonError::Setup(m) => write!(f, "{m}"),
            DaemonError::Store(e) => write!(f, "{e}"),
            DaemonError::Bind(what, e) => write!(f, "cannot listen on {what}: {e}"),
            DaemonError::Poll(e) => write!(f, "event loop failed: {e}"),
        }
    }
}

impl std::error::Error for DaemonError {}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

enum Kind {
    /// A member connected to our relay.
    Peer,
    /// A control client.
    Control(Ctl),
}

struct Entry {
    conn: Conn,
    kind: Kind,
}

/// The member's link to a remote relay.
struct Uplink {
    addr: String,
    conn: Option<Conn>,
    tcp_up: bool,
    attempt: u32,
    next_try: u64,
}

/// The running daemon.
pub struct Daemon {
    poll: Poll,
    cfg: Config,
    flags: Flags,
    store: Store,
    relay: Option<Relay>,
    member: Option<Member>,
    listener: Option<TcpListener>,
    listen_addr: Option<SocketAddr>,
    control: UnixListener,
    signals: Signals,
    conns: HashMap<Token, Entry>,
    next_token: usize,
    uplink: Option<Uplink>,
    /// Host mode: when to re-attach the in-process member after the relay closed it.
    local_relink: Option<u64>,
    waiters: Vec<Waiter>,
    /// Connections to read again next turn (their read budget ran out).
    again: Vec<Token>,
    started: Instant,
    fingerprint: Fingerprint,
    stopping: bool,
    peer_count: usize,
    control_count: usize,
    /// Notifications to systemd (`Type=notify`); a no-op without `$NOTIFY_SOCKET`.
    sd: systemd::Notifier,
    /// The control socket came from systemd (socket activation): systemd owns its file.
    control_activated: bool,
}

/// Start the daemon with resolved config; returns when it is told to stop.
pub fn run(cfg: Config, flags: Flags) -> Result<(), DaemonError> {
    // First, before anything opens files or starts threads: take the sockets systemd passed.
    let activated = systemd::listen_fds().map_err(DaemonError::Setup)?;
    let mut sd = systemd::Notifier::from_env();
    setup::harden();
    setup::private_dir(&cfg.state_dir, "state directory")?;
    let _lock = setup::lock_state_dir(&cfg.state_dir)?;
    if activated.control.is_none() {
        setup::socket_path(&cfg.socket)?;
    }
    let store = Store::open(&cfg.state_dir.join("chatd.db")).map_err(DaemonError::Store)?;
    let (user, listen, connect) = match &cfg.role {
        Role::Relay { listen } => (None, Some(listen.clone()), None),
        Role::Member { user, connect } => (Some(user.clone()), None, Some(connect.clone())),
        Role::Host { user, listen } => (Some(user.clone()), Some(listen.clone()), None),
    };
    // A relay needs an identity too: `status` and `fingerprint` show it, and a later TLS layer
    // will authenticate the relay with it.
    if !cfg.state_dir.join("identity.pem").exists() {
        sd.status(format!("generating an RSA-{} identity key", cfg.key_bits));
    }
    let identity = setup::identity(&cfg.state_dir, cfg.key_bits)?;
    let poll = Poll::new().map_err(DaemonError::Poll)?;
    let mut listener = None;
    let mut listen_addr = None;
    let mut activated_relay = activated.relay;
    if listen.is_none() && activated_relay.take().is_some() {
        warn!("closed the relay socket passed by systemd: this daemon is no relay (no --listen)");
    }
    if let Some(l) = &listen {
        let mut lst = match activated_relay.take() {
            Some(std_lst) => {
                let what = "the relay socket passed by systemd".to_string();
                std_lst
                    .set_nonblocking(true)
                    .map_err(|e| DaemonError::Bind(what.clone(), e))?;
                info!("using the relay socket passed by systemd instead of binding {l}");
                TcpListener::from_std(std_lst)
            }
            None => {
                let addr = l
                    .to_socket_addrs()
                    .map_err(|e| DaemonError::Bind(l.clone(), e))?
                    .next()
                    .ok_or_else(|| DaemonError::Bind(l.clone(), io::ErrorKind::NotFound.into()))?;
                TcpListener::bind(addr).map_err(|e| DaemonError::Bind(l.clone(), e))?
            }
        };
        listen_addr = Some(
            lst.local_addr()
                .map_err(|e| DaemonError::Bind(l.clone(), e))?,
        );
        poll.registry()
            .register(&mut lst, LISTENER, Interest::READABLE)
            .map_err(DaemonError::Poll)?;
        listener = Some(lst);
    }
    let control_activated = activated.control.is_some();
    let mut control_path = cfg.socket.clone();
    let mut control = match activated.control {
        Some(std_lst) => {
            let what = "the control socket passed by systemd".to_string();
            std_lst
                .set_nonblocking(true)
                .map_err(|e| DaemonError::Bind(what, e))?;
            if let Some(p) = std_lst
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(Into::into))
            {
                control_path = p;
            }
            UnixListener::from_std(std_lst)
        }
        None => UnixListener::bind(&cfg.socket)
            .map_err(|e| DaemonError::Bind(cfg.socket.display().to_string(), e))?,
    };
    poll.registry()
        .register(&mut control, CONTROL, Interest::READABLE)
        .map_err(DaemonError::Poll)?;
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP]).map_err(DaemonError::Poll)?;
    poll.registry()
        .register(&mut signals, SIGNALS, Interest::READABLE)
        .map_err(DaemonError::Poll)?;

    let relay = match listen {
        Some(_) => Some(Relay::load(&store, cfg.limits.clone()).map_err(DaemonError::Store)?),
        None => None,
    };
    let fingerprint = identity.public().fingerprint();
    let member = match &user {
        Some(u) => Some(Member::load(u.clone(), identity, &store).map_err(DaemonError::Store)?),
        None => None,
    };
    let uplink = connect.map(|addr| Uplink {
        addr,
        conn: None,
        tcp_up: false,
        attempt: 0,
        next_try: 0,
    });
    let mut d = Daemon {
        poll,
        cfg,
        flags,
        store,
        relay,
        member,
        listener,
        listen_addr,
        control,
        signals,
        conns: HashMap::new(),
        next_token: FIRST_CONN,
        uplink,
        local_relink: None,
        waiters: Vec::new(),
        again: Vec::new(),
        started: Instant::now(),
        fingerprint,
        stopping: false,
        peer_count: 0,
        control_count: 0,
        sd,
        control_activated,
    };
    if d.relay.is_some() && d.member.is_some() {
        d.attach_local(now_ms());
    }
    info!(
        "chatd {} started: {}{}; fingerprint {fingerprint}; control socket {}",
        crate::VERSION,
        d.roles().join("+"),
        d.listen_addr
            .map(|a| format!(" listening on {a}"))
            .unwrap_or_default(),
        control_path.display()
    );
    // The sockets are bound and registered: connections made from now on are served.
    let status = systemd::daemon_status(&d);
    d.sd.ready(status);
    d.main_loop()?;
    d.shutdown();
    Ok(())
}

impl Daemon {
    fn roles(&self) -> Vec<String> {
        let mut r = Vec::new();
        if self.relay.is_some() {
            r.push("relay".to_string());
        }
        if self.member.is_some() {
            r.push("member".to_string());
        }
        r
    }

    fn main_loop(&mut self) -> Result<(), DaemonError> {
        let mut events = Events::with_capacity(1024);
        let mut last_tick = 0;
        while !self.stopping {
            let mut timeout = self.poll_timeout();
            if let Some(due) = self.sd.watchdog_due_in(Instant::now()) {
                timeout = timeout.min(due);
            }
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(DaemonError::Poll(e));
            }
            let now = now_ms();
            for e in self.conns.values_mut() {
                e.conn.mark();
            }
            control::begin_turn(&mut self.conns, &mut self.waiters);
            if let Some(c) = self.uplink.as_mut().and_then(|u| u.conn.as_mut()) {
                c.mark();
            }
            let tx = self.store.begin();
            if let Err(e) = &tx {
                warn!("cannot start a database transaction: {e}");
            }
            // Connections whose read budget ran out last turn are read again first.
            let again = std::mem::take(&mut self.again);
            for t in &again {
                match *t {
                    UPSTREAM => self.on_uplink(false, now),
                    t => self.on_conn(t, now),
                }
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept_peers(now),
                    CONTROL => self.accept_control(),
                    SIGNALS => self.on_signals(),
                    t if again.contains(&t) && !ev.is_writable() => {}
                    UPSTREAM => self.on_uplink(ev.is_writable(), now),
                    t => self.on_conn(t, now),
                }
            }
            if now.saturating_sub(last_tick) >= TICK.as_millis() as u64 {
                last_tick = now;
                self.tick(now);
            }
            self.pump(now);
            match self.store.commit() {
                Ok(()) => {}
                Err(e) => self.commit_failed(e, now),
            }
            // After the commit: history pages only read, and must not be taken back by a
            // failed commit's rewind.
            control::pump_tails(&mut self.conns, &self.store, self.cfg.max_write_buffer / 2);
            self.flush_all();
            self.sd.watchdog(Instant::now());
        }
        Ok(())
    }

    fn poll_timeout(&self) -> Duration {
        if self.again.is_empty()
            && !control::tails_ready(&self.conns, self.cfg.max_write_buffer / 2)
        {
            TICK
        } else {
            Duration::ZERO
        }
    }

    fn attach_local(&mut self, now: u64) {
        if let (Some(r), Some(m)) = (self.relay.as_mut(), self.member.as_mut()) {
            r.connect(LOCAL, now);
            m.link_up(now);
        }
        self.local_relink = None;
    }

    fn token(&mut self) -> Token {
        let t = Token(self.next_token);
        self.next_token += 1;
        t
    }

    fn accept_peers(&mut self, now: u64) {
        loop {
            let Some(l) = self.listener.as_ref() else {
                return;
            };
            match l.accept() {
                Ok((stream, addr)) => {
                    if self.stopping {
                        continue;
                    }
                    if self.peer_count >= self.cfg.max_connections {
                        warn!(
                            "refused connection from {addr}: at the limit of {} connections (max_connections)",
                            self.cfg.max_connections
                        );
                        drop(stream);
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let token = self.token();
                    let mut conn = Conn::new(Stream::Tcp(stream));
                    if let Err(e) = conn.register(self.poll.registry(), token) {
                        warn!("cannot register connection from {addr}: {e}");
                        continue;
                    }
                    debug!("connection {} from {addr}", token.0);
                    self.peer_count += 1;
                    self.conns.insert(
                        token,
                        Entry {
                            conn,
                            kind: Kind::Peer,
                        },
                    );
                    if let Some(r) = self.relay.as_mut() {
                        r.connect(token.0 as ConnId, now);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: log and try again next turn rather than spin.
                    warn!("accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn accept_control(&mut self) {
        loop {
            match self.control.accept() {
                Ok((stream, _)) => {
                    // SAFETY-free: geteuid has no preconditions.
                    let me = unsafe { libc::geteuid() };
                    match setup::peer_uid(stream.as_raw_fd()) {
                        Some(uid) if uid == me || uid == 0 => {}
                        other => {
                            warn!(
                                "refused control connection from uid {}: only uid {me} (or root) may control this daemon",
                                other.map(|u| u.to_string()).unwrap_or_else(|| "unknown".into())
                            );
                            continue;
                        }
                    }
                    if self.stopping {
                        continue;
                    }
                    if self.control_count >= self.cfg.max_control_clients {
                        warn!(
                            "refused control connection: at the limit of {} clients (max_control_clients)",
                            self.cfg.max_control_clients
                        );
                        // Say why before closing, so chatctl reports the limit rather than an
                        // unreachable daemon. One small frame fits any socket buffer.
                        let mut buf = Vec::new();
                        let refusal = crate::proto::control::CtlResponse::Error {
                            kind: crate::proto::control::ErrorKind::Failed,
                            message: format!(
                                "chatd is serving its maximum of {} control clients \
                                 (max_control_clients); try again later",
                                self.cfg.max_control_clients
                            ),
                            sent: Vec::new(),
                        };
                        if encode_frame(&refusal, &mut buf).is_ok() {
                            let mut stream = stream;
                            let _ = std::io::Write::write(&mut stream, &buf);
                        }
                        continue;
                    }
                    let token = self.token();
                    let mut conn = Conn::new(Stream::Unix(stream));
                    if let Err(e) = conn.register(self.poll.registry(), token) {
                        warn!("cannot register control connection: {e}");
                        continue;
                    }
                    self.control_count += 1;
                    self.conns.insert(
                        token,
                        Entry {
                            conn,
                            kind: Kind::Control(Ctl::default()),
                        },
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("control accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn on_signals(&mut self) {
        let pending: Vec<i32> = self.signals.pending().collect();
        for sig in pending {
            match sig {
                SIGTERM | SIGINT => {
                    info!("signal {sig}: shutting down");
                    if !self.stopping {
                        self.sd.stopping();
                    }
                    self.stopping = true;
                }
                SIGHUP => {
                    self.sd.reloading();
                    self.reload();
                    let status = systemd::daemon_status(self);
                    self.sd.reloaded(status);
                }
                _ => {}
            }
        }
    }

    /// SIGHUP: re-read the config file; apply log level and limits; keep the old config if the
    /// new one is broken.
    fn reload(&mut self) {
        let file = match &self.cfg.file_path {
            Some(p) => match config::read_file(p) {
                Ok(f) => f,
                Err(e) => {
                    error!("reload failed, keeping the running config: {e}");
                    return;
                }
            },
            None => {
                info!("SIGHUP: no config file in use; nothing to reload");
                return;
            }
        };
        let new = match config::resolve_with(&self.flags, &file, self.cfg.file_path.clone()) {
            Ok(c) => c,
            Err(e) => {
                error!("reload failed, keeping the running config: {e}");
                return;
            }
        };
        let done = config::apply_reload(&mut self.cfg, &new);
        if done.restart_needed {
            warn!("reload: role, state_dir and socket changes need a restart; ignoring them");
        }
        if done.log_level && std::env::var_os("RUST_LOG").is_none() {
            log::set_max_level(level_filter(self.cfg.log_level.as_deref()));
        }
        if let Some(r) = self.relay.as_mut() {
            r.set_limits(self.cfg.limits.clone());
        }
        if done.changes.is_empty() {
            info!("reloaded config: nothing changed");
        } else {
            info!("reloaded config: {}", done.changes.join(", "));
        }
    }

    fn on_conn(&mut self, token: Token, now: u64) {
        let Some(entry) = self.conns.get_mut(&token) else {
            return;
        };
        if entry.conn.closing {
            return;
        }
        let ReadResult {
            frames,
            eof,
            error: err,
            more,
        } = entry.conn.read_frames(MAX_FRAME);
        let eof = eof || err.is_some();
        if more && !eof {
            self.again.push(token);
        }
        let is_peer = matches!(entry.kind, Kind::Peer);
        for payload in frames {
            if is_peer {
                if let Some(r) = self.relay.as_mut() {
                    r.receive(token.0 as ConnId, &payload, now, &mut self.store);
                }
            } else {
                control::request(self, token, &payload, now);
            }
        }
        if let Some(e) = err {
            info!(
                "{} {}: {e}; closing",
                if is_peer {
                    "connection"
                } else {
                    "control client"
                },
                token.0
            );
        }
        if eof {
            self.drop_conn(token);
        }
    }

    fn drop_conn(&mut self, token: Token) {
        if let Some(mut e) = self.conns.remove(&token) {
            e.conn.deregister(self.poll.registry());
            match e.kind {
                Kind::Peer => {
                    self.peer_count -= 1;
                    if let Some(r) = self.relay.as_mut() {
                        r.disconnect(token.0 as ConnId);
                    }
                }
                Kind::Control(_) => {
                    self.control_count -= 1;
                    self.waiters.retain(|w| w.token != token);
                }
            }
        }
    }

    fn on_uplink(&mut self, writable: bool, now: u64) {
        let Some(up) = self.uplink.as_mut() else {
            return;
        };
        let Some(conn) = up.conn.as_mut() else {
            return;
        };
        if !up.tcp_up {
            let Stream::Tcp(s) = &conn.stream else {
                return;
            };
            match s.take_error() {
                Ok(Some(e)) | Err(e) => {
                    let why = format!("cannot connect to relay {}: {e}", up.addr);
                    return self.uplink_down(why, now);
                }
                Ok(None) => {}
            }
            match s.peer_addr() {
                Ok(_) => {
                    up.tcp_up = true;
                    let _ = s.set_nodelay(true);
                    info!("connected to relay {}", up.addr);
                    if let Some(m) = self.member.as_mut() {
                        m.link_up(now);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(e) => {
                    let why = format!("cannot connect to relay {}: {e}", up.addr);
                    return self.uplink_down(why, now);
                }
            }
            if writable {
                return;
            }
        }
        let r = conn.read_frames(MAX_FRAME);
        if r.more && !r.eof && r.error.is_none() {
            self.again.push(UPSTREAM);
        }
        for payload in r.frames {
            if let Some(m) = self.member.as_mut() {
                m.receive(&payload, now, &mut self.store);
            }
        }
        if let Some(e) = r.error {
            let why = format!("relay connection failed: {e}");
            return self.uplink_down(why, now);
        }
        if r.eof {
            // Keep the relay's own reason (e.g. a refused login) if it gave one.
            let why = self
                .member
                .as_ref()
                .and_then(|m| m.relay_error().map(str::to_string))
                .unwrap_or_else(|| "relay closed the connection".into());
            self.uplink_down(why, now);
        }
    }

    fn uplink_down(&mut self, why: String, now: u64) {
        let Some(up) = self.uplink.as_mut() else {
            return;
        };
        if let Some(mut c) = up.conn.take() {
            c.deregister(self.poll.registry());
        }
        up.tcp_up = false;
        // Exponential backoff from 0.5 s to 30 s, with jitter so a restarted relay is not hit
        // by every member at the same instant.
        let base = (500u64 << up.attempt.min(6)).min(30_000);
        let delay = rand::thread_rng().gen_range(base / 2..=base);
        up.attempt = up.attempt.saturating_add(1);
        up.next_try = now + delay;
        info!("{why}; reconnecting in {:.1} s", delay as f64 / 1000.0);
        if let Some(m) = self.member.as_mut() {
            m.link_down();
            m.set_relay_error(why);
        }
    }

    fn connect_uplink(&mut self, now: u64) {
        let Some(up) = self.uplink.as_mut() else {
            return;
        };
        if up.conn.is_some() || now < up.next_try {
            return;
        }
        // Name resolution blocks; it happens once per attempt, at most every 0.5 s.
        let addr = match up.addr.to_socket_addrs().map(|mut a| a.next()) {
            Ok(Some(a)) => a,
            Ok(None) | Err(_) => {
                let why = format!("cannot resolve relay address {}", up.addr);
                return self.uplink_down(why, now);
            }
        };
        match TcpStream::connect(addr) {
            Ok(s) => {
                let mut conn = Conn::new(Stream::Tcp(s));
                if let Err(e) = conn
                    .register(self.poll.registry(), UPSTREAM)
                    .and_then(|_| conn.want_write(self.poll.registry(), UPSTREAM))
                {
                    let why = format!("cannot connect to relay {}: {e}", up.addr);
                    return self.uplink_down(why, now);
                }
                up.conn = Some(conn);
                up.tcp_up = false;
            }
            Err(e) => {
                let why = format!("cannot connect to relay {}: {e}", up.addr);
                self.uplink_down(why, now)
            }
        }
    }

    fn tick(&mut self, now: u64) {
        if let Some(r) = self.relay.as_mut() {
            r.tick(now);
        }
        if let Some(m) = self.member.as_mut() {
            m.tick(now, &mut self.store);
            if m.connected() {
                if let Some(up) = self.uplink.as_mut() {
                    up.attempt = 0;
                }
            }
        }
        self.connect_uplink(now);
        if self.local_relink.is_some_and(|t| now >= t) {
            self.attach_local(now);
        }
        self.expire_waiters(now);
        let status = systemd::daemon_status(self);
        self.sd.status(status);
    }

    /// Drain the cores' outputs into buffers, passing frames between the host's two cores in
    /// memory, until both are quiet.
    fn pump(&mut self, now: u64) {
        loop {
            let mut progressed = false;
            let mut to_member = Vec::new();
            if let Some(r) = self.relay.as_mut() {
                while let Some(out) = r.poll() {
                    progressed = true;
                    match out {
                        relay::Out::Send(LOCAL, msg) => to_member.push(msg),
                        relay::Out::Close(LOCAL) => {
                            to_member.push(FromRelay::Error {
                                code: "closed".into(),
                                reason: "relay closed the local link".into(),
                            });
                        }
                        relay::Out::Send(id, msg) => {
                            if let Some(e) = self.conns.get_mut(&Token(id as usize)) {
                                let mut buf = Vec::new();
                                match encode_frame(&msg, &mut buf) {
                                    Ok(()) => e.conn.queue(&buf),
                                    Err(err) => {
                                        warn!("cannot encode frame for connection {id}: {err}")
                                    }
                                }
                            }
                        }
                        relay::Out::Close(id) => {
                            if let Some(e) = self.conns.get_mut(&Token(id as usize)) {
                                e.conn.closing = true;
                            }
                        }
                    }
                }
            }
            let local_closed = to_member
                .iter()
                .any(|m| matches!(m, FromRelay::Error { .. }));
            if let Some(m) = self.member.as_mut() {
                for msg in to_member {
                    m.handle(msg, now, &mut self.store);
                }
            }
            if local_closed {
                if let Some(r) = self.relay.as_mut() {
                    r.disconnect(LOCAL);
                }
                if let Some(m) = self.member.as_mut() {
                    m.link_down();
                }
                self.local_relink = Some(now + 1000);
            }
            let mut to_relay: Vec<ToRelay> = Vec::new();
            let mut close_uplink = false;
            if let Some(m) = self.member.as_mut() {
                while let Some(out) = m.poll() {
                    progressed = true;
                    match out {
                        member::Out::Frame(f) => to_relay.push(f),
                        member::Out::Close => close_uplink = true,
                        member::Out::Record(rec) => {
                            control::publish(&mut self.conns, &rec);
                        }
                        member::Out::State(id, st, why) => {
                            control::advance(&mut self.waiters, &mut self.conns, id, st, why);
                        }
                    }
                }
            }
            if self.relay.is_some() && self.member.is_some() {
                if let Some(r) = self.relay.as_mut() {
                    for f in to_relay {
                        r.handle(LOCAL, f, now, &mut self.store);
                    }
                }
                if close_uplink {
                    if let Some(r) = self.relay.as_mut() {
                        r.disconnect(LOCAL);
                    }
                    if let Some(m) = self.member.as_mut() {
                        m.link_down();
                    }
                    self.local_relink = Some(now + 1000);
                }
            } else if let Some(up) = self.uplink.as_mut() {
                if let Some(c) = up.conn.as_mut() {
                    for f in to_relay {
                        let mut buf = Vec::new();
                        match encode_frame(&f, &mut buf) {
                            Ok(()) => c.queue(&buf),
                            Err(e) => warn!("cannot encode frame for the relay: {e}"),
                        }
                    }
                }
                // The same read may already have seen the relay hang up after its final frame.
                if close_uplink && up.conn.is_some() {
                    let why = self
                        .member
                        .as_ref()
                        .and_then(|m| m.relay_error().map(str::to_string))
                        .unwrap_or_else(|| "closing relay connection".into());
                    self.uplink_down(why, now);
                }
            }
            if !progressed {
                break;
            }
        }
    }

    fn flush_all(&mut self) {
        let mut dead = Vec::new();
        let registry = self.poll.registry();
        for (token, e) in self.conns.iter_mut() {
            if e.conn.pending() > 0 {
                if let Err(err) = e.conn.flush(registry, *token) {
                    debug!("write to {} failed: {err}", token.0);
                    dead.push(*token);
                    continue;
                }
            }
            if e.conn.pending() > self.cfg.max_write_buffer {
                warn!(
                    "cutting off connection {}: {} bytes unread (max_write_buffer {}); its messages stay queued",
                    token.0,
                    e.conn.pending(),
                    self.cfg.max_write_buffer
                );
                dead.push(*token);
            } else if e.conn.closing && e.conn.pending() == 0 {
                dead.push(*token);
            }
        }
        for t in dead {
            self.drop_conn(t);
        }
        let mut failed = None;
        let registry = self.poll.registry();
        if let Some(up) = self.uplink.as_mut() {
            if up.tcp_up {
                if let Some(c) = up.conn.as_mut() {
                    if let Err(e) = c.flush(registry, UPSTREAM) {
                        failed = Some(format!("relay connection failed: {e}"));
                    }
                }
            }
        }
        if let Some(why) = failed {
            self.uplink_down(why, now_ms());
        }
    }

    /// The turn's transaction did not commit: take back everything the turn would have sent,
    /// tell the control clients that asked for something, and rebuild the cores from disk.
    fn commit_failed(&mut self, e: StoreError, now: u64) {
        error!("database commit failed: {e}; nothing from this turn was acknowledged");
        for entry in self.conns.values_mut() {
            entry.conn.rewind();
        }
        if let Some(c) = self.uplink.as_mut().and_then(|u| u.conn.as_mut()) {
            c.rewind();
        }
        control::fail_turn(&mut self.conns, &mut self.waiters, &e);
        // The cores' memory may hold what the database does not: reload them and restart every
        // link so peers retransmit whatever was not acknowledged.
        if let Some(r) = self.relay.as_mut() {
            match Relay::load(&self.store, self.cfg.limits.clone()) {
                Ok(fresh) => *r = fresh,
                Err(e) => error!("cannot reload relay state: {e}"),
            }
            let peers: Vec<Token> = self
                .conns
                .iter()
                .filter(|(_, e)| matches!(e.kind, Kind::Peer))
                .map(|(t, _)| *t)
                .collect();
            for t in peers {
                if let Some(e) = self.conns.get_mut(&t) {
                    e.conn.closing = true;
                }
            }
        }
        if let Some(m) = self.member.as_mut() {
            if let Err(e) = m.reload(&self.store) {
                error!("cannot reload member state: {e}");
            }
        }
        if self.uplink.is_some() {
            self.uplink_down(format!("database error: {e}"), now);
        } else if self.relay.is_some() && self.member.is_some() {
            self.local_relink = Some(now + 1000);
        }
    }

    fn expire_waiters(&mut self, now: u64) {
        control::expire(&mut self.waiters, &mut self.conns, now);
    }

    fn shutdown(&mut self) {
        if let Some(m) = self.member.as_ref() {
            debug!("stopping member {}", m.user());
        }
        // Best effort: let queued replies and frames out before closing.
        let registry = self.poll.registry();
        for (t, e) in self.conns.iter_mut() {
            let _ = e.conn.flush(registry, *t);
        }
        // An activated control socket belongs to systemd, which keeps listening on it.
        if !self.control_activated {
            if let Err(e) = std::fs::remove_file(&self.cfg.socket) {
                warn!(
                    "cannot remove control socket {}: {e}",
                    self.cfg.socket.display()
                );
            }
        }
        info!("stopped");
    }
}

/// Map a config `log_level` to a filter (default info).
pub fn level_filter(level: Option<&str>) -> log::LevelFilter {
    match level.map(|s| s.to_ascii_lowercase()).as_deref() {
        Some("error") => log::LevelFilter::Error,
        Some("warn") => log::LevelFilter::Warn,
        Some("debug") => log::LevelFilter::Debug,
        Some("trace") => log::LevelFilter::Trace,
        Some("off") => log::LevelFilter::Off,
        _ => log::LevelFilter::Info,
    }
}
