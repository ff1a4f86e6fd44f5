//! TLS 1.3 for the member↔relay link (PROTOCOL.md "Connecting"): the relay's server config over
//! its RSA identity key, presented as an RFC 7250 raw public key; the member's client config,
//! whose verifier checks the relay's key against a pin; the exporter value a login signs; and
//! the member's pin file, `known_relays`.
//!
//! Must never: accept TLS 1.2 or a relay whose key differs from the pin, resume a session (every
//! connection shows and checks the key again), or log key material (fingerprints only).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::{
    verify_tls13_signature_with_raw_key, CryptoProvider, WebPkiSupportedAlgorithms,
};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, ServerName, SubjectPublicKeyInfoDer, UnixTime,
};
use rustls::server::{AlwaysResolvesServerRawPublicKeys, NoServerSessionStorage};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, ClientConnection, DigitallySignedStruct, Error, ServerConfig,
    SignatureScheme,
};

use crate::crypto::{Fingerprint, Identity, PublicKey, LOGIN_EXPORTER_LABEL, LOGIN_EXPORTER_LEN};

/// The pin file in the state directory: one `ADDRESS SHA256:...` line per relay, like ssh's
/// `known_hosts`.
pub const KNOWN_RELAYS: &str = "known_relays";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The relay's TLS config: TLS 1.3 only, its identity key as a raw public key, no client
/// certificates (members prove their keys in the login), no session resumption.
pub fn server_config(identity: &Identity) -> Result<Arc<ServerConfig>, String> {
    let provider = provider();
    let der = identity
        .to_pkcs8_der()
        .map_err(|e| format!("cannot export the identity key for TLS: {e}"))?;
    let key = PrivateKeyDer::Pkcs8(der.as_slice().to_vec().into());
    let signer = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("cannot use the identity key for TLS: {e}"))?;
    let spki = CertificateDer::from(identity.public().der().to_vec());
    let certified = Arc::new(CertifiedKey::new(vec![spki], signer));
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("cannot configure TLS: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(AlwaysResolvesServerRawPublicKeys::new(certified)));
    cfg.session_storage = Arc::new(NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// What the member's verifier saw of the relay: the key it presented, whatever the pin said.
pub type Seen = Arc<Mutex<Option<Fingerprint>>>;

/// A client connection to a relay at `host` whose key must be `pin` (any valid key when `None`:
/// the first connection, which pins what it sees). `seen` receives the key presented.
pub fn client(pin: Option<Fingerprint>, host: &str) -> Result<(ClientConnection, Seen), String> {
    let provider = provider();
    let seen: Seen = Arc::new(Mutex::new(None));
    let verifier = PinVerifier {
        pin,
        seen: seen.clone(),
        algs: provider.signature_verification_algorithms,
    };
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("cannot configure TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    // The name proves nothing here (the key is pinned) and would tell the path which relay.
    cfg.enable_sni = false;
    cfg.resumption = Resumption::disabled();
    let name = ServerName::try_from(host.to_string())
        .unwrap_or_else(|_| ServerName::try_from("relay.chatd.invalid").expect("a valid name"));
    let conn =
        ClientConnection::new(Arc::new(cfg), name).map_err(|e| format!("cannot start TLS: {e}"))?;
    Ok((conn, seen))
}

/// The value a login on `conn` signs (PROTOCOL.md "Connecting"), once the handshake is done.
pub fn exporter(conn: &rustls::Connection) -> Option<Vec<u8>> {
    conn.export_keying_material(vec![0u8; LOGIN_EXPORTER_LEN], LOGIN_EXPORTER_LABEL, None)
        .ok()
}

/// Checks the relay's raw public key against the pin; the signature over the handshake is
/// checked with that key as usual, so a relay must hold the private key it shows.
#[derive(Debug)]
struct PinVerifier {
    pin: Option<Fingerprint>,
    seen: Seen,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        // With raw public keys the "certificate" is the SubjectPublicKeyInfo; the fingerprint is
        // over its canonical form, as everywhere else.
        let key = PublicKey::from_der(end_entity.as_ref())
            .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let fp = key.fingerprint();
        if let Ok(mut s) = self.seen.lock() {
            *s = Some(fp);
        }
        match self.pin {
            Some(pin) if pin != fp => Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            )),
            _ => Ok(ServerCertVerified::assertion()),
        }
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
        let spki = SubjectPublicKeyInfoDer::from(cert.as_ref());
        verify_tls13_signature_with_raw_key(message, &spki, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
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
