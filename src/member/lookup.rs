//! Keys on demand: what the member has asked the relay and not heard back yet.
//!
//! Owns [`Lookups`]: the names asked for by `Lookup` (a send to a name with no pin, a message
//! from a sender with no pin) with when they were asked, the names the relay said are not bound
//! (until the requests parked on them have been answered), the contact lookups of a login still
//! to send, and the `List` pages in flight for `who --all`. Must never: pin a key itself (the
//! member does, through `Peers::observe`, and only for names it asked for or already knows), or
//! let the sets grow without bound (every name in them came from a local request or a delivered
//! envelope, an unanswered one expires, and they are emptied when the link goes down).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Names asked for and not answered at once, at most: a relay that never answers (and keeps
/// delivering envelopes from new names) cannot grow the member through this set.
pub(super) const MAX_PENDING_LOOKUPS: usize = 1024;

/// A lookup or a directory page the relay has not answered in this long is given up: a send
/// parked on it fails (the daemon's `LOOKUP_TIMEOUT_MS` is the same), and the name may be asked
/// again.
pub const LOOKUP_TIMEOUT_MS: u64 = 10_000;

/// Contact `Lookup` frames of a login in flight at once: the rest go as answers come, so a
/// member with many contacts never has the relay queue more than two `Keys` answers for it
/// (each up to 512 keys, about 600 KB with 8192-bit keys), on top of its deliveries.
pub(super) const LOGIN_LOOKUPS_IN_FLIGHT: usize = 2;

/// What [`Lookups::ask`] decided.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Ask {
    /// Send a `Lookup` for the name now.
    Send,
    /// Already asked and not answered yet.
    Pending,
    /// [`MAX_PENDING_LOOKUPS`] are in flight: nothing more is asked until some are answered or
    /// expire.
    Full,
}

/// Names asked for and not answered, names known to be missing, listings in flight.
#[derive(Default)]
pub(super) struct Lookups {
    /// Name, and when it was asked (monotonic ms).
    asked: BTreeMap<String, u64>,
    missing: BTreeSet<String>,
    /// Contact lookups of this login not sent yet.
    login: VecDeque<Vec<String>>,
    /// `Lookup` frames of this login sent and not answered.
    login_in_flight: usize,
    /// Listings in flight: the daemon's request number and the name the page must start after.
    listings: VecDeque<(u64, String)>,
}

impl Lookups {
    /// Whether `user` needs a `Lookup` now; if so, marks it asked at `now`.
    pub(super) fn ask(&mut self, user: &str, now: u64) -> Ask {
        self.missing.remove(user);
        match self.asked.get(user) {
            Some(at) if now.saturating_sub(*at) < LOOKUP_TIMEOUT_MS => return Ask::Pending,
            Some(_) => {}
            None => {
                if self.asked.len() >= MAX_PENDING_LOOKUPS {
                    self.asked
                        .retain(|_, at| now.saturating_sub(*at) < LOOKUP_TIMEOUT_MS);
                }
                if self.asked.len() >= MAX_PENDING_LOOKUPS {
                    return Ask::Full;
                }
            }
        }
        self.asked.insert(user.to_string(), now);
        Ask::Send
    }

    /// The relay answered for `user`; true if we had asked.
    pub(super) fn answered(&mut self, user: &str) -> bool {
        self.asked.remove(user).is_some()
    }

    /// The relay said `user` is not bound (an answer to our question).
    pub(super) fn not_bound(&mut self, user: &str) -> bool {
        if self.asked.remove(user).is_some() {
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

    /// The requests parked on missing names have had their answer.
    pub(super) fn clear_missing(&mut self) {
        self.missing.clear();
    }

    /// A login's contact lookups, in chunks: the first ones to send now.
    pub(super) fn start_login(&mut self, chunks: Vec<Vec<String>>) -> Vec<Vec<String>> {
        self.login = chunks.into();
        self.login_in_flight = 0;
        let mut now = Vec::new();
        while self.login_in_flight < LOGIN_LOOKUPS_IN_FLIGHT {
            let Some(c) = self.login.pop_front() else {
                break;
            };
            self.login_in_flight += 1;
            now.push(c);
        }
        now
    }

    /// A `Keys` answer came: the next contact chunk of the login to send, if any. (Answers come
    /// in order, so the first answers after a login are the login's.)
    pub(super) fn next_login_chunk(&mut self) -> Option<Vec<String>> {
        if self.login_in_flight == 0 {
            return None;
        }
        self.login_in_flight -= 1;
        let next = self.login.pop_front()?;
        self.login_in_flight += 1;
        Some(next)
    }

    /// A `List` for request `req`, asking for the names after `after`, went out.
    pub(super) fn listing(&mut self, req: u64, after: &str) {
        self.listings.push_back((req, after.to_string()));
    }

    /// The request the next `Listing` answers (the relay answers in order), with its `after`.
    pub(super) fn listed(&mut self) -> Option<(u64, String)> {
        self.listings.pop_front()
    }

    /// The link went down: nothing asked will be answered. Returns whether anything was
    /// asked, and the listings cut short.
    pub(super) fn reset(&mut self) -> (bool, Vec<u64>) {
        let asked = !self.asked.is_empty();
        self.asked.clear();
        self.missing.clear();
        self.login.clear();
        self.login_in_flight = 0;
        (asked, self.listings.drain(..).map(|(r, _)| r).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_in_flight_are_bounded_expire_and_answers_clear_them() {
        let mut l = Lookups::default();
        for i in 0..MAX_PENDING_LOOKUPS {
            assert_eq!(l.ask(&format!("u{i}"), 0), Ask::Send);
        }
        assert_eq!(
            l.ask("one-more", 1),
            Ask::Full,
            "at the bound nothing more is asked"
        );
        assert_eq!(l.ask("u0", 1), Ask::Pending, "asked already");
        assert!(l.answered("u0"));
        assert_eq!(l.ask("one-more", 1), Ask::Send, "an answer makes room");
        assert!(l.not_bound("u1"));
        assert!(l.is_missing("u1"));
        l.clear_missing();
        assert!(!l.is_missing("u1"));
        // Unanswered for LOOKUP_TIMEOUT_MS: asked again, and the stale ones make room.
        assert_eq!(l.ask("u2", LOOKUP_TIMEOUT_MS), Ask::Send);
        assert_eq!(l.ask("fresh", LOOKUP_TIMEOUT_MS), Ask::Send);
        l.listing(7, "");
        let (asked, listings) = l.reset();
        assert!(asked);
        assert_eq!(listings, [7]);
        assert_eq!(l.ask("u3", LOOKUP_TIMEOUT_MS), Ask::Send);
    }

    #[test]
    fn a_login_keeps_two_contact_lookups_in_flight() {
        let mut l = Lookups::default();
        let chunks: Vec<Vec<String>> = (0..5).map(|i| vec![format!("c{i}")]).collect();
        let mut outstanding = l.start_login(chunks).len();
        assert_eq!(outstanding, LOGIN_LOOKUPS_IN_FLIGHT);
        let mut sent = outstanding;
        for _answer in 0..5 {
            outstanding -= 1;
            if l.next_login_chunk().is_some() {
                sent += 1;
                outstanding += 1;
            }
            assert!(outstanding <= LOGIN_LOOKUPS_IN_FLIGHT);
        }
        assert_eq!((sent, outstanding), (5, 0));
        assert!(l.next_login_chunk().is_none());
    }
}
