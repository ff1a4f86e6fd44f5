//! One user's queue on the relay, as the relay core sees it: keys and sizes in arrival order, and
//! how much of it is delivered and not yet acknowledged. Must never: hold an item's bytes (they
//! stay in the store until delivered) or talk to the store itself (the core does).

use std::collections::{HashSet, VecDeque};

use crate::proto::relay::ItemKey;

/// One user's queued items, oldest first. Items are delivered strictly in order, so the
/// delivered-but-unacknowledged ones are always a prefix of `items` of length `sent`.
#[derive(Default)]
pub(super) struct UserQueue {
    /// Items with their encoded size. The bodies stay in the store until delivered, so a long
    /// queue costs a few dozen bytes per item of memory, not the items themselves.
    pub(super) items: VecDeque<(ItemKey, usize)>,
    pub(super) keys: HashSet<ItemKey>,
    pub(super) sent: usize,
    pub(super) sent_bytes: usize,
    /// Encoded bytes of every item queued (what `max_queue_bytes` bounds).
    pub(super) bytes: usize,
}

impl UserQueue {
    pub(super) fn push(&mut self, key: ItemKey, size: usize) {
        self.keys.insert(key);
        self.items.push_back((key, size));
        self.bytes += size;
    }

    pub(super) fn remove(&mut self, key: ItemKey) -> bool {
        if !self.keys.remove(&key) {
            return false;
        }
        if let Some(pos) = self.items.iter().position(|(k, _)| *k == key) {
            if let Some((_, size)) = self.items.remove(pos) {
                self.bytes = self.bytes.saturating_sub(size);
                if pos < self.sent {
                    self.sent -= 1;
                    self.sent_bytes = self.sent_bytes.saturating_sub(size);
                }
            }
        }
        true
    }
}
