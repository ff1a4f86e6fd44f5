//! Hash maps keyed by numbers this process hands out itself: the relay core's connection ids
//! ([`crate::relay::ConnId`]) and the daemon's poll tokens.
//!
//! The standard maps hash with SipHash-1-3, a keyed function that keeps a client who chooses
//! keys from making them collide. Nobody but the daemon chooses these numbers (it counts them
//! up, one per accepted connection, never reused). A client can choose which of them stay
//! open, though: by closing all but every 2048th connection it keeps ids that share their low
//! bits, and with a public, unkeyed function it could keep just those ids that collide. So
//! [`IdHasher`] is SplitMix64's finalizer (two multiplies and three shifts, where SipHash is
//! a dozen rounds) over the number and a key drawn per map: ids any power of two apart spread
//! as well as consecutive ones (a test), and which ids collide depends on a key nobody outside
//! sees. SipHash was a sixth of the relay's instructions per message on its path, a quarter of
//! that on these keys (callgrind, `cargo bench --bench relay`, 50 -> 50).
//!
//! Must never: key a map whose keys a peer, a relay or a control client can choose (names,
//! message ids, item keys): those keep the standard, keyed hasher (docs/DECISIONS.md, "The
//! relay's maps keep SipHash").

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};

/// Builds [`IdHasher`]s under a key drawn for each map (from the standard library's per-process
/// random keys), so which counted numbers collide cannot be worked out from outside.
#[derive(Debug, Clone, Copy)]
pub struct IdBuild {
    key: u64,
}

impl Default for IdBuild {
    fn default() -> IdBuild {
        IdBuild {
            key: RandomState::new().hash_one(0u64),
        }
    }
}

impl BuildHasher for IdBuild {
    type Hasher = IdHasher;

    fn build_hasher(&self) -> IdHasher {
        IdHasher(self.key)
    }
}

/// A hasher for numbers the process counts out itself; see the module docs.
#[derive(Debug, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only numbers belong here (`write_u64`, `write_usize`); bytes mean a name or an id
        // from outside, which must keep SipHash (see the module docs).
        debug_assert!(
            false,
            "IdHasher hashed {} bytes: not a counted number",
            bytes.len()
        );
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
    /// SplitMix64's finalizer over the key and the number: every bit of the number reaches
    /// every bit of the hash, so numbers that share their low bits (ids 2^k apart) land in
    /// different buckets, where one multiply left them all in one.
    fn add(&mut self, n: u64) {
        let mut x = self.0 ^ n;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        self.0 = x ^ (x >> 31);
    }
}

/// A map keyed by a number the process hands out.
pub type IdMap<K, V> = HashMap<K, V, IdBuild>;
/// A set of numbers the process hands out.
pub type IdSet<K> = HashSet<K, IdBuild>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::Hash;

    fn hash<T: Hash>(t: T) -> u64 {
        IdBuild { key: 12345 }.hash_one(t)
    }

    #[test]
    fn ids_any_power_of_two_apart_spread_over_the_buckets() {
        // hashbrown takes the bucket from the low bits and a 7-bit tag from the top ones. The
        // ids a client can keep open are any subset of those counted out, so spaced ones (all
        // but every 2^k-th closed) must spread like consecutive ones: 1024 of them over 2048
        // buckets. Without the final rotation, 2048 apart they all shared one bucket.
        for shift in 0..20 {
            let ids = (1..=1024u64).map(|i| i << shift);
            let buckets: HashSet<u64> = ids.clone().map(|i| hash(i) & 2047).collect();
            assert!(
                buckets.len() > 700,
                "ids 2^{shift} apart: {} buckets",
                buckets.len()
            );
            let tags: HashSet<u64> = ids.map(|i| hash(i) >> 57).collect();
            assert!(tags.len() > 100, "ids 2^{shift} apart: {} tags", tags.len());
        }
    }

    #[test]
    fn connection_ids_and_poll_tokens_hash_as_their_numbers() {
        // Both derive `Hash`, which must reach `write_u64`/`write_usize` once (not `write`,
        // which would trip the debug assertion) and give the number's own hash.
        assert_eq!(hash(crate::relay::ConnId(77)), hash(77u64));
        assert_eq!(hash(mio::Token(77)), hash(77usize));
        assert_eq!(hash(77usize), hash(77u64));
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
