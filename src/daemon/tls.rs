//! TLS 1.3 for the member↔relay link (PROTOCOL.md "Connecting"): the relay's server config, a
//! certificate self-signed over its RSA identity key that certifies an Ed25519 key made for this
//! run, which signs the handshakes; the member's client config, whose verifier checks the
//! identity key against a pin and the chain under it; the exporter value a login signs; and the
//! member's pin file, `known_relays`.
//!
//! Must never: accept TLS 1.2 or a relay whose identity key differs from the pin, resume a
//! session (every connection shows and checks the key again), let the handshake key leave
//! memory, or log key material (fingerprints only).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::NoServerSessionStorage;
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, ClientConnection, DigitallySignedStruct, Error, RootCertStore,
    ServerConfig, SignatureScheme,
};

use crate::crypto::{Fingerprint, Identity, PublicKey, LOGIN_EXPORTER_LABEL, LOGIN_EXPORTER_LEN};

/// The pin file in the state directory: one `ADDRESS SHA256:...` line per relay, like ssh's
/// `known_hosts`.
pub const KNOWN_RELAYS: &str = "known_relays";

/// The name in the relay's handshake certificate. It names nothing (the pin authenticates the
/// relay); the verifier checks the certificate against it as TLS checks any name.
pub const RELAY_NAME: &str = "relay.chatd.invalid";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The relay's TLS config: TLS 1.3 only, no client certificates (members prove their keys in
/// the login), no session resumption. Its chain is [handshake certificate, identity
/// certificate]: the identity certificate is self-signed over the relay's RSA identity key (its
/// SubjectPublicKeyInfo is what members pin); it signs the handshake certificate, whose Ed25519
/// key is made here, lives only in memory and signs every handshake (an RSA signature per
/// connection would cost the relay more than the rest of a login; DECISIONS.md).
pub fn server_config(identity: &Identity) -> Result<Arc<ServerConfig>, String> {
    let provider = provider();
    let certified = Arc::new(certified_key(identity, &provider)?);
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("cannot configure TLS: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Chain(certified)));
    cfg.session_storage = Arc::new(NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// The relay's one chain, for every client.
#[derive(Debug)]
struct Chain(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for Chain {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// The two certificates and the handshake key (PROTOCOL.md "Connecting"). Both are valid from
/// 2000 to 9999: nothing here expires, since the handshake key never leaves the relay's memory,
/// where the identity key is as well, and the pin is what members trust.
fn certified_key(identity: &Identity, provider: &CryptoProvider) -> Result<CertifiedKey, String> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, PKCS_ED25519, PKCS_RSA_SHA256,
    };
    let fail = |e: rcgen::Error| format!("cannot make the relay's TLS certificate: {e}");
    let der = identity
        .to_pkcs8_der()
        .map_err(|e| format!("cannot export the identity key for TLS: {e}"))?;
    let rsa = KeyPair::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(der.as_slice()),
        &PKCS_RSA_SHA256,
    )
    .map_err(fail)?;
    let (from, until) = (
        rcgen::date_time_ymd(2000, 1, 1),
        rcgen::date_time_ymd(9999, 12, 31),
    );
    let mut root = CertificateParams::default();
    root.distinguished_name
        .push(DnType::CommonName, "chatd relay identity");
    root.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    root.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    root.not_before = from;
    root.not_after = until;
    let root_cert = root.self_signed(&rsa).map_err(fail)?;
    let leaf_key = KeyPair::generate_for(&PKCS_ED25519).map_err(fail)?;
    let mut leaf = CertificateParams::new(vec![RELAY_NAME.to_string()]).map_err(fail)?;
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.not_before = from;
    leaf.not_after = until;
    let leaf_cert = leaf
        .signed_by(&leaf_key, &Issuer::from_params(&root, &rsa))
        .map_err(fail)?;
    let key = PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let signer = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("cannot use the handshake key: {e}"))?;
    Ok(CertifiedKey::new(
        vec![leaf_cert.der().clone(), root_cert.der().clone()],
        signer,
    ))
}

/// What the member's verifier saw of the relay: the identity key it presented, whatever the pin
/// said.
pub type Seen = Arc<Mutex<Option<Fingerprint>>>;

/// A client connection to a relay whose identity key must be `pin` (any when `None`: the first
/// connection, which pins what it sees). `seen` receives the key presented.
pub fn client(pin: Option<Fingerprint>) -> Result<(ClientConnection, Seen), String> {
    let provider = provider();
    let seen: Seen = Arc::new(Mutex::new(None));
    let verifier = PinVerifier {
        pin,
        seen: seen.clone(),
        algs: provider.signature_verification_algorithms,
        provider: provider.clone(),
    };
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("cannot configure TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    // The relay's name proves nothing here (its key is pinned) and would tell the path which
    // relay is meant.
    cfg.enable_sni = false;
    cfg.resumption = Resumption::disabled();
    let name = ServerName::try_from(RELAY_NAME).map_err(|e| format!("TLS name: {e}"))?;
    let conn =
        ClientConnection::new(Arc::new(cfg), name).map_err(|e| format!("cannot start TLS: {e}"))?;
    Ok((conn, seen))
}

/// The value a login on `conn` signs (PROTOCOL.md "Connecting"), once the handshake is done.
pub fn exporter(conn: &rustls::Connection) -> Option<Vec<u8>> {
    conn.export_keying_material(vec![0u8; LOGIN_EXPORTER_LEN], LOGIN_EXPORTER_LABEL, None)
        .ok()
}

/// Checks the relay's identity key, the self-signed root of its chain, against the pin, then
/// the handshake certificate under it as any TLS chain (signature, name, key usage); the
/// handshake's signature is checked with the handshake certificate's key as usual.
#[derive(Debug)]
struct PinVerifier {
    pin: Option<Fingerprint>,
    seen: Seen,
    algs: WebPkiSupportedAlgorithms,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let bad = || Error::InvalidCertificate(CertificateError::BadEncoding);
        // Exactly [handshake certificate, identity certificate].
        let [root] = intermediates else {
            return Err(bad());
        };
        let anchor = webpki::anchor_from_trusted_cert(root).map_err(|_| bad())?;
        // The fingerprint is over the canonical form of the identity key, as everywhere else.
        let spki = webpki::spki_for_anchor(&anchor);
        let key = PublicKey::from_der(spki.as_ref()).map_err(|_| bad())?;
        let fp = key.fingerprint();
        if let Ok(mut s) = self.seen.lock() {
            *s = Some(fp);
        }
        if self.pin.is_some_and(|pin| pin != fp) {
            return Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        let mut roots = RootCertStore::empty();
        roots.roots.push(anchor.to_owned());
        let chain =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| Error::General(e.to_string()))?;
        let name = ServerName::try_from(RELAY_NAME).map_err(|_| bad())?;
        chain.verify_server_cert(end_entity, &[], &name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        // Only TLS 1.3 is configured; refuse rather than trust if that ever changes.
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The pin stored for `addr` in `path`, if any.
pub fn load_pin(path: &Path, addr: &str) -> Result<Option<Fingerprint>, String> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(a), Some(fp), None) = (words.next(), words.next(), words.next()) else {
            return Err(format!(
                "{} line {}: expected ADDRESS SHA256:...",
                path.display(),
                n + 1
            ));
        };
        if a == addr {
            return Fingerprint::parse(fp)
                .map(Some)
                .map_err(|e| format!("{} line {}: {e}", path.display(), n + 1));
        }
    }
    Ok(None)
}

/// Store `fp` as the pin for `addr` in `path` (0600, replacing any line for `addr`), written to
/// a temporary file and renamed so a crash leaves the old file or the new one.
pub fn save_pin(path: &Path, addr: &str, fp: Fingerprint) -> Result<(), String> {
    let old = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let mut text = String::new();
    for line in old.lines() {
        if line.split_whitespace().next() != Some(addr) {
            text.push_str(line);
            text.push('\n');
        }
    }
    text.push_str(&format!("{addr} {fp}\n"));
    let tmp = path.with_extension("tmp");
    let write = || -> io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_per_address_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KNOWN_RELAYS);
        assert_eq!(load_pin(&path, "a:1").unwrap(), None);
        save_pin(&path, "a:1", Fingerprint([1; 32])).unwrap();
        save_pin(&path, "b:2", Fingerprint([2; 32])).unwrap();
        save_pin(&path, "a:1", Fingerprint([3; 32])).unwrap();
        assert_eq!(load_pin(&path, "a:1").unwrap(), Some(Fingerprint([3; 32])));
        assert_eq!(load_pin(&path, "b:2").unwrap(), Some(Fingerprint([2; 32])));
        assert_eq!(load_pin(&path, "c:3").unwrap(), None);
        fs::write(&path, "a:1 SHA256:nope\n").unwrap();
        assert!(load_pin(&path, "a:1").unwrap_err().contains("line 1"));
    }
}
