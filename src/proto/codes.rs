//! The protocols' machine-readable words: the codes of `FromRelay::Error` and
//! `FromRelay::Refused` (docs/PROTOCOL.md section 5), and the trust states `who` reports.
//!
//! Owns the mapping between each code and its wire string. On the wire a code is a plain
//! MessagePack string, exactly as before these enums existed, so the encoding is unchanged
//! (`tests/golden.rs` pins it). A code this version does not know (a newer relay may send one)
//! decodes to `Other` and keeps its text, so it can be shown and logged; code that decides
//! anything matches on the known variants only. Must never: turn a known code into `Other`, or an
//! unknown one into a known variant.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Defines a code enum whose wire form is its snake_case string, with an `Other` variant for
/// strings this version does not know.
macro_rules! codes {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $wire:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
        #[serde(from = "String", into = "String")]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
            /// A code this version does not know, as sent.
            Other(String),
        }

        impl $name {
            /// The code as it appears on the wire and in docs/PROTOCOL.md.
            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$variant => $wire,)+
                    $name::Other(s) => s,
                }
            }

            /// Every known code, in the order of docs/PROTOCOL.md.
            pub const KNOWN: &'static [$name] = &[$($name::$variant,)+];
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                match s.as_str() {
                    $($wire => $name::$variant,)+
                    _ => $name::Other(s),
                }
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name::from(s.to_string())
            }
        }

        impl From<$name> for String {
            fn from(c: $name) -> String {
                match c {
                    $name::Other(s) => s,
                    known => known.as_str().to_string(),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(self.as_str())
            }
        }

        // Tests and logs compare codes with their documented text.
        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.as_str() == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    };
}

codes! {
    /// Why the relay ends a connection (`FromRelay::Error`).
    ErrorCode {
        /// A frame is not a valid `ToRelay`, or does not fit the connection's state.
        Protocol => "protocol",
        /// Invalid user name, unusable key, or a signature that does not verify.
        BadLogin => "bad_login",
        /// The relay could not store a new name binding.
        Storage => "storage",
        /// The name is bound to a different key.
        NameTaken => "name_taken",
        /// The same user logged in again on another connection.
        Replaced => "replaced",
        /// The relay operator forgot this user.
        Forgotten => "forgotten",
        /// No login within the handshake timeout, or no frame within the idle timeout.
        Timeout => "timeout",
        /// The login's key already holds the most names one key may register.
        TooManyNames => "too_many_names",
        /// The relay registered as many new names in the last minute as it allows.
        RegistrationRate => "registration_rate",
    }
}

codes! {
    /// Why the relay refuses one item (`FromRelay::Refused`); the connection stays up.
    RefuseCode {
        /// The item's `from` is not the logged-in user.
        BadSender => "bad_sender",
        /// No name `to` is bound on the relay.
        UnknownUser => "unknown_user",
        /// The recipient's queue is full.
        QueueFull => "queue_full",
        /// The item cannot be re-encoded within the frame cap.
        TooLarge => "too_large",
        /// The relay's database write failed.
        Storage => "storage",
        /// The relay operator forgot the recipient: the item, already accepted, was dropped
        /// undelivered (sent after `Accepted`, at once or at the sender's next login).
        Forgotten => "forgotten",
    }
}

codes! {
    /// How far a member trusts a peer's key, as `who` shows it (control protocol and `--json`).
    TrustState {
        /// Pinned on first sight, not checked by the user.
        Pinned => "pinned",
        /// The user checked the fingerprint (`chatctl trust`).
        Trusted => "trusted",
        /// The relay presents another key than the pinned one; messages are refused.
        Changed => "changed",
        /// On a relay: the name is bound to this key.
        Bound => "bound",
    }
}

codes! {
    /// The kinds of history record (`tail --kind`, the `kind` of `tail --json`). A script must
    /// skip a kind it does not know: newer versions add kinds.
    RecordKind {
        /// A message, either direction.
        Message => "message",
        /// A peer joined or left.
        Presence => "presence",
        /// A sent message changed state.
        Receipt => "receipt",
        /// A peer's key was pinned, changed, came back, was trusted or was forgotten.
        Key => "key",
        /// The member's link to the relay came up or went down.
        Link => "link",
    }
}

codes! {
    /// What happened to a peer's key, in a `key` history record.
    KeyEvent {
        /// First sight: the relay introduced the peer and its key is now pinned (TOFU).
        Pinned => "pinned",
        /// The relay presents a key other than the pinned one: the peer is `changed`.
        Changed => "changed",
        /// The relay presents the pinned key again; the peer stays `changed` until `trust`.
        Returned => "returned",
        /// The user ran `chatctl trust`: the warning is cleared (or the pin replaced).
        Trusted => "trusted",
        /// The user ran `chatctl forget`: the pin and what was held are gone.
        Forgotten => "forgotten",
    }
}

impl RefuseCode {
    /// A refusal that may pass: the item can be offered again later.
    pub fn is_transient(&self) -> bool {
        matches!(self, RefuseCode::QueueFull | RefuseCode::Storage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{from_payload, to_payload};

    #[test]
    fn known_codes_round_trip_as_plain_strings() {
        for c in ErrorCode::KNOWN {
            let bytes = to_payload(c).unwrap();
            assert_eq!(bytes, to_payload(&c.as_str().to_string()).unwrap());
            assert_eq!(&from_payload::<ErrorCode>(&bytes).unwrap(), c);
        }
        for c in RefuseCode::KNOWN {
            let bytes = to_payload(c).unwrap();
            assert_eq!(bytes, to_payload(&c.as_str().to_string()).unwrap());
            assert_eq!(&from_payload::<RefuseCode>(&bytes).unwrap(), c);
        }
    }

    #[test]
    fn an_unknown_code_is_kept_not_guessed() {
        let bytes = to_payload(&"rate_limited".to_string()).unwrap();
        let c: RefuseCode = from_payload(&bytes).unwrap();
        assert_eq!(c, RefuseCode::Other("rate_limited".into()));
        assert!(!c.is_transient());
        assert_eq!(to_payload(&c).unwrap(), bytes);
        assert_eq!(
            ErrorCode::from("queue_full"),
            ErrorCode::Other("queue_full".into())
        );
        assert_eq!(RefuseCode::from("queue_full"), RefuseCode::QueueFull);
    }

    #[test]
    fn only_queue_full_and_storage_are_transient() {
        let transient: Vec<_> = RefuseCode::KNOWN
            .iter()
            .filter(|c| c.is_transient())
            .map(RefuseCode::as_str)
            .collect();
        assert_eq!(transient, ["queue_full", "storage"]);
    }
}
