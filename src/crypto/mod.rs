//! Cryptography, with no I/O: identity keys, fingerprints, envelope sealing and opening, the
//! login and key-packet transcripts, and receipt tags.
//!
//! Owns every use of `rsa` and of ring's AEAD in the crate. Must never: log or format a
//! private key or session key (the secret types have no `Debug`), perform a private-key operation
//! on data from a peer before that peer's signature has been checked (RUSTSEC-2023-0071, see
//! SECURITY.md), or touch a file or socket. Fixed by DESIGN "Cryptography"; changes need an issue.

mod envelope;
mod identity;

pub use envelope::{
    make_key_packet, message_ad, open_envelope, receipt_tag, rekey_transcript, seal_envelope,
    sign_rekey, unwrap_key_packet, verify_receipt, verify_rekey, Header, SessionKey,
};
pub use identity::{Fingerprint, Identity, PublicKey, MAX_KEY_BITS, MIN_KEY_BITS};

/// Everything that can go wrong in this layer.
#[derive(Debug)]
pub enum CryptoError {
    /// A key is smaller than 2048 or larger than 8192 bits.
    KeySize(usize),
    /// A key or PEM file could not be parsed.
    KeyFormat(String),
    /// Key generation failed.
    KeyGen(rsa::Error),
    /// A signature did not verify against the expected key.
    BadSignature,
    /// The wrapped session key could not be unwrapped (wrong recipient or corrupted).
    Unwrap,
    /// The AEAD tag did not verify: the ciphertext or its header was altered, or the key is wrong.
    BadCiphertext,
    /// RSA encryption or signing failed.
    Rsa(rsa::Error),
    /// A fingerprint string is not `SHA256:` plus 43 base64 characters.
    BadFingerprint,
}

impl std::fmt::Display for CryptoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CryptoError::KeySize(n) => write!(
                f,
                "RSA key of {n} bits refused: keys must have {MIN_KEY_BITS} to {MAX_KEY_BITS} bits"
            ),
            CryptoError::KeyFormat(e) => write!(f, "cannot parse key: {e}"),
            CryptoError::KeyGen(e) => write!(f, "key generation failed: {e}"),
            CryptoError::BadSignature => write!(f, "signature does not verify"),
            CryptoError::Unwrap => write!(f, "cannot unwrap session key"),
            CryptoError::BadCiphertext => write!(f, "ciphertext or header failed authentication"),
            CryptoError::Rsa(e) => write!(f, "RSA operation failed: {e}"),
            CryptoError::BadFingerprint => {
                write!(
                    f,
                    "fingerprint must look like SHA256: followed by 43 base64 characters"
                )
            }
        }
    }
}

impl std::error::Error for CryptoError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CryptoError::KeyGen(e) | CryptoError::Rsa(e) => Some(e),
            _ => None,
        }
    }
}

/// Length-prefixed field for transcripts: u32 big-endian length, then the bytes. Prefixing
/// every field keeps two different tuples from producing the same transcript.
pub(crate) fn put_field(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(&(field.len() as u32).to_be_bytes());
    out.extend_from_slice(field);
}

/// The TLS exporter label whose output binds a login to its TLS session (RFC 8446 7.5, no
/// context). PROTOCOL.md "Connecting" fixes it with [`LOGIN_EXPORTER_LEN`].
pub const LOGIN_EXPORTER_LABEL: &[u8] = b"EXPORTER-chatd-login-v1";
/// Bytes taken from the exporter.
pub const LOGIN_EXPORTER_LEN: usize = 32;

/// Domain-separated login transcript: what a member signs to prove it holds its key.
///
/// `"chatd-login-v2\0" || field(challenge) || field(user) || field(channel)`, where `channel` is
/// the TLS exporter value of the connection the login travels on ([`LOGIN_EXPORTER_LABEL`]), so
/// a signed login is worth nothing on any other TLS session; empty on a host's in-process link,
/// which has no TLS and no one in between.
pub fn login_transcript(challenge: &[u8; 32], user: &str, channel: &[u8]) -> Vec<u8> {
    let mut t = b"chatd-login-v2\0".to_vec();
    put_field(&mut t, challenge);
    put_field(&mut t, user.as_bytes());
    put_field(&mut t, channel);
    t
}
