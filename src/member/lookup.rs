//! Keys on demand: what the member has asked the relay and not heard back yet.
//!
//! Owns [`Lookups`]: the names asked for by `Lookup` (a send to a name with no pin, a message
//! from a sender with no pin), the names the relay said are not bound (until the requests parked
//! on them have been answered), and the `List` pages in flight for `who --all`. Must never: pin a
//! key itself (the member does, through `Peers::observe`, and only for names it asked for or
//! already knows), or let the sets grow without bound (every name in them came from a local
//! request or a delivered envelope, and they are emptied when the link goes down).

use std::collections::{BTreeSet, VecDeque};

/// Names asked for and not answered at once, at most: a relay that never answers (and keeps
/// delivering envelopes from new names) cannot grow the member through this set.
pub(super) const MAX_PENDING_LOOKUPS: usize = 1024;

/// Names asked for and not answered, names known to be missing, listings in flight.
#[derive(Default)]
pub(super) struct Lookups {
    asked: BTreeSet<String>,
    missing: BTreeSet<String>,
    listings: VecDeque<u64>,
}

impl Lookups {
    /// Whether `user` needs a `Lookup` now (it was not asked for already, and fewer than
    /// [`MAX_PENDING_LOOKUPS`] are); marks it asked.
    pub(super) fn ask(&mut self, user: &str) -> bool {
        self.missing.remove(user);
        if self.asked.len() >= MAX_PENDING_LOOKUPS {
            return false;
        }
        self.asked.insert(user.to_string())
    }

    /// The relay answered for `user`; true if we had asked.
    pub(super) fn answered(&mut self, user: &str) -> bool {
        self.asked.remove(user)
    }

    /// The relay said `user` is not bound (an answer to our question).
    pub(super) fn not_bound(&mut self, user: &str) -> bool {
        if self.asked.remove(user) {
            self.missing.insert(user.to_string());
            true
        } else {
            false
        }
    }

    /// The relay said `user` is not bound, and no answer since.
    pub(super) fn is_missing(&self, user: &str) -> bool {
        self.missing.contains(user)
    }

    /// Whether `user` was asked for and not answered yet.
    pub(super) fn pending(&self, user: &str) -> bool {
        self.asked.contains(user)
    }

    /// The requests parked on missing names have had their answer.
    pub(super) fn clear_missing(&mut self) {
        self.missing.clear();
    }

    /// A `List` for request `req` went out.
    pub(super) fn listing(&mut self, req: u64) {
        self.listings.push_back(req);
    }

    /// The request the next `Listing` answers (the relay answers in order).
    pub(super) fn listed(&mut self) -> Option<u64> {
        self.listings.pop_front()
    }

    /// The link went down: nothing asked will be answered. Returns whether anything was
    /// asked, and the listings cut short.
    pub(super) fn reset(&mut self) -> (bool, Vec<u64>) {
        let asked = !self.asked.is_empty();
        self.asked.clear();
        self.missing.clear();
        (asked, self.listings.drain(..).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_in_flight_are_bounded_and_answers_clear_them() {
        let mut l = Lookups::default();
        for i in 0..MAX_PENDING_LOOKUPS {
            assert!(l.ask(&format!("u{i}")));
        }
        assert!(!l.ask("one-more"), "at the bound nothing more is asked");
        assert!(!l.pending("one-more"));
        assert!(!l.ask("u0"), "asked already");
        assert!(l.answered("u0"));
        assert!(l.ask("one-more"), "an answer makes room");
        assert!(l.not_bound("u1"));
        assert!(l.is_missing("u1"));
        l.clear_missing();
        assert!(!l.is_missing("u1"));
        l.listing(7);
        let (asked, listings) = l.reset();
        assert!(asked);
        assert_eq!(listings, [7]);
        assert!(!l.pending("u2"));
    }
}
