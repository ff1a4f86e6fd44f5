//! What a TLS 1.3 server connection costs in memory once its handshake is done, with the rustls
//! version, provider and settings the relay uses (TLS 1.3 only, no tickets, no session cache):
//! the evidence behind docs/DECISIONS.md "What TLS costs an idle connection". Run:
//!
//! ```text
//! cargo bench --bench tls_memory                 # 5,000 connections, both APIs, both AEADs
//! cargo bench --bench tls_memory -- 20000        # another count
//! ```
//!
//! It makes N client/server pairs in memory (no sockets: only rustls's own state is measured),
//! drives each handshake to the end, passes one small record to the server, keeps the server
//! side and drops the client, and prints the growth of this process's VmRSS divided by N. Once
//! with the buffered `ServerConnection` (what the relay drives) and once with the unbuffered
//! API (where the caller owns the buffers), each with AES-GCM and with ChaCha20-Poly1305.

mod common;

use std::io::{Read, Write};
use std::sync::Arc;

use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::ConnectionState;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn rss_kib() -> Res<u64> {
    let s = std::fs::read_to_string("/proc/self/status")?;
    let line = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or("no VmRSS in /proc/self/status")?;
    Ok(line.split_whitespace().nth(1).ok_or("bad VmRSS")?.parse()?)
}

fn configs(chacha: bool) -> Res<(Arc<ServerConfig>, Arc<ClientConfig>)> {
    let mut provider = rustls::crypto::ring::default_provider();
    let want = if chacha {
        rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
    } else {
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
    };
    provider.cipher_suites.retain(|s| s.suite() == want);
    let provider = Arc::new(provider);
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let cert = rcgen::CertificateParams::new(vec!["relay".into()])?.self_signed(&kp)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(kp.serialize_der()));
    let mut sc = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)?;
    sc.send_tls13_tickets = 0;
    sc.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    let cc = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        // Any certificate: only the server's memory is measured here.
        .with_custom_certificate_verifier(common::any_key(&provider))
        .with_no_client_auth();
    Ok((Arc::new(sc), Arc::new(cc)))
}

fn client(cc: &Arc<ClientConfig>) -> Res<ClientConnection> {
    Ok(ClientConnection::new(
        cc.clone(),
        ServerName::try_from("relay")?,
    )?)
}

/// Bytes the client wants to send.
fn from_client(c: &mut ClientConnection) -> Res<Vec<u8>> {
    let mut buf = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut buf)?;
    }
    Ok(buf)
}

fn to_client(c: &mut ClientConnection, mut bytes: &[u8]) -> Res<()> {
    while !bytes.is_empty() {
        c.read_tls(&mut bytes)?;
        c.process_new_packets()?;
    }
    Ok(())
}

fn buffered(sc: &Arc<ServerConfig>, cc: &Arc<ClientConfig>) -> Res<ServerConnection> {
    let mut s = ServerConnection::new(sc.clone())?;
    let mut c = client(cc)?;
    for _ in 0..10 {
        let mut bytes = &from_client(&mut c)?[..];
        while !bytes.is_empty() {
            s.read_tls(&mut bytes)?;
            s.process_new_packets()?;
        }
        let mut out = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut out)?;
        }
        to_client(&mut c, &out)?;
        if !s.is_handshaking() && !c.is_handshaking() && !c.wants_write() {
            break;
        }
    }
    c.writer().write_all(b"ping")?;
    let mut bytes = &from_client(&mut c)?[..];
    while !bytes.is_empty() {
        s.read_tls(&mut bytes)?;
        s.process_new_packets()?;
    }
    let mut got = [0u8; 4];
    s.reader().read_exact(&mut got)?;
    if &got != b"ping" {
        return Err("the record did not arrive".into());
    }
    Ok(s)
}

fn unbuffered(sc: &Arc<ServerConfig>, cc: &Arc<ClientConfig>) -> Res<UnbufferedServerConnection> {
    let mut s = UnbufferedServerConnection::new(sc.clone())?;
    let mut c = client(cc)?;
    let mut incoming = Vec::new();
    let mut got = Vec::new();
    let mut ready = false;
    for round in 0..12 {
        if round == 11 {
            return Err("the handshake did not finish".into());
        }
        if ready && !c.is_handshaking() && !c.wants_write() {
            break;
        }
        incoming.extend_from_slice(&from_client(&mut c)?);
        let mut outgoing = Vec::new();
        loop {
            let status = s.process_tls_records(&mut incoming);
            let discard = status.discard;
            let stop = match status.state? {
                ConnectionState::EncodeTlsData(mut e) => {
                    let mut tmp = vec![0u8; 16 * 1024];
                    let n = e.encode(&mut tmp)?;
                    outgoing.extend_from_slice(&tmp[..n]);
                    false
                }
                ConnectionState::TransmitTlsData(t) => {
                    to_client(&mut c, &outgoing)?;
                    outgoing.clear();
                    t.done();
                    false
                }
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(rec) = r.next_record() {
                        got.extend_from_slice(rec?.payload);
                    }
                    false
                }
                ConnectionState::WriteTraffic(_) => {
                    ready = true;
                    true
                }
                _ => true,
            };
            incoming.drain(..discard);
            if stop {
                break;
            }
        }
    }
    c.writer().write_all(b"ping")?;
    incoming.extend_from_slice(&from_client(&mut c)?);
    loop {
        let status = s.process_tls_records(&mut incoming);
        let discard = status.discard;
        let more = match status.state? {
            ConnectionState::ReadTraffic(mut r) => {
                while let Some(rec) = r.next_record() {
                    got.extend_from_slice(rec?.payload);
                }
                true
            }
            _ => false,
        };
        incoming.drain(..discard);
        if !more {
            break;
        }
    }
    if got != b"ping" {
        return Err("the record did not arrive".into());
    }
    Ok(s)
}

fn measure<T>(n: usize, mut make: impl FnMut() -> Res<T>) -> Res<f64> {
    let before = rss_kib()?;
    let mut keep = Vec::with_capacity(n);
    for _ in 0..n {
        keep.push(Box::new(make()?));
    }
    let after = rss_kib()?;
    let per = after.saturating_sub(before) as f64 / n as f64;
    drop(keep);
    Ok(per)
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // One measurement per process: memory freed by one would be reused by the next and hide it.
    if let [flag, api, aead, n] = &args[..] {
        if flag == "--one" {
            let n: usize = n.parse()?;
            let (sc, cc) = configs(aead == "chacha")?;
            let per = if api == "buffered" {
                measure(n, || buffered(&sc, &cc))?
            } else {
                measure(n, || unbuffered(&sc, &cc))?
            };
            println!("{per:.2}");
            return Ok(());
        }
    }
    let n: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(5_000);
    println!(
        "tls_memory: {n} server connections kept after the handshake and one record; \
         VmRSS growth / {n}, each in a process of its own"
    );
    let me = std::env::current_exe()?;
    for (api, what) in [
        ("buffered", "buffered ServerConnection (the relay's)"),
        ("unbuffered", "unbuffered ServerConnection"),
    ] {
        for (aead, name) in [("aes", "AES-256-GCM"), ("chacha", "ChaCha20-Poly1305")] {
            let out = std::process::Command::new(&me)
                .args(["--one", api, aead, &n.to_string()])
                .output()?;
            if !out.status.success() {
                return Err(format!(
                    "{what}, {name}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )
                .into());
            }
            let per = String::from_utf8_lossy(&out.stdout).trim().to_string();
            println!("  {what}, {name}: {per} KiB per connection");
        }
    }
    Ok(())
}
