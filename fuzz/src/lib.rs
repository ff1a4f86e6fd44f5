//! The checks behind the `cargo fuzz` targets, one function per target, shared with
//! `tests/decoders.rs` (which includes this file with `#[path]` and replays `fuzz/corpus/` and
//! `fuzz/artifacts/` through it), so a crash that libFuzzer finds becomes a regression test by
//! dropping the input into the corpus.
//!
//! Owns: what "a decoder of outside bytes behaves" means for the frame codec, the four message
//! types that come off a socket (`ToRelay`, `FromRelay`, `CtlRequest`, `CtlResponse`, plus the
//! `Routed` items the relay stores), and the relay and member cores fed hostile frames. Every
//! check panics on a violation, which is how libFuzzer and the test runner both see a failure.
//! Must never: need anything but `chatd`, `rand` and `std` (the test binary has nothing else),
//! or read a file or open a socket.
//!
//! Allocation limits are not checked here: the test binary measures them with a counting global
//! allocator, and `cargo fuzz` runs with `-malloc_limit_mb=2` (see `fuzz/README.md`).

use std::fmt::Debug;
use std::io::{self, Read};
use std::sync::OnceLock;

use serde::{de::DeserializeOwned, Serialize};

use chatd::clock::Now;
use chatd::crypto::{login_transcript, Identity};
use chatd::host::{self, Cores, Link};
use chatd::member::{self, Member};
use chatd::proto::control::{CtlRequest, CtlResponse};
use chatd::proto::frame::{self, Decoded, FrameError, HEADER, MAX_FRAME};
use chatd::proto::relay::{FromRelay, Routed, ToRelay};
use chatd::proto::{fast, from_payload, from_payload_whole, to_payload};
use chatd::relay::{self, ConnId, Limits, Relay};
use chatd::store::Store;

/// The clock the cores see; any value works, a fixed one keeps runs reproducible.
const NOW: u64 = 1_700_000_000_000;

/// At most this many frames of one input are fed to a core (keeps each run short).
const MAX_FRAMES_PER_INPUT: usize = 64;

/// The announced length in the first four bytes of `buf` (which must hold them).
fn announced(buf: &[u8]) -> usize {
    u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize
}

/// `frame::decode(buf, max)` agrees with the spec in `src/proto/frame.rs`: need-more below a
/// header or a whole frame; a frame is `4 + len` bytes with `len <= max`; an announced length
/// above `max` is refused as soon as the header is there, whatever follows.
pub fn check_decode(buf: &[u8], max: usize) {
    match frame::decode(buf, max) {
        Ok(Decoded::NeedMore) => {
            if buf.len() >= HEADER {
                let len = announced(buf);
                assert!(len <= max, "NeedMore for an over-cap length {len} > {max}");
                assert!(
                    buf.len() - HEADER < len,
                    "NeedMore with a whole frame of {len} bytes in {} bytes",
                    buf.len()
                );
            }
        }
        Ok(Decoded::Frame { payload, consumed }) => {
            assert!(buf.len() >= HEADER, "a frame from {} bytes", buf.len());
            assert_eq!(
                payload.len(),
                announced(buf),
                "payload is not the announced length"
            );
            assert_eq!(consumed, HEADER + payload.len(), "consumed != 4 + payload");
            assert!(consumed <= buf.len(), "consumed {consumed} > {}", buf.len());
            assert!(
                payload.len() <= max,
                "payload {} > max {max}",
                payload.len()
            );
            assert_eq!(
                payload,
                &buf[HEADER..consumed],
                "payload is not the bytes after the header"
            );
        }
        Err(FrameError::TooLarge { len, max: m }) => {
            assert!(buf.len() >= HEADER, "TooLarge from {} bytes", buf.len());
            assert_eq!(len, announced(buf), "TooLarge reports another length");
            assert_eq!(m, max, "TooLarge reports another cap");
            assert!(len > max, "TooLarge for {len} <= {max}");
        }
        Err(e) => panic!("the pure decoder returned {e:?}"),
    }
}

/// Split a byte stream into frame payloads the way the daemon does (`frame::decode` with the
/// real cap, one frame after another). Bytes after the last whole frame (a partial frame, or
/// one announcing too much) are returned as one more payload, so garbage still reaches the
/// message decoders.
pub fn payloads(mut stream: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while out.len() < MAX_FRAMES_PER_INPUT {
        check_decode(stream, MAX_FRAME);
        match frame::decode(stream, MAX_FRAME) {
            Ok(Decoded::Frame { payload, consumed }) => {
                out.push(payload);
                stream = &stream[consumed..];
            }
            _ => {
                if !stream.is_empty() {
                    out.push(stream);
                }
                break;
            }
        }
    }
    out
}

/// One step of a [`Scripted`] reader.
#[derive(Clone, Copy, Debug)]
pub enum Step {
    /// Return at most this many bytes (at least one if any are left).
    Give(usize),
    /// Fail with `ErrorKind::Interrupted` (`read_from` must retry).
    Interrupt,
    /// Fail with `ErrorKind::Other` (`read_from` must report `FrameError::Io`).
    Fail,
}

/// A reader that hands out `data` in the chunks and failures a script says, then the rest in
/// one go, then end of stream.
pub struct Scripted<'a> {
    data: &'a [u8],
    pos: usize,
    steps: std::slice::Iter<'a, Step>,
}

impl<'a> Scripted<'a> {
    /// A reader over `data` following `steps`.
    pub fn new(data: &'a [u8], steps: &'a [Step]) -> Self {
        Scripted {
            data,
            pos: 0,
            steps: steps.iter(),
        }
    }

    /// How many bytes have been read.
    pub fn position(&self) -> usize {
        self.pos
    }
}

impl Read for Scripted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let limit = match self.steps.next() {
            Some(Step::Interrupt) => return Err(io::ErrorKind::Interrupted.into()),
            Some(Step::Fail) => return Err(io::Error::other("scripted failure")),
            Some(Step::Give(n)) => (*n).max(1),
            None => usize::MAX,
        };
        let n = buf.len().min(limit).min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// What `read_from(data, max)` must return on a reader that never fails.
#[derive(Debug, PartialEq, Eq)]
pub enum Expected<'a> {
    /// Clean end of stream before any byte.
    End,
    /// One frame.
    Frame(&'a [u8]),
    /// The announced length is over the cap.
    TooLarge(usize),
    /// The stream ends inside the header or the payload.
    Truncated,
}

/// The model of `frame::read_from`.
pub fn expected_read(data: &[u8], max: usize) -> Expected<'_> {
    if data.is_empty() {
        return Expected::End;
    }
    if data.len() < HEADER {
        return Expected::Truncated;
    }
    let len = announced(data);
    if len > max {
        Expected::TooLarge(len)
    } else if data.len() - HEADER < len {
        Expected::Truncated
    } else {
        Expected::Frame(&data[HEADER..HEADER + len])
    }
}

/// `frame::read_from` over a scripted reader matches the model (or reports the scripted
/// failure), never reads past the frame, and never reads the payload of an over-cap frame.
pub fn check_read_from(data: &[u8], steps: &[Step], max: usize) {
    let mut r = Scripted::new(data, steps);
    let got = frame::read_from(&mut r, max);
    let want = expected_read(data, max);
    match got {
        Ok(None) => assert_eq!(want, Expected::End),
        Ok(Some(p)) => {
            assert_eq!(want, Expected::Frame(&p));
            assert_eq!(r.position(), HEADER + p.len(), "read past the frame");
        }
        Err(FrameError::TooLarge { len, max: m }) => {
            assert_eq!(want, Expected::TooLarge(len));
            assert_eq!(m, max);
            assert_eq!(
                r.position(),
                HEADER,
                "read the payload of an over-cap frame"
            );
        }
        Err(FrameError::Truncated) => assert_eq!(want, Expected::Truncated),
        Err(FrameError::Io(e)) => {
            assert!(
                steps.iter().any(|s| matches!(s, Step::Fail)),
                "an Io error ({e}) from a reader that never fails"
            );
            assert_eq!(e.kind(), io::ErrorKind::Other, "{e}");
        }
    }
}

/// The `frame` target: the pure decoder with the real cap and with a cap taken from the input,
/// a stream split into frames, and the blocking reader over a script taken from the input.
pub fn frame(data: &[u8]) {
    check_decode(data, MAX_FRAME);
    if data.len() >= 4 {
        let max = announced(data) & 0x1f_ffff; // up to 2 MiB, around the real cap
        check_decode(&data[4..], max);
    }
    payloads(data);
    // The first byte says how many of the next bytes are a read script.
    let (steps, stream) = match data.split_first() {
        Some((&n, rest)) => {
            let n = (n as usize % 8).min(rest.len());
            let steps: Vec<Step> = rest[..n]
                .iter()
                .map(|b| match b % 16 {
                    0 => Step::Interrupt,
                    1 => Step::Fail,
                    k => Step::Give(k as usize),
                })
                .collect();
            (steps, &rest[n..])
        }
        None => (Vec::new(), data),
    };
    check_read_from(stream, &steps, MAX_FRAME);
    check_read_from(data, &[], MAX_FRAME);
}

/// Decode `data` as a `T`; whatever decodes must re-encode to something that decodes to the
/// same message (the wire has one meaning per message).
pub fn message<T: Serialize + DeserializeOwned + PartialEq + Debug>(data: &[u8]) -> Option<T> {
    let msg = from_payload::<T>(data).ok()?;
    // An input packed tighter than `to_vec_named` writes (structs as arrays) can re-encode
    // above the cap; `to_payload` refuses that, which is right.
    if let Ok(again) = to_payload(&msg) {
        match from_payload::<T>(&again) {
            Ok(back) => assert_eq!(back, msg, "re-encoding changed the message"),
            Err(e) => panic!("{msg:?} re-encodes to bytes that do not decode: {e}"),
        }
    }
    Some(msg)
}

/// The `to_relay` target: what a member (or anyone on the relay port) sends, and the routed
/// items inside it. The relay decodes the message path's frames without serde
/// (`proto::fast`): wherever that decoder gives a value, serde must give the same one.
pub fn to_relay(data: &[u8]) {
    message::<ToRelay>(data);
    message::<Routed>(data);
    if let Some(fast) = fast::to_relay(data) {
        let serde = from_payload_whole::<ToRelay>(data);
        assert!(
            matches!(&serde, Ok(m) if *m == fast),
            "fast decoder gave {fast:?}, serde {serde:?}"
        );
    }
    if let Some(fast) = fast::routed(data) {
        let serde = from_payload_whole::<Routed>(data);
        assert!(
            matches!(&serde, Ok(r) if *r == fast),
            "fast decoder gave {fast:?}, serde {serde:?}"
        );
    }
}

/// The `from_relay` target: what the relay sends a member.
pub fn from_relay(data: &[u8]) {
    message::<FromRelay>(data);
}

/// The `control_request` target: what a local client sends `chatd`.
pub fn control_request(data: &[u8]) {
    message::<CtlRequest>(data);
}

/// The `control_response` target: what `chatd` sends `chatctl`.
pub fn control_response(data: &[u8]) {
    message::<CtlResponse>(data);
}

struct Keys {
    alice: Identity,
    alice_pem: String,
    bob: Identity,
}

/// Two 2048-bit identities, generated once per process (key generation is slow).
fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let mut rng = rand::thread_rng();
        let alice = Identity::generate(&mut rng, 2048).expect("generate alice");
        let bob = Identity::generate(&mut rng, 2048).expect("generate bob");
        let alice_pem = alice.to_pem().expect("alice to PEM").to_string();
        Keys {
            alice,
            alice_pem,
            bob,
        }
    })
}

/// Bob's public key, SubjectPublicKeyInfo DER (a real key for directory entries).
pub fn bob_der() -> &'static [u8] {
    keys().bob.public().der()
}

fn drain_relay(relay: &mut Relay) -> Vec<relay::Out> {
    std::iter::from_fn(|| relay.poll()).collect()
}

/// Connect `conn` and log it in as `user` with `id`, as a real member would.
fn relay_login(
    relay: &mut Relay,
    store: &mut Store,
    conn: ConnId,
    user: &str,
    id: &Identity,
) -> Vec<relay::Out> {
    relay.connect(conn, NOW);
    let nonce = drain_relay(relay)
        .into_iter()
        .find_map(|o| match o {
            relay::Out::Send(c, FromRelay::Challenge { nonce, .. }) if c == conn => Some(nonce),
            _ => None,
        })
        .expect("a new connection gets a challenge");
    let signature = id
        .sign(
            &mut rand::thread_rng(),
            &login_transcript(&nonce, user, &[]),
        )
        .expect("sign login");
    let login = ToRelay::Login {
        user: user.into(),
        key: id.public().der().to_vec(),
        signature,
    };
    relay.receive(conn, &to_payload(&login).expect("encode login"), NOW, store);
    let out = drain_relay(relay);
    assert!(
        out.iter()
            .any(|o| matches!(o, relay::Out::Send(c, FromRelay::Welcome { .. }) if *c == conn)),
        "a valid login is welcomed: {out:?}"
    );
    out
}

/// The `relay_core` target. Byte 0 says whether the attacking connection (1) is still in the
/// handshake (even) or logged in as alice (odd); the rest is a stream of frames it sends. Bob,
/// logged in on connection 2, is the witness that the others keep being served.
///
/// Checked: no panic; a frame that does not decode, or any frame before login, gets an `Error`
/// frame and a `Close`; a closing connection gets nothing more; bob still gets `Pong`.
pub fn relay_core(data: &[u8]) {
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    let mut store = Store::open_in_memory().expect("in-memory store");
    let mut relay = Relay::load(&store, Limits::default()).expect("load relay");
    relay_login(&mut relay, &mut store, ConnId(2), "bob", &keys().bob);
    let logged_in = mode % 2 == 1;
    if logged_in {
        relay_login(&mut relay, &mut store, ConnId(1), "alice", &keys().alice);
    } else {
        relay.connect(ConnId(1), NOW);
        drain_relay(&mut relay);
    }
    let mut closed = false;
    for (i, payload) in payloads(stream).into_iter().enumerate() {
        // The relay decodes a frame whole: bytes after the message make it malformed.
        let decoded = chatd::proto::from_payload_whole::<ToRelay>(payload).ok();
        relay.receive(ConnId(1), payload, NOW + i as u64, &mut store);
        let out = drain_relay(&mut relay);
        let to_1: Vec<&relay::Out> = out
            .iter()
            .filter(|o| {
                matches!(
                    o,
                    relay::Out::Send(ConnId(1), _) | relay::Out::Close(ConnId(1))
                )
            })
            .collect();
        if closed {
            assert!(to_1.is_empty(), "a closing connection got {to_1:?}");
            continue;
        }
        let must_fail = !logged_in
            || !matches!(
                decoded,
                Some(
                    ToRelay::Send(_)
                        | ToRelay::Ack(_)
                        | ToRelay::Ping
                        | ToRelay::Lookup(_)
                        | ToRelay::List { .. }
                )
            );
        if must_fail {
            match to_1.as_slice() {
                [relay::Out::Send(ConnId(1), FromRelay::Error { code, .. }), relay::Out::Close(ConnId(1))] =>
                {
                    assert!(
                        code == "protocol" || code == "bad_login",
                        "unexpected error code {code}"
                    );
                }
                other => panic!("bad frame {decoded:?} got {other:?}, not Error + Close"),
            }
            closed = true;
        } else {
            assert!(
                !to_1.iter().any(|o| matches!(
                    o,
                    relay::Out::Close(_) | relay::Out::Send(_, FromRelay::Error { .. })
                )),
                "a valid {decoded:?} closed the connection: {to_1:?}"
            );
        }
    }
    relay.receive(
        ConnId(2),
        &to_payload(&ToRelay::Ping).expect("encode ping"),
        NOW,
        &mut store,
    );
    let out = drain_relay(&mut relay);
    assert!(
        out.contains(&relay::Out::Send(ConnId(2), FromRelay::Pong)),
        "bob is no longer served after the attack: {out:?}"
    );
}

fn drain_member(m: &mut Member) -> Vec<member::Out> {
    std::iter::from_fn(|| m.poll()).collect()
}

/// Alice on a host link to a relay, for [`host::pump`].
struct Host<'a> {
    relay: &'a mut Relay,
    rstore: &'a mut Store,
    link: &'a mut Link,
    member: &'a mut Member,
    store: &'a mut Store,
}

impl Cores for Host<'_> {
    fn relay(&mut self) -> (&mut Relay, &mut Store) {
        (self.relay, self.rstore)
    }
    fn members(&self) -> usize {
        1
    }
    fn member(&mut self, _: usize) -> (&mut Link, &mut Member, &mut Store) {
        (self.link, self.member, self.store)
    }
}

/// The `member_core` target. Byte 0 picks the link state the member is in (0: down,
/// 1: expecting the challenge, 2: expecting the welcome, 3: logged in with bob pinned), reached
/// over a host link to a real relay; the rest is a stream of frames "from the relay".
///
/// Checked: no panic; a frame that does not decode, or an `Error`, makes the member close the
/// link; no frame ever makes it log in again except a challenge while it expects one.
pub fn member_core(data: &[u8]) {
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    let mut rstore = Store::open_in_memory().expect("in-memory relay store");
    let mut relay = Relay::load(&rstore, Limits::default()).expect("load relay");
    let mut store = Store::open_in_memory().expect("in-memory store");
    let id = Identity::from_pem(&keys().alice_pem).expect("alice from PEM");
    let mut m = Member::load("alice".into(), id, &store).expect("load member");
    let mut link = Link::new(ConnId(1));
    let state = mode % 4;
    if state == 3 {
        // Bob is registered, so alice's welcome introduces him.
        relay_login(&mut relay, &mut rstore, ConnId(2), "bob", &keys().bob);
    }
    if state >= 1 {
        link.attach(&mut relay, &mut m, Now::at(NOW));
    }
    match state {
        1 => {
            drain_relay(&mut relay);
        }
        2 => {
            // Stop between the challenge and the welcome: the relay's challenge reaches the
            // member, its login does not reach the relay.
            for out in drain_relay(&mut relay) {
                if let relay::Out::Send(ConnId(1), msg) = out {
                    m.handle(msg, Now::at(NOW), &mut store);
                }
            }
            drain_member(&mut m);
        }
        3 => {
            let mut host = Host {
                relay: &mut relay,
                rstore: &mut rstore,
                link: &mut link,
                member: &mut m,
                store: &mut store,
            };
            host::pump(&mut host, Now::at(NOW));
            assert!(m.connected(), "the member logs in on a welcome");
            assert!(m.pinned("bob").is_some(), "the welcome pins bob");
            drain_relay(&mut relay);
        }
        _ => {}
    }
    // Like the daemon: a challenge is answered once, and `Out::Close` ends the link.
    let mut expects_challenge = state == 1;
    for (i, payload) in payloads(stream).into_iter().enumerate() {
        let decoded = from_payload::<FromRelay>(payload).ok();
        m.receive(payload, Now::at(NOW + i as u64), &mut store);
        let out = drain_member(&mut m);
        if matches!(decoded, None | Some(FromRelay::Error { .. })) {
            assert!(
                out.iter().any(|o| matches!(o, member::Out::Close)),
                "{decoded:?} did not close the link: {out:?}"
            );
        }
        for o in &out {
            if let member::Out::Frame(ToRelay::Login { .. }) = o {
                assert!(
                    expects_challenge,
                    "{decoded:?} made the member log in again"
                );
                expects_challenge = false;
            }
        }
        if out.iter().any(|o| matches!(o, member::Out::Close)) {
            link.close(&mut relay, &mut m, Now::at(NOW + i as u64));
            break;
        }
    }
}
