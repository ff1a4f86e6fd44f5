//! The two clocks the cores are given, and the daemon's source of both.
//!
//! Timers (keepalives, login and idle timeouts, `--wait` deadlines, retry and reconnect backoff)
//! run on a monotonic clock, so an NTP step or a suspend can neither fire them early nor stall
//! them. Stamps that a person reads or that travel in an envelope (`time_ms`) are wall time. A
//! core is handed both on every call ([`Now`]) and never reads a clock itself, so a test drives
//! it in virtual time. Must never: mix the two (compare a wall stamp with a monotonic deadline).

use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The time of one call into a core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    /// Monotonic milliseconds since an arbitrary origin (the daemon's start): for timers only.
    pub mono: u64,
    /// Milliseconds since the Unix epoch: for stamps only.
    pub wall: u64,
}

impl Now {
    /// A virtual instant for tests, with both clocks at `ms` (tests may move them apart).
    pub fn at(ms: u64) -> Now {
        Now { mono: ms, wall: ms }
    }

    /// `ms` later on both clocks.
    pub fn plus(self, ms: u64) -> Now {
        Now {
            mono: self.mono.saturating_add(ms),
            wall: self.wall.saturating_add(ms),
        }
    }
}

/// The daemon's clocks: the monotonic one counts from its creation.
#[derive(Debug)]
pub struct Clock {
    origin: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

impl Clock {
    /// Start counting now.
    pub fn new() -> Clock {
        Clock {
            origin: Instant::now(),
        }
    }

    /// Both clocks, read now.
    pub fn now(&self) -> Now {
        Now {
            mono: self.mono_ms(),
            wall: wall_ms(),
        }
    }

    /// Monotonic milliseconds since the clock was created.
    pub fn mono_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The instant a monotonic deadline falls at (for the poll timeout).
    pub fn instant_of(&self, mono: u64) -> Instant {
        self.origin + std::time::Duration::from_millis(mono)
    }
}

/// Milliseconds since the Unix epoch (0 if the system clock is before 1970).
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_monotonic_clock_starts_near_zero_and_never_goes_back() {
        let c = Clock::new();
        let a = c.now();
        let b = c.now();
        assert!(a.mono < 60_000, "counts from the clock's creation: {a:?}");
        assert!(b.mono >= a.mono);
        assert!(
            a.wall > 1_600_000_000_000,
            "wall time is epoch milliseconds: {a:?}"
        );
    }
}
