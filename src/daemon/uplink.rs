//! A member's TLS connection to its remote relay, as a state: idle until the next try,
//! connecting (TCP, then the TLS handshake), or up. Owns the reconnect backoff, the relay's pin
//! (checked in every handshake; written on the first connection when none was given), and what
//! the member is told when the connection comes and goes (`link_up_bound` with the session's
//! exporter value, `link_down` with the reason).
//!
//! Must never: block (name resolution aside, once per try), retry faster than the backoff, hand
//! the member anything before the relay's key matched the pin, or connect to a relay whose key
//! differs from the pin (the pin changes only by the user's explicit fingerprint).

use crate::clock::Now;
use std::io;
use std::net::ToSocketAddrs;

use log::{debug, info, warn};
use mio::net::TcpStream;
use mio::{Registry, Token};
use rand::Rng;

use std::path::PathBuf;

use super::conn::{Conn, ReadUntil, Stream};
use super::tls::{self, Seen};
use crate::crypto::Fingerprint;
use crate::member::Member;
use crate::proto::encode_frame;
use crate::proto::frame::MAX_FRAME;
use crate::proto::relay::ToRelay;
use crate::store::Store;

/// The uplink's mio token (a fixed one, like the listeners').
pub const UPSTREAM: Token = Token(3);

enum State {
    /// No connection; try again at `next_try`.
    Idle { next_try: u64 },
    /// The TCP connect, then the TLS handshake, is in progress since `since`; `tcp` once the
    /// TCP connect completed; `pin` is what the relay's key must be (`None`: first contact).
    Connecting {
        conn: Conn,
        since: u64,
        tcp: bool,
        pin: Option<Fingerprint>,
        seen: Seen,
    },
    /// Connected; the member is logging in or logged in.
    Up(Conn),
}

/// How long the TCP connect and TLS handshake together may take.
pub const HANDSHAKE_MS: u64 = 15_000;

/// Where the relay's expected key comes from.
pub struct Pin {
    /// The user's fingerprint (`relay_fingerprint` or `SHA256:...@` in the address).
    pub given: Option<Fingerprint>,
    /// The `known_relays` file that keeps the pin of a first connection.
    pub file: PathBuf,
}

/// The member's link to a remote relay.
pub struct Uplink {
    addr: String,
    pin: Pin,
    /// The key the relay showed on the last completed handshake.
    key: Option<Fingerprint>,
    /// The pin in force at the last try (the user's, or the stored one).
    pinned: Option<Fingerprint>,
    state: State,
    /// Failed tries since the member was last logged in (drives the backoff).
    attempt: u32,
    /// Reads are held back: more than `max_write_buffer` bytes wait to go to the relay.
    paused: bool,
    /// When bytes last went out to the relay, or the link came up (monotonic ms).
    last_progress: u64,
}

/// A relay that has taken none of more than `max_write_buffer` waiting bytes for this long is
/// dropped as not reading. A relay that reads, however slowly, never is.
pub const STALL_MS: u64 = 10_000;

/// What a read of the uplink asks of the loop.
pub struct Read {
    /// The read budget ran out: read again next turn.
    pub again: bool,
}

impl Uplink {
    /// An uplink to `addr`, whose key `pin` says, to be tried at once.
    pub fn new(addr: String, pin: Pin) -> Uplink {
        Uplink {
            addr,
            pinned: pin.given,
            pin,
            key: None,
            state: State::Idle { next_try: 0 },
            attempt: 0,
            paused: false,
            last_progress: 0,
        }
    }

    /// When [`Uplink::flush`] must look again: the next try while idle, the stall deadline while
    /// output waits over the cap.
    pub fn deadline(&self, max: usize) -> Option<u64> {
        match &self.state {
            State::Idle { next_try } => Some(*next_try),
            State::Up(c) if c.pending() > max => Some(
                self.last_progress
                    .saturating_add(STALL_MS)
                    .saturating_add(1),
            ),
            State::Connecting { since, .. } => Some(since.saturating_add(HANDSHAKE_MS + 1)),
            State::Up(_) => None,
        }
    }

    /// The relay's key: the one it showed on the last handshake, else the pin it must match.
    pub fn relay_key(&self) -> Option<Fingerprint> {
        self.key.or(self.pinned)
    }

    /// The relay's address as configured.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The connection, while there is one (connecting or up).
    pub fn conn_mut(&mut self) -> Option<&mut Conn> {
        match &mut self.state {
            State::Idle { .. } => None,
            State::Connecting { conn: c, .. } | State::Up(c) => Some(c),
        }
    }

    /// The member is logged in: the next failure starts the backoff over.
    pub fn logged_in(&mut self) {
        self.attempt = 0;
    }

    /// Start a connection if idle and it is time; give up on a handshake past its deadline.
    pub fn connect(&mut self, registry: &Registry, member: &mut Member, now: Now) {
        match self.state {
            State::Idle { next_try } if now.mono >= next_try => {}
            State::Connecting { since, .. } if now.mono > since.saturating_add(HANDSHAKE_MS) => {
                let why = format!(
                    "relay {} did not complete the TLS handshake within {} s",
                    self.addr,
                    HANDSHAKE_MS / 1000
                );
                return self.down(registry, member, why, now);
            }
            _ => return,
        }
        // The pin in force for this try: the user's, else the one a first connection stored.
        let pin = match self.pin.given {
            Some(p) => Some(p),
            None => match tls::load_pin(&self.pin.file, &self.addr) {
                Ok(p) => p,
                Err(e) => {
                    let why = format!("cannot check the relay's key: {e}");
                    return self.down(registry, member, why, now);
                }
            },
        };
        self.pinned = pin;
        let (client, seen) = match tls::client(pin) {
            Ok(c) => c,
            Err(e) => return self.down(registry, member, e, now),
        };
        // Name resolution blocks; it happens once per attempt, at most every 0.5 s.
        let addr = match self.addr.to_socket_addrs().map(|mut a| a.next()) {
            Ok(Some(a)) => a,
            Ok(None) | Err(_) => {
                let why = format!("cannot resolve relay address {}", self.addr);
                return self.down(registry, member, why, now);
            }
        };
        match TcpStream::connect(addr) {
            Ok(s) => {
                let mut conn = Conn::with_tls(Stream::Tcp(s), client.into());
                if let Err(e) = conn
                    .register(registry, UPSTREAM)
                    .and_then(|_| conn.want_write(registry, UPSTREAM))
                {
                    let why = format!("cannot connect to relay {}: {e}", self.addr);
                    return self.down(registry, member, why, now);
                }
                self.state = State::Connecting {
                    conn,
                    since: now.mono,
                    tcp: false,
                    pin,
                    seen,
                };
            }
            Err(e) => {
                let why = format!("cannot connect to relay {}: {e}", self.addr);
                self.down(registry, member, why, now)
            }
        }
    }

    /// The socket is ready: finish the connect, or read frames into the member.
    pub fn ready(
        &mut self,
        registry: &Registry,
        member: &mut Member,
        store: &mut Store,
        now: Now,
        max: usize,
        until: ReadUntil,
    ) -> Read {
        let quiet = Read { again: false };
        if let State::Connecting { conn, tcp, .. } = &mut self.state {
            if !*tcp {
                let Stream::Tcp(s) = &conn.stream else {
                    return quiet;
                };
                match s.take_error() {
                    Ok(Some(e)) | Err(e) => {
                        let why = format!("cannot connect to relay {}: {e}", self.addr);
                        self.down(registry, member, why, now);
                        return quiet;
                    }
                    Ok(None) => {}
                }
                match s.peer_addr() {
                    Ok(_) => {
                        let _ = s.set_nodelay(true);
                        debug!("TCP connected to relay {}; TLS handshake", self.addr);
                        *tcp = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => return quiet,
                    Err(e) => {
                        let why = format!("cannot connect to relay {}: {e}", self.addr);
                        self.down(registry, member, why, now);
                        return quiet;
                    }
                }
            }
            return self.handshake(registry, member, store, now, until);
        }
        let State::Up(conn) = &mut self.state else {
            return quiet;
        };
        // Backpressure: while the relay has not taken what we owe it, read nothing more from it
        // (each delivery read means an `Ack` to write). `flush` resumes reading once it drained.
        if conn.pending() > max {
            self.paused = true;
            return quiet;
        }
        let r = conn.read_frames(MAX_FRAME, until);
        self.settle(registry, member, store, r, now)
    }

    /// Read the handshake along; once it completed, check the relay's key and hand the member
    /// the link (and any frames that came with the handshake's last flight).
    fn handshake(
        &mut self,
        registry: &Registry,
        member: &mut Member,
        store: &mut Store,
        now: Now,
        until: ReadUntil,
    ) -> Read {
        let State::Connecting {
            conn, pin, seen, ..
        } = &mut self.state
        else {
            return Read { again: false };
        };
        let mut r = conn.read_frames(MAX_FRAME, until);
        let presented = seen.lock().ok().and_then(|s| *s);
        let pin = *pin;
        if let Some(e) = r.error.take() {
            let why = match (pin, presented) {
                (Some(want), Some(got)) if want != got => {
                    let why = self.mismatch(want, got);
                    // Not just another failed try: someone may be in the middle.
                    warn!("{why}");
                    why
                }
                _ => format!("TLS handshake with relay {} failed: {e}", self.addr),
            };
            self.down(registry, member, why, now);
            return Read { again: false };
        }
        let Some(channel) = r.secured.take() else {
            if r.eof {
                let why = format!(
                    "relay {} closed the connection during the TLS handshake",
                    self.addr
                );
                self.down(registry, member, why, now);
            }
            return Read { again: false };
        };
        // The verifier refused any other key; without a pin this is the first contact.
        let Some(got) = presented else {
            let why = format!("relay {} showed no key", self.addr);
            self.down(registry, member, why, now);
            return Read { again: false };
        };
        if pin.is_none() || self.pin.given.is_some() {
            let stored = tls::load_pin(&self.pin.file, &self.addr).ok().flatten();
            if stored != Some(got) {
                if let Err(e) = tls::save_pin(&self.pin.file, &self.addr, got) {
                    let why = format!("cannot pin the relay's key: {e}");
                    self.down(registry, member, why, now);
                    return Read { again: false };
                }
                match (pin, stored) {
                    (None, _) => warn!(
                        "first connection to relay {}: pinned its key {got} in {} (trust on \
                         first use; compare it with the relay's chatctl fingerprint)",
                        self.addr,
                        self.pin.file.display()
                    ),
                    (Some(_), old) => info!(
                        "pinned relay {} key {got} as given{}",
                        self.addr,
                        old.map(|o| format!(", replacing {o}")).unwrap_or_default()
                    ),
                }
            }
        }
        info!("connected to relay {} (TLS 1.3, key {got})", self.addr);
        self.key = Some(got);
        let state = std::mem::replace(&mut self.state, State::Idle { next_try: 0 });
        if let State::Connecting { conn, .. } = state {
            self.state = State::Up(conn);
        }
        self.last_progress = now.mono;
        self.paused = false;
        member.link_up_bound(now, channel);
        self.settle(registry, member, store, r, now)
    }

    /// The refusal of a relay whose key is not the pinned one: both keys, and how to accept the
    /// new one once it was checked out of band.
    fn mismatch(&self, want: Fingerprint, got: Fingerprint) -> String {
        let how = if self.pin.given.is_some() {
            format!(
                "the pin is your relay_fingerprint setting (or the SHA256:...@ of connect); change \
                 it to {got}"
            )
        } else {
            format!(
                "restart chatd once with --relay-fingerprint {got} (it replaces the pin in {})",
                self.pin.file.display()
            )
        };
        format!(
            "refusing relay {}: it presented key {got}, but {want} is pinned for it. Someone may \
             be impersonating the relay. If its key really changed, check {got} with the relay's \
             operator (chatctl fingerprint on the relay), then {how}",
            self.addr
        )
    }

    /// Hand what a read brought to the member, and end the link on an error or the relay's close.
    fn settle(
        &mut self,
        registry: &Registry,
        member: &mut Member,
        store: &mut Store,
        r: super::conn::ReadResult,
        now: Now,
    ) -> Read {
        let again = r.more && !r.eof && r.error.is_none();
        for payload in r.frames.iter() {
            member.receive(payload, now, store);
        }
        if let Some(e) = r.error {
            let why = format!("relay connection failed: {e}");
            self.down(registry, member, why, now);
        } else if r.eof {
            // Keep the relay's own reason (e.g. a refused login) if it gave one.
            let why = member
                .relay_error()
                .map(str::to_string)
                .unwrap_or_else(|| "relay closed the connection".into());
            self.down(registry, member, why, now);
        }
        Read { again }
    }

    /// Queue the member's frames, and end the connection if the member asked to close it.
    pub fn send(
        &mut self,
        registry: &Registry,
        member: &mut Member,
        frames: Vec<ToRelay>,
        close: bool,
        now: Now,
    ) {
        let Some(c) = self.conn_mut() else {
            return;
        };
        for f in frames {
            // Encoded in place; an error leaves the buffer as it was.
            if let Err(e) = encode_frame(&f, c.out()) {
                log::warn!("cannot encode frame for the relay: {e}");
            }
        }
        // The same read may already have seen the relay hang up after its final frame.
        if close {
            let why = member
                .relay_error()
                .map(str::to_string)
                .unwrap_or_else(|| "closing relay connection".into());
            self.down(registry, member, why, now);
        }
    }

    /// Write what is queued, once connected. True when reads held back by backpressure may go
    /// on (the loop reads the uplink again).
    ///
    /// While more than `max` bytes wait, the uplink reads nothing (see [`Uplink::ready`]), so a
    /// relay that stops reading while it keeps sending cannot grow us: our output only grows by
    /// what we send on our own. One that then takes nothing for [`STALL_MS`] is dropped, like a
    /// slow reader on the relay's side; one that reads, however slowly, drains a large outbox
    /// and is never dropped. Nothing is lost either way: the outbox is resent at the next login
    /// and unacknowledged deliveries come again.
    pub fn flush(
        &mut self,
        registry: &Registry,
        member: &mut Member,
        now: Now,
        max: usize,
    ) -> bool {
        if let State::Connecting {
            conn, tcp: true, ..
        } = &mut self.state
        {
            // The handshake's own records (ClientHello, Finished).
            if let Err(e) = conn.flush(registry, UPSTREAM) {
                let why = format!("relay connection failed: {e}");
                self.down(registry, member, why, now);
            }
            return false;
        }
        let State::Up(c) = &mut self.state else {
            return false;
        };
        let before = c.pending();
        if let Err(e) = c.flush(registry, UPSTREAM) {
            let why = format!("relay connection failed: {e}");
            self.down(registry, member, why, now);
            return false;
        }
        let pending = c.pending();
        if pending < before || pending == 0 {
            self.last_progress = now.mono;
        }
        if pending <= max {
            return std::mem::take(&mut self.paused);
        }
        if now.mono.saturating_sub(self.last_progress) > STALL_MS {
            warn!(
                "relay {} is not reading: {pending} bytes unread (max_write_buffer {max}) for \
                 {} s; dropping the link",
                self.addr,
                STALL_MS / 1000
            );
            let why = format!("relay stopped reading ({pending} bytes unread, max_write_buffer)");
            self.down(registry, member, why, now);
        }
        false
    }

    /// The connection is gone (or never came): tell the member why and back off.
    pub fn down(&mut self, registry: &Registry, member: &mut Member, why: String, now: Now) {
        if let Some(c) = self.conn_mut() {
            c.deregister(registry);
        }
        // Exponential backoff from 0.5 s to 30 s, with jitter so a restarted relay is not hit
        // by every member at the same instant.
        let base = (500u64 << self.attempt.min(6)).min(30_000);
        let delay = rand::thread_rng().gen_range(base / 2..=base);
        self.attempt = self.attempt.saturating_add(1);
        self.state = State::Idle {
            next_try: now.mono + delay,
        };
        info!("{why}; reconnecting in {:.1} s", delay as f64 / 1000.0);
        self.paused = false;
        member.link_down();
        member.set_relay_error(why);
    }
}
