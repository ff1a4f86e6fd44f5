//! The connection and the statements of the message path, each prepared once and held for the
//! life of the store.
//!
//! rusqlite's `prepare_cached` finds a statement by hashing its SQL text twice (SipHash, on the
//! way out and on the way back) and allocates a key for it each time, for each of the dozen
//! statements a message costs: 5% of the instructions of the core bench. A statement of [`Sql`]
//! is found by its index instead. The rest (savepoints, session keys, held envelopes, everything
//! off the message path) still goes through `prepare_cached`.
//!
//! Owns the SQLite connection (the statements borrow it, and `self_cell` keeps the pair
//! together without `unsafe`; which makes `Store` not `Send`: the daemon's loop is one thread).
//! Must never: hand a statement out beyond one call (a statement left borrowed would make the
//! next use of it fail), hold one mid-step between calls, or leave its parameters bound after
//! it (they are message texts and envelopes, which SQLite would keep copies of).

use std::cell::{OnceCell, RefCell};

use rusqlite::{Connection, PrepFlags, Statement};

use super::{Result, StoreError};

/// What setting a sent message's state changes, whichever way the row is found (by id, or at
/// the row its check found): one text, so the two cannot come to differ.
macro_rules! set_state {
    () => {
        "UPDATE messages SET state = ?2,
         item = CASE WHEN ?2 IN ('delivered', 'failed') THEN NULL ELSE item END,
         unsent = CASE WHEN ?2 IN ('delivered', 'failed') THEN NULL ELSE unsent END"
    };
}

/// A statement of the message path. The text is here, next to its siblings, so the schema's
/// hot path can be read in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sql {
    Begin,
    Commit,
    HistoryAppend,
    MessageAddSent,
    MessageAddReceived,
    MessageUnsent,
    MessageTaken,
    MessageHas,
    MessageOutgoing,
    MessageSetState,
    MessageSetStateAt,
    MessageSent,
    ReceiptSent,
    OutboxPush,
    OutboxRemove,
    RecvSession,
    SendSession,
    QueuePush,
    QueueRemove,
    QueueItem,
}

impl Sql {
    /// Every statement, in index order (one left out fails to compile: `COMPLETE`).
    pub(super) const ALL: [Sql; 20] = [
        Sql::Begin,
        Sql::Commit,
        Sql::HistoryAppend,
        Sql::MessageAddSent,
        Sql::MessageAddReceived,
        Sql::MessageUnsent,
        Sql::MessageTaken,
        Sql::MessageHas,
        Sql::MessageOutgoing,
        Sql::MessageSetState,
        Sql::MessageSetStateAt,
        Sql::MessageSent,
        Sql::ReceiptSent,
        Sql::OutboxPush,
        Sql::OutboxRemove,
        Sql::RecvSession,
        Sql::SendSession,
        Sql::QueuePush,
        Sql::QueueRemove,
        Sql::QueueItem,
    ];

    /// Every variant is in [`Sql::ALL`], whose length sizes the slots (`QueueItem` is the last
    /// variant; one added after it and not to `ALL` is caught at its first use, in `with`).
    const COMPLETE: () = assert!(Sql::QueueItem as usize + 1 == Sql::ALL.len());

    pub(super) fn text(self) -> &'static str {
        match self {
            Sql::Begin => "BEGIN IMMEDIATE",
            Sql::Commit => "COMMIT",
            Sql::HistoryAppend => {
                "INSERT INTO history (time_ms, peer, body, kind) VALUES (?1, ?2, ?3, ?4)"
            }
            Sql::MessageAddSent => {
                "INSERT OR IGNORE INTO messages (id, peer, dir, state, session, counter, item, unsent)
                 VALUES (?1, ?2, 'out', 'queued', ?3, ?4, ?5, 1)"
            }
            // A received message with its receipt, in the outbox until the relay takes it.
            Sql::MessageAddReceived => {
                "INSERT OR IGNORE INTO messages (id, peer, dir, state, session, counter, item, unsent)
                 VALUES (?1, ?2, 'in', 'delivered', ?3, ?4, ?5, 1)"
            }
            // A sent message waiting in the outbox: its row (for the update that follows),
            // recipient, and whether it is still queued.
            Sql::MessageUnsent => {
                "SELECT rowid, peer, state = 'queued' FROM messages
                 WHERE id = ?1 AND dir = 'out' AND unsent = 1"
            }
            Sql::MessageTaken => {
                "UPDATE messages SET unsent = NULL,
                 state = CASE state WHEN 'queued' THEN 'relayed' ELSE state END
                 WHERE rowid = ?1"
            }
            Sql::MessageHas => "SELECT 1 FROM messages WHERE id = ?1",
            Sql::MessageOutgoing => {
                "SELECT peer, session, counter, state, rowid FROM messages
                 WHERE id = ?1 AND dir = 'out'"
            }
            // A settled message is never sent again: its kept envelope goes, and it leaves the
            // outbox.
            Sql::MessageSetState => concat!(set_state!(), " WHERE id = ?1"),
            // The same, for the row `outgoing` found in this turn: by its rowid, one search of
            // the id index fewer, and still by its id too, so a rowid that no longer names
            // this message (it cannot, within a turn) changes nothing.
            Sql::MessageSetStateAt => concat!(set_state!(), " WHERE rowid = ?3 AND id = ?1"),
            // The relay took a sent message: out of the outbox, its envelope kept until settled.
            Sql::MessageSent => {
                "UPDATE messages SET unsent = NULL WHERE id = ?1 AND dir = 'out' AND unsent = 1"
            }
            // The relay took a receipt: nothing of it is needed again.
            Sql::ReceiptSent => {
                "UPDATE messages SET unsent = NULL, item = NULL
                 WHERE id = ?1 AND dir = 'in' AND unsent = 1"
            }
            Sql::OutboxPush => "INSERT OR IGNORE INTO outbox (kind, id, item) VALUES (?1, ?2, ?3)",
            Sql::OutboxRemove => "DELETE FROM outbox WHERE kind = ?1 AND id = ?2",
            Sql::RecvSession => "SELECT key FROM recv_sessions WHERE peer = ?1 AND session = ?2",
            Sql::SendSession => "SELECT key FROM send_sessions WHERE peer = ?1 AND session = ?2",
            Sql::QueuePush => {
                "INSERT OR IGNORE INTO queue (user, kind, id, item) VALUES (?1, ?2, ?3, ?4)"
            }
            Sql::QueueRemove => "DELETE FROM queue WHERE user = ?1 AND kind = ?2 AND id = ?3",
            Sql::QueueItem => "SELECT item FROM queue WHERE user = ?1 AND kind = ?2 AND id = ?3",
        }
    }
}

/// One slot per [`Sql`], filled on first use.
pub(super) struct Prepared<'c> {
    slots: [OnceCell<RefCell<Statement<'c>>>; Sql::ALL.len()],
}

self_cell::self_cell!(
    /// The connection and its held statements.
    pub(super) struct Db {
        owner: Connection,
        #[not_covariant]
        dependent: Prepared,
    }
);

impl Db {
    /// Take over `conn`; no statement is prepared until it is first used.
    pub(super) fn from_connection(conn: Connection) -> Db {
        // Evaluated at compile time once named.
        #[allow(clippy::let_unit_value)]
        let () = Sql::COMPLETE;
        Db::new(conn, |_| Prepared {
            slots: std::array::from_fn(|_| OnceCell::new()),
        })
    }

    /// The connection, for every statement not in [`Sql`].
    pub(super) fn conn(&self) -> &Connection {
        self.borrow_owner()
    }

    /// Run `f` on the held statement `q`, preparing it the first time.
    pub(super) fn with<R>(
        &self,
        q: Sql,
        f: impl FnOnce(&mut Statement<'_>) -> rusqlite::Result<R>,
    ) -> Result<R> {
        self.with_dependent(|conn, prepared| {
            let slot = prepared.slots.get(q as usize).ok_or_else(|| {
                StoreError::Internal(format!("statement {q:?} has no slot (missing in Sql::ALL)"))
            })?;
            let cell = match slot.get() {
                Some(cell) => cell,
                None => {
                    // Persistent, as rusqlite's cache prepares: a statement kept for the life
                    // of the connection takes no lookaside memory from the short-lived ones.
                    let st =
                        conn.prepare_with_flags(q.text(), PrepFlags::SQLITE_PREPARE_PERSISTENT)?;
                    slot.get_or_init(|| RefCell::new(st))
                }
            };
            // Only a statement used from inside its own `f` is borrowed here: a bug, reported
            // rather than a panic.
            let mut st = cell
                .try_borrow_mut()
                .map_err(|_| StoreError::Internal(format!("statement {q:?} used re-entrantly")))?;
            let done = f(&mut st);
            st.clear_bindings();
            Ok(done?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_statement_has_its_own_slot_and_prepares_against_the_schema() {
        for (i, q) in Sql::ALL.iter().enumerate() {
            assert_eq!(*q as usize, i, "Sql::ALL is out of index order at {q:?}");
        }
        let store = super::super::Store::open_in_memory().expect("store");
        for q in Sql::ALL {
            store
                .db
                .conn()
                .prepare(q.text())
                .unwrap_or_else(|e| panic!("{q:?} does not prepare: {e}"));
        }
    }

    #[test]
    fn a_statement_used_from_inside_itself_is_an_error_not_a_panic() {
        let store = super::super::Store::open_in_memory().expect("store");
        let inner = store.db.with(Sql::MessageHas, |_| {
            Ok(store.db.with(Sql::MessageHas, |_| Ok(())))
        });
        assert!(
            matches!(inner, Ok(Err(StoreError::Internal(_)))),
            "{inner:?}"
        );
    }
}
