//! One user's queue on the relay, as the relay core sees it: keys and sizes in arrival order, how
//! much of it is delivered and not yet acknowledged, and the items held in memory only (not
//! written yet). Must never: hold the bytes of an item that is in the store (they stay there
//! until delivered) or talk to the store itself (the core does).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use crate::proto::relay::ItemKey;

use super::ConnId;

/// A routed item held in memory only: not in the store yet, not acknowledged yet.
pub(super) struct Unsynced {
    /// Its encoding, as it came in the `Send` frame.
    pub(super) bytes: Arc<[u8]>,
    /// Connections that sent it and wait for `Accepted` (a retransmission adds one).
    pub(super) senders: Vec<ConnId>,
    /// Arrival order: items of one turn share a time, and the store must get them in the order
    /// they came (it is the queue's order after a restart).
    pub(super) seq: u64,
    /// When it came (monotonic ms): a leaver's items still within their `SYNC_DELAY_MS` are
    /// written at it, as an offline recipient's are, not with the held ones.
    pub(super) at: u64,
    pub(super) size: usize,
}

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
    /// The items of `items` held in memory only. Kept per queue, not in one map keyed by
    /// recipient and key, so the message path finds them without building and hashing the
    /// recipient's name again (the relay core keeps the totals).
    pub(super) unsynced: HashMap<ItemKey, Unsynced>,
    /// Their encoded sizes, summed (what [`super::HOLD_QUEUE_BYTES`] bounds).
    pub(super) unsynced_bytes: usize,
    /// Until when (monotonic ms) an item of this queue is held for its online recipient: a
    /// later item is not written before it, whether or not the recipient is still online, so
    /// the store keeps the order items came in.
    pub(super) hold_until: u64,
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
