//! The narrow storage interfaces the cores see: [`RelayStore`] for the relay role and
//! [`MemberStore`] for the member role.
//!
//! Why traits: the cores decide protocol questions and must not care which database holds their
//! state. The SQLite [`Store`] implements both today; a second relay backend (several relay
//! machines sharing one PostgreSQL) implements [`RelayStore`] without touching the relay core, and
//! a core test can wrap a store to fail one chosen call instead of every write (as rustls's
//! `StoresServerSessions` lets a test inject a session cache). Turn boundaries (`begin`,
//! `commit`) are not here: the daemon owns the turn, the cores only write inside it.
//!
//! Must never: grow a method a core does not call, or decide anything (the implementations only
//! read and write what they are told).

use crate::proto::control::{MsgState, Record, RecordBody};
use crate::proto::relay::ItemKey;

use super::{Held, Outgoing, Pin, Result, Row, Store};

/// What the relay core reads and writes: name bindings and queued items.
pub trait RelayStore {
    /// Every name binding, `(user, SPKI DER)`.
    fn bindings(&self) -> Result<Vec<(String, Vec<u8>)>>;
    /// Bind a name to a key.
    fn bind(&mut self, user: &str, key: &[u8]) -> Result<()>;
    /// Drop a name's binding and its queue.
    fn unbind(&mut self, user: &str) -> Result<()>;
    /// Remember to tell `user` that their item `key` was dropped, and why.
    fn add_notice(&mut self, user: &str, key: ItemKey, reason: &str) -> Result<()>;
    /// Take (read and delete) every notice for `user`.
    fn take_notices(&mut self, user: &str) -> Result<Vec<(ItemKey, String)>>;
    /// Queue an item for `user` (idempotent).
    fn enqueue(&mut self, user: &str, key: ItemKey, item: &[u8]) -> Result<()>;
    /// Drop an acknowledged item.
    fn dequeue(&mut self, user: &str, key: ItemKey) -> Result<()>;
    /// Every queued item's recipient, key and encoded size, in arrival order.
    fn queued_sizes(&self) -> Result<Vec<(String, ItemKey, usize)>>;
    /// One queued item's encoded bytes.
    fn queued_item(&self, user: &str, key: ItemKey) -> Result<Option<Vec<u8>>>;
}

/// What the member core reads and writes: history, message states, outbox, held envelopes,
/// session keys and pins.
pub trait MemberStore {
    /// Append a history record stamped `time_ms` (wall clock).
    fn append(&mut self, time_ms: u64, peer: &str, body: RecordBody) -> Result<Record>;
    /// Remember a message we send, queued, with its encoded envelope kept until it is settled
    /// and in the outbox until the relay takes it (one row, one statement); false if the id is
    /// known already.
    fn add_sent(
        &mut self,
        id: &[u8; 16],
        peer: &str,
        session: &[u8; 16],
        counter: u64,
        item: &[u8],
    ) -> Result<bool>;
    /// Remember a message we received, delivered, with its encoded receipt in the outbox (one
    /// row, one statement); false if the id, or its (peer, session, counter), is known already.
    fn add_received(
        &mut self,
        id: &[u8; 16],
        peer: &str,
        session: &[u8; 16],
        counter: u64,
        receipt: &[u8],
    ) -> Result<bool>;
    /// The relay took sent message `id`: it leaves the outbox, and a queued one becomes
    /// relayed. Its recipient if it was queued; `None` if it was in another state, not in the
    /// outbox, or unknown.
    fn relayed(&mut self, id: &[u8; 16]) -> Result<Option<String>>;
    /// Whether a message id is known.
    fn has_message(&self, id: &[u8; 16]) -> Result<bool>;
    /// A sent message's recipient, session, counter and state.
    fn outgoing(&self, id: &[u8; 16]) -> Result<Option<Outgoing>>;
    /// Set a sent message's state; a settled one (delivered, failed) leaves the outbox.
    fn set_state(&mut self, id: &[u8; 16], state: MsgState) -> Result<()>;
    /// [`MemberStore::outgoing`], and where the message is, for `set_state_at`.
    fn outgoing_at(&self, id: &[u8; 16]) -> Result<Option<(Outgoing, Row)>>;
    /// `set_state` of message `id` at `row`, as `outgoing_at` found it in this turn (an error
    /// if it is not there).
    fn set_state_at(&mut self, row: Row, id: &[u8; 16], state: MsgState) -> Result<()>;
    /// Kept envelopes of unsettled messages to `peer` in `session`, in counter order.
    fn unsettled(&self, peer: &str, session: &[u8; 16]) -> Result<Vec<([u8; 16], Vec<u8>)>>;
    /// Add an item to the outbox; a message's item also becomes its kept envelope.
    fn outbox_push(&mut self, key: ItemKey, item: &[u8]) -> Result<()>;
    /// Remove an item from the outbox; true if it was there.
    fn outbox_remove(&mut self, key: ItemKey) -> Result<bool>;
    /// Every outbox item, oldest first.
    fn outbox(&self) -> Result<Vec<(ItemKey, Vec<u8>)>>;
    /// Hold an envelope that cannot be opened yet.
    fn hold(&mut self, id: &[u8; 16], peer: &str, item: &[u8]) -> Result<()>;
    /// Up to `limit` envelopes held from `peer` with `after` < seq <= `upto`, oldest first.
    fn held_batch(&self, peer: &str, after: u64, upto: u64, limit: usize) -> Result<Vec<Held>>;
    /// Envelopes held (from `peer`, or from everyone) and their bytes.
    fn held_size(&self, peer: Option<&str>) -> Result<(u64, u64)>;
    /// The highest seq of the held envelopes (0 when none).
    fn held_last_seq(&self) -> Result<u64>;
    /// Drop everything held from `peer`; how many envelopes and bytes that was.
    fn drop_held(&mut self, peer: &str) -> Result<(u64, u64)>;
    /// Drop a held envelope.
    fn unhold(&mut self, id: &[u8; 16]) -> Result<()>;
    /// Store a session key; `sending` selects sending or receiving sessions.
    fn put_session(
        &mut self,
        sending: bool,
        peer: &str,
        session: &[u8; 16],
        key: &[u8; 32],
    ) -> Result<()>;
    /// Look up a session key.
    fn session(&self, sending: bool, peer: &str, session: &[u8; 16]) -> Result<Option<Vec<u8>>>;
    /// Every pin.
    fn pins(&self) -> Result<Vec<Pin>>;
    /// Insert or replace a pin.
    fn put_pin(&mut self, pin: &Pin) -> Result<()>;
    /// Remove a pin; true if there was one.
    fn delete_pin(&mut self, user: &str) -> Result<bool>;
    /// Start a unit of work inside the turn, so a failure part-way undoes only that unit.
    fn savepoint(&mut self) -> Result<()>;
    /// Keep the unit's writes (they commit with the turn).
    fn release_savepoint(&mut self) -> Result<()>;
    /// Undo the unit's writes.
    fn rollback_savepoint(&mut self);
    /// Whether a turn is open (its writes commit or roll back together).
    fn in_turn(&self) -> bool;
    /// A unit of work that took no savepoint failed part-way: the turn's commit must fail, so
    /// none of it is kept.
    fn abandon_turn(&mut self, why: &super::StoreError);
}

// Each method forwards to the inherent method of the same name (inherent methods win method
// resolution, so these are not recursive).
impl RelayStore for Store {
    fn bindings(&self) -> Result<Vec<(String, Vec<u8>)>> {
        Store::bindings(self)
    }
    fn bind(&mut self, user: &str, key: &[u8]) -> Result<()> {
        Store::bind(self, user, key)
    }
    fn unbind(&mut self, user: &str) -> Result<()> {
        Store::unbind(self, user)
    }
    fn add_notice(&mut self, user: &str, key: ItemKey, reason: &str) -> Result<()> {
        Store::add_notice(self, user, key, reason)
    }
    fn take_notices(&mut self, user: &str) -> Result<Vec<(ItemKey, String)>> {
        Store::take_notices(self, user)
    }
    fn enqueue(&mut self, user: &str, key: ItemKey, item: &[u8]) -> Result<()> {
        Store::enqueue(self, user, key, item)
    }
    fn dequeue(&mut self, user: &str, key: ItemKey) -> Result<()> {
        Store::dequeue(self, user, key)
    }
    fn queued_sizes(&self) -> Result<Vec<(String, ItemKey, usize)>> {
        Store::queued_sizes(self)
    }
    fn queued_item(&self, user: &str, key: ItemKey) -> Result<Option<Vec<u8>>> {
        Store::queued_item(self, user, key)
    }
}

impl MemberStore for Store {
    fn append(&mut self, time_ms: u64, peer: &str, body: RecordBody) -> Result<Record> {
        Store::append(self, time_ms, peer, body)
    }
    fn has_message(&self, id: &[u8; 16]) -> Result<bool> {
        Store::has_message(self, id)
    }
    fn outgoing(&self, id: &[u8; 16]) -> Result<Option<Outgoing>> {
        Store::outgoing(self, id)
    }
    fn set_state(&mut self, id: &[u8; 16], state: MsgState) -> Result<()> {
        Store::set_state(self, id, state)
    }
    fn outgoing_at(&self, id: &[u8; 16]) -> Result<Option<(Outgoing, Row)>> {
        Store::outgoing_at(self, id)
    }
    fn set_state_at(&mut self, row: Row, id: &[u8; 16], state: MsgState) -> Result<()> {
        Store::set_state_at(self, row, id, state)
    }
    fn add_sent(
        &mut self,
        id: &[u8; 16],
        peer: &str,
        session: &[u8; 16],
        counter: u64,
        item: &[u8],
    ) -> Result<bool> {
        Store::add_sent(self, id, peer, session, counter, item)
    }
    fn add_received(
        &mut self,
        id: &[u8; 16],
        peer: &str,
        session: &[u8; 16],
        counter: u64,
        receipt: &[u8],
    ) -> Result<bool> {
        Store::add_received(self, id, peer, session, counter, receipt)
    }
    fn relayed(&mut self, id: &[u8; 16]) -> Result<Option<String>> {
        Store::relayed(self, id)
    }
    fn outbox_push(&mut self, key: ItemKey, item: &[u8]) -> Result<()> {
        Store::outbox_push(self, key, item)
    }
    fn unsettled(&self, peer: &str, session: &[u8; 16]) -> Result<Vec<([u8; 16], Vec<u8>)>> {
        Store::unsettled(self, peer, session)
    }
    fn outbox_remove(&mut self, key: ItemKey) -> Result<bool> {
        Store::outbox_remove(self, key)
    }
    fn outbox(&self) -> Result<Vec<(ItemKey, Vec<u8>)>> {
        Store::outbox(self)
    }
    fn hold(&mut self, id: &[u8; 16], peer: &str, item: &[u8]) -> Result<()> {
        Store::hold(self, id, peer, item)
    }
    fn held_batch(&self, peer: &str, after: u64, upto: u64, limit: usize) -> Result<Vec<Held>> {
        Store::held_batch(self, peer, after, upto, limit)
    }
    fn held_size(&self, peer: Option<&str>) -> Result<(u64, u64)> {
        Store::held_size(self, peer)
    }
    fn held_last_seq(&self) -> Result<u64> {
        Store::held_last_seq(self)
    }
    fn drop_held(&mut self, peer: &str) -> Result<(u64, u64)> {
        Store::drop_held(self, peer)
    }
    fn unhold(&mut self, id: &[u8; 16]) -> Result<()> {
        Store::unhold(self, id)
    }
    fn put_session(
        &mut self,
        sending: bool,
        peer: &str,
        session: &[u8; 16],
        key: &[u8; 32],
    ) -> Result<()> {
        Store::put_session(self, sending, peer, session, key)
    }
    fn session(&self, sending: bool, peer: &str, session: &[u8; 16]) -> Result<Option<Vec<u8>>> {
        Store::session(self, sending, peer, session)
    }
    fn pins(&self) -> Result<Vec<Pin>> {
        Store::pins(self)
    }
    fn put_pin(&mut self, pin: &Pin) -> Result<()> {
        Store::put_pin(self, pin)
    }
    fn delete_pin(&mut self, user: &str) -> Result<bool> {
        Store::delete_pin(self, user)
    }
    fn savepoint(&mut self) -> Result<()> {
        Store::savepoint(self)
    }
    fn release_savepoint(&mut self) -> Result<()> {
        Store::release_savepoint(self)
    }
    fn rollback_savepoint(&mut self) {
        Store::rollback_savepoint(self)
    }
    fn in_turn(&self) -> bool {
        Store::in_turn(self)
    }
    fn abandon_turn(&mut self, why: &super::StoreError) {
        Store::abandon_turn(self, why)
    }
}
