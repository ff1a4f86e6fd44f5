//! The receiving side: what the relay delivers to us (messages and receipts), judged first and
//! settled second.
//!
//! [`Receiving::judge`] looks at a delivered envelope and the state (peers, session keys, the
//! store, read only) and returns a [`Verdict`]; [`Receiving::settle`] carries it out in one
//! place: it persists, acknowledges and logs. Receipts go the same way ([`judge_receipt`],
//! [`settle_receipt`]). Owns [`Receiving`], the cache of receiving session keys.
//!
//! Must never: write to the store or emit anything while judging; accept from a peer whose key
//! changed and is not trusted yet; run a private-key operation on a key packet before the pinned
//! sender's signature on it has verified (see `crypto::unwrap_key_packet`); acknowledge an
//! envelope whose settling failed (the relay keeps it and delivers it again); log a text or key.

use crate::clock::Now;
use std::collections::HashMap;

use log::warn;
use rand::rngs::OsRng;

use super::out::Out;
use super::peers::{Peers, Sender};
use super::send::Sending;
use crate::crypto::{
    open_envelope, receipt_tag, unwrap_key_packet, verify_receipt, CryptoError, Fingerprint,
    Identity, PublicKey, SessionKey,
};
use crate::proto::control::{Dir, MsgState, Record, RecordBody};
use crate::proto::relay::{Envelope, ItemKey, Kind, Receipt, Routed, ToRelay};
use crate::proto::{hex, to_payload, valid_user, Hex, MAX_TEXT};
use crate::store::{MemberStore, Row, StoreError};

/// What to do with a delivered envelope.
#[derive(Debug)]
pub(super) enum Verdict {
    /// We stored it before (a redelivery): acknowledge it again.
    Duplicate,
    /// It can never be accepted: acknowledge it so the relay stops redelivering it, and say why.
    Reject(Why),
    /// It may become acceptable (the sender is unknown, or their key changed): keep it in our
    /// own database and acknowledge it, so it neither clogs the relay's delivery window nor
    /// depends on the relay keeping it.
    Hold(HoldWhy),
    /// The store failed while judging: leave it unacknowledged for a later delivery.
    Retry(Retry),
    /// Opened: store it, send the receipt, acknowledge.
    Open(Opened),
}

/// Why an envelope is rejected.
#[derive(Debug)]
pub(super) enum Why {
    /// Addressed to someone else.
    NotForUs,
    /// No usable session key (bad key packet signature, a corrupt stored key).
    Key(String),
    /// A session we hold no key for, and no key packet: we lost the key (a restored backup, a
    /// deleted database). The sender is asked to send the key again.
    NoSessionKey,
    /// A (session, counter) we have seen before.
    Replayed,
    /// The ciphertext or its header does not open under the session key.
    Unopenable(CryptoError),
    /// The text is not UTF-8 of at most [`MAX_TEXT`] bytes.
    NotText,
    /// "From" our own name: we never send to ourselves, so only a relay can have made it.
    FromSelf,
    /// "From" a name no relay may bind: it can never be introduced, so never opened.
    BadSender,
    /// The ciphertext is longer than any text we accept could be: it can never be opened.
    TooLong(usize),
    /// Holding it would pass a bound on held envelopes (`max_held*`).
    HeldFull(String),
}

impl Why {
    fn log(&self, idh: &Hex<'_>, env: &Envelope) {
        let from = &env.from;
        match self {
            Why::NotForUs => warn!("dropped message {idh}: addressed to {}, not to us", env.to),
            Why::Key(why) => warn!("rejected message {idh} from {from}: {why}"),
            Why::NoSessionKey => warn!(
                "rejected message {idh} from {from}: unknown session and no key packet; asking \
                 {from} to send the session's key again"
            ),
            Why::Replayed => warn!("rejected message {idh} from {from}: replayed session counter"),
            Why::Unopenable(e) => warn!("rejected message {idh} from {from}: {e}"),
            Why::NotText => {
                warn!("rejected message {idh} from {from}: text is not UTF-8 of at most 64 KiB")
            }
            Why::FromSelf => warn!(
                "rejected message {idh}: the relay delivered it as from ourselves ({from}), which \
                 we never send"
            ),
            Why::BadSender => warn!("rejected message {idh}: sender {from:?} is not a valid name"),
            Why::TooLong(n) => warn!(
                "rejected message {idh} from {from}: {n} bytes of ciphertext, more than any text \
                 of at most 64 KiB"
            ),
            Why::HeldFull(why) => warn!("dropped message {idh} from {from}: {why}"),
        }
    }
}

/// Why an envelope is held.
#[derive(Debug)]
pub(super) enum HoldWhy {
    /// The relay has not introduced the sender.
    Unknown,
    /// The sender's key changed and is not trusted yet.
    Changed {
        /// The pinned key.
        pinned: Fingerprint,
        /// The key the relay presents.
        presented: Fingerprint,
    },
}

impl HoldWhy {
    fn log(&self, idh: &Hex<'_>, env: &Envelope) {
        let from = &env.from;
        match self {
            HoldWhy::Unknown => {
                warn!("holding message {idh} from {from}, whom the relay has not introduced yet")
            }
            HoldWhy::Changed { pinned, presented } => warn!(
                "holding message {idh} from {from}: their key changed (pinned {pinned}, \
                 presented {presented}); it is opened if you `chatctl trust` a key that signed it"
            ),
        }
    }
}

/// Which store operation failed.
#[derive(Debug)]
pub(super) enum Retry {
    /// Whether we have the message.
    Check(StoreError),
    /// Reading or storing the session key.
    Session(StoreError),
}

impl Retry {
    fn log(&self, idh: &Hex<'_>) {
        match self {
            Retry::Check(e) => warn!("cannot check message {idh}: {e}"),
            Retry::Session(e) => warn!("cannot look up the session of message {idh}: {e}"),
        }
    }
}

/// An envelope that opened.
pub(super) struct Opened {
    text: String,
    receipt: Receipt,
}

// By hand, so that formatting a verdict (a test failure, a debug line) never shows the text.
impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("text", &format_args!("<{} bytes>", self.text.len()))
            .field("receipt", &self.receipt)
            .finish()
    }
}

/// A session key the judge found outside the cache.
pub(super) struct Learned {
    key: SessionKey,
    /// Unwrapped from the envelope's key packet, so not in the store yet.
    unwrapped: bool,
}

/// A verdict, and the session key learned on the way to it. The key is kept whatever the
/// verdict (a key packet whose signature verified is genuine even if the ciphertext is not), and
/// storing it comes first: if that fails, the envelope is left for a later delivery.
pub(super) struct Judged {
    pub(super) verdict: Verdict,
    pub(super) learned: Option<Learned>,
}

impl Judged {
    /// The envelope is from a session whose key we do not have (see [`Why::NoSessionKey`]).
    pub(super) fn lost_session(&self) -> bool {
        matches!(self.verdict, Verdict::Reject(Why::NoSessionKey))
    }
}

impl From<Verdict> for Judged {
    fn from(verdict: Verdict) -> Judged {
        Judged {
            verdict,
            learned: None,
        }
    }
}

/// Why a receiving session key could not be had.
enum KeyFail {
    /// The envelope can never be opened (bad signature, corrupt key).
    Reject(String),
    /// No key for the session and no key packet.
    Lost,
    /// The store failed.
    Store(StoreError),
}

/// The bounds on envelopes held for later (senders not introduced yet, or whose key changed):
/// per sender and in total, count and bytes (settings `max_held_per_sender`,
/// `max_held_bytes_per_sender`, `max_held`, `max_held_bytes`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldLimits {
    /// Most envelopes held from one sender.
    pub per_sender: u64,
    /// Most bytes held from one sender.
    pub per_sender_bytes: u64,
    /// Most envelopes held in all.
    pub total: u64,
    /// Most bytes held in all.
    pub total_bytes: u64,
}

impl Default for HoldLimits {
    /// An honest envelope is at most about 66 KiB (64 KiB of text, a key packet, the header):
    /// 100 of them from one sender fit in 8 MiB, and 1,000 from everyone in 64 MiB of disk.
    fn default() -> Self {
        HoldLimits {
            per_sender: 100,
            per_sender_bytes: 8 << 20,
            total: 1000,
            total_bytes: 64 << 20,
        }
    }
}

impl HoldLimits {
    /// Why holding one more envelope of `size` bytes from `from` is refused, if it is; `mine`
    /// and `all` are what is held now (count, bytes) from `from` and from everyone.
    fn refuse(&self, from: &str, size: u64, mine: (u64, u64), all: (u64, u64)) -> Option<String> {
        let (n, b) = mine;
        let (tn, tb) = all;
        if n >= self.per_sender {
            Some(format!(
                "already holding {n} messages from {from}, the most max_held_per_sender allows"
            ))
        } else if b + size > self.per_sender_bytes {
            Some(format!(
                "holding it would pass max_held_bytes_per_sender ({} bytes) for {from}",
                self.per_sender_bytes
            ))
        } else if tn >= self.total {
            Some(format!(
                "already holding {tn} messages in all, the most max_held allows"
            ))
        } else if tb + size > self.total_bytes {
            Some(format!(
                "holding it would pass max_held_bytes ({} bytes in all)",
                self.total_bytes
            ))
        } else {
            None
        }
    }
}

/// The longest ciphertext a text we accept can have: [`MAX_TEXT`] bytes and the 16-byte tag.
const MAX_CIPHERTEXT: usize = MAX_TEXT + 16;

/// Receiving session keys by (sender, session), as a cache of the store's; and the bounds on
/// holding.
pub(super) struct Receiving {
    keys: HashMap<(String, [u8; 16]), SessionKey>,
    limits: HoldLimits,
    /// Sessions whose key we asked for again, by (sender, session): once per run each.
    asked: std::collections::HashSet<(String, [u8; 16])>,
}

/// Most sessions remembered as asked for; past it the set starts afresh.
const MAX_ASKED: usize = 4096;

impl Receiving {
    /// An empty cache.
    pub(super) fn new(limits: HoldLimits) -> Receiving {
        Receiving {
            keys: HashMap::new(),
            limits,
            asked: std::collections::HashSet::new(),
        }
    }

    /// Whether this is the first time in this run that we ask `from` for `session`'s key
    /// (and note that we do now).
    pub(super) fn first_ask(&mut self, from: &str, session: &[u8; 16]) -> bool {
        if self.asked.len() >= MAX_ASKED {
            self.asked.clear();
        }
        self.asked.insert((from.to_string(), *session))
    }

    /// The bounds on holding (config, reload).
    pub(super) fn set_limits(&mut self, limits: HoldLimits) {
        self.limits = limits;
    }

    /// The bounds on holding now.
    pub(super) fn limits(&self) -> &HoldLimits {
        &self.limits
    }

    /// Judge a delivered envelope; `own` is our name, `identity` our key.
    ///
    /// A redelivery of a message we stored is `Duplicate` whatever else could be said of it.
    /// An envelope that opens is not looked up first: its insert ([`store_message`]) refuses a
    /// stored id, and `settle` tells a redelivery from a replay then. Every other verdict is
    /// checked against the store here. A message that opens is the common case, and the lookup
    /// was one indexed read per message received, for what is rare.
    pub(super) fn judge(
        &self,
        own: &str,
        identity: &Identity,
        peers: &Peers,
        env: &Envelope,
        store: &dyn MemberStore,
    ) -> Judged {
        if env.to != own {
            return Verdict::Reject(Why::NotForUs).into();
        }
        let judged = self.judge_unseen(own, identity, peers, env, store);
        if matches!(judged.verdict, Verdict::Open(_)) {
            return judged;
        }
        let verdict = match store.has_message(&env.id) {
            Ok(true) => Verdict::Duplicate,
            Ok(false) => return judged,
            Err(e) => Verdict::Retry(Retry::Check(e)),
        };
        // A key found on the way is kept, as for any verdict.
        Judged {
            verdict,
            learned: judged.learned,
        }
    }

    /// [`Receiving::judge`] for an envelope addressed to us, as if its id were not stored.
    fn judge_unseen(
        &self,
        own: &str,
        identity: &Identity,
        peers: &Peers,
        env: &Envelope,
        store: &dyn MemberStore,
    ) -> Judged {
        // What can never be opened is refused at once, never held.
        if env.from == own {
            return Verdict::Reject(Why::FromSelf).into();
        }
        if !valid_user(&env.from) {
            return Verdict::Reject(Why::BadSender).into();
        }
        if env.ciphertext.len() > MAX_CIPHERTEXT {
            return Verdict::Reject(Why::TooLong(env.ciphertext.len())).into();
        }
        let sender = match peers.sender(&env.from) {
            Sender::Unknown => return self.hold_or_refuse(env, HoldWhy::Unknown, store),
            Sender::Changed { pinned, presented } => {
                return self.hold_or_refuse(env, HoldWhy::Changed { pinned, presented }, store)
            }
            Sender::Pinned(k) => k,
        };
        let (key, learned) = match self.key(identity, env, sender, store) {
            Ok(k) => k,
            Err(KeyFail::Reject(why)) => return Verdict::Reject(Why::Key(why)).into(),
            Err(KeyFail::Lost) => return Verdict::Reject(Why::NoSessionKey).into(),
            Err(KeyFail::Store(e)) => return Verdict::Retry(Retry::Session(e)).into(),
        };
        Judged {
            verdict: open(own, env, &key),
            learned,
        }
    }

    /// Hold `env`, unless that would pass a bound on holding (then it is dropped, and said).
    fn hold_or_refuse(&self, env: &Envelope, why: HoldWhy, store: &dyn MemberStore) -> Judged {
        let sizes = store
            .held_size(Some(&env.from))
            .and_then(|mine| Ok((mine, store.held_size(None)?)));
        let (mine, all) = match sizes {
            Ok(s) => s,
            Err(e) => return Verdict::Retry(Retry::Check(e)).into(),
        };
        // What the held row stores: the envelope's encoding (within a few bytes).
        let size = to_payload(env).map_or(0, |b| b.len()) as u64;
        match self.limits.refuse(&env.from, size, mine, all) {
            Some(full) => Verdict::Reject(Why::HeldFull(full)).into(),
            None => Verdict::Hold(why).into(),
        }
    }

    /// The session key of `env`, and whether it came from outside the cache.
    fn key(
        &self,
        identity: &Identity,
        env: &Envelope,
        sender: &PublicKey,
        store: &dyn MemberStore,
    ) -> Result<(SessionKey, Option<Learned>), KeyFail> {
        if let Some(k) = self.keys.get(&(env.from.clone(), env.session)) {
            return Ok((k.clone(), None));
        }
        if let Some(raw) = store
            .session(false, &env.from, &env.session)
            .map_err(KeyFail::Store)?
        {
            let k = SessionKey::from_bytes(&raw)
                .ok_or_else(|| KeyFail::Reject("stored session key is corrupt".into()))?;
            let learned = Learned {
                key: k.clone(),
                unwrapped: false,
            };
            return Ok((k, Some(learned)));
        }
        let Some(kp) = &env.key_packet else {
            return Err(KeyFail::Lost);
        };
        // Signature first, private key second: see crypto::unwrap_key_packet.
        let k = unwrap_key_packet(&mut OsRng, identity, sender, env, kp)
            .map_err(|e| KeyFail::Reject(e.to_string()))?;
        let learned = Learned {
            key: k.clone(),
            unwrapped: true,
        };
        Ok((k, Some(learned)))
    }

    /// Carry out the judgement of `env`. True when the envelope is settled (stored, held, or
    /// rejected, and acknowledged); false when a storage error left it for a later delivery.
    pub(super) fn settle(
        &mut self,
        env: Envelope,
        judged: Judged,
        now: Now,
        store: &mut dyn MemberStore,
        out: &mut Vec<Out>,
    ) -> bool {
        let key = ItemKey {
            kind: Kind::Message,
            id: env.id,
        };
        let idh = Hex(&env.id);
        if let Some(l) = judged.learned {
            if l.unwrapped {
                if let Err(e) = store.put_session(false, &env.from, &env.session, l.key.expose()) {
                    // Not acknowledged: the relay delivers it again later.
                    Retry::Session(e).log(&idh);
                    return false;
                }
            }
            self.keys.insert((env.from.clone(), env.session), l.key);
        }
        match judged.verdict {
            Verdict::Duplicate => {}
            Verdict::Reject(why) => why.log(&idh, &env),
            Verdict::Hold(why) => {
                why.log(&idh, &env);
                return hold(env, store, out);
            }
            Verdict::Retry(why) => {
                // Not acknowledged: the relay delivers it again later.
                why.log(&idh);
                return false;
            }
            Verdict::Open(opened) => {
                let receipt = Routed::Receipt(opened.receipt);
                let stored = all_or_none(store, |s| {
                    store_message(s, &env, &receipt, opened.text, now)
                });
                match stored {
                    Ok(Some(r)) => {
                        out.push(Out::Record(r));
                        // The ack first: the relay forwards the receipt at once, and its
                        // `Accepted` for the message (which the ack releases) should reach the
                        // sender before the receipt does, so `relayed` comes before `delivered`.
                        out.push(Out::Frame(ToRelay::Ack(key)));
                        out.push(Out::Frame(ToRelay::Send(receipt)));
                        return true;
                    }
                    // Nothing was written: the id is stored (a redelivery, acknowledged
                    // again) or the replay index refused its (session, counter); either way
                    // acknowledged and dropped, as any rejected message.
                    Ok(None) => match store.has_message(&env.id) {
                        Ok(true) => {}
                        Ok(false) => Why::Replayed.log(&idh, &env),
                        Err(e) => {
                            // Not acknowledged: the relay delivers it again later.
                            Retry::Check(e).log(&idh);
                            return false;
                        }
                    },
                    Err(e) => {
                        warn!("cannot store message {idh}: {e}; the relay keeps it for later");
                        return false;
                    }
                }
            }
        }
        out.push(Out::Frame(ToRelay::Ack(key)));
        true
    }

    /// No receiving session key is kept.
    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The rest of the judgement, once the session key is known: ciphertext, text. A replayed
/// (session, counter) is found when the message is stored ([`store_message`]): the store's
/// replay index refuses it, one statement fewer per message than asking first.
fn open(own: &str, env: &Envelope, key: &SessionKey) -> Verdict {
    let text = match open_envelope(key, env) {
        Ok(t) => t,
        Err(e) => return Verdict::Reject(Why::Unopenable(e)),
    };
    let text = match String::from_utf8(text) {
        Ok(t) if t.len() <= MAX_TEXT => t,
        _ => return Verdict::Reject(Why::NotText),
    };
    let receipt = Receipt {
        id: env.id,
        from: own.to_string(),
        to: env.from.clone(),
        session: env.session,
        counter: env.counter,
        tag: receipt_tag(key, &env.id, own, &env.from, &env.session, env.counter),
    };
    Verdict::Open(Opened { text, receipt })
}

/// Run `writes` so that all of them are kept, or none, without a savepoint where the turn can
/// do it: inside a turn a failure abandons the turn ([`MemberStore::abandon_turn`]), whose
/// commit then fails, and the daemon rebuilds the core from disk as after any failed commit.
/// Outside a turn, in a savepoint. For the units on the message path; rare ones keep
/// [`in_savepoint`], which leaves the rest of the turn alone.
pub(super) fn all_or_none<T>(
    store: &mut dyn MemberStore,
    writes: impl FnOnce(&mut dyn MemberStore) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    if !store.in_turn() {
        return in_savepoint(store, writes);
    }
    let done = writes(store);
    if let Err(e) = &done {
        store.abandon_turn(e);
    }
    done
}

/// Run `writes` in a savepoint of the turn: all of them are kept, or none.
pub(super) fn in_savepoint<T>(
    store: &mut dyn MemberStore,
    writes: impl FnOnce(&mut dyn MemberStore) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let done = store
        .savepoint()
        .and_then(|()| writes(store))
        .and_then(|t| store.release_savepoint().map(|()| t));
    if done.is_err() {
        store.rollback_savepoint();
    }
    done
}

/// An opened message: its id and counter (for duplicates and replays), its receipt in the
/// outbox, and its history record. `None`, with nothing written, if its id is stored (a
/// redelivery) or its (session, counter) was taken by an earlier message (a replay under a new
/// id); the caller tells which.
fn store_message(
    store: &mut dyn MemberStore,
    env: &Envelope,
    receipt: &Routed,
    text: String,
    now: Now,
) -> Result<Option<Record>, StoreError> {
    let bytes = to_payload(receipt).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    if !store.add_received(&env.id, &env.from, &env.session, env.counter, &bytes)? {
        // The id is stored, or the replay index refused the (session, counter): the caller
        // tells which.
        return Ok(None);
    }
    store
        .append(
            now.wall,
            &env.from,
            RecordBody::Message {
                id: env.id,
                from: env.from.clone(),
                to: env.to.clone(),
                dir: Dir::In,
                text,
            },
        )
        .map(Some)
}

/// Keep `env` in our own database and acknowledge it. False when the store failed (then it is
/// not acknowledged: the relay keeps it and delivers it again).
fn hold(env: Envelope, store: &mut dyn MemberStore, out: &mut Vec<Out>) -> bool {
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
            out.push(Out::Frame(ToRelay::Ack(key)));
            true
        }
        Err(e) => {
            warn!("cannot hold message {}: {e}", hex(&key.id));
            false
        }
    }
}

/// What to do with a delivered receipt.
#[derive(Debug)]
pub(super) enum ReceiptVerdict {
    /// The store failed looking up the message: leave it unacknowledged.
    Retry(StoreError),
    /// It proves nothing: acknowledge it and say why.
    Drop(Bogus),
    /// It proves `peer` opened our message.
    Deliver {
        /// The recipient of the message.
        peer: String,
        /// The message's session, whose key packet can stop riding along.
        session: [u8; 16],
        /// The message was not `Delivered` yet: store and announce the new state.
        news: bool,
        /// Where the message was found, to update it there.
        row: Row,
    },
}

/// Why a receipt proves nothing.
#[derive(Debug)]
pub(super) enum Bogus {
    /// For a message we never sent.
    UnknownMessage,
    /// Its parties, session or counter are not the message's.
    Mismatch,
    /// We no longer have the session key to check it.
    NoKey,
    /// The tag does not verify.
    Forged,
}

/// Judge a delivered receipt against the message it claims to confirm.
pub(super) fn judge_receipt(
    own: &str,
    sending: &Sending,
    r: &Receipt,
    store: &dyn MemberStore,
) -> ReceiptVerdict {
    let found = match store.outgoing_at(&r.id) {
        Ok(f) => f,
        Err(e) => return ReceiptVerdict::Retry(e),
    };
    let Some(((peer, session, counter, state), row)) = found else {
        return ReceiptVerdict::Drop(Bogus::UnknownMessage);
    };
    if r.to != own || r.from != peer || r.session != session || r.counter != counter {
        return ReceiptVerdict::Drop(Bogus::Mismatch);
    }
    let Some(key) = sending.key_of(&peer, &session, store) else {
        return ReceiptVerdict::Drop(Bogus::NoKey);
    };
    if verify_receipt(&key, r).is_err() {
        return ReceiptVerdict::Drop(Bogus::Forged);
    }
    ReceiptVerdict::Deliver {
        peer,
        session,
        news: state != MsgState::Delivered,
        row,
    }
}

/// Carry out the judgement of receipt `r`: the message becomes `Delivered` (state, outbox and
/// history all or none), and the receipt is acknowledged unless that failed.
pub(super) fn settle_receipt(
    sending: &mut Sending,
    r: &Receipt,
    verdict: ReceiptVerdict,
    now: Now,
    store: &mut dyn MemberStore,
    out: &mut Vec<Out>,
) {
    let key = ItemKey {
        kind: Kind::Receipt,
        id: r.id,
    };
    let idh = Hex(&r.id);
    match verdict {
        ReceiptVerdict::Retry(e) => {
            warn!("cannot look up message {idh}: {e}");
            return;
        }
        ReceiptVerdict::Drop(Bogus::UnknownMessage) => {
            warn!("dropped receipt for unknown message {idh}")
        }
        ReceiptVerdict::Drop(Bogus::Mismatch) => {
            warn!("dropped receipt for message {idh}: it does not match the message")
        }
        ReceiptVerdict::Drop(Bogus::NoKey) => {
            warn!("dropped receipt for message {idh}: session key unknown")
        }
        ReceiptVerdict::Drop(Bogus::Forged) => warn!("dropped forged receipt for message {idh}"),
        ReceiptVerdict::Deliver {
            peer,
            session,
            news,
            row,
        } => {
            sending.confirmed(&peer, &session);
            if news {
                match all_or_none(store, |s| store_receipt(s, row, r.id, &peer, now)) {
                    Ok(rec) => {
                        out.push(Out::Record(rec));
                        out.push(Out::State(r.id, MsgState::Delivered, None));
                    }
                    Err(e) => {
                        warn!("cannot store receipt for {idh}: {e}");
                        return;
                    }
                }
            }
        }
    }
    out.push(Out::Frame(ToRelay::Ack(key)));
}

/// A verified receipt: the message is `Delivered`, leaves the outbox, and gets its record.
fn store_receipt(
    store: &mut dyn MemberStore,
    row: Row,
    id: [u8; 16],
    peer: &str,
    now: Now,
) -> Result<Record, StoreError> {
    // Delivered, it leaves the outbox too (a message waiting to be sent again with its key).
    store.set_state_at(row, &id, MsgState::Delivered)?;
    store.append(
        now.wall,
        peer,
        RecordBody::Receipt {
            id,
            to: peer.to_string(),
            state: MsgState::Delivered,
            reason: None,
        },
    )
}
