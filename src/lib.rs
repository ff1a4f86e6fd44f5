//! chatd: end-to-end encrypted chat for terminals and scripts.
//!
//! ```text
//!  chatctl ──control socket──▶ chatd (member) ──TCP──▶ chatd (relay) ──TCP──▶ chatd (member)
//!            (Unix, 0600)       keys, history,          routes sealed           opens, stores,
//!                               seals per recipient     envelopes, queues       sends receipts
//! ```
//!
//! The protocol logic lives in sans-I/O cores: [`proto`] (frames, messages and the protocol
//! words as enums), [`crypto`] (keys, sealing), [`relay`] (registrations, presence, routing,
//! queues) and [`member`] (handshake, outbox, sessions, trust). They take frames and the time in
//! ([`clock::Now`]: a monotonic clock for timers, the wall clock for stamps; the relay, which
//! stamps nothing, gets the monotonic one alone) and give frames, store writes and events out;
//! they never touch a socket or read a clock. The relay and member
//! cores write through the narrow traits [`store::RelayStore`] and [`store::MemberStore`], which
//! the SQLite [`store::Store`] implements. [`host`] links a relay core and member cores in memory
//! (a host's own member, the bench, the fuzz targets, the deterministic core test). [`daemon`] is
//! the mio loop that moves bytes between sockets and the cores, one store transaction per turn,
//! sleeping until the cores' next deadline. [`config`] defines each setting once. [`client`] is
//! the blocking control-socket client that [`cli`] (chatctl) is built on.
//!
//! `docs/ARCHITECTURE.md` describes the house in full: each module, what it owns and must never
//! do, the import graph, the turn and its transaction, and how a message flows from socket to
//! store to socket.
#![deny(missing_docs)]

pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod daemon;
pub mod host;
pub mod idhash;
pub mod member;
pub mod progress;
pub mod proto;
pub mod relay;
pub mod store;

/// The version printed by `status` and `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
