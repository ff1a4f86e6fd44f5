//! The errors a `chatctl` request can get from the member, each worded to say what to do next.
//!
//! Owns [`MemberError`] and its `Display`, which the daemon maps once into a control reply. Must
//! never: flatten a source error into a string (the store's and crypto's errors stay reachable
//! through `source()`), or name a key by anything but its fingerprint.

use crate::crypto::{CryptoError, Fingerprint};
use crate::proto::MAX_TEXT;
use crate::store::StoreError;

/// Errors a `chatctl` request can get from the member. Each message says what to do.
#[derive(Debug)]
pub enum MemberError {
    /// No recipient given.
    NoRecipient,
    /// A recipient name is not a valid user name.
    BadUser(String),
    /// The relay has never bound this name.
    UnknownUser(String),
    /// No key is pinned for this name, and there is no relay to ask.
    UnknownOffline(String),
    /// Not an answer yet: the member asked the relay for these names' keys, and the request is
    /// tried again when the relay answers (the daemon parks it meanwhile).
    KeysPending(Vec<String>),
    /// The request needs the relay, and the link is down.
    NotConnected,
    /// Too many key lookups wait for the relay's answer (a relay that does not answer).
    TooManyLookups,
    /// Sending to oneself is refused (the copy would collide with the sent one).
    SelfSend,
    /// `--all` with nobody online.
    NoPeersOnline,
    /// `--all` with more peers online than `max_fanout` allows.
    FanoutTooLarge {
        /// Peers online now.
        online: usize,
        /// The limit.
        max: usize,
    },
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
    /// `forget` of a name with no pin and nothing held.
    NothingToForget(String),
    /// The store failed during `forget`; nothing was dropped.
    Forget(StoreError),
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
            MemberError::UnknownOffline(u) => write!(
                f,
                "no key is pinned for {u}, and chatd is not connected to the relay to look it up; \
                 nothing was sent (try again once `chatctl status` shows connected: true)"
            ),
            MemberError::KeysPending(users) => {
                write!(f, "looking up the keys of {} on the relay", users.join(", "))
            }
            MemberError::TooManyLookups => write!(
                f,
                "{} key lookups are waiting for the relay's answer; nothing was sent (try again \
                 in a few seconds; if it persists, the relay is not answering)",
                super::lookup::MAX_PENDING_LOOKUPS
            ),
            MemberError::NotConnected => write!(
                f,
                "chatd is not connected to the relay, which this asks; `chatctl who` lists your \
                 contacts without it"
            ),
            MemberError::SelfSend => write!(f, "cannot send a message to yourself"),
            MemberError::NoPeersOnline => write!(f, "no peer is online; nothing was sent"),
            MemberError::FanoutTooLarge { online, max } => write!(
                f,
                "{online} peers are online, more than send --all may reach ({max}, max_fanout); \
                 nothing was sent"
            ),
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
            MemberError::NothingToForget(u) => write!(
                f,
                "nothing to forget: no key is pinned for {u} and nothing is held from {u}"
            ),
            MemberError::Forget(e) => write!(f, "cannot forget: {e}; nothing was dropped"),
        }
    }
}

impl std::error::Error for MemberError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            MemberError::Store(e) | MemberError::Forget(e) => Some(e),
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
