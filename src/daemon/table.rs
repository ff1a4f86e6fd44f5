//! The connection table: every relay peer and control client with its buffered connection,
//! the one place where mio tokens and the relay's connection ids are mapped onto each other,
//! and the I/O side of control replies (queueing, history pages, followers, flushing).
//!
//! Must never: decide what a reply says (that is `control`), or write a reply before the turn
//! commits (replies are queued here and flushed by the loop after the commit).

use std::collections::BTreeSet;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use log::{debug, info, warn};
use mio::net::{TcpListener, UnixListener};
use mio::{Registry, Token};

use super::conn::{Conn, Stream};
use super::control::{Ctl, Paged, Sink};
use super::setup;
use crate::idhash::{IdMap, IdSet};
use crate::proto::control::{CtlResponse, ErrorKind, Record};
use crate::proto::encode_frame;
use crate::relay::{self, ConnId};
use crate::store::Store;

/// The host's in-process member, as the relay sees it. A token that is never registered with
/// mio (below [`FIRST_CONN`], apart from the listeners'), so its id cannot be a peer's.
pub const HOST_LINK: Token = Token(4);
/// The first token handed to an accepted connection; the ones below are fixed.
const FIRST_CONN: usize = 16;

/// The relay's id for the connection on `token`.
pub fn conn_id(token: Token) -> ConnId {
    // usize is at most 64 bits on every target mio supports.
    ConnId(token.0 as u64)
}

/// The token of the relay's connection `id`.
fn token_of(id: ConnId) -> Option<Token> {
    usize::try_from(id.0).ok().map(Token)
}

/// What a connection is.
pub enum Kind {
    /// A member connected to our relay.
    Peer,
    /// A control client (boxed: a peer, the bulk of the table, need not carry its size).
    Control(Box<Ctl>),
}

/// One connection.
pub struct Entry {
    /// Its socket and buffers.
    pub conn: Conn,
    /// What it is.
    pub kind: Kind,
    /// Frames that may leave only once the turn commits (a relay's `Accepted` for what the
    /// turn wrote), queued behind everything else then.
    late: Vec<u8>,
}

/// Every accepted connection, by token.
///
/// A turn touches few of what may be tens of thousands of idle connections, so nothing here
/// walks them all: the control clients are kept apart, and flushing visits only the connections
/// given output this turn (`touched`, marked for a rewind at their first output) and those whose
/// output did not all leave before (`backlog`).
pub struct Table {
    entries: IdMap<Token, Entry>,
    next_token: usize,
    peers: usize,
    controls: usize,
    control_tokens: BTreeSet<Token>,
    /// Connections with frames waiting for the commit.
    late: Vec<Token>,
    touched: Vec<Token>,
    is_touched: IdSet<Token>,
    backlog: IdSet<Token>,
}

impl Default for Table {
    fn default() -> Self {
        Table {
            entries: IdMap::default(),
            next_token: FIRST_CONN,
            peers: 0,
            controls: 0,
            control_tokens: BTreeSet::new(),
            late: Vec::new(),
            touched: Vec::new(),
            is_touched: IdSet::default(),
            backlog: IdSet::default(),
        }
    }
}

/// A connection's output buffer, with room while less than `limit` bytes wait.
struct Buffer<'a> {
    conn: &'a mut Conn,
    limit: usize,
}

impl Sink for Buffer<'_> {
    fn room(&self) -> bool {
        self.conn.pending() < self.limit
    }
    fn emit(&mut self, resp: &CtlResponse) {
        let mut buf = Vec::new();
        if encode_frame(resp, &mut buf).is_ok() {
            self.conn.queue(&buf);
        }
    }
}

impl Table {
    /// Connection `token` gets output this turn (or was read: a TLS connection answers its
    /// handshake as it reads): mark it (so a failed commit can take the turn's output back) the
    /// first time, and flush it after the turn.
    pub fn touch(&mut self, token: Token) {
        if self.is_touched.insert(token) {
            if let Some(e) = self.entries.get_mut(&token) {
                e.conn.mark();
            }
            self.touched.push(token);
        }
    }

    fn token(&mut self) -> Token {
        let t = Token(self.next_token);
        self.next_token += 1;
        t
    }

    /// The connection on `token`.
    pub fn get_mut(&mut self, token: Token) -> Option<&mut Entry> {
        self.entries.get_mut(&token)
    }

    /// Every connection.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&Token, &mut Entry)> {
        self.entries.iter_mut()
    }

    /// Take a connection out of the table (and out of the poller).
    pub fn remove(&mut self, registry: &Registry, token: Token) -> Option<Kind> {
        let mut e = self.entries.remove(&token)?;
        e.conn.deregister(registry);
        self.control_tokens.remove(&token);
        self.backlog.remove(&token);
        match e.kind {
            Kind::Peer => self.peers -= 1,
            Kind::Control(_) => self.controls -= 1,
        }
        Some(e.kind)
    }

    /// Accept relay peers until `WouldBlock`, each as a TLS server connection with `tls`;
    /// returns the relay ids of the new connections.
    pub fn accept_peers(
        &mut self,
        l: &TcpListener,
        registry: &Registry,
        max: usize,
        stopping: bool,
        tls: &Arc<rustls::ServerConfig>,
    ) -> Vec<ConnId> {
        let mut new = Vec::new();
        loop {
            match l.accept() {
                Ok((stream, addr)) => {
                    if stopping {
                        continue;
                    }
                    if self.peers >= max {
                        warn!(
                            "refused connection from {addr}: at the limit of {max} connections (max_connections)"
                        );
                        drop(stream);
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let server = match rustls::ServerConnection::new(tls.clone()) {
                        Ok(s) => s,
                        Err(e) => {
                            warn!("cannot start TLS for connection from {addr}: {e}");
                            continue;
                        }
                    };
                    let token = self.token();
                    let mut conn = Conn::with_tls(Stream::Tcp(stream), server.into());
                    if let Err(e) = conn.register(registry, token) {
                        warn!("cannot register connection from {addr}: {e}");
                        continue;
                    }
                    debug!("connection {} from {addr}", token.0);
                    self.peers += 1;
                    let kind = Kind::Peer;
                    self.entries.insert(
                        token,
                        Entry {
                            conn,
                            kind,
                            late: Vec::new(),
                        },
                    );
                    new.push(conn_id(token));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return new,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: log and try again next turn rather than spin.
                    warn!("accept failed: {e}");
                    return new;
                }
            }
        }
    }

    /// Accept control clients until `WouldBlock`: only our own uid (or root), at most `max`.
    pub fn accept_control(
        &mut self,
        l: &UnixListener,
        registry: &Registry,
        max: usize,
        stopping: bool,
        now_mono: u64,
    ) {
        loop {
            match l.accept() {
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
                    if stopping {
                        continue;
                    }
                    if self.controls >= max {
                        warn!(
                            "refused control connection: at the limit of {max} clients (max_control_clients)"
                        );
                        // Say why before closing, so chatctl reports the limit rather than an
                        // unreachable daemon. One small frame fits any socket buffer.
                        let mut buf = Vec::new();
                        let refusal = CtlResponse::Error {
                            kind: ErrorKind::Failed,
                            message: format!(
                                "chatd is serving its maximum of {max} control clients \
                                 (max_control_clients); try again later"
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
                    if let Err(e) = conn.register(registry, token) {
                        warn!("cannot register control connection: {e}");
                        continue;
                    }
                    self.controls += 1;
                    let kind = Kind::Control(Box::new(Ctl {
                        active_at: now_mono,
                        ..Ctl::default()
                    }));
                    self.entries.insert(
                        token,
                        Entry {
                            conn,
                            kind,
                            late: Vec::new(),
                        },
                    );
                    self.control_tokens.insert(token);
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

    /// Control clients that may be idle: neither following or paging a tail, nor owed output,
    /// nor closing (the caller leaves out those waiting for a `send --wait`). With when each
    /// sent its last request.
    fn idle(&self) -> impl Iterator<Item = (Token, u64)> + '_ {
        // The control clients only: this runs every turn, and peers are the bulk of the table.
        self.control_tokens
            .iter()
            .filter_map(|t| match self.entries.get(t) {
                Some(Entry {
                    kind: Kind::Control(c),
                    conn,
                    ..
                }) if !c.tailing()
                    && !c.answering()
                    && c.queued.is_empty()
                    && conn.pending() == 0
                    && !conn.closing =>
                {
                    Some((*t, c.active_at))
                }
                _ => None,
            })
    }

    /// When the first idle control client reaches `timeout` (mono ms), if any is idle.
    pub fn idle_deadline(&self, timeout: u64, waiting: &dyn Fn(Token) -> bool) -> Option<u64> {
        self.idle()
            .filter(|(t, _)| !waiting(*t))
            .map(|(_, at)| at.saturating_add(timeout))
            .min()
    }

    /// Close every control client idle for `timeout` or longer (`control_idle_timeout`): a
    /// local client cannot hold one of the `max_control_clients` slots by saying nothing.
    pub fn close_idle(&mut self, now: u64, timeout: u64, waiting: &dyn Fn(Token) -> bool) {
        let due: Vec<Token> = self
            .idle()
            .filter(|(t, at)| !waiting(*t) && now >= at.saturating_add(timeout))
            .map(|(t, _)| t)
            .collect();
        for t in due {
            if let Some(e) = self.entries.get_mut(&t) {
                info!(
                    "closing control client {}: no request for {} s (control_idle_timeout)",
                    t.0,
                    timeout / 1000
                );
                e.conn.closing = true;
            }
            // Visited by the flush, which closes it once its output is out.
            self.touch(t);
        }
    }

    /// Pass one relay output to its peer's buffer.
    pub fn relay_out(&mut self, out: relay::Out) {
        match out {
            relay::Out::Send(id, msg) => {
                let Some(t) = token_of(id) else { return };
                self.touch(t);
                if let Some(e) = self.entries.get_mut(&t) {
                    // Both encoders leave the buffer as it was on an error.
                    if let Err(err) = encode_frame(&msg, e.conn.out()) {
                        warn!("cannot encode frame for connection {id}: {err}");
                    }
                }
            }
            relay::Out::Deliver(id, item) => {
                let Some(t) = token_of(id) else { return };
                self.touch(t);
                if let Some(e) = self.entries.get_mut(&t) {
                    let framed = crate::proto::frame::encode_parts(
                        crate::proto::DELIVER_PREFIX,
                        &item,
                        e.conn.out(),
                    );
                    if let Err(err) = framed {
                        warn!("cannot frame a delivery for connection {id}: {err}");
                    }
                }
            }
            relay::Out::AfterCommit(id, msg) => {
                let Some(t) = token_of(id) else { return };
                if let Some(e) = self.entries.get_mut(&t) {
                    match encode_frame(&msg, &mut e.late) {
                        Ok(()) => self.late.push(t),
                        Err(err) => warn!("cannot encode frame for connection {id}: {err}"),
                    }
                }
            }
            relay::Out::Close(id) => {
                let Some(t) = token_of(id) else { return };
                self.touch(t);
                if let Some(e) = self.entries.get_mut(&t) {
                    e.conn.closing = true;
                }
            }
        }
    }

    /// The turn committed: what waited for it joins the connections' output.
    pub fn committed(&mut self) {
        for t in std::mem::take(&mut self.late) {
            let Some(e) = self.entries.get_mut(&t) else {
                continue;
            };
            if e.late.is_empty() {
                continue;
            }
            let late = std::mem::take(&mut e.late);
            self.touch(t);
            if let Some(e) = self.entries.get_mut(&t) {
                e.conn.queue(&late);
            }
        }
    }

    /// Write what relay peers were given this turn now, before the commit: it promises nothing
    /// about the store (what does waits in `late`). Returns the connections that failed, and
    /// whether anything was written.
    pub fn flush_peers_early(&mut self, registry: &Registry) -> (Vec<Token>, bool) {
        let mut dead = Vec::new();
        let mut wrote = false;
        for t in &self.touched {
            let Some(e) = self.entries.get_mut(t) else {
                continue;
            };
            if !matches!(e.kind, Kind::Peer) || e.conn.pending() == 0 {
                continue;
            }
            let before = e.conn.pending();
            if let Err(err) = e.conn.flush(registry, *t) {
                debug!("write to {} failed: {err}", t.0);
                dead.push(*t);
            }
            wrote |= e.conn.pending() < before;
        }
        (dead, wrote)
    }

    /// Close every relay peer once its output is written (the relay core was rebuilt).
    pub fn close_peers(&mut self) {
        let peers: Vec<Token> = self
            .entries
            .iter()
            .filter(|(_, e)| matches!(e.kind, Kind::Peer))
            .map(|(t, _)| *t)
            .collect();
        for t in peers {
            self.touch(t);
            if let Some(e) = self.entries.get_mut(&t) {
                e.conn.closing = true;
            }
        }
    }

    /// Queue a reply to a control client.
    pub fn reply(&mut self, token: Token, resp: &CtlResponse) {
        self.touch(token);
        let Some(e) = self.entries.get_mut(&token) else {
            return;
        };
        if let Kind::Control(c) = &mut e.kind {
            c.answered = c.answered.saturating_add(1);
        }
        // Encoded in place; an error leaves the buffer as it was.
        if let Err(err) = encode_frame(resp, e.conn.out()) {
            warn!("cannot encode control reply: {err}");
            let fallback = CtlResponse::Error {
                kind: ErrorKind::Failed,
                message: format!("reply too large: {err}"),
                sent: Vec::new(),
            };
            let _ = encode_frame(&fallback, e.conn.out());
        }
    }

    /// The control state of client `token`.
    pub fn ctl_mut(&mut self, token: Token) -> Option<&mut Ctl> {
        match self.entries.get_mut(&token) {
            Some(Entry {
                kind: Kind::Control(c),
                ..
            }) => Some(c),
            _ => None,
        }
    }

    /// Control clients with requests queued behind one not answered yet.
    pub fn queued_clients(&self) -> Vec<Token> {
        self.control_tokens
            .iter()
            .copied()
            .filter(|t| {
                matches!(self.entries.get(t), Some(Entry { kind: Kind::Control(c), .. })
                    if !c.queued.is_empty())
            })
            .collect()
    }

    /// [`Table::queue_runnable`] without dropping anything: whether the loop has queued
    /// requests to run (or drop) next turn.
    pub fn queue_could_run(&self, token: Token) -> bool {
        matches!(self.entries.get(&token), Some(Entry { kind: Kind::Control(c), conn, .. })
            if !c.queued.is_empty() && (conn.closing || c.tailing() || !c.answering()))
    }

    /// Whether client `token`'s next queued request may run now: nothing of an earlier answer
    /// is still being sent (the caller checks the waits). A client that is closing, or became
    /// a `tail -f` (which ignores requests), has its queue dropped instead.
    pub fn queue_runnable(&mut self, token: Token) -> bool {
        let Some(Entry {
            kind: Kind::Control(c),
            conn,
            ..
        }) = self.entries.get_mut(&token)
        else {
            return false;
        };
        if conn.closing || c.tailing() {
            c.queued.clear();
            return false;
        }
        !c.queued.is_empty() && !c.answering()
    }

    /// Start of a turn: no client has asked anything yet.
    pub fn begin_turn(&mut self) {
        self.touched.clear();
        self.is_touched.clear();
        for t in &self.control_tokens {
            if let Some(Entry {
                kind: Kind::Control(c),
                ..
            }) = self.entries.get_mut(t)
            {
                c.asked = 0;
                c.answered = 0;
            }
        }
    }

    /// The turn's commit failed: take back its output; every request run this turn gets
    /// `resp`, and its client is closed once that is written. Closed, because an answer of an
    /// earlier request that was due this turn is taken back too: a pipelining client could not
    /// tell which answer is whose. Its requests queued behind are not run.
    pub fn fail_turn(&mut self, resp: &CtlResponse) {
        for t in std::mem::take(&mut self.late) {
            if let Some(e) = self.entries.get_mut(&t) {
                e.late.clear();
            }
        }
        for t in &self.touched {
            if let Some(e) = self.entries.get_mut(t) {
                e.conn.rewind();
            }
        }
        // A request run this turn, or an answer given this turn (to a `--wait` or a sealed send
        // of an earlier turn), is taken back: its client hears the error, at least once per
        // request or answer, and is closed, as it could not tell which answer is whose.
        let asked: Vec<(Token, u32)> = self
            .control_tokens
            .iter()
            .filter_map(|t| match self.entries.get(t) {
                Some(Entry {
                    kind: Kind::Control(c),
                    ..
                }) if c.asked > 0 || c.answered > 0 => Some((*t, c.asked.max(c.answered))),
                _ => None,
            })
            .collect();
        for (t, n) in asked {
            if let Some(Entry {
                kind: Kind::Control(c),
                ..
            }) = self.entries.get_mut(&t)
            {
                // Nothing more of a stream goes out after the error.
                c.queued.clear();
                c.cursor = None;
                c.follow = None;
                c.stream.clear();
                c.list = None;
            }
            for _ in 0..n {
                self.reply(t, resp);
            }
            if let Some(e) = self.entries.get_mut(&t) {
                e.conn.closing = true;
            }
        }
    }

    /// A new history record: to every follower that wants it.
    pub fn publish(&mut self, rec: &Record) {
        let mut buf = Vec::new();
        if encode_frame(&CtlResponse::Record(rec.clone()), &mut buf).is_err() {
            return;
        }
        let tokens: Vec<Token> = self.control_tokens.iter().copied().collect();
        for t in tokens {
            let takes = match self.entries.get_mut(&t) {
                Some(Entry {
                    kind: Kind::Control(c),
                    ..
                }) => c.follow.as_mut().is_some_and(|f| f.take(rec)),
                _ => false,
            };
            if takes {
                self.touch(t);
                if let Some(e) = self.entries.get_mut(&t) {
                    e.conn.queue(&buf);
                }
            }
        }
    }

    /// Whether some `tail` can send more now, given the output `limit` per client.
    /// A page of a member's `who --all` arrived for listing `req` (the client's token).
    pub fn listed(&mut self, req: u64, page: Result<crate::member::ListPage, String>) {
        let Some(c) = usize::try_from(req)
            .ok()
            .and_then(|t| self.ctl_mut(Token(t)))
        else {
            return;
        };
        let Some(list) = c.list.as_mut() else {
            return;
        };
        let mut frames = Vec::new();
        let done = match page {
            Ok(p) => list.page(p.views, p.next, &mut frames),
            Err(why) => {
                frames.push(super::control::failed(format!(
                    "the directory listing stopped: {why}"
                )));
                true
            }
        };
        c.stream.extend(frames);
        if done {
            c.list = None;
        }
    }

    /// The listings waiting for the relay's page longer than the lookup timeout at `now`.
    pub fn lists_late(&self, now: u64) -> Vec<Token> {
        self.control_tokens
            .iter()
            .filter(|t| {
                matches!(self.entries.get(t), Some(Entry { kind: Kind::Control(c), .. })
                    if c.list.as_ref().is_some_and(|l| l.in_flight && now.saturating_sub(l.asked_at) >= super::control::LOOKUP_TIMEOUT_MS))
            })
            .copied()
            .collect()
    }

    /// When the earliest listing waiting for the relay times out (monotonic ms).
    pub fn list_deadline(&self) -> Option<u64> {
        self.control_tokens
            .iter()
            .filter_map(|t| match self.entries.get(t) {
                Some(Entry {
                    kind: Kind::Control(c),
                    ..
                }) => match &c.list {
                    Some(l) if l.in_flight => {
                        Some(l.asked_at.saturating_add(super::control::LOOKUP_TIMEOUT_MS))
                    }
                    _ => None,
                },
                _ => None,
            })
            .min()
    }

    /// Control clients whose listing wants its next page, and have room for it.
    pub fn lists_ready(&self, limit: usize) -> Vec<Token> {
        self.control_tokens
            .iter()
            .filter(|t| {
                self.entries.get(t).is_some_and(|e| {
                    matches!(&e.kind, Kind::Control(c) if c.wants_page())
                        && e.conn.pending() < limit
                })
            })
            .copied()
            .collect()
    }

    pub fn tails_ready(&self, limit: usize) -> bool {
        self.control_tokens.iter().any(|t| {
            self.entries.get(t).is_some_and(|e| {
                matches!(&e.kind, Kind::Control(c) if c.paging()) && e.conn.pending() < limit
            })
        })
    }

    /// Send more history to every `tail` in progress while less than `limit` bytes wait to be
    /// written to it (half the write-buffer cap).
    pub fn pump_tails(&mut self, store: &Store, limit: usize) {
        let tokens: Vec<Token> = self.control_tokens.iter().copied().collect();
        for t in tokens {
            let wants = self.entries.get(&t).is_some_and(|e| {
                matches!(&e.kind, Kind::Control(c) if c.paging()) && e.conn.pending() < limit
            });
            if !wants {
                continue;
            }
            self.touch(t);
            let Some(e) = self.entries.get_mut(&t) else {
                continue;
            };
            let Kind::Control(c) = &mut e.kind else {
                continue;
            };
            let mut sink = Buffer {
                conn: &mut e.conn,
                limit,
            };
            while sink.room() {
                let Some(resp) = c.stream.pop_front() else {
                    break;
                };
                sink.emit(&resp);
            }
            let Some(cur) = c.cursor.as_mut() else {
                continue;
            };
            match cur.page(store, &mut sink) {
                Paged::More => {}
                Paged::Follow(f) => {
                    c.cursor = None;
                    c.follow = Some(f);
                }
                Paged::Done => c.cursor = None,
            }
        }
    }

    /// Write every buffer out; returns the connections to drop (write failed, too slow a
    /// reader, or closing with nothing left to write).
    pub fn flush(&mut self, registry: &Registry, max_write_buffer: usize) -> Vec<Token> {
        let mut dead = Vec::new();
        let mut visit: Vec<Token> = self.touched.clone();
        visit.extend(self.backlog.drain());
        visit.sort_unstable();
        visit.dedup();
        for token in &visit {
            let Some(e) = self.entries.get_mut(token) else {
                continue;
            };
            if e.conn.pending() > 0 {
                if let Err(err) = e.conn.flush(registry, *token) {
                    debug!("write to {} failed: {err}", token.0);
                    dead.push(*token);
                    continue;
                }
            }
            if e.conn.pending() > max_write_buffer {
                warn!(
                    "cutting off connection {}: {} bytes unread (max_write_buffer {max_write_buffer}); its messages stay queued",
                    token.0,
                    e.conn.pending(),
                );
                dead.push(*token);
            } else if e.conn.closing && e.conn.pending() == 0 {
                dead.push(*token);
            } else if e.conn.pending() > 0 {
                self.backlog.insert(*token);
            }
        }
        dead
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::{read_from, MAX_FRAME};
    use crate::proto::from_payload;
    use mio::Poll;
    use std::io::Read;
    use std::time::Duration;

    /// Accept the one control client that is connecting, within 10 s.
    fn accept_one(table: &mut Table, listener: &UnixListener, poll: &Poll) -> Token {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            table.accept_control(listener, poll.registry(), 8, false, 0);
            if let Some(t) = table.control_tokens.iter().next().copied() {
                return t;
            }
            assert!(std::time::Instant::now() < deadline, "accept");
            std::thread::yield_now();
        }
    }

    /// A failed commit answers each request the client ran in the turn (a pipelining client
    /// counts its answers), drops what it had queued, and closes it.
    #[test]
    fn a_failed_turn_answers_every_request_of_it_and_closes_the_client() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let poll = Poll::new().unwrap();
        let mut client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut table = Table::default();
        let token = accept_one(&mut table, &listener, &poll);
        table.begin_turn();
        table.reply(token, &CtlResponse::End);
        let c = table.ctl_mut(token).unwrap();
        c.asked = 3;
        c.queued.push_back(vec![1, 2, 3]);
        let err = CtlResponse::Error {
            kind: ErrorKind::Failed,
            message: "not stored".into(),
            sent: Vec::new(),
        };
        table.fail_turn(&err);
        assert!(table.ctl_mut(token).unwrap().queued.is_empty());
        let dead = table.flush(poll.registry(), 1 << 20);
        assert!(dead.contains(&token), "closed once written: {dead:?}");
        for _ in 0..3 {
            let p = read_from(&mut client, MAX_FRAME)
                .unwrap()
                .expect("an answer");
            let resp: CtlResponse = from_payload(&p).unwrap();
            assert_eq!(resp, err, "the turn's own answer was taken back");
        }
        table.remove(poll.registry(), token);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "nothing after the three errors");

        // A client that asked nothing this turn but was answered in it (a `--wait` of an earlier
        // turn, say) also hears the error and is closed.
        let mut client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let token = accept_one(&mut table, &listener, &poll);
        table.begin_turn();
        table.reply(token, &CtlResponse::End);
        table.fail_turn(&err);
        let dead = table.flush(poll.registry(), 1 << 20);
        assert!(dead.contains(&token));
        let p = read_from(&mut client, MAX_FRAME)
            .unwrap()
            .expect("the error");
        assert_eq!(from_payload::<CtlResponse>(&p).unwrap(), err);
        table.remove(poll.registry(), token);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "only the error");
    }
}
