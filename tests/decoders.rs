//! Decoders never panic (issue 3 point 8; STYLE principle 8: "a fuzz or property test for every
//! decoder of outside bytes").
//!
//! Every decoder that reads bytes from outside the process is driven here with arbitrary input:
//! the frame codec (`frame::decode` with any cap, `frame::read_from` over readers that return short
//! reads and errors), `from_payload` for each message type that comes off a socket (`ToRelay`,
//! `FromRelay`, `Routed`, `CtlRequest`, `CtlResponse`), `PublicKey::from_der` and
//! `Fingerprint::parse`, and the two cores that decode frames (`Relay::receive`,
//! `Member::receive`). Inputs are random bytes, random valid messages, and valid encodings
//! mutated (bits flipped, bytes inserted and deleted, MessagePack headers announcing up to 4 GiB,
//! deep nesting, pieces of other messages spliced in) so the search reaches deep paths.
//!
//! "Never allocates beyond the cap": this binary installs a counting global allocator that
//! records, for the current thread only and only while a decode is being measured, the largest
//! single allocation request; it must stay below `2 * MAX_FRAME`.
//!
//! The checks shared with the `cargo fuzz` targets live in `fuzz/src/lib.rs` (included below as
//! `harness`); `fuzz_corpus_replays_clean` runs every file of `fuzz/corpus/` and
//! `fuzz/artifacts/` through them, so a crash found by fuzzing becomes a test by saving the input
//! there. `CHATD_WRITE_FUZZ_CORPUS=1` (re)writes the seed corpus from the samples in this file.
//!
//! Findings are kept as `#[ignore = "finding: ..."]` tests until `src/` bounds them: `Vec` fields
//! decode into elements much larger than their encoding, so one frame of minimal elements makes a
//! single allocation of 16 to 32 MiB (the `*_amplification_stays_under_cap` tests).
//!
//! Case counts are modest so the file runs in seconds in a debug build; raise them with
//! `PROPTEST_CASES=10000 cargo test --test decoders`.

#[path = "../fuzz/src/lib.rs"]
mod harness;

use std::alloc::{GlobalAlloc, Layout, System};
use std::any::type_name;
use std::cell::Cell;
use std::path::{Path, PathBuf};

use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use serde::{de::DeserializeOwned, Serialize};

use chatd::clock::Now;
use chatd::crypto::{Fingerprint, Identity, PublicKey};
use chatd::member::{self, Member};
use chatd::proto::control::{
    CtlRequest, CtlResponse, Dir, ErrorKind, MsgState, PeerView, Record, RecordBody, RecordKind,
    Sent, StatusView, Wait,
};
use chatd::proto::frame::{self, Decoded, FrameError, HEADER, MAX_FRAME};
use chatd::proto::relay::{
    Envelope, FromRelay, ItemKey, KeyPacket, Kind, Peer, Receipt, Rekey, Routed, ToRelay,
};
use chatd::proto::{encode_frame, fast, from_payload, to_payload};
use chatd::relay::{self, Limits, Relay};
use chatd::store::Store;

// ---------------------------------------------------------------------------------------------
// Counting allocator

/// The largest single allocation a decode may request.
const ALLOC_CAP: usize = 2 * MAX_FRAME;

/// Passes everything to the system allocator; while the current thread is measuring, records
/// the largest request and the peak of bytes held.
struct Counting;

thread_local! {
    static MEASURING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note_alloc(size: usize) {
    // `try_with`: thread-locals may already be gone while a thread exits.
    if MEASURING.try_with(Cell::get).unwrap_or(false) {
        LARGEST.set(LARGEST.get().max(size));
        let live = LIVE.get() + size as isize;
        LIVE.set(live);
        PEAK.set(PEAK.get().max(live));
    }
}

fn note_free(size: usize) {
    if MEASURING.try_with(Cell::get).unwrap_or(false) {
        LIVE.set(LIVE.get() - size as isize);
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the
// bookkeeping only touches const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        // SAFETY: forwarded as is; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note_free(layout.size());
        // SAFETY: `ptr` came from `System` through this allocator with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_free(layout.size());
        note_alloc(new_size);
        // SAFETY: as for `dealloc`; `new_size` is the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// What a measured call allocated.
#[derive(Debug, Clone, Copy)]
struct Usage {
    /// Largest single request, in bytes.
    largest: usize,
    /// Peak of bytes allocated and not yet freed, counted from the start of the call.
    peak: usize,
}

/// Run `f` with this thread's allocations measured.
fn measured<R>(f: impl FnOnce() -> R) -> (R, Usage) {
    struct Stop;
    impl Drop for Stop {
        fn drop(&mut self) {
            MEASURING.set(false);
        }
    }
    LARGEST.set(0);
    LIVE.set(0);
    PEAK.set(0);
    MEASURING.set(true);
    let stop = Stop;
    let r = f();
    drop(stop);
    let usage = Usage {
        largest: LARGEST.get(),
        peak: PEAK.get().max(0) as usize,
    };
    (r, usage)
}

/// Decode `bytes` as a `T` under measurement; the largest allocation must stay under the cap.
fn decode_within_cap<T: DeserializeOwned>(bytes: &[u8]) -> Result<Usage, TestCaseError> {
    let (ok, usage) = measured(|| from_payload::<T>(bytes).is_ok());
    prop_assert!(
        usage.largest < ALLOC_CAP,
        "decoding {} bytes as {} (ok: {ok}) requested one allocation of {} bytes (cap {ALLOC_CAP})",
        bytes.len(),
        type_name::<T>(),
        usage.largest
    );
    Ok(usage)
}

/// Decode `bytes` as every message type that comes off a socket: no panic, no allocation over
/// the cap, and whatever decodes re-encodes to the same message (the harness checks).
fn decode_as_everything(bytes: &[u8]) -> Result<(), TestCaseError> {
    on_daemon_stack(|| {
        decode_within_cap::<ToRelay>(bytes)?;
        decode_within_cap::<FromRelay>(bytes)?;
        decode_within_cap::<Routed>(bytes)?;
        decode_within_cap::<CtlRequest>(bytes)?;
        decode_within_cap::<CtlResponse>(bytes)?;
        harness::to_relay(bytes);
        harness::from_relay(bytes);
        harness::control_request(bytes);
        harness::control_response(bytes);
        Ok(())
    })
}

/// The stack `chatd` and `chatctl` decode on: their main thread's (8 MiB by default on Linux).
const DAEMON_STACK: usize = 8 << 20;

/// Run `f` on a thread with the daemon's stack, passing its panic on.
///
/// Why: rmp_serde refuses nesting deeper than 1024 levels, and skipping an unknown field nested
/// that deep takes ~3.9 KB of stack per level in this unoptimised test build (~4 MiB in all),
/// more than the 2 MiB of a test thread; an optimised build takes ~120 B per level (~120 KB).
/// See `deep_nesting_is_refused_without_overflow`.
fn on_daemon_stack<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    thread_local! {
        static BIG: Cell<bool> = const { Cell::new(false) };
    }
    if BIG.get() {
        return f();
    }
    std::thread::scope(|s| {
        let t = std::thread::Builder::new()
            .stack_size(DAEMON_STACK)
            .spawn_scoped(s, || {
                BIG.set(true);
                f()
            })
            .expect("spawn a decoder thread");
        t.join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Cases for a property: `PROPTEST_CASES` if set, else `default`.
fn config(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies for the message types

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..=max)
}

/// Mostly valid user names, sometimes anything.
fn name() -> BoxedStrategy<String> {
    prop_oneof![
        3 => select(vec!["alice", "bob", "carol"]).prop_map(String::from),
        2 => "[a-z0-9][a-z0-9._-]{0,8}",
        1 => "(?s).{0,12}",
    ]
    .boxed()
}

fn text() -> impl Strategy<Value = String> {
    "(?s).{0,40}"
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![Just(Kind::Message), Just(Kind::Receipt), Just(Kind::Rekey)]
}

fn item_key() -> impl Strategy<Value = ItemKey> {
    (kind(), any::<[u8; 16]>()).prop_map(|(kind, id)| ItemKey { kind, id })
}

fn key_packet() -> impl Strategy<Value = KeyPacket> {
    (bytes(64), bytes(64)).prop_map(|(wrapped, signature)| KeyPacket { wrapped, signature })
}

fn envelope() -> impl Strategy<Value = Envelope> {
    (
        any::<[u8; 16]>(),
        name(),
        name(),
        any::<u64>(),
        any::<[u8; 16]>(),
        any::<u64>(),
        option::of(key_packet()),
        bytes(80),
    )
        .prop_map(
            |(id, from, to, time_ms, session, counter, key_packet, ciphertext)| Envelope {
                id,
                from,
                to,
                time_ms,
                session,
                counter,
                key_packet,
                ciphertext,
            },
        )
}

fn receipt() -> impl Strategy<Value = Receipt> {
    (
        any::<[u8; 16]>(),
        name(),
        name(),
        any::<[u8; 16]>(),
        any::<u64>(),
        any::<[u8; 16]>(),
    )
        .prop_map(|(id, from, to, session, counter, tag)| Receipt {
            id,
            from,
            to,
            session,
            counter,
            tag,
        })
}

fn rekey() -> impl Strategy<Value = Rekey> {
    (
        any::<[u8; 16]>(),
        name(),
        name(),
        any::<[u8; 16]>(),
        vec(any::<u8>(), 0..600),
    )
        .prop_map(|(id, from, to, session, signature)| Rekey {
            id,
            from,
            to,
            session,
            signature,
        })
}

fn routed() -> impl Strategy<Value = Routed> {
    prop_oneof![
        envelope().prop_map(Routed::Message),
        receipt().prop_map(Routed::Receipt),
        rekey().prop_map(Routed::Rekey),
    ]
}

/// A public key: random bytes, or a real 2048-bit SubjectPublicKeyInfo (bob's, whom the
/// harness's member has pinned, or carol's, whom it has not).
fn key_der() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        bytes(48),
        Just(harness::bob_der().to_vec()),
        Just(carol_der())
    ]
    .boxed()
}

fn peer() -> impl Strategy<Value = Peer> {
    (name(), key_der(), any::<bool>()).prop_map(|(user, key, online)| Peer { user, key, online })
}

fn to_relay() -> impl Strategy<Value = ToRelay> {
    prop_oneof![
        (name(), key_der(), bytes(64)).prop_map(|(user, key, signature)| ToRelay::Login {
            user,
            key,
            signature
        }),
        routed().prop_map(ToRelay::Send),
        item_key().prop_map(ToRelay::Ack),
        Just(ToRelay::Ping),
    ]
}

fn from_relay() -> impl Strategy<Value = FromRelay> {
    prop_oneof![
        (any::<[u8; 32]>(), text())
            .prop_map(|(nonce, version)| FromRelay::Challenge { nonce, version }),
        (name(), vec(peer(), 0..4)).prop_map(|(user, peers)| FromRelay::Welcome { user, peers }),
        peer().prop_map(FromRelay::Presence),
        routed().prop_map(FromRelay::Deliver),
        item_key().prop_map(FromRelay::Accepted),
        (item_key(), text(), text()).prop_map(|(key, code, reason)| FromRelay::Refused {
            key,
            code: code.into(),
            reason
        }),
        Just(FromRelay::Pong),
        (text(), text()).prop_map(|(code, reason)| FromRelay::Error {
            code: code.into(),
            reason
        }),
    ]
}

fn wait() -> impl Strategy<Value = Wait> {
    prop_oneof![Just(Wait::None), Just(Wait::Relay), Just(Wait::Delivered)]
}

fn ctl_request() -> impl Strategy<Value = CtlRequest> {
    prop_oneof![
        (
            vec(name(), 0..4),
            any::<bool>(),
            text(),
            wait(),
            any::<u64>()
        )
            .prop_map(|(to, all, text, wait, timeout_ms)| CtlRequest::Send {
                to,
                all,
                text,
                wait,
                timeout_ms
            }),
        (
            option::of(any::<u64>()),
            option::of(any::<u64>()),
            option::of(name()),
            any::<bool>()
        )
            .prop_map(|(last, since, with, follow)| CtlRequest::Tail {
                last,
                since,
                with,
                follow,
                kinds: vec![RecordKind::Key],
            }),
        Just(CtlRequest::Who),
        Just(CtlRequest::Status),
        option::of(name()).prop_map(|user| CtlRequest::Fingerprint { user }),
        (name(), text()).prop_map(|(user, fingerprint)| CtlRequest::Trust { user, fingerprint }),
        name().prop_map(|user| CtlRequest::Forget { user }),
    ]
}

fn msg_state() -> impl Strategy<Value = MsgState> {
    prop_oneof![
        Just(MsgState::Queued),
        Just(MsgState::Relayed),
        Just(MsgState::Delivered),
        Just(MsgState::Failed),
    ]
}

fn record() -> impl Strategy<Value = Record> {
    let body = prop_oneof![
        (
            any::<[u8; 16]>(),
            name(),
            name(),
            prop_oneof![Just(Dir::In), Just(Dir::Out)],
            text()
        )
            .prop_map(|(id, from, to, dir, text)| RecordBody::Message {
                id,
                from,
                to,
                dir,
                text
            }),
        (name(), any::<bool>()).prop_map(|(user, online)| RecordBody::Presence { user, online }),
        (any::<[u8; 16]>(), name(), msg_state(), option::of(text())).prop_map(
            |(id, to, state, reason)| RecordBody::Receipt {
                id,
                to,
                state,
                reason
            }
        ),
    ];
    (any::<u64>(), any::<u64>(), body).prop_map(|(seq, time_ms, body)| Record {
        seq,
        time_ms,
        body,
    })
}

fn sent() -> impl Strategy<Value = Sent> {
    (any::<[u8; 16]>(), name(), msg_state()).prop_map(|(id, to, state)| Sent { id, to, state })
}

fn peer_view() -> impl Strategy<Value = PeerView> {
    (name(), any::<bool>(), text(), text(), option::of(text())).prop_map(
        |(user, online, trust, fingerprint, presented)| PeerView {
            user,
            online,
            trust: trust.into(),
            fingerprint,
            presented,
        },
    )
}

fn status_view() -> impl Strategy<Value = StatusView> {
    (
        (
            option::of(name()),
            text(),
            vec(text(), 0..3),
            option::of(text()),
        ),
        (any::<bool>(), option::of(text()), option::of(text())),
        (any::<u64>(), any::<u64>(), any::<u64>(), text(), text()),
    )
        .prop_map(
            |(
                (user, fingerprint, roles, relay),
                (connected, relay_error, listen),
                (peers_online, outbox_pending, uptime_s, version, state_dir),
            )| StatusView {
                user,
                fingerprint,
                roles,
                relay,
                connected,
                relay_error,
                listen,
                peers_online,
                outbox_pending,
                uptime_s,
                version,
                state_dir,
                relay_fingerprint: None,
            },
        )
}

fn ctl_response() -> impl Strategy<Value = CtlResponse> {
    let error_kind = prop_oneof![
        Just(ErrorKind::Failed),
        Just(ErrorKind::Timeout),
        Just(ErrorKind::KeyChanged),
    ];
    prop_oneof![
        vec(sent(), 0..4).prop_map(CtlResponse::Sent),
        record().prop_map(CtlResponse::Record),
        Just(CtlResponse::End),
        vec(peer_view(), 0..4).prop_map(CtlResponse::Peers),
        status_view().prop_map(CtlResponse::Status),
        (name(), text())
            .prop_map(|(user, fingerprint)| CtlResponse::Fingerprint { user, fingerprint }),
        text().prop_map(CtlResponse::Done),
        (error_kind, text(), vec(sent(), 0..3)).prop_map(|(kind, message, sent)| {
            CtlResponse::Error {
                kind,
                message,
                sent,
            }
        }),
    ]
}

fn encoded<T: Serialize>(msg: &T) -> Vec<u8> {
    to_payload(msg).expect("a generated message encodes")
}

/// The payload of a random valid message of any of the types.
fn any_encoding() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        to_relay().prop_map(|m| encoded(&m)),
        from_relay().prop_map(|m| encoded(&m)),
        routed().prop_map(|m| encoded(&m)),
        ctl_request().prop_map(|m| encoded(&m)),
        ctl_response().prop_map(|m| encoded(&m)),
    ]
    .boxed()
}

// ---------------------------------------------------------------------------------------------
// Mutations

/// MessagePack type bytes worth trying in place of any byte.
const MARKERS: &[u8] = &[
    0x00, 0x01, 0x7f, 0x80, 0x81, 0x8f, 0x90, 0x91, 0x9f, 0xa0, 0xa1, 0xbf, 0xc0, 0xc1, 0xc2, 0xc3,
    0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xcb, 0xcc, 0xcd, 0xce, 0xcf, 0xd0, 0xd3, 0xd4, 0xd8,
    0xd9, 0xda, 0xdb, 0xdc, 0xdd, 0xde, 0xdf, 0xe0, 0xff,
];

/// The MessagePack headers that announce a length: bin, ext, str, array and map, every width.
const LENGTH_MARKERS: &[u8] = &[
    0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xd9, 0xda, 0xdb, 0xdc, 0xdd, 0xde, 0xdf,
];

/// A header of type `marker` announcing `len` (truncated to the marker's width).
fn length_header(marker: u8, len: u32) -> Vec<u8> {
    let mut h = vec![marker];
    match marker {
        0xc4 | 0xd9 => h.push(len as u8),
        0xc5 | 0xda | 0xdc | 0xde => h.extend_from_slice(&(len as u16).to_be_bytes()),
        0xc7 => h.extend_from_slice(&[len as u8, 0]),
        0xc8 => {
            h.extend_from_slice(&(len as u16).to_be_bytes());
            h.push(0);
        }
        0xc9 => {
            h.extend_from_slice(&len.to_be_bytes());
            h.push(0);
        }
        _ => h.extend_from_slice(&len.to_be_bytes()),
    }
    h
}

/// Insert at `at` (or write over what is there, with `over`) a header of type `marker`
/// announcing `len`.
fn put_length(buf: &mut Vec<u8>, at: usize, marker: u8, len: u32, over: bool) {
    let h = length_header(marker, len);
    let end = if over {
        (at + h.len()).min(buf.len())
    } else {
        at
    };
    buf.splice(at..end, h);
}

fn interesting_byte() -> impl Strategy<Value = u8> {
    prop_oneof![any::<u8>(), select(MARKERS)]
}

fn huge_len() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(u32::MAX),
        Just(0x8000_0000),
        Just(MAX_FRAME as u32 + 1),
        Just(MAX_FRAME as u32 / 2),
        any::<u32>(),
        0u32..64,
    ]
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip(Index, u8),
    Set(Index, u8),
    Insert(Index, Vec<u8>),
    Delete(Index, usize),
    Truncate(Index),
    /// A length header, inserted or written over what is there.
    Length(Index, u8, u32, bool),
    /// `depth` nested one-element arrays or maps.
    Nest(Index, u8, usize),
    /// A whole other valid encoding.
    Splice(Index, Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        3 => (any::<Index>(), interesting_byte()).prop_map(|(i, b)| Mutation::Set(i, b)),
        2 => (any::<Index>(), vec(interesting_byte(), 1..4))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        2 => (any::<Index>(), 1usize..8).prop_map(|(i, n)| Mutation::Delete(i, n)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        3 => (any::<Index>(), select(LENGTH_MARKERS), huge_len(), any::<bool>())
            .prop_map(|(i, m, l, o)| Mutation::Length(i, m, l, o)),
        1 => (any::<Index>(), select(&[0x91u8, 0x81, 0xdd][..]), 1usize..3000)
            .prop_map(|(i, m, d)| Mutation::Nest(i, m, d)),
        1 => (any::<Index>(), any_encoding()).prop_map(|(i, e)| Mutation::Splice(i, e)),
    ]
}

fn apply(buf: &mut Vec<u8>, m: &Mutation) {
    let len = buf.len();
    // A position of an existing byte (none in an empty buffer), or a gap between bytes.
    let byte = |i: &Index| (len > 0).then(|| i.index(len));
    let gap = |i: &Index| i.index(len + 1);
    match m {
        Mutation::Flip(i, bit) => {
            if let Some(k) = byte(i) {
                buf[k] ^= 1 << bit;
            }
        }
        Mutation::Set(i, b) => {
            if let Some(k) = byte(i) {
                buf[k] = *b;
            }
        }
        Mutation::Insert(i, bytes) | Mutation::Splice(i, bytes) => {
            let k = gap(i);
            buf.splice(k..k, bytes.iter().copied());
        }
        Mutation::Delete(i, n) => {
            if let Some(k) = byte(i) {
                buf.drain(k..(k + n).min(len));
            }
        }
        Mutation::Truncate(i) => buf.truncate(gap(i)),
        Mutation::Length(i, marker, announced, over) => {
            put_length(buf, gap(i), *marker, *announced, *over)
        }
        Mutation::Nest(i, marker, depth) => {
            let one: &[u8] = match marker {
                0x81 => &[0x81, 0xa1, b'x'],
                0xdd => &[0xdd, 0, 0, 0, 1],
                _ => &[0x91],
            };
            let k = gap(i);
            buf.splice(k..k, one.iter().copied().cycle().take(one.len() * depth));
        }
    }
}

/// A valid encoding of a random message, then 1 to 5 mutations.
fn mutated() -> impl Strategy<Value = Vec<u8>> {
    (any_encoding(), vec(mutation(), 1..6)).prop_map(|(mut buf, ms)| {
        for m in &ms {
            apply(&mut buf, m);
        }
        buf
    })
}

/// Garbage for a decoder: random bytes, mutated valid messages, or valid messages.
fn garbage() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => bytes(96),
        5 => mutated(),
        1 => any_encoding(),
    ]
}

/// A byte stream of frames holding `garbage()` (valid or not), sometimes ending mid-frame.
fn frame_stream() -> impl Strategy<Value = Vec<u8>> {
    (vec(garbage(), 1..5), bytes(6)).prop_map(|(payloads, tail)| {
        let mut out = Vec::new();
        for p in &payloads {
            frame::encode(p, &mut out).expect("small payloads frame");
        }
        out.extend_from_slice(&tail);
        out
    })
}

// ---------------------------------------------------------------------------------------------
// The frame codec

fn max_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(MAX_FRAME),
        0usize..64,
        0..=2 * MAX_FRAME,
        any::<usize>(),
        Just(usize::MAX),
    ]
}

/// A buffer for the frame decoder: random bytes, or a header announcing a length near what
/// follows (so whole frames and need-more both come up), or a huge length.
fn frame_buffer() -> impl Strategy<Value = Vec<u8>> {
    let len = prop_oneof![
        0u32..72,
        any::<u32>(),
        Just(MAX_FRAME as u32),
        Just(MAX_FRAME as u32 + 1),
        Just(u32::MAX),
    ];
    prop_oneof![
        bytes(80),
        (len, bytes(80)).prop_map(|(len, body)| {
            let mut b = len.to_be_bytes().to_vec();
            b.extend_from_slice(&body);
            b
        }),
    ]
}

fn read_step() -> impl Strategy<Value = harness::Step> {
    prop_oneof![
        4 => (1usize..9).prop_map(harness::Step::Give),
        1 => Just(harness::Step::Interrupt),
        1 => Just(harness::Step::Fail),
    ]
}

proptest! {
    #![proptest_config(config(2000))]

    /// `frame::decode` over any bytes with any cap: never panics, never allocates, and its
    /// answer is consistent (`consumed == 4 + payload.len() <= buf.len()`, `payload.len() <= max`,
    /// over-cap lengths refused).
    #[test]
    fn frame_decode_any_bytes_any_cap(buf in frame_buffer(), max in max_strategy()) {
        let ((), usage) = measured(|| harness::check_decode(&buf, max));
        prop_assert_eq!(usage.largest, 0, "the pure frame decoder allocated");
    }

    /// An announced length above the cap is an error as soon as the 4 header bytes are there,
    /// and stays one whatever follows.
    #[test]
    fn frame_over_cap_refused_with_just_the_header(
        max in 0..=MAX_FRAME,
        excess in 1u64..=u32::MAX as u64,
        body in bytes(16),
    ) {
        let len = (max as u64 + excess).min(u32::MAX as u64) as u32;
        prop_assume!(len as usize > max);
        let mut buf = len.to_be_bytes().to_vec();
        let refused = |b: &[u8]| matches!(
            frame::decode(b, max),
            Err(FrameError::TooLarge { len: l, max: m }) if l == len as usize && m == max
        );
        prop_assert!(refused(&buf));
        buf.extend_from_slice(&body);
        prop_assert!(refused(&buf));
        for cut in 0..HEADER {
            prop_assert_eq!(frame::decode(&buf[..cut], max).unwrap(), Decoded::NeedMore);
        }
    }

    /// Frames written one after another come back in order however the stream is cut into
    /// reads (the daemon decodes as bytes arrive).
    #[test]
    fn frame_stream_split_anywhere(
        payloads in vec(bytes(40), 0..6),
        cuts in vec(any::<Index>(), 0..8),
    ) {
        let mut stream = Vec::new();
        for p in &payloads {
            frame::encode(p, &mut stream).unwrap();
        }
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        cuts.push(stream.len());
        cuts.sort_unstable();
        let (mut inbuf, mut got, mut from) = (Vec::new(), Vec::new(), 0);
        for cut in cuts {
            inbuf.extend_from_slice(&stream[from..cut]);
            from = cut;
            while let Decoded::Frame { payload, consumed } =
                frame::decode(&inbuf, MAX_FRAME).unwrap()
            {
                got.push(payload.to_vec());
                inbuf.drain(..consumed);
            }
        }
        prop_assert!(inbuf.is_empty());
        prop_assert_eq!(got, payloads);
    }

    /// `frame::read_from` over a reader that returns short reads, `Interrupted` and errors:
    /// never panics, matches the model, never reads past the frame, and never allocates more
    /// than the cap in force even when the header announces 4 GiB.
    #[test]
    fn frame_read_from_any_reader(
        data in frame_buffer(),
        steps in vec(read_step(), 0..8),
        max in prop_oneof![Just(MAX_FRAME), 0..=MAX_FRAME],
    ) {
        let ((), usage) = measured(|| harness::check_read_from(&data, &steps, max));
        prop_assert!(
            usage.largest <= max.max(64),
            "read_from with max {} allocated {} bytes", max, usage.largest
        );
    }
}

/// A 4 GiB announcement against the real cap: refused from the header alone, by both the pure
/// decoder and the blocking reader, with no allocation near the announced size.
#[test]
fn frame_huge_announcement_allocates_nothing() {
    for len in [u32::MAX, 0x8000_0000, MAX_FRAME as u32 + 1] {
        let mut buf = len.to_be_bytes().to_vec();
        buf.extend_from_slice(&[0xaa; 64]);
        let (r, usage) = measured(|| frame::decode(&buf, MAX_FRAME).map(|_| ()));
        assert!(matches!(r, Err(FrameError::TooLarge { .. })));
        assert_eq!(usage.largest, 0);
        let (r, usage) = measured(|| frame::read_from(&mut &buf[..], MAX_FRAME).map(|_| ()));
        assert!(matches!(r, Err(FrameError::TooLarge { .. })));
        assert!(usage.largest < 1024, "{usage:?}");
    }
    // At the cap the reader allocates the announced payload and no more.
    let mut buf = (MAX_FRAME as u32).to_be_bytes().to_vec();
    buf.resize(HEADER + MAX_FRAME, 7);
    let (r, usage) = measured(|| frame::read_from(&mut &buf[..], MAX_FRAME));
    assert_eq!(r.unwrap().unwrap().len(), MAX_FRAME);
    assert!(usage.largest <= MAX_FRAME, "{usage:?}");
}

// ---------------------------------------------------------------------------------------------
// The message decoders

proptest! {
    #![proptest_config(config(1000))]

    /// Arbitrary bytes as every message type.
    #[test]
    fn messages_from_random_bytes(buf in bytes(128)) {
        decode_as_everything(&buf)?;
    }

    /// Mutated valid encodings as every message type: the deep paths (a valid prefix, then
    /// something wrong) and the huge-length headers.
    #[test]
    fn messages_from_mutated_encodings(buf in mutated()) {
        decode_as_everything(&buf)?;
    }
}

proptest! {
    #![proptest_config(config(200))]

    /// Every `ToRelay` survives encode then decode.
    #[test]
    fn to_relay_round_trips(msg in to_relay()) {
        let mut framed = Vec::new();
        encode_frame(&msg, &mut framed).unwrap();
        let Decoded::Frame { payload, consumed } = frame::decode(&framed, MAX_FRAME).unwrap() else {
            panic!("a whole frame decodes");
        };
        prop_assert_eq!(consumed, framed.len());
        prop_assert_eq!(&from_payload::<ToRelay>(payload).unwrap(), &msg);
        // The relay's decoder, and its serde-free path for the message path's frames.
        prop_assert_eq!(&ToRelay::decode(payload).unwrap(), &msg);
        let message_path = matches!(
            msg,
            ToRelay::Send(Routed::Message(_) | Routed::Receipt(_)) | ToRelay::Ack(_)
        );
        prop_assert_eq!(fast::to_relay(payload), message_path.then(|| msg.clone()));
    }

    /// Every `Routed` item survives encode then decode, by serde and as the relay reads a queued
    /// one.
    #[test]
    fn routed_round_trips(msg in routed()) {
        let bytes = encoded(&msg);
        prop_assert_eq!(&from_payload::<Routed>(&bytes).unwrap(), &msg);
        prop_assert_eq!(&Routed::decode(&bytes).unwrap(), &msg);
        let fast_path = matches!(msg, Routed::Message(_) | Routed::Receipt(_));
        prop_assert_eq!(fast::routed(&bytes), fast_path.then(|| msg.clone()));
    }

    /// Every `CtlRequest` survives encode then decode.
    #[test]
    fn ctl_request_round_trips(msg in ctl_request()) {
        prop_assert_eq!(from_payload::<CtlRequest>(&encoded(&msg)).unwrap(), msg);
    }

    /// Every `FromRelay` survives encode then decode.
    #[test]
    fn from_relay_round_trips(msg in from_relay()) {
        prop_assert_eq!(from_payload::<FromRelay>(&encoded(&msg)).unwrap(), msg);
    }

    /// Every `CtlResponse` survives encode then decode.
    #[test]
    fn ctl_response_round_trips(msg in ctl_response()) {
        prop_assert_eq!(from_payload::<CtlResponse>(&encoded(&msg)).unwrap(), msg);
    }

    /// Key and fingerprint parsers, which read the keys in `Login` and directory entries and
    /// the fingerprint `chatctl trust` sends: never panic, never allocate over the cap.
    #[test]
    fn key_and_fingerprint_parsers(
        der in prop_oneof![bytes(300), (Just(harness::bob_der().to_vec()), vec(mutation(), 1..4))
            .prop_map(|(mut d, ms)| { for m in &ms { apply(&mut d, m); } d })],
        fp in prop_oneof!["(?s).{0,60}", "SHA256:[A-Za-z0-9+/=]{0,50}"],
    ) {
        prop_assert!(PublicKey::from_der(&carol_der()).is_ok());
        let (_, usage) = measured(|| PublicKey::from_der(&der).is_ok());
        prop_assert!(usage.largest < ALLOC_CAP, "{:?}", usage);
        let _ = Fingerprint::parse(&fp);
    }
}

/// A fixed 2048-bit public key (SubjectPublicKeyInfo, base64), so seeds that carry a key are
/// the same on every run and reach the paths behind a successful `PublicKey::from_der`.
const CAROL_SPKI: &str = concat!(
    "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAs0xHnWUj+L7/OqzOSQSunDCVj1oTOpX0",
    "4EfqgVn5+q/rYA+eKPaO9ZQEv624O3/ITZoIru00JwIYiUFOs/5U5OivwBanQR8noKBPSXjJkOVD",
    "UaOSaFILmLlWrLL/g5Ms3C7Y5mPmh6xCxc8LYYmiKeNpCT6aSNjwR/QtOaoirNqmHFrcwW6GqSuI",
    "rrwUo0FXfN+1ZWYmoM5yVhu/iXCvMUqr+nVWTKFs43c+KCvTeX4IGaLgsfux9qT2k37DYYOUQ4xv",
    "NvZxkam9o2A0YSwwAWje2aj3vs5QBAvrrI8IuYvofAPXj80Vf5S5rOVFFz3juR3jYA5mdxUbYgpA",
    "W+yUJQIDAQAB",
);

fn carol_der() -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(CAROL_SPKI)
        .expect("CAROL_SPKI is base64")
}

/// Sample messages: one or more of every variant, deterministic (seeds for the fuzz corpus and
/// bases for the exhaustive sweeps).
fn samples() -> Vec<(&'static str, Vec<u8>)> {
    let env = Envelope {
        id: [1; 16],
        from: "alice".into(),
        to: "bob".into(),
        time_ms: 1_700_000_000_000,
        session: [2; 16],
        counter: 3,
        key_packet: Some(KeyPacket {
            wrapped: vec![4; 256],
            signature: vec![5; 256],
        }),
        ciphertext: vec![6; 21],
    };
    let rcpt = Receipt {
        id: [1; 16],
        from: "bob".into(),
        to: "alice".into(),
        session: [2; 16],
        counter: 3,
        tag: [7; 16],
    };
    let key = ItemKey {
        kind: Kind::Message,
        id: [1; 16],
    };
    let peer = Peer {
        user: "carol".into(),
        key: carol_der(),
        online: true,
    };
    let sent = Sent {
        id: [1; 16],
        to: "bob".into(),
        state: MsgState::Relayed,
    };
    let mut out = vec![];
    let mut add = |name: &'static str, bytes: Vec<u8>| out.push((name, bytes));
    let to = |m: ToRelay| encoded(&m);
    add(
        "to_relay-login",
        to(ToRelay::Login {
            user: "alice".into(),
            key: vec![0x30; 40],
            signature: vec![9; 256],
        }),
    );
    add(
        "to_relay-send-message",
        to(ToRelay::Send(Routed::Message(env.clone()))),
    );
    add(
        "to_relay-send-receipt",
        to(ToRelay::Send(Routed::Receipt(rcpt.clone()))),
    );
    // A routed item alone, as the relay stores it (`to_relay` also decodes `Routed`).
    add(
        "to_relay-routed-message",
        encoded(&Routed::Message(env.clone())),
    );
    add("to_relay-ack", to(ToRelay::Ack(key)));
    add("to_relay-ping", to(ToRelay::Ping));
    let from = |m: FromRelay| encoded(&m);
    add(
        "from_relay-challenge",
        from(FromRelay::Challenge {
            nonce: [8; 32],
            version: "0.1.0".into(),
        }),
    );
    add(
        "from_relay-welcome",
        from(FromRelay::Welcome {
            user: "alice".into(),
            peers: vec![peer.clone()],
        }),
    );
    add("from_relay-presence", from(FromRelay::Presence(peer)));
    add(
        "from_relay-deliver-message",
        from(FromRelay::Deliver(Routed::Message(env))),
    );
    add(
        "from_relay-deliver-receipt",
        from(FromRelay::Deliver(Routed::Receipt(rcpt))),
    );
    add("from_relay-accepted", from(FromRelay::Accepted(key)));
    add(
        "from_relay-refused",
        from(FromRelay::Refused {
            key,
            code: "queue_full".into(),
            reason: "full".into(),
        }),
    );
    add("from_relay-pong", from(FromRelay::Pong));
    add(
        "from_relay-error",
        from(FromRelay::Error {
            code: "protocol".into(),
            reason: "bad".into(),
        }),
    );
    let req = |m: CtlRequest| encoded(&m);
    add(
        "control_request-send",
        req(CtlRequest::Send {
            to: vec!["bob".into(), "carol".into()],
            all: false,
            text: "hello".into(),
            wait: Wait::Delivered,
            timeout_ms: 30_000,
        }),
    );
    add(
        "control_request-tail",
        req(CtlRequest::Tail {
            last: Some(10),
            since: None,
            with: Some("bob".into()),
            follow: true,
            kinds: Vec::new(),
        }),
    );
    add("control_request-who", req(CtlRequest::Who));
    add("control_request-status", req(CtlRequest::Status));
    add(
        "control_request-fingerprint",
        req(CtlRequest::Fingerprint {
            user: Some("bob".into()),
        }),
    );
    add(
        "control_request-trust",
        req(CtlRequest::Trust {
            user: "bob".into(),
            fingerprint: "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU".into(),
        }),
    );
    add(
        "control_request-forget",
        req(CtlRequest::Forget { user: "bob".into() }),
    );
    let resp = |m: CtlResponse| encoded(&m);
    add(
        "control_response-sent",
        resp(CtlResponse::Sent(vec![sent.clone()])),
    );
    add(
        "control_response-record",
        resp(CtlResponse::Record(Record {
            seq: 1,
            time_ms: 2,
            body: RecordBody::Message {
                id: [1; 16],
                from: "alice".into(),
                to: "bob".into(),
                dir: Dir::Out,
                text: "hi".into(),
            },
        })),
    );
    add(
        "control_response-record-receipt",
        resp(CtlResponse::Record(Record {
            seq: 2,
            time_ms: 3,
            body: RecordBody::Receipt {
                id: [1; 16],
                to: "bob".into(),
                state: MsgState::Failed,
                reason: Some("unknown_user".into()),
            },
        })),
    );
    add("control_response-end", resp(CtlResponse::End));
    add(
        "control_response-peers",
        resp(CtlResponse::Peers(vec![PeerView {
            user: "bob".into(),
            online: true,
            trust: "changed".into(),
            fingerprint: "SHA256:x".into(),
            presented: Some("SHA256:y".into()),
        }])),
    );
    add(
        "control_response-status",
        resp(CtlResponse::Status(StatusView {
            user: Some("alice".into()),
            fingerprint: "SHA256:x".into(),
            roles: vec!["member".into()],
            relay: Some("127.0.0.1:7000".into()),
            connected: false,
            relay_error: Some("refused".into()),
            listen: None,
            peers_online: 1,
            outbox_pending: 2,
            uptime_s: 3,
            version: "0.1.0".into(),
            state_dir: "/tmp/x".into(),
            relay_fingerprint: Some("SHA256:z".into()),
        })),
    );
    add(
        "control_response-fingerprint",
        resp(CtlResponse::Fingerprint {
            user: "bob".into(),
            fingerprint: "SHA256:x".into(),
        }),
    );
    add(
        "control_response-done",
        resp(CtlResponse::Done("ok".into())),
    );
    add(
        "control_response-error",
        resp(CtlResponse::Error {
            kind: ErrorKind::Timeout,
            message: "timed out".into(),
            sent: vec![sent],
        }),
    );
    out
}

/// Every length header (every width, lengths from 0 to 4 GiB), inserted at and written over
/// every position of every sample, decoded as every type: no panic, no allocation over the cap.
/// This is the exhaustive form of "a header claiming 4 GiB must not be believed".
#[test]
fn huge_length_headers_everywhere() {
    on_daemon_stack(huge_length_sweep);
}

fn huge_length_sweep() {
    // Per header width: 1; all ones (255, 65535, or just over the frame cap); 4 GiB.
    let lens = [1, MAX_FRAME as u32 + 0xffff, u32::MAX];
    let mut decodes = 0;
    for (name, base) in samples() {
        for at in 0..=base.len() {
            for &marker in LENGTH_MARKERS {
                for len in lens {
                    for over in [false, true] {
                        let mut buf = base.clone();
                        put_length(&mut buf, at, marker, len, over);
                        decode_as_everything(&buf)
                            .unwrap_or_else(|e| panic!("{name} + {marker:#x} {len} at {at}: {e}"));
                        decodes += 5;
                    }
                }
            }
        }
    }
    assert!(decodes > 10_000, "{decodes}");
}

/// A `ToRelay::Ack` with a third, unknown field `z` whose value follows.
const ACK_WITH_UNKNOWN_FIELD: [u8; 42] =
    *b"\x81\xa3Ack\x83\xa4kind\xa7Message\xa2id\xc4\x10................\xa1z";

/// Deep nesting inside a field the decoder skips (unknown map keys are ignored, recursively):
/// refused by rmp_serde's depth limit (1024), for every type, without overflowing the stack the
/// daemon decodes on. Measured: skipping 1024 levels takes ~4 MiB of stack in this unoptimised
/// build (more than a 2 MiB test thread has, hence `on_daemon_stack`) and ~120 KB optimised.
#[test]
fn deep_nesting_is_refused_without_overflow() {
    for depth in [100, 1_000, 100_000] {
        for one in [&[0x91u8][..], &[0x81, 0xa1, b'x'], &[0xdd, 0, 0, 0, 1]] {
            let nested: Vec<u8> = one
                .iter()
                .copied()
                .cycle()
                .take(one.len() * depth)
                .collect();
            // A top-level value, and an unknown field of a struct variant of each type.
            let mut inputs = vec![nested.clone()];
            for prefix in [
                &ACK_WITH_UNKNOWN_FIELD[..],
                b"\x81\xa5Error\x83\xa4code\xa0\xa6reason\xa0\xa1z",
                b"\x81\xa4Tail\x85\xa4last\xc0\xa5since\xc0\xa4with\xc0\xa6follow\xc2\xa1z",
                b"\x81\xa4Done\x91",
            ] {
                let mut b = prefix.to_vec();
                b.extend_from_slice(&nested);
                b.push(0xc0);
                inputs.push(b);
            }
            for input in &inputs {
                decode_as_everything(input).unwrap();
            }
            if depth > 1024 {
                let e = on_daemon_stack(|| from_payload::<ToRelay>(&inputs[1]).unwrap_err());
                assert!(e.to_string().contains("depth limit"), "{e}");
            }
        }
    }
}

/// The worst amplification a relay-facing decoder allows: a full-size `ToRelay` whose bytes
/// fields are sent as arrays of one-byte integers, or whose array announces 4 GiB and then
/// carries a frame's worth of elements. The relay decodes these from anyone on its port.
#[test]
fn to_relay_worst_case_stays_under_cap() {
    let n = MAX_FRAME - 64;
    let mut login = b"\x81\xa5Login\x83\xa4user\xa1a\xa3key\xdd".to_vec();
    login.extend_from_slice(&(n as u32).to_be_bytes());
    login.extend_from_slice(&vec![0x01; n]);
    login.extend_from_slice(b"\xa9signature\xc4\x00");
    assert!(login.len() <= MAX_FRAME);
    let mut lying = b"\x81\xa5Login\x83\xa4user\xa1a\xa3key\xdd\xff\xff\xff\xff".to_vec();
    lying.extend_from_slice(&vec![0x01; n]);
    for input in [&login, &lying] {
        let usage = decode_within_cap::<ToRelay>(input).unwrap();
        assert!(usage.peak < ALLOC_CAP, "{usage:?}");
    }
}

/// A full frame of the smallest elements of a `Vec` of a type much larger than its encoding.
/// Returns the largest single allocation made decoding (or refusing) it as `T`.
fn amplified<T: DeserializeOwned>(prefix: &[u8], element: &[u8], suffix: &[u8]) -> Usage {
    let n = (MAX_FRAME - prefix.len() - suffix.len() - 5) / element.len();
    let mut buf = prefix.to_vec();
    buf.push(0xdd);
    buf.extend_from_slice(&(n as u32).to_be_bytes());
    for _ in 0..n {
        buf.extend_from_slice(element);
    }
    buf.extend_from_slice(suffix);
    assert!(buf.len() <= MAX_FRAME);
    let (r, usage) = measured(|| from_payload::<T>(&buf).map(drop));
    // Refusing the list (lists with a count cap) is as good as decoding it within the cap: what
    // is measured is the memory either way.
    if let Err(e) = r {
        eprintln!("the amplified {} is refused: {e}", type_name::<T>());
    }
    eprintln!(
        "{}: {} elements in {} bytes: largest allocation {} bytes, peak {} bytes",
        type_name::<T>(),
        n,
        buf.len(),
        usage.largest,
        usage.peak
    );
    usage
}

/// A relay (untrusted, by design) sends a member a `Welcome` whose directory is a frame full of
/// 5-byte empty peers: each becomes a 56-byte `Peer`.
#[test]
fn from_relay_welcome_amplification_stays_under_cap() {
    let usage = amplified::<FromRelay>(
        b"\x81\xa7Welcome\x82\xa4user\xa1a\xa5peers",
        b"\x93\xa0\xc4\x00\xc2",
        b"",
    );
    assert!(usage.largest < ALLOC_CAP, "{usage:?}");
}

/// A local client sends `chatd` a `Send` whose recipient list is a frame full of empty names:
/// each 1-byte `""` becomes a 24-byte `String`.
#[test]
fn ctl_request_send_amplification_stays_under_cap() {
    let usage = amplified::<CtlRequest>(
        b"\x81\xa4Send\x85\xa2to",
        b"\xa0",
        b"\xa3all\xc2\xa4text\xa0\xa4wait\xa4None\xaatimeout_ms\x00",
    );
    assert!(usage.largest < ALLOC_CAP, "{usage:?}");
}

/// `chatd` (trusted by `chatctl`) sends a `Peers` answer of a frame full of empty entries. Since
/// `who` streams in chunks of `WHO_CHUNK`, a `Peers` frame is capped like every other list.
#[test]
fn ctl_response_peers_amplification_stays_under_cap() {
    let usage = amplified::<CtlResponse>(b"\x81\xa5Peers", b"\x95\xa0\xc2\xa0\xa0\xc0", b"");
    assert!(usage.largest < ALLOC_CAP, "{usage:?}");
}

// ---------------------------------------------------------------------------------------------
// The cores that decode frames

fn drain_relay(relay: &mut Relay) -> Vec<relay::Out> {
    std::iter::from_fn(|| relay.poll()).collect()
}

proptest! {
    #![proptest_config(config(200))]

    /// Garbage on a fresh relay connection: `Relay::receive` never panics and answers with an
    /// `Error` frame then `Close`, and nothing for what the connection sends after that.
    #[test]
    fn relay_cuts_off_garbage(
        conn in any::<u64>(),
        now in any::<u64>(),
        junk in garbage(),
        more in garbage(),
    ) {
        on_daemon_stack(|| relay_cuts_off(conn, now, &junk, &more))?;
    }

    /// Garbage from the relay: `Member::receive` never panics, and a frame that does not decode
    /// closes the link.
    #[test]
    fn member_drops_link_on_garbage(now in any::<u64>(), junk in garbage()) {
        on_daemon_stack(|| member_drops_link(now, &junk))?;
    }
}

fn relay_cuts_off(conn: u64, now: u64, junk: &[u8], more: &[u8]) -> Result<(), TestCaseError> {
    let conn = relay::ConnId(conn);
    let mut store = Store::open_in_memory().unwrap();
    let mut relay = Relay::load(&store, Limits::default()).unwrap();
    relay.connect(conn, now);
    let hello = drain_relay(&mut relay);
    prop_assert!(
        matches!(
            hello.as_slice(),
            [relay::Out::Send(c, FromRelay::Challenge { .. })] if *c == conn
        ),
        "{:?}",
        hello
    );
    let ((), usage) = measured(|| relay.receive(conn, junk, now, &mut store));
    prop_assert!(usage.largest < ALLOC_CAP, "{:?}", usage);
    let out = drain_relay(&mut relay);
    prop_assert!(
        matches!(
            out.as_slice(),
            [relay::Out::Send(c1, FromRelay::Error { .. }), relay::Out::Close(c2)]
                if *c1 == conn && *c2 == conn
        ),
        "garbage got {:?}",
        out
    );
    relay.receive(conn, more, now, &mut store);
    let after = drain_relay(&mut relay);
    prop_assert!(after.is_empty(), "a closing connection got {:?}", after);
    Ok(())
}

fn member_drops_link(now: u64, junk: &[u8]) -> Result<(), TestCaseError> {
    let mut store = Store::open_in_memory().unwrap();
    let mut m = Member::load("alice".into(), alice(), &store).unwrap();
    m.link_up(Now::at(now));
    let decodes = from_payload::<FromRelay>(junk).is_ok();
    let ((), usage) = measured(|| m.receive(junk, Now::at(now), &mut store));
    prop_assert!(usage.largest < ALLOC_CAP, "{:?}", usage);
    let out: Vec<member::Out> = std::iter::from_fn(|| m.poll()).collect();
    if !decodes {
        prop_assert!(
            out.iter().any(|o| matches!(o, member::Out::Close)),
            "undecodable frame did not close the link: {:?}",
            out
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(48))]

    /// A stream of hostile frames on a relay connection, before or after login, with another
    /// member logged in as the witness (see `harness::relay_core`).
    #[test]
    fn relay_core_frame_streams(logged_in in any::<bool>(), stream in frame_stream()) {
        let mut data = vec![u8::from(logged_in)];
        data.extend_from_slice(&stream);
        on_daemon_stack(|| harness::relay_core(&data));
    }

    /// A stream of hostile frames from the relay to a member in each link state (see
    /// `harness::member_core`).
    #[test]
    fn member_core_frame_streams(state in 0u8..4, stream in frame_stream()) {
        let mut data = vec![state];
        data.extend_from_slice(&stream);
        on_daemon_stack(|| harness::member_core(&data));
    }
}

/// Alice's identity, made once (key generation is slow) and reloaded for each member.
fn alice() -> Identity {
    use std::sync::OnceLock;
    static PEM: OnceLock<String> = OnceLock::new();
    let pem = PEM.get_or_init(|| {
        let id = Identity::generate(&mut rand::thread_rng(), 2048).unwrap();
        id.to_pem().unwrap().to_string()
    });
    Identity::from_pem(pem).unwrap()
}

// ---------------------------------------------------------------------------------------------
// The fuzz corpus, run as a test

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The seed corpus: every sample, as the input of each target that takes it.
fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut framed_all = Vec::new();
    for (name, payload) in samples() {
        let target = name.split('-').next().unwrap();
        let mut framed = Vec::new();
        frame::encode(&payload, &mut framed).unwrap();
        framed_all.extend_from_slice(&framed);
        out.push(("frame", format!("seed-{name}"), framed.clone()));
        match target {
            "to_relay" => {
                for mode in [0u8, 1] {
                    let mut d = vec![mode];
                    d.extend_from_slice(&framed);
                    out.push(("relay_core", format!("seed-{mode}-{name}"), d));
                }
            }
            "from_relay" => {
                for state in 0u8..4 {
                    let mut d = vec![state];
                    d.extend_from_slice(&framed);
                    out.push(("member_core", format!("seed-{state}-{name}"), d));
                }
            }
            _ => {}
        }
        out.push((target, format!("seed-{name}"), payload));
    }
    out.push(("frame", "seed-all".into(), framed_all));
    out.push((
        "frame",
        "seed-over-cap".into(),
        u32::MAX.to_be_bytes().to_vec(),
    ));
    out
}

/// Every file under `fuzz/corpus/<target>/` and `fuzz/artifacts/<target>/` through the target's
/// checks. With `CHATD_WRITE_FUZZ_CORPUS=1`, (re)writes the seeds first.
#[test]
fn fuzz_corpus_replays_clean() {
    let seeds = seeds();
    if std::env::var_os("CHATD_WRITE_FUZZ_CORPUS").is_some() {
        for (target, name, bytes) in &seeds {
            let dir = fuzz_dir().join("corpus").join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
    type Check = fn(&[u8]);
    let targets: [(&str, Check); 7] = [
        ("frame", harness::frame),
        ("to_relay", harness::to_relay),
        ("from_relay", harness::from_relay),
        ("control_request", harness::control_request),
        ("control_response", harness::control_response),
        ("relay_core", harness::relay_core),
        ("member_core", harness::member_core),
    ];
    let mut replayed = 0;
    for (target, check) in targets {
        // The seeds themselves, even if the corpus directory is missing.
        for (_, _, bytes) in seeds.iter().filter(|s| s.0 == target) {
            on_daemon_stack(|| check(bytes));
        }
        for kind in ["corpus", "artifacts"] {
            let Ok(dir) = std::fs::read_dir(fuzz_dir().join(kind).join(target)) else {
                continue;
            };
            for entry in dir {
                let path = entry.unwrap().path();
                let bytes = std::fs::read(&path).unwrap();
                eprintln!("replaying {}", path.display());
                on_daemon_stack(|| check(&bytes));
                if !matches!(target, "relay_core" | "member_core") {
                    decode_as_everything(&bytes).unwrap();
                }
                replayed += 1;
            }
        }
    }
    eprintln!("replayed {replayed} corpus files and {} seeds", seeds.len());
}
