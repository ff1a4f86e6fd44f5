//! The member role as a sans-I/O state machine: the login handshake, the outbox, sending and
//! receiving sessions, trust (TOFU pins), and the history records that `chatctl tail` shows.
//!
//! The daemon tells it when the link to the relay comes up or goes down, feeds it frame payloads
//! and clock ticks, and forwards `chatctl` requests; it answers with [`Out`] actions (frames for
//! the relay, events for control clients, a request to close the link) and writes through the
//! [`MemberStore`]. Must never: touch a socket, log a message text or key, seal to or accept from a peer
//! whose key changed and is not trusted yet, or run a private-key operation on a key packet before
//! the pinned sender's signature on it has verified.
//!
//! As quinn-proto splits its connection, each concern is a sub-state in its own file that owns
//! its data and answers through narrow methods: `peers.rs` (pins, trust, presence),
//! `presence.rs` (which presence changes become history records), `link.rs` (the login states
//! and their timers), `send.rs` (sessions, sealing, the outbox, sends sealed over several turns,
//! rekey answers), `receive.rs` (judge, then settle, what the relay delivers; the bounds on
//! holding). This file holds them together: loading, dispatching what the relay sends, and
//! queueing what the sub-states return, so that every frame that leaves passes `Member::emit`
//! and the link's send timer sees it.

mod error;
mod link;
mod lookup;
mod out;
mod peers;
mod presence;
mod receive;
mod send;

use crate::clock::Now;
use std::collections::VecDeque;

use log::{info, warn};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::crypto::{login_transcript, sign_rekey, Fingerprint, Identity};
use crate::proto::control::{KeyEvent, PeerView, RecordBody, Sent};
use crate::proto::relay::{Envelope, FromRelay, Peer, Rekey, Routed, ToRelay};
use crate::proto::{from_payload, hex, to_payload};
use crate::store::{MemberStore, StoreError};

pub use error::MemberError;
pub use out::{ListPage, Out};
pub use receive::HoldLimits;
pub use send::SESSION_MESSAGES;

use link::{msg_name, Due, Link, Login, SILENT_RELAY_MS};
pub use lookup::LOOKUP_TIMEOUT_MS;
use lookup::{Ask, Lookups};
use peers::{Observed, Peers, Trusted};
use presence::Presence;
use receive::Receiving;
use send::{RekeyRefused, Sending};

/// The member's state.
pub struct Member {
    user: String,
    identity: Identity,
    link: Link,
    peers: Peers,
    presence: Presence,
    sending: Sending,
    receiving: Receiving,
    relay_error: Option<String>,
    out: VecDeque<Out>,
    /// The most recipients `send --all` may reach (`max_fanout`).
    max_fanout: usize,
    /// An established link went down and its `Link` record is not written yet: `link_down` has
    /// no store, so the next `tick` (due at once) writes it, with the reason the daemon gave.
    down_record: bool,
    lookups: Lookups,
    /// The pin bound was logged (once per run: a relay could otherwise flood the log).
    pins_full_said: bool,
}

/// How [`Member::send_or_start`] took a send.
#[derive(Debug)]
pub enum Started {
    /// Sealed and queued now.
    Queued(Vec<Sent>),
    /// Checked, and being sealed over the next turns; [`Out::Sealed`] with this id follows.
    Sealing(u64),
}

/// Held envelopes read into memory at a time when they are released.
const RELEASE_BATCH: usize = 16;

/// The default of `max_fanout`: `send --all` is for a room, not a broadcast to a whole relay.
pub const DEFAULT_MAX_FANOUT: usize = 1000;

impl Member {
    /// Load pins from the store.
    pub fn load(
        user: String,
        identity: Identity,
        store: &dyn MemberStore,
    ) -> Result<Member, StoreError> {
        let peers = Peers::from_pins(store.pins()?);
        Ok(Member {
            user,
            identity,
            link: Link::Down,
            peers,
            presence: Presence::default(),
            sending: Sending::new(StdRng::from_entropy()),
            receiving: Receiving::new(HoldLimits::default()),
            relay_error: None,
            out: VecDeque::new(),
            max_fanout: DEFAULT_MAX_FANOUT,
            down_record: false,
            lookups: Lookups::default(),
            pins_full_said: false,
        })
    }

    /// After a failed commit: forget everything the database may not hold (pins, sessions,
    /// retry timer) and reload pins. The link must be restarted by the caller.
    pub fn reload(&mut self, store: &dyn MemberStore) -> Result<(), StoreError> {
        self.peers = Peers::from_pins(store.pins()?);
        self.presence = Presence::default();
        // Sessions and the receipt retry timer together: the outbox the timer would resend may
        // be rolled back, and the next login offers whatever it still holds.
        self.sending.reset();
        self.receiving = Receiving::new(self.receiving.limits().clone());
        self.out.clear();
        self.link_down();
        // The daemon restarts the link after a failed commit: not news for the history (and
        // the store may still be failing).
        self.down_record = false;
        Ok(())
    }

    /// Draw ids, session keys and signature salts from a fixed seed from now on (deterministic
    /// tests only: everything random becomes predictable).
    #[cfg(test)]
    pub(crate) fn seed_rng(&mut self, seed: u64) {
        *self.sending.rng() = StdRng::seed_from_u64(seed);
    }

    /// Set the most recipients `send --all` may reach (config, reload).
    pub fn set_max_fanout(&mut self, max: usize) {
        self.max_fanout = max;
    }

    /// Set the bounds on held envelopes (config, reload).
    pub fn set_hold_limits(&mut self, limits: HoldLimits) {
        self.receiving.set_limits(limits);
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

    /// Whether actions wait for [`Self::poll`]: the daemon must not sleep on them (a host's link
    /// is attached before the loop's first turn).
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Logged in to the relay.
    pub fn connected(&self) -> bool {
        self.link.established()
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
        self.peers.online_count()
    }

    /// An in-process connection to the relay is open (a host's own link: no TLS); expect its
    /// challenge.
    pub fn link_up(&mut self, now: Now) {
        self.link_up_bound(now, Vec::new());
    }

    /// A TLS connection to the relay is up; `channel` is its exporter value, which the login
    /// signs (PROTOCOL.md "Connecting"). Expect the relay's challenge.
    pub fn link_up_bound(&mut self, now: Now, channel: Vec<u8>) {
        self.link = Link::up(now.mono, channel);
    }

    /// The connection to the relay is gone.
    pub fn link_down(&mut self) {
        // Only a link that was up is news: a failed reconnect every few seconds is not.
        self.down_record |= self.link.established();
        self.link = Link::Down;
        self.peers.all_offline();
        let (asked, listings) = self.lookups.reset();
        for req in listings {
            self.out.push_back(Out::Listed {
                req,
                page: Err("the connection to the relay went down".into()),
            });
        }
        if asked {
            // Requests parked on a lookup get their answer now: there is no relay to ask.
            self.out.push_back(Out::Looked);
        }
        self.presence.link_down();
    }

    fn frame(&mut self, msg: ToRelay, now: Now) {
        self.link.sent(now.mono);
        self.out.push_back(Out::Frame(msg));
    }

    /// Queue what a sub-state returned, in order; a frame restarts the link's send timer.
    fn emit(&mut self, now: Now, outs: Vec<Out>) {
        for o in outs {
            if matches!(o, Out::Frame(_)) {
                self.link.sent(now.mono);
            }
            self.out.push_back(o);
        }
    }

    fn close(&mut self) {
        self.out.push_back(Out::Close);
    }

    /// The next instant (monotonic ms) at which [`Member::tick`] has something to do, so the
    /// daemon sleeps until then (quinn's `poll_timeout`).
    pub fn next_deadline(&self) -> Option<u64> {
        let retry = self.sending.retry_at().filter(|_| self.link.established());
        // A send being sealed goes on at the next turn; a link record waits for none.
        let work = self.sending.working().then_some(0);
        let record = self.down_record.then_some(0);
        [
            self.link.deadline(),
            retry,
            self.presence.next_deadline(),
            work,
            record,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Keep-alive, timeouts, retries, presence records that settled, the next slice of a send
    /// being sealed.
    pub fn tick(&mut self, now: Now, store: &mut dyn MemberStore) {
        if std::mem::take(&mut self.down_record) {
            let body = RecordBody::Link {
                up: false,
                reason: Some(
                    self.relay_error
                        .clone()
                        .unwrap_or_else(|| "connection closed".into()),
                ),
                online: Vec::new(),
                peers_online: 0,
            };
            let mut outs = Vec::new();
            out::record(store, now, "", body, &mut outs);
            self.emit(now, outs);
        }
        self.work(now, store);
        let mut outs = Vec::new();
        for (user, online, wall) in self.presence.due(now.mono) {
            let body = RecordBody::Presence {
                user: user.clone(),
                online,
            };
            // Stamped with the time of the change, not of the record.
            let at = Now { wall, ..now };
            out::record(store, at, &user, body, &mut outs);
        }
        self.emit(now, outs);
        match self.link.due(now.mono) {
            None => {}
            Some(Due::Ping) => self.frame(ToRelay::Ping, now),
            Some(Due::Silent) => {
                self.relay_error = Some("relay stopped answering".into());
                warn!(
                    "relay silent for {} s; reconnecting",
                    SILENT_RELAY_MS / 1000
                );
                self.close();
            }
            Some(Due::LoginLate) => {
                self.relay_error = Some("relay did not complete the login in time".into());
                warn!("login to relay timed out; reconnecting");
                self.close();
            }
        }
        if self.link.established() && self.sending.retry_due(now) {
            // Offer every receipt in the outbox again (the relay drops what it already holds).
            for item in send::outbox(store, true) {
                self.frame(ToRelay::Send(item), now);
            }
        }
    }

    /// One frame payload from the relay.
    pub fn receive(&mut self, payload: &[u8], now: Now, store: &mut dyn MemberStore) {
        match from_payload::<FromRelay>(payload) {
            Ok(msg) => self.handle(msg, now, store),
            Err(e) => {
                warn!("relay sent a malformed frame ({e}); reconnecting");
                self.relay_error = Some(format!("relay sent a malformed frame: {e}"));
                self.close();
            }
        }
    }

    /// One decoded message from the relay (the host's in-process relay skips the codec).
    pub fn handle(&mut self, msg: FromRelay, now: Now, store: &mut dyn MemberStore) {
        self.link.heard(now.mono);
        if let FromRelay::Error { code, reason } = &msg {
            warn!("relay refused us ({code}): {reason}");
            self.relay_error = Some(format!("relay refused: {reason}"));
            self.close();
            return;
        }
        // Each arm puts back the state it took: the next one, or the same one.
        match (self.link.take(), msg) {
            (Link::ExpectChallenge(login), FromRelay::Challenge { nonce, .. }) => {
                self.challenged(login, &nonce, now)
            }
            (Link::ExpectWelcome(login), FromRelay::Welcome { user, peers }) => {
                self.welcomed(login, user, peers, now, store)
            }
            (link @ Link::Established(_), msg) => {
                self.link = link;
                self.established(msg, now, store)
            }
            (link, msg) => {
                warn!(
                    "relay protocol violation: in state {} got {}; reconnecting",
                    link.name(),
                    msg_name(&msg)
                );
                self.link = link;
                self.relay_error = Some(format!("relay protocol violation ({})", msg_name(&msg)));
                self.close();
            }
        }
    }

    fn challenged(&mut self, login: Login, nonce: &[u8; 32], now: Now) {
        let t = login_transcript(nonce, &self.user, &login.channel);
        match self.identity.sign(self.sending.rng(), &t) {
            Ok(signature) => {
                self.link = Link::ExpectWelcome(login.login_sent(now.mono));
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
            }
            Err(e) => {
                self.link = Link::ExpectChallenge(login);
                warn!("cannot sign login: {e}");
                self.close();
            }
        }
    }

    fn welcomed(
        &mut self,
        login: Login,
        user: String,
        peers: Vec<Peer>,
        now: Now,
        store: &mut dyn MemberStore,
    ) {
        if user != self.user {
            self.link = Link::ExpectWelcome(login);
            warn!("relay welcomed {user}, but we are {}", self.user);
            self.close();
            return;
        }
        let mut introduced = Vec::new();
        for p in peers {
            if self.observe(&p, now, store) {
                introduced.push(p.user);
            }
        }
        self.link = Link::Established(login.welcomed(now.mono));
        for u in introduced {
            self.release_held(&u, now, store);
        }
        self.relay_error = None;
        info!(
            "logged in to relay as {} ({} peers online)",
            self.user,
            self.peers_online()
        );
        let mut online: Vec<String> = self.peers.online_users().map(String::from).collect();
        online.sort();
        let peers_online = online.len() as u64;
        online.truncate(crate::proto::control::LINK_ONLINE_MAX);
        let body = RecordBody::Link {
            up: true,
            reason: None,
            online,
            peers_online,
        };
        let mut outs = Vec::new();
        out::record(store, now, "", body, &mut outs);
        self.emit(now, outs);
        for item in send::outbox(store, false) {
            self.frame(ToRelay::Send(item), now);
        }
        // Follow every contact: their keys (a change is caught at login, as a full directory
        // would catch it), whether they are online, and from now on their joins and leaves.
        // Two chunks at a time, the next as each answer comes, so a member with many contacts
        // is never sent more than it reads.
        let chunks: Vec<Vec<String>> = self
            .peers
            .names()
            .chunks(crate::proto::LOOKUP_CHUNK)
            .map(<[String]>::to_vec)
            .collect();
        for chunk in self.lookups.start_login(chunks) {
            self.frame(ToRelay::Lookup(chunk), now);
        }
    }

    /// Ask the relay for `user`'s key, unless that is already under way.
    fn ask(&mut self, user: &str, now: Now) -> Ask {
        if !self.link.established() {
            return Ask::Full;
        }
        let ask = self.lookups.ask(user, now.mono);
        if ask == Ask::Send {
            self.frame(ToRelay::Lookup(vec![user.to_string()]), now);
        }
        ask
    }

    /// A `Keys` answer: pin on first sight what we asked for, check what we know.
    fn keys(
        &mut self,
        peers: Vec<Peer>,
        unknown: Vec<String>,
        now: Now,
        store: &mut dyn MemberStore,
    ) {
        for p in peers {
            let asked = self.lookups.answered(&p.user);
            // Only names we asked for or already pinned: a relay cannot push pins on us.
            if !asked && !self.peers.knows(&p.user) {
                continue;
            }
            if self.observe(&p, now, store) {
                self.release_held(&p.user, now, store);
            }
        }
        for u in unknown {
            if self.lookups.not_bound(&u) {
                info!("the relay has no user named {u}");
            }
        }
        if let Some(next) = self.lookups.next_login_chunk() {
            self.frame(ToRelay::Lookup(next), now);
        }
        self.out.push_back(Out::Looked);
    }

    /// A `Listing` answer: the page for the oldest listing in flight.
    fn listing(&mut self, peers: Vec<Peer>, more: bool, now: Now, store: &mut dyn MemberStore) {
        let Some((req, after)) = self.lookups.listed() else {
            warn!("relay sent a directory page nobody asked for; ignored");
            return;
        };
        // Each page must move forward, or a relay could keep `who --all` going for ever.
        let mut last = after.as_str();
        for p in &peers {
            if p.user.as_str() <= last {
                warn!("relay sent a directory page out of order; the listing is stopped");
                self.out.push_back(Out::Listed {
                    req,
                    page: Err("the relay sent a directory page out of order".into()),
                });
                return;
            }
            last = p.user.as_str();
        }
        let next = if more {
            peers.last().map(|p| p.user.clone())
        } else {
            None
        };
        let mut views = Vec::with_capacity(peers.len());
        for p in peers {
            if p.user == self.user || !crate::proto::valid_user(&p.user) {
                continue;
            }
            if self.peers.knows(&p.user) {
                // A contact: its entry is checked like any other presentation of its key.
                self.observe(&p, now, store);
                views.extend(self.peers.view(&p.user));
            } else if let Ok(k) = crate::crypto::PublicKey::from_der(&p.key) {
                views.push(PeerView {
                    user: p.user,
                    online: p.online,
                    trust: crate::proto::control::TrustState::Bound,
                    fingerprint: k.fingerprint().to_string(),
                    presented: None,
                });
            }
        }
        self.out.push_back(Out::Listed {
            req,
            page: Ok(ListPage { views, next }),
        });
    }

    /// Ask the relay for the page of its directory after `after`, for listing `req`.
    pub fn list(
        &mut self,
        req: u64,
        after: &str,
        prefix: &str,
        now: Now,
    ) -> Result<(), MemberError> {
        if !self.link.established() {
            return Err(MemberError::NotConnected);
        }
        self.lookups.listing(req, after);
        self.frame(
            ToRelay::List {
                after: after.to_string(),
                prefix: prefix.to_string(),
            },
            now,
        );
        Ok(())
    }

    /// The requests parked on missing names have been answered: forget the answers.
    pub fn clear_missing(&mut self) {
        self.lookups.clear_missing();
    }

    fn established(&mut self, msg: FromRelay, now: Now, store: &mut dyn MemberStore) {
        match msg {
            FromRelay::Presence(p) => {
                if p.user == self.user {
                    return;
                }
                let known_before = self.peers.knows(&p.user);
                if self.observe(&p, now, store) {
                    self.release_held(&p.user, now, store);
                }
                if !known_before && self.peers.knows(&p.user) {
                    // A new contact from a room's presence: follow it, so its joins and leaves
                    // keep coming if the relay outgrows a room.
                    self.ask(&p.user, now);
                }
                // Recorded once it has settled (see `presence`), so churn cannot bury messages.
                if self.peers.knows(&p.user) {
                    self.presence.changed(&p.user, p.online, now.mono, now.wall);
                }
            }
            FromRelay::Directory(peers) => {
                for p in peers {
                    let new = !self.peers.knows(&p.user);
                    if self.observe(&p, now, store) {
                        self.release_held(&p.user, now, store);
                    }
                    if new && self.peers.knows(&p.user) {
                        // Pinned after the login's lookups went out: follow it too.
                        self.ask(&p.user, now);
                    }
                }
            }
            FromRelay::Keys { peers, unknown } => self.keys(peers, unknown, now, store),
            FromRelay::Listing { peers, more } => self.listing(peers, more, now, store),
            FromRelay::Deliver(Routed::Message(env)) => {
                self.accept(env, now, store);
            }
            FromRelay::Deliver(Routed::Rekey(r)) => self.rekey(r, now, store),
            FromRelay::Deliver(Routed::Receipt(r)) => {
                let verdict = receive::judge_receipt(&self.user, &self.sending, &r, store);
                let mut outs = Vec::new();
                receive::settle_receipt(&mut self.sending, &r, verdict, now, store, &mut outs);
                self.emit(now, outs);
            }
            FromRelay::Accepted(key) => {
                let outs = self.sending.accepted(key, now, store);
                self.emit(now, outs);
            }
            FromRelay::Refused { key, code, reason } => {
                let outs = self.sending.refused(key, &code, &reason, now, store);
                self.emit(now, outs);
            }
            FromRelay::Pong => {}
            other => {
                warn!(
                    "relay protocol violation: got {} after login; reconnecting",
                    msg_name(&other)
                );
                self.close();
            }
        }
    }

    /// Take note of a directory entry (see [`Peers::observe`]), log it, record a key event,
    /// and save a changed pin. True when the peer just became someone we accept messages from.
    /// Every path that learns a peer's key (welcome, presence, directory, a key looked up by
    /// name) comes through here, so no key event escapes the history.
    fn observe(&mut self, p: &Peer, now: Now, store: &mut dyn MemberStore) -> bool {
        let seen = self.peers.observe(&self.user, p);
        match &seen {
            Observed::Unusable(e) => {
                warn!("relay presented an unusable key for {}: {e}", p.user)
            }
            Observed::FirstSight(fp) => {
                self.key_event(&p.user, KeyEvent::Pinned, fp, None, now, store)
            }
            Observed::Changed { pinned, presented } => self.key_event(
                &p.user,
                KeyEvent::Changed,
                presented,
                Some(pinned),
                now,
                store,
            ),
            Observed::Returned { pinned, presented } => self.key_event(
                &p.user,
                KeyEvent::Returned,
                pinned,
                Some(presented),
                now,
                store,
            ),
            Observed::Full if !self.pins_full_said => {
                self.pins_full_said = true;
                warn!(
                    "not pinning {} or any other new name: this member holds {} pins already",
                    p.user,
                    peers::MAX_PINS
                );
            }
            Observed::Full | Observed::Ignored | Observed::Same => {}
        }
        if seen.changed() {
            self.save_pin(&p.user, store);
        }
        seen.acceptable()
    }

    /// The one place a key event is logged and written into the history (a `key` record):
    /// first pin, change, return of the pinned key, trust, forget.
    fn key_event(
        &mut self,
        user: &str,
        event: KeyEvent,
        fingerprint: &Fingerprint,
        other: Option<&Fingerprint>,
        now: Now,
        store: &mut dyn MemberStore,
    ) {
        match (&event, other) {
            (KeyEvent::Pinned, _) => info!("pinned {user} to {fingerprint} (first sight)"),
            (KeyEvent::Changed, Some(pinned)) => warn!(
                "key for {user} changed: pinned {pinned}, relay presents {fingerprint}; refusing \
                 to send to or accept from {user} until `chatctl trust {user} {fingerprint}`"
            ),
            (KeyEvent::Returned, Some(other)) => warn!(
                "relay presents {user}'s pinned key {fingerprint} again after {other}; {user} \
                 stays changed until `chatctl trust`"
            ),
            (KeyEvent::Trusted, Some(old)) => {
                warn!("{user}'s new key {fingerprint} is now trusted (replaces {old})")
            }
            (KeyEvent::Trusted, None) => info!("{user}'s key {fingerprint} is trusted"),
            (KeyEvent::Forgotten, _) => info!("forgot {user}'s key {fingerprint}"),
            (e, _) => info!("key event {e} for {user}: {fingerprint}"),
        }
        let body = RecordBody::Key {
            user: user.to_string(),
            event,
            fingerprint: fingerprint.to_string(),
            other: other.map(|f| f.to_string()),
        };
        let mut outs = Vec::new();
        out::record(store, now, user, body, &mut outs);
        self.emit(now, outs);
    }

    fn save_pin(&mut self, user: &str, store: &mut dyn MemberStore) {
        let Some(pin) = self.peers.pin(user) else {
            return;
        };
        if let Err(e) = store.put_pin(&pin) {
            warn!("cannot store pin for {user}: {e}");
        }
    }

    /// Judge and settle a delivered message. True when it is settled; false when a storage
    /// error left it for a later delivery.
    fn accept(&mut self, env: Envelope, now: Now, store: &mut dyn MemberStore) -> bool {
        let judged = self
            .receiving
            .judge(&self.user, &self.identity, &self.peers, &env, store);
        let lost = judged
            .lost_session()
            .then(|| (env.id, env.from.clone(), env.session));
        let mut outs = Vec::new();
        let from = env.from.clone();
        let settled = self.receiving.settle(env, judged, now, store, &mut outs);
        self.emit(now, outs);
        // Held from a sender we have no key for: ask the relay (keys on demand); the answer
        // pins it and releases what we hold.
        if !self.peers.knows(&from) && from != self.user && crate::proto::valid_user(&from) {
            self.ask(&from, now);
        }
        if let Some((id, from, session)) = lost {
            self.ask_rekey(&id, &from, &session, now, store);
        }
        settled
    }

    /// Ask `from` to send the key of `session` again (we dropped message `id` of it for want of
    /// the key): a signed `Rekey`, once per (sender, session) in this run, through the outbox
    /// like a receipt.
    fn ask_rekey(
        &mut self,
        id: &[u8; 16],
        from: &str,
        session: &[u8; 16],
        now: Now,
        store: &mut dyn MemberStore,
    ) {
        if !self.receiving.first_ask(from, session) {
            return;
        }
        let rekey = match sign_rekey(
            self.sending.rng(),
            &self.identity,
            id,
            &self.user,
            from,
            session,
        ) {
            Ok(r) => r,
            Err(e) => {
                warn!("cannot sign a rekey request for {from}: {e}");
                return;
            }
        };
        let item = Routed::Rekey(rekey);
        let stored = to_payload(&item)
            .map_err(|e| StoreError::Corrupt(e.to_string()))
            .and_then(|bytes| store.outbox_push(item.key(), &bytes));
        match stored {
            Ok(()) => {
                info!(
                    "asked {from} to send the key of session {} again",
                    hex(session)
                );
                if self.link.established() {
                    self.frame(ToRelay::Send(item), now);
                }
            }
            Err(e) => warn!("cannot store a rekey request for {from}: {e}"),
        }
    }

    /// A recipient asks for the key of one of our sessions again: answer it (see
    /// [`Sending::answer_rekey`]) and acknowledge it, unless the store failed.
    fn rekey(&mut self, r: Rekey, now: Now, store: &mut dyn MemberStore) {
        let key = Routed::Rekey(r.clone()).key();
        match self
            .sending
            .answer_rekey(&self.identity, &self.user, &self.peers, &r, store)
        {
            Ok(items) => {
                info!(
                    "{} lost the key of session {}; sending {} unsettled message(s) again with it",
                    r.from,
                    hex(&r.session),
                    items.len()
                );
                for item in items {
                    self.frame(ToRelay::Send(item), now);
                }
            }
            Err(RekeyRefused::Store(e)) => {
                // Not acknowledged: the relay delivers it again later.
                warn!("cannot answer the rekey request from {}: {e}", r.from);
                return;
            }
            Err(why) => warn!("ignored a rekey request from {}: {why}", r.from),
        }
        self.frame(ToRelay::Ack(key), now);
    }

    /// Judge again what we held from `user` (after `trust`, or when the relay introduces them),
    /// [`RELEASE_BATCH`] envelopes at a time, so memory stays bounded however much was held.
    /// Only what was held when the release began is read: one that is held again (its sender is
    /// still `changed`, or settling failed) waits for the next release.
    fn release_held(&mut self, user: &str, now: Now, store: &mut dyn MemberStore) {
        let upto = match store.held_last_seq() {
            Ok(s) => s,
            Err(e) => {
                warn!("cannot read held messages from {user}: {e}");
                return;
            }
        };
        let mut after = 0;
        loop {
            let batch = match store.held_batch(user, after, upto, RELEASE_BATCH) {
                Ok(b) if b.is_empty() => return,
                Ok(b) => b,
                Err(e) => {
                    warn!("cannot read held messages from {user}: {e}");
                    return;
                }
            };
            for (seq, id, bytes) in batch {
                after = seq;
                if let Err(e) = store.unhold(&id) {
                    warn!("cannot release held message {}: {e}", hex(&id));
                    continue;
                }
                match from_payload::<Routed>(&bytes) {
                    Ok(Routed::Message(env)) => {
                        if !self.accept(env, now, store) {
                            // Not settled (a storage error): keep it held for the next chance.
                            let _ = store.hold(&id, user, &bytes);
                        }
                    }
                    _ => warn!("dropped unreadable held message {}", hex(&id)),
                }
            }
        }
    }

    /// `chatctl forget USER` on a member: drop `user`'s pin (the next key the relay presents is
    /// pinned on first sight), the sending session and everything held from the name. Says what
    /// was dropped.
    pub fn forget(
        &mut self,
        user: &str,
        now: Now,
        store: &mut dyn MemberStore,
    ) -> Result<String, MemberError> {
        let (n, bytes) = receive::in_savepoint(store, |s| {
            let dropped = s.drop_held(user)?;
            s.delete_pin(user)?;
            Ok(dropped)
        })
        .map_err(MemberError::Forget)?;
        let pinned = self.peers.forget(user);
        self.sending.forget_peer(user);
        self.presence.forget(user);
        let held = format!(
            "{n} held message{} ({bytes} bytes)",
            if n == 1 { "" } else { "s" }
        );
        match pinned {
            Some(fp) => {
                self.key_event(user, KeyEvent::Forgotten, &fp, None, now, store);
                Ok(format!(
                    "forgot {user}: dropped the pin {fp} and {held}; the next key the relay presents for {user} is pinned on first sight"
                ))
            }
            None if n > 0 => Ok(format!("forgot {user}: no pin; dropped {held}")),
            None => Err(MemberError::NothingToForget(user.into())),
        }
    }

    /// As [`Member::send`], but a send that needs more new sessions than one turn should spend
    /// RSA work on is only checked now and sealed over the next turns ([`Started::Sealing`]);
    /// [`Out::Sealed`] says when it is queued (or why not), and until then the daemon serves
    /// every other request between the slices.
    pub fn send_or_start(
        &mut self,
        to: &[String],
        all: bool,
        text: &str,
        now: Now,
        store: &mut dyn MemberStore,
    ) -> Result<Started, MemberError> {
        self.keys_first(to, now)?;
        let recipients = send::recipients(&self.peers, &self.user, to, all, text, self.max_fanout)?;
        if let Some(job) = self.sending.start_job(&self.peers, &recipients, text) {
            return Ok(Started::Sealing(job));
        }
        self.queue_now(&recipients, text, now, store)
            .map(Started::Queued)
    }

    /// Make the next new sessions of a job; once it has them all, queue it and say so.
    fn work(&mut self, now: Now, store: &mut dyn MemberStore) {
        let Some(job) = self.sending.work(&self.identity, &self.user, &self.peers) else {
            return;
        };
        // Checked again: a key may have changed, or a name gone, while the job was sealing.
        let checked = job
            .to
            .iter()
            .find_map(|u| send::still_sendable(&self.peers, u).err())
            .map_or(Ok(()), Err);
        let result = checked.and_then(|()| self.queue_now(&job.to, &job.text, now, store));
        self.sending.job_done(&job);
        self.out.push_back(Out::Sealed(job.id, result));
    }

    /// Seal and queue to `recipients`, checked already; the frames go out if the link is up.
    fn queue_now(
        &mut self,
        recipients: &[String],
        text: &str,
        now: Now,
        store: &mut dyn MemberStore,
    ) -> Result<Vec<Sent>, MemberError> {
        let queued = self.sending.queue(
            &self.identity,
            &self.user,
            &self.peers,
            recipients,
            text,
            now,
            store,
        )?;
        let mut outs: Vec<Out> = queued.records.into_iter().map(Out::Record).collect();
        // Offline, the outbox keeps them for the flush at the next login.
        if self.link.established() {
            outs.extend(
                queued
                    .items
                    .into_iter()
                    .map(|item| Out::Frame(ToRelay::Send(item))),
            );
        }
        self.emit(now, outs);
        Ok(queued.sent)
    }

    /// Seal `text` to each recipient and queue it, in this turn whatever the RSA work. Every
    /// check happens before anything is stored, and a store failure rolls back the whole
    /// request: it is all or nothing.
    pub fn send(
        &mut self,
        to: &[String],
        all: bool,
        text: &str,
        now: Now,
        store: &mut dyn MemberStore,
    ) -> Result<Vec<Sent>, MemberError> {
        self.keys_first(to, now)?;
        let recipients = send::recipients(&self.peers, &self.user, to, all, text, self.max_fanout)?;
        self.queue_now(&recipients, text, now, store)
    }

    /// Keys on demand: every name in `to` with no pin is looked up first; the request waits for
    /// the answer ([`MemberError::KeysPending`]), or fails if the relay said there is no such
    /// name, or if there is no relay to ask.
    fn keys_first(&mut self, to: &[String], now: Now) -> Result<(), MemberError> {
        let mut pending = Vec::new();
        for u in to {
            if self.peers.knows(u) || *u == self.user || !crate::proto::valid_user(u) {
                continue;
            }
            if self.lookups.is_missing(u) {
                return Err(MemberError::UnknownUser(u.clone()));
            }
            if !self.link.established() {
                return Err(MemberError::UnknownOffline(u.clone()));
            }
            match self.ask(u, now) {
                Ask::Send | Ask::Pending => pending.push(u.clone()),
                Ask::Full => return Err(MemberError::TooManyLookups),
            }
        }
        if !pending.is_empty() {
            return Err(MemberError::KeysPending(pending));
        }
        Ok(())
    }

    /// Accept `user`'s current key (after a change) or re-confirm the pinned one.
    pub fn trust(
        &mut self,
        user: &str,
        fingerprint: &str,
        now: Now,
        store: &mut dyn MemberStore,
    ) -> Result<String, MemberError> {
        let given = Fingerprint::parse(fingerprint).map_err(MemberError::BadFingerprint)?;
        let trusted = self.peers.trust(user, given)?;
        let old = match &trusted {
            Trusted::NewKey { old, .. } => Some(*old),
            Trusted::Pinned(_) => None,
        };
        self.key_event(user, KeyEvent::Trusted, &given, old.as_ref(), now, store);
        let msg = match trusted {
            Trusted::NewKey { still: false, .. } => format!("{user}'s new key {given} is trusted"),
            Trusted::NewKey { old, still: true } => format!(
                "{user}'s new key {given} is trusted; the relay presents the old key ({old}) now, so {user} stays `changed`"
            ),
            Trusted::Pinned(Some(p)) => format!(
                "{user}'s pinned key {given} is trusted; the relay still presents another key ({p}), so {user} stays `changed`"
            ),
            Trusted::Pinned(None) => format!("{user}'s key {given} is trusted"),
        };
        self.sending.forget_peer(user);
        self.save_pin(user, store);
        self.release_held(user, now, store);
        Ok(msg)
    }

    /// The directory as `who` shows it.
    pub fn who(&self) -> Vec<PeerView> {
        self.peers.who()
    }

    /// A peer's pinned fingerprint.
    pub fn pinned(&self, user: &str) -> Option<Fingerprint> {
        self.peers.pinned(user)
    }
}

#[cfg(test)]
mod tests;
