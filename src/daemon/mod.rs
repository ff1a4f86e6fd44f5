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
//!
//! The rooms: `roles` (which cores run), `uplink` (a member's TCP link to its relay), `table`
//! (accepted connections, and tokens mapped to relay ids), `control` (requests in, replies out,
//! no I/O), `drain` (the cores' output each turn), `status` (one view for `chatctl status` and
//! `STATUS=`), `conn` (buffered sockets), `setup` (start-up chores), [`systemd`]. Submodules
//! never reach into [`Daemon`]; it calls them with the parts they need.

mod conn;
mod control;
mod drain;
mod error;
mod roles;
mod setup;
mod status;
pub mod systemd;
mod table;
pub mod tls;
mod uplink;

use crate::clock::{Clock, Now};
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use mio::net::{TcpListener, UnixListener};
use mio::{Events, Poll, Token};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

use crate::config::{self, Config, Flags, Role};
use crate::host::Link;
use crate::member::Member;
use crate::proto::control::CtlRequest;
use crate::proto::frame::MAX_FRAME;
use crate::proto::from_payload;
use crate::relay::Relay;
use crate::store::{Store, StoreError};
use conn::{ReadResult, ReadUntil};
use control::{Reply, Waiters};
pub use error::DaemonError;
use roles::Roles;
use status::{Info, Status, StatusKey};
use table::{Kind, Table, HOST_LINK};
use uplink::{Uplink, UPSTREAM};

/// The longest the loop sleeps with no deadline at all.
const IDLE_WAKE: Duration = Duration::from_secs(60);
const LISTENER: Token = Token(0);
const CONTROL: Token = Token(1);
const SIGNALS: Token = Token(2);

/// The running daemon.
pub struct Daemon {
    poll: Poll,
    cfg: Config,
    flags: Flags,
    store: Store,
    roles: Roles,
    listener: Option<TcpListener>,
    /// The relay's TLS config over its identity key (relay roles only).
    tls_server: Option<Arc<rustls::ServerConfig>>,
    control: UnixListener,
    signals: Signals,
    table: Table,
    waiters: Waiters,
    /// Connections to read again next turn (their read budget ran out).
    again: Vec<Token>,
    info: Info,
    stopping: bool,
    /// Crash tests only (`CHATD_TEST_ABORT_BEFORE_COMMIT=N`): abort the process in the N-th turn
    /// that wrote to a peer while routed items were held in memory only, after the forward and
    /// before the commit, the window that forward-first opens. Unset in every real deployment.
    abort_before_commit: Option<u64>,
    /// Notifications to systemd (`Type=notify`); a no-op without `$NOTIFY_SOCKET`.
    sd: systemd::Notifier,
    /// What the last `STATUS=` line was made of: the line is built again only when it changes.
    status_key: Option<StatusKey>,
    /// The control socket came from systemd (socket activation): systemd owns its file.
    control_activated: bool,
    /// Monotonic time for timers, wall time for stamps (`clock`).
    clock: Clock,
}

/// Which deadlines [`Daemon::deadline`] looks at.
#[derive(Clone, Copy)]
enum Wake {
    /// Those of [`Daemon::tick`].
    Tick,
    /// Every one the loop must wake for.
    Any,
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
    // A relay needs an identity too: `status` and `fingerprint` show it, and its TLS handshakes
    // are signed with it (the key members pin).
    if !cfg.state_dir.join("identity.pem").exists() {
        sd.status(format!("generating an RSA-{} identity key", cfg.key_bits));
    }
    let identity = setup::identity(&cfg.state_dir, cfg.key_bits)?;
    let poll = Poll::new().map_err(DaemonError::Poll)?;
    let listen = match &cfg.role {
        Role::Relay { listen } | Role::Host { listen, .. } => Some(listen.as_str()),
        Role::Member { .. } => None,
    };
    let tls_server = match listen {
        Some(_) => Some(tls::server_config(&identity).map_err(DaemonError::Setup)?),
        None => None,
    };
    let listening = setup::listener(listen, activated.relay, poll.registry(), LISTENER)?;
    let (listener, listen_addr) = listening.unzip();
    let control_activated = activated.control.is_some();
    let (control, control_path) =
        setup::control_socket(&cfg.socket, activated.control, poll.registry(), CONTROL)?;
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP]).map_err(DaemonError::Poll)?;
    poll.registry()
        .register(&mut signals, SIGNALS, mio::Interest::READABLE)
        .map_err(DaemonError::Poll)?;

    let fingerprint = identity.public().fingerprint();
    let load_relay = || Relay::load(&store, cfg.limits.clone()).map_err(DaemonError::Store);
    let load_member = |user: &String| -> Result<Member, DaemonError> {
        let mut m = Member::load(user.clone(), identity, &store).map_err(DaemonError::Store)?;
        m.set_max_fanout(cfg.max_fanout);
        m.set_hold_limits(cfg.hold.clone());
        Ok(m)
    };
    let roles = match &cfg.role {
        Role::Relay { .. } => Roles::Relay(load_relay()?),
        Role::Member { user, connect, pin } => Roles::Member {
            member: load_member(user)?,
            uplink: Uplink::new(
                connect.clone(),
                uplink::Pin {
                    given: *pin,
                    file: cfg.state_dir.join(tls::KNOWN_RELAYS),
                },
            ),
        },
        Role::Host { user, .. } => {
            let relay = load_relay()?;
            Roles::Host {
                relay,
                member: load_member(user)?,
                link: Link::new(table::conn_id(HOST_LINK)),
            }
        }
    };
    let info = Info {
        fingerprint,
        listen: listen_addr,
        started: Instant::now(),
        state_dir: cfg.state_dir.clone(),
    };
    let mut d = Daemon {
        poll,
        cfg,
        flags,
        store,
        roles,
        listener,
        tls_server,
        control,
        signals,
        table: Table::default(),
        waiters: Waiters::default(),
        again: Vec::new(),
        info,
        stopping: false,
        abort_before_commit: std::env::var("CHATD_TEST_ABORT_BEFORE_COMMIT")
            .ok()
            .and_then(|v| v.parse().ok()),
        sd,
        status_key: None,
        control_activated,
        clock: Clock::new(),
    };
    if let Roles::Host {
        relay,
        member,
        link,
    } = &mut d.roles
    {
        link.attach(relay, member, d.clock.now());
    }
    info!(
        "chatd {} started: {}{}; fingerprint {}; control socket {}",
        crate::VERSION,
        d.roles.names().join("+"),
        d.info
            .listen
            .map(|a| format!(" listening on {a}"))
            .unwrap_or_default(),
        d.info.fingerprint,
        control_path.display()
    );
    // The sockets are bound and registered: connections made from now on are served.
    let status = d.status_line();
    d.sd.ready(status);
    // A failing poll ends the loop too: the relay's in-memory items are still written and the
    // control socket removed before the error is reported.
    let ended = d.main_loop();
    d.shutdown();
    ended
}

impl Daemon {
    fn status_line(&self) -> String {
        Status::of(&self.roles, &self.info).line()
    }

    fn main_loop(&mut self) -> Result<(), DaemonError> {
        let mut events = Events::with_capacity(1024);
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
            let now = self.clock.now();
            self.table.begin_turn();
            self.waiters.begin_turn();
            if let Roles::Member { uplink, .. } = &mut self.roles {
                if let Some(c) = uplink.conn_mut() {
                    c.mark();
                }
            }
            let tx = self.store.begin();
            if let Err(e) = &tx {
                warn!("cannot start a database transaction: {e}");
            }
            // Connections whose read budget ran out last turn are read again first.
            let again = std::mem::take(&mut self.again);
            for t in &again {
                match *t {
                    UPSTREAM => self.on_uplink(now, ReadUntil::WouldBlock),
                    t => self.on_conn(t, now, ReadUntil::WouldBlock),
                }
            }
            for ev in events.iter() {
                let until = ReadUntil::for_event(ev);
                match ev.token() {
                    LISTENER => self.accept_peers(now),
                    CONTROL => self.table.accept_control(
                        &self.control,
                        self.poll.registry(),
                        self.cfg.max_control_clients,
                        self.stopping,
                        now.mono,
                    ),
                    SIGNALS => self.on_signals(),
                    t if again.contains(&t) && !ev.is_writable() => {}
                    UPSTREAM => self.on_uplink(now, until),
                    t => self.on_conn(t, now, until),
                }
            }
            // Timers run when one is due, not on a fixed tick: the poll timeout woke us for it.
            if self.deadline(Wake::Tick).is_some_and(|d| now.mono >= d) {
                self.tick(now);
            }
            self.pump_lists(now);
            self.pump(now);
            if self.retry_parked(now) {
                self.pump(now);
            }
            if self.run_queued(now) {
                self.pump(now);
            }
            // Routed items not acknowledged in time go to the store in this transaction.
            if let Some(r) = self.roles.relay_mut() {
                r.sync(now.mono, &mut self.store, false);
                self.pump(now);
                // A host's own relay may have answered a lookup or accepted a send just now:
                // the requests that waited on it go on in this turn, not at the next event.
                for _ in 0..4 {
                    let again = self.retry_parked(now) | self.run_queued(now);
                    if !again {
                        break;
                    }
                    self.pump(now);
                }
            }
            // Forward first: what the relay sends its peers promises nothing about the store,
            // so it leaves now; an `Accepted` for what this turn wrote waits for the commit.
            // Not on a host: its relay and its member share the turn's transaction, so what the
            // relay sends (an `Accepted` for what the member acknowledged, the member's receipt)
            // may promise the member's writes, which a failed commit takes back.
            let host = matches!(self.roles, Roles::Host { .. });
            let (dead, forwarded) = if host {
                (Vec::new(), false)
            } else {
                self.table.flush_peers_early(self.poll.registry())
            };
            for t in dead {
                self.drop_conn(t);
            }
            // The window a test aims at: forwarded, with an item only in the relay's memory, or
            // (were a host to forward early) with its member's writes not committed.
            let in_memory = self.roles.relay().is_some_and(|r| r.unsynced_count() > 0)
                || (host && self.store.wrote());
            if forwarded && in_memory {
                if let Some(n) = self.abort_before_commit.as_mut() {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        error!(
                            "CHATD_TEST_ABORT_BEFORE_COMMIT: aborting between forward and commit"
                        );
                        std::process::abort();
                    }
                }
            }
            match self.store.commit() {
                Ok(()) => self.table.committed(),
                Err(e) => self.commit_failed(e, now),
            }
            // After the commit: history pages only read, and must not be taken back by a
            // failed commit's rewind.
            self.table
                .pump_tails(&self.store, self.cfg.max_write_buffer / 2);
            self.flush_all();
            self.after_turn();
            self.sd.watchdog(Instant::now());
        }
        Ok(())
    }

    /// How long the loop may sleep: until the earliest deadline of any core or timer (quinn's
    /// `poll_timeout`), not at all while a connection or a tail has more to do, and at most
    /// [`IDLE_WAKE`] so a bug in a deadline cannot hang the daemon for good.
    fn poll_timeout(&self) -> Duration {
        if !self.again.is_empty()
            || self.waiters.has_looked()
            || self.queue_ready()
            || self.table.tails_ready(self.cfg.max_write_buffer / 2)
            || self.roles.relay().is_some_and(Relay::has_output)
            || self.roles.member().is_some_and(Member::has_output)
        {
            return Duration::ZERO;
        }
        match self.deadline(Wake::Any) {
            Some(d) => Duration::from_millis(d.saturating_sub(self.clock.mono_ms())).min(IDLE_WAKE),
            None => IDLE_WAKE,
        }
    }

    /// The earliest instant (monotonic ms) at which [`Daemon::tick`] has work (`Wake::Tick`),
    /// or the loop has anything timed to do (`Wake::Any`: also the relay's writes of items held
    /// in memory, which run every turn and need only the wake).
    fn deadline(&self, wake: Wake) -> Option<u64> {
        let relay_at = |relay: &Relay| match wake {
            Wake::Tick => relay.tick_deadline(),
            Wake::Any => relay.next_deadline(),
        };
        let cores = match &self.roles {
            Roles::Relay(relay) => [relay_at(relay), None, None],
            Roles::Member { member, uplink } => [
                member.next_deadline(),
                uplink.deadline(self.cfg.max_write_buffer),
                None,
            ],
            Roles::Host {
                relay,
                member,
                link,
            } => [relay_at(relay), member.next_deadline(), link.relink_at()],
        };
        let waiting = |t: Token| self.waiters.has(t);
        let idle = self
            .table
            .idle_deadline(self.cfg.control_idle_timeout_ms, &waiting);
        cores
            .into_iter()
            .chain([
                self.waiters.next_deadline(),
                self.table.list_deadline(),
                idle,
            ])
            .flatten()
            .min()
    }

    /// Every turn: what reads state rather than time (the backoff reset, the `STATUS=` line).
    fn after_turn(&mut self) {
        if let Roles::Member { member, uplink } = &mut self.roles {
            if member.connected() {
                uplink.logged_in();
            }
        }
        // Built and compared every turn it would cost a relay 4% of its CPU in a ping-pong;
        // only what can change while running is compared, and only when systemd listens.
        if !self.sd.enabled() {
            return;
        }
        let key = StatusKey::of(&self.roles);
        if self.status_key.as_ref() != Some(&key) {
            self.status_key = Some(key);
            let status = self.status_line();
            self.sd.status(status);
        }
    }

    fn accept_peers(&mut self, now: Now) {
        let (Some(l), Some(tls)) = (self.listener.as_ref(), self.tls_server.as_ref()) else {
            return;
        };
        let registry = self.poll.registry();
        let new =
            self.table
                .accept_peers(l, registry, self.cfg.max_connections, self.stopping, tls);
        if let Some(r) = self.roles.relay_mut() {
            for id in new {
                r.connect(id, now.mono);
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
                    let status = self.status_line();
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
        if let Some(r) = self.roles.relay_mut() {
            r.set_limits(self.cfg.limits.clone());
        }
        if let Some(m) = self.roles.member_mut() {
            m.set_max_fanout(self.cfg.max_fanout);
            m.set_hold_limits(self.cfg.hold.clone());
        }
        if done.changes.is_empty() {
            info!("reloaded config: nothing changed");
        } else {
            info!("reloaded config: {}", done.changes.join(", "));
        }
    }

    fn on_conn(&mut self, token: Token, now: Now, until: ReadUntil) {
        let Some(entry) = self.table.get_mut(token) else {
            return;
        };
        if entry.conn.closing {
            return;
        }
        // Requests wait behind one that waits: nothing more is read until they ran (then
        // `run_queued` reads the client again, as no new event may come).
        if matches!(&entry.kind, Kind::Control(c) if !c.queued.is_empty()) {
            return;
        }
        let ReadResult {
            frames,
            eof,
            error: err,
            more,
            secured,
        } = entry.conn.read_frames(MAX_FRAME, until);
        let eof = eof || err.is_some();
        if more && !eof {
            self.again.push(token);
        }
        let is_peer = matches!(entry.kind, Kind::Peer);
        // Reading may have produced output of its own (TLS handshake records, alerts).
        self.table.touch(token);
        if let (Some(channel), Some(r)) = (secured, self.roles.relay_mut()) {
            r.bind_channel(table::conn_id(token), channel);
        }
        for payload in frames.iter() {
            if is_peer {
                if let Some(r) = self.roles.relay_mut() {
                    r.receive(table::conn_id(token), payload, now.mono, &mut self.store);
                }
            } else {
                self.request(token, payload, now);
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

    /// One request frame from a control client: run now, or queued behind an earlier request
    /// of the same client that still waits, so that answers keep the requests' order.
    fn request(&mut self, token: Token, payload: &[u8], now: Now) {
        let waits = self.waiters.has(token);
        if let Some(e) = self.table.get_mut(token) {
            if let Kind::Control(c) = &mut e.kind {
                if c.tailing() {
                    // A `tail -f` only reads; what its client sends is ignored.
                    return;
                }
                if e.conn.closing {
                    return;
                }
                if waits || c.answering() || !c.queued.is_empty() {
                    if c.queued.len() >= control::MAX_QUEUED {
                        warn!(
                            "control client {}: more than {} requests queued; closing",
                            token.0,
                            control::MAX_QUEUED
                        );
                        c.queued.clear();
                        let why = control::failed(format!(
                            "more than {} requests sent ahead of their answers; closing",
                            control::MAX_QUEUED
                        ));
                        self.table.reply(token, &why);
                        if let Some(e) = self.table.get_mut(token) {
                            e.conn.closing = true;
                        }
                        return;
                    }
                    c.queued.push_back(payload.to_vec());
                    c.active_at = now.mono;
                    return;
                }
            }
        }
        self.run_request(token, payload, now);
    }

    /// Whether some control client's queued requests can run now (the loop must not sleep).
    fn queue_ready(&self) -> bool {
        self.table
            .queued_clients()
            .into_iter()
            .any(|t| !self.waiters.has(t) && self.table.queue_could_run(t))
    }

    /// The queued requests of clients whose earlier request no longer waits, in order, until
    /// one waits again; a client whose queue ran out is read again. True if any ran (their
    /// frames are to be pumped).
    fn run_queued(&mut self, now: Now) -> bool {
        let mut ran = false;
        for token in self.table.queued_clients() {
            while !self.waiters.has(token) && self.table.queue_runnable(token) {
                let Some(payload) = self.table.ctl_mut(token).and_then(|c| c.queued.pop_front())
                else {
                    break;
                };
                ran = true;
                self.run_request(token, &payload, now);
            }
            if self
                .table
                .ctl_mut(token)
                .is_some_and(|c| c.queued.is_empty())
            {
                self.again.push(token);
            }
        }
        ran
    }

    fn run_request(&mut self, token: Token, payload: &[u8], now: Now) {
        let req = match from_payload::<CtlRequest>(payload) {
            Ok(r) => r,
            Err(e) => {
                warn!(
                    "control client {}: malformed request ({e}); closing",
                    token.0
                );
                let resp = control::failed(format!("malformed request: {e}"));
                self.table.reply(token, &resp);
                if let Some(e) = self.table.get_mut(token) {
                    e.conn.closing = true;
                }
                return;
            }
        };
        if let Some(c) = self.table.ctl_mut(token) {
            c.asked += 1;
            c.active_at = now.mono;
        }
        let reply = control::request(&mut self.roles, &mut self.store, &self.info, req, now);
        match reply {
            Reply::Now(resp) => self.table.reply(token, &resp),
            Reply::Stream(resps) => {
                if let Some(c) = self.table.ctl_mut(token) {
                    c.stream.extend(resps);
                }
            }
            Reply::Wait(pending) => self.waiters.add(token, pending),
            Reply::Park(parked) => self.waiters.park(token, parked),
            Reply::List(list) => {
                if let Some(c) = self.table.ctl_mut(token) {
                    c.list = Some(list);
                }
            }
            Reply::Sealing {
                job,
                wait,
                timeout_ms,
            } => self.waiters.sealing(token, job, wait, timeout_ms, now),
            Reply::Tail(cursor) => {
                if let Some(c) = self.table.ctl_mut(token) {
                    c.cursor = Some(cursor);
                }
            }
        }
    }

    fn drop_conn(&mut self, token: Token) {
        match self.table.remove(self.poll.registry(), token) {
            Some(Kind::Peer) => {
                if let Some(r) = self.roles.relay_mut() {
                    r.disconnect(table::conn_id(token));
                }
            }
            Some(Kind::Control(_)) => self.waiters.forget(token),
            None => {}
        }
    }

    fn on_uplink(&mut self, now: Now, until: ReadUntil) {
        let Roles::Member { member, uplink } = &mut self.roles else {
            return;
        };
        let max = self.cfg.max_write_buffer;
        let read = uplink.ready(
            self.poll.registry(),
            member,
            &mut self.store,
            now,
            max,
            until,
        );
        if read.again {
            self.again.push(UPSTREAM);
        }
    }

    fn tick(&mut self, now: Now) {
        let registry = self.poll.registry();
        match &mut self.roles {
            Roles::Relay(relay) => relay.tick(now.mono),
            Roles::Member { member, uplink } => {
                member.tick(now, &mut self.store);
                uplink.connect(registry, member, now);
            }
            Roles::Host {
                relay,
                member,
                link,
            } => {
                relay.tick(now.mono);
                member.tick(now, &mut self.store);
                link.tick(relay, member, now);
            }
        }
        for (token, resp) in self.waiters.expire(now) {
            self.table.reply(token, &resp);
        }
        let waiters = &self.waiters;
        self.table
            .close_idle(now.mono, self.cfg.control_idle_timeout_ms, &|t| {
                waiters.has(t)
            });
    }

    fn pump(&mut self, now: Now) {
        let (registry, store) = (self.poll.registry(), &mut self.store);
        drain::pump(
            &mut self.roles,
            store,
            &mut self.table,
            &mut self.waiters,
            registry,
            now,
        );
    }

    /// Ask for the next page of every directory listing whose client has read the last one:
    /// from the relay core on a relay, from the relay through the member otherwise.
    fn pump_lists(&mut self, now: Now) {
        for token in self.table.lists_late(now.mono) {
            if let Some(c) = self.table.ctl_mut(token) {
                c.list = None;
                c.stream.push_back(control::failed(format!(
                    "the relay did not send the next page of the directory within {} s",
                    control::LOOKUP_TIMEOUT_MS / 1000
                )));
            }
        }
        for token in self.table.lists_ready(self.cfg.max_write_buffer / 2) {
            let Some(c) = self.table.ctl_mut(token) else {
                continue;
            };
            let Some(list) = c.list.as_mut() else {
                continue;
            };
            let mut frames = Vec::new();
            let done = match &mut self.roles {
                Roles::Relay(relay) => control::relay_page(relay, list, &mut frames),
                Roles::Member { member, .. } | Roles::Host { member, .. } => {
                    match member.list(token.0 as u64, &list.after, &list.prefix, now) {
                        Ok(()) => {
                            list.in_flight = true;
                            list.asked_at = now.mono;
                            false
                        }
                        Err(e) => {
                            frames.push(control::failed(e.to_string()));
                            true
                        }
                    }
                }
            };
            c.stream.extend(frames);
            if done {
                c.list = None;
            }
        }
    }

    /// Try again the sends parked on a key lookup, once the member has heard back. True if
    /// any was tried (its frames are to be pumped).
    fn retry_parked(&mut self, now: Now) -> bool {
        let Some(parked) = self.waiters.take_parked() else {
            return false;
        };
        let tried = !parked.is_empty();
        for (token, req, deadline) in parked {
            // Answered in this turn: if its commit fails, this client hears why.
            let reply = control::request(&mut self.roles, &mut self.store, &self.info, req, now);
            // Counted once: a request parked again is retried (and counted) when it is answered.
            if !matches!(reply, Reply::Park(_)) {
                if let Some(c) = self.table.ctl_mut(token) {
                    c.asked += 1;
                }
            }
            match reply {
                Reply::Park(p) => self.waiters.repark(token, p, deadline),
                Reply::Now(resp) => self.table.reply(token, &resp),
                Reply::Wait(pending) => self.waiters.add(token, pending),
                Reply::Sealing {
                    job,
                    wait,
                    timeout_ms,
                } => self.waiters.sealing(token, job, wait, timeout_ms, now),
                // A parked request is a send, which answers in one of the ways above.
                Reply::Stream(_) | Reply::Tail(_) | Reply::List(_) => {}
            }
        }
        // The answers were used (or nobody was waiting for them): a later send asks afresh.
        if let Some(m) = self.roles.member_mut() {
            m.clear_missing();
        }
        tried
    }

    fn flush_all(&mut self) {
        let dead = self
            .table
            .flush(self.poll.registry(), self.cfg.max_write_buffer);
        for t in dead {
            self.drop_conn(t);
        }
        if let Roles::Member { member, uplink } = &mut self.roles {
            let registry = self.poll.registry();
            if uplink.flush(
                registry,
                member,
                self.clock.now(),
                self.cfg.max_write_buffer,
            ) {
                // Reads were held back while the relay owed us room; the data that arrived
                // meanwhile raised no new event (edge-triggered), so read it next turn.
                self.again.push(UPSTREAM);
            }
        }
    }

    /// The turn's transaction did not commit: take back everything the turn would have sent,
    /// tell the control clients that asked for something, and rebuild the cores from disk.
    fn commit_failed(&mut self, e: StoreError, now: Now) {
        error!("database commit failed: {e}; nothing from this turn was acknowledged");
        if let Roles::Member { uplink, .. } = &mut self.roles {
            if let Some(c) = uplink.conn_mut() {
                c.rewind();
            }
        }
        self.waiters.fail_turn();
        self.table.fail_turn(&control::not_stored(&e));
        // The cores' memory may hold what the database does not: reload them and restart every
        // link so peers retransmit whatever was not acknowledged.
        if let Some(r) = self.roles.relay_mut() {
            match Relay::load(&self.store, self.cfg.limits.clone()) {
                Ok(fresh) => *r = fresh,
                Err(e) => error!("cannot reload relay state: {e}"),
            }
            self.table.close_peers();
        }
        if let Some(m) = self.roles.member_mut() {
            if let Err(e) = m.reload(&self.store) {
                error!("cannot reload member state: {e}");
            }
            // The reload dropped the sends still being sealed: nothing of them was stored.
            for token in self.waiters.drop_sealing() {
                self.table.reply(token, &control::not_stored(&e));
            }
        }
        match &mut self.roles {
            Roles::Relay(_) => {}
            Roles::Member { member, uplink } => uplink.down(
                self.poll.registry(),
                member,
                format!("database error: {e}"),
                now,
            ),
            Roles::Host {
                relay,
                member,
                link,
            } => link.close(relay, member, now),
        }
    }

    fn shutdown(&mut self) {
        if let Some(m) = self.roles.member() {
            debug!("stopping member {}", m.user());
        }
        // What the relay holds in memory only is written now, so a planned restart does not
        // make every sender send it again; its `Accepted`s go out with the rest below.
        if self.roles.relay().is_some() {
            let now = self.clock.now();
            if self.store.begin().is_ok() {
                // A turn of its own: a failed commit takes back only what this one gave.
                self.table.begin_turn();
                self.waiters.begin_turn();
                if let Some(r) = self.roles.relay_mut() {
                    r.sync(now.mono, &mut self.store, true);
                }
                self.pump(now);
                match self.store.commit() {
                    Ok(()) => self.table.committed(),
                    Err(e) => {
                        warn!("cannot write what the relay held in memory: {e}");
                        // Nothing of this last turn may go out below as if it were stored.
                        self.waiters.fail_turn();
                        self.table.fail_turn(&control::not_stored(&e));
                    }
                }
            }
        }
        // Best effort: let queued replies and frames out before closing.
        let registry = self.poll.registry();
        for (t, e) in self.table.iter_mut() {
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
