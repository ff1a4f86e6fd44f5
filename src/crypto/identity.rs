//! Identity keys (RSA) and fingerprints.

use base64::Engine as _;
use rsa::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding,
};
use rsa::traits::PublicKeyParts;
use rsa::{Oaep, Pss, RsaPrivateKey, RsaPublicKey};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::CryptoError;

/// Smallest RSA modulus accepted anywhere, ours or a peer's.
pub const MIN_KEY_BITS: usize = 2048;
/// Largest RSA modulus accepted from a peer: bounds the cost a peer can make us pay per verify.
pub const MAX_KEY_BITS: usize = 8192;

/// `SHA256:` + unpadded standard base64 of SHA-256(SPKI DER), as OpenSSH prints.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Fingerprint of a SubjectPublicKeyInfo DER encoding.
    pub fn of_spki(der: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(der).into())
    }

    /// Parse `SHA256:...`.
    pub fn parse(s: &str) -> Result<Fingerprint, CryptoError> {
        let b64 = s
            .strip_prefix("SHA256:")
            .ok_or(CryptoError::BadFingerprint)?;
        let raw = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(b64)
            .map_err(|_| CryptoError::BadFingerprint)?;
        let arr: [u8; 32] = raw.try_into().map_err(|_| CryptoError::BadFingerprint)?;
        Ok(Fingerprint(arr))
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SHA256:{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(self.0)
        )
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

/// A peer's (or our own) public key, with its DER encoding and fingerprint.
#[derive(Clone)]
pub struct PublicKey {
    key: RsaPublicKey,
    der: Vec<u8>,
    fingerprint: Fingerprint,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", self.fingerprint)
    }
}

impl PartialEq for PublicKey {
    fn eq(&self, other: &Self) -> bool {
        self.der == other.der
    }
}

impl PublicKey {
    /// Parse a SubjectPublicKeyInfo DER key, refusing sizes outside the accepted range.
    pub fn from_der(der: &[u8]) -> Result<PublicKey, CryptoError> {
        let key = RsaPublicKey::from_public_key_der(der)
            .map_err(|e| CryptoError::KeyFormat(e.to_string()))?;
        let bits = key.n().bits();
        if !(MIN_KEY_BITS..=MAX_KEY_BITS).contains(&bits) {
            return Err(CryptoError::KeySize(bits));
        }
        // Re-encode so the fingerprint is over the canonical form, whatever the peer sent.
        let der = key
            .to_public_key_der()
            .map_err(|e| CryptoError::KeyFormat(e.to_string()))?
            .as_bytes()
            .to_vec();
        let fingerprint = Fingerprint::of_spki(&der);
        Ok(PublicKey {
            key,
            der,
            fingerprint,
        })
    }

    /// SubjectPublicKeyInfo DER.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// The fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// Modulus size in bits.
    pub fn bits(&self) -> usize {
        self.key.n().bits()
    }

    /// Verify an RSA-PSS (SHA-256, MGF1-SHA-256, salt 32) signature over `msg`.
    ///
    /// ring's verify, not `rsa`'s: a relay verifies every login, and `rsa`'s bignum arithmetic
    /// was 40 % of a relay's CPU while members logged in (issue 8). Both check the same thing:
    /// PSS with MGF1-SHA-256 and a salt as long as the digest.
    ///
    /// The components are made for each verify, not kept: a relay holds a key per name, and
    /// a copy of each would cost it 40 MiB at 100,000 names for well under a microsecond saved.
    pub fn verify(&self, msg: &[u8], signature: &[u8]) -> Result<(), CryptoError> {
        let components = ring::signature::RsaPublicKeyComponents {
            n: self.key.n().to_bytes_be(),
            e: self.key.e().to_bytes_be(),
        };
        components
            .verify(&ring::signature::RSA_PSS_2048_8192_SHA256, msg, signature)
            .map_err(|_| CryptoError::BadSignature)
    }

    /// RSA-OAEP (SHA-256, MGF1-SHA-256, empty label) encryption.
    pub fn encrypt(
        &self,
        rng: &mut (impl rand::CryptoRng + rand::RngCore),
        msg: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        self.key
            .encrypt(rng, Oaep::new::<Sha256>(), msg)
            .map_err(CryptoError::Rsa)
    }
}

/// Our own identity: the private key. No `Debug`, no `Clone`; the key is zeroized on drop by `rsa`.
pub struct Identity {
    key: RsaPrivateKey,
    public: PublicKey,
}

impl Identity {
    /// Generate a new identity (e = 65537).
    pub fn generate(
        rng: &mut (impl rand::CryptoRng + rand::RngCore),
        bits: usize,
    ) -> Result<Identity, CryptoError> {
        if !(MIN_KEY_BITS..=MAX_KEY_BITS).contains(&bits) {
            return Err(CryptoError::KeySize(bits));
        }
        let key = RsaPrivateKey::new(rng, bits).map_err(CryptoError::KeyGen)?;
        Identity::from_key(key)
    }

    fn from_key(key: RsaPrivateKey) -> Result<Identity, CryptoError> {
        let bits = key.n().bits();
        if !(MIN_KEY_BITS..=MAX_KEY_BITS).contains(&bits) {
            return Err(CryptoError::KeySize(bits));
        }
        let der = key
            .to_public_key()
            .to_public_key_der()
            .map_err(|e| CryptoError::KeyFormat(e.to_string()))?;
        let public = PublicKey::from_der(der.as_bytes())?;
        Ok(Identity { key, public })
    }

    /// Load from PKCS#8 PEM.
    pub fn from_pem(pem: &str) -> Result<Identity, CryptoError> {
        let key = RsaPrivateKey::from_pkcs8_pem(pem)
            .map_err(|e| CryptoError::KeyFormat(e.to_string()))?;
        Identity::from_key(key)
    }

    /// PKCS#8 PEM; the string is zeroized when dropped.
    pub fn to_pem(&self) -> Result<Zeroizing<String>, CryptoError> {
        self.key
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| CryptoError::KeyFormat(e.to_string()))
    }

    /// PKCS#8 DER of the private key, for the TLS layer to sign its handshakes with; zeroized
    /// when dropped.
    pub fn to_pkcs8_der(&self) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        self.key
            .to_pkcs8_der()
            .map(|d| Zeroizing::new(d.as_bytes().to_vec()))
            .map_err(|e| CryptoError::KeyFormat(e.to_string()))
    }

    /// Our public key.
    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// RSA-PSS (SHA-256, MGF1-SHA-256, salt 32) signature over `msg`, blinded.
    pub fn sign(
        &self,
        rng: &mut (impl rand::CryptoRng + rand::RngCore),
        msg: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let digest = Sha256::digest(msg);
        self.key
            .sign_with_rng(rng, Pss::new::<Sha256>(), &digest)
            .map_err(CryptoError::Rsa)
    }

    /// RSA-OAEP decryption, blinded. Crate-private: only `unwrap_key_packet` may call it, after
    /// it has verified the sender's signature.
    pub(crate) fn decrypt(
        &self,
        rng: &mut (impl rand::CryptoRng + rand::RngCore),
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        self.key
            .decrypt_blinded(rng, Oaep::new::<Sha256>(), ciphertext)
            .map(Zeroizing::new)
            .map_err(|_| CryptoError::Unwrap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_format_roundtrip() {
        let fp = Fingerprint([0xfe; 32]);
        let s = fp.to_string();
        assert!(s.starts_with("SHA256:"));
        assert_eq!(s.len(), 7 + 43);
        assert_eq!(Fingerprint::parse(&s).unwrap(), fp);
        assert!(Fingerprint::parse("MD5:abc").is_err());
        assert!(Fingerprint::parse("SHA256:abc").is_err());
    }

    #[test]
    fn small_keys_refused() {
        let mut rng = rand::thread_rng();
        assert!(matches!(
            Identity::generate(&mut rng, 1024),
            Err(CryptoError::KeySize(1024))
        ));
        let small = RsaPrivateKey::new(&mut rng, 1024).unwrap();
        let der = small.to_public_key().to_public_key_der().unwrap();
        assert!(matches!(
            PublicKey::from_der(der.as_bytes()),
            Err(CryptoError::KeySize(1024))
        ));
    }

    #[test]
    fn pem_roundtrip_keeps_fingerprint_and_signatures_verify() {
        let mut rng = rand::thread_rng();
        let id = Identity::generate(&mut rng, 2048).unwrap();
        let again = Identity::from_pem(&id.to_pem().unwrap()).unwrap();
        assert_eq!(id.public().fingerprint(), again.public().fingerprint());
        let sig = id.sign(&mut rng, b"hello").unwrap();
        again.public().verify(b"hello", &sig).unwrap();
        assert!(again.public().verify(b"hellO", &sig).is_err());
    }

    #[test]
    fn verify_takes_the_salt_length_of_the_protocol_only() {
        // The verify (ring) and the sign (`rsa`) are different libraries: the salt length and
        // the MGF they agree on is the protocol's, and a signature with another salt length,
        // or over a different key, is refused as before.
        let mut rng = rand::thread_rng();
        let id = Identity::generate(&mut rng, 2048).unwrap();
        let digest = Sha256::digest(b"login");
        let salt20 = id
            .key
            .sign_with_rng(&mut rng, Pss::new_with_salt::<Sha256>(20), &digest)
            .unwrap();
        assert!(id.public().verify(b"login", &salt20).is_err());
        let good = id.sign(&mut rng, b"login").unwrap();
        id.public().verify(b"login", &good).unwrap();
        let other = Identity::generate(&mut rng, 2048).unwrap();
        assert!(other.public().verify(b"login", &good).is_err());
        assert!(id.public().verify(b"login", &good[1..]).is_err());
        assert!(id.public().verify(b"login", &[]).is_err());
    }
}
