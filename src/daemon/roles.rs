//! Which cores this daemon runs: a relay, a member with its uplink to a remote relay, or a host
//! (a relay and a member joined by an in-memory [`Link`]). One enum, so no code has to ask
//! "relay and member both present?" of two options.
//!
//! Must never: do I/O of its own (the uplink's socket is driven by the loop), or hold anything
//! the cores would not lose in a restart besides the uplink's backoff.

use super::uplink::Uplink;
use crate::host::Link;
use crate::member::Member;
use crate::relay::Relay;

/// The daemon's roles and their cores.
// One value per daemon, built once and never moved on a hot path: boxing a core would buy
// nothing but an indirection on every call.
#[allow(clippy::large_enum_variant)]
pub enum Roles {
    /// Routes and queues for remote members.
    Relay(Relay),
    /// A member connected to a remote relay over TCP.
    Member {
        /// The member core.
        member: Member,
        /// Its connection to the relay.
        uplink: Uplink,
    },
    /// A relay with its own member attached in memory.
    Host {
        /// The relay core.
        relay: Relay,
        /// The member core.
        member: Member,
        /// The in-memory link between them.
        link: Link,
    },
}

impl Roles {
    /// The relay core, if this daemon is one.
    pub fn relay(&self) -> Option<&Relay> {
        match self {
            Roles::Relay(r) | Roles::Host { relay: r, .. } => Some(r),
            Roles::Member { .. } => None,
        }
    }

    /// The relay core, if this daemon is one.
    pub fn relay_mut(&mut self) -> Option<&mut Relay> {
        match self {
            Roles::Relay(r) | Roles::Host { relay: r, .. } => Some(r),
            Roles::Member { .. } => None,
        }
    }

    /// The member core, if this daemon is one.
    pub fn member(&self) -> Option<&Member> {
        match self {
            Roles::Member { member, .. } | Roles::Host { member, .. } => Some(member),
            Roles::Relay(_) => None,
        }
    }

    /// The member core, if this daemon is one.
    pub fn member_mut(&mut self) -> Option<&mut Member> {
        match self {
            Roles::Member { member, .. } | Roles::Host { member, .. } => Some(member),
            Roles::Relay(_) => None,
        }
    }

    /// The uplink to a remote relay (members only; a host's member is linked in memory).
    pub fn uplink(&self) -> Option<&Uplink> {
        match self {
            Roles::Member { uplink, .. } => Some(uplink),
            _ => None,
        }
    }

    /// `relay`, `member`, or both, as `status` and the start-up line show them.
    pub fn names(&self) -> Vec<String> {
        let names: &[&str] = match self {
            Roles::Relay(_) => &["relay"],
            Roles::Member { .. } => &["member"],
            Roles::Host { .. } => &["relay", "member"],
        };
        names.iter().map(|n| n.to_string()).collect()
    }
}
