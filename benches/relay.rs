//! Relay throughput and latency (issue 12, point 6; issue 9's side-by-side comparison): a real
//! `chatd` relay process, driven over TCP (through TLS 1.3 when the relay speaks it, found out by
//! `common::probe`) by raw members that log in for real and send junk envelopes (the relay cannot
//! tell, it never opens them); and, with `--mosquitto` and `--ngircd`, the servers issue 9 sets
//! its targets against, driven through the same three workloads by minimal clients of theirs.
//! Run:
//!
//! ```text
//! cargo build --release && cargo bench --bench relay                 # target/release/chatd
//! cargo bench --bench relay -- --chatd OLD/chatd --chatd target/release/chatd   # compare
//! cargo bench --bench relay -- --size 100 --mosquitto --ngircd      # issue 9's comparison
//! cargo bench --bench relay -- --help                               # every option
//! ```
//!
//! Three measurements, each repeated `--runs` times on a fresh server (new state directory, so
//! one run's queue does not weigh on the next), each run's figure printed and the median last,
//! with each build's ratio to the first build's and that ratio's range run by run (the same
//! chatd given twice shows how far it strays by chance: on this machine's round trips, 0.83 to
//! 1.13 run by run, 0.98 in the medians of 9):
//!
//! - **throughput 1→1** and **50→50**: P senders each send `--messages` envelopes of `--size`
//!   bytes of ciphertext to their own receiver, keeping at most `--window` sent and not yet
//!   `Accepted` (the credit window a member's outbox has); each receiver `Ack`s every `Deliver`,
//!   as a member does once it stored the message. Messages per second from the first send to the
//!   last delivery, over all pairs; and the server's CPU time over the run per message (from
//!   the process's CPU-time clock, to the nanosecond), which the clients on the same machine do
//!   not skew.
//!
//!   How a client writes decides much of a server's cost, so every client, chatd's and the
//!   peers', writes the same way: by default what one read pass made it send goes out in one
//!   write (a receiver's `Ack`s or PUBACKs for every delivery that read brought, a sender's
//!   refill of its window), as a member's daemon writes what one turn produced. With
//!   `--per-frame` each envelope, `Ack` and PUBACK is a write of its own (one TLS record, one
//!   segment, one wakeup of the server each), as the bench's clients wrote before session 6;
//!   that is the worst case for any server, and the mode issue 9's first figures were taken in.
//! - **ping-pong**: one message at a time from a to b, b answers with one back to a; the round
//!   trip (a's send to a's receipt of b's answer, both through the server, each acknowledged
//!   where the protocol acknowledges) at the 50th and 99th percentile over `--pings` round trips.
//!   b writes its `Ack` and its answer at once (one write, one TLS record), as a member's daemon
//!   writes what one turn produced; mosquitto QoS 1's echo writes its PUBACK and its PUBLISH
//!   apart, and QoS 0's and ngircd's echo write their one packet.
//!
//! The relay commits each event-loop turn with one fsync, so its figures include the disk's sync
//! latency (the same for every build measured). The members run on threads of this process, on
//! the same machine as the server.
//!
//! **Placement**: with two CPUs or more, each server runs on the first CPU this process may use
//! and the bench's clients on the others (issue 9's set-up: the relay on one core, the load on
//! the other), so the server's CPU is its own and every hop of a round trip wakes the other
//! CPU. Left to the scheduler, a ping-pong's three busy threads land on the two vCPUs of this
//! machine as it happens: all on one, a round trip took 20 µs; each hop across, 160 µs; one run
//! and the next differed by that much for the same server, and a ratio of two servers measured
//! which of them was lucky. `--no-pin` leaves the placement to the scheduler.
//!
//! # The peers
//!
//! Each peer is one more "build" in the alternation: its runs alternate with the chatd builds'
//! (the chatd builds first, then the peers in the order given; `--mosquitto` adds QoS 0, then
//! QoS 1), and the summary gives its medians with the ratio to the first chatd build's. Each run
//! starts the peer fresh, in the foreground, from a config written to a temporary directory, on a
//! loopback port picked free (bound to port 0, read, released), and stops it when the run ends
//! (SIGTERM, so a profiler around it writes its output; SIGKILL after 3 s).
//! They speak plain TCP (but mosquitto over TLS, below).
//!
//! **What the comparison means**: the peers keep nothing on disk (mosquitto with `persistence
//! false`, as it is normally run; ngircd has no store), while chatd fsyncs every envelope before
//! it says `Accepted`. A peer's figure is what routing alone costs; chatd's is routing plus
//! durability.
//!
//! - **mosquitto** (`listener PORT 127.0.0.1`, `allow_anonymous true`, `persistence false`,
//!   `set_tcp_nodelay true` as chatd's relay sets TCP_NODELAY, `max_queued_messages` well above
//!   the window so the broker drops nothing; its defaults otherwise, such as 20 QoS 1 messages in
//!   flight to a subscriber), through MQTT 3.1.1: each client connects with a clean session and
//!   its name as client id and subscribes to the topic of its name; a sender publishes
//!   `--size`-byte payloads to its receiver's topic. Counted twice, as two peers:
//!   - **QoS 1**: the broker's PUBACK to the publisher is chatd's `Accepted` (the broker took the
//!     message, in memory), and the receiver's PUBACK for each PUBLISH it gets is chatd's `Ack`;
//!     the sender's window counts PUBACKs not yet received, as chatd's counts `Accepted`.
//!   - **QoS 0**: nothing is acknowledged, so the sender's window counts the deliveries its
//!     receiver has seen (a shared counter between the two threads): without it the sender would
//!     run ahead and the broker drop what it cannot queue. This window is the stricter one (it
//!     spans the whole path, not the first hop).
//! - **mosquitto over TLS** (`--mosquitto-tls`): QoS 0 as above, with `certfile`, `keyfile` (a
//!   self-signed ECDSA P-256 certificate made for the run) and `tls_version tlsv1.3` on the
//!   listener, and the clients speak TLS 1.3 through the same rustls client as chatd's
//!   (`common::Wire`, which checks the handshake signature and accepts any certificate). chatd's
//!   relay only speaks TLS since issue 12: this is the like-for-like peer.
//! - **ngircd** (`Listen = 127.0.0.1`, no DNS, IDENT or PAM, no limit of connections per address,
//!   and flood protection off: `MaxPenaltyTime = 0` and every client an IRC operator with user
//!   mode `+F`; see `PeerProc::start`), through IRC: NICK/USER registration up to the 001
//!   welcome, OPER, MODE +F; a sender sends `PRIVMSG receiver :payload` (`--size` printable ASCII
//!   bytes, at most 400 to fit the 512-byte line with the server's prefix). IRC acknowledges
//!   nothing, so the window counts the receiver's deliveries as for QoS 0. Server PINGs are
//!   answered. ngircd does not set TCP_NODELAY, so its receivers set TCP_QUICKACK before each
//!   read: a receiver that sends nothing back would otherwise delay its ACKs, and ngircd hold
//!   its next write for them (a stalled window, 7,000 messages/s instead of 400,000).
//!
//! Ping-pong is the same for each: a sends to b's topic or nick, b sends back to a's on receipt.
//! The server CPU is the whole peer process's, as it is the whole relay's; neither starts helper
//! processes (ngircd's resolver would, but DNS and IDENT are off).

mod common;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use chatd::crypto::Identity;
use chatd::proto::frame::{self, Decoded, MAX_FRAME};
use chatd::proto::relay::{Envelope, FromRelay, Routed, ToRelay};
use chatd::proto::{encode_frame, from_payload};
use common::{Mode, Wire};

const USAGE: &str = "\
cargo bench --bench relay -- [OPTIONS]

  --chatd PATH       a chatd to run as the relay (its chatctl beside it asks the port); give it
                     twice or more to compare builds: their runs alternate, and each build's
                     medians are printed with the ratio to the first and its range run by
                     run (a copy of the same chatd as a second build shows the noise)
                     [target/release/chatd]
  --mosquitto [PATH] also measure mosquitto, as two more builds: QoS 0 and QoS 1
                     [/usr/sbin/mosquitto; apt-get install -y mosquitto]
  --mosquitto-tls [PATH]
                     also measure mosquitto QoS 0 with a TLS 1.3 listener (a self-signed
                     certificate made for the run), as chatd's relay only speaks TLS
  --ngircd [PATH]    also measure ngircd, one more build [/usr/sbin/ngircd;
                     apt-get install -y ngircd]
  --runs R           runs of each measurement; the median is reported [5]
  --messages M       envelopes per sender in a throughput run [20000 for 1->1, 1000 for 50->50]
  --window W         envelopes a sender has sent and not yet seen Accepted [64]
  --size B           ciphertext (payload) bytes per envelope [256; issue 9 compares at 100]
  --pings K          round trips per ping-pong run [1000]
  --only WHAT        one of: 1to1, 50to50, pingpong
  --per-frame        every client writes each envelope, Ack and PUBACK on its own (one write,
                     one TLS record, one segment each); by default a client writes at once what
                     one read pass made it send, as a member's daemon writes what a turn produced
  --no-pin           leave the servers and the clients where the scheduler puts them; by
                     default a server runs on the first CPU this process may use and the clients
                     on the others (with fewer than two CPUs nothing is pinned)

The peers keep nothing on disk; chatd fsyncs every envelope before Accepted. They speak
plain TCP, but for --mosquitto-tls; chatd speaks TLS 1.3.";

/// Every wait has this deadline: a server that stops answering fails the run, not the machine.
const DEADLINE: Duration = Duration::from_secs(120);

/// A server start-up has this one.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// The longest `--size` ngircd can carry: its lines are at most 512 bytes, CR LF included, and it
/// prefixes what it forwards with `:nick!~user@127.0.0.1 PRIVMSG nick :`.
const IRC_MAX_PAYLOAD: usize = 400;

/// One "build" of the alternation.
#[derive(Clone, Debug)]
enum Server {
    Chatd(PathBuf),
    /// `tls`: its listener speaks TLS 1.3 (QoS 0 only: the like-for-like peer of chatd's
    /// relay, which only speaks TLS since issue 12).
    Mosquitto {
        bin: PathBuf,
        qos: u8,
        tls: bool,
    },
    Ngircd(PathBuf),
}

impl Server {
    fn label(&self) -> String {
        match self {
            Server::Chatd(p) => p.display().to_string(),
            Server::Mosquitto { bin, qos, tls } => format!(
                "mosquitto QoS{qos}{} {}",
                if *tls { " over TLS 1.3" } else { "" },
                bin.display()
            ),
            Server::Ngircd(p) => format!("ngircd {}", p.display()),
        }
    }
}

struct Opts {
    builds: Vec<Server>,
    runs: usize,
    messages: Option<usize>,
    window: usize,
    size: usize,
    pings: usize,
    only: Option<String>,
    /// Every frame its own write, as the bench's clients wrote before (see the module docs).
    per_frame: bool,
    /// `--no-pin`: no [`Placement`].
    no_pin: bool,
    /// Where the servers run (their CPU), when [`Placement::apply`] pinned this process.
    pin: Option<Placement>,
}

/// The servers on one CPU, this process's clients on the rest (the module docs say why).
#[derive(Clone, Copy)]
struct Placement {
    server: libc::cpu_set_t,
    server_cpu: usize,
}

impl Placement {
    /// Pins this thread, and so every thread it starts from now on, to every CPU it may use but
    /// the first, which the servers get. None with fewer than two CPUs.
    fn apply() -> Result<Option<Placement>, String> {
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: a cpu_set_t is plain bits; all zero is the empty set.
        let mut mine: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `mine` is a cpu_set_t of `size` bytes, written by the call.
        if unsafe { libc::sched_getaffinity(0, size, &mut mine) } != 0 {
            return Err(format!("sched_getaffinity: {}", io::Error::last_os_error()));
        }
        // SAFETY: CPU_ISSET reads a bit of a valid set, for cpu < CPU_SETSIZE.
        let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &mine) })
            .collect();
        let [server_cpu, clients @ ..] = cpus.as_slice() else {
            return Ok(None);
        };
        if clients.is_empty() {
            return Ok(None);
        }
        // SAFETY: as above; CPU_SET writes a bit of a valid set, for cpu < CPU_SETSIZE.
        let (mut server, mut rest): (libc::cpu_set_t, libc::cpu_set_t) =
            unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
        unsafe { libc::CPU_SET(*server_cpu, &mut server) };
        for &c in clients {
            unsafe { libc::CPU_SET(c, &mut rest) };
        }
        // SAFETY: `rest` is a valid cpu_set_t of `size` bytes.
        if unsafe { libc::sched_setaffinity(0, size, &rest) } != 0 {
            return Err(format!("sched_setaffinity: {}", io::Error::last_os_error()));
        }
        Ok(Some(Placement {
            server,
            server_cpu: *server_cpu,
        }))
    }

    /// `cmd` starts its process on the servers' CPU (with no placement, where it likes).
    fn server(pin: Option<Placement>, cmd: &mut Command) -> &mut Command {
        use std::os::unix::process::CommandExt;
        let Some(p) = pin else { return cmd };
        // SAFETY: between fork and exec the closure makes one system call (glibc's thin
        // sched_setaffinity wrapper) on a set copied in before the fork, and allocates nothing;
        // `last_os_error` only reads errno.
        unsafe {
            cmd.pre_exec(move || {
                let size = std::mem::size_of::<libc::cpu_set_t>();
                if libc::sched_setaffinity(0, size, &p.server) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            })
        }
    }
}

fn parse_opts() -> Result<Opts, String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut o = Opts {
        builds: Vec::new(),
        runs: 5,
        messages: None,
        window: 64,
        size: 256,
        pings: 1000,
        only: None,
        per_frame: false,
        no_pin: false,
        pin: None,
    };
    let mut peers = Vec::new();
    let mut args = std::env::args().skip(1).peekable();
    while let Some(a) = args.next() {
        // A peer's PATH is optional: the next argument is one unless it is an option.
        let mut path_or = |default: &str| {
            PathBuf::from(
                args.next_if(|v| !v.starts_with("--"))
                    .unwrap_or_else(|| default.to_string()),
            )
        };
        match a.as_str() {
            "--mosquitto" => {
                let bin = path_or("/usr/sbin/mosquitto");
                peers.push(Server::Mosquitto {
                    bin: bin.clone(),
                    qos: 0,
                    tls: false,
                });
                peers.push(Server::Mosquitto {
                    bin,
                    qos: 1,
                    tls: false,
                });
                continue;
            }
            "--mosquitto-tls" => {
                let bin = path_or("/usr/sbin/mosquitto");
                peers.push(Server::Mosquitto {
                    bin,
                    qos: 0,
                    tls: true,
                });
                continue;
            }
            "--ngircd" => {
                peers.push(Server::Ngircd(path_or("/usr/sbin/ngircd")));
                continue;
            }
            _ => {}
        }
        let mut value = |what: &str| args.next().ok_or_else(|| format!("{what} needs a value"));
        let num = |v: String, what: &str| {
            v.parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{what} needs a positive number, not {v:?}"))
        };
        match a.as_str() {
            "--chatd" => o
                .builds
                .push(Server::Chatd(PathBuf::from(value("--chatd")?))),
            "--runs" => o.runs = num(value("--runs")?, "--runs")?,
            "--messages" => o.messages = Some(num(value("--messages")?, "--messages")?),
            "--window" => o.window = num(value("--window")?, "--window")?,
            "--size" => o.size = num(value("--size")?, "--size")?,
            "--pings" => o.pings = num(value("--pings")?, "--pings")?,
            "--only" => o.only = Some(value("--only")?),
            "--per-frame" => o.per_frame = true,
            "--no-pin" => o.no_pin = true,
            "--help" | "-h" => return Err(USAGE.into()),
            // cargo bench passes --bench to every harness = false target.
            "--bench" => {}
            other => return Err(format!("unknown option {other:?}\n\n{USAGE}")),
        }
    }
    if o.builds.is_empty() {
        o.builds
            .push(Server::Chatd(root.join("target/release/chatd")));
    }
    for b in &o.builds {
        let Server::Chatd(b) = b else { continue };
        for p in [b.clone(), b.with_file_name("chatctl")] {
            if !p.is_file() {
                return Err(format!(
                    "{} does not exist (cargo build --release, or give --chatd)",
                    p.display()
                ));
            }
        }
    }
    for p in &peers {
        let (bin, package) = match p {
            Server::Mosquitto { bin, .. } => (bin, "mosquitto"),
            Server::Ngircd(bin) => (bin, "ngircd"),
            Server::Chatd(_) => continue,
        };
        if !bin.is_file() {
            return Err(format!(
                "{} does not exist: apt-get install -y {package} (or give --{package} PATH)",
                bin.display()
            ));
        }
        if package == "ngircd" && o.size > IRC_MAX_PAYLOAD {
            return Err(format!(
                "--ngircd: --size {} does not fit an IRC line (at most {IRC_MAX_PAYLOAD})",
                o.size
            ));
        }
    }
    // The ratios are to the first chatd build, so the chatd builds come first.
    o.builds.extend(peers);
    Ok(o)
}

// ---------------------------------------------------------------------------------------------
// The relay process.

/// A relay on a free loopback port in a temporary directory, stopped on drop.
struct RelayProc {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl RelayProc {
    fn start(chatd: &Path, pin: Option<Placement>) -> Result<RelayProc, String> {
        let chatctl = chatd.with_file_name("chatctl");
        let dir = tempfile::Builder::new()
            .prefix("chatd-relay-bench-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        // chatd insists the control socket's directory is private.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .map_err(|e| e.to_string())?;
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).map_err(|e| e.to_string())?;
        let socket = dir.path().join("control.sock");
        let log = std::fs::File::create(dir.path().join("relay.log")).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(chatd);
        let child = common::die_with_parent(Placement::server(pin, &mut cmd))
            .args(["--listen", "127.0.0.1:0", "--key-bits", "2048"])
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--socket")
            .arg(&socket)
            // Every sender's names share a few keys, registered at once.
            .args([
                "--max-names-per-key",
                "100000",
                "--new-names-per-minute",
                "100000",
            ])
            .env("RUST_LOG", "warn")
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join("config"))
            .env_remove("STATE_DIRECTORY")
            .env_remove("RUNTIME_DIRECTORY")
            .env_remove("CONFIGURATION_DIRECTORY")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", chatd.display()))?;
        let mut relay = RelayProc {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            _dir: dir,
        };
        let deadline = Instant::now() + START_DEADLINE;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = relay.child.try_wait() {
                let log = std::fs::read_to_string(relay._dir.path().join("relay.log"));
                return Err(format!(
                    "the relay exited at start-up: {st}: {}",
                    log.unwrap_or_default().trim()
                ));
            }
            let out = Command::new(&chatctl)
                .arg("--socket")
                .arg(&socket)
                .args(["--json", "status"])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output();
            if let Ok(out) = out {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
                if let Some(a) = v["listen"]
                    .as_str()
                    .and_then(|a| a.parse::<SocketAddr>().ok())
                {
                    relay.addr = SocketAddr::from(([127, 0, 0, 1], a.port()));
                    return Ok(relay);
                }
            }
            thread::sleep(Duration::from_millis(50));
        }
        Err("the relay did not report its address within 30 s".into())
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        common::stop(&mut self.child, Duration::from_secs(3));
    }
}

// ---------------------------------------------------------------------------------------------
// A raw member: blocking, one thread each.

struct Member {
    wire: Wire<TcpStream>,
    buf: Vec<u8>,
    chunk: Vec<u8>,
    name: String,
    counter: u64,
}

impl Member {
    /// Connect, log in as `name` with `key`, and return once `Welcome` came.
    fn login(
        addr: SocketAddr,
        mode: Mode,
        cfg: &Arc<rustls::ClientConfig>,
        name: &str,
        key: &Identity,
    ) -> io::Result<Member> {
        let tcp = TcpStream::connect(addr)?;
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(DEADLINE))?;
        tcp.set_write_timeout(Some(DEADLINE))?;
        let mut m = Member {
            wire: Wire::new(tcp, mode, cfg)?,
            buf: Vec::new(),
            chunk: vec![0; 64 * 1024],
            name: name.to_string(),
            counter: 0,
        };
        m.wire.flush()?;
        let nonce = match m.recv()? {
            FromRelay::Challenge { nonce, .. } => nonce,
            other => {
                return Err(io::Error::other(format!(
                    "expected Challenge, got {other:?}"
                )))
            }
        };
        let t = common::transcript(&m.wire, &nonce, name);
        let signature = key
            .sign(&mut rand::thread_rng(), &t)
            .map_err(|e| io::Error::other(e.to_string()))?;
        m.send(&ToRelay::Login {
            user: name.to_string(),
            key: key.public().der().to_vec(),
            signature,
        })?;
        loop {
            match m.recv()? {
                FromRelay::Welcome { .. } => return Ok(m),
                FromRelay::Error { code, reason } => {
                    return Err(io::Error::other(format!("{name}: {code}: {reason}")))
                }
                _ => {}
            }
        }
    }

    fn send(&mut self, msg: &ToRelay) -> io::Result<()> {
        self.send_all(std::slice::from_ref(msg))
    }

    /// Several frames in one write, as a member's daemon writes what one turn produced.
    fn send_all(&mut self, msgs: &[ToRelay]) -> io::Result<()> {
        let mut f = Vec::new();
        for msg in msgs {
            encode_frame(msg, &mut f).map_err(|e| io::Error::other(e.to_string()))?;
        }
        self.wire.write_all(&f)?;
        self.wire.flush()
    }

    /// An envelope of `size` junk bytes to `to`.
    fn envelope(&mut self, to: &str, size: usize) -> ToRelay {
        self.counter += 1;
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.counter.to_be_bytes());
        id[8..].copy_from_slice(&(self.name.len() as u64 ^ 0x5a5a).to_be_bytes());
        // Names differ, and ids must too: fold the name in.
        for (i, b) in self.name.bytes().enumerate() {
            id[8 + i % 8] ^= b;
        }
        ToRelay::Send(Routed::Message(Envelope {
            id,
            from: self.name.clone(),
            to: to.to_string(),
            time_ms: 0,
            session: [7; 16],
            counter: self.counter,
            key_packet: None,
            ciphertext: vec![0xab; size],
        }))
    }

    /// Every frame the bytes read so far hold, reading once when they hold none: one read
    /// pass, as a member's daemon takes in what a turn finds.
    fn recv_ready(&mut self) -> io::Result<Vec<FromRelay>> {
        let mut out = Vec::new();
        loop {
            let mut at = 0;
            while let Decoded::Frame { payload, consumed } =
                frame::decode(&self.buf[at..], MAX_FRAME)
                    .map_err(|e| io::Error::other(e.to_string()))?
            {
                out.push(
                    from_payload::<FromRelay>(payload)
                        .map_err(|e| io::Error::other(e.to_string()))?,
                );
                at += consumed;
            }
            self.buf.drain(..at);
            if !out.is_empty() {
                return Ok(out);
            }
            self.read_more()?;
        }
    }

    /// One frame (`--per-frame`), or every frame of one read pass.
    fn recv_some(&mut self, per_frame: bool) -> io::Result<Vec<FromRelay>> {
        if per_frame {
            Ok(vec![self.recv()?])
        } else {
            self.recv_ready()
        }
    }

    /// `msgs` in one write, or each in its own (`--per-frame`).
    fn send_some(&mut self, msgs: &[ToRelay], per_frame: bool) -> io::Result<()> {
        if per_frame {
            msgs.iter().try_for_each(|m| self.send(m))
        } else if msgs.is_empty() {
            Ok(())
        } else {
            self.send_all(msgs)
        }
    }

    fn read_more(&mut self) -> io::Result<()> {
        let n = self.wire.read(&mut self.chunk)?;
        if n == 0 {
            return Err(io::Error::other("the relay closed the connection"));
        }
        self.buf.extend_from_slice(&self.chunk[..n]);
        Ok(())
    }

    fn recv(&mut self) -> io::Result<FromRelay> {
        loop {
            match frame::decode(&self.buf, MAX_FRAME)
                .map_err(|e| io::Error::other(e.to_string()))?
            {
                Decoded::Frame { payload, consumed } => {
                    let msg = from_payload::<FromRelay>(payload)
                        .map_err(|e| io::Error::other(e.to_string()));
                    self.buf.drain(..consumed);
                    return msg;
                }
                Decoded::NeedMore => {}
            }
            self.read_more()?;
        }
    }
}

fn keys() -> Vec<Identity> {
    thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|_| s.spawn(|| Identity::generate(&mut rand::thread_rng(), 2048)))
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("key thread").expect("an RSA key"))
            .collect()
    })
}

/// Log in `names` on `threads` threads at once.
fn login_all(
    addr: SocketAddr,
    mode: Mode,
    names: &[String],
    keys: &[Identity],
) -> Result<Vec<Member>, String> {
    let cfg = common::client_config();
    thread::scope(|s| {
        let hs: Vec<_> = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let cfg = cfg.clone();
                s.spawn(move || Member::login(addr, mode, &cfg, n, &keys[i % keys.len()]))
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| "a login thread panicked".to_string())?
                    .map_err(|e| format!("login: {e}"))
            })
            .collect()
    })
}

// ---------------------------------------------------------------------------------------------
// The measurements.

/// Messages per second, P pairs, M messages per sender.
fn chatd_throughput(
    o: &Opts,
    chatd: &Path,
    keys: &[Identity],
    pairs: usize,
    messages: usize,
) -> Result<(f64, Option<f64>, Mode), String> {
    let relay = RelayProc::start(chatd, o.pin)?;
    let mode = common::probe(relay.addr).map_err(|e| format!("probe: {e}"))?;
    let senders: Vec<String> = (0..pairs).map(|i| format!("s{i:03}")).collect();
    let receivers: Vec<String> = (0..pairs).map(|i| format!("r{i:03}")).collect();
    let rx = login_all(relay.addr, mode, &receivers, keys)?;
    let tx = login_all(relay.addr, mode, &senders, keys)?;
    let start = Arc::new(Barrier::new(2 * pairs + 1));
    let (window, size, per_frame) = (o.window, o.size, o.per_frame);
    let took = thread::scope(|s| -> Result<(Duration, Option<Duration>), String> {
        let mut hs = Vec::new();
        for mut m in rx {
            let start = Arc::clone(&start);
            hs.push(s.spawn(move || -> Result<Instant, String> {
                start.wait();
                let (mut got, mut acks) = (0, Vec::new());
                while got < messages {
                    for f in m.recv_some(per_frame).map_err(|e| e.to_string())? {
                        match f {
                            FromRelay::Deliver(item) => {
                                acks.push(ToRelay::Ack(item.key()));
                                got += 1;
                            }
                            FromRelay::Error { code, reason } => {
                                return Err(format!("{code}: {reason}"))
                            }
                            _ => {}
                        }
                    }
                    m.send_some(&acks, per_frame).map_err(|e| e.to_string())?;
                    acks.clear();
                }
                Ok(Instant::now())
            }));
        }
        for (i, mut m) in tx.into_iter().enumerate() {
            let start = Arc::clone(&start);
            let to = format!("r{i:03}");
            hs.push(s.spawn(move || -> Result<Instant, String> {
                start.wait();
                let (mut sent, mut accepted, mut out) = (0, 0, Vec::new());
                while accepted < messages {
                    while sent < messages && sent - accepted < window {
                        out.push(m.envelope(&to, size));
                        sent += 1;
                    }
                    m.send_some(&out, per_frame).map_err(|e| e.to_string())?;
                    out.clear();
                    for f in m.recv_some(per_frame).map_err(|e| e.to_string())? {
                        match f {
                            FromRelay::Accepted(_) => accepted += 1,
                            FromRelay::Refused { code, reason, .. } => {
                                return Err(format!("refused: {code}: {reason}"))
                            }
                            FromRelay::Error { code, reason } => {
                                return Err(format!("{code}: {reason}"))
                            }
                            _ => {}
                        }
                    }
                }
                Ok(Instant::now())
            }));
        }
        start.wait();
        let t0 = Instant::now();
        let cpu0 = common::cpu_time(relay.child.id());
        let mut last = t0;
        for h in hs {
            let t = h
                .join()
                .map_err(|_| "a member thread panicked".to_string())??;
            last = last.max(t);
        }
        Ok((last - t0, cpu0))
    })?;
    let (took, cpu0) = took;
    // What the relay spent on the run (its CPU time over it), per message: the clients share the
    // machine, so this is the figure that does not depend on them.
    let n = (pairs * messages) as f64;
    let per = cpu0
        .zip(common::cpu_time(relay.child.id()))
        .map(|(a, z)| z.saturating_sub(a).as_secs_f64() * 1e6 / n);
    drop(relay);
    Ok((n / took.as_secs_f64(), per, mode))
}

/// Round trips a → b → a, one at a time: their durations, sorted.
fn chatd_ping_pong(
    o: &Opts,
    chatd: &Path,
    keys: &[Identity],
) -> Result<(Vec<Duration>, Mode), String> {
    let relay = RelayProc::start(chatd, o.pin)?;
    let mode = common::probe(relay.addr).map_err(|e| format!("probe: {e}"))?;
    let names = ["ping".to_string(), "pong".to_string()];
    let mut ms = login_all(relay.addr, mode, &names, keys)?;
    let (mut b, mut a) = (ms.pop().ok_or("no pong")?, ms.pop().ok_or("no ping")?);
    let (pings, size) = (o.pings, o.size);
    let mut rtts = thread::scope(|s| -> Result<Vec<Duration>, String> {
        let echo = s.spawn(move || -> Result<(), String> {
            let mut answered = 0;
            while answered < pings {
                match b.recv().map_err(|e| e.to_string())? {
                    FromRelay::Deliver(item) => {
                        // The Ack and the answer in one write (one TLS record), as the
                        // daemon writes a turn's frames; a peer's echo writes its one packet.
                        let back = b.envelope("ping", size);
                        b.send_all(&[ToRelay::Ack(item.key()), back])
                            .map_err(|e| e.to_string())?;
                        answered += 1;
                    }
                    FromRelay::Error { code, reason } => return Err(format!("{code}: {reason}")),
                    _ => {}
                }
            }
            Ok(())
        });
        let mut rtts = Vec::with_capacity(pings);
        for _ in 0..pings {
            let t = Instant::now();
            let e = a.envelope("pong", size);
            a.send(&e).map_err(|e| e.to_string())?;
            loop {
                match a.recv().map_err(|e| e.to_string())? {
                    FromRelay::Deliver(item) => {
                        rtts.push(t.elapsed());
                        a.send(&ToRelay::Ack(item.key()))
                            .map_err(|e| e.to_string())?;
                        break;
                    }
                    FromRelay::Error { code, reason } => return Err(format!("{code}: {reason}")),
                    _ => {}
                }
            }
        }
        echo.join()
            .map_err(|_| "the echo thread panicked".to_string())??;
        Ok(rtts)
    })?;
    drop(relay);
    rtts.sort();
    Ok((rtts, mode))
}

// ---------------------------------------------------------------------------------------------
// The peers: mosquitto and ngircd processes, and minimal clients of theirs.

/// A loopback port nothing listens on now: the kernel's pick for port 0, released for the peer
/// (which cannot be handed a socket) to bind.
fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("a free port: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("a free port: {e}"))
}

/// A peer server on a free loopback port, its config and log in a temporary directory, stopped on
/// drop.
struct PeerProc {
    child: Child,
    addr: SocketAddr,
    label: String,
    dir: tempfile::TempDir,
}

impl PeerProc {
    fn start(server: &Server, o: &Opts) -> Result<PeerProc, String> {
        let label = server.label();
        let port = free_port()?;
        let dir = tempfile::Builder::new()
            .prefix("chatd-relay-bench-peer-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let conf = dir.path().join("server.conf");
        let (bin, text, args): (&Path, String, Vec<std::ffi::OsString>) = match server {
            Server::Chatd(_) => return Err(format!("{label} is not a peer")),
            // Anonymous, on loopback, nothing persisted: mosquitto as it is normally run. But
            // with TCP_NODELAY, as chatd's relay sets it: without it mosquitto holds a small write
            // while the previous one is unacknowledged, and a QoS 1 round trip waits out the
            // receiver's delayed ACK (40 ms). The queue limit counts QoS 1 messages beyond the 20
            // in flight to a subscriber (that default is kept); the window keeps fewer than
            // `window` per subscriber, so nothing is ever dropped.
            Server::Mosquitto { bin, tls, .. } => (
                bin,
                format!(
                    "listener {port} 127.0.0.1\n\
                     {}\
                     allow_anonymous true\n\
                     persistence false\n\
                     set_tcp_nodelay true\n\
                     max_queued_messages {}\n\
                     log_dest stderr\n\
                     log_type error\n\
                     log_type warning\n",
                    if *tls {
                        mosquitto_tls(dir.path())?
                    } else {
                        String::new()
                    },
                    (4 * o.window).max(1000)
                ),
                vec!["-c".into(), conf.clone().into()],
            ),
            // ngircd throttles a client that sends more than 3 commands per turn of its loop or
            // 256 bytes a second: it stops reading it for a second (a "penalty"). MaxPenaltyTime
            // = 0 makes every penalty zero seconds, and user mode +F (which only an operator can
            // set, hence the [Operator]) lifts the per-turn limit to 10 and exempts the client;
            // a real deployment keeps the throttle, but then the bench would measure it, not the
            // server. ngircd has no TCP_NODELAY: its IRC receivers acknowledge at once instead
            // (`quick_ack`).
            // The include directory is our own empty one, not the system's.
            Server::Ngircd(bin) => {
                let include = dir.path().join("conf.d");
                std::fs::create_dir_all(&include).map_err(|e| e.to_string())?;
                (
                    bin,
                    format!(
                        "[Global]\n\
                         Name = bench.local\n\
                         Info = chatd relay bench\n\
                         Listen = 127.0.0.1\n\
                         Ports = {port}\n\
                         MotdPhrase = bench\n\
                         [Limits]\n\
                         MaxConnections = 0\n\
                         MaxConnectionsIP = 0\n\
                         MaxNickLength = 9\n\
                         MaxPenaltyTime = 0\n\
                         [Options]\n\
                         DNS = no\n\
                         Ident = no\n\
                         PAM = no\n\
                         IncludeDir = {}\n\
                         [Operator]\n\
                         Name = {IRC_OPER}\n\
                         Password = {IRC_OPER}\n",
                        include.display()
                    ),
                    vec!["-n".into(), "-f".into(), conf.clone().into()],
                )
            }
        };
        std::fs::write(&conf, text).map_err(|e| format!("{}: {e}", conf.display()))?;
        let log =
            std::fs::File::create(dir.path().join("server.log")).map_err(|e| e.to_string())?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(bin);
        let child = common::die_with_parent(Placement::server(o.pin, &mut cmd))
            .args(args)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("cannot start {label}: {e}"))?;
        let mut peer = PeerProc {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            label,
            dir,
        };
        peer.wait_listening()?;
        Ok(peer)
    }

    fn wait_listening(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let answered = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).is_ok();
            // Checked after a connection too: a peer that could not bind exits, and then
            // whatever answered was not it.
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(format!(
                    "{} exited at start-up: {st}{}",
                    self.label,
                    self.log_tail()
                ));
            }
            if answered {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} did not listen on {} within {} s{}",
                    self.label,
                    self.addr,
                    START_DEADLINE.as_secs(),
                    self.log_tail()
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The end of the peer's log, for an error message.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(3)..].join(" / ");
        if tail.is_empty() {
            String::new()
        } else {
            format!(" (its log ends: {tail})")
        }
    }

    /// `e`, and what the peer says about it.
    fn explain(&self, e: String) -> String {
        format!("{}: {e}{}", self.label, self.log_tail())
    }
}

impl Drop for PeerProc {
    fn drop(&mut self) {
        common::stop(&mut self.child, Duration::from_secs(3));
    }
}

/// The ngircd operator every bench client becomes, to set user mode +F.
const IRC_OPER: &str = "bench";

/// What one read of a peer connection brought.
#[derive(Default)]
struct Got {
    /// Messages delivered to this client.
    delivered: usize,
    /// Its own sends the server acknowledged (MQTT QoS 1's PUBACK).
    accepted: usize,
}

/// A peer's client, on one thread.
trait PeerClient: Send {
    /// Queue one payload to `to` (a topic or a nick); `flush` writes what is queued.
    fn publish(&mut self, to: &str) -> Result<(), String>;
    /// Write what `publish` queued, in one write.
    fn flush(&mut self) -> Result<(), String>;
    /// Read at least once and until something counted arrived, answering what must be answered
    /// (PUBACK for a QoS 1 PUBLISH, PONG for PING).
    fn pump(&mut self) -> Result<Got, String>;
}

/// A blocking loopback connection with the bench's deadlines.
fn dial(addr: SocketAddr) -> Result<TcpStream, String> {
    let tcp = TcpStream::connect_timeout(&addr, START_DEADLINE)
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(DEADLINE))
        .map_err(|e| e.to_string())?;
    tcp.set_write_timeout(Some(DEADLINE))
        .map_err(|e| e.to_string())?;
    Ok(tcp)
}

/// A TLS 1.3 listener's lines for mosquitto's config, with a self-signed certificate (ECDSA
/// P-256, as the clients accept any certificate whose key signs the handshake: see
/// `common::client_config`) written to `dir`.
fn mosquitto_tls(dir: &Path) -> Result<String, String> {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
        .map_err(|e| format!("a certificate for mosquitto: {e}"))?;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    // PEM by hand: this rcgen is built without its `pem` feature.
    let pem = |label: &str, der: &[u8]| {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap_or_default())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    };
    std::fs::write(&cert, pem("CERTIFICATE", made.cert.der()))
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    std::fs::write(&key, pem("PRIVATE KEY", &made.signing_key.serialize_der()))
        .map_err(|e| format!("{}: {e}", key.display()))?;
    // Started as root, mosquitto becomes its own user before it reads them: the directory and
    // the files must be readable to it (the key is made for this run and thrown away).
    use std::os::unix::fs::PermissionsExt;
    for (path, mode) in [
        (dir, 0o755),
        (cert.as_path(), 0o644),
        (key.as_path(), 0o644),
    ] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(format!(
        "certfile {}\nkeyfile {}\ntls_version tlsv1.3\n",
        cert.display(),
        key.display()
    ))
}

fn io_err(what: &str, e: io::Error) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            format!("{what}: no answer within {} s", DEADLINE.as_secs())
        }
        _ => format!("{what}: {e}"),
    }
}

/// Read more of `sock` into `buf`; a closed connection is an error.
fn read_more(sock: &mut impl Read, chunk: &mut [u8], buf: &mut Vec<u8>) -> Result<(), String> {
    let n = sock.read(chunk).map_err(|e| io_err("read", e))?;
    if n == 0 {
        return Err("the server closed the connection".into());
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// Make the kernel acknowledge what `sock` receives at once rather than up to 40 ms later: a
/// receiver that sends nothing back (IRC) leaves a server that does not set TCP_NODELAY (ngircd)
/// holding its next segment for that acknowledgement (Nagle's algorithm), and the window stalls
/// on it. The flag does not stick, so it is set before each read.
fn quick_ack(sock: &TcpStream) {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket, and a pointer to a c_int with its size; a failure only costs speed.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// An MQTT 3.1.1 client subscribed to the topic of its own name.
struct Mqtt {
    sock: Wire<TcpStream>,
    name: String,
    buf: Vec<u8>,
    chunk: Vec<u8>,
    qos: u8,
    payload: Vec<u8>,
    /// PUBLISHes queued by `publish`, written by `flush`.
    out: Vec<u8>,
    /// PUBACKs of what a read pass brought, written at its end (or each at once, `--per-frame`).
    acks: Vec<u8>,
    per_frame: bool,
    next_id: u16,
}

/// An MQTT string: its length in two bytes, then its bytes.
fn mqtt_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// MQTT's "remaining length": 7 bits a byte, low first, the top bit saying more follow.
fn mqtt_len(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let b = (n % 128) as u8;
        n /= 128;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// The whole packet at the start of `b`, if it is all there: its first byte, where its body
/// starts and where it ends.
fn mqtt_packet(b: &[u8]) -> Result<Option<(u8, usize, usize)>, String> {
    let mut len = 0usize;
    let mut i = 1;
    loop {
        let Some(&byte) = b.get(i) else {
            return Ok(None);
        };
        len |= usize::from(byte & 0x7f) << (7 * (i - 1));
        i += 1;
        if byte & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return Err("a malformed MQTT remaining length".into());
        }
    }
    Ok((b.len() >= i + len).then_some((b[0], i, i + len)))
}

impl Mqtt {
    /// Connect as `name` (clean session), subscribe to topic `name` at `qos`, and return once
    /// the SUBACK granted it.
    fn connect(
        addr: SocketAddr,
        name: &str,
        qos: u8,
        size: usize,
        tls: Option<&Arc<rustls::ClientConfig>>,
        per_frame: bool,
    ) -> Result<Mqtt, String> {
        let (mode, cfg) = match tls {
            Some(cfg) => (Mode::Tls, cfg.clone()),
            None => (Mode::Plain, common::client_config()),
        };
        let mut m = Mqtt {
            sock: Wire::new(dial(addr)?, mode, &cfg).map_err(|e| e.to_string())?,
            name: name.to_string(),
            buf: Vec::new(),
            chunk: vec![0; 64 * 1024],
            qos,
            payload: vec![0xab; size],
            out: Vec::new(),
            acks: Vec::new(),
            per_frame,
            next_id: 0,
        };
        let mut body = Vec::new();
        mqtt_str(&mut body, b"MQTT");
        // Level 4 (3.1.1), clean session, keep-alive 0: the broker expects no PINGREQ.
        body.extend_from_slice(&[4, 0x02, 0, 0]);
        mqtt_str(&mut body, name.as_bytes());
        m.send_packet(0x10, &body)?;
        match m.read_packet()? {
            (0x20, b) if b.len() == 2 && b[1] == 0 => {}
            (0x20, b) => {
                return Err(format!(
                    "{name}: the broker refused the connection (CONNACK {b:?})"
                ))
            }
            (h, _) => return Err(format!("{name}: expected CONNACK, got packet {h:#04x}")),
        }
        let mut body = vec![0, 1];
        mqtt_str(&mut body, name.as_bytes());
        body.push(qos);
        m.send_packet(0x82, &body)?;
        match m.read_packet()? {
            (0x90, b) if b.len() == 3 && b[2] == qos => Ok(m),
            (0x90, b) => Err(format!(
                "{name}: SUBSCRIBE at QoS {qos} refused (SUBACK {b:?})"
            )),
            (h, _) => Err(format!("{name}: expected SUBACK, got packet {h:#04x}")),
        }
    }

    /// The PUBACKs of the PUBLISHes read so far, in one write.
    fn write_acks(&mut self) -> Result<(), String> {
        if self.acks.is_empty() {
            return Ok(());
        }
        self.sock
            .write_all(&self.acks)
            .map_err(|e| io_err(&format!("{}: PUBACK", self.name), e))?;
        self.acks.clear();
        Ok(())
    }

    fn send_packet(&mut self, first: u8, body: &[u8]) -> Result<(), String> {
        let mut p = vec![first];
        mqtt_len(&mut p, body.len());
        p.extend_from_slice(body);
        self.sock
            .write_all(&p)
            .map_err(|e| io_err(&format!("{}: write", self.name), e))
    }

    /// The next packet, during the handshake (nothing else arrives then).
    fn read_packet(&mut self) -> Result<(u8, Vec<u8>), String> {
        loop {
            if let Some((h, body, end)) = mqtt_packet(&self.buf)? {
                let p = (h, self.buf[body..end].to_vec());
                self.buf.drain(..end);
                return Ok(p);
            }
            read_more(&mut self.sock, &mut self.chunk, &mut self.buf)
                .map_err(|e| format!("{}: {e}", self.name))?;
        }
    }
}

impl PeerClient for Mqtt {
    fn publish(&mut self, topic: &str) -> Result<(), String> {
        let id_len = if self.qos > 0 { 2 } else { 0 };
        self.out.push(0x30 | (self.qos << 1));
        mqtt_len(&mut self.out, 2 + topic.len() + id_len + self.payload.len());
        mqtt_str(&mut self.out, topic.as_bytes());
        if self.qos > 0 {
            // Packet ids are 1 to 65535; far more than the window are in flight.
            self.next_id = self.next_id % u16::MAX + 1;
            self.out.extend_from_slice(&self.next_id.to_be_bytes());
        }
        self.out.extend_from_slice(&self.payload);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), String> {
        if self.out.is_empty() {
            return Ok(());
        }
        self.sock
            .write_all(&self.out)
            .map_err(|e| io_err(&format!("{}: publish", self.name), e))?;
        self.out.clear();
        Ok(())
    }

    fn pump(&mut self) -> Result<Got, String> {
        let mut got = Got::default();
        loop {
            let mut at = 0;
            while let Some((h, body, end)) = mqtt_packet(&self.buf[at..])? {
                let p = &self.buf[at + body..at + end];
                at += end;
                match h >> 4 {
                    // PUBLISH: topic, packet id when QoS > 0, payload.
                    3 => {
                        let qos = (h >> 1) & 3;
                        let topic = p
                            .get(..2)
                            .map(|l| usize::from(u16::from_be_bytes([l[0], l[1]])))
                            .ok_or("a PUBLISH without a topic")?;
                        let id_at = 2 + topic;
                        let payload_at = id_at + if qos > 0 { 2 } else { 0 };
                        if p.len() != payload_at + self.payload.len() {
                            return Err(format!(
                                "{}: a PUBLISH of {} bytes, not the {}-byte payload sent",
                                self.name,
                                p.len().saturating_sub(payload_at),
                                self.payload.len()
                            ));
                        }
                        if qos == 1 {
                            self.acks
                                .extend_from_slice(&[0x40, 2, p[id_at], p[id_at + 1]]);
                            if self.per_frame {
                                self.write_acks()?;
                            }
                        }
                        got.delivered += 1;
                    }
                    // PUBACK of one of ours.
                    4 => got.accepted += 1,
                    _ => {}
                }
            }
            self.buf.drain(..at);
            self.write_acks()?;
            if got.delivered + got.accepted > 0 {
                return Ok(got);
            }
            read_more(&mut self.sock, &mut self.chunk, &mut self.buf)
                .map_err(|e| format!("{}: {e}", self.name))?;
        }
    }
}

/// An IRC client registered as its own name, an operator with user mode +F.
struct Irc {
    sock: TcpStream,
    name: String,
    buf: Vec<u8>,
    chunk: Vec<u8>,
    size: usize,
    out: Vec<u8>,
    payload: Vec<u8>,
}

/// A line's command (after the optional `:prefix`) and the rest.
fn irc_command(line: &[u8]) -> (&[u8], &[u8]) {
    let line = match line.first() {
        Some(b':') => line
            .iter()
            .position(|&b| b == b' ')
            .map_or(&line[line.len()..], |i| &line[i + 1..]),
        _ => line,
    };
    match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &line[line.len()..]),
    }
}

impl Irc {
    fn connect(addr: SocketAddr, name: &str, size: usize) -> Result<Irc, String> {
        let mut m = Irc {
            sock: dial(addr)?,
            name: name.to_string(),
            buf: Vec::new(),
            chunk: vec![0; 64 * 1024],
            size,
            out: Vec::new(),
            // Printable, no spaces: nothing a server could rewrite.
            payload: (0..size).map(|i| b'a' + (i % 26) as u8).collect(),
        };
        m.send_line(&format!(
            "NICK {name}\r\nUSER {name} 0 * :chatd relay bench"
        ))?;
        m.expect("the welcome (001)", |cmd, _| cmd == b"001")?;
        m.send_line(&format!("OPER {IRC_OPER} {IRC_OPER}"))?;
        m.expect("OPER's 381", |cmd, _| cmd == b"381")?;
        m.send_line(&format!("MODE {name} +F"))?;
        m.expect("MODE +F", |cmd, rest| {
            cmd == b"MODE" && rest.ends_with(b"+F")
        })?;
        Ok(m)
    }

    fn send_line(&mut self, line: &str) -> Result<(), String> {
        self.sock
            .write_all(format!("{line}\r\n").as_bytes())
            .map_err(|e| io_err(&format!("{}: write", self.name), e))
    }

    /// Read lines until one `done` accepts; an error reply or ERROR fails it.
    fn expect(&mut self, what: &str, done: impl Fn(&[u8], &[u8]) -> bool) -> Result<(), String> {
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                let line = line
                    .strip_suffix(b"\r\n")
                    .unwrap_or(&line[..line.len() - 1]);
                let (cmd, rest) = irc_command(line);
                if done(cmd, rest) {
                    return Ok(());
                }
                // 4xx and 5xx numerics are errors, but for 422 (no MOTD), which is news.
                let numeric_error =
                    cmd.len() == 3 && matches!(cmd[0], b'4' | b'5') && cmd != b"422";
                if cmd == b"ERROR" || numeric_error {
                    return Err(format!(
                        "{}: waiting for {what}, the server said {:?}",
                        self.name,
                        String::from_utf8_lossy(line)
                    ));
                }
                if cmd == b"PING" {
                    let pong = format!("PONG {}", String::from_utf8_lossy(rest));
                    self.send_line(&pong)?;
                }
            }
            read_more(&mut self.sock, &mut self.chunk, &mut self.buf)
                .map_err(|e| format!("{}: waiting for {what}: {e}", self.name))?;
        }
        Err(format!(
            "{}: no {what} within {} s",
            self.name,
            DEADLINE.as_secs()
        ))
    }
}

impl PeerClient for Irc {
    fn publish(&mut self, to: &str) -> Result<(), String> {
        self.out.extend_from_slice(b"PRIVMSG ");
        self.out.extend_from_slice(to.as_bytes());
        self.out.extend_from_slice(b" :");
        self.out.extend_from_slice(&self.payload);
        self.out.extend_from_slice(b"\r\n");
        Ok(())
    }

    fn flush(&mut self) -> Result<(), String> {
        if self.out.is_empty() {
            return Ok(());
        }
        self.sock
            .write_all(&self.out)
            .map_err(|e| io_err(&format!("{}: PRIVMSG", self.name), e))?;
        self.out.clear();
        Ok(())
    }

    fn pump(&mut self) -> Result<Got, String> {
        let mut got = Got::default();
        loop {
            let mut at = 0;
            while let Some(nl) = self.buf[at..].iter().position(|&b| b == b'\n') {
                let line = &self.buf[at..at + nl];
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                at += nl + 1;
                let (cmd, rest) = irc_command(line);
                match cmd {
                    b"PRIVMSG" => {
                        let text = rest
                            .windows(2)
                            .position(|w| w == b" :")
                            .map_or(&rest[rest.len()..], |i| &rest[i + 2..]);
                        if text.len() != self.size {
                            return Err(format!(
                                "{}: a PRIVMSG of {} bytes, not the {} sent",
                                self.name,
                                text.len(),
                                self.size
                            ));
                        }
                        got.delivered += 1;
                    }
                    b"PING" => {
                        let pong = format!("PONG {}\r\n", String::from_utf8_lossy(rest));
                        self.sock
                            .write_all(pong.as_bytes())
                            .map_err(|e| io_err(&format!("{}: PONG", self.name), e))?;
                    }
                    b"ERROR" => {
                        return Err(format!(
                            "{}: the server said {:?}",
                            self.name,
                            String::from_utf8_lossy(line)
                        ))
                    }
                    _ => {}
                }
            }
            self.buf.drain(..at);
            if got.delivered > 0 {
                return Ok(got);
            }
            quick_ack(&self.sock);
            read_more(&mut self.sock, &mut self.chunk, &mut self.buf)
                .map_err(|e| format!("{}: {e}", self.name))?;
        }
    }
}

/// Deliveries a receiver has seen, for a sender whose protocol acknowledges nothing: its window.
#[derive(Default)]
struct Credit {
    /// Deliveries so far, and whether the receiver has stopped (done or failed).
    state: Mutex<(usize, bool)>,
    more: Condvar,
}

impl Credit {
    fn add(&self, n: usize) {
        if let Ok(mut s) = self.state.lock() {
            s.0 += n;
        }
        self.more.notify_one();
    }

    fn close(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.1 = true;
        }
        self.more.notify_one();
    }

    /// Wait until more than `seen` deliveries are counted; their count.
    fn wait_above(&self, seen: usize) -> Result<usize, String> {
        let deadline = Instant::now() + DEADLINE;
        let mut s = self
            .state
            .lock()
            .map_err(|_| "the credit lock is poisoned")?;
        while s.0 <= seen {
            if s.1 {
                return Err("the receiver stopped".into());
            }
            let left = deadline
                .checked_duration_since(Instant::now())
                .ok_or_else(|| format!("no delivery within {} s", DEADLINE.as_secs()))?;
            s = self
                .more
                .wait_timeout(s, left)
                .map_err(|_| "the credit lock is poisoned")?
                .0;
        }
        Ok(s.0)
    }
}

/// Closes the credit when the receiver's thread ends, however it ends.
struct CloseOnDrop(Arc<Credit>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Connect `names` one after the other (no handshake here costs more than a round trip).
fn connect_all<C>(
    names: &[String],
    connect: impl Fn(&str) -> Result<C, String>,
) -> Result<Vec<C>, String> {
    names.iter().map(|n| connect(n)).collect()
}

/// Messages per second and the peer's CPU µs per message, P pairs, M messages per sender, on a
/// running peer; `acked`: the sender's own connection acknowledges (QoS 1), else its window
/// counts its receiver's deliveries.
fn peer_throughput<C: PeerClient>(
    o: &Opts,
    peer: &PeerProc,
    pairs: usize,
    messages: usize,
    acked: bool,
    connect: impl Fn(&str) -> Result<C, String>,
) -> Result<(f64, Option<f64>), String> {
    let senders: Vec<String> = (0..pairs).map(|i| format!("s{i:03}")).collect();
    let receivers: Vec<String> = (0..pairs).map(|i| format!("r{i:03}")).collect();
    let rx = connect_all(&receivers, &connect)?;
    let tx = connect_all(&senders, &connect)?;
    let credits: Vec<Arc<Credit>> = (0..pairs).map(|_| Arc::default()).collect();
    let start = Arc::new(Barrier::new(2 * pairs + 1));
    let (window, per_frame) = (o.window, o.per_frame);
    let (took, cpu0) = thread::scope(|s| -> Result<(Duration, Option<Duration>), String> {
        let mut hs = Vec::new();
        for (mut m, credit) in rx.into_iter().zip(credits.iter().cloned()) {
            let start = Arc::clone(&start);
            hs.push(s.spawn(move || -> Result<Instant, String> {
                let credit = CloseOnDrop(credit);
                start.wait();
                let mut got = 0;
                while got < messages {
                    let n = m.pump()?.delivered;
                    got += n;
                    credit.0.add(n);
                }
                Ok(Instant::now())
            }));
        }
        for ((mut m, to), credit) in tx.into_iter().zip(&receivers).zip(credits.iter().cloned()) {
            let start = Arc::clone(&start);
            hs.push(s.spawn(move || -> Result<Instant, String> {
                start.wait();
                let (mut sent, mut credited) = (0, 0);
                while credited < messages {
                    while sent < messages && sent - credited < window {
                        m.publish(to)?;
                        if per_frame {
                            m.flush()?;
                        }
                        sent += 1;
                    }
                    m.flush()?;
                    credited = if acked {
                        credited + m.pump()?.accepted
                    } else {
                        credit.wait_above(credited)?
                    };
                }
                Ok(Instant::now())
            }));
        }
        start.wait();
        let t0 = Instant::now();
        let cpu0 = common::cpu_time(peer.child.id());
        let mut last = t0;
        let mut first_err = None;
        for h in hs {
            match h.join() {
                Ok(Ok(t)) => last = last.max(t),
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert("a client thread panicked".into());
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok((last - t0, cpu0)),
        }
    })?;
    let n = (pairs * messages) as f64;
    let per = cpu0
        .zip(common::cpu_time(peer.child.id()))
        .map(|(a, z)| z.saturating_sub(a).as_secs_f64() * 1e6 / n);
    Ok((n / took.as_secs_f64(), per))
}

/// Round trips a → b → a through a running peer, one at a time: their durations, sorted.
fn peer_ping_pong<C: PeerClient>(
    o: &Opts,
    connect: impl Fn(&str) -> Result<C, String>,
) -> Result<Vec<Duration>, String> {
    let mut a = connect("ping")?;
    let mut b = connect("pong")?;
    let pings = o.pings;
    let mut rtts = thread::scope(|s| -> Result<Vec<Duration>, String> {
        let echo = s.spawn(move || -> Result<(), String> {
            let mut answered = 0;
            while answered < pings {
                for _ in 0..b.pump()?.delivered {
                    b.publish("ping")?;
                    b.flush()?;
                    answered += 1;
                }
            }
            Ok(())
        });
        let mut rtts = Vec::with_capacity(pings);
        for _ in 0..pings {
            let t = Instant::now();
            a.publish("pong")?;
            a.flush()?;
            while a.pump()?.delivered == 0 {}
            rtts.push(t.elapsed());
        }
        echo.join()
            .map_err(|_| "the echo thread panicked".to_string())??;
        Ok(rtts)
    })?;
    rtts.sort();
    Ok(rtts)
}

// ---------------------------------------------------------------------------------------------
// Every server, one interface.

/// One throughput run of `server`: messages per second, its CPU µs per message, how it was
/// spoken to.
fn throughput(
    o: &Opts,
    server: &Server,
    keys: &[Identity],
    pairs: usize,
    messages: usize,
) -> Result<(f64, Option<f64>, String), String> {
    let (size, per_frame) = (o.size, o.per_frame);
    match server {
        Server::Chatd(chatd) => chatd_throughput(o, chatd, keys, pairs, messages)
            .map(|(rate, cpu, mode)| (rate, cpu, format!("{mode:?}"))),
        Server::Mosquitto { qos, tls, .. } => {
            let peer = PeerProc::start(server, o)?;
            let (qos, addr) = (*qos, peer.addr);
            let cfg = tls.then(common::client_config);
            peer_throughput(o, &peer, pairs, messages, qos == 1, |n| {
                Mqtt::connect(addr, n, qos, size, cfg.as_ref(), per_frame)
            })
            .map(|(rate, cpu)| (rate, cpu, transport(*tls)))
            .map_err(|e| peer.explain(e))
        }
        Server::Ngircd(_) => {
            let peer = PeerProc::start(server, o)?;
            let addr = peer.addr;
            peer_throughput(o, &peer, pairs, messages, false, |n| {
                Irc::connect(addr, n, size)
            })
            .map(|(rate, cpu)| (rate, cpu, "plain TCP".into()))
            .map_err(|e| peer.explain(e))
        }
    }
}

/// One ping-pong run of `server`: the round trips, sorted, and how it was spoken to.
fn ping_pong(
    o: &Opts,
    server: &Server,
    keys: &[Identity],
) -> Result<(Vec<Duration>, String), String> {
    let (size, per_frame) = (o.size, o.per_frame);
    match server {
        Server::Chatd(chatd) => {
            chatd_ping_pong(o, chatd, keys).map(|(rtts, mode)| (rtts, format!("{mode:?}")))
        }
        Server::Mosquitto { qos, tls, .. } => {
            let peer = PeerProc::start(server, o)?;
            let (qos, addr) = (*qos, peer.addr);
            let cfg = tls.then(common::client_config);
            peer_ping_pong(o, |n| {
                Mqtt::connect(addr, n, qos, size, cfg.as_ref(), per_frame)
            })
            .map(|rtts| (rtts, transport(*tls)))
            .map_err(|e| peer.explain(e))
        }
        Server::Ngircd(_) => {
            let peer = PeerProc::start(server, o)?;
            let addr = peer.addr;
            peer_ping_pong(o, |n| Irc::connect(addr, n, size))
                .map(|rtts| (rtts, "plain TCP".into()))
                .map_err(|e| peer.explain(e))
        }
    }
}

/// How a peer was spoken to, for a run's line.
fn transport(tls: bool) -> String {
    if tls { "TLS 1.3" } else { "plain TCP" }.into()
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    let mut o = match parse_opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if !o.no_pin {
        // Before any thread starts: each inherits the clients' CPUs.
        match Placement::apply() {
            Ok(pin) => o.pin = pin,
            // (With more CPUs than a cpu_set_t holds, sched_getaffinity refuses the set.)
            Err(e) => eprintln!("relay bench: cannot pin ({e}); servers and clients run anywhere"),
        }
    }
    match run(&o) {
        Ok(0) => {}
        Ok(failed) => {
            eprintln!("relay bench: {failed} run(s) failed (their lines above say why)");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("relay bench: {e}");
            std::process::exit(1);
        }
    }
}

/// Each build's median of one figure, its ratio to the first build's (the first chatd build:
/// parse_opts puts the chatd builds first), and the range of that ratio run by run (run k of
/// the first build against run k of this one, where both succeeded). The range is the noise:
/// the same chatd given twice shows what a ratio can do by chance on this machine. A build
/// without a successful run says so. `per_build[b][k]` is build b's figure in run k.
fn summary(o: &Opts, what: &str, unit: &str, decimals: usize, per_build: &[Vec<Option<f64>>]) {
    let ok = |runs: &Vec<Option<f64>>| runs.iter().flatten().copied().collect::<Vec<f64>>();
    let medians: Vec<Option<f64>> = per_build
        .iter()
        .map(|runs| Some(ok(runs)).filter(|v| !v.is_empty()).map(median))
        .collect();
    let first = medians[0].filter(|m| *m > 0.0);
    for (i, ((b, m), runs)) in o.builds.iter().zip(&medians).zip(per_build).enumerate() {
        let Some(m) = m else {
            println!("{what}: no successful run  [{}]", b.label());
            continue;
        };
        let paired: Vec<f64> = per_build[0]
            .iter()
            .zip(runs)
            .filter_map(|(f, t)| match (f, t) {
                (Some(f), Some(t)) if *t > 0.0 => Some(f / t),
                _ => None,
            })
            .collect();
        let range = match (
            paired.iter().copied().reduce(f64::min),
            paired.iter().copied().reduce(f64::max),
        ) {
            (Some(lo), Some(hi)) if i > 0 => {
                format!(", run by run {lo:.2} to {hi:.2}")
            }
            _ => String::new(),
        };
        let ratio = match first {
            Some(f) if o.builds.len() > 1 && *m > 0.0 => format!(
                " ({:.0}% of the first chatd build's; first chatd / this = {:.2}{range})",
                100.0 * m / f,
                f / m
            ),
            _ => String::new(),
        };
        println!(
            "{what}: median {m:.decimals$} {unit} over {} runs{ratio}  [{}]",
            ok(runs).len(),
            b.label()
        );
    }
}

/// Measure everything; the number of runs that failed (each said why when it did).
fn run(o: &Opts) -> Result<usize, String> {
    let keys = keys();
    println!(
        "relay bench: {} build(s), {} runs each, alternating; window {}, {} B envelopes",
        o.builds.len(),
        o.runs,
        o.window,
        o.size
    );
    match o.pin {
        Some(p) => println!(
            "relay bench: each server on CPU {}, the clients on the other CPUs (--no-pin: anywhere)",
            p.server_cpu
        ),
        None => println!("relay bench: servers and clients where the scheduler puts them"),
    }
    let mut failed = 0;
    let want = |what: &str| o.only.as_deref().map_or(true, |w| w == what);
    for (label, pairs, default_m) in [("1to1", 1, 20_000), ("50to50", 50, 1_000)] {
        if !want(label) {
            continue;
        }
        let m = o.messages.unwrap_or(default_m);
        let mut rates = vec![Vec::new(); o.builds.len()];
        let mut cpus = vec![Vec::new(); o.builds.len()];
        for run in 1..=o.runs {
            for (i, b) in o.builds.iter().enumerate() {
                let (rate, cpu, how) = match throughput(o, b, &keys, pairs, m) {
                    Ok(r) => r,
                    Err(e) => {
                        println!(
                            "  throughput {pairs}->{pairs} run {run} ({}): FAILED: {e}",
                            b.label()
                        );
                        failed += 1;
                        rates[i].push(None);
                        cpus[i].push(None);
                        continue;
                    }
                };
                let cpu_s = match cpu {
                    Some(c) if c > 0.0 => format!(", server CPU {c:.2} µs per message"),
                    // Only where the CPU clock cannot be read and /proc's 10 ms ticks stand in.
                    Some(_) => ", server CPU under one clock tick (give more --messages)".into(),
                    None => String::new(),
                };
                println!(
                    "  throughput {pairs}->{pairs} run {run} ({how}, {}): {rate:.0} msg/s ({} messages){cpu_s}",
                    b.label(),
                    pairs * m
                );
                rates[i].push(Some(rate));
                cpus[i].push(cpu);
            }
        }
        summary(
            o,
            &format!("throughput {pairs}->{pairs}"),
            "msg/s",
            0,
            &rates,
        );
        summary(
            o,
            &format!("server CPU per message, {pairs}->{pairs}"),
            "µs",
            2,
            &cpus,
        );
    }
    if want("pingpong") {
        let mut p50s = vec![Vec::new(); o.builds.len()];
        let mut p99s = vec![Vec::new(); o.builds.len()];
        for run in 1..=o.runs {
            for (i, b) in o.builds.iter().enumerate() {
                let (rtts, how) = match ping_pong(o, b, &keys) {
                    Ok(r) => r,
                    Err(e) => {
                        println!("  ping-pong run {run} ({}): FAILED: {e}", b.label());
                        failed += 1;
                        p50s[i].push(None);
                        p99s[i].push(None);
                        continue;
                    }
                };
                let (p50, p99) = (pct(&rtts, 0.5), pct(&rtts, 0.99));
                let us = |d: Duration| d.as_secs_f64() * 1e6;
                println!(
                    "  ping-pong run {run} ({how}, {}): p50 {:.0} µs, p99 {:.0} µs ({} round trips)",
                    b.label(),
                    us(p50),
                    us(p99),
                    rtts.len()
                );
                p50s[i].push(Some(us(p50)));
                p99s[i].push(Some(us(p99)));
            }
        }
        summary(o, "ping-pong round trip p50", "µs", 0, &p50s);
        summary(o, "ping-pong round trip p99", "µs", 0, &p99s);
    }
    Ok(failed)
}
