//! Messages on the control socket between `chatctl` (or any local client) and `chatd`.
//!
//! Owns the control vocabulary: `CtlRequest` from the client, `CtlResponse` from the daemon. One
//! request, one response, except `Tail` (a stream of `Record` then `End`, or with `follow` records
//! until the client goes away) and `Who` (`Peers` frames of at most [`WHO_CHUNK`] entries, then
//! `End`, so no directory size can make a reply exceed the frame cap). Same framing and encoding as the relay socket.

use serde::{Deserialize, Serialize};

pub use crate::proto::codes::{KeyEvent, RecordKind, TrustState};

/// Most entries in one `Peers` frame. 512 entries of at most about 200 bytes (a 32-byte name,
/// two fingerprints) stay far under the 1 MiB frame cap.
pub const WHO_CHUNK: usize = 512;

/// Most kinds one `tail` may name (there are far fewer; a longer list is a malformed request).
pub const MAX_KINDS: usize = 16;

/// How long `send` waits before answering.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Answer once the message is sealed and stored in the outbox.
    None,
    /// Answer once the relay has taken custody.
    Relay,
    /// Answer once the recipient's daemon has stored it and sent a receipt.
    Delivered,
}

/// Client to daemon.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum CtlRequest {
    /// Seal and queue one message to each recipient.
    Send {
        /// Recipients; empty with `all`. At most `MAX_RECIPIENTS`.
        #[serde(
            deserialize_with = "crate::proto::bounded_vec::<_, _, { crate::proto::MAX_RECIPIENTS }>"
        )]
        to: Vec<String>,
        /// Send to every peer online now.
        all: bool,
        /// The message text.
        text: String,
        /// When to answer.
        wait: Wait,
        /// How long to wait at most, in milliseconds.
        timeout_ms: u64,
    },
    /// History, then (with `follow`) new records as they come.
    Tail {
        /// How many of the last records to print first (all after `since` when None).
        last: Option<u64>,
        /// Only records with a larger seq.
        since: Option<u64>,
        /// Only records to or from this user (and their presence).
        with: Option<String>,
        /// Keep the stream open for new records.
        follow: bool,
        /// Only records of these kinds; empty for every kind. At most `MAX_KINDS`.
        #[serde(
            default,
            deserialize_with = "crate::proto::bounded_vec::<_, _, { MAX_KINDS }>"
        )]
        kinds: Vec<RecordKind>,
    },
    /// A member's contacts (the peers it has pinned) with their online state; on a relay, its
    /// registrations. `Peers` frames, then `End`.
    Who,
    /// The relay's whole directory, or the names in it that start with `prefix`, a page at a
    /// time: `Peers` frames, then `End`. Added in 0.2 (issue 8): `who --all`.
    Directory {
        /// Only names that start with this.
        prefix: Option<String>,
    },
    /// Daemon status.
    Status,
    /// Own fingerprint, or a peer's pinned one.
    Fingerprint {
        /// The peer, or none for our own.
        user: Option<String>,
    },
    /// Accept USER's current key after checking it out of band.
    Trust {
        /// The peer.
        user: String,
        /// The fingerprint the user checked, `SHA256:...`.
        fingerprint: String,
    },
    /// On a relay: drop a name binding and its queue. On a member: drop the pin and everything
    /// held from the name. A host does both.
    Forget {
        /// The name.
        user: String,
    },
}

/// Direction of a message record.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Received.
    In,
    /// Sent.
    Out,
}

/// State of a sent message.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum MsgState {
    /// Sealed and stored in the outbox.
    Queued,
    /// The relay took custody.
    Relayed,
    /// The recipient's daemon stored it.
    Delivered,
    /// The relay refused it.
    Failed,
}

impl MsgState {
    /// The contract's lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            MsgState::Queued => "queued",
            MsgState::Relayed => "relayed",
            MsgState::Delivered => "delivered",
            MsgState::Failed => "failed",
        }
    }
}

/// What a history record says.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum RecordBody {
    /// A message, either direction.
    Message {
        /// Message id.
        #[serde(with = "serde_bytes")]
        id: [u8; 16],
        /// Sender.
        from: String,
        /// Recipient.
        to: String,
        /// In or out.
        dir: Dir,
        /// The text, exactly as sent.
        text: String,
    },
    /// A peer joined or left.
    Presence {
        /// The peer.
        user: String,
        /// Joined (true) or left (false).
        online: bool,
    },
    /// A sent message changed state.
    Receipt {
        /// The message id.
        #[serde(with = "serde_bytes")]
        id: [u8; 16],
        /// The message's recipient.
        to: String,
        /// The new state.
        state: MsgState,
        /// Why it failed, for `Failed`.
        reason: Option<String>,
    },
    /// The member's link to the relay came up (logged in) or went down.
    Link {
        /// Logged in (true) or gone (false).
        up: bool,
        /// Why it went down; None when up.
        reason: Option<String>,
        /// When up: the peers online at that moment, sorted, at most [`LINK_ONLINE_MAX`].
        #[serde(deserialize_with = "crate::proto::bounded_vec::<_, _, { LINK_ONLINE_MAX }>")]
        online: Vec<String>,
        /// When up: how many peers were online (more than `online` holds when it is cut).
        peers_online: u64,
    },
    /// Something happened to a peer's key (first pin, change, return, trust, forget).
    Key {
        /// The peer.
        user: String,
        /// What happened.
        event: KeyEvent,
        /// The key the event is about: the pinned key (`pinned`, `returned`, `trusted`,
        /// `forgotten`) or the key the relay presents now (`changed`).
        fingerprint: String,
        /// The other key involved, if any: the pinned key for `changed`, the presented key for
        /// `returned`, the replaced pin for a `trusted` that accepted a new key.
        other: Option<String>,
    },
}

impl RecordBody {
    /// Which kind of record this is.
    pub fn kind(&self) -> RecordKind {
        match self {
            RecordBody::Message { .. } => RecordKind::Message,
            RecordBody::Presence { .. } => RecordKind::Presence,
            RecordBody::Receipt { .. } => RecordKind::Receipt,
            RecordBody::Key { .. } => RecordKind::Key,
            RecordBody::Link { .. } => RecordKind::Link,
        }
    }

    /// The peer the record is about (what `tail --with` matches).
    pub fn peer(&self) -> &str {
        match self {
            RecordBody::Message { from, to, dir, .. } => match dir {
                Dir::In => from,
                Dir::Out => to,
            },
            RecordBody::Presence { user, .. } => user,
            RecordBody::Receipt { to, .. } => to,
            RecordBody::Key { user, .. } => user,
            // About no peer: `tail --with` leaves link records out.
            RecordBody::Link { .. } => "",
        }
    }
}

/// Most names a `Link` record lists: enough for a room, and a large relay (where only contacts'
/// presence is known anyway) cannot make one record large.
pub const LINK_ONLINE_MAX: usize = 64;

/// One history record.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Position in this daemon's history, increasing.
    pub seq: u64,
    /// When it was recorded (for an incoming message: the sender's time), ms since the epoch.
    pub time_ms: u64,
    /// What happened.
    pub body: RecordBody,
}

/// One line of `who`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PeerView {
    /// User name.
    pub user: String,
    /// Connected to the relay now.
    pub online: bool,
    /// `trusted`, `pinned` or `changed` (on a relay: `bound`).
    pub trust: TrustState,
    /// The pinned fingerprint (for `changed`: the pinned one; `presented` has the new one).
    pub fingerprint: String,
    /// For `changed`: the fingerprint the relay presents now.
    pub presented: Option<String>,
}

/// The answer to `status`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct StatusView {
    /// Own user name (none on a relay).
    pub user: Option<String>,
    /// Own fingerprint.
    pub fingerprint: String,
    /// `relay`, `member`.
    pub roles: Vec<String>,
    /// Relay address a member connects to.
    pub relay: Option<String>,
    /// Logged in to the relay (a host's member is always connected; a relay is not a member).
    pub connected: bool,
    /// Why the member is not connected, if it is not.
    pub relay_error: Option<String>,
    /// The address the relay listens on.
    pub listen: Option<String>,
    /// Peers online now.
    pub peers_online: u64,
    /// Messages waiting for the relay to take custody.
    pub outbox_pending: u64,
    /// Seconds since start.
    pub uptime_s: u64,
    /// chatd version.
    pub version: String,
    /// State directory.
    pub state_dir: String,
    /// The relay key a member checks: the one the relay showed, else the pin it must match (nil
    /// before the first connection, and on a relay or host).
    #[serde(default)]
    pub relay_fingerprint: Option<String>,
}

/// What a failed request means, so `chatctl` can pick its exit code.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request failed (exit 1).
    Failed,
    /// A `--wait` timed out; the messages stay queued (exit 4).
    Timeout,
    /// A recipient's key changed and is not trusted (exit 5).
    KeyChanged,
}

/// One message result of `send`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Sent {
    /// Message id.
    #[serde(with = "serde_bytes")]
    pub id: [u8; 16],
    /// Recipient.
    pub to: String,
    /// State reached when the daemon answered.
    pub state: MsgState,
}

/// Daemon to client.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum CtlResponse {
    /// `send` result, one entry per recipient.
    Sent(Vec<Sent>),
    /// One `tail` record.
    Record(Record),
    /// End of a `tail` without `follow`.
    End,
    /// Part of the answer to `who`: at most [`WHO_CHUNK`] entries; `End` follows the last.
    Peers(
        #[serde(deserialize_with = "crate::proto::bounded_vec::<_, _, { WHO_CHUNK }>")]
        Vec<PeerView>,
    ),
    /// `status`.
    Status(StatusView),
    /// `fingerprint`.
    Fingerprint {
        /// Whose.
        user: String,
        /// `SHA256:...`.
        fingerprint: String,
    },
    /// A request that changes state succeeded; the text says what happened.
    Done(String),
    /// The request failed.
    Error {
        /// Which exit code applies.
        kind: ErrorKind,
        /// One line for the user.
        message: String,
        /// For a timed-out `send`: where each message got to.
        sent: Vec<Sent>,
    },
}
