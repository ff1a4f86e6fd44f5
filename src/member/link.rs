//! The link to the relay as a state machine named for what it expects next, each state holding
//! the timers that belong to it: the login deadline while logging in, the keepalive and silence
//! timers once established.
//!
//! Owns [`Link`]. A transition consumes the old state and returns the new one, so a timer cannot
//! outlive its state. Must never: send, log or touch the store (it answers "what is due" and
//! `Member` acts), or keep a timer across `Down` (a new connection starts every timer afresh).

use crate::proto::relay::FromRelay;

/// Send a `Ping` when nothing was sent for this long.
pub(super) const PING_AFTER_MS: u64 = 30_000;
/// Give up on a relay that has said nothing for this long (it pongs every ping).
pub(super) const SILENT_RELAY_MS: u64 = 90_000;
/// Give up on a login that has not completed in this long.
pub(super) const LOGIN_TIMEOUT_MS: u64 = 15_000;

/// Logging in (`ExpectChallenge` or `ExpectWelcome`).
#[derive(Debug)]
pub(super) struct Login {
    /// When the connection came up: the login must complete within [`LOGIN_TIMEOUT_MS`].
    since: u64,
    /// When we last sent a frame; carried into [`Live`], as the keepalive counts from the last
    /// frame sent, whichever state sent it.
    last_tx: u64,
}

impl Login {
    /// `Login` sent: from `ExpectChallenge` to `ExpectWelcome`, same deadline.
    pub(super) fn login_sent(self, now: u64) -> Login {
        Login {
            since: self.since,
            last_tx: now,
        }
    }

    /// `Welcome` received at `now`: logged in.
    pub(super) fn welcomed(self, now: u64) -> Live {
        Live {
            last_rx: now,
            last_tx: self.last_tx,
        }
    }
}

/// Logged in.
#[derive(Debug)]
pub(super) struct Live {
    /// When the relay last said anything: silence past [`SILENT_RELAY_MS`] ends the link.
    last_rx: u64,
    /// When we last sent anything: quiet past [`PING_AFTER_MS`] sends a ping.
    last_tx: u64,
}

/// The state of the link to the relay, named for what it expects next.
#[derive(Debug, Default)]
pub(super) enum Link {
    /// No connection.
    #[default]
    Down,
    /// Connected; waiting for the relay's `Challenge`.
    ExpectChallenge(Login),
    /// `Login` sent; waiting for `Welcome`.
    ExpectWelcome(Login),
    /// Logged in.
    Established(Live),
}

/// A timer that fired.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Due {
    /// Nothing sent for [`PING_AFTER_MS`]: send a ping.
    Ping,
    /// Nothing heard for [`SILENT_RELAY_MS`]: close.
    Silent,
    /// The login took longer than [`LOGIN_TIMEOUT_MS`]: close.
    LoginLate,
}

impl Link {
    /// A connection is open at `now`; expect the challenge.
    pub(super) fn up(now: u64) -> Link {
        Link::ExpectChallenge(Login {
            since: now,
            last_tx: now,
        })
    }

    /// Leave the state in place of `Down`, to move it into a transition.
    pub(super) fn take(&mut self) -> Link {
        std::mem::take(self)
    }

    /// The relay said something at `now`.
    pub(super) fn heard(&mut self, now: u64) {
        if let Link::Established(live) = self {
            live.last_rx = now;
        }
    }

    /// We sent a frame at `now`.
    pub(super) fn sent(&mut self, now: u64) {
        match self {
            Link::Down => {}
            Link::ExpectChallenge(login) | Link::ExpectWelcome(login) => login.last_tx = now,
            Link::Established(live) => live.last_tx = now,
        }
    }

    /// Logged in.
    pub(super) fn established(&self) -> bool {
        matches!(self, Link::Established(_))
    }

    /// The timer of this state that is due at `now`, if any.
    pub(super) fn due(&self, now: u64) -> Option<Due> {
        match self {
            Link::Down => None,
            Link::ExpectChallenge(login) | Link::ExpectWelcome(login) => {
                (now.saturating_sub(login.since) > LOGIN_TIMEOUT_MS).then_some(Due::LoginLate)
            }
            Link::Established(live) => {
                if now.saturating_sub(live.last_rx) > SILENT_RELAY_MS {
                    Some(Due::Silent)
                } else if now.saturating_sub(live.last_tx) > PING_AFTER_MS {
                    Some(Due::Ping)
                } else {
                    None
                }
            }
        }
    }

    /// The first instant (monotonic ms) at which [`Link::due`] answers something, if any.
    pub(super) fn deadline(&self) -> Option<u64> {
        match self {
            Link::Down => None,
            Link::ExpectChallenge(login) | Link::ExpectWelcome(login) => {
                Some(login.since.saturating_add(LOGIN_TIMEOUT_MS + 1))
            }
            Link::Established(live) => Some(
                live.last_rx
                    .saturating_add(SILENT_RELAY_MS + 1)
                    .min(live.last_tx.saturating_add(PING_AFTER_MS + 1)),
            ),
        }
    }

    /// The state's name, for the log.
    pub(super) fn name(&self) -> &'static str {
        match self {
            Link::Down => "Down",
            Link::ExpectChallenge(_) => "ExpectChallenge",
            Link::ExpectWelcome(_) => "ExpectWelcome",
            Link::Established(_) => "Established",
        }
    }
}

/// A message's name, for the log.
pub(super) fn msg_name(m: &FromRelay) -> &'static str {
    match m {
        FromRelay::Challenge { .. } => "Challenge",
        FromRelay::Welcome { .. } => "Welcome",
        FromRelay::Directory(_) => "Directory",
        FromRelay::Keys { .. } => "Keys",
        FromRelay::Listing { .. } => "Listing",
        FromRelay::Presence(_) => "Presence",
        FromRelay::Deliver(_) => "Deliver",
        FromRelay::Accepted(_) => "Accepted",
        FromRelay::Refused { .. } => "Refused",
        FromRelay::Pong => "Pong",
        FromRelay::Error { .. } => "Error",
    }
}
