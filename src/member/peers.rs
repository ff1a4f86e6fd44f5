//! The peers the member knows: the pinned key of each (trust on first use), whether it was
//! confirmed by `chatctl trust`, a different key the relay presents now, and who is online.
//!
//! Owns [`Peers`]. Every change goes through a narrow method that says what changed
//! ([`Observed`], [`Trusted`]); the caller logs it and saves the [`Pin`]. Must never: touch the
//! store or log on its own (so one caller decides what is durable and what the operator reads),
//! replace a pinned key except through [`Peers::trust`], or let a changed key count as trusted.

use std::collections::BTreeMap;

use log::warn;

use super::error::MemberError;
use crate::crypto::{CryptoError, Fingerprint, PublicKey};
use crate::proto::control::{PeerView, TrustState};
use crate::proto::relay::Peer;
use crate::proto::valid_user;
use crate::store::{Pin, PinTrust as Trust};

/// The word `who` shows for a pin's own trust (a presented key overrides it with `changed`).
fn trust_state(t: Trust) -> TrustState {
    match t {
        Trust::Pinned => TrustState::Pinned,
        Trust::Trusted => TrustState::Trusted,
    }
}

struct PeerState {
    pinned: PublicKey,
    trust: Trust,
    /// The last different key the relay presented; while set, the peer is `changed`. Sticky:
    /// only [`Peers::trust`] (or forgetting the peer) clears it, so a relay that presents the
    /// pinned key again cannot erase the warning.
    presented: Option<PublicKey>,
    /// The relay's latest entry showed the pinned key (not `presented`). Not stored: after a
    /// restart the relay introduces the peer again, and until then we assume the worse.
    shows_pinned: bool,
    /// The return of the pinned key during this warning is already recorded: a relay that
    /// flips between two keys adds no record per flip.
    return_noted: bool,
    online: bool,
}

/// Pins one member keeps at most. A relay introduces names (in `Welcome`, `Directory` and a
/// room's `Presence`), and each pin is looked up at every login: this bounds what a relay can
/// make a member hold and ask, far above any real contact list.
pub(super) const MAX_PINS: usize = 100_000;

/// What [`Peers::observe`] made of a directory entry.
#[derive(Debug)]
pub(super) enum Observed {
    /// Ourselves, or a name no relay may bind: not a peer.
    Ignored,
    /// A new name, not pinned: the member holds [`MAX_PINS`] already.
    Full,
    /// The relay presented a key that does not parse.
    Unusable(CryptoError),
    /// A new peer, now pinned to this key.
    FirstSight(Fingerprint),
    /// The relay presents the pinned key again after presenting another; the peer stays
    /// `changed` until `trust`.
    Returned {
        /// The pinned key, presented again.
        pinned: Fingerprint,
        /// The other key it presented before, still the warning.
        presented: Fingerprint,
    },
    /// The relay presents a key other than the pinned one (and other than the last such).
    Changed {
        /// The pinned key.
        pinned: Fingerprint,
        /// The key the relay presents now.
        presented: Fingerprint,
    },
    /// Nothing changed but maybe the online flag.
    Same,
}

impl Observed {
    /// The pin changed and must be saved.
    pub(super) fn changed(&self) -> bool {
        matches!(self, Observed::FirstSight(_) | Observed::Changed { .. })
    }

    /// The peer just became someone we accept messages from (first sight; a change is undone
    /// only by `trust`), so what we held from them can be judged again.
    pub(super) fn acceptable(&self) -> bool {
        matches!(self, Observed::FirstSight(_))
    }
}

/// What [`Peers::trust`] did.
#[derive(Debug)]
pub(super) enum Trusted {
    /// The presented key replaced the pinned one (given here); `Some` while the relay presents
    /// the replaced key, which is then the peer's new warning.
    NewKey {
        /// The pin it replaced.
        old: Fingerprint,
        /// The relay presents the replaced key now, so the peer is `changed` again.
        still: bool,
    },
    /// The pinned key is confirmed; `Some` while the relay still presents another key.
    Pinned(Option<Fingerprint>),
}

/// How a message's sender stands with us.
pub(super) enum Sender<'a> {
    /// The relay has not introduced them.
    Unknown,
    /// Their key changed and is not trusted yet.
    Changed {
        /// The pinned key.
        pinned: Fingerprint,
        /// The key the relay presents now.
        presented: Fingerprint,
    },
    /// Their pinned key, which must have signed anything we accept from them.
    Pinned(&'a PublicKey),
}

/// Pins, trust, presented keys and presence of every peer, by name.
pub(super) struct Peers {
    map: BTreeMap<String, PeerState>,
}

impl Peers {
    /// From the stored pins; everyone starts offline. An unreadable pin is skipped (and said),
    /// so the peer is pinned afresh on next sight rather than the member failing to start.
    pub(super) fn from_pins(pins: Vec<Pin>) -> Peers {
        let mut map = BTreeMap::new();
        for pin in pins {
            let Ok(pinned) = PublicKey::from_der(&pin.key) else {
                warn!("ignoring unreadable pin for {}", pin.user);
                continue;
            };
            let presented = pin.presented.and_then(|d| PublicKey::from_der(&d).ok());
            let trust = pin.trust;
            map.insert(
                pin.user,
                PeerState {
                    pinned,
                    trust,
                    presented,
                    shows_pinned: false,
                    return_noted: false,
                    online: false,
                },
            );
        }
        Peers { map }
    }

    /// What to store for `user`.
    pub(super) fn pin(&self, user: &str) -> Option<Pin> {
        let st = self.map.get(user)?;
        Some(Pin {
            user: user.to_string(),
            key: st.pinned.der().to_vec(),
            trust: st.trust,
            presented: st.presented.as_ref().map(|k| k.der().to_vec()),
        })
    }

    /// Take note of a directory entry: pin on first sight (TOFU), flag a changed key, follow
    /// presence. `own` is our user name, never a peer.
    pub(super) fn observe(&mut self, own: &str, p: &Peer) -> Observed {
        if p.user == own || !valid_user(&p.user) {
            return Observed::Ignored;
        }
        let key = match PublicKey::from_der(&p.key) {
            Ok(k) => k,
            Err(e) => return Observed::Unusable(e),
        };
        let Some(st) = self.map.get_mut(&p.user) else {
            if self.map.len() >= MAX_PINS {
                return Observed::Full;
            }
            let fingerprint = key.fingerprint();
            self.map.insert(
                p.user.clone(),
                PeerState {
                    pinned: key,
                    trust: Trust::Pinned,
                    presented: None,
                    shows_pinned: true,
                    return_noted: false,
                    online: p.online,
                },
            );
            return Observed::FirstSight(fingerprint);
        };
        st.online = p.online;
        st.shows_pinned = st.pinned == key;
        if st.pinned == key {
            match &st.presented {
                // The warning stays: only the first return after a change is news.
                Some(presented) if !std::mem::replace(&mut st.return_noted, true) => {
                    Observed::Returned {
                        pinned: st.pinned.fingerprint(),
                        presented: presented.fingerprint(),
                    }
                }
                _ => Observed::Same,
            }
        } else if st.presented.as_ref() != Some(&key) {
            let pinned = st.pinned.fingerprint();
            let presented = key.fingerprint();
            st.presented = Some(key);
            st.return_noted = false;
            Observed::Changed { pinned, presented }
        } else {
            // The same other key again (after a return, or a repeat): already the warning.
            Observed::Same
        }
    }

    /// Accept `user`'s presented key (after a change) or re-confirm the pinned one, if `given`
    /// is one of them.
    pub(super) fn trust(&mut self, user: &str, given: Fingerprint) -> Result<Trusted, MemberError> {
        let st = self
            .map
            .get_mut(user)
            .ok_or_else(|| MemberError::UnknownUser(user.into()))?;
        if st.presented.as_ref().map(|k| k.fingerprint()) == Some(given) {
            let old = st.pinned.fingerprint();
            if let Some(k) = st.presented.take() {
                let replaced = std::mem::replace(&mut st.pinned, k);
                // The relay shows the key just replaced: that is now the other key.
                st.return_noted = false;
                if st.shows_pinned {
                    st.presented = Some(replaced);
                    st.shows_pinned = false;
                } else {
                    st.shows_pinned = true;
                }
            }
            st.trust = Trust::Trusted;
            Ok(Trusted::NewKey {
                old,
                still: st.presented.is_some(),
            })
        } else if st.pinned.fingerprint() == given {
            st.trust = Trust::Trusted;
            // Re-confirming the pinned key clears the warning once the relay shows it again;
            // while the relay still presents the other key, the peer stays `changed`.
            if st.shows_pinned {
                st.presented = None;
            }
            Ok(Trusted::Pinned(
                st.presented.as_ref().map(|p| p.fingerprint()),
            ))
        } else {
            let current = st.presented.as_ref().unwrap_or(&st.pinned).fingerprint();
            Err(MemberError::FingerprintMismatch {
                user: user.into(),
                given,
                current,
            })
        }
    }

    /// Drop `user`'s pin entirely (`chatctl forget`); the next sight pins afresh. The pinned
    /// fingerprint, if there was one.
    pub(super) fn forget(&mut self, user: &str) -> Option<Fingerprint> {
        self.map.remove(user).map(|st| st.pinned.fingerprint())
    }

    /// The link is gone: nobody is online as far as we know.
    pub(super) fn all_offline(&mut self) {
        for p in self.map.values_mut() {
            p.online = false;
        }
    }

    /// Names of the peers online now, in name order.
    pub(super) fn online_users(&self) -> impl Iterator<Item = &str> {
        self.map
            .iter()
            .filter(|(_, p)| p.online)
            .map(|(u, _)| u.as_str())
    }

    /// Known peers online now.
    pub(super) fn online_count(&self) -> usize {
        self.map.values().filter(|p| p.online).count()
    }

    /// The relay introduced `user` at some point.
    pub(super) fn knows(&self, user: &str) -> bool {
        self.map.contains_key(user)
    }

    /// How `user` stands: unknown, changed, or pinned to a key.
    pub(super) fn sender(&self, user: &str) -> Sender<'_> {
        match self.map.get(user) {
            None => Sender::Unknown,
            Some(PeerState {
                pinned,
                presented: Some(p),
                ..
            }) => Sender::Changed {
                pinned: pinned.fingerprint(),
                presented: p.fingerprint(),
            },
            Some(st) => Sender::Pinned(&st.pinned),
        }
    }

    /// The key to seal to for `user`, changed or not (the caller checks [`Peers::sender`]).
    pub(super) fn pinned_key(&self, user: &str) -> Option<&PublicKey> {
        self.map.get(user).map(|p| &p.pinned)
    }

    /// A peer's pinned fingerprint.
    pub(super) fn pinned(&self, user: &str) -> Option<Fingerprint> {
        self.pinned_key(user).map(|k| k.fingerprint())
    }

    /// The contacts as `who` shows them.
    pub(super) fn who(&self) -> Vec<PeerView> {
        self.map.iter().map(|(user, st)| view(user, st)).collect()
    }

    /// One contact as `who` shows it.
    pub(super) fn view(&self, user: &str) -> Option<PeerView> {
        self.map.get(user).map(|st| view(user, st))
    }

    /// The names of every contact (pinned peer), in name order.
    pub(super) fn names(&self) -> Vec<String> {
        self.map.keys().cloned().collect()
    }
}

fn view(user: &str, st: &PeerState) -> PeerView {
    PeerView {
        user: user.to_string(),
        online: st.online,
        trust: if st.presented.is_some() {
            TrustState::Changed
        } else {
            trust_state(st.trust)
        },
        fingerprint: st.pinned.fingerprint().to_string(),
        presented: st.presented.as_ref().map(|k| k.fingerprint().to_string()),
    }
}
