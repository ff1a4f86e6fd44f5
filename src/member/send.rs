//! The sending side: sessions to each peer, sealing, the outbox, and what the relay answers to
//! what we sent (`Accepted`, `Refused`), including receipts it refused for a passing reason and
//! that we offer again later.
//!
//! Owns [`Sending`]. Must never: seal to a peer whose key changed and is not trusted yet (checked
//! in [`recipients`] before anything is stored), reuse a (session key, counter) pair (a session
//! is retired after [`SESSION_MESSAGES`]), or keep a session in memory whose key a rolled-back
//! request took out of the store (a receipt for it could never be checked).

use crate::clock::Now;
use std::collections::{HashMap, HashSet, VecDeque};

use log::warn;
use rand::rngs::StdRng;
use rand::RngCore;

use super::error::MemberError;
use super::out::{record, Out};
use super::peers::{Peers, Sender};
use crate::crypto::{
    make_key_packet, seal_envelope, verify_rekey, Fingerprint, Header, Identity, SessionKey,
};
use crate::proto::control::{Dir, MsgState, Record, RecordBody, Sent};
use crate::proto::relay::{Envelope, ItemKey, KeyPacket, Kind, RefuseCode, Rekey, Routed};
use crate::proto::{from_payload, hex, to_payload, valid_user, MAX_TEXT};
use crate::store::{MemberStore, StoreError};

/// A sending session is retired after this many messages, so (key, counter) never repeats.
pub const SESSION_MESSAGES: u64 = 100_000;
/// Offer refused receipts again after this long.
pub(super) const RETRY_REFUSED_MS: u64 = 5_000;

struct SendSession {
    id: [u8; 16],
    key: SessionKey,
    peer: Fingerprint,
    next: u64,
    /// The wrapped, signed key; dropped once a receipt proves the peer holds the key.
    key_packet: Option<KeyPacket>,
}

/// What [`Sending::queue`] stored, for `Member` to announce and send.
pub(super) struct Queued {
    /// One per recipient, in order.
    pub(super) sent: Vec<Sent>,
    /// The sealed envelopes, for the relay.
    pub(super) items: Vec<Routed>,
    /// The history records of the sent copies.
    pub(super) records: Vec<Record>,
}

/// Sending sessions by peer, and the receipt retry timer.
pub(super) struct Sending {
    sessions: HashMap<String, SendSession>,
    /// When to resend the outbox's receipts after the relay refused one for a passing reason.
    /// Kept across a reconnect (the login resends the whole outbox anyway).
    retry_at: Option<u64>,
    /// Message and session ids, session keys and key packets come from here: seeded from the
    /// OS, or from a fixed seed in a test so a run repeats exactly.
    rng: StdRng,
    /// Rekey requests answered, by (peer, session): each is answered once per run, so a relay
    /// replaying a genuine one cannot make us sign again and again.
    rekeyed: HashSet<(String, [u8; 16])>,
    /// Sends that need many new sessions, oldest first: their RSA work is done a few sessions
    /// per turn ([`SESSIONS_PER_TURN`]), so no request waits behind a wide `send --all`.
    jobs: VecDeque<Job>,
    /// New sessions made for a job and not used yet, by recipient.
    prepared: HashMap<String, SendSession>,
    next_job: u64,
}

/// New sessions made per turn of the event loop for a send that needs many: each costs an RSA
/// encryption and an RSA signature (about 2 ms with a 2048-bit key), so a turn spends a few
/// tens of milliseconds on them at most and every other request is answered in between.
pub const SESSIONS_PER_TURN: usize = 16;

/// A send whose new sessions are being made, turn by turn; nothing of it is stored until they
/// are all made, so it stays all or nothing.
pub(super) struct Job {
    /// Which job (for the daemon, to answer the right client).
    pub(super) id: u64,
    /// Its recipients, checked when it began and again when it is queued.
    pub(super) to: Vec<String>,
    /// The text.
    pub(super) text: String,
    /// Recipients whose new session is still to be made.
    todo: Vec<String>,
}

/// Most rekey requests remembered as answered; past it the set starts afresh (a replay then
/// costs one more answer, never an unbounded set).
const MAX_REKEYED: usize = 4096;

/// Why a rekey request is not answered (it is acknowledged and dropped all the same).
#[derive(Debug)]
pub(super) enum RekeyRefused {
    /// Addressed to someone else.
    NotForUs,
    /// The sender is not pinned, or their key changed.
    NotPinned,
    /// The signature does not verify with the pinned key.
    BadSignature,
    /// Answered already in this run.
    Answered,
    /// It names a message we did not send them in that session, or a session we do not hold.
    NoSuchSession,
    /// The store failed: leave it unacknowledged for a later delivery.
    Store(crate::store::StoreError),
    /// Making the key packet failed.
    Crypto(crate::crypto::CryptoError),
}

impl std::fmt::Display for RekeyRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RekeyRefused::NotForUs => write!(f, "addressed to someone else"),
            RekeyRefused::NotPinned => write!(f, "its sender is not pinned, or their key changed"),
            RekeyRefused::BadSignature => write!(f, "its signature does not verify"),
            RekeyRefused::Answered => write!(f, "answered already"),
            RekeyRefused::NoSuchSession => {
                write!(f, "it names no message we sent them in that session")
            }
            RekeyRefused::Store(e) => write!(f, "{e}"),
            RekeyRefused::Crypto(e) => write!(f, "{e}"),
        }
    }
}

/// A message's id: the first 12 bytes of its session's id, then its counter (big-endian), or
/// `None` for a counter beyond 32 bits (never: a session is retired long before).
///
/// Unique because (session, counter) is (the nonce under the session's key never repeats),
/// and known ahead only to those who know the session: its sender, its recipient and the relay
/// that routes it, who can drop the message anyway. Consecutive, so a session's ids lie side by
/// side in every index keyed by id: a random id dirtied another page of each such index per
/// message, in the sender's, the recipient's and the relay's database.
fn message_id(session: &[u8; 16], counter: u64) -> Option<[u8; 16]> {
    let counter = u32::try_from(counter).ok()?;
    let mut id = [0u8; 16];
    id[..12].copy_from_slice(&session[..12]);
    id[12..].copy_from_slice(&counter.to_be_bytes());
    Some(id)
}

fn random_id(rng: &mut StdRng) -> [u8; 16] {
    let mut id = [0u8; 16];
    rng.fill_bytes(&mut id);
    id
}

/// A new sending session to `to`: a random id and key, and the key packet (the RSA work).
fn new_session(
    rng: &mut StdRng,
    identity: &Identity,
    own: &str,
    to: &str,
    pinned: &crate::crypto::PublicKey,
) -> Result<SendSession, crate::crypto::CryptoError> {
    let id = random_id(rng);
    let key = SessionKey::random(rng);
    let kp = make_key_packet(rng, identity, own, to, pinned, &id, &key)?;
    Ok(SendSession {
        id,
        key,
        peer: pinned.fingerprint(),
        next: 0,
        key_packet: Some(kp),
    })
}

/// Check a send request and name its recipients, in order and each once. Every check happens
/// here, before anything is stored.
pub(super) fn recipients(
    peers: &Peers,
    own: &str,
    to: &[String],
    all: bool,
    text: &str,
    max_fanout: usize,
) -> Result<Vec<String>, MemberError> {
    if text.len() > MAX_TEXT {
        return Err(MemberError::TextTooLong(text.len()));
    }
    let mut recipients: Vec<String> = Vec::new();
    if all {
        // Count before collecting: a relay may put any number of peers online.
        let online = peers.online_users().count();
        if online > max_fanout {
            return Err(MemberError::FanoutTooLarge {
                online,
                max: max_fanout,
            });
        }
        recipients.extend(peers.online_users().map(str::to_string));
        if recipients.is_empty() {
            return Err(MemberError::NoPeersOnline);
        }
    }
    for u in to {
        if !valid_user(u) {
            return Err(MemberError::BadUser(u.clone()));
        }
        if *u == own {
            return Err(MemberError::SelfSend);
        }
        if !peers.knows(u) {
            return Err(MemberError::UnknownUser(u.clone()));
        }
        if !recipients.contains(u) {
            recipients.push(u.clone());
        }
    }
    if recipients.is_empty() {
        return Err(MemberError::NoRecipient);
    }
    for u in &recipients {
        if let Sender::Changed { pinned, presented } = peers.sender(u) {
            return Err(MemberError::KeyChanged {
                user: u.clone(),
                pinned,
                presented,
            });
        }
    }
    Ok(recipients)
}

/// Whether `u`, a recipient checked when a job began, may still be sent to.
pub(super) fn still_sendable(peers: &Peers, u: &str) -> Result<(), MemberError> {
    match peers.sender(u) {
        Sender::Unknown => Err(MemberError::UnknownUser(u.to_string())),
        Sender::Changed { pinned, presented } => Err(MemberError::KeyChanged {
            user: u.to_string(),
            pinned,
            presented,
        }),
        Sender::Pinned(_) => Ok(()),
    }
}

/// The outbox's items to offer the relay, oldest first: all of them, or only what is not a
/// message (receipts and rekey requests, which the retry timer offers again).
pub(super) fn outbox(store: &dyn MemberStore, only_receipts: bool) -> Vec<Routed> {
    let items = match store.outbox() {
        Ok(items) => items,
        Err(e) => {
            warn!("cannot read outbox: {e}");
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for (key, bytes) in items {
        if only_receipts && key.kind == Kind::Message {
            continue;
        }
        match from_payload::<Routed>(&bytes) {
            Ok(item) => out.push(item),
            // Said once, by the flush at login; the retry offers what it can without repeating it.
            Err(_) if only_receipts => {}
            Err(e) => warn!("skipping unreadable outbox item: {e}"),
        }
    }
    out
}

impl Sending {
    /// No sessions, no timer; randomness from `rng`.
    pub(super) fn new(rng: StdRng) -> Sending {
        Sending {
            sessions: HashMap::new(),
            retry_at: None,
            rng,
            rekeyed: HashSet::new(),
            jobs: VecDeque::new(),
            prepared: HashMap::new(),
            next_job: 1,
        }
    }

    /// Whether sending to `to` now would need a new session (and so RSA work).
    fn needs_session(&self, peers: &Peers, to: &str) -> bool {
        let Some(pinned) = peers.pinned(to) else {
            return false;
        };
        match self.sessions.get(to) {
            Some(s) => s.peer != pinned || s.next >= SESSION_MESSAGES,
            None => !self.prepared.get(to).is_some_and(|p| p.peer == pinned),
        }
    }

    /// If `recipients` need more than [`SESSIONS_PER_TURN`] new sessions, start a job for them
    /// and return its id; else `None`, and the caller queues at once.
    pub(super) fn start_job(
        &mut self,
        peers: &Peers,
        recipients: &[String],
        text: &str,
    ) -> Option<u64> {
        let mut todo: Vec<String> = recipients
            .iter()
            .filter(|u| self.needs_session(peers, u))
            .cloned()
            .collect();
        if todo.len() <= SESSIONS_PER_TURN && self.jobs.is_empty() {
            return None;
        }
        todo.reverse();
        let id = self.next_job;
        self.next_job += 1;
        self.jobs.push_back(Job {
            id,
            to: recipients.to_vec(),
            text: text.to_string(),
            todo,
        });
        Some(id)
    }

    /// A job is waiting for its sessions: the loop must come back at once.
    pub(super) fn working(&self) -> bool {
        !self.jobs.is_empty()
    }

    /// Make up to [`SESSIONS_PER_TURN`] new sessions for the oldest job; the job once it has
    /// all of them (then the caller queues it). A session that cannot be made is left to
    /// `queue`, which reports the error.
    pub(super) fn work(&mut self, identity: &Identity, own: &str, peers: &Peers) -> Option<Job> {
        let job = self.jobs.front_mut()?;
        for _ in 0..SESSIONS_PER_TURN {
            let Some(to) = job.todo.pop() else {
                break;
            };
            let Some(pinned) = peers.pinned_key(&to) else {
                continue;
            };
            if let Ok(s) = new_session(&mut self.rng, identity, own, &to, pinned) {
                self.prepared.insert(to, s);
            }
        }
        if !job.todo.is_empty() {
            return None;
        }
        self.jobs.pop_front()
    }

    /// A job was queued or failed: its unused sessions go (they were never stored).
    pub(super) fn job_done(&mut self, job: &Job) {
        for u in &job.to {
            self.prepared.remove(u);
        }
    }

    /// Forget sessions and the timer, keep the random generator (a seeded run stays seeded).
    pub(super) fn reset(&mut self) {
        self.sessions.clear();
        self.retry_at = None;
        // An answer whose writes the failed commit took back must be given again.
        self.rekeyed.clear();
        // Jobs stored nothing yet; the daemon tells their clients that nothing was sent.
        self.jobs.clear();
        self.prepared.clear();
    }

    /// The random generator, for the login signature.
    pub(super) fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }

    /// Start a new session with `user` on the next send (their key was just trusted).
    pub(super) fn forget_peer(&mut self, user: &str) {
        self.sessions.remove(user);
    }

    /// Answer `r`, a recipient's signed request for the key of one of our sessions with them:
    /// every unsettled message of that session goes out again with the session's key packet
    /// (in the outbox, returned to be sent), and the session is retired so new messages start a
    /// new one. Nothing is sealed again: the kept envelopes are sent as they were, plus the key.
    pub(super) fn answer_rekey(
        &mut self,
        identity: &Identity,
        own: &str,
        peers: &Peers,
        r: &Rekey,
        store: &mut dyn MemberStore,
    ) -> Result<Vec<Routed>, RekeyRefused> {
        if r.to != own {
            return Err(RekeyRefused::NotForUs);
        }
        let Sender::Pinned(pinned) = peers.sender(&r.from) else {
            return Err(RekeyRefused::NotPinned);
        };
        verify_rekey(pinned, r).map_err(|_| RekeyRefused::BadSignature)?;
        let which = (r.from.clone(), r.session);
        if self.rekeyed.contains(&which) {
            return Err(RekeyRefused::Answered);
        }
        match store.outgoing(&r.id).map_err(RekeyRefused::Store)? {
            Some((peer, session, _, _)) if peer == r.from && session == r.session => {}
            _ => return Err(RekeyRefused::NoSuchSession),
        }
        let raw = store
            .session(true, &r.from, &r.session)
            .map_err(RekeyRefused::Store)?
            .ok_or(RekeyRefused::NoSuchSession)?;
        let key = SessionKey::from_bytes(&raw).ok_or(RekeyRefused::NoSuchSession)?;
        let kp = make_key_packet(
            &mut self.rng,
            identity,
            own,
            &r.from,
            pinned,
            &r.session,
            &key,
        )
        .map_err(RekeyRefused::Crypto)?;
        let kept = store
            .unsettled(&r.from, &r.session)
            .map_err(RekeyRefused::Store)?;
        let mut items = Vec::new();
        store.savepoint().map_err(RekeyRefused::Store)?;
        for (_, bytes) in kept {
            let Ok(Routed::Message(mut env)) = from_payload::<Routed>(&bytes) else {
                continue;
            };
            env.key_packet = Some(kp.clone());
            let item = Routed::Message(env);
            let Ok(again) = to_payload(&item) else {
                continue;
            };
            // Into the outbox again (a relayed message too), and kept as the envelope.
            if let Err(e) = store.outbox_push(item.key(), &again) {
                store.rollback_savepoint();
                return Err(RekeyRefused::Store(e));
            }
            items.push(item);
        }
        store.release_savepoint().map_err(RekeyRefused::Store)?;
        if self.rekeyed.len() >= MAX_REKEYED {
            self.rekeyed.clear();
        }
        self.rekeyed.insert(which);
        if self
            .sessions
            .get(&r.from)
            .is_some_and(|s| s.id == r.session)
        {
            self.sessions.remove(&r.from);
        }
        Ok(items)
    }

    /// When the retry timer fires (monotonic ms), if it is set.
    pub(super) fn retry_at(&self) -> Option<u64> {
        self.retry_at
    }

    /// The retry timer fired: take it.
    pub(super) fn retry_due(&mut self, now: Now) -> bool {
        if self.retry_at.is_some_and(|t| now.mono >= t) {
            self.retry_at = None;
            true
        } else {
            false
        }
    }

    /// The key of our sending session `session` with `peer`, from memory or the store (a
    /// session from before a restart); `None` when neither has it or the stored one is corrupt.
    pub(super) fn key_of(
        &self,
        peer: &str,
        session: &[u8; 16],
        store: &dyn MemberStore,
    ) -> Option<SessionKey> {
        match self.sessions.get(peer).filter(|s| s.id == *session) {
            Some(s) => Some(s.key.clone()),
            None => store
                .session(true, peer, session)
                .ok()
                .flatten()
                .and_then(|raw| SessionKey::from_bytes(&raw)),
        }
    }

    /// A verified receipt proves `peer` holds the key of `session`: stop sending its key packet.
    pub(super) fn confirmed(&mut self, peer: &str, session: &[u8; 16]) {
        if let Some(s) = self.sessions.get_mut(peer) {
            if s.id == *session {
                s.key_packet = None;
            }
        }
    }

    /// Seal `text` to each recipient and store it (message, outbox, history), all or none: a
    /// failure rolls back the whole request and forgets the sessions it made. One recipient
    /// inside a turn takes no savepoint (see [`MemberStore::abandon_turn`]): there every
    /// failure after a write is a store error, which abandons the turn, and its commit fails.
    #[allow(clippy::too_many_arguments)] // reason: the member's identity, name and peers, plus the request
    pub(super) fn queue(
        &mut self,
        identity: &Identity,
        own: &str,
        peers: &Peers,
        recipients: &[String],
        text: &str,
        now: Now,
        store: &mut dyn MemberStore,
    ) -> Result<Queued, MemberError> {
        // Sessions as they were, so a failed request can forget sessions it made whose keys the
        // rollback takes out of the store (a receipt for them could never be checked).
        let prior: HashMap<String, [u8; 16]> = recipients
            .iter()
            .filter_map(|u| self.sessions.get(u).map(|s| (u.clone(), s.id)))
            .collect();
        let savepoint = recipients.len() != 1 || !store.in_turn();
        if savepoint {
            store.savepoint()?;
        }
        let mut queued = Queued {
            sent: Vec::new(),
            items: Vec::new(),
            records: Vec::new(),
        };
        for u in recipients {
            match self.seal_one(identity, own, peers, u, text, now, store) {
                Ok((sent, item, record)) => {
                    queued.sent.push(sent);
                    queued.items.push(item);
                    queued.records.push(record);
                }
                Err(e) => {
                    if !savepoint {
                        if let MemberError::Store(se) = &e {
                            store.abandon_turn(se);
                        }
                        // Any other failure came before this request's first write, or (a
                        // text that will not encode) after only its new session was stored,
                        // which the session table and memory then both hold.
                        return Err(e);
                    }
                    store.rollback_savepoint();
                    for u in recipients {
                        if self.sessions.get(u).map(|s| s.id) != prior.get(u).copied() {
                            self.sessions.remove(u);
                        }
                    }
                    return Err(e);
                }
            }
        }
        if savepoint {
            store.release_savepoint()?;
        }
        Ok(queued)
    }

    fn session_for(
        &mut self,
        identity: &Identity,
        own: &str,
        peers: &Peers,
        to: &str,
        store: &mut dyn MemberStore,
    ) -> Result<&mut SendSession, MemberError> {
        let pinned = match peers.pinned_key(to) {
            Some(k) => k.clone(),
            None => return Err(MemberError::UnknownUser(to.into())),
        };
        let fresh = match self.sessions.get(to) {
            Some(s) => s.peer != pinned.fingerprint() || s.next >= SESSION_MESSAGES,
            None => true,
        };
        if fresh {
            // Made ahead by a job's turns, if it was made for this key; else now.
            let s = match self.prepared.remove(to) {
                Some(p) if p.peer == pinned.fingerprint() => p,
                _ => new_session(&mut self.rng, identity, own, to, &pinned)
                    .map_err(MemberError::Crypto)?,
            };
            store.put_session(true, to, &s.id, s.key.expose())?;
            self.sessions.insert(to.to_string(), s);
        }
        self.sessions
            .get_mut(to)
            .ok_or_else(|| MemberError::UnknownUser(to.into()))
    }

    #[allow(clippy::too_many_arguments)] // reason: as `queue`, for one recipient
    fn seal_one(
        &mut self,
        identity: &Identity,
        own: &str,
        peers: &Peers,
        to: &str,
        text: &str,
        now: Now,
        store: &mut dyn MemberStore,
    ) -> Result<(Sent, Routed, Record), MemberError> {
        let from = own.to_string();
        let s = self.session_for(identity, own, peers, to, store)?;
        let (session, key, mut key_packet) = (s.id, s.key.clone(), s.key_packet.clone());
        // The id is the session's next one, taken only if the recipient (or the relay), who
        // know the session, sent us a message under it first; the insert finds that out, with
        // no lookup before it. Then what was sealed is dropped unsent, its counter is spent,
        // and the message is sealed again under the next counter and a random id: no (key,
        // counter) is ever sealed twice, even in memory.
        let mut counter = s.next;
        s.next += 1;
        let mut derived = message_id(&session, counter);
        let (id, item) = loop {
            let random = derived.is_none();
            let id = derived.unwrap_or_else(|| random_id(&mut self.rng));
            let mut env = Envelope {
                id,
                from: from.clone(),
                to: to.to_string(),
                time_ms: now.wall,
                session,
                counter,
                key_packet: key_packet.take(),
                ciphertext: Vec::new(),
            };
            env.ciphertext = seal_envelope(&key, &Header::of(&env), text.as_bytes());
            let item = Routed::Message(env);
            let bytes = to_payload(&item).map_err(|_| MemberError::TextTooLong(text.len()))?;
            if store.add_sent(&id, to, &session, counter, &bytes)? {
                break (id, item);
            }
            if random {
                // Two random ids alike means a damaged database, not bad luck.
                return Err(MemberError::Store(StoreError::Corrupt(
                    "a random message id is stored already".into(),
                )));
            }
            // The dropped seal gives its key packet back for the next one.
            if let Routed::Message(env) = item {
                key_packet = env.key_packet;
            }
            let s = self
                .sessions
                .get_mut(to)
                .ok_or_else(|| MemberError::UnknownUser(to.into()))?;
            counter = s.next;
            s.next += 1;
            derived = None;
        };
        let record = store.append(
            now.wall,
            to,
            RecordBody::Message {
                id,
                from,
                to: to.to_string(),
                dir: Dir::Out,
                text: text.to_string(),
            },
        )?;
        Ok((
            Sent {
                id,
                to: to.to_string(),
                state: MsgState::Queued,
            },
            item,
            record,
        ))
    }

    /// The relay took custody of `key`: out of the outbox, and a queued message is `Relayed`.
    pub(super) fn accepted(
        &mut self,
        key: ItemKey,
        now: Now,
        store: &mut dyn MemberStore,
    ) -> Vec<Out> {
        let mut out = Vec::new();
        if key.kind != Kind::Message {
            if let Err(e) = store.outbox_remove(key) {
                warn!("cannot update outbox: {e}");
            }
            return out;
        }
        match store.relayed(&key.id) {
            Ok(Some(peer)) => {
                let body = RecordBody::Receipt {
                    id: key.id,
                    to: peer.clone(),
                    state: MsgState::Relayed,
                    reason: None,
                };
                record(store, now, &peer, body, &mut out);
                out.push(Out::State(key.id, MsgState::Relayed, None));
            }
            Ok(None) => {}
            Err(e) => warn!("cannot update message state: {e}"),
        }
        out
    }

    /// The relay refused `key`. A receipt refused for a passing reason stays and is offered
    /// again later; anything else leaves the outbox, and a message that was not settled fails.
    pub(super) fn refused(
        &mut self,
        key: ItemKey,
        code: &RefuseCode,
        reason: &str,
        now: Now,
        store: &mut dyn MemberStore,
    ) -> Vec<Out> {
        let mut out = Vec::new();
        let idh = hex(&key.id);
        warn!("relay refused {:?} {idh} ({code}): {reason}", key.kind);
        if key.kind == Kind::Receipt && code.is_transient() {
            // A passing condition at the relay: keep the receipt and offer it again later, so
            // the sender still learns that its message was delivered.
            self.retry_at = Some(now.mono + RETRY_REFUSED_MS);
            return out;
        }
        if let Err(e) = store.outbox_remove(key) {
            warn!("cannot update outbox: {e}");
            return out;
        }
        if key.kind != Kind::Message {
            return out;
        }
        // Set at the row the check found, as a receipt is: one lookup by id, not two.
        if let Ok(Some(((peer, _, _, state), row))) = store.outgoing_at(&key.id) {
            if state == MsgState::Delivered || state == MsgState::Failed {
                return out;
            }
            if let Err(e) = store.set_state_at(row, &key.id, MsgState::Failed) {
                warn!("cannot update message state: {e}");
            }
            let why = format!("{code}: {reason}");
            let body = RecordBody::Receipt {
                id: key.id,
                to: peer.clone(),
                state: MsgState::Failed,
                reason: Some(why.clone()),
            };
            record(store, now, &peer, body, &mut out);
            out.push(Out::State(key.id, MsgState::Failed, Some(why)));
        }
        out
    }

    /// Forget every session (tests: force a fresh session on the next send).
    #[cfg(test)]
    pub(super) fn clear(&mut self) {
        self.sessions.clear();
    }

    /// Move the session with `peer` to counter `next` (tests: reach the budget without sending
    /// 100,000 messages).
    #[cfg(test)]
    pub(super) fn skip_to(&mut self, peer: &str, next: u64) {
        self.sessions
            .get_mut(peer)
            .expect("a session with the peer")
            .next = next;
    }
}
