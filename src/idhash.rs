//! Hash maps keyed by numbers this process hands out itself: the relay core's connection ids
//! ([`crate::relay::ConnId`]) and the daemon's poll tokens.
//!
//! The standard maps hash with SipHash-1-3, a keyed function that keeps a client who chooses
//! keys from making them collide. Nobody but the daemon chooses these numbers (it counts them
//! up), so that protection buys nothing here, and on the relay's message path SipHash was the
//! largest single cost after TLS: about a fifth of the relay's instructions per message, most
//! of it on these keys (callgrind, `cargo bench --bench relay`). [`IdHasher`] is one multiply
//! per key (FxHash's step), which spreads counted numbers over the buckets as well.
//!
//! Must never: key a map whose keys a peer, a relay or a control client can choose (names,
//! message ids, item keys): those keep the standard, keyed hasher (docs/DECISIONS.md, "The
//! relay's maps keep SipHash").

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// FxHash's multiplier: odd, with its bits spread, so consecutive numbers land far apart in
/// the high bits (hashbrown's tag) and stay distinct in the low ones (its bucket index).
const K: u64 = 0x517c_c1b7_2722_0a95;

/// A hasher for numbers the process counts out itself; see the module docs.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.add(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
}

impl IdHasher {
    fn add(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(K);
    }
}

/// A map keyed by a number the process hands out.
pub type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;
/// A set of numbers the process hands out.
pub type IdSet<K> = HashSet<K, BuildHasherDefault<IdHasher>>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::{BuildHasher, Hash};

    fn hash<T: Hash>(t: T) -> u64 {
        BuildHasherDefault::<IdHasher>::default().hash_one(t)
    }

    #[test]
    fn counted_ids_differ_in_the_bits_a_map_uses() {
        // hashbrown takes the bucket from the low bits and a 7-bit tag from the top ones: the
        // first 4096 ids must fill 4096 buckets one each, and their tags must not all agree.
        let low: HashSet<u64> = (0..4096u64).map(|i| hash(i) & 4095).collect();
        assert_eq!(low.len(), 4096);
        let tags: HashSet<u64> = (0..4096u64).map(|i| hash(i) >> 57).collect();
        assert!(tags.len() > 100, "{} tags", tags.len());
    }

    #[test]
    fn maps_of_counted_ids_behave_as_maps() {
        let mut m: IdMap<u64, u64> = IdMap::default();
        for i in 0..10_000 {
            m.insert(i, i * 2);
        }
        assert!((0..10_000).all(|i| m.get(&i) == Some(&(i * 2))));
        assert_eq!(m.remove(&5), Some(10));
        assert_eq!(m.len(), 9_999);
    }
}
