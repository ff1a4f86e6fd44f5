//! What the relay benches share: a client connection that speaks the relay's TLS 1.3 (or plain
//! TCP to a relay from before TLS, so that one run can measure both builds), blocking or not, and
//! the login those connections sign, and the relay's CPU time, which the benches divide by the
//! work done.
//!
//! A relay is probed once ([`probe`]): one from before issue 12 sends its `Challenge` as soon as
//! a connection is accepted; a TLS relay says nothing until it has a ClientHello.

// Each bench uses a different subset.
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use chatd::crypto::{login_transcript, LOGIN_EXPORTER_LABEL, LOGIN_EXPORTER_LEN};

/// How a relay is spoken to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// TLS 1.3, and the login signs the exporter value (this build).
    Tls,
    /// Plain TCP and the `chatd-login-v1` transcript (a relay built before TLS).
    Plain,
}

/// Find out which [`Mode`] the relay at `addr` speaks: a plaintext relay sends its challenge
/// unasked within the probe's half second.
pub fn probe(addr: SocketAddr) -> io::Result<Mode> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(1) => Ok(Mode::Plain),
        Ok(_) => Err(io::Error::other("the relay closed the probe")),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Ok(Mode::Tls)
        }
        Err(e) => Err(e),
    }
}

/// The transcript a login on `wire` signs: with its exporter value under TLS, the pre-TLS
/// `chatd-login-v1` form (`"chatd-login-v1\0" || field(nonce) || field(user)`) on plain TCP.
pub fn transcript<S>(wire: &Wire<S>, nonce: &[u8; 32], user: &str) -> Vec<u8> {
    match wire.exporter() {
        Some(channel) => login_transcript(nonce, user, &channel),
        None => {
            let mut t = b"chatd-login-v1\0".to_vec();
            for f in [&nonce[..], user.as_bytes()] {
                t.extend_from_slice(&(f.len() as u32).to_be_bytes());
                t.extend_from_slice(f);
            }
            t
        }
    }
}

/// Accepts whatever chain the relay shows, but checks the handshake signature with it: a bench
/// pays for the handshake a member does, less the chain check (a member also checks the
/// identity certificate's signature over the handshake certificate: one RSA verification).
#[derive(Debug)]
struct AnyKey(rustls::crypto::WebPkiSupportedAlgorithms);

impl rustls::client::danger::ServerCertVerifier for AnyKey {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2".into()))
    }
    fn verify_tls13_signature(
        &self,
        msg: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(msg, cert, dss, &self.0)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// A verifier that accepts any certificate but checks the TLS 1.3 handshake signature with
/// it, over `provider`'s algorithms (for a bench's client with a provider of its own).
pub fn any_key(
    provider: &rustls::crypto::CryptoProvider,
) -> Arc<dyn rustls::client::danger::ServerCertVerifier> {
    Arc::new(AnyKey(provider.signature_verification_algorithms))
}

/// The client config every bench connection shares (TLS 1.3, no resumption: as chatd).
pub fn client_config() -> Arc<rustls::ClientConfig> {
    let p = Arc::new(rustls::crypto::ring::default_provider());
    let algs = p.signature_verification_algorithms;
    let mut cfg = rustls::ClientConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyKey(algs)))
        .with_no_client_auth();
    cfg.enable_sni = false;
    cfg.resumption = rustls::client::Resumption::disabled();
    Arc::new(cfg)
}

/// A connection to a relay over socket `S` (a blocking `std` stream or a non-blocking `mio`
/// one): `Read` and `Write` carry the relay protocol's bytes, through TLS when there is a
/// session. On a non-blocking socket both may answer `WouldBlock`; [`Wire::flush_tls`] writes
/// what TLS still holds when the socket is writable again.
pub struct Wire<S> {
    /// The socket.
    pub sock: S,
    tls: Option<rustls::ClientConnection>,
}

impl<S: Read + Write> Wire<S> {
    /// Speak `mode` over `sock` (a TLS session starts with the first write or flush).
    pub fn new(sock: S, mode: Mode, cfg: &Arc<rustls::ClientConfig>) -> io::Result<Wire<S>> {
        let tls = match mode {
            Mode::Plain => None,
            Mode::Tls => {
                let name = rustls::pki_types::ServerName::try_from(chatd::daemon::tls::RELAY_NAME)
                    .map_err(io::Error::other)?;
                Some(rustls::ClientConnection::new(cfg.clone(), name).map_err(io::Error::other)?)
            }
        };
        Ok(Wire { sock, tls })
    }

    /// Write what TLS holds (handshake records, encrypted frames) until done or `WouldBlock`.
    pub fn flush_tls(&mut self) -> io::Result<()> {
        let Some(tls) = self.tls.as_mut() else {
            return Ok(());
        };
        while tls.wants_write() {
            match tls.write_tls(&mut self.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Bytes TLS still has to write.
    pub fn tls_pending(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.wants_write())
    }
}

impl<S> Wire<S> {
    /// The login exporter value, once the handshake is done (None on plain TCP).
    pub fn exporter(&self) -> Option<Vec<u8>> {
        let tls = self.tls.as_ref()?;
        tls.export_keying_material(vec![0u8; LOGIN_EXPORTER_LEN], LOGIN_EXPORTER_LABEL, None)
            .ok()
    }

    /// The session, when this is TLS.
    pub fn tls_ref(&self) -> Option<&rustls::ClientConnection> {
        self.tls.as_ref()
    }
}

impl<S: Read + Write> Read for Wire<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.tls.is_none() {
            return self.sock.read(buf);
        }
        loop {
            let tls = self.tls.as_mut().expect("a TLS session");
            match tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            // The handshake's replies (and our Finished) go out as the records come in.
            self.flush_tls()?;
            let tls = self.tls.as_mut().expect("a TLS session");
            if tls.read_tls(&mut self.sock)? == 0 {
                return Ok(0);
            }
            tls.process_new_packets().map_err(io::Error::other)?;
            self.flush_tls()?;
        }
    }
}

impl<S: Read + Write> Write for Wire<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.tls.is_none() {
            return self.sock.write(buf);
        }
        loop {
            let tls = self.tls.as_mut().expect("a TLS session");
            let n = tls.writer().write(buf)?;
            let before = tls.wants_write();
            self.flush_tls()?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            // TLS's buffer is full: only a write of its records makes room. Nothing to write
            // (a handshake still waiting for the relay) or the socket full: try later.
            if !before || self.tls_pending() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_tls()?;
        self.sock.flush()
    }
}

/// User plus system CPU time of process `pid`, all its threads, to the nanosecond: what a
/// phase cost the relay, whatever else ran on the machine.
///
/// Read from the process's CPU-time clock (`clock_getcpuclockid`), not from /proc/PID/stat:
/// that counts in 10 ms clock ticks, so a 1->1 run of a few tens of milliseconds was measured
/// to within a few µs per message, coarser than the 3 µs target it is checked against. The
/// ticks remain the fallback where the clock cannot be read.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    // One source for the whole bench, chosen at the first reading, so the two readings a
    // figure is the difference of never mix a clock with ticks.
    static CLOCK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *CLOCK.get_or_init(|| process_clock(pid).is_some()) {
        process_clock(pid)
    } else {
        cpu_ticks(pid)
    }
}

fn process_clock(pid: u32) -> Option<Duration> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `clock` is a valid place for the clock id; the call has no other preconditions.
    if unsafe { libc::clock_getcpuclockid(pid, &mut clock) } != 0 {
        return None;
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; an unknown clock is reported as -1.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    Some(Duration::new(
        u64::try_from(ts.tv_sec).ok()?,
        u32::try_from(ts.tv_nsec).ok()?,
    ))
}

/// Fields 14 and 15 of /proc/PID/stat, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after it do not.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| Duration::from_secs_f64(ticks as f64 / hz as f64))
}

/// Stop a server as a service manager would: SIGTERM, up to `grace` for it to exit, then
/// SIGKILL; reaped either way. A profiler wrapped around the server (valgrind, perf record)
/// writes its output on the way out, which SIGKILL alone would lose.
pub fn stop(child: &mut std::process::Child, grace: Duration) {
    if let (Ok(None), Ok(pid)) = (child.try_wait(), libc::pid_t::try_from(child.id())) {
        // SAFETY: kill has no memory preconditions; the child is not reaped yet (try_wait
        // said so), so the pid is still its own.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The child dies with the bench even when no `Drop` runs (a panic, a signal, `kill -9`).
/// PR_SET_PDEATHSIG fires when the thread that forked exits: spawn from the main thread, which
/// lives as long as the bench. A server that changes its user when started as root (mosquitto,
/// ngircd) loses the setting; `Drop` still kills it.
pub fn die_with_parent(cmd: &mut std::process::Command) -> &mut std::process::Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure only calls prctl, which is async-signal-safe, and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    }
}

/// A `chatd` environment of its own under `home`: nothing of the user's config, state, socket or
/// systemd leaks into a bench's daemon (as tests/common does for the tests).
pub fn isolated_env<'c>(
    cmd: &'c mut std::process::Command,
    home: &std::path::Path,
) -> &'c mut std::process::Command {
    cmd.env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("XDG_STATE_HOME", home.join("state"))
        .env("XDG_RUNTIME_DIR", home.join("run"))
        .env_remove("STATE_DIRECTORY")
        .env_remove("RUNTIME_DIRECTORY")
        .env_remove("CONFIGURATION_DIRECTORY")
        .env_remove("CHATD_SOCKET")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("CHATD_TEST_ABORT_BEFORE_COMMIT")
}
