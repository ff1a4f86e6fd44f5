//! The member role as a sans-I/O state machine: the login handshake, the outbox, sending and
//! receiving sessions, trust (TOFU pins), and the history records that `chatctl tail` shows.
//!
//! The daemon tells it when the link to the relay comes up or goes down, feeds it frame payloads
//! and clock ticks, and forwards `chatctl` requests; it answers with [`Out`] actions (frames for
//! the relay, events for control clients, a request to close the link) and writes through the
//! [`Store`]. Must never: touch a socket, log a message text or key, seal to or accept from a peer
//! whose key changed and is not trusted yet, or run a private-key operation on a key packet before
//! the pinned sender's signature on it has verified.

use std::collections::{BTreeMap, HashMap, VecDeque};

use log::{info, warn};
use rand::rngs::OsRng;
use rand::RngCore;

use crate::crypto::{
    login_transcript, make_key_packet, open_envelope, receipt_tag, seal_envelope,
    unwrap_key_packet, verify_receipt, CryptoError, Fingerprint, Header, Identity, PublicKey,
    SessionKey,
};
use crate::proto::control::{Dir, MsgState, PeerView, Record, RecordBody, Sent, TrustState};
use crate::proto::relay::{
    Envelope, FromRelay, ItemKey, KeyPacket, Kind, Peer, Receipt, RefuseCode, Routed, ToRelay,
};
use crate::proto::{from_payload, hex, to_payload, valid_user, MAX_TEXT};
use crate::store::{Pin, PinTrust, Store, StoreError};

/// A sending session is retired after this many messages, so (key, counter) never repeats.
pub const SESSION_MESSAGES: u64 = 100_000;
/// Send a `Ping` when nothing was sent for this long.
const PING_AFTER_MS: u64 = 30_000;
/// Give up on a relay that has said nothing for this long (it pongs every ping).
const SILENT_RELAY_MS: u64 = 90_000;
/// Offer refused receipts again after this long.
const RETRY_REFUSED_MS: u64 = 5_000;
/// Give up on a login that has not completed in this long.
const LOGIN_TIMEOUT_MS: u64 = 15_000;

/// What the daemon must do for the member.
#[derive(Debug)]
pub enum Out {
    /// Send a frame to the relay.
    Frame(ToRelay),
    /// Close the link to the relay (protocol error, refusal, or silence); reconnect later.
    Close,
    /// A new history record, for `tail -f` clients.
    Record(Record),
    /// A sent message reached a new state (with the reason for `Failed`), for `send --wait`.
    State([u8; 16], MsgState, Option<String>),
}

/// Errors a `chatctl` request can get from the member. Each message says what to do.
#[derive(Debug)]
pub enum MemberError {
    /// No recipient given.
    NoRecipient,
    /// A recipient name is not a valid user name.
    BadUser(String),
    /// The relay has never bound this name.
    UnknownUser(String),
    /// Sending to oneself is refused (the copy would collide with the sent one).
    SelfSend,
    /// `--all` with nobody online.
    NoPeersOnline,
    /// The text is larger than 64 KiB.
    TextTooLong(usize),
    /// The recipient's key changed and is not trusted yet.
    KeyChanged {
        /// The peer.
        user: String,
        /// The pinned fingerprint.
        pinned: Fingerprint,
        /// The fingerprint the relay presents now.
        presented: Fingerprint,
    },
    /// `trust` with a fingerprint that is neither the pinned nor the presented key.
    FingerprintMismatch {
        /// The peer.
        user: String,
        /// What the user typed.
        given: Fingerprint,
        /// The key the relay presents (or the pinned one if nothing changed).
        current: Fingerprint,
    },
    /// A fingerprint argument could not be parsed.
    BadFingerprint(CryptoError),
    /// Sealing failed.
    Crypto(CryptoError),
    /// The store failed; nothing was queued.
    Store(StoreError),
}

impl std::fmt::Display for MemberError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MemberError::NoRecipient => write!(f, "give at least one recipient, or --all"),
            MemberError::BadUser(u) => write!(
                f,
                "invalid user name {u:?}: names are 1 to 32 of a-z 0-9 . _ - starting with a letter or digit"
            ),
            MemberError::UnknownUser(u) => write!(f, "unknown user {u}: the relay has no such name"),
            MemberError::SelfSend => write!(f, "cannot send a message to yourself"),
            MemberError::NoPeersOnline => write!(f, "no peer is online; nothing was sent"),
            MemberError::TextTooLong(n) => write!(
                f,
                "message text is {n} bytes; the limit is {MAX_TEXT} bytes; nothing was sent"
            ),
            MemberError::KeyChanged {
                user,
                pinned,
                presented,
            } => write!(
                f,
                "{user}'s key changed: pinned {pinned}, relay presents {presented}; nothing was sent. \
                 Check the new fingerprint with {user} out of band, then run: chatctl trust {user} {presented}"
            ),
            MemberError::FingerprintMismatch {
                user,
                given,
                current,
            } => write!(
                f,
                "{given} is not {user}'s key: the relay presents {current}; nothing was changed"
            ),
            MemberError::BadFingerprint(e) => write!(f, "{e}"),
            MemberError::Crypto(e) => write!(f, "cannot seal the message: {e}"),
            MemberError::Store(e) => write!(f, "cannot store the message, nothing was sent: {e}"),
        }
    }
}

impl std::error::Error for MemberError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            MemberError::Store(e) => Some(e),
            MemberError::Crypto(e) | MemberError::BadFingerprint(e) => Some(e),
            _ => None,
        }
    }
}

impl From<StoreError> for MemberError {
    fn from(e: StoreError) -> Self {
        MemberError::Store(e)
    }
}

/// Why a receiving session key could not be had.
enum KeyFail {
    /// The envelope can never be opened (bad signature, no key packet): reject it.
    Reject(String),
    /// The store failed: leave the envelope for a later delivery.
    Store(StoreError),
}

/// The state of the link to the relay, named for what it expects next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// No connection.
    Down,
    /// Connected; waiting for the relay's `Challenge`.
    ExpectChallenge,
    /// `Login` sent; waiting for `Welcome`.
    ExpectWelcome,
    /// Logged in.
    Established,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trust {
    Pinned,
    Trusted,
}

struct PeerState {
    pinned: PublicKey,
    trust: Trust,
    /// A different key the relay presents; while set, the peer is `changed`.
    presented: Option<PublicKey>,
    online: bool,
}

struct SendSession {
    id: [u8; 16],
    key: SessionKey,
    peer: Fingerprint,
    next: u64,
    /// The wrapped, signed key; dropped once a receipt proves the peer holds the key.
    key_packet: Option<KeyPacket>,
}

/// The member's state.
pub struct Member {
    user: String,
    identity: Identity,
    link: Link,
    link_since: u64,
    last_rx: u64,
    last_tx: u64,
    peers: BTreeMap<String, PeerState>,
    sending: HashMap<String, SendSession>,
    receiving: HashMap<(String, [u8; 16]), SessionKey>,
    /// When to resend the outbox after the relay refused a receipt for a passing reason.
    retry_at: Option<u64>,
    relay_error: Option<String>,
    out: VecDeque<Out>,
}

fn trust_state(t: Trust) -> TrustState {
    match t {
        Trust::Pinned => TrustState::Pinned,
        Trust::Trusted => TrustState::Trusted,
    }
}

impl Member {
    /// Load pins from the store.
    pub fn load(user: String, identity: Identity, store: &Store) -> Result<Member, StoreError> {
        let peers = Member::load_peers(store)?;
        Ok(Member {
            user,
            identity,
            link: Link::Down,
            link_since: 0,
            last_rx: 0,
            last_tx: 0,
            peers,
            sending: HashMap::new(),
            receiving: HashMap::new(),
            retry_at: None,
            relay_error: None,
            out: VecDeque::new(),
        })
    }

    fn load_peers(store: &Store) -> Result<BTreeMap<String, PeerState>, StoreError> {
        let mut peers = BTreeMap::new();
        for pin in store.pins()? {
            let Ok(pinned) = PublicKey::from_der(&pin.key) else {
                warn!("ignoring unreadable pin for {}", pin.user);
                continue;
            };
            let presented = pin.presented.and_then(|d| PublicKey::from_der(&d).ok());
            let trust = match pin.trust {
                PinTrust::Trusted => Trust::Trusted,
                PinTrust::Pinned => Trust::Pinned,
            };
            peers.insert(
                pin.user,
                PeerState {
                    pinned,
                    trust,
                    presented,
                    online: false,
                },
            );
        }
        Ok(peers)
    }

    /// After a failed commit: forget everything the database may not hold (pins, sessions,
    /// retry timer) and reload pins. The link must be restarted by the caller.
    pub fn reload(&mut self, store: &Store) -> Result<(), StoreError> {
        let fresh_peers = Member::load_peers(store)?;
        self.peers = fresh_peers;
        self.sending.clear();
        self.receiving.clear();
        self.out.clear();
        self.link = Link::Down;
        Ok(())
    }

    /// Own user name.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// Own identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The next action for the daemon.
    pub fn poll(&mut self) -> Option<Out> {
        self.out.pop_front()
    }

    /// Logged in to the relay.
    pub fn connected(&self) -> bool {
        self.link == Link::Established
    }

    /// Why the member is not connected (the relay's last refusal, or the daemon's last error).
    pub fn relay_error(&self) -> Option<&str> {
        self.relay_error.as_deref()
    }

    /// Record why the link is down (set by the daemon for connection errors).
    pub fn set_relay_error(&mut self, why: String) {
        self.relay_error = Some(why);
    }

    /// Peers online now.
    pub fn peers_online(&self) -> usize {
        self.peers.values().filter(|p| p.online).count()
    }

    /// A connection to the relay is open; expect its challenge.
    pub fn link_up(&mut self, now: u64) {
        self.link = Link::ExpectChallenge;
        self.link_since = now;
        self.last_rx = now;
        self.last_tx = now;
    }

    /// The connection to the relay is gone.
    pub fn link_down(&mut self) {
        self.link = Link::Down;
        for p in self.peers.values_mut() {
            p.online = false;
        }
    }

    fn frame(&mut self, msg: ToRelay, now: u64) {
        self.last_tx = now;
        self.out.push_back(Out::Frame(msg));
    }

    /// Keep-alive, timeouts, retries.
    pub fn tick(&mut self, now: u64, store: &mut Store) {
        match self.link {
            Link::Down => {}
            Link::Established => {
                if now.saturating_sub(self.last_rx) > SILENT_RELAY_MS {
                    self.relay_error = Some("relay stopped answering".into());
                    warn!(
                        "relay silent for {} s; reconnecting",
                        SILENT_RELAY_MS / 1000
                    );
                    self.out.push_back(Out::Close);
                } else if now.saturating_sub(self.last_tx) > PING_AFTER_MS {
                    self.frame(ToRelay::Ping, now);
                }
                if self.retry_at.is_some_and(|t| now >= t) {
                    self.retry_at = None;
                    self.resend_receipts(now, store);
                }
            }
            Link::ExpectChallenge | Link::ExpectWelcome => {
                if now.saturating_sub(self.link_since) > LOGIN_TIMEOUT_MS {
                    self.relay_error = Some("relay did not complete the login in time".into());
                    warn!("login to relay timed out; reconnecting");
                    self.out.push_back(Out::Close);
                }
            }
        }
    }

    /// One frame payload from the relay.
    pub fn receive(&mut self, payload: &[u8], now: u64, store: &mut Store) {
        match from_payload::<FromRelay>(payload) {
            Ok(msg) => self.handle(msg, now, store),
            Err(e) => {
                warn!("relay sent a malformed frame ({e}); reconnecting");
                self.relay_error = Some(format!("relay sent a malformed frame: {e}"));
                self.out.push_back(Out::Close);
            }
        }
    }

    /// One decoded message from the relay (the host's in-process relay skips the codec).
    pub fn handle(&mut self, msg: FromRelay, now: u64, store: &mut Store) {
        self.last_rx = now;
        if let FromRelay::Error { code, reason } = &msg {
            warn!("relay refused us ({code}): {reason}");
            self.relay_error = Some(format!("relay refused: {reason}"));
            self.out.push_back(Out::Close);
            return;
        }
        match (self.link, msg) {
            (Link::ExpectChallenge, FromRelay::Challenge { nonce, .. }) => {
                let t = login_transcript(&nonce, &self.user);
                match self.identity.sign(&mut OsRng, &t) {
                    Ok(signature) => {
                        let key = self.identity.public().der().to_vec();
                        let user = self.user.clone();
                        self.frame(
                            ToRelay::Login {
                                user,
                                key,
                                signature,
                            },
                            now,
                        );
                        self.link = Link::ExpectWelcome;
                    }
                    Err(e) => {
                        warn!("cannot sign login: {e}");
                        self.out.push_back(Out::Close);
                    }
                }
            }
            (Link::ExpectWelcome, FromRelay::Welcome { user, peers }) => {
                if user != self.user {
                    warn!("relay welcomed {user}, but we are {}", self.user);
                    self.out.push_back(Out::Close);
                    return;
                }
                let mut introduced = Vec::new();
                for p in peers {
                    if self.observe(&p, store) {
                        introduced.push(p.user);
                    }
                }
                self.link = Link::Established;
                for u in introduced {
                    self.release_held(&u, now, store);
                }
                self.relay_error = None;
                info!(
                    "logged in to relay as {} ({} peers online)",
                    self.user,
                    self.peers_online()
                );
                self.flush_outbox(now, store);
            }
            (Link::Established, msg) => self.established(msg, now, store),
            (link, msg) => {
                warn!(
                    "relay protocol violation: in state {link:?} got {}; reconnecting",
                    msg_name(&msg)
                );
                self.relay_error = Some(format!("relay protocol violation ({})", msg_name(&msg)));
                self.out.push_back(Out::Close);
            }
        }
    }

    fn established(&mut self, msg: FromRelay, now: u64, store: &mut Store) {
        match msg {
            FromRelay::Presence(p) => {
                if p.user == self.user {
                    return;
                }
                let was = self.peers.get(&p.user).map(|s| s.online);
                if self.observe(&p, store) {
                    self.release_held(&p.user, now, store);
                }
                if was != Some(p.online) {
                    let body = RecordBody::Presence {
                        user: p.user.clone(),
                        online: p.online,
                    };
                    self.record(now, &p.user, body, store);
                }
            }
            FromRelay::Directory(peers) => {
                for p in peers {
                    if self.observe(&p, store) {
                        self.release_held(&p.user, now, store);
                    }
                }
            }
            FromRelay::Deliver(Routed::Message(env)) => {
                self.accept_message(env, now, store);
            }
            FromRelay::Deliver(Routed::Receipt(r)) => self.accept_receipt(r, now, store),
            FromRelay::Accepted(key) => self.accepted(key, now, store),
            FromRelay::Refused { key, code, reason } => {
                self.refused(key, &code, &reason, now, store)
            }
            FromRelay::Pong => {}
            other => {
                warn!(
                    "relay protocol violation: got {} after login; reconnecting",
                    msg_name(&other)
                );
                self.out.push_back(Out::Close);
            }
        }
    }

    /// Take note of a directory entry: pin on first sight (TOFU), flag a changed key. True when
    /// the peer just became someone we accept messages from (first sight, or a change undone).
    fn observe(&mut self, p: &Peer, store: &mut Store) -> bool {
        if p.user == self.user || !valid_user(&p.user) {
            return false;
        }
        let key = match PublicKey::from_der(&p.key) {
            Ok(k) => k,
            Err(e) => {
                warn!("relay presented an unusable key for {}: {e}", p.user);
                return false;
            }
        };
        let mut acceptable = false;
        let changed = match self.peers.get_mut(&p.user) {
            None => {
                info!("pinned {} to {} (first sight)", p.user, key.fingerprint());
                self.peers.insert(
                    p.user.clone(),
                    PeerState {
                        pinned: key,
                        trust: Trust::Pinned,
                        presented: None,
                        online: p.online,
                    },
                );
                acceptable = true;
                true
            }
            Some(st) => {
                st.online = p.online;
                if st.pinned == key {
                    acceptable = st.presented.take().is_some();
                    acceptable
                } else if st.presented.as_ref() != Some(&key) {
                    warn!(
                        "key for {} changed: pinned {}, relay presents {}; refusing to send to or \
                         accept from {} until `chatctl trust {} {}`",
                        p.user,
                        st.pinned.fingerprint(),
                        key.fingerprint(),
                        p.user,
                        p.user,
                        key.fingerprint()
                    );
                    st.presented = Some(key);
                    true
                } else {
                    false
                }
            }
        };
        if changed {
            self.save_pin(&p.user, store);
        }
        acceptable
    }

    fn save_pin(&mut self, user: &str, store: &mut Store) {
        let Some(st) = self.peers.get(user) else {
            return;
        };
        let pin = Pin {
            user: user.to_string(),
            key: st.pinned.der().to_vec(),
            trust: match st.trust {
                Trust::Trusted => PinTrust::Trusted,
                Trust::Pinned => PinTrust::Pinned,
            },
            presented: st.presented.as_ref().map(|k| k.der().to_vec()),
        };
        if let Err(e) = store.put_pin(&pin) {
            warn!("cannot store pin for {user}: {e}");
        }
    }

    fn record(&mut self, now: u64, peer: &str, body: RecordBody, store: &mut Store) {
        match store.append(now, peer, body) {
            Ok(r) => self.out.push_back(Out::Record(r)),
            Err(e) => warn!("cannot store history record: {e}"),
        }
    }

    /// Offer every receipt in the outbox again (the relay drops what it already holds).
    fn resend_receipts(&mut self, now: u64, store: &mut Store) {
        match store.outbox() {
            Ok(items) => {
                for (key, bytes) in items {
                    if key.kind != Kind::Receipt {
                        continue;
                    }
                    if let Ok(item) = from_payload::<Routed>(&bytes) {
                        self.frame(ToRelay::Send(item), now);
                    }
                }
            }
            Err(e) => warn!("cannot read outbox: {e}"),
        }
    }

    fn flush_outbox(&mut self, now: u64, store: &mut Store) {
        let items = match store.outbox() {
            Ok(items) => items,
            Err(e) => {
                warn!("cannot read outbox: {e}");
                return;
            }
        };
        for (_, bytes) in items {
            match from_payload::<Routed>(&bytes) {
                Ok(item) => self.frame(ToRelay::Send(item), now),
                Err(e) => warn!("skipping unreadable outbox item: {e}"),
            }
        }
    }

    /// Seal `text` to each recipient and queue it. Every check happens before anything is
    /// stored, and a store failure rolls back the whole request: it is all or nothing.
    pub fn send(
        &mut self,
        to: &[String],
        all: bool,
        text: &str,
        now: u64,
        store: &mut Store,
    ) -> Result<Vec<Sent>, MemberError> {
        if text.len() > MAX_TEXT {
            return Err(MemberError::TextTooLong(text.len()));
        }
        let mut recipients: Vec<String> = Vec::new();
        if all {
            recipients.extend(
                self.peers
                    .iter()
                    .filter(|(_, p)| p.online)
                    .map(|(u, _)| u.clone()),
            );
            if recipients.is_empty() {
                return Err(MemberError::NoPeersOnline);
            }
        }
        for u in to {
            if !valid_user(u) {
                return Err(MemberError::BadUser(u.clone()));
            }
            if *u == self.user {
                return Err(MemberError::SelfSend);
            }
            if !self.peers.contains_key(u) {
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
            if let Some(st) = self.peers.get(u) {
                if let Some(p) = &st.presented {
                    return Err(MemberError::KeyChanged {
                        user: u.clone(),
                        pinned: st.pinned.fingerprint(),
                        presented: p.fingerprint(),
                    });
                }
            }
        }
        // Sessions as they were, so a failed request can forget sessions it made whose keys the
        // rollback takes out of the store (a receipt for them could never be checked).
        let prior: HashMap<String, [u8; 16]> = recipients
            .iter()
            .filter_map(|u| self.sending.get(u).map(|s| (u.clone(), s.id)))
            .collect();
        store.savepoint()?;
        let mut frames = Vec::new();
        let mut records = Vec::new();
        let mut results = Vec::new();
        for u in &recipients {
            match self.seal_one(u, text, now, store) {
                Ok((sent, item, record)) => {
                    results.push(sent);
                    frames.push(ToRelay::Send(item));
                    records.push(record);
                }
                Err(e) => {
                    store.rollback_savepoint();
                    for u in &recipients {
                        if self.sending.get(u).map(|s| s.id) != prior.get(u).copied() {
                            self.sending.remove(u);
                        }
                    }
                    return Err(e);
                }
            }
        }
        store.release_savepoint()?;
        for r in records {
            self.out.push_back(Out::Record(r));
        }
        if self.link == Link::Established {
            for f in frames {
                self.frame(f, now);
            }
        }
        Ok(results)
    }

    fn session_for(
        &mut self,
        to: &str,
        store: &mut Store,
    ) -> Result<&mut SendSession, MemberError> {
        let pinned = match self.peers.get(to) {
            Some(p) => p.pinned.clone(),
            None => return Err(MemberError::UnknownUser(to.into())),
        };
        let fresh = match self.sending.get(to) {
            Some(s) => s.peer != pinned.fingerprint() || s.next >= SESSION_MESSAGES,
            None => true,
        };
        if fresh {
            let mut id = [0u8; 16];
            OsRng.fill_bytes(&mut id);
            let key = SessionKey::random(&mut OsRng);
            let kp = make_key_packet(
                &mut OsRng,
                &self.identity,
                &self.user,
                to,
                &pinned,
                &id,
                &key,
            )
            .map_err(MemberError::Crypto)?;
            store.put_session(true, to, &id, key.expose())?;
            self.sending.insert(
                to.to_string(),
                SendSession {
                    id,
                    key,
                    peer: pinned.fingerprint(),
                    next: 0,
                    key_packet: Some(kp),
                },
            );
        }
        self.sending
            .get_mut(to)
            .ok_or_else(|| MemberError::UnknownUser(to.into()))
    }

    fn seal_one(
        &mut self,
        to: &str,
        text: &str,
        now: u64,
        store: &mut Store,
    ) -> Result<(Sent, Routed, Record), MemberError> {
        let from = self.user.clone();
        let s = self.session_for(to, store)?;
        let counter = s.next;
        s.next += 1;
        let mut id = [0u8; 16];
        OsRng.fill_bytes(&mut id);
        let mut env = Envelope {
            id,
            from: from.clone(),
            to: to.to_string(),
            time_ms: now,
            session: s.id,
            counter,
            key_packet: s.key_packet.clone(),
            ciphertext: Vec::new(),
        };
        env.ciphertext = seal_envelope(&s.key, &Header::of(&env), text.as_bytes());
        let session = s.id;
        let item = Routed::Message(env);
        let bytes = to_payload(&item).map_err(|_| MemberError::TextTooLong(text.len()))?;
        store.add_message(&id, to, Dir::Out, MsgState::Queued, &session, counter)?;
        store.outbox_push(item.key(), &bytes)?;
        let record = store.append(
            now,
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

    fn ack(&mut self, key: ItemKey, now: u64) {
        self.frame(ToRelay::Ack(key), now);
    }

    /// Handle a delivered message. Anything we will never be able to accept is acknowledged
    /// (and logged) so the relay stops redelivering it; anything that may become acceptable
    /// (a sender whose key changed) is held unacknowledged.
    /// True when the envelope is settled (stored, held, or rejected and acknowledged); false
    /// when a storage error left it for a later delivery.
    fn accept_message(&mut self, env: Envelope, now: u64, store: &mut Store) -> bool {
        let key = ItemKey {
            kind: Kind::Message,
            id: env.id,
        };
        let idh = hex(&env.id);
        if env.to != self.user {
            warn!("dropped message {idh}: addressed to {}, not to us", env.to);
            {
                self.ack(key, now);
                return true;
            }
        }
        match store.has_message(&env.id) {
            Ok(true) => {
                self.ack(key, now);
                return true;
            }
            Ok(false) => {}
            Err(e) => {
                // Not acknowledged: the relay delivers it again later.
                warn!("cannot check message {idh}: {e}");
                return false;
            }
        }
        let Some(peer) = self.peers.get(&env.from) else {
            warn!(
                "holding message {idh} from {}, whom the relay has not introduced yet",
                env.from
            );
            return self.hold(env, now, store);
        };
        if let Some(p) = &peer.presented {
            warn!(
                "holding message {idh} from {}: their key changed (pinned {}, presented {}); \
                 it is opened if you `chatctl trust` a key that signed it",
                env.from,
                peer.pinned.fingerprint(),
                p.fingerprint()
            );
            return self.hold(env, now, store);
        }
        let sender = peer.pinned.clone();
        let session_key = match self.receiving_key(&env, &sender, store) {
            Ok(k) => k,
            Err(KeyFail::Reject(why)) => {
                warn!("rejected message {idh} from {}: {why}", env.from);
                self.ack(key, now);
                return true;
            }
            Err(KeyFail::Store(e)) => {
                // Not acknowledged: the relay delivers it again later.
                warn!("cannot look up the session of message {idh}: {e}");
                return false;
            }
        };
        match store.seen_counter(&env.from, &env.session, env.counter) {
            Ok(false) => {}
            Ok(true) => {
                warn!(
                    "rejected message {idh} from {}: replayed session counter",
                    env.from
                );
                {
                    self.ack(key, now);
                    return true;
                }
            }
            Err(e) => {
                warn!("cannot check message {idh}: {e}");
                return false;
            }
        }
        let text = match open_envelope(&session_key, &env) {
            Ok(t) => t,
            Err(e) => {
                warn!("rejected message {idh} from {}: {e}", env.from);
                {
                    self.ack(key, now);
                    return true;
                }
            }
        };
        let text = match String::from_utf8(text) {
            Ok(t) if t.len() <= MAX_TEXT => t,
            _ => {
                warn!(
                    "rejected message {idh} from {}: text is not UTF-8 of at most 64 KiB",
                    env.from
                );
                {
                    self.ack(key, now);
                    return true;
                }
            }
        };
        let receipt = Receipt {
            id: env.id,
            from: self.user.clone(),
            to: env.from.clone(),
            session: env.session,
            counter: env.counter,
            tag: receipt_tag(
                &session_key,
                &env.id,
                &self.user,
                &env.from,
                &env.session,
                env.counter,
            ),
        };
        let receipt = Routed::Receipt(receipt);
        let stored = (|| -> Result<Record, StoreError> {
            store.savepoint()?;
            store.add_message(
                &env.id,
                &env.from,
                Dir::In,
                MsgState::Delivered,
                &env.session,
                env.counter,
            )?;
            let bytes = to_payload(&receipt).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            store.outbox_push(receipt.key(), &bytes)?;
            let r = store.append(
                now,
                &env.from,
                RecordBody::Message {
                    id: env.id,
                    from: env.from.clone(),
                    to: env.to.clone(),
                    dir: Dir::In,
                    text,
                },
            )?;
            store.release_savepoint()?;
            Ok(r)
        })();
        match stored {
            Ok(r) => {
                self.out.push_back(Out::Record(r));
                self.frame(ToRelay::Send(receipt), now);
                self.ack(key, now);
                true
            }
            Err(e) => {
                store.rollback_savepoint();
                warn!("cannot store message {idh}: {e}; the relay keeps it for later");
                false
            }
        }
    }

    /// Keep an envelope we cannot judge yet in our own database and acknowledge it, so it
    /// neither clogs the relay's delivery window nor depends on the relay keeping it.
    fn hold(&mut self, env: Envelope, now: u64, store: &mut Store) -> bool {
        let key = ItemKey {
            kind: Kind::Message,
            id: env.id,
        };
        let item = Routed::Message(env);
        let from = item.from().to_string();
        let stored = to_payload(&item)
            .map_err(|e| StoreError::Corrupt(e.to_string()))
            .and_then(|bytes| store.hold(&key.id, &from, &bytes));
        match stored {
            Ok(()) => {
                self.ack(key, now);
                true
            }
            // Not acknowledged: the relay keeps it and delivers it again.
            Err(e) => {
                warn!("cannot hold message {}: {e}", hex(&key.id));
                false
            }
        }
    }

    /// Judge again what we held from `user` (after `trust`, or when the relay introduces them).
    fn release_held(&mut self, user: &str, now: u64, store: &mut Store) {
        let items = match store.held(user) {
            Ok(items) => items,
            Err(e) => {
                warn!("cannot read held messages from {user}: {e}");
                return;
            }
        };
        for (id, bytes) in items {
            if let Err(e) = store.unhold(&id) {
                warn!("cannot release held message {}: {e}", hex(&id));
                continue;
            }
            match from_payload::<Routed>(&bytes) {
                Ok(Routed::Message(env)) => {
                    if !self.accept_message(env, now, store) {
                        // Not settled (a storage error): keep it held for the next chance.
                        let _ = store.hold(&id, user, &bytes);
                    }
                }
                _ => warn!("dropped unreadable held message {}", hex(&id)),
            }
        }
    }

    fn receiving_key(
        &mut self,
        env: &Envelope,
        sender: &PublicKey,
        store: &mut Store,
    ) -> Result<SessionKey, KeyFail> {
        let cache_key = (env.from.clone(), env.session);
        if let Some(k) = self.receiving.get(&cache_key) {
            return Ok(k.clone());
        }
        if let Some(raw) = store
            .session(false, &env.from, &env.session)
            .map_err(KeyFail::Store)?
        {
            let k = SessionKey::from_bytes(&raw)
                .ok_or_else(|| KeyFail::Reject("stored session key is corrupt".into()))?;
            self.receiving.insert(cache_key, k.clone());
            return Ok(k);
        }
        let Some(kp) = &env.key_packet else {
            return Err(KeyFail::Reject("unknown session and no key packet".into()));
        };
        // Signature first, private key second: see crypto::unwrap_key_packet.
        let k = unwrap_key_packet(&mut OsRng, &self.identity, sender, env, kp)
            .map_err(|e| KeyFail::Reject(e.to_string()))?;
        store
            .put_session(false, &env.from, &env.session, k.expose())
            .map_err(KeyFail::Store)?;
        self.receiving.insert(cache_key, k.clone());
        Ok(k)
    }

    fn accept_receipt(&mut self, r: Receipt, now: u64, store: &mut Store) {
        let key = ItemKey {
            kind: Kind::Receipt,
            id: r.id,
        };
        let idh = hex(&r.id);
        let found = match store.outgoing(&r.id) {
            Ok(f) => f,
            Err(e) => {
                warn!("cannot look up message {idh}: {e}");
                return;
            }
        };
        let Some((peer, session, counter, state)) = found else {
            warn!("dropped receipt for unknown message {idh}");
            return self.ack(key, now);
        };
        if r.to != self.user || r.from != peer || r.session != session || r.counter != counter {
            warn!("dropped receipt for message {idh}: it does not match the message");
            return self.ack(key, now);
        }
        let sk = match self.sending.get(&peer).filter(|s| s.id == session) {
            Some(s) => Some(s.key.clone()),
            None => store
                .session(true, &peer, &session)
                .ok()
                .flatten()
                .and_then(|raw| SessionKey::from_bytes(&raw)),
        };
        let Some(sk) = sk else {
            warn!("dropped receipt for message {idh}: session key unknown");
            return self.ack(key, now);
        };
        if verify_receipt(&sk, &r).is_err() {
            warn!("dropped forged receipt for message {idh}");
            return self.ack(key, now);
        }
        if let Some(s) = self.sending.get_mut(&peer) {
            if s.id == session {
                s.key_packet = None;
            }
        }
        if state != MsgState::Delivered {
            let res = (|| -> Result<Record, StoreError> {
                store.set_state(&r.id, MsgState::Delivered)?;
                store.outbox_remove(ItemKey {
                    kind: Kind::Message,
                    id: r.id,
                })?;
                store.append(
                    now,
                    &peer,
                    RecordBody::Receipt {
                        id: r.id,
                        to: peer.clone(),
                        state: MsgState::Delivered,
                        reason: None,
                    },
                )
            })();
            match res {
                Ok(rec) => {
                    self.out.push_back(Out::Record(rec));
                    self.out
                        .push_back(Out::State(r.id, MsgState::Delivered, None));
                }
                Err(e) => {
                    warn!("cannot store receipt for {idh}: {e}");
                    return;
                }
            }
        }
        self.ack(key, now);
    }

    fn accepted(&mut self, key: ItemKey, now: u64, store: &mut Store) {
        let removed = match store.outbox_remove(key) {
            Ok(r) => r,
            Err(e) => {
                warn!("cannot update outbox: {e}");
                return;
            }
        };
        if key.kind != Kind::Message || !removed {
            return;
        }
        match store.outgoing(&key.id) {
            Ok(Some((peer, _, _, MsgState::Queued))) => {
                if let Err(e) = store.set_state(&key.id, MsgState::Relayed) {
                    warn!("cannot update message state: {e}");
                    return;
                }
                let body = RecordBody::Receipt {
                    id: key.id,
                    to: peer.clone(),
                    state: MsgState::Relayed,
                    reason: None,
                };
                self.record(now, &peer, body, store);
                self.out
                    .push_back(Out::State(key.id, MsgState::Relayed, None));
            }
            Ok(_) => {}
            Err(e) => warn!("cannot read message state: {e}"),
        }
    }

    fn refused(
        &mut self,
        key: ItemKey,
        code: &RefuseCode,
        reason: &str,
        now: u64,
        store: &mut Store,
    ) {
        let idh = hex(&key.id);
        warn!("relay refused {:?} {idh} ({code}): {reason}", key.kind);
        if key.kind == Kind::Receipt && code.is_transient() {
            // A passing condition at the relay: keep the receipt and offer it again later, so
            // the sender still learns that its message was delivered.
            self.retry_at = Some(now + RETRY_REFUSED_MS);
            return;
        }
        if let Err(e) = store.outbox_remove(key) {
            warn!("cannot update outbox: {e}");
            return;
        }
        if key.kind != Kind::Message {
            return;
        }
        if let Ok(Some((peer, _, _, state))) = store.outgoing(&key.id) {
            if state == MsgState::Delivered || state == MsgState::Failed {
                return;
            }
            if let Err(e) = store.set_state(&key.id, MsgState::Failed) {
                warn!("cannot update message state: {e}");
            }
            let why = format!("{code}: {reason}");
            let body = RecordBody::Receipt {
                id: key.id,
                to: peer.clone(),
                state: MsgState::Failed,
                reason: Some(why.clone()),
            };
            self.record(now, &peer, body, store);
            self.out
                .push_back(Out::State(key.id, MsgState::Failed, Some(why)));
        }
    }

    /// Accept `user`'s current key (after a change) or re-confirm the pinned one.
    pub fn trust(
        &mut self,
        user: &str,
        fingerprint: &str,
        now: u64,
        store: &mut Store,
    ) -> Result<String, MemberError> {
        let given = Fingerprint::parse(fingerprint).map_err(MemberError::BadFingerprint)?;
        let st = self
            .peers
            .get_mut(user)
            .ok_or_else(|| MemberError::UnknownUser(user.into()))?;
        let msg = if st.presented.as_ref().map(|k| k.fingerprint()) == Some(given) {
            if let Some(k) = st.presented.take() {
                st.pinned = k;
            }
            st.trust = Trust::Trusted;
            warn!("{user}'s new key {given} is now trusted (by chatctl trust)");
            format!("{user}'s new key {given} is trusted")
        } else if st.pinned.fingerprint() == given {
            st.trust = Trust::Trusted;
            match &st.presented {
                Some(p) => {
                    let p = p.fingerprint();
                    format!("{user}'s pinned key {given} is trusted; the relay still presents another key ({p}), so {user} stays `changed`")
                }
                None => format!("{user}'s key {given} is trusted"),
            }
        } else {
            let current = st.presented.as_ref().unwrap_or(&st.pinned).fingerprint();
            return Err(MemberError::FingerprintMismatch {
                user: user.into(),
                given,
                current,
            });
        };
        self.sending.remove(user);
        self.save_pin(user, store);
        self.release_held(user, now, store);
        Ok(msg)
    }

    /// The directory as `who` shows it.
    pub fn who(&self) -> Vec<PeerView> {
        self.peers
            .iter()
            .map(|(user, st)| PeerView {
                user: user.clone(),
                online: st.online,
                trust: if st.presented.is_some() {
                    TrustState::Changed
                } else {
                    trust_state(st.trust)
                },
                fingerprint: st.pinned.fingerprint().to_string(),
                presented: st.presented.as_ref().map(|k| k.fingerprint().to_string()),
            })
            .collect()
    }

    /// A peer's pinned fingerprint.
    pub fn pinned(&self, user: &str) -> Option<Fingerprint> {
        self.peers.get(user).map(|p| p.pinned.fingerprint())
    }
}

fn msg_name(m: &FromRelay) -> &'static str {
    match m {
        FromRelay::Challenge { .. } => "Challenge",
        FromRelay::Welcome { .. } => "Welcome",
        FromRelay::Directory(_) => "Directory",
        FromRelay::Presence(_) => "Presence",
        FromRelay::Deliver(_) => "Deliver",
        FromRelay::Accepted(_) => "Accepted",
        FromRelay::Refused { .. } => "Refused",
        FromRelay::Pong => "Pong",
        FromRelay::Error { .. } => "Error",
    }
}

#[cfg(test)]
mod tests;
