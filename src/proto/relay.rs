//! Messages between a member and a relay (the TCP socket).
//!
//! Owns the relay protocol's vocabulary: `ToRelay` (member to relay) and `FromRelay` (relay to
//! member), and the routed items the relay stores and forwards without being able to read them.
//! The order of a session is: relay sends `Challenge`; member answers `Login`; relay answers
//! `Welcome` (or `Error` and closes); then either side sends the rest in any order.

use serde::{Deserialize, Serialize};

use super::ProtoError;

pub use crate::proto::codes::{ErrorCode, RefuseCode};

/// A sealed message as it travels: a header the relay routes on, and a body only the recipient
/// can open. The header is the AEAD's associated data, so the relay cannot alter it either.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// Random message id, unique per message; receivers drop duplicates by it.
    #[serde(with = "serde_bytes")]
    pub id: [u8; 16],
    /// Sender's user name.
    pub from: String,
    /// Recipient's user name.
    pub to: String,
    /// Sender's clock when the message was sealed, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The sending session this message belongs to.
    #[serde(with = "serde_bytes")]
    pub session: [u8; 16],
    /// Message counter within the session; also the AEAD nonce.
    pub counter: u64,
    /// The session key wrapped to the recipient, carried until the sender holds a receipt.
    pub key_packet: Option<KeyPacket>,
    /// ChaCha20-Poly1305 ciphertext of the text, with its 16-byte tag at the end.
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
}

/// A session key wrapped to the recipient and signed by the sender.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct KeyPacket {
    /// RSA-OAEP (SHA-256) encryption of the 32-byte session key to the recipient's key.
    #[serde(with = "serde_bytes")]
    pub wrapped: Vec<u8>,
    /// RSA-PSS (SHA-256, salt 32) signature by the sender over the key-packet transcript.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// Proof from a recipient's daemon that it stored a message, authenticated with the session key
/// so the relay cannot forge it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// The id of the message that was stored.
    #[serde(with = "serde_bytes")]
    pub id: [u8; 16],
    /// The recipient of the message, who sends this receipt.
    pub from: String,
    /// The message's sender, who receives this receipt.
    pub to: String,
    /// The message's session.
    #[serde(with = "serde_bytes")]
    pub session: [u8; 16],
    /// The message's counter.
    pub counter: u64,
    /// Poly1305 tag under the session key (see `crypto::receipt_tag`).
    #[serde(with = "serde_bytes")]
    pub tag: [u8; 16],
}

/// A recipient's request that the sender send a session's key again: it has no key for
/// `session` (restored from a backup, database lost), so it dropped message `id` of it. Signed by
/// the recipient's identity key, so the relay can neither forge nor alter it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Rekey {
    /// The id of the message that could not be opened (also this item's id).
    #[serde(with = "serde_bytes")]
    pub id: [u8; 16],
    /// The recipient of the message, who sends this request.
    pub from: String,
    /// The message's sender, who receives it.
    pub to: String,
    /// The session whose key is missing.
    #[serde(with = "serde_bytes")]
    pub session: [u8; 16],
    /// RSA-PSS (SHA-256, salt 32) signature by `from` over the rekey transcript.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// Anything the relay stores and forwards for a user.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Routed {
    /// A sealed message.
    Message(Envelope),
    /// A delivery receipt.
    Receipt(Receipt),
    /// A request to send a session's key again.
    Rekey(Rekey),
}

/// Which kind of routed item an acknowledgement is about.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// A `Routed::Message`.
    Message,
    /// A `Routed::Receipt`.
    Receipt,
    /// A `Routed::Rekey`.
    Rekey,
}

/// Names one routed item: for a receipt, `id` is the id of the message it confirms.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ItemKey {
    /// Message or receipt.
    pub kind: Kind,
    /// The message id.
    #[serde(with = "serde_bytes")]
    pub id: [u8; 16],
}

impl Routed {
    /// A routed item from a payload that holds it whole (a queued item as stored): a message or
    /// receipt as `to_payload` writes it by [`fast`](super::fast), anything else by serde.
    pub fn decode(payload: &[u8]) -> Result<Routed, ProtoError> {
        match super::fast::routed(payload) {
            Some(r) => Ok(r),
            None => super::from_payload_whole(payload),
        }
    }

    /// The key acknowledgements use for this item.
    pub fn key(&self) -> ItemKey {
        match self {
            Routed::Message(e) => ItemKey {
                kind: Kind::Message,
                id: e.id,
            },
            Routed::Receipt(r) => ItemKey {
                kind: Kind::Receipt,
                id: r.id,
            },
            Routed::Rekey(r) => ItemKey {
                kind: Kind::Rekey,
                id: r.id,
            },
        }
    }
    /// Who sent it.
    pub fn from(&self) -> &str {
        match self {
            Routed::Message(e) => &e.from,
            Routed::Receipt(r) => &r.from,
            Routed::Rekey(r) => &r.from,
        }
    }
    /// Who it is for.
    pub fn to(&self) -> &str {
        match self {
            Routed::Message(e) => &e.to,
            Routed::Receipt(r) => &r.to,
            Routed::Rekey(r) => &r.to,
        }
    }
}

/// One entry of the relay's directory.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// User name.
    pub user: String,
    /// The public key bound to the name, SubjectPublicKeyInfo DER.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// Whether the user is connected now.
    pub online: bool,
}

/// Member to relay.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum ToRelay {
    /// Answer to `Challenge`: who I am and proof that I hold the key.
    Login {
        /// The name to log in as.
        user: String,
        /// The member's public key, SubjectPublicKeyInfo DER.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// RSA-PSS signature over the login transcript.
        #[serde(with = "serde_bytes")]
        signature: Vec<u8>,
    },
    /// Store and forward this item; the relay answers `Accepted` or `Refused`.
    Send(Routed),
    /// I stored this delivered item; drop it from my queue.
    Ack(ItemKey),
    /// Keep-alive; the relay answers `Pong`.
    Ping,
    /// Keys on demand: the key and online state of each of these names (at most
    /// [`LOOKUP_CHUNK`](crate::proto::LOOKUP_CHUNK)); the relay answers `Keys`, in order with
    /// other lookups, and from then on tells this connection when each name found joins or
    /// leaves (a subscription, up to the relay's `max_subscriptions`).
    Lookup(
        #[serde(
            deserialize_with = "crate::proto::bounded_vec::<_, _, { crate::proto::LOOKUP_CHUNK }>"
        )]
        Vec<String>,
    ),
    /// One page of the relay's directory: names that start with `prefix`, in byte order, after
    /// `after` (`""` for the first page). The relay answers `Listing`.
    List {
        /// The last name of the previous page, or `""`.
        after: String,
        /// Only names that start with this (`""` for all).
        prefix: String,
    },
}

impl ToRelay {
    /// A payload a relay received, which must hold one message and nothing after it (the relay
    /// forwards what it routes as it came): the message path's frames by
    /// [`fast`](super::fast), anything else by serde.
    pub fn decode(payload: &[u8]) -> Result<ToRelay, ProtoError> {
        match super::fast::to_relay(payload) {
            Some(m) => Ok(m),
            None => super::from_payload_whole(payload),
        }
    }
}

/// Relay to member.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum FromRelay {
    /// First frame on every connection.
    Challenge {
        /// 32 random bytes the login signature must cover.
        #[serde(with = "serde_bytes")]
        nonce: [u8; 32],
        /// Relay software version, for diagnostics.
        version: String,
    },
    /// Login accepted: the directory of every bound name except the member's own.
    Welcome {
        /// The name that is now logged in.
        user: String,
        /// Every other bound name (the first `DIRECTORY_CHUNK`; `Directory` frames follow).
        #[serde(
            deserialize_with = "crate::proto::bounded_vec::<_, _, { crate::proto::DIRECTORY_CHUNK }>"
        )]
        peers: Vec<Peer>,
    },
    /// More of the directory, after `Welcome`, when it does not fit in one frame.
    Directory(
        #[serde(
            deserialize_with = "crate::proto::bounded_vec::<_, _, { crate::proto::DIRECTORY_CHUNK }>"
        )]
        Vec<Peer>,
    ),
    /// Someone joined (with their key) or left.
    Presence(Peer),
    /// An item for you; answer `Ack` once it is stored.
    Deliver(Routed),
    /// The relay stored the item and will deliver it.
    Accepted(ItemKey),
    /// The relay will not take the item.
    Refused {
        /// Which item.
        key: ItemKey,
        /// Machine-readable reason (docs/PROTOCOL.md section 5).
        code: RefuseCode,
        /// Human-readable reason.
        reason: String,
    },
    /// Answer to `Lookup`: the names that are bound, with their keys, and those that are not.
    Keys {
        /// Every name asked for that is bound.
        #[serde(
            deserialize_with = "crate::proto::bounded_vec::<_, _, { crate::proto::LOOKUP_CHUNK }>"
        )]
        peers: Vec<Peer>,
        /// Every name asked for that is not.
        #[serde(
            deserialize_with = "crate::proto::bounded_vec::<_, _, { crate::proto::LOOKUP_CHUNK }>"
        )]
        unknown: Vec<String>,
    },
    /// Answer to `List`: one page of the directory, in name order.
    Listing {
        /// At most [`DIRECTORY_CHUNK`](crate::proto::DIRECTORY_CHUNK) entries.
        #[serde(
            deserialize_with = "crate::proto::bounded_vec::<_, _, { crate::proto::DIRECTORY_CHUNK }>"
        )]
        peers: Vec<Peer>,
        /// More names follow the last one: ask again with it as `after`.
        more: bool,
    },
    /// Answer to `Ping`.
    Pong,
    /// A fatal error; the relay closes the connection after it.
    Error {
        /// Machine-readable reason (docs/PROTOCOL.md section 5).
        code: ErrorCode,
        /// Human-readable reason.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{from_payload, to_payload};

    // Golden bytes: if one of these changes, the wire changed. Update docs/PROTOCOL.md with it.
    #[test]
    fn golden_ping_and_ack() {
        assert_eq!(to_payload(&ToRelay::Ping).unwrap(), b"\xa4Ping");
        let ack = ToRelay::Ack(ItemKey {
            kind: Kind::Message,
            id: [1; 16],
        });
        let mut want = b"\x81\xa3Ack\x82\xa4kind\xa7Message\xa2id\xc4\x10".to_vec();
        want.extend_from_slice(&[1; 16]);
        assert_eq!(to_payload(&ack).unwrap(), want);
        assert_eq!(from_payload::<ToRelay>(&want).unwrap(), ack);
    }

    #[test]
    fn golden_challenge() {
        let c = FromRelay::Challenge {
            nonce: [0; 32],
            version: "1".into(),
        };
        let mut want = b"\x81\xa9Challenge\x82\xa5nonce\xc4\x20".to_vec();
        want.extend_from_slice(&[0; 32]);
        want.extend_from_slice(b"\xa7version\xa11");
        assert_eq!(to_payload(&c).unwrap(), want);
    }

    #[test]
    fn golden_envelope() {
        let e = Routed::Message(Envelope {
            id: [2; 16],
            from: "a".into(),
            to: "b".into(),
            time_ms: 1,
            session: [3; 16],
            counter: 0,
            key_packet: None,
            ciphertext: vec![9],
        });
        let mut want = b"\x81\xa7Message\x88\xa2id\xc4\x10".to_vec();
        want.extend_from_slice(&[2; 16]);
        want.extend_from_slice(b"\xa4from\xa1a\xa2to\xa1b\xa7time_ms\x01\xa7session\xc4\x10");
        want.extend_from_slice(&[3; 16]);
        want.extend_from_slice(b"\xa7counter\x00\xaakey_packet\xc0\xaaciphertext\xc4\x01\x09");
        assert_eq!(to_payload(&e).unwrap(), want);
        assert_eq!(from_payload::<Routed>(&want).unwrap(), e);
    }

    #[test]
    fn wrong_sized_id_is_an_error_not_a_panic() {
        let bad = b"\x81\xa3Ack\x82\xa4kind\xa7Message\xa2id\xc4\x02\x01\x02";
        assert!(from_payload::<ToRelay>(bad).is_err());
    }
}
