//! One status view of the daemon, read once and shown two ways: as `chatctl status`'s
//! `StatusView` and as systemd's `STATUS=` line, so the two cannot disagree.
//!
//! Must never: read the database for the `STATUS=` line (it is rebuilt every tick; only the
//! `chatctl status` view counts the outbox, and the caller passes that in).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;

use super::roles::Roles;
use super::systemd::{status_line, MemberStatus};
use crate::crypto::Fingerprint;
use crate::proto::control::StatusView;

/// What the daemon knows about itself apart from its cores.
pub struct Info {
    /// Own identity's fingerprint.
    pub fingerprint: Fingerprint,
    /// The relay listener's address (relay roles only).
    pub listen: Option<SocketAddr>,
    /// When the daemon started.
    pub started: Instant,
    /// The state directory.
    pub state_dir: PathBuf,
}

struct MemberFacts {
    user: String,
    connected: bool,
    error: Option<String>,
    peers_online: usize,
}

/// What of the `STATUS=` line changes while the daemon runs (the rest is fixed at start or by
/// a reload, which sends its own line): cheap to read every turn, unlike the line itself.
#[derive(Debug, PartialEq, Eq)]
pub struct StatusKey {
    relay_online: Option<usize>,
    member: Option<(bool, usize, Option<String>)>,
}

impl StatusKey {
    /// Read it from `roles` now (allocates only while the member has an error to show).
    pub fn of(roles: &Roles) -> StatusKey {
        StatusKey {
            relay_online: roles.relay().map(|r| r.online_count()),
            member: roles.member().map(|m| {
                (
                    m.connected(),
                    m.peers_online(),
                    m.relay_error().map(str::to_string),
                )
            }),
        }
    }
}

/// The daemon's state at one moment.
pub struct Status {
    fingerprint: String,
    roles: Vec<String>,
    uplink: Option<String>,
    relay_key: Option<String>,
    listen: Option<SocketAddr>,
    relay_online: Option<usize>,
    member: Option<MemberFacts>,
    uptime_s: u64,
    state_dir: String,
}

impl Status {
    /// Read the state of `roles` now.
    pub fn of(roles: &Roles, info: &Info) -> Status {
        Status {
            fingerprint: info.fingerprint.to_string(),
            roles: roles.names(),
            uplink: roles.uplink().map(|u| u.addr().to_string()),
            relay_key: roles
                .uplink()
                .and_then(|u| u.relay_key())
                .map(|k| k.to_string()),
            listen: info.listen,
            relay_online: roles.relay().map(|r| r.online_count()),
            member: roles.member().map(|m| MemberFacts {
                user: m.user().to_string(),
                connected: m.connected(),
                error: m.relay_error().map(str::to_string),
                peers_online: m.peers_online(),
            }),
            uptime_s: info.started.elapsed().as_secs(),
            state_dir: info.state_dir.display().to_string(),
        }
    }

    /// What `chatctl status` shows, with the outbox count read by the caller.
    pub fn view(&self, outbox_pending: u64) -> StatusView {
        let m = self.member.as_ref();
        StatusView {
            user: m.map(|m| m.user.clone()),
            fingerprint: self.fingerprint.clone(),
            roles: self.roles.clone(),
            relay: self.uplink.clone(),
            connected: m.is_some_and(|m| m.connected),
            relay_error: m.filter(|m| !m.connected).and_then(|m| m.error.clone()),
            listen: self.listen.map(|a| a.to_string()),
            peers_online: match m {
                Some(m) => m.peers_online as u64,
                None => self.relay_online.unwrap_or(0) as u64,
            },
            outbox_pending,
            uptime_s: self.uptime_s,
            version: crate::VERSION.to_string(),
            state_dir: self.state_dir.clone(),
            relay_fingerprint: self.relay_key.clone(),
        }
    }

    /// The `STATUS=` line.
    pub fn line(&self) -> String {
        let relay = self.relay_online.map(|online| {
            let addr = self
                .listen
                .map(|a| a.to_string())
                .unwrap_or_else(|| "?".into());
            (addr, online)
        });
        let member = self.member.as_ref().map(|m| MemberStatus {
            user: &m.user,
            connected: m.connected,
            relay: self.uplink.as_deref(),
            error: m.error.as_deref(),
            peers_online: m.peers_online,
        });
        status_line(relay, member)
    }
}
