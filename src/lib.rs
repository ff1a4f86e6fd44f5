//! chatd: end-to-end encrypted chat for terminals and scripts.
//!
//! ```text
//!  chatctl ──control socket──▶ chatd (member) ──TCP──▶ chatd (relay) ──TCP──▶ chatd (member)
//!            (Unix, 0600)       keys, history,          routes sealed           opens, stores,
//!                               seals per recipient     envelopes, queues       sends receipts
//! ```
//!
//! The protocol logic lives in sans-I/O cores: [`proto`] (frames and messages), [`crypto`]
//! (keys, sealing), [`relay`] (registrations, presence, routing, queues) and [`member`]
//! (handshake, outbox, sessions, trust). They take frames and clock ticks in and give frames,
//! store writes and events out; they never touch a socket. [`store`] is the one persistence
//! interface (SQLite). [`host`] links a relay core and member cores in memory (a host's own
//! member, the bench, the fuzz targets). [`daemon`] is the mio loop that moves bytes between
//! sockets and the cores. [`client`] is the blocking control-socket client that [`cli`] (chatctl) is built on.
#![deny(missing_docs)]

pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod daemon;
pub mod host;
pub mod member;
pub mod progress;
pub mod proto;
pub mod relay;
pub mod store;

/// The version printed by `status` and `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
