//! Envelope sealing and opening (DESIGN "Cryptography"):
//!
//! > Every envelope: ChaCha20-Poly1305 under K, 96-bit nonce from the 64-bit message counter, with
//! > the header (message id, from, to, time, session id, counter) as associated data.
//!
//! > RSA-OAEP of K to the recipient's public key, plus an RSA-PSS signature by the sender over a
//! > domain-separated transcript binding sender name, recipient name, recipient fingerprint,
//! > session id and the wrapped key.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::{put_field, CryptoError, Fingerprint, Identity, PublicKey};
use crate::proto::relay::{Envelope, KeyPacket, Receipt, Rekey};

/// A 32-byte session key. No `Debug`, no `Display`; zeroized on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SessionKey([u8; 32]);

impl SessionKey {
    /// A fresh random key.
    pub fn random(rng: &mut (impl rand::CryptoRng + rand::RngCore)) -> SessionKey {
        let mut k = [0u8; 32];
        rng.fill_bytes(&mut k);
        SessionKey(k)
    }

    /// From stored bytes (the store keeps receiving sessions so queued messages open after a restart).
    pub fn from_bytes(bytes: &[u8]) -> Option<SessionKey> {
        let k: [u8; 32] = bytes.try_into().ok()?;
        Some(SessionKey(k))
    }

    /// The raw bytes, for the store only.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    // ring's ChaCha20-Poly1305 (the same RFC 8439 construction as before) rather than the
    // `chacha20poly1305` crate's: for the few hundred bytes of a message its set-up and
    // Poly1305 finish cost a fraction, and a message is sealed or opened twice per delivery.
    fn cipher(&self) -> LessSafeKey {
        // Only a key of the wrong length is refused, and this one is 32 bytes by its type.
        let key = UnboundKey::new(&CHACHA20_POLY1305, &self.0)
            .unwrap_or_else(|_| unreachable!("a 32-byte ChaCha20 key"));
        LessSafeKey::new(key)
    }
}

/// The routed header of a message: everything but the body, all of it authenticated.
pub struct Header<'a> {
    /// Message id.
    pub id: &'a [u8; 16],
    /// Sender.
    pub from: &'a str,
    /// Recipient.
    pub to: &'a str,
    /// Sender's time, ms since the epoch.
    pub time_ms: u64,
    /// Session id.
    pub session: &'a [u8; 16],
    /// Counter within the session.
    pub counter: u64,
}

impl<'a> Header<'a> {
    /// The header of an envelope.
    pub fn of(e: &'a Envelope) -> Header<'a> {
        Header {
            id: &e.id,
            from: &e.from,
            to: &e.to,
            time_ms: e.time_ms,
            session: &e.session,
            counter: e.counter,
        }
    }
}

/// Associated data: `"chatd-msg-v1\0" || field(id) || field(from) || field(to) || time_ms (u64 BE)
/// || field(session) || counter (u64 BE)`.
pub fn message_ad(h: &Header<'_>) -> Vec<u8> {
    const TAG: &[u8] = b"chatd-msg-v1\0";
    // Sized once: grown field by field, it was reallocated three times a call.
    let mut ad =
        Vec::with_capacity(TAG.len() + 4 * 4 + 16 + h.from.len() + h.to.len() + 8 + 16 + 8);
    ad.extend_from_slice(TAG);
    put_field(&mut ad, h.id);
    put_field(&mut ad, h.from.as_bytes());
    put_field(&mut ad, h.to.as_bytes());
    ad.extend_from_slice(&h.time_ms.to_be_bytes());
    put_field(&mut ad, h.session);
    ad.extend_from_slice(&h.counter.to_be_bytes());
    ad
}

/// Message nonce: four zero bytes, then the counter big-endian. Receipt tags use `0xff` in the
/// first byte, so a message and a receipt under one key never share a nonce.
fn nonce(prefix: u8, counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[0] = prefix;
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// Encrypt `text` under `key` with the header as associated data.
pub fn seal_envelope(key: &SessionKey, h: &Header<'_>, text: &[u8]) -> Vec<u8> {
    let ad = message_ad(h);
    let mut out = Vec::with_capacity(text.len() + CHACHA20_POLY1305.tag_len());
    out.extend_from_slice(text);
    match key
        .cipher()
        .seal_in_place_append_tag(nonce(0, h.counter), Aad::from(&ad), &mut out)
    {
        Ok(()) => out,
        // Sealing can only fail for inputs far above the 64 KiB text cap.
        Err(_) => Vec::new(),
    }
}

/// Decrypt and authenticate an envelope's body.
pub fn open_envelope(key: &SessionKey, e: &Envelope) -> Result<Vec<u8>, CryptoError> {
    let h = Header::of(e);
    let ad = message_ad(&h);
    let mut buf = e.ciphertext.clone();
    let len = key
        .cipher()
        .open_in_place(nonce(0, e.counter), Aad::from(&ad), &mut buf)
        .map_err(|_| CryptoError::BadCiphertext)?
        .len();
    buf.truncate(len);
    Ok(buf)
}

/// Key-packet transcript: `"chatd-keypacket-v1\0" || field(from) || field(to) ||
/// field(recipient fingerprint, 32 raw bytes) || field(session) || field(wrapped)`.
fn key_packet_transcript(
    from: &str,
    to: &str,
    recipient: &Fingerprint,
    session: &[u8; 16],
    wrapped: &[u8],
) -> Vec<u8> {
    let mut t = b"chatd-keypacket-v1\0".to_vec();
    put_field(&mut t, from.as_bytes());
    put_field(&mut t, to.as_bytes());
    put_field(&mut t, &recipient.0);
    put_field(&mut t, session);
    put_field(&mut t, wrapped);
    t
}

/// Wrap `key` to `recipient` and sign the result. Costs one RSA public and one private operation,
/// so the member makes it once per session, not per message.
pub fn make_key_packet(
    rng: &mut (impl rand::CryptoRng + rand::RngCore),
    sender: &Identity,
    from: &str,
    to: &str,
    recipient: &PublicKey,
    session: &[u8; 16],
    key: &SessionKey,
) -> Result<KeyPacket, CryptoError> {
    let wrapped = recipient.encrypt(rng, key.expose())?;
    let t = key_packet_transcript(from, to, &recipient.fingerprint(), session, &wrapped);
    let signature = sender.sign(rng, &t)?;
    Ok(KeyPacket { wrapped, signature })
}

/// Verify the sender's signature with the *pinned* sender key, and only then unwrap the session
/// key with our private key. The order is the point: a stranger cannot make us run a private-key
/// operation on bytes of their choosing (RUSTSEC-2023-0071).
pub fn unwrap_key_packet(
    rng: &mut (impl rand::CryptoRng + rand::RngCore),
    me: &Identity,
    sender: &PublicKey,
    e: &Envelope,
    kp: &KeyPacket,
) -> Result<SessionKey, CryptoError> {
    let t = key_packet_transcript(
        &e.from,
        &e.to,
        &me.public().fingerprint(),
        &e.session,
        &kp.wrapped,
    );
    sender.verify(&t, &kp.signature)?;
    let raw = me.decrypt(rng, &kp.wrapped)?;
    SessionKey::from_bytes(&raw).ok_or(CryptoError::Unwrap)
}

fn receipt_ad(id: &[u8; 16], from: &str, to: &str, session: &[u8; 16], counter: u64) -> Vec<u8> {
    const TAG: &[u8] = b"chatd-receipt-v1\0";
    let mut ad = Vec::with_capacity(TAG.len() + 4 * 4 + 16 + from.len() + to.len() + 16 + 8);
    ad.extend_from_slice(TAG);
    put_field(&mut ad, id);
    put_field(&mut ad, from.as_bytes());
    put_field(&mut ad, to.as_bytes());
    put_field(&mut ad, session);
    ad.extend_from_slice(&counter.to_be_bytes());
    ad
}

/// The tag a recipient puts on a receipt: ChaCha20-Poly1305 of an empty text under the session
/// key, nonce `0xff 00 00 00 || counter`, with the receipt fields as associated data. Only the
/// two ends hold the key, so the relay cannot forge a `delivered`.
pub fn receipt_tag(
    key: &SessionKey,
    id: &[u8; 16],
    from: &str,
    to: &str,
    session: &[u8; 16],
    counter: u64,
) -> [u8; 16] {
    let ad = receipt_ad(id, from, to, session, counter);
    let mut tag = [0u8; 16];
    if let Ok(t) =
        key.cipher()
            .seal_in_place_separate_tag(nonce(0xff, counter), Aad::from(&ad), &mut [])
    {
        tag.copy_from_slice(t.as_ref());
    }
    tag
}

/// Rekey transcript: `"chatd-rekey-v1\0" || field(id) || field(from) || field(to) ||
/// field(session)`, where `from` is the recipient who lost the session key.
pub fn rekey_transcript(id: &[u8; 16], from: &str, to: &str, session: &[u8; 16]) -> Vec<u8> {
    let mut t = b"chatd-rekey-v1\0".to_vec();
    put_field(&mut t, id);
    put_field(&mut t, from.as_bytes());
    put_field(&mut t, to.as_bytes());
    put_field(&mut t, session);
    t
}

/// Sign a request that `to` send the key of `session` again (one RSA private operation on a
/// transcript of our own choosing, with a fresh PSS salt).
pub fn sign_rekey(
    rng: &mut (impl rand::CryptoRng + rand::RngCore),
    me: &Identity,
    id: &[u8; 16],
    from: &str,
    to: &str,
    session: &[u8; 16],
) -> Result<Rekey, CryptoError> {
    let signature = me.sign(rng, &rekey_transcript(id, from, to, session))?;
    Ok(Rekey {
        id: *id,
        from: from.to_string(),
        to: to.to_string(),
        session: *session,
        signature,
    })
}

/// Check a rekey request against the key pinned for its `from`.
pub fn verify_rekey(pinned: &PublicKey, r: &Rekey) -> Result<(), CryptoError> {
    pinned.verify(
        &rekey_transcript(&r.id, &r.from, &r.to, &r.session),
        &r.signature,
    )
}

/// Check a receipt's tag.
pub fn verify_receipt(key: &SessionKey, r: &Receipt) -> Result<(), CryptoError> {
    let ad = receipt_ad(&r.id, &r.from, &r.to, &r.session, r.counter);
    let mut tag = r.tag;
    key.cipher()
        .open_in_place(nonce(0xff, r.counter), Aad::from(&ad), &mut tag)
        .map(|_| ())
        .map_err(|_| CryptoError::BadCiphertext)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;

    fn ids() -> &'static (Identity, Identity, Identity) {
        static IDS: OnceLock<(Identity, Identity, Identity)> = OnceLock::new();
        IDS.get_or_init(|| {
            let mut rng = rand::thread_rng();
            (
                Identity::generate(&mut rng, 2048).unwrap(),
                Identity::generate(&mut rng, 2048).unwrap(),
                Identity::generate(&mut rng, 2048).unwrap(),
            )
        })
    }

    fn sealed(text: &[u8]) -> (SessionKey, Envelope) {
        let (alice, bob, _) = ids();
        let mut rng = rand::thread_rng();
        let key = SessionKey::random(&mut rng);
        let session = [7u8; 16];
        let kp = make_key_packet(
            &mut rng,
            alice,
            "alice",
            "bob",
            bob.public(),
            &session,
            &key,
        )
        .unwrap();
        let mut e = Envelope {
            id: [1; 16],
            from: "alice".into(),
            to: "bob".into(),
            time_ms: 42,
            session,
            counter: 3,
            key_packet: Some(kp),
            ciphertext: vec![],
        };
        e.ciphertext = seal_envelope(&key, &Header::of(&e), text);
        (key, e)
    }

    #[test]
    fn seal_open_roundtrip_through_key_packet() {
        let (alice, bob, _) = ids();
        let (_, e) = sealed(b"hello world");
        let kp = e.key_packet.clone().unwrap();
        let k = unwrap_key_packet(&mut rand::thread_rng(), bob, alice.public(), &e, &kp).unwrap();
        assert_eq!(open_envelope(&k, &e).unwrap(), b"hello world");
        assert!(!e.ciphertext.windows(5).any(|w| w == b"hello"));
    }

    #[test]
    fn tampered_ciphertext_and_header_rejected() {
        let (k, e) = sealed(b"hello");
        let mut c = e.clone();
        c.ciphertext[0] ^= 1;
        assert!(matches!(
            open_envelope(&k, &c),
            Err(CryptoError::BadCiphertext)
        ));
        for change in 0..5 {
            let mut h = e.clone();
            match change {
                0 => h.id[0] ^= 1,
                1 => h.from = "mallory".into(),
                2 => h.time_ms += 1,
                3 => h.session[0] ^= 1,
                _ => h.counter += 1,
            }
            assert!(
                open_envelope(&k, &h).is_err(),
                "header change {change} accepted"
            );
        }
    }

    #[test]
    fn key_packet_signed_by_someone_else_rejected_before_unwrap() {
        let (_, bob, mallory) = ids();
        let (_, e) = sealed(b"x");
        let kp = e.key_packet.clone().unwrap();
        // Bob has pinned mallory's key for "alice" (or the packet was re-signed): refused.
        assert!(matches!(
            unwrap_key_packet(&mut rand::thread_rng(), bob, mallory.public(), &e, &kp),
            Err(CryptoError::BadSignature)
        ));
        // A packet whose wrapped key was swapped is refused by the signature, not by OAEP.
        let mut swapped = kp.clone();
        swapped.wrapped[10] ^= 1;
        let (alice, _, _) = ids();
        assert!(matches!(
            unwrap_key_packet(&mut rand::thread_rng(), bob, alice.public(), &e, &swapped),
            Err(CryptoError::BadSignature)
        ));
    }

    #[test]
    fn key_packet_for_another_recipient_rejected() {
        let (alice, _, carol) = ids();
        let (_, e) = sealed(b"x");
        let kp = e.key_packet.clone().unwrap();
        // Carol receives bob's envelope: the transcript binds bob's fingerprint, not carol's.
        assert!(
            unwrap_key_packet(&mut rand::thread_rng(), carol, alice.public(), &e, &kp).is_err()
        );
    }

    #[test]
    fn receipt_tags_verify_and_resist_forgery() {
        let (k, e) = sealed(b"x");
        let tag = receipt_tag(&k, &e.id, "bob", "alice", &e.session, e.counter);
        let mut r = Receipt {
            id: e.id,
            from: "bob".into(),
            to: "alice".into(),
            session: e.session,
            counter: e.counter,
            tag,
        };
        verify_receipt(&k, &r).unwrap();
        r.id[0] ^= 1;
        assert!(verify_receipt(&k, &r).is_err());
        let other = SessionKey::random(&mut rand::thread_rng());
        r.id[0] ^= 1;
        assert!(verify_receipt(&other, &r).is_err());
    }

    #[test]
    fn ad_layout_is_pinned() {
        let h = Header {
            id: &[1; 16],
            from: "a",
            to: "b",
            time_ms: 2,
            session: &[3; 16],
            counter: 4,
        };
        let ad = message_ad(&h);
        let mut want = b"chatd-msg-v1\0".to_vec();
        want.extend_from_slice(&[0, 0, 0, 16]);
        want.extend_from_slice(&[1; 16]);
        want.extend_from_slice(&[0, 0, 0, 1, b'a', 0, 0, 0, 1, b'b']);
        want.extend_from_slice(&2u64.to_be_bytes());
        want.extend_from_slice(&[0, 0, 0, 16]);
        want.extend_from_slice(&[3; 16]);
        want.extend_from_slice(&4u64.to_be_bytes());
        assert_eq!(ad, want);
    }
}
