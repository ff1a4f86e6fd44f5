//! The relay role as a sans-I/O state machine: registrations (name-to-key bindings), presence,
//! routing and per-user queues.
//!
//! The daemon feeds it connection events and frame payloads with the current time (a monotonic
//! clock in milliseconds: the relay stamps nothing, so it never needs the wall clock); it answers
//! with [`Out`] actions (messages to send, connections to close) and writes through the
//! [`RelayStore`]. Must never: touch a socket, read a message body (it only ever sees envelopes),
//! or acknowledge an item before it is durable: `Accepted` goes out when the recipient has
//! acknowledged the item, or as [`Out::AfterCommit`] once the relay's write of it commits.
//! Everything else may leave before the turn commits: it promises nothing about the store.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::sync::Arc;

use log::{info, warn};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use crate::crypto::{login_transcript, PublicKey};
use crate::idhash::{IdMap, IdSet};
use crate::proto::control::{PeerView, TrustState};
use crate::proto::frame::MAX_FRAME;
use crate::proto::relay::{ErrorCode, FromRelay, ItemKey, Kind, Peer, RefuseCode, Routed, ToRelay};
use crate::proto::{from_payload, to_payload, valid_user, DELIVER_PREFIX, SEND_PREFIX};
use crate::store::{RelayStore, StoreError};

mod error;
mod queue;
pub use error::RelayError;
use queue::{Unsynced, UserQueue};

/// Deliveries a member may have unacknowledged at once. Bounds the relay's write buffer per
/// member (a long queue is drained in windows, not dumped at login) and so keeps a member with a
/// long backlog from being cut off as a slow reader.
pub const DELIVERY_WINDOW: usize = 128;

/// Directory entries per frame: 512 entries with 8192-bit keys (about 1.1 KB each) stay well
/// under the 1 MiB frame cap, and a member refuses longer lists.
pub use crate::proto::DIRECTORY_CHUNK;

/// Identifies one connection to the relay (the daemon's token, or the host's in-process member).
/// A newtype so a count, a sequence number or a token cannot be passed for it by mistake; the
/// daemon maps its tokens to these in one place (`daemon::table`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

// Core tests number their connections with plain literals.
#[cfg(test)]
impl From<u64> for ConnId {
    fn from(n: u64) -> ConnId {
        ConnId(n)
    }
}

/// Bounds the relay enforces itself (the daemon enforces connection counts and buffer sizes).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Items queued per user before new items for them are refused.
    pub max_queue: usize,
    /// Encoded bytes queued per user before new items for them are refused.
    pub max_queue_bytes: usize,
    /// A connection must log in within this long.
    pub handshake_timeout_ms: u64,
    /// A logged-in connection that sends nothing for this long is closed.
    pub idle_timeout_ms: u64,
    /// Encoded bytes delivered to one member and not yet acknowledged (at least one item is
    /// always allowed). The daemon sets it to half its write-buffer cap, so a member that reads
    /// is never cut off as a slow reader because of its own backlog.
    pub window_bytes: usize,
    /// Names one key may hold. Bounds what one keyholder can take from everyone (a name is
    /// first come, first served).
    pub max_names_per_key: usize,
    /// New names the relay binds in any 60 s, from everyone together.
    pub new_names_per_minute: usize,
    /// While the relay holds at most this many names it behaves as a room: `Welcome` carries
    /// the whole directory and every join and leave goes to everyone. Above it, a member learns
    /// keys by `Lookup` and hears the presence of the names it looked up only, so a login costs
    /// the relay the same whatever its size.
    pub directory_push_max: usize,
    /// Names one connection may follow (`Lookup` subscribes it to each name found). Bounds what
    /// one join or leave fans out to, and the relay's memory per connection.
    pub max_subscriptions: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_queue: 10_000,
            // 64 MiB: a thousand of the largest messages a member sends (64 KiB of text each),
            // or 64 frames at the 1 MiB cap, per user; the relay's disk is what it protects.
            max_queue_bytes: 64 << 20,
            handshake_timeout_ms: 10_000,
            idle_timeout_ms: 120_000,
            window_bytes: 8 << 20,
            max_names_per_key: 8,
            new_names_per_minute: 600,
            directory_push_max: DEFAULT_DIRECTORY_PUSH_MAX,
            max_subscriptions: DEFAULT_MAX_SUBSCRIPTIONS,
        }
    }
}

/// The default of `directory_push_max`: a room of a few hundred people still sees everyone.
pub const DEFAULT_DIRECTORY_PUSH_MAX: usize = 256;

/// The default of `max_subscriptions`: contacts one member hears joins and leaves of.
pub const DEFAULT_MAX_SUBSCRIPTIONS: usize = 1000;

/// Directory entries the relay puts in one `Listing` (with 2048-bit keys about 80 KB), and in one
/// page of a relay's own `who`.
pub const LIST_PAGE: usize = 256;

/// How long the relay keeps a routed item in memory only, waiting for its recipient's `Ack`,
/// before it writes it to the store. An item acknowledged within it never touches the disk (the
/// insert and the delete cancel); one that is not is written, and its sender hears `Accepted`
/// once that write commits, unless its recipient is online then ([`HOLD_ONLINE_MS`]).
pub const SYNC_DELAY_MS: u64 = 10;

/// How long, from its arrival, an item whose recipient is online at [`SYNC_DELAY_MS`] stays in
/// memory only, waiting for the `Ack`, before it is written. Under a burst, items queue behind
/// the recipient's delivery window and an online recipient that stores and acknowledges as fast
/// as it can acks them later than `SYNC_DELAY_MS` after they came: writing each of them then
/// would cost an insert, a delete and their commits for items acknowledged moments later (most
/// of the relay's CPU end to end). [`MAX_UNSYNCED_BYTES`] still bounds what waits in memory, and
/// a recipient who goes offline has what is held for them written at the next sync.
pub const HOLD_ONLINE_MS: u64 = 1_000;

/// Bytes of one recipient's items held in memory past [`SYNC_DELAY_MS`], at most: a recipient
/// that stays online and never acknowledges (stuck, or hostile) has what goes beyond it written
/// at `SYNC_DELAY_MS` as if it were offline, and cannot fill [`MAX_UNSYNCED_BYTES`] alone, which
/// would make every turn write everyone's items.
pub const HOLD_QUEUE_BYTES: usize = 1 << 20;

/// Bytes of routed items the relay keeps in memory only, at most: past it, everything pending
/// is written at the end of the turn, whatever its age.
pub const MAX_UNSYNCED_BYTES: usize = 8 << 20;

/// What the daemon must do for the relay.
#[derive(Debug, PartialEq)]
pub enum Out {
    /// Send a message on a connection; it may leave before the turn commits (it promises
    /// nothing about the store: a forwarded item, presence, answers).
    Send(ConnId, FromRelay),
    /// Deliver a routed item: its encoding as it came (the daemon frames it as
    /// `{"Deliver": item}` without decoding or encoding it). Like `Send`, it may leave before the
    /// turn commits.
    Deliver(ConnId, Arc<[u8]>),
    /// Send a message on a connection only once the turn's transaction has committed: an
    /// `Accepted` for an item this turn wrote to the store. If the commit fails, drop it.
    AfterCommit(ConnId, FromRelay),
    /// Close a connection once what is queued for it has been written.
    Close(ConnId),
}

enum State {
    /// Challenge sent; the only acceptable frame is `Login`. `channel` is the TLS exporter value
    /// of the connection the login must be signed for (empty on a host's in-process link).
    ExpectLogin { nonce: [u8; 32], channel: Vec<u8> },
    /// Logged in as `user`.
    /// (An `Rc`: every frame takes a copy of the name out of the connection's borrow, and a
    /// count is cheaper than an allocation.)
    Established { user: Rc<str> },
    /// An error was sent; everything else is ignored until the daemon closes it.
    Closing,
}

/// One entry of [`Relay`]'s arrival order.
struct Arrival {
    seq: u64,
    at: u64,
    /// When a held arrival is due to be written (unused before it is held).
    due: u64,
    to: String,
    key: ItemKey,
}

struct Conn {
    state: State,
    since: u64,
    last_seen: u64,
    /// The names this connection follows (it looked them up), for presence.
    subs: HashSet<String>,
}

fn name_of(msg: &ToRelay) -> &'static str {
    match msg {
        ToRelay::Login { .. } => "Login",
        ToRelay::Send(_) => "Send",
        ToRelay::Ack(_) => "Ack",
        ToRelay::Ping => "Ping",
        ToRelay::Lookup(_) => "Lookup",
        ToRelay::List { .. } => "List",
    }
}

/// The relay's state.
pub struct Relay {
    conns: IdMap<ConnId, Conn>,
    bindings: BTreeMap<String, PublicKey>,
    online: HashMap<String, ConnId>,
    queues: HashMap<String, UserQueue>,
    out: VecDeque<Out>,
    limits: Limits,
    /// Challenge nonces come from here: seeded from the OS, or from a fixed seed in a test so a
    /// run repeats exactly.
    rng: StdRng,
    /// How many names each key (SPKI DER) holds.
    names_per_key: HashMap<Vec<u8>, usize>,
    /// When each new name of the last [`REGISTRATION_WINDOW_MS`] was bound (monotonic ms).
    recent_binds: VecDeque<u64>,
    /// Who follows each name (connections that looked it up), for presence on a large relay.
    watchers: HashMap<String, IdSet<ConnId>>,
    /// How many routed items are in memory only (each in its queue's `unsynced`; see
    /// [`SYNC_DELAY_MS`]).
    unsynced: usize,
    /// Their encoded sizes, summed.
    unsynced_bytes: usize,
    /// The next [`Unsynced::seq`].
    next_seq: u64,
    /// The `seq` of every item in memory only, whichever queue holds it: an arrival is live
    /// while its `seq` is here. Seqs are the relay's own numbers, so this is an [`IdSet`]; the
    /// checks of `arrivals` and `held` (several per message) no longer hash a name and a key.
    live: IdSet<u64>,
    /// Every item put in `unsynced`, in arrival order, with its `seq` and `at`: `sync` and
    /// `next_deadline` look at the front only, not at every item held (thousands under load,
    /// every turn). An item acknowledged or forgotten since stays here until it reaches the
    /// front and is dropped there (its `seq` no longer matches), at the next `sync` once it is at
    /// the front.
    arrivals: VecDeque<Arrival>,
    /// The arrivals held past their `SYNC_DELAY_MS` (their recipient was online then, or an
    /// earlier item of theirs was held), in arrival order, each with the time it is `due`:
    /// [`HOLD_ONLINE_MS`] after it came, or its queue's `hold_until`. Both are at most
    /// `HOLD_ONLINE_MS` after it came; one due before the front waits for the front.
    held: VecDeque<Arrival>,
    /// Recipients who went offline since the last `sync`: it writes what is in memory for them
    /// (no `Ack` can come for it now; one the recipient wrote before its connection reset is
    /// lost with it), so their senders hear `Accepted` after that turn's commit, not after
    /// [`HOLD_ONLINE_MS`], and ends their queue's hold, which has nothing left to order.
    left: Vec<String>,
    /// No timer of any connection is due before this (monotonic ms): a lower bound, exact after
    /// each [`Relay::tick`], lowered by new connections and logins in between (activity only
    /// moves deadlines later), so the loop need not walk every connection each turn.
    earliest: Option<u64>,
    /// Joins and leaves of this turn not sent yet, the latest state of each name: they go out
    /// when the turn's output is drained, so a name that toggles in one turn costs its followers
    /// one frame, and a mass disconnect costs each follower one frame per name it follows.
    presence: BTreeMap<String, bool>,
}

/// The window `new_names_per_minute` counts over.
const REGISTRATION_WINDOW_MS: u64 = 60_000;

impl Relay {
    /// Load bindings and queues from the store.
    pub fn load(store: &dyn RelayStore, limits: Limits) -> Result<Relay, StoreError> {
        let mut bindings = BTreeMap::new();
        for (user, der) in store.bindings()? {
            match PublicKey::from_der(&der) {
                Ok(k) => {
                    bindings.insert(user, k);
                }
                Err(e) => warn!("ignoring stored binding for {user}: {e}"),
            }
        }
        let mut names_per_key: HashMap<Vec<u8>, usize> = HashMap::new();
        for key in bindings.values() {
            *names_per_key.entry(key.der().to_vec()).or_default() += 1;
        }
        let mut queues: HashMap<String, UserQueue> = HashMap::new();
        for q in store.queued_sizes()? {
            queues.entry(q.0).or_default().push(q.1, q.2);
        }
        Ok(Relay {
            conns: IdMap::default(),
            bindings,
            online: HashMap::new(),
            queues,
            out: VecDeque::new(),
            limits,
            rng: StdRng::from_entropy(),
            names_per_key,
            recent_binds: VecDeque::new(),
            watchers: HashMap::new(),
            presence: BTreeMap::new(),
            earliest: None,
            unsynced: 0,
            unsynced_bytes: 0,
            next_seq: 0,
            live: IdSet::default(),
            arrivals: VecDeque::new(),
            held: VecDeque::new(),
            left: Vec::new(),
        })
    }

    /// Draw challenge nonces from a fixed seed from now on (deterministic tests only: the
    /// nonces become predictable).
    #[cfg(test)]
    pub(crate) fn seed_rng(&mut self, seed: u64) {
        self.rng = StdRng::seed_from_u64(seed);
    }

    /// The next instant (monotonic ms, the clock [`Relay::tick`] is given) at which the relay
    /// has something to do: a timer of [`Relay::tick_deadline`], or an item held in memory due
    /// for [`Relay::sync`]; the daemon sleeps until then instead of waking on a fixed tick.
    pub fn next_deadline(&self) -> Option<u64> {
        // The oldest arrival is the earliest: `at` never decreases along the queue. If it was
        // acknowledged out of order (acks in order drop it at once), the wake comes early once
        // and `sync` drops it.
        let sync = self
            .arrivals
            .front()
            .map(|a| a.at.saturating_add(SYNC_DELAY_MS));
        let held = self.held.front().map(|a| a.due);
        [self.earliest, sync, held].into_iter().flatten().min()
    }

    /// When [`Relay::tick`] has something to do (its connection timers): not the writes of
    /// [`Relay::sync`], which the daemon runs every turn anyway. `tick` walks every connection,
    /// so an early wake for an acknowledged arrival must not run it.
    pub fn tick_deadline(&self) -> Option<u64> {
        self.earliest
    }

    /// Drop arrivals at the front whose item left memory (acknowledged, forgotten): with acks
    /// in order, the front stays a live item, and `next_deadline` a real one.
    fn drop_stale_arrivals(&mut self) {
        while let Some(a) = self.arrivals.front() {
            if self.arrival_is_live(a) {
                break;
            }
            self.arrivals.pop_front();
        }
        while let Some(a) = self.held.front() {
            if self.arrival_is_live(a) {
                break;
            }
            self.held.pop_front();
        }
    }

    /// Before the turn commits: write to the store the items that waited [`SYNC_DELAY_MS`] in
    /// memory without an `Ack` and whose recipient is not online, and those that waited
    /// [`HOLD_ONLINE_MS`] (all of them past [`MAX_UNSYNCED_BYTES`], or with `all`: a harness
    /// that commits in batches, or a shutdown); their senders get `Accepted` after the commit
    /// ([`Out::AfterCommit`]).
    pub fn sync(&mut self, now: u64, store: &mut dyn RelayStore, all: bool) {
        if self.unsynced == 0 {
            self.arrivals.clear();
            self.held.clear();
            self.release_left();
            return;
        }
        let all = all || self.unsynced_bytes > MAX_UNSYNCED_BYTES;
        if all {
            // Everything is written below: what matters of a leaver is only that their later
            // items are not held behind a hold that has nothing left to order.
            self.release_left();
        } else {
            self.write_left(now, store);
        }
        // Stale entries (acknowledged, forgotten) go first whatever their time, so a live front
        // is what `next_deadline` wakes for. Held items are older than any arrival still
        // waiting and go first, in arrival order, so the store's order (the queue's after a
        // restart) stays the order items came in.
        self.drop_stale_arrivals();
        while let Some(front) = self.held.front() {
            if !all && now < front.due {
                break;
            }
            let Some(Arrival { seq, to, key, .. }) = self.held.pop_front() else {
                break;
            };
            self.write_unsynced(seq, &to, key, store);
            self.drop_stale_arrivals();
        }
        while let Some(front) = self.arrivals.front() {
            if !all && now.saturating_sub(front.at) < SYNC_DELAY_MS {
                break;
            }
            let Some(mut a) = self.arrivals.pop_front() else {
                break;
            };
            // Acknowledged or forgotten since (or sent again later, as a new arrival).
            if !self.arrival_is_live(&a) {
                continue;
            }
            if !all {
                if let Some(q) = self.queues.get_mut(&a.to) {
                    // Held for an online recipient that keeps up, or behind an earlier item of
                    // the same queue that is held (written after it, never before).
                    let online =
                        self.online.contains_key(&a.to) && q.unsynced_bytes <= HOLD_QUEUE_BYTES;
                    if online {
                        q.hold_until = q.hold_until.max(a.at.saturating_add(HOLD_ONLINE_MS));
                    }
                    if online || now < q.hold_until {
                        a.due = if online {
                            a.at.saturating_add(HOLD_ONLINE_MS)
                        } else {
                            q.hold_until
                        };
                        self.held.push_back(a);
                        continue;
                    }
                }
            }
            self.write_unsynced(a.seq, &a.to, a.key, store);
        }
    }

    /// Write what is held for recipients who went offline (and are still offline), each one's
    /// in arrival order, and hold nothing of theirs any more: their items still within
    /// [`SYNC_DELAY_MS`], and later ones, are written at it, as any offline recipient's are.
    /// Only in a turn after such a recipient left, and from their own queue (their k items
    /// sorted, not a pass over everyone's held items), so a client that logs in and out every
    /// turn cannot make each turn scan them all.
    fn write_left(&mut self, now: u64, store: &mut dyn RelayStore) {
        if self.left.is_empty() {
            return;
        }
        for user in self.release_left() {
            let Some(q) = self.queues.get(&user) else {
                continue;
            };
            let mut due: Vec<(u64, ItemKey)> = q
                .unsynced
                .iter()
                .filter(|(_, u)| now.saturating_sub(u.at) >= SYNC_DELAY_MS)
                .map(|(key, u)| (u.seq, *key))
                .collect();
            // Everything of theirs already written came before all of these, and what is left
            // after them came later (a later item is never written before a held one), so
            // arrival order here is the queue's order.
            due.sort_unstable_by_key(|&(seq, _)| seq);
            for (seq, key) in due {
                self.write_unsynced(seq, &user, key, store);
            }
        }
        // Their entries in `held` and `arrivals` are stale now: the ones in front go.
        self.drop_stale_arrivals();
    }

    /// Empty `left`: each of them still offline holds nothing back any more (their queue's
    /// hold, which only keeps a later item behind a held one, ends), and is returned, once
    /// each. One back already, or replaced by a newer login, keeps the hold: they can still
    /// `Ack`.
    fn release_left(&mut self) -> Vec<String> {
        let mut gone = std::mem::take(&mut self.left);
        gone.sort_unstable();
        gone.dedup();
        gone.retain(|user| {
            if self.online.contains_key(user) {
                return false;
            }
            if let Some(q) = self.queues.get_mut(user) {
                q.hold_until = 0;
            }
            true
        });
        gone
    }

    /// Write `to`'s item `key` of arrival `seq` to the store, if it is still that arrival's
    /// and in memory only: `Accepted` for its senders after the commit, or, if it cannot be
    /// written, out of the queue and `Refused` (it may have been delivered; the recipient drops
    /// the copy the sender sends again).
    fn write_unsynced(&mut self, seq: u64, to: &str, key: ItemKey, store: &mut dyn RelayStore) {
        // Acknowledged or forgotten since (or sent again later, as a new arrival).
        if !self.is_live(seq) {
            return;
        }
        let Some(u) = self.take_unsynced(to, key) else {
            return;
        };
        match store.enqueue(to, key, &u.bytes).map_err(|e| e.to_string()) {
            Ok(()) => {
                for s in u.senders {
                    self.out
                        .push_back(Out::AfterCommit(s, FromRelay::Accepted(key)));
                }
            }
            Err(e) => {
                warn!("cannot queue item for {to}: {e}");
                if let Some(q) = self.queues.get_mut(to) {
                    q.remove(key);
                }
                for s in u.senders {
                    self.out.push_back(Out::Send(
                        s,
                        FromRelay::Refused {
                            key,
                            code: RefuseCode::Storage,
                            reason: format!("relay storage failed: {e}"),
                        },
                    ));
                }
            }
        }
    }

    /// Whether the item of arrival `seq` is still in memory only: not acknowledged, written
    /// or forgotten since. A seq is never given out twice, so this is exactly "its queue still
    /// holds, under its key, the item that came with this seq".
    fn is_live(&self, seq: u64) -> bool {
        debug_assert_eq!(self.live.len(), self.unsynced);
        self.live.contains(&seq)
    }

    /// [`Relay::is_live`] for an arrival; a debug build checks it against the definition, the
    /// queue's own record of the item.
    fn arrival_is_live(&self, a: &Arrival) -> bool {
        let live = self.is_live(a.seq);
        debug_assert_eq!(
            live,
            self.queues
                .get(&a.to)
                .and_then(|q| q.unsynced.get(&a.key))
                .is_some_and(|u| u.seq == a.seq)
        );
        live
    }

    /// Take `to`'s item `key` out of memory (it is written, acknowledged or dropped now).
    fn take_unsynced(&mut self, to: &str, key: ItemKey) -> Option<Unsynced> {
        let q = self.queues.get_mut(to)?;
        let u = q.unsynced.remove(&key)?;
        q.unsynced_bytes = q.unsynced_bytes.saturating_sub(u.size);
        self.unsynced -= 1;
        self.unsynced_bytes = self.unsynced_bytes.saturating_sub(u.size);
        self.live.remove(&u.seq);
        Some(u)
    }

    /// Lower the earliest deadline to `at` if it is earlier.
    fn due_by(&mut self, at: u64) {
        self.earliest = Some(self.earliest.map_or(at, |e| e.min(at)));
    }

    /// The earliest deadline of any connection, walking them all (after a tick).
    fn compute_deadline(&self) -> Option<u64> {
        self.conns
            .values()
            .filter_map(|c| match c.state {
                // Saturating all the way: a timeout of "forever" (u64::MAX ms) must give a deadline
                // that never comes, not one that wrapped into the past and spins the loop.
                State::ExpectLogin { .. } => Some(
                    c.since
                        .saturating_add(self.limits.handshake_timeout_ms)
                        .saturating_add(1),
                ),
                State::Established { .. } => Some(
                    c.last_seen
                        .saturating_add(self.limits.idle_timeout_ms)
                        .saturating_add(1),
                ),
                State::Closing => None,
            })
            .min()
    }

    /// Replace the limits (config reload).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
        self.earliest = self.compute_deadline();
    }

    /// The next action for the daemon. The turn's joins and leaves go out once everything else
    /// of the turn is taken (coalesced per name).
    pub fn poll(&mut self) -> Option<Out> {
        if self.out.is_empty() {
            self.flush_presence();
        }
        self.out.pop_front()
    }

    /// Whether actions wait for [`Self::poll`]: the daemon must not sleep on them (a host's link
    /// is attached before the loop's first turn).
    pub fn has_output(&self) -> bool {
        !self.out.is_empty() || !self.presence.is_empty()
    }

    /// A small relay behaves as a room (see [`Limits::directory_push_max`]).
    fn is_room(&self) -> bool {
        self.bindings.len() <= self.limits.directory_push_max
    }

    /// Send every pending join and leave to those who hear it.
    fn flush_presence(&mut self) {
        let pending = std::mem::take(&mut self.presence);
        for (user, online) in pending {
            self.announce(&user, online);
        }
    }

    /// Send `user`'s pending join or leave now (before anything else of theirs, so a follower
    /// learns a new key before the first message under it).
    fn flush_presence_of(&mut self, user: &str) {
        if let Some(online) = self.presence.remove(user) {
            self.announce(user, online);
        }
    }

    /// Tell who hears it that `user` is `online`: everyone on a room-sized relay, the
    /// connections that follow `user` otherwise.
    fn announce(&mut self, user: &str, online: bool) {
        let Some(key) = self.bindings.get(user) else {
            return;
        };
        let p = Peer {
            user: user.to_string(),
            key: key.der().to_vec(),
            online,
        };
        if self.is_room() {
            for (name, id) in &self.online {
                if name != user {
                    self.out
                        .push_back(Out::Send(*id, FromRelay::Presence(p.clone())));
                }
            }
        } else if let Some(ids) = self.watchers.get(user) {
            // In id order, so a seeded run repeats (a set's order is random per process).
            let mut ids: Vec<ConnId> = ids.iter().copied().collect();
            ids.sort_unstable();
            for id in ids {
                let logged_in = self
                    .conns
                    .get(&id)
                    .is_some_and(|c| matches!(c.state, State::Established { .. }));
                if logged_in {
                    self.out
                        .push_back(Out::Send(id, FromRelay::Presence(p.clone())));
                }
            }
        }
    }

    /// A new connection: send it a challenge.
    pub fn connect(&mut self, id: ConnId, now: u64) {
        let mut nonce = [0u8; 32];
        self.rng.fill_bytes(&mut nonce);
        self.conns.insert(
            id,
            Conn {
                state: State::ExpectLogin {
                    nonce,
                    channel: Vec::new(),
                },
                since: now,
                last_seen: now,
                subs: HashSet::new(),
            },
        );
        self.due_by(
            now.saturating_add(self.limits.handshake_timeout_ms)
                .saturating_add(1),
        );
        self.out.push_back(Out::Send(
            id,
            FromRelay::Challenge {
                nonce,
                version: crate::VERSION.to_string(),
            },
        ));
    }

    /// The connection's TLS handshake completed: a login on it must sign `channel`, the
    /// exporter value the daemon took from the TLS session (PROTOCOL.md "Connecting"). The daemon
    /// hands over no frame of a connection before this.
    pub fn bind_channel(&mut self, id: ConnId, channel: Vec<u8>) {
        if let Some(Conn {
            state: State::ExpectLogin { channel: c, .. },
            ..
        }) = self.conns.get_mut(&id)
        {
            *c = channel;
        }
    }

    /// A connection went away (closed by the peer, cut off, or closed after `Out::Close`).
    pub fn disconnect(&mut self, id: ConnId) {
        let Some(conn) = self.conns.remove(&id) else {
            return;
        };
        self.unwatch(id, &conn.subs);
        if let State::Established { user } = conn.state {
            self.went_offline(id, &user, true);
        }
    }

    /// Connection `id`, which followed `subs`, follows nobody any more.
    fn unwatch(&mut self, id: ConnId, subs: &HashSet<String>) {
        for name in subs {
            if let Some(ids) = self.watchers.get_mut(name) {
                ids.remove(&id);
                if ids.is_empty() {
                    self.watchers.remove(name);
                }
            }
        }
    }

    /// `user`'s connection `id` is gone: take them offline and, if `announce`, tell everyone.
    fn went_offline(&mut self, id: ConnId, user: &str, announce: bool) {
        if self.online.get(user) != Some(&id) {
            return;
        }
        self.online.remove(user);
        if self.queues.contains_key(user) {
            self.left.push(user.to_string());
        }
        if !announce {
            return;
        }
        info!("{user} left");
        self.presence.insert(user.to_string(), false);
    }

    /// One frame payload from a connection.
    pub fn receive(&mut self, id: ConnId, payload: &[u8], now: u64, store: &mut dyn RelayStore) {
        // After our final Error a connection is only waiting to be closed: nothing it sends
        // counts, not even garbage (which would otherwise earn a second Error and Close).
        match self.conns.get(&id) {
            None => return,
            Some(c) if matches!(c.state, State::Closing) => return,
            Some(_) => {}
        }
        // Whole: the relay forwards what it routes as it came, so nothing may trail it.
        match ToRelay::decode(payload) {
            Ok(msg) => self.handle_sized(id, msg, Some(payload), now, store),
            Err(e) => self.fail(id, RelayError::Malformed(e.to_string())),
        }
    }

    /// One decoded message from a connection (the host's in-process member skips the codec).
    pub fn handle(&mut self, id: ConnId, msg: ToRelay, now: u64, store: &mut dyn RelayStore) {
        self.handle_sized(id, msg, None, now, store)
    }

    /// `handle`, with the frame's payload if it came as bytes (so a routed item is forwarded and
    /// stored as it came, not encoded again).
    fn handle_sized(
        &mut self,
        id: ConnId,
        msg: ToRelay,
        raw: Option<&[u8]>,
        now: u64,
        store: &mut dyn RelayStore,
    ) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        conn.last_seen = now;
        match &conn.state {
            State::Closing => {}
            State::ExpectLogin { nonce, channel } => {
                let (nonce, channel) = (*nonce, channel.clone());
                match msg {
                    ToRelay::Login {
                        user,
                        key,
                        signature,
                    } => {
                        if let Err(e) =
                            self.login(id, (nonce, &channel), user, &key, &signature, now, store)
                        {
                            self.fail(id, e);
                        }
                    }
                    other => self.fail(
                        id,
                        RelayError::Unexpected {
                            expected: "Login",
                            got: name_of(&other),
                        },
                    ),
                }
            }
            State::Established { user } => {
                let user = user.clone();
                match msg {
                    ToRelay::Send(item) => self.route(id, &user, item, raw, now, store),
                    ToRelay::Ack(key) => self.ack(&user, key, store),
                    ToRelay::Ping => self.out.push_back(Out::Send(id, FromRelay::Pong)),
                    ToRelay::Lookup(names) => self.lookup(id, names),
                    ToRelay::List { after, prefix } => {
                        let (peers, more) = self.page(&after, &prefix, LIST_PAGE);
                        self.out
                            .push_back(Out::Send(id, FromRelay::Listing { peers, more }));
                    }
                    ToRelay::Login { .. } => self.fail(
                        id,
                        RelayError::Unexpected {
                            expected: "Send, Ack, Ping, Lookup or List",
                            got: "Login",
                        },
                    ),
                }
            }
        }
    }

    /// Close connections that did not log in in time or went quiet.
    pub fn tick(&mut self, now: u64) {
        let mut late = Vec::new();
        for (id, c) in &self.conns {
            match c.state {
                State::ExpectLogin { .. }
                    if now.saturating_sub(c.since) > self.limits.handshake_timeout_ms =>
                {
                    late.push((*id, "handshake timeout: no login"))
                }
                State::Established { .. }
                    if now.saturating_sub(c.last_seen) > self.limits.idle_timeout_ms =>
                {
                    late.push((*id, "idle timeout"))
                }
                _ => {}
            }
        }
        // Map order is random per process; close in id order so a seeded run repeats.
        late.sort_unstable_by_key(|(id, _)| *id);
        for (id, why) in late {
            info!("connection {id}: {why}");
            self.close_with(id, ErrorCode::Timeout, why.to_string());
        }
        self.earliest = self.compute_deadline();
    }

    /// Drop a name's binding and queue so a new key may claim it. True if the name was bound.
    pub fn forget(&mut self, user: &str, store: &mut dyn RelayStore) -> Result<bool, StoreError> {
        if !self.bindings.contains_key(user) {
            return Ok(false);
        }
        let dropped = self.dropped_messages(user, store)?;
        let reason =
            format!("the relay operator forgot {user}; the message was dropped undelivered");
        for (sender, key) in &dropped {
            if !self.online.contains_key(sender) {
                store.add_notice(sender, *key, &reason)?;
            }
        }
        store.unbind(user)?;
        // Tell the senders online now; the others hear it at their next login.
        for (sender, key) in dropped {
            if let Some(id) = self.online.get(&sender).copied() {
                self.out.push_back(Out::Send(
                    id,
                    FromRelay::Refused {
                        key,
                        code: RefuseCode::Forgotten,
                        reason: reason.clone(),
                    },
                ));
            }
        }
        if let Some(id) = self.online.get(user).copied() {
            self.close_with(
                id,
                ErrorCode::Forgotten,
                format!("the relay operator forgot {user}"),
            );
            self.disconnect(id);
        }
        // The others hear that the name left while it still has a key to name.
        self.flush_presence_of(user);
        if let Some(key) = self.bindings.remove(user) {
            self.unbound(&key);
        }
        if let Some(q) = self.queues.remove(user) {
            self.unsynced -= q.unsynced.len();
            let bytes: usize = q.unsynced.values().map(|u| u.size).sum();
            self.unsynced_bytes = self.unsynced_bytes.saturating_sub(bytes);
            for u in q.unsynced.values() {
                self.live.remove(&u.seq);
            }
        }
        self.drop_stale_arrivals();
        info!("forgot {user}: binding and queue dropped");
        Ok(true)
    }

    /// The messages queued for `user`, with their senders: what a `forget` drops undelivered.
    /// Read one at a time (only the header is kept), so a long queue costs no more memory.
    fn dropped_messages(
        &self,
        user: &str,
        store: &dyn RelayStore,
    ) -> Result<Vec<(String, ItemKey)>, StoreError> {
        let Some(q) = self.queues.get(user) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (key, _) in q.items.iter().filter(|(k, _)| k.kind == Kind::Message) {
            // Held in memory only (not written yet), or read from the store.
            let bytes: Arc<[u8]> = match q.unsynced.get(key) {
                Some(u) => Arc::clone(&u.bytes),
                None => match store.queued_item(user, *key)? {
                    Some(b) => b.into(),
                    None => continue,
                },
            };
            if let Ok(item) = from_payload::<Routed>(&bytes) {
                if item.from() != user {
                    out.push((item.from().to_string(), *key));
                }
            }
        }
        Ok(out)
    }

    /// Registered names, for `who` on a relay: at most `max` that start with `prefix`, after
    /// `after` in name order, and whether more follow. A page at a time, so `who` on a relay of
    /// any size costs bounded memory.
    pub fn directory(&self, after: &str, prefix: &str, max: usize) -> (Vec<PeerView>, bool) {
        let (peers, more) = self.page(after, prefix, max);
        let views = peers
            .into_iter()
            .map(|p| PeerView {
                online: p.online,
                trust: TrustState::Bound,
                fingerprint: self
                    .bindings
                    .get(&p.user)
                    .map(|k| k.fingerprint().to_string())
                    .unwrap_or_default(),
                presented: None,
                user: p.user,
            })
            .collect();
        (views, more)
    }

    /// The fingerprint bound to `user`.
    pub fn bound(&self, user: &str) -> Option<crate::crypto::Fingerprint> {
        self.bindings.get(user).map(|k| k.fingerprint())
    }

    /// How many names are bound.
    pub fn bound_count(&self) -> usize {
        self.bindings.len()
    }

    /// At most `max` directory entries that start with `prefix`, after `after`; and whether
    /// more follow.
    fn page(&self, after: &str, prefix: &str, max: usize) -> (Vec<Peer>, bool) {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let start = if after.is_empty() || after < prefix {
            Included(prefix)
        } else {
            Excluded(after)
        };
        let mut it = self
            .bindings
            .range::<str, _>((start, Unbounded))
            .take_while(|(name, _)| name.starts_with(prefix));
        let peers: Vec<Peer> = it
            .by_ref()
            .take(max)
            .map(|(name, k)| Peer {
                user: name.clone(),
                key: k.der().to_vec(),
                online: self.online.contains_key(name),
            })
            .collect();
        let more = it.next().is_some();
        (peers, more)
    }

    /// Answer a `Lookup`, and follow each name found (up to `max_subscriptions`).
    fn lookup(&mut self, id: ConnId, names: Vec<String>) {
        let mut peers = Vec::new();
        let mut unknown = Vec::new();
        for name in names {
            // A join or leave still pending must not arrive after the answer it predates.
            self.flush_presence_of(&name);
            match self.bindings.get(&name) {
                Some(k) => {
                    peers.push(Peer {
                        user: name.clone(),
                        key: k.der().to_vec(),
                        online: self.online.contains_key(&name),
                    });
                    self.watch(id, name);
                }
                None => unknown.push(name),
            }
        }
        self.out
            .push_back(Out::Send(id, FromRelay::Keys { peers, unknown }));
    }

    /// Connection `id` follows `name` from now on, if it may follow one more.
    fn watch(&mut self, id: ConnId, name: String) {
        let max = self.limits.max_subscriptions;
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if c.subs.len() >= max || c.subs.contains(&name) {
            return;
        }
        c.subs.insert(name.clone());
        self.watchers.entry(name).or_default().insert(id);
    }

    /// How many names are online.
    pub fn online_count(&self) -> usize {
        self.online.len()
    }

    /// Routed items held in memory only (not written, not acknowledged).
    pub fn unsynced_count(&self) -> usize {
        self.unsynced
    }

    /// Total items queued, across users.
    pub fn queued_count(&self) -> usize {
        self.queues.values().map(|q| q.items.len()).sum()
    }

    /// Deliver `user`'s next queued items, up to the window, if they are online.
    fn fill(&mut self, user: &str, store: &dyn RelayStore) {
        let Some(id) = self.online.get(user).copied() else {
            return;
        };
        let Some(q) = self.queues.get_mut(user) else {
            return;
        };
        fill_queue(q, id, user, self.limits.window_bytes, &mut self.out, store);
    }

    #[allow(clippy::too_many_arguments)] // reason: the Login frame's three fields, its connection, challenge and channel, clock and store
    fn login(
        &mut self,
        id: ConnId,
        (nonce, channel): ([u8; 32], &[u8]),
        user: String,
        key: &[u8],
        signature: &[u8],
        now: u64,
        store: &mut dyn RelayStore,
    ) -> Result<(), RelayError> {
        if !valid_user(&user) {
            return Err(RelayError::BadLogin(
                "user names are 1 to 32 of a-z 0-9 . _ - starting with a letter or digit".into(),
            ));
        }
        let key = PublicKey::from_der(key).map_err(|e| RelayError::BadLogin(e.to_string()))?;
        key.verify(&login_transcript(&nonce, &user, channel), signature)
            .map_err(|_| RelayError::BadLogin("signature does not match the key".into()))?;
        match self.bindings.get(&user) {
            Some(bound) if *bound != key => {
                warn!(
                    "refused login as {user}: bound to {}, offered {}",
                    bound.fingerprint(),
                    key.fingerprint()
                );
                return Err(RelayError::NameTaken {
                    user,
                    bound: bound.fingerprint().to_string(),
                    offered: key.fingerprint().to_string(),
                });
            }
            Some(_) => {}
            None => {
                self.may_register(&user, &key, now)?;
                store
                    .bind(&user, key.der())
                    .map_err(|e| RelayError::Storage(format!("relay cannot store binding: {e}")))?;
                info!("bound {user} to {}", key.fingerprint());
                self.bindings.insert(user.clone(), key.clone());
                *self.names_per_key.entry(key.der().to_vec()).or_default() += 1;
                self.recent_binds.push_back(now);
            }
        }
        let mut was_online = false;
        if let Some(old) = self.online.get(&user).copied() {
            if old != id {
                info!("{user} logged in again; closing the older connection");
                was_online = true;
                self.close_quietly(
                    old,
                    ErrorCode::Replaced,
                    "logged in again from another connection".into(),
                    false,
                );
            }
        }
        if let Some(c) = self.conns.get_mut(&id) {
            c.state = State::Established {
                user: Rc::from(user.as_str()),
            };
        }
        self.due_by(
            now.saturating_add(self.limits.idle_timeout_ms)
                .saturating_add(1),
        );
        self.online.insert(user.clone(), id);
        info!("{user} joined ({})", key.fingerprint());
        // A room-sized relay sends its whole directory; a large one nothing (members look up
        // the names they need), so a login costs the same whatever the relay holds.
        let mut peers: Vec<Peer> = if self.is_room() {
            self.bindings
                .iter()
                .filter(|(name, _)| **name != user)
                .map(|(name, k)| Peer {
                    user: name.clone(),
                    key: k.der().to_vec(),
                    online: self.online.contains_key(name),
                })
                .collect()
        } else {
            Vec::new()
        };
        // A large directory goes out in chunks that each fit a frame whatever the key sizes.
        let rest = peers.split_off(peers.len().min(DIRECTORY_CHUNK));
        self.out.push_back(Out::Send(
            id,
            FromRelay::Welcome {
                user: user.clone(),
                peers,
            },
        ));
        for chunk in rest.chunks(DIRECTORY_CHUNK) {
            self.out
                .push_back(Out::Send(id, FromRelay::Directory(chunk.to_vec())));
        }
        if !was_online {
            self.presence.insert(user.clone(), true);
        }
        // A new connection has seen none of the queue: start the window over.
        if let Some(q) = self.queues.get_mut(&user) {
            q.sent = 0;
            q.sent_bytes = 0;
        }
        self.fill(&user, store);
        self.tell_dropped(id, &user, store);
        Ok(())
    }

    /// Send `user` (just logged in on `id`) a `Refused` for each of their accepted items that a
    /// `forget` dropped while they were away. A notice that cannot be read is left for the next
    /// login.
    fn tell_dropped(&mut self, id: ConnId, user: &str, store: &mut dyn RelayStore) {
        match store.take_notices(user) {
            Ok(notices) => {
                for (key, reason) in notices {
                    self.out.push_back(Out::Send(
                        id,
                        FromRelay::Refused {
                            key,
                            code: RefuseCode::Forgotten,
                            reason,
                        },
                    ));
                }
            }
            Err(e) => warn!("cannot read the notices for {user}: {e}"),
        }
    }

    /// Whether a new name may be bound to `key` now (docs/LIMITS.md, "Registrations").
    fn may_register(&mut self, user: &str, key: &PublicKey, now: u64) -> Result<(), RelayError> {
        let held = self.names_per_key.get(key.der()).copied().unwrap_or(0);
        if held >= self.limits.max_names_per_key {
            warn!(
                "refused to register {user}: key {} holds {held} names (max_names_per_key)",
                key.fingerprint()
            );
            return Err(RelayError::TooManyNames {
                user: user.to_string(),
                key: key.fingerprint().to_string(),
                held,
                max: self.limits.max_names_per_key,
            });
        }
        while self
            .recent_binds
            .front()
            .is_some_and(|t| now.saturating_sub(*t) >= REGISTRATION_WINDOW_MS)
        {
            self.recent_binds.pop_front();
        }
        if self.recent_binds.len() >= self.limits.new_names_per_minute {
            warn!(
                "refused to register {user}: {} new names in the last minute (new_names_per_minute)",
                self.recent_binds.len()
            );
            return Err(RelayError::RegistrationRate {
                max: self.limits.new_names_per_minute,
            });
        }
        Ok(())
    }

    /// A name bound to `key` is gone.
    fn unbound(&mut self, key: &PublicKey) {
        if let Some(n) = self.names_per_key.get_mut(key.der()) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.names_per_key.remove(key.der());
            }
        }
    }

    fn route(
        &mut self,
        id: ConnId,
        user: &str,
        item: Routed,
        raw: Option<&[u8]>,
        now: u64,
        store: &mut dyn RelayStore,
    ) {
        let key = item.key();
        let refuse = |code: RefuseCode, reason: String| {
            Out::Send(id, FromRelay::Refused { key, code, reason })
        };
        if item.from() != user {
            let r = refuse(
                RefuseCode::BadSender,
                format!("item claims to be from {} but you are {user}", item.from()),
            );
            self.out.push_back(r);
            return;
        }
        // Followers learn of the sender's join (and key) before its first message.
        self.flush_presence_of(user);
        let to = item.to().to_string();
        if !self.bindings.contains_key(&to) {
            self.out.push_back(refuse(
                RefuseCode::UnknownUser,
                format!("no user named {to}"),
            ));
            return;
        }
        let queue = self.queues.entry(to.clone()).or_default();
        if queue.keys.contains(&key) {
            // A retransmission of something we already hold: store nothing; acknowledge again
            // now if it is in the store, when it is durable if it is still in memory only.
            match queue.unsynced.get_mut(&key) {
                Some(u) => {
                    if !u.senders.contains(&id) {
                        u.senders.push(id);
                    }
                }
                None => self.out.push_back(Out::Send(id, FromRelay::Accepted(key))),
            }
            return;
        }
        if queue.items.len() >= self.limits.max_queue {
            info!(
                "refused an item from {user} for {to}: queue full ({} items, max_queue)",
                self.limits.max_queue
            );
            let r = refuse(
                RefuseCode::QueueFull,
                format!(
                    "{to}'s queue on the relay is full ({} items); try again when they have caught up",
                    self.limits.max_queue
                ),
            );
            self.out.push_back(r);
            return;
        }
        // The item's bytes as they came (a canonical `Send`); encoded again only when they came
        // another way (the host's in-process member, or an unusual but valid encoding).
        let bytes: Arc<[u8]> = match raw.and_then(|p| p.strip_prefix(SEND_PREFIX)) {
            Some(b) => b.into(),
            None => match to_payload(&item) {
                Ok(b) => b.into(),
                Err(e) => {
                    self.out
                        .push_back(refuse(RefuseCode::TooLarge, e.to_string()));
                    return;
                }
            },
        };
        if bytes.len() + DELIVER_PREFIX.len() > MAX_FRAME {
            self.out.push_back(refuse(
                RefuseCode::TooLarge,
                format!(
                    "the item is {} bytes; delivered it would exceed the {MAX_FRAME}-byte frame cap",
                    bytes.len()
                ),
            ));
            return;
        }
        if bytes.len() > self.limits.max_queue_bytes {
            // Never fits, however empty the queue: refused for good, not "try again".
            let r = refuse(
                RefuseCode::TooLarge,
                format!(
                    "the item is {} bytes, more than the relay queues for anyone (max_queue_bytes {})",
                    bytes.len(),
                    self.limits.max_queue_bytes
                ),
            );
            self.out.push_back(r);
            return;
        }
        // Items in memory only count too: they are queued like the written ones.
        if queue.bytes + bytes.len() > self.limits.max_queue_bytes {
            info!(
                "refused an item from {user} for {to}: queue full ({} bytes queued, max_queue_bytes {})",
                queue.bytes, self.limits.max_queue_bytes
            );
            let r = refuse(
                RefuseCode::QueueFull,
                format!(
                    "{to}'s queue on the relay is full ({} of {} bytes, max_queue_bytes); try again when they have caught up",
                    queue.bytes, self.limits.max_queue_bytes
                ),
            );
            self.out.push_back(r);
            return;
        }
        let size = bytes.len();
        // Forward first, write later: held in memory, delivered now if the recipient is online,
        // written to the store only if not acknowledged within SYNC_DELAY_MS (HOLD_ONLINE_MS for
        // an online recipient).
        queue.push(key, size);
        queue.unsynced.insert(
            key,
            Unsynced {
                bytes,
                senders: vec![id],
                seq: self.next_seq,
                at: now,
                size,
            },
        );
        self.unsynced += 1;
        self.live.insert(self.next_seq);
        queue.unsynced_bytes += size;
        self.next_seq += 1;
        self.unsynced_bytes += size;
        // The queue in hand is filled: looking it up again by name would hash the name again.
        if let Some(&rid) = self.online.get(&to) {
            fill_queue(
                queue,
                rid,
                &to,
                self.limits.window_bytes,
                &mut self.out,
                store,
            );
        }
        self.arrivals.push_back(Arrival {
            seq: self.next_seq - 1,
            at: now,
            due: now,
            to,
            key,
        });
    }

    fn ack(&mut self, user: &str, key: ItemKey, store: &mut dyn RelayStore) {
        let Some(q) = self.queues.get_mut(user) else {
            return;
        };
        if !q.keys.contains(&key) {
            return;
        }
        let online = self.online.get(user).copied();
        if let Some(u) = q.unsynced.remove(&key) {
            // Acknowledged before it was written: durable at the recipient, so its senders hear
            // `Accepted` now, and the store never sees it.
            q.unsynced_bytes = q.unsynced_bytes.saturating_sub(u.size);
            self.unsynced -= 1;
            self.unsynced_bytes = self.unsynced_bytes.saturating_sub(u.size);
            self.live.remove(&u.seq);
            q.remove(key);
            for s in u.senders {
                self.out.push_back(Out::Send(s, FromRelay::Accepted(key)));
            }
            // The queue in hand is filled, not looked up again by name.
            if let Some(id) = online {
                fill_queue(q, id, user, self.limits.window_bytes, &mut self.out, store);
            }
            let front = |d: &VecDeque<Arrival>| d.front().is_some_and(|a| a.seq == u.seq);
            if front(&self.arrivals) || front(&self.held) {
                self.drop_stale_arrivals();
            }
            return;
        }
        if let Err(e) = store.dequeue(user, key) {
            // The item stays queued and is delivered again; the member drops the duplicate.
            warn!("cannot drop acknowledged item for {user}: {e}");
            return;
        }
        q.remove(key);
        if let Some(id) = online {
            fill_queue(q, id, user, self.limits.window_bytes, &mut self.out, store);
        }
    }

    fn close_with(&mut self, id: ConnId, code: ErrorCode, reason: String) {
        self.close_quietly(id, code, reason, true);
    }

    /// Send a final error and close. A logged-in user goes offline at once (announced unless
    /// `announce` is false, for a connection replaced by a newer login of the same user).
    fn close_quietly(&mut self, id: ConnId, code: ErrorCode, reason: String, announce: bool) {
        if let Some(c) = self.conns.get_mut(&id) {
            let old = std::mem::replace(&mut c.state, State::Closing);
            if let State::Established { user } = old {
                self.went_offline(id, &user, announce);
            }
        }
        self.out
            .push_back(Out::Send(id, FromRelay::Error { code, reason }));
        self.out.push_back(Out::Close(id));
    }

    fn fail(&mut self, id: ConnId, e: RelayError) {
        info!("connection {id}: {e}");
        let code = e.code();
        self.close_with(id, code, e.to_string());
    }
}

/// Deliver the next items of `user`'s queue `q` on their connection `id`, up to the window
/// ([`DELIVERY_WINDOW`] items, `window_bytes`). Apart from [`Relay`] so a caller that holds the
/// queue already need not find it again by name.
fn fill_queue(
    q: &mut UserQueue,
    id: ConnId,
    user: &str,
    window_bytes: usize,
    out: &mut VecDeque<Out>,
    store: &dyn RelayStore,
) {
    while q.sent < q.items.len() && q.sent < DELIVERY_WINDOW {
        let (key, size) = q.items[q.sent];
        if q.sent > 0 && q.sent_bytes + size > window_bytes {
            break;
        }
        if let Some(u) = q.unsynced.get(&key) {
            // Still in memory: forwarded as it came, without a read of the store.
            q.sent += 1;
            q.sent_bytes += size;
            out.push_back(Out::Deliver(id, Arc::clone(&u.bytes)));
            continue;
        }
        // Checked before it goes out (the database is outside the process), then sent as
        // stored.
        let item: Arc<[u8]> = match store.queued_item(user, key) {
            Ok(Some(bytes)) => match Routed::decode(&bytes) {
                Ok(_) => bytes.into(),
                Err(e) => {
                    warn!("queued item for {user} is unreadable ({e}); delivery paused");
                    break;
                }
            },
            Ok(None) => {
                warn!("queued item for {user} is missing from the store; delivery paused");
                break;
            }
            Err(e) => {
                // Tried again on the next acknowledgement, new item or login.
                warn!("cannot read queued item for {user}: {e}");
                break;
            }
        };
        q.sent += 1;
        q.sent_bytes += size;
        out.push_back(Out::Deliver(id, item));
    }
}

#[cfg(test)]
mod tests;
