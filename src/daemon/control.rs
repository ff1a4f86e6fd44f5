//! Control-socket requests as plain functions: a `CtlRequest` with the cores and the store in,
//! a [`Reply`] out; plus the per-client state a reply can leave behind (a `tail` paging through
//! history, a follower, a `send --wait` waiter), each with the narrow methods the loop calls.
//!
//! Nothing here knows about sockets or mio readiness, so send, `--wait`, `tail` paging and
//! their errors are unit-tested without a `Poll` (see the tests at the end).
//!
//! Must never: write to a socket (the loop puts replies into the connection's buffer, and they
//! leave after the turn commits), or put message text anywhere but into a reply.

use crate::clock::Now;
use mio::Token;

use super::roles::Roles;
use super::status::{Info, Status};
use crate::member::{MemberError, Started};
use crate::proto::control::{
    CtlRequest, CtlResponse, ErrorKind, MsgState, PeerView, Record, RecordKind, Sent, Wait,
    WHO_CHUNK,
};
use crate::proto::{hex, valid_user};
use crate::store::{Filter, Store, StoreError};

/// Records read from the database at a time for a `tail`.
const PAGE: u64 = 64;

/// What the loop does with a request.
#[derive(Debug)]
pub enum Reply {
    /// Answer now.
    Now(CtlResponse),
    /// `send --wait`: answer when the messages get there, or when time is up.
    Wait(Pending),
    /// `tail`: send history from this cursor, as the client reads.
    Tail(Cursor),
    /// Several frames at once (`who`: the list in chunks, then `End`).
    Stream(Vec<CtlResponse>),
    /// A send that waits for the relay's answer to a key lookup: asked again when it comes.
    Park(Parked),
    /// `who --all` (and `who` on a relay): the directory, a page at a time as the client reads.
    List(Listing),
    /// `send` to many new sessions: answer when member job `job` is sealed (see
    /// [`Waiters::sealing`]), then as `wait` says.
    Sealing {
        /// The member's job.
        job: u64,
        /// What to wait for after.
        wait: Wait,
        /// The `--wait` timeout, counted from now.
        timeout_ms: u64,
    },
}

/// The next page of a listing on a relay, from its own directory, into `out`; true after the
/// last (`End` queued).
pub fn relay_page(
    relay: &crate::relay::Relay,
    list: &mut Listing,
    out: &mut Vec<CtlResponse>,
) -> bool {
    let (views, more) = relay.directory(&list.after, &list.prefix, WHO_FRAME_ENTRIES);
    let next = if more {
        views.last().map(|v| v.user.clone())
    } else {
        None
    };
    list.page(views, next, out)
}

/// How long a send waits for the relay to answer a key lookup (and a `who --all` for a page).
pub use crate::member::LOOKUP_TIMEOUT_MS;

/// A request parked on a key lookup.
#[derive(Debug)]
pub struct Parked {
    req: CtlRequest,
    users: Vec<String>,
    deadline: u64,
}

/// Where a directory listing is.
#[derive(Debug)]
pub struct Listing {
    /// Only names with this prefix.
    pub prefix: String,
    /// The last name sent (`""` before the first page).
    pub after: String,
    /// A page was asked of the relay and has not come back.
    pub in_flight: bool,
    /// When that page was asked (monotonic ms): a relay that does not answer in
    /// [`LOOKUP_TIMEOUT_MS`] ends the listing with an error.
    pub asked_at: u64,
}

impl Listing {
    fn new(prefix: Option<String>) -> Listing {
        Listing {
            prefix: prefix.unwrap_or_default(),
            after: String::new(),
            in_flight: false,
            asked_at: 0,
        }
    }

    /// A page arrived: queue its frames, and `End` after the last page.
    pub fn page(
        &mut self,
        views: Vec<PeerView>,
        next: Option<String>,
        out: &mut Vec<CtlResponse>,
    ) -> bool {
        out.extend(
            views
                .chunks(WHO_FRAME_ENTRIES)
                .map(|c| CtlResponse::Peers(c.to_vec())),
        );
        self.in_flight = false;
        match next {
            Some(n) => {
                self.after = n;
                false
            }
            None => {
                out.push(CtlResponse::End);
                true
            }
        }
    }
}

/// Entries the daemon puts in one `Peers` frame: far fewer than the protocol's [`WHO_CHUNK`], so
/// a frame (about 8 KiB) always fits in the room a paced stream leaves under the write-buffer
/// cap, and a client that reads is never cut off as a slow reader.
pub const WHO_FRAME_ENTRIES: usize = 64;

/// `who` as frames: `Peers` chunks of [`WHO_FRAME_ENTRIES`], then `End`.
fn who_frames(list: Vec<PeerView>) -> Vec<CtlResponse> {
    const _: () = assert!(WHO_FRAME_ENTRIES <= WHO_CHUNK);
    let mut frames: Vec<CtlResponse> = list
        .chunks(WHO_FRAME_ENTRIES)
        .map(|c| CtlResponse::Peers(c.to_vec()))
        .collect();
    frames.push(CtlResponse::End);
    frames
}

/// An error reply of kind `Failed`.
pub fn failed(message: impl Into<String>) -> CtlResponse {
    CtlResponse::Error {
        kind: ErrorKind::Failed,
        message: message.into(),
        sent: Vec::new(),
    }
}

/// The reply to every client that asked something in a turn whose commit failed.
pub fn not_stored(e: &StoreError) -> CtlResponse {
    failed(format!(
        "chatd could not write its database ({e}); nothing from this request was stored"
    ))
}

/// Handle one request.
pub fn request(
    roles: &mut Roles,
    store: &mut Store,
    info: &Info,
    req: CtlRequest,
    now: Now,
) -> Reply {
    match req {
        CtlRequest::Send {
            to,
            all,
            text,
            wait,
            timeout_ms,
        } => send(roles, store, &to, all, &text, wait, timeout_ms, now),
        CtlRequest::Tail {
            last,
            since,
            with,
            follow,
            kinds,
        } => tail(
            roles,
            store,
            last,
            since,
            Filter { peer: with, kinds },
            follow,
        ),
        CtlRequest::Who => match roles.member() {
            Some(m) => Reply::Stream(who_frames(m.who())),
            // A relay's registrations: any number, so paged like `who --all`.
            None => Reply::List(Listing::new(None)),
        },
        CtlRequest::Directory { prefix } => match prefix {
            Some(p) if !p.is_empty() && !prefix_ok(&p) => Reply::Now(failed(format!(
                "invalid prefix {p:?}: user names are made of a-z 0-9 . _ -"
            ))),
            prefix => Reply::List(Listing::new(prefix)),
        },
        CtlRequest::Status => {
            let outbox = store.outbox_messages().unwrap_or(0);
            Reply::Now(CtlResponse::Status(Status::of(roles, info).view(outbox)))
        }
        CtlRequest::Fingerprint { user } => Reply::Now(fingerprint(roles, info, user)),
        CtlRequest::Trust { user, fingerprint } => Reply::Now(match roles.member_mut() {
            None => failed("this chatd is a relay only; trust is for members"),
            Some(m) => match m.trust(&user, &fingerprint, now, store) {
                Ok(msg) => CtlResponse::Done(msg),
                Err(e) => failed(e.to_string()),
            },
        }),
        CtlRequest::Forget { user } => Reply::Now(forget(roles, store, &user, now)),
    }
}

#[allow(clippy::too_many_arguments)]
fn send(
    roles: &mut Roles,
    store: &mut Store,
    to: &[String],
    all: bool,
    text: &str,
    wait: Wait,
    timeout_ms: u64,
    now: Now,
) -> Reply {
    let Some(m) = roles.member_mut() else {
        return Reply::Now(failed(
            "this chatd is a relay only; start it with --user NAME to send messages",
        ));
    };
    match m.send_or_start(to, all, text, now, store) {
        Err(MemberError::KeysPending(users)) => Reply::Park(Parked {
            req: CtlRequest::Send {
                to: to.to_vec(),
                all,
                text: text.to_string(),
                wait,
                timeout_ms,
            },
            users,
            deadline: now.mono.saturating_add(LOOKUP_TIMEOUT_MS),
        }),
        Ok(Started::Sealing(job)) => Reply::Sealing {
            job,
            wait,
            timeout_ms,
        },
        Ok(Started::Queued(sent)) => {
            let target = match wait {
                Wait::None => return Reply::Now(CtlResponse::Sent(sent)),
                Wait::Relay => MsgState::Relayed,
                Wait::Delivered => MsgState::Delivered,
            };
            Reply::Wait(Pending {
                sent,
                target,
                deadline: now.mono.saturating_add(timeout_ms),
                timeout_ms,
            })
        }
        Err(e) => Reply::Now(send_error(e)),
    }
}

/// The reply to a send that failed as a whole.
fn send_error(e: MemberError) -> CtlResponse {
    CtlResponse::Error {
        kind: if matches!(e, MemberError::KeyChanged { .. }) {
            ErrorKind::KeyChanged
        } else {
            ErrorKind::Failed
        },
        message: e.to_string(),
        sent: Vec::new(),
    }
}

/// A prefix of a valid user name (at most 32 of a-z 0-9 . _ -).
fn prefix_ok(p: &str) -> bool {
    p.len() <= 32
        && p.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

fn tail(
    roles: &Roles,
    store: &Store,
    last: Option<u64>,
    since: Option<u64>,
    filter: Filter,
    follow: bool,
) -> Reply {
    if roles.member().is_none() {
        return Reply::Now(failed(
            "this chatd is a relay only: it keeps no message history (relays only see envelopes)",
        ));
    }
    if let Some(w) = &filter.peer {
        if !valid_user(w) {
            return Reply::Now(failed(format!("invalid user name {w:?}")));
        }
    }
    if let Some(RecordKind::Other(k)) = filter
        .kinds
        .iter()
        .find(|k| matches!(k, RecordKind::Other(_)))
    {
        return Reply::Now(failed(format!(
            "unknown record kind {k:?}; this chatd knows {}",
            known_kinds()
        )));
    }
    let since = since.unwrap_or(0);
    let after = match last {
        Some(n) => store.start_of_last(since, &filter, n),
        None => Ok(since),
    };
    match after {
        Ok(after) => Reply::Tail(Cursor {
            after,
            filter,
            follow,
        }),
        Err(e) => Reply::Now(failed(format!("cannot read history: {e}"))),
    }
}

/// The record kinds this version knows, for an error message.
fn known_kinds() -> String {
    RecordKind::KNOWN
        .iter()
        .map(RecordKind::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `forget` on a relay drops the binding and queue; on a member the pin and what is held; a host
/// does both and says both.
fn forget(roles: &mut Roles, store: &mut Store, user: &str, now: Now) -> CtlResponse {
    if !valid_user(user) {
        return failed(format!("invalid user name {user:?}"));
    }
    let mut said = Vec::new();
    let mut errors = Vec::new();
    if let Some(r) = roles.relay_mut() {
        match r.forget(user, store) {
            Ok(true) => said.push(format!(
                "forgot {user}: the name and its queue are gone; the next key to log in as {user} claims it"
            )),
            Ok(false) => errors.push(format!("no user named {user} is registered on this relay")),
            Err(e) => return failed(format!("cannot forget {user}: {e}")),
        }
    }
    if let Some(m) = roles.member_mut() {
        match m.forget(user, now, store) {
            Ok(msg) => said.push(msg),
            Err(e @ MemberError::NothingToForget(_)) => errors.push(e.to_string()),
            Err(e) => return failed(e.to_string()),
        }
    }
    if said.is_empty() {
        return failed(errors.join("; "));
    }
    CtlResponse::Done(said.join("; "))
}

fn fingerprint(roles: &Roles, info: &Info, user: Option<String>) -> CtlResponse {
    let Some(u) = user else {
        return CtlResponse::Fingerprint {
            user: roles
                .member()
                .map(|m| m.user().to_string())
                .unwrap_or_else(|| "relay".into()),
            fingerprint: info.fingerprint.to_string(),
        };
    };
    let fp = match (roles.member(), roles.relay()) {
        (Some(m), _) => m.pinned(&u).map(|f| f.to_string()),
        (None, Some(r)) => r.bound(&u).map(|f| f.to_string()),
        _ => None,
    };
    match fp {
        Some(fingerprint) => CtlResponse::Fingerprint {
            user: u,
            fingerprint,
        },
        None => failed(format!("unknown user {u}: no key is pinned for that name")),
    }
}

/// Per control client.
#[derive(Default)]
pub struct Ctl {
    /// A `tail` still sending history, page by page as the client reads.
    pub cursor: Option<Cursor>,
    /// A `tail -f` whose history is sent: new records as they come.
    pub follow: Option<Follow>,
    /// Requests of this client run (or answered) this turn: if the turn fails to commit, each
    /// gets the storage error, and the client is closed.
    pub asked: u32,
    /// Answers queued for this client this turn (for this turn's requests or earlier ones):
    /// a failed commit takes them back.
    pub answered: u32,
    /// Frames of a streamed answer (`who`) not queued yet: they go out as the client reads, like
    /// a `tail`, so a long directory never fills the write buffer past its cap.
    pub stream: std::collections::VecDeque<CtlResponse>,
    /// A directory listing: the next page is fetched once `stream` is sent.
    pub list: Option<Listing>,
    /// When (mono ms) the client connected or sent its last request: `control_idle_timeout`
    /// counts from here.
    pub active_at: u64,
    /// Requests that came while an earlier one of this client is not answered yet (a `send
    /// --wait`, a send parked on a key lookup or being sealed, a `who` or history page still
    /// being sent): answers go out in the order the requests came, so a client may pipeline.
    /// The client is not read while any are queued, and at most [`MAX_QUEUED`] are kept.
    pub queued: std::collections::VecDeque<Vec<u8>>,
}

/// Requests a control client may have queued behind one not answered yet. `chatctl send`
/// pipelines at most 256; the bound is on the count because a read of empty frames would
/// otherwise make a 256 KiB read into 65,536 entries.
pub const MAX_QUEUED: usize = 1024;

impl Ctl {
    /// A `tail -f` only reads: whatever else its client sends is ignored.
    pub fn tailing(&self) -> bool {
        self.follow.is_some()
    }

    /// An answer is still being sent (history pages, a `who` stream, a listing): a request that
    /// comes meanwhile waits in [`Ctl::queued`].
    pub fn answering(&self) -> bool {
        self.paging() || self.list.is_some()
    }

    /// Something is waiting to be sent as the client reads (a tail's history, a stream, the
    /// next page of a listing that is not waiting for the relay).
    pub fn paging(&self) -> bool {
        self.cursor.is_some()
            || !self.stream.is_empty()
            || self.list.as_ref().is_some_and(|l| !l.in_flight)
    }

    /// The listing wants its next page now: what was queued of it is sent, and the relay was
    /// not asked already.
    pub fn wants_page(&self) -> bool {
        self.stream.is_empty() && self.list.as_ref().is_some_and(|l| !l.in_flight)
    }
}

/// Where a `tail` is in the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    after: u64,
    filter: Filter,
    follow: bool,
}

/// Where a client's history output goes, and whether it has room for more.
pub trait Sink {
    /// The client can take another record now.
    fn room(&self) -> bool;
    /// Queue one reply.
    fn emit(&mut self, resp: &CtlResponse);
}

/// What a [`Cursor::page`] left of the tail.
#[derive(Debug, PartialEq, Eq)]
pub enum Paged {
    /// More history to send once the client has read some.
    More,
    /// History sent; follow new records from here.
    Follow(Follow),
    /// Finished: `End` (or an error) was sent.
    Done,
}

impl Cursor {
    /// Send history, record by record, while the sink has room (so a long history costs
    /// bounded memory, and a client that reads is never cut off as slow).
    pub fn page(&mut self, store: &Store, sink: &mut dyn Sink) -> Paged {
        while sink.room() {
            let page = match store.page(self.after, &self.filter, PAGE) {
                Ok(p) => p,
                Err(err) => {
                    sink.emit(&failed(format!("cannot read history: {err}")));
                    return Paged::Done;
                }
            };
            if page.is_empty() {
                // No record can be appended between this read and the switch to following:
                // the loop is single-threaded. So a follower misses nothing and sees nothing
                // twice.
                if self.follow {
                    return Paged::Follow(Follow {
                        filter: self.filter.clone(),
                        last_seq: self.after,
                    });
                }
                sink.emit(&CtlResponse::End);
                return Paged::Done;
            }
            for r in page {
                if !sink.room() {
                    return Paged::More;
                }
                self.after = r.seq;
                sink.emit(&CtlResponse::Record(r));
            }
        }
        Paged::More
    }
}

/// A `tail -f` after its history.
#[derive(Debug, PartialEq, Eq)]
pub struct Follow {
    filter: Filter,
    last_seq: u64,
}

impl Follow {
    /// Whether this follower gets `rec` (new, and with the peer it asked for); if so, it counts
    /// as seen.
    pub fn take(&mut self, rec: &Record) -> bool {
        if rec.seq <= self.last_seq {
            return false;
        }
        if !self.filter.matches(rec) {
            return false;
        }
        self.last_seq = rec.seq;
        true
    }
}

/// What a `send --wait` waits for.
#[derive(Debug)]
pub struct Pending {
    sent: Vec<Sent>,
    target: MsgState,
    deadline: u64,
    timeout_ms: u64,
}

impl Pending {
    fn done(&self) -> Option<CtlResponse> {
        if let Some(f) = self.sent.iter().find(|s| s.state == MsgState::Failed) {
            return Some(failed(format!(
                "the relay refused the message to {} (id {})",
                f.to,
                hex(&f.id)
            )));
        }
        self.sent
            .iter()
            .all(|s| s.state >= self.target)
            .then(|| CtlResponse::Sent(self.sent.clone()))
    }
}

struct Waiter {
    token: Token,
    pending: Pending,
    /// Added this turn: dropped if the turn fails to commit (its client hears why).
    fresh: bool,
}

/// What chatd knows about messages a `--wait` gave up on, and nothing more: the furthest-behind
/// state decides (it is what the user must not send again for).
fn where_it_is(sent: &[Sent]) -> &'static str {
    match sent.iter().map(|s| s.state).min() {
        Some(MsgState::Queued) | None => {
            "the relay has not taken the message yet: chatd keeps it in its outbox and offers it \
             again at every login (do not send it again)"
        }
        Some(MsgState::Relayed) => {
            "the relay has the message, but no receipt came back: chatd cannot tell whether it \
             will be delivered; a receipt or a failure that comes later shows in chatctl tail \
             (do not send it again)"
        }
        Some(MsgState::Delivered) | Some(MsgState::Failed) => "see chatctl tail for each message",
    }
}

/// A request parked on a key lookup, and its client.
struct ParkedFor {
    token: Token,
    parked: Parked,
    fresh: bool,
}

/// Every `send --wait` in progress, every send parked on a key lookup, and every send still
/// being sealed.
#[derive(Default)]
pub struct Waiters {
    waiting: Vec<Waiter>,
    parked: Vec<ParkedFor>,
    /// The member heard back from the relay since the parked requests were last tried.
    looked: bool,
    /// Sends still being sealed, turn by turn: the client is answered when they are queued.
    sealing: Vec<Sealing>,
}

/// A client whose send is being sealed (`member::Started::Sealing`).
struct Sealing {
    token: Token,
    job: u64,
    wait: Wait,
    /// When its `--wait` ends (mono ms), counted from the request.
    deadline: u64,
    timeout_ms: u64,
    fresh: bool,
}

impl Waiters {
    /// Client `token`'s request waits for the relay's answer to a lookup.
    pub fn park(&mut self, token: Token, parked: Parked) {
        self.parked.push(ParkedFor {
            token,
            parked,
            fresh: true,
        });
    }

    /// The member heard back from the relay (or lost it): parked requests can be tried again.
    pub fn looked(&mut self) {
        self.looked = true;
    }

    /// The member heard back and the parked requests were not tried since.
    pub fn has_looked(&self) -> bool {
        self.looked
    }

    /// If the member heard back since the last call: the parked requests to try again now
    /// (maybe none).
    pub fn take_parked(&mut self) -> Option<Vec<(Token, CtlRequest, u64)>> {
        if !std::mem::take(&mut self.looked) {
            return None;
        }
        Some(
            std::mem::take(&mut self.parked)
                .into_iter()
                .map(|p| (p.token, p.parked.req, p.parked.deadline))
                .collect(),
        )
    }

    /// Park again a request that still waits, with its first deadline.
    pub fn repark(&mut self, token: Token, mut parked: Parked, deadline: u64) {
        parked.deadline = deadline;
        self.park(token, parked);
    }

    /// Client `token` waits for `pending`.
    pub fn add(&mut self, token: Token, pending: Pending) {
        self.waiting.push(Waiter {
            token,
            pending,
            fresh: true,
        });
    }

    /// Client `token` waits for send `job` to be sealed (then, with `wait`, for its states).
    pub fn sealing(&mut self, token: Token, job: u64, wait: Wait, timeout_ms: u64, now: Now) {
        self.sealing.push(Sealing {
            token,
            job,
            wait,
            deadline: now.mono.saturating_add(timeout_ms),
            timeout_ms,
            fresh: true,
        });
    }

    /// Send `job` is queued (or failed): the reply for its client now, or (with `--wait`) a
    /// waiter for its states.
    pub fn sealed(
        &mut self,
        job: u64,
        result: Result<Vec<Sent>, MemberError>,
    ) -> Option<(Token, CtlResponse)> {
        let pos = self.sealing.iter().position(|s| s.job == job)?;
        let s = self.sealing.remove(pos);
        let target = match (result, s.wait) {
            (Err(e), _) => return Some((s.token, send_error(e))),
            (Ok(sent), Wait::None) => return Some((s.token, CtlResponse::Sent(sent))),
            (Ok(sent), Wait::Relay) => (sent, MsgState::Relayed),
            (Ok(sent), Wait::Delivered) => (sent, MsgState::Delivered),
        };
        self.waiting.push(Waiter {
            token: s.token,
            pending: Pending {
                sent: target.0,
                target: target.1,
                deadline: s.deadline,
                timeout_ms: s.timeout_ms,
            },
            fresh: s.fresh,
        });
        None
    }

    /// The member dropped every send being sealed (after a failed commit): their clients.
    pub fn drop_sealing(&mut self) -> Vec<Token> {
        self.sealing.drain(..).map(|s| s.token).collect()
    }

    /// A turn begins: the waiters from earlier turns are durable.
    pub fn begin_turn(&mut self) {
        for w in &mut self.waiting {
            w.fresh = false;
        }
        for p in &mut self.parked {
            p.fresh = false;
        }
        for s in &mut self.sealing {
            s.fresh = false;
        }
    }

    /// The turn's commit failed: its waiters go (their clients get the storage error).
    pub fn fail_turn(&mut self) {
        self.waiting.retain(|w| !w.fresh);
        self.parked.retain(|p| !p.fresh);
        self.sealing.retain(|s| !s.fresh);
    }

    /// Whether client `token` waits for a `send --wait`, or for its send to be sealed.
    pub fn has(&self, token: Token) -> bool {
        self.waiting.iter().any(|w| w.token == token)
            || self.parked.iter().any(|p| p.token == token)
            || self.sealing.iter().any(|s| s.token == token)
    }

    /// Client `token` is gone (a send being sealed for it is queued all the same).
    pub fn forget(&mut self, token: Token) {
        self.waiting.retain(|w| w.token != token);
        self.parked.retain(|p| p.token != token);
        self.sealing.retain(|s| s.token != token);
    }

    /// A sent message changed state: the replies for the waiters that are now done.
    pub fn advance(
        &mut self,
        id: [u8; 16],
        state: MsgState,
        why: Option<&str>,
    ) -> Vec<(Token, CtlResponse)> {
        let mut replies = Vec::new();
        self.waiting.retain_mut(|w| {
            let mut touched = false;
            for s in w.pending.sent.iter_mut().filter(|s| s.id == id) {
                if state > s.state {
                    s.state = state;
                    touched = true;
                }
            }
            if !touched {
                return true;
            }
            let Some(mut resp) = w.pending.done() else {
                return true;
            };
            if let (CtlResponse::Error { message, .. }, Some(why)) = (&mut resp, why) {
                message.push_str(": ");
                message.push_str(why);
            }
            replies.push((w.token, resp));
            false
        });
        replies
    }

    /// The earliest `--wait` deadline (monotonic ms), if anyone waits.
    pub fn next_deadline(&self) -> Option<u64> {
        let parked = self.parked.iter().map(|p| p.parked.deadline);
        self.waiting
            .iter()
            .map(|w| w.pending.deadline)
            .chain(parked)
            .min()
    }

    /// The replies for the waiters whose time is up at `now`.
    pub fn expire(&mut self, now: Now) -> Vec<(Token, CtlResponse)> {
        let mut replies = Vec::new();
        self.parked.retain(|p| {
            if now.mono < p.parked.deadline {
                return true;
            }
            replies.push((
                p.token,
                failed(format!(
                    "the relay did not answer the key lookup of {} within {} s; nothing was sent",
                    p.parked.users.join(", "),
                    LOOKUP_TIMEOUT_MS / 1000
                )),
            ));
            false
        });
        let mut i = 0;
        while i < self.waiting.len() {
            if now.mono >= self.waiting[i].pending.deadline {
                let w = self.waiting.remove(i);
                let want = w.pending.target.as_str();
                let resp = CtlResponse::Error {
                    kind: ErrorKind::Timeout,
                    message: format!(
                        "timed out after {} s waiting for {want}; {}",
                        w.pending.timeout_ms / 1000,
                        where_it_is(&w.pending.sent)
                    ),
                    sent: w.pending.sent,
                };
                replies.push((w.token, resp));
            } else {
                i += 1;
            }
        }
        replies
    }
}

#[cfg(test)]
mod tests;
