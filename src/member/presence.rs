//! Which presence changes become history records: a relay can toggle a peer online and offline
//! as fast as it can send frames, and every toggle as a record would push the real messages out
//! of `tail -n 10`.
//!
//! Owns [`Presence`]: for each peer, the state last written to the history, a change waiting to
//! settle, and when its last records were written. A change is written only once it has lasted
//! [`SETTLE_MS`] (a flap that is undone sooner writes nothing), and at most [`PER_MINUTE`] records
//! per peer in any minute (a later change waits for room; the latest state is always written in
//! the end). `who` and `status` see presence at once: only the history is coalesced. Must never:
//! touch the store or the link itself (it returns what to record and `Member` writes it), or
//! drop the final state of a peer that stopped changing.

use std::collections::{BTreeMap, VecDeque};

/// How long a presence change must last before it is recorded.
pub const SETTLE_MS: u64 = 2_000;

/// The most presence records per peer in any 60 s.
pub const PER_MINUTE: usize = 4;

const MINUTE_MS: u64 = 60_000;

#[derive(Default)]
struct PeerPresence {
    /// What the history says now (None: nothing recorded since the daemon started).
    recorded: Option<bool>,
    /// A change not recorded yet: the state, when it began (mono), and the wall time to stamp.
    pending: Option<(bool, u64, u64)>,
    /// When (mono) the last records were written, oldest first, at most [`PER_MINUTE`].
    written: VecDeque<u64>,
}

impl PeerPresence {
    /// When the pending change may be recorded, if there is one.
    fn due(&self) -> Option<u64> {
        let (_, since, _) = self.pending?;
        let settled = since.saturating_add(SETTLE_MS);
        let room = match self.written.len() {
            n if n < PER_MINUTE => 0,
            _ => self
                .written
                .front()
                .map_or(0, |t| t.saturating_add(MINUTE_MS)),
        };
        Some(settled.max(room))
    }
}

/// The presence history of every peer.
#[derive(Default)]
pub(super) struct Presence {
    peers: BTreeMap<String, PeerPresence>,
}

impl Presence {
    /// The relay says `user` is `online` now (mono and wall time of the frame).
    pub(super) fn changed(&mut self, user: &str, online: bool, mono: u64, wall: u64) {
        let p = self.peers.entry(user.to_string()).or_default();
        match p.pending {
            // Still the change we wait for: it keeps its start.
            Some((o, _, _)) if o == online => {}
            // Back to what the history says before it settled: a flap, nothing to record.
            _ if p.recorded == Some(online) => p.pending = None,
            _ => p.pending = Some((online, mono, wall)),
        }
    }

    /// The link is gone: changes not settled are unknown now, so they are not recorded.
    pub(super) fn link_down(&mut self) {
        for p in self.peers.values_mut() {
            p.pending = None;
        }
    }

    /// The peer is forgotten: it starts afresh.
    pub(super) fn forget(&mut self, user: &str) {
        self.peers.remove(user);
    }

    /// The earliest instant (mono) at which [`Presence::due`] returns something.
    pub(super) fn next_deadline(&self) -> Option<u64> {
        self.peers.values().filter_map(PeerPresence::due).min()
    }

    /// The changes to record now: `(user, online, wall time of the change)`, in name order.
    pub(super) fn due(&mut self, now: u64) -> Vec<(String, bool, u64)> {
        let mut out = Vec::new();
        for (user, p) in &mut self.peers {
            if p.due().is_some_and(|t| t <= now) {
                if let Some((online, _, wall)) = p.pending.take() {
                    p.recorded = Some(online);
                    if p.written.len() == PER_MINUTE {
                        p.written.pop_front();
                    }
                    p.written.push_back(now);
                    out.push((user.clone(), online, wall));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flap_shorter_than_the_settle_time_records_nothing() {
        let mut p = Presence::default();
        p.changed("bob", true, 0, 0);
        assert_eq!(p.next_deadline(), Some(SETTLE_MS));
        assert!(p.due(SETTLE_MS - 1).is_empty());
        assert_eq!(p.due(SETTLE_MS), [("bob".to_string(), true, 0)]);
        p.changed("bob", false, 10_000, 10);
        p.changed("bob", true, 10_500, 11);
        assert_eq!(p.next_deadline(), None, "back to the recorded state");
        assert!(p.due(20_000).is_empty());
    }

    #[test]
    fn at_most_per_minute_records_and_the_last_state_wins() {
        let mut p = Presence::default();
        let mut t = 0;
        let mut written = Vec::new();
        // A change every 3 s for 10 minutes: each would settle.
        for i in 0..200u64 {
            p.changed("bob", i % 2 == 0, t, t);
            t += 3_000;
            written.extend(p.due(t).into_iter().map(|(_, o, _)| (t, o)));
        }
        for w in written.windows(PER_MINUTE + 1) {
            assert!(w[PER_MINUTE].0 - w[0].0 >= MINUTE_MS, "{w:?}");
        }
        assert!(written.len() < 200 / 4, "{} records", written.len());
        // Quiet from here: the final state (offline, i = 199) is written once room is free.
        while let Some(at) = p.next_deadline() {
            written.extend(p.due(at).into_iter().map(|(_, o, _)| (at, o)));
        }
        assert_eq!(written.last().map(|w| w.1), Some(false));
    }
}
