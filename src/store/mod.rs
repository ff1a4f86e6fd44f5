//! SQLite persistence for both roles: the one storage interface of the crate.
//!
//! Owns the schema and every SQL statement. Member: history, message states, outbox, sending and
//! receiving session keys, pins. Relay: name-to-key bindings and queued items. The daemon brackets
//! each turn of its event loop with [`Store::begin`] and [`Store::commit`], so all writes of a
//! turn share one transaction (group commit: one fsync per burst) and nothing is acknowledged to a
//! peer before it is durable. Must never: decide protocol questions (the cores do), or log a
//! message text or key.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rusqlite::Connection;

use prepared::Sql;

use crate::proto::control::{MsgState, Record, RecordBody, RecordKind};
use crate::proto::relay::{ItemKey, Kind};
use crate::proto::{from_payload, to_payload};

mod member_tables;
mod prepared;
mod relay_tables;
mod traits;
pub use traits::{MemberStore, RelayStore};

/// Storage failures. Each says what the user can do about it.
#[derive(Debug)]
pub enum StoreError {
    /// SQLite failed (disk full, read-only file system, corruption, ...).
    Sqlite(rusqlite::Error),
    /// The database file could not be created with safe permissions.
    Io(std::io::Error),
    /// A stored row could not be decoded (the database was edited or is from another version).
    Corrupt(String),
    /// A failure injected by a test through [`Store::fail_writes`].
    Injected,
    /// SQLite rolled the turn's transaction back by itself after an earlier error (a full
    /// disk, say): nothing more is written in this turn, whose commit then fails.
    RolledBack,
    /// A bug in chatd's use of its own store (the text says which); please report it.
    Internal(String),
    /// A write failed part-way through a unit of work, so the turn was rolled back whole
    /// ([`Store::abandon_turn`]); the text is the first failure.
    Abandoned(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Sqlite(e) => write!(f, "database error: {e}"),
            StoreError::Io(e) => write!(f, "cannot create database file: {e}"),
            StoreError::Corrupt(e) => write!(f, "database holds an unreadable row: {e}"),
            StoreError::Injected => write!(f, "database error: injected write failure"),
            StoreError::Internal(e) => write!(f, "internal error in chatd (please report it): {e}"),
            StoreError::RolledBack => write!(
                f,
                "database error: the turn's transaction was rolled back after an earlier error"
            ),
            StoreError::Abandoned(why) => write!(
                f,
                "{why}; nothing of the turn was kept, since that write failed part-way through"
            ),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Sqlite(e) => Some(e),
            StoreError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Sqlite(e)
    }
}

type Result<T> = std::result::Result<T, StoreError>;

// `history` and `outbox` number their rows without AUTOINCREMENT: that keyword costs a write to
// `sqlite_sequence` on every insert, and buys only that a deleted highest seq is never given out
// again. No history row is ever deleted, so its seqs (the `tail` cursor) are the same either
// way; outbox seqs only order what is waiting. A pruning of the history would have to keep its
// last row. Databases made before keep their AUTOINCREMENT tables, which behave the same.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY,
    time_ms INTEGER NOT NULL,
    peer TEXT NOT NULL,
    body BLOB NOT NULL,
    kind TEXT
);
CREATE INDEX IF NOT EXISTS history_peer ON history(peer, seq);
CREATE TABLE IF NOT EXISTS messages (
    id BLOB PRIMARY KEY,
    peer TEXT NOT NULL,
    dir TEXT NOT NULL,
    state TEXT NOT NULL,
    session BLOB NOT NULL,
    counter INTEGER NOT NULL,
    item BLOB,
    unsent INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS messages_replay ON messages(peer, session, counter) WHERE dir = 'in';
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    id BLOB NOT NULL,
    item BLOB NOT NULL,
    UNIQUE(kind, id)
);
CREATE TABLE IF NOT EXISTS recv_sessions (
    peer TEXT NOT NULL, session BLOB NOT NULL, key BLOB NOT NULL, PRIMARY KEY(peer, session)
);
CREATE TABLE IF NOT EXISTS send_sessions (
    peer TEXT NOT NULL, session BLOB NOT NULL, key BLOB NOT NULL, PRIMARY KEY(peer, session)
);
CREATE TABLE IF NOT EXISTS pins (
    user TEXT PRIMARY KEY,
    key BLOB NOT NULL,
    trust TEXT NOT NULL,
    presented BLOB
);
CREATE TABLE IF NOT EXISTS held (
    id BLOB PRIMARY KEY,
    peer TEXT NOT NULL,
    item BLOB NOT NULL,
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS bindings (
    user TEXT PRIMARY KEY,
    key BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS notices (
    user TEXT NOT NULL,
    kind TEXT NOT NULL,
    id BLOB NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY(user, kind, id)
);
CREATE TABLE IF NOT EXISTS queue (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    user TEXT NOT NULL,
    kind TEXT NOT NULL,
    id BLOB NOT NULL,
    item BLOB NOT NULL,
    UNIQUE(user, kind, id)
);
";

/// A pinned peer key as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    /// Peer name.
    pub user: String,
    /// The pinned key, SPKI DER.
    pub key: Vec<u8>,
    /// Whether the user checked the key.
    pub trust: PinTrust,
    /// A different key the relay presented, not yet trusted.
    pub presented: Option<Vec<u8>>,
}

/// The trust column of a pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinTrust {
    /// Pinned on first sight.
    Pinned,
    /// The user checked the fingerprint.
    Trusted,
}

impl PinTrust {
    fn as_str(self) -> &'static str {
        match self {
            PinTrust::Pinned => "pinned",
            PinTrust::Trusted => "trusted",
        }
    }

    fn parse(s: &str) -> Result<PinTrust> {
        match s {
            "pinned" => Ok(PinTrust::Pinned),
            "trusted" => Ok(PinTrust::Trusted),
            other => Err(StoreError::Corrupt(format!("unknown pin trust {other:?}"))),
        }
    }
}

/// A held envelope as stored: its seq in the held table, message id, encoded `Routed` item.
pub type Held = (u64, [u8; 16], Vec<u8>);

/// A sent message as stored: recipient, session, counter, state.
pub type Outgoing = (String, [u8; 16], u64, MsgState);

/// Where [`MemberStore::outgoing_at`] found a sent message: for
/// [`MemberStore::set_state_at`] in the same turn, which then need not find it again. Opaque
/// outside the store (SQLite's rowid here; another store's key of its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row(i64);

/// One queued item on a relay.
#[derive(Debug, Clone)]
pub struct Queued {
    /// Recipient.
    pub user: String,
    /// Ack key.
    pub key: ItemKey,
    /// The encoded `Routed` item.
    pub item: Vec<u8>,
}

/// The database of one daemon.
pub struct Store {
    db: prepared::Db,
    in_tx: bool,
    /// A turn is open: its first write begins the transaction.
    turn: bool,
    /// Rows changed before the turn: a turn that began no transaction changed none.
    changes_at_turn: u64,
    /// Why the turn must not commit ([`Store::abandon_turn`]).
    abandoned: Option<String>,
    fail_writes: bool,
    /// Writes to let through before one injected failure ([`Store::fail_write_after`]).
    fail_after: Option<u32>,
}

fn kind_str(k: Kind) -> &'static str {
    match k {
        Kind::Message => "message",
        Kind::Receipt => "receipt",
        Kind::Rekey => "rekey",
    }
}

fn kind_parse(s: &str) -> Result<Kind> {
    match s {
        "message" => Ok(Kind::Message),
        "receipt" => Ok(Kind::Receipt),
        "rekey" => Ok(Kind::Rekey),
        other => Err(StoreError::Corrupt(format!("unknown item kind {other:?}"))),
    }
}

fn id16(v: Vec<u8>) -> Result<[u8; 16]> {
    v.try_into()
        .map_err(|_| StoreError::Corrupt("id is not 16 bytes".into()))
}

fn state_str(s: MsgState) -> &'static str {
    s.as_str()
}

fn state_parse(s: &str) -> Result<MsgState> {
    match s {
        "queued" => Ok(MsgState::Queued),
        "relayed" => Ok(MsgState::Relayed),
        "delivered" => Ok(MsgState::Delivered),
        "failed" => Ok(MsgState::Failed),
        other => Err(StoreError::Corrupt(format!(
            "unknown message state {other:?}"
        ))),
    }
}

/// A database from before `tail --kind` has no `kind` column in its history: add it and fill it
/// in from each record's body, once, so filtering by kind is one SQL condition.
///
/// The rows left to fill are found through a partial index of the rows without a kind (empty
/// once this has run; new rows always have one), so a start does not read the whole history.
/// The `(kind, seq)` index an earlier version made is dropped: no query could use it (`tail`
/// walks seq order and tests the kind on the way), and every append paid for it.
/// The rows from before `tail --kind`, given their kind at start-up (through the partial index
/// `history_unkinded`, empty once they have one).
const UNKINDED: &str = "SELECT seq, body FROM history WHERE kind IS NULL";

fn add_history_kind(conn: &Connection) -> Result<()> {
    let has: bool = conn
        .prepare("SELECT 1 FROM pragma_table_info('history') WHERE name = 'kind'")?
        .exists([])?;
    if !has {
        conn.execute_batch("ALTER TABLE history ADD COLUMN kind TEXT")?;
    }
    conn.execute_batch(
        "DROP INDEX IF EXISTS history_kind;
         CREATE INDEX IF NOT EXISTS history_unkinded ON history(seq) WHERE kind IS NULL;",
    )?;
    let mut todo = Vec::new();
    {
        let mut stmt = conn.prepare(UNKINDED)?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let (seq, body): (i64, Vec<u8>) = (r.get(0)?, r.get(1)?);
            let body: RecordBody =
                from_payload(&body).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            todo.push((seq, body.kind()));
        }
    }
    if !todo.is_empty() {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        for (seq, kind) in todo {
            conn.execute(
                "UPDATE history SET kind = ?1 WHERE seq = ?2",
                rusqlite::params![kind.as_str(), seq],
            )?;
        }
        conn.execute_batch("COMMIT")?;
    }
    Ok(())
}

/// A database from before rekey requests has no `item` column in `messages`: add it (empty for
/// the messages sent before, which therefore cannot be sent again with a key packet).
fn add_sent_item(conn: &Connection) -> Result<()> {
    let has: bool = conn
        .prepare("SELECT 1 FROM pragma_table_info('messages') WHERE name = 'item'")?
        .exists([])?;
    if !has {
        conn.execute_batch("ALTER TABLE messages ADD COLUMN item BLOB")?;
    }
    Ok(())
}

/// The outbox keeps a message and its receipt in the message's own row (`unsent` = 1, the
/// envelope or receipt in `item`) rather than in a second copy in `outbox`: a sent message's
/// envelope was written twice, and each message and receipt paid an insert and a delete in
/// `outbox` and its index. A database from before has no `unsent` column: add it, with the
/// partial index that finds the unsent rows, and move the outbox's messages and receipts into
/// their rows, once, in one transaction. A row of `outbox` whose message is not stored (which
/// no version wrote) stays where it is and is still sent and removed from there.
fn outbox_in_messages(conn: &Connection) -> Result<()> {
    let has: bool = conn
        .prepare("SELECT 1 FROM pragma_table_info('messages') WHERE name = 'unsent'")?
        .exists([])?;
    if !has {
        conn.execute_batch("ALTER TABLE messages ADD COLUMN unsent INTEGER")?;
    }
    conn.execute_batch(
        "CREATE INDEX IF NOT EXISTS messages_unsent ON messages(unsent) WHERE unsent IS NOT NULL",
    )?;
    let legacy: bool = conn
        .prepare(
            "SELECT 1 FROM outbox o JOIN messages m ON m.id = o.id
             AND m.dir = CASE o.kind WHEN 'message' THEN 'out' WHEN 'receipt' THEN 'in' END",
        )?
        .exists([])?;
    if legacy {
        conn.execute_batch(
            "BEGIN IMMEDIATE;
             UPDATE messages SET unsent = 1, item = (
                 SELECT o.item FROM outbox o WHERE o.id = messages.id
                 AND o.kind = CASE messages.dir WHEN 'out' THEN 'message' ELSE 'receipt' END)
             WHERE EXISTS (SELECT 1 FROM outbox o WHERE o.id = messages.id
                 AND o.kind = CASE messages.dir WHEN 'out' THEN 'message' ELSE 'receipt' END);
             DELETE FROM outbox WHERE kind IN ('message', 'receipt') AND EXISTS (
                 SELECT 1 FROM messages m WHERE m.id = outbox.id
                 AND m.dir = CASE outbox.kind WHEN 'message' THEN 'out' ELSE 'in' END);
             COMMIT;",
        )?;
    }
    Ok(())
}

/// Which history records a `tail` reads: only one peer's, only some kinds (empty: every kind).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only records about this peer.
    pub peer: Option<String>,
    /// Only records of these kinds; empty for all.
    pub kinds: Vec<RecordKind>,
}

impl Filter {
    /// Only `peer`'s records, of every kind.
    pub fn peer(peer: Option<&str>) -> Filter {
        Filter {
            peer: peer.map(str::to_string),
            kinds: Vec::new(),
        }
    }

    /// The kinds as one SQL parameter, `,message,key,` (NULL for every kind), matched with
    /// `instr`, so the statement stays one cached statement whatever the list.
    fn kinds_param(&self) -> Option<String> {
        if self.kinds.is_empty() {
            return None;
        }
        let mut s = String::from(",");
        for k in &self.kinds {
            s.push_str(k.as_str());
            s.push(',');
        }
        Some(s)
    }

    /// Whether `r` passes (the same test as the SQL, for followers).
    pub fn matches(&self, r: &Record) -> bool {
        self.peer.as_deref().map_or(true, |p| p == r.body.peer())
            && (self.kinds.is_empty() || self.kinds.contains(&r.body.kind()))
    }
}

/// Decode `SELECT seq, time_ms, body FROM history` rows.
fn history_rows(mut rows: rusqlite::Rows<'_>) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let (seq, time_ms, body): (i64, i64, Vec<u8>) = (r.get(0)?, r.get(1)?, r.get(2)?);
        let body: RecordBody =
            from_payload(&body).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        out.push(Record {
            seq: seq as u64,
            time_ms: time_ms as u64,
            body,
        });
    }
    Ok(out)
}

impl Store {
    /// Open (or create, mode 0600) the database at `path`.
    pub fn open(path: &Path) -> Result<Store> {
        // Create the file ourselves so it is 0600 from its first byte; SQLite gives its -wal and
        // -shm files the same mode as the database.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(StoreError::Io)?;
        let conn = Connection::open(path)?;
        Store::init(conn)
    }

    /// An in-memory database, for unit tests of the cores.
    pub fn open_in_memory() -> Result<Store> {
        Store::init(Connection::open_in_memory()?)
    }

    /// Have `f` see the text of every statement this store runs, as SQLite starts it (tests
    /// that check what a path reads and writes; parameters are not shown).
    #[cfg(test)]
    pub(crate) fn trace_statements(&self, f: fn(rusqlite::trace::TraceEvent<'_>)) {
        self.db
            .conn()
            .trace_v2(rusqlite::trace::TraceEventCodes::SQLITE_TRACE_STMT, Some(f));
    }

    fn init(conn: Connection) -> Result<Store> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // WAL: readers never block the writer; FULL: a commit survives power loss, and group
        // commit keeps that to one fsync per event-loop turn.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // Room for the statements of both roles not held in `prepared` (a host uses both sets
        // in one turn); the default of 16 would evict and parse again.
        conn.set_prepared_statement_cache_capacity(64);
        conn.execute_batch(SCHEMA)?;
        add_history_kind(&conn)?;
        add_sent_item(&conn)?;
        outbox_in_messages(&conn)?;
        Ok(Store {
            db: prepared::Db::from_connection(conn),
            in_tx: false,
            turn: false,
            changes_at_turn: 0,
            abandoned: None,
            fail_writes: false,
            fail_after: None,
        })
    }

    /// Open the turn: its first write starts the transaction, which [`Store::commit`] ends.
    ///
    /// Lazily, because most turns of a busy relay only forward (what is acknowledged in time is
    /// never written): an empty `BEGIN IMMEDIATE` and `COMMIT` still take and drop SQLite's
    /// write lock, which was a measurable part of a round trip through the relay. Every write
    /// goes through `check_write`, which begins the transaction.
    pub fn begin(&mut self) -> Result<()> {
        if !self.turn {
            self.changes_at_turn = self.db.conn().total_changes();
        }
        self.turn = true;
        Ok(())
    }

    fn start_tx(&mut self) -> Result<()> {
        // After SQLITE_FULL or an I/O error SQLite may roll the whole transaction back on its
        // own; a write now would run outside any transaction and be kept for good.
        if self.in_tx && self.db.conn().is_autocommit() {
            return Err(StoreError::RolledBack);
        }
        if self.turn && !self.in_tx {
            self.db.with(Sql::Begin, |st| st.execute([]))?;
            self.in_tx = true;
        }
        Ok(())
    }

    /// Commit the turn's transaction. On failure the transaction is rolled back: nothing of the
    /// turn is stored, and the caller must not acknowledge anything from it.
    pub fn commit(&mut self) -> Result<()> {
        let turn = std::mem::take(&mut self.turn);
        if let Some(why) = self.abandoned.take() {
            if std::mem::take(&mut self.in_tx) {
                let _ = self.db.conn().execute_batch("ROLLBACK");
            }
            return Err(StoreError::Abandoned(why));
        }
        if self.fail_writes && (turn || self.in_tx) {
            // As when every turn began its transaction: with writes failing, a turn's commit
            // fails whether or not it wrote.
            if std::mem::take(&mut self.in_tx) {
                let _ = self.db.conn().execute_batch("ROLLBACK");
            }
            return Err(StoreError::Injected);
        }
        if !self.in_tx {
            // A write that did not go through `check_write` would have been committed on its
            // own, outside the turn: the tests' debug builds stop there.
            debug_assert!(
                !turn || self.db.conn().total_changes() == self.changes_at_turn,
                "a store write outside the turn's transaction"
            );
            return Ok(());
        }
        self.in_tx = false;
        if let Err(e) = self.db.with(Sql::Commit, |st| st.execute([])) {
            let _ = self.db.conn().execute_batch("ROLLBACK");
            return Err(e);
        }
        Ok(())
    }

    /// Roll back the turn's transaction.
    pub fn rollback(&mut self) {
        self.turn = false;
        self.abandoned = None;
        if self.in_tx {
            self.in_tx = false;
            let _ = self.db.conn().execute_batch("ROLLBACK");
        }
    }

    /// Start a nested unit of work inside the turn (one control request), so a failure part-way
    /// undoes only that request.
    pub fn savepoint(&mut self) -> Result<()> {
        self.check_write()?;
        // Cached: a send outside a turn, or to several recipients, opens one per request.
        self.db
            .conn()
            .prepare_cached("SAVEPOINT request")?
            .execute([])?;
        Ok(())
    }

    /// Keep the request's writes (they commit with the turn).
    pub fn release_savepoint(&mut self) -> Result<()> {
        self.db
            .conn()
            .prepare_cached("RELEASE request")?
            .execute([])?;
        Ok(())
    }

    /// Undo the request's writes.
    pub fn rollback_savepoint(&mut self) {
        let _ = self
            .db
            .conn()
            .execute_batch("ROLLBACK TO request; RELEASE request");
    }

    /// Whether the open turn has written anything (its transaction has begun).
    pub fn wrote(&self) -> bool {
        self.in_tx
    }

    /// Whether a turn is open: [`Store::begin`] and not yet committed or rolled back.
    pub fn in_turn(&self) -> bool {
        self.turn
    }

    /// Make the turn's commit fail and roll back, so that a unit of work that failed part-way
    /// leaves nothing. The member's message path uses this instead of a savepoint per message:
    /// a savepoint makes SQLite copy every page the unit touches into its sub-journal, which
    /// was a tenth of the member's cost per message, and a failed write there is a full disk or
    /// an I/O error, which fails the turn's commit anyway. Outside a turn it does nothing (the
    /// writes were committed one by one); callers take a savepoint there instead.
    pub fn abandon_turn(&mut self, why: &StoreError) {
        // Nothing written yet (the failure was the turn's first write): nothing to take back.
        if self.turn && self.in_tx && self.abandoned.is_none() {
            self.abandoned = Some(why.to_string());
        }
    }

    /// Make every write fail from now on (true) or work again (false). For fault-injection tests.
    #[doc(hidden)]
    pub fn fail_writes(&mut self, fail: bool) {
        self.fail_writes = fail;
    }

    /// Let `n` writes through, then fail the next one (once). For fault-injection tests of a
    /// unit of work that fails part-way.
    #[doc(hidden)]
    pub fn fail_write_after(&mut self, n: u32) {
        self.fail_after = Some(n);
    }

    /// Before every write: the injected failure, and the turn's transaction begun.
    fn check_write(&mut self) -> Result<()> {
        if self.fail_writes {
            return Err(StoreError::Injected);
        }
        match self.fail_after {
            Some(0) => {
                self.fail_after = None;
                return Err(StoreError::Injected);
            }
            Some(n) => self.fail_after = Some(n - 1),
            None => {}
        }
        self.start_tx()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::control::Dir;
    use rusqlite::params;

    /// The first column of every row `sql` returns, as text.
    fn strings(s: &Store, sql: &str) -> Vec<String> {
        s.db.conn()
            .prepare(sql)
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(|r| r.unwrap())
            .collect()
    }

    #[test]
    fn history_filters_and_order() {
        let mut s = Store::open_in_memory().unwrap();
        for (i, peer) in ["bob", "carol", "bob", "dave"].iter().enumerate() {
            s.append(
                i as u64,
                peer,
                RecordBody::Presence {
                    user: peer.to_string(),
                    online: true,
                },
            )
            .unwrap();
        }
        let all = s.records(0, None, None).unwrap();
        assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3, 4]);
        let last2 = s.records(0, None, Some(2)).unwrap();
        assert_eq!(last2.iter().map(|r| r.seq).collect::<Vec<_>>(), [3, 4]);
        let bob = s.records(0, Some("bob"), None).unwrap();
        assert_eq!(bob.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 3]);
        let since = s.records(2, None, None).unwrap();
        assert_eq!(since.iter().map(|r| r.seq).collect::<Vec<_>>(), [3, 4]);
    }

    /// A state set where `outgoing_at` found the message changes that message; a row that is
    /// not that message's changes nothing and is an error, not a silent no-op.
    #[test]
    fn a_state_set_at_a_row_changes_only_the_message_there() {
        let mut s = Store::open_in_memory().unwrap();
        let (one, two) = ([1; 16], [2; 16]);
        assert!(s.add_sent(&one, "bob", &[9; 16], 1, b"sealed one").unwrap());
        assert!(s.add_sent(&two, "bob", &[9; 16], 2, b"sealed two").unwrap());
        let (_, at_one) = s.outgoing_at(&one).unwrap().unwrap();
        let (_, at_two) = s.outgoing_at(&two).unwrap().unwrap();
        assert_ne!(at_one, at_two);
        assert!(matches!(
            s.set_state_at(at_two, &one, MsgState::Delivered),
            Err(StoreError::Internal(m)) if m.contains("not where it was found")
        ));
        assert_eq!(s.outgoing(&one).unwrap().unwrap().3, MsgState::Queued);
        assert_eq!(s.outgoing(&two).unwrap().unwrap().3, MsgState::Queued);
        s.set_state_at(at_one, &one, MsgState::Delivered).unwrap();
        assert_eq!(s.outgoing(&one).unwrap().unwrap().3, MsgState::Delivered);
        assert_eq!(s.outgoing(&two).unwrap().unwrap().3, MsgState::Queued);
        // Delivered, its envelope and its place in the outbox go, as with `set_state`.
        let left: Vec<_> = s.outbox().unwrap().into_iter().map(|(k, _)| k.id).collect();
        assert_eq!(left, [two]);
    }

    #[test]
    fn an_unknown_stored_word_is_corrupt_data_not_a_guess() {
        let mut s = Store::open_in_memory().unwrap();
        let id = [7; 16];
        s.add_message(&id, "bob", Dir::Out, MsgState::Relayed, &[2; 16], 1)
            .unwrap();
        assert_eq!(s.outgoing(&id).unwrap().unwrap().3, MsgState::Relayed);
        s.db.conn()
            .execute(
                "UPDATE messages SET state = 'lost' WHERE id = ?1",
                params![&id[..]],
            )
            .unwrap();
        assert!(matches!(s.outgoing(&id), Err(StoreError::Corrupt(m)) if m.contains("lost")));

        let pin = Pin {
            user: "bob".into(),
            key: b"k".to_vec(),
            trust: PinTrust::Trusted,
            presented: None,
        };
        s.put_pin(&pin).unwrap();
        assert_eq!(s.pins().unwrap(), [pin]);
        s.db.conn()
            .execute("UPDATE pins SET trust = 'maybe'", [])
            .unwrap();
        assert!(matches!(s.pins(), Err(StoreError::Corrupt(m)) if m.contains("maybe")));
    }

    #[test]
    fn a_turn_begins_its_transaction_at_its_first_write() {
        let mut s = Store::open_in_memory().unwrap();
        s.begin().unwrap();
        assert!(
            s.db.conn().is_autocommit(),
            "no transaction for a turn that only reads"
        );
        s.commit().unwrap();

        // A turn's writes are one transaction: a rollback takes back all of them.
        s.begin().unwrap();
        s.add_message(&[1; 16], "bob", Dir::Out, MsgState::Queued, &[2; 16], 1)
            .unwrap();
        assert!(!s.db.conn().is_autocommit(), "the first write began it");
        s.add_message(&[3; 16], "bob", Dir::Out, MsgState::Queued, &[2; 16], 2)
            .unwrap();
        s.rollback();
        assert!(s.outgoing(&[1; 16]).unwrap().is_none());
        assert!(s.outgoing(&[3; 16]).unwrap().is_none());

        s.begin().unwrap();
        s.add_message(&[1; 16], "bob", Dir::Out, MsgState::Queued, &[2; 16], 1)
            .unwrap();
        s.commit().unwrap();
        assert!(s.db.conn().is_autocommit());
        assert!(s.outgoing(&[1; 16]).unwrap().is_some());

        // SQLite rolled the transaction back by itself (as after SQLITE_FULL): no write of the
        // turn may then run outside it, and the turn's commit fails.
        s.begin().unwrap();
        s.add_message(&[5; 16], "bob", Dir::Out, MsgState::Queued, &[2; 16], 3)
            .unwrap();
        s.db.conn().execute_batch("ROLLBACK").unwrap();
        assert!(matches!(
            s.add_message(&[6; 16], "bob", Dir::Out, MsgState::Queued, &[2; 16], 4),
            Err(StoreError::RolledBack)
        ));
        assert!(s.commit().is_err());
        assert!(s.outgoing(&[6; 16]).unwrap().is_none(), "nothing kept");

        // With writes failing, a turn's commit fails even if it wrote nothing, as before.
        s.fail_writes(true);
        s.begin().unwrap();
        assert!(matches!(s.commit(), Err(StoreError::Injected)));
    }

    /// An abandoned turn keeps none of its writes, before or after the abandoning, and says
    /// why; the next turn is as any other. Outside a turn there is nothing to abandon.
    #[test]
    fn an_abandoned_turn_commits_nothing() {
        let mut s = Store::open_in_memory().unwrap();
        s.begin().unwrap();
        s.add_message(&[1; 16], "bob", Dir::Out, MsgState::Queued, &[2; 16], 1)
            .unwrap();
        s.fail_write_after(0);
        let e = s.bind("carol", b"k").unwrap_err();
        s.abandon_turn(&e);
        s.add_message(&[3; 16], "bob", Dir::Out, MsgState::Queued, &[2; 16], 2)
            .unwrap();
        match s.commit() {
            Err(StoreError::Abandoned(why)) => assert!(why.contains("injected"), "{why}"),
            other => panic!("an abandoned turn must not commit: {other:?}"),
        }
        assert!(s.db.conn().is_autocommit(), "the transaction is over");
        assert!(s.outgoing(&[1; 16]).unwrap().is_none());
        assert!(s.outgoing(&[3; 16]).unwrap().is_none());

        s.begin().unwrap();
        s.add_message(&[5; 16], "bob", Dir::Out, MsgState::Queued, &[2; 16], 3)
            .unwrap();
        s.commit().unwrap();
        assert!(s.outgoing(&[5; 16]).unwrap().is_some());

        s.abandon_turn(&StoreError::Injected);
        s.begin().unwrap();
        s.commit().unwrap();
    }

    /// A sent message is queued with its envelope kept and waits in the outbox; the relay's
    /// taking it makes it relayed (once), out of the outbox, its envelope still kept.
    #[test]
    fn a_sent_message_is_stored_with_its_envelope_and_relayed_once() {
        let mut s = Store::open_in_memory().unwrap();
        let (id, session) = ([7; 16], [2; 16]);
        let key = ItemKey {
            kind: Kind::Message,
            id,
        };
        assert!(s.add_sent(&id, "bob", &session, 4, b"envelope").unwrap());
        assert!(!s.add_sent(&id, "bob", &session, 4, b"other").unwrap());
        assert_eq!(
            s.outgoing(&id).unwrap(),
            Some(("bob".to_string(), session, 4, MsgState::Queued))
        );
        assert_eq!(
            s.unsettled("bob", &session).unwrap(),
            [(id, b"envelope".to_vec())]
        );
        assert_eq!(s.outbox().unwrap(), [(key, b"envelope".to_vec())]);
        assert_eq!(s.outbox_messages().unwrap(), 1);
        assert_eq!(s.relayed(&id).unwrap().as_deref(), Some("bob"));
        assert_eq!(s.relayed(&id).unwrap(), None, "relayed already");
        assert_eq!(s.outgoing(&id).unwrap().unwrap().3, MsgState::Relayed);
        assert!(s.outbox().unwrap().is_empty(), "the relay has it");
        assert_eq!(s.outbox_messages().unwrap(), 0);
        assert_eq!(
            s.unsettled("bob", &session).unwrap(),
            [(id, b"envelope".to_vec())],
            "kept until settled"
        );
        // Sent again with its key packet: in the outbox again, as the kept envelope, and the
        // relay's taking it leaves it relayed.
        s.outbox_push(key, b"with key").unwrap();
        assert_eq!(s.outbox().unwrap(), [(key, b"with key".to_vec())]);
        assert_eq!(
            s.unsettled("bob", &session).unwrap(),
            [(id, b"with key".to_vec())]
        );
        assert_eq!(s.relayed(&id).unwrap(), None, "it was relayed before");
        assert!(s.outbox().unwrap().is_empty());
        assert_eq!(s.outgoing(&id).unwrap().unwrap().3, MsgState::Relayed);
        s.outbox_push(key, b"with key").unwrap();
        s.set_state(&id, MsgState::Delivered).unwrap();
        assert!(
            s.outbox().unwrap().is_empty(),
            "a settled message is not sent"
        );
        assert_eq!(s.relayed(&id).unwrap(), None, "delivered stays");
        assert_eq!(s.outgoing(&id).unwrap().unwrap().3, MsgState::Delivered);
        assert!(s.unsettled("bob", &session).unwrap().is_empty());
        // An incoming message of the same id space is never made relayed.
        s.add_message(&[8; 16], "bob", Dir::In, MsgState::Queued, &session, 1)
            .unwrap();
        assert_eq!(s.relayed(&[8; 16]).unwrap(), None);
        assert_eq!(s.relayed(&[9; 16]).unwrap(), None, "unknown id");
    }

    /// A received message's receipt waits in the message's row until the relay takes it; an
    /// item whose message is not stored waits in `outbox`, and both are listed and removed
    /// alike.
    #[test]
    fn receipts_wait_in_their_message_and_strays_in_the_outbox_table() {
        let mut s = Store::open_in_memory().unwrap();
        let (id, session) = ([3; 16], [2; 16]);
        let receipt = ItemKey {
            kind: Kind::Receipt,
            id,
        };
        assert!(s.add_received(&id, "bob", &session, 1, b"receipt").unwrap());
        assert!(
            !s.add_received(&[4; 16], "bob", &session, 1, b"replay")
                .unwrap(),
            "the replay index refuses a second (peer, session, counter)"
        );
        let stray = ItemKey {
            kind: Kind::Message,
            id: [5; 16],
        };
        s.outbox_push(stray, b"stray").unwrap();
        let rekey = ItemKey {
            kind: Kind::Rekey,
            id: [6; 16],
        };
        s.outbox_push(rekey, b"rekey").unwrap();
        assert_eq!(
            s.outbox().unwrap(),
            [
                (receipt, b"receipt".to_vec()),
                (stray, b"stray".to_vec()),
                (rekey, b"rekey".to_vec())
            ]
        );
        assert_eq!(s.outbox_messages().unwrap(), 1, "the stray message");
        assert!(s.outbox_remove(receipt).unwrap());
        assert!(!s.outbox_remove(receipt).unwrap(), "once");
        assert_eq!(s.relayed(&stray.id).unwrap(), None, "no message row");
        assert!(s.outbox_remove(rekey).unwrap());
        assert!(s.outbox().unwrap().is_empty());
        assert_eq!(s.outbox_messages().unwrap(), 0);
        let item: Option<Vec<u8>> =
            s.db.conn()
                .query_row(
                    "SELECT item FROM messages WHERE id = ?1",
                    params![&id[..]],
                    |r| r.get(0),
                )
                .unwrap();
        assert_eq!(item, None, "a sent receipt is not kept");
    }

    /// A database from before keeps its outbox: the messages and receipts in `outbox` move into
    /// their rows at open, once, and are sent and removed as new ones; the outbox is read
    /// through its index, not by reading every message ever stored.
    #[test]
    fn an_old_outbox_moves_into_the_messages_rows_and_is_read_by_its_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE messages (id BLOB PRIMARY KEY, peer TEXT NOT NULL,
                     dir TEXT NOT NULL, state TEXT NOT NULL, session BLOB NOT NULL,
                     counter INTEGER NOT NULL, item BLOB);
                 CREATE TABLE outbox (seq INTEGER PRIMARY KEY, kind TEXT NOT NULL,
                     id BLOB NOT NULL, item BLOB NOT NULL, UNIQUE(kind, id));",
            )
            .unwrap();
            for (id, dir, state, item) in [
                ([1u8; 16], "out", "queued", Some(&b"env1"[..])),
                ([2; 16], "in", "delivered", None),
                ([3; 16], "out", "relayed", Some(&b"env3"[..])),
            ] {
                c.execute(
                    "INSERT INTO messages VALUES (?1, 'bob', ?2, ?3, ?4, ?5, ?6)",
                    params![&id[..], dir, state, &[9u8; 16][..], id[0] as i64, item],
                )
                .unwrap();
            }
            for (kind, id, item) in [
                ("message", [1u8; 16], &b"env1"[..]),
                ("receipt", [2; 16], b"rc2"),
                ("rekey", [7; 16], b"rk7"),
                ("message", [8; 16], b"stray"),
            ] {
                c.execute(
                    "INSERT INTO outbox (kind, id, item) VALUES (?1, ?2, ?3)",
                    params![kind, &id[..], item],
                )
                .unwrap();
            }
        }
        let key = |kind, b: u8| ItemKey { kind, id: [b; 16] };
        let mut s = Store::open(&path).unwrap();
        let moved: i64 =
            s.db.conn()
                .query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))
                .unwrap();
        assert_eq!(moved, 2, "the rekey and the stray stay in the table");
        assert_eq!(
            s.outbox().unwrap(),
            [
                (key(Kind::Message, 1), b"env1".to_vec()),
                (key(Kind::Receipt, 2), b"rc2".to_vec()),
                (key(Kind::Rekey, 7), b"rk7".to_vec()),
                (key(Kind::Message, 8), b"stray".to_vec()),
            ]
        );
        assert_eq!(s.outbox_messages().unwrap(), 2);
        assert_eq!(s.relayed(&[1; 16]).unwrap().as_deref(), Some("bob"));
        assert!(s.outbox_remove(key(Kind::Receipt, 2)).unwrap());
        assert!(s.outbox_remove(key(Kind::Message, 8)).unwrap());
        assert_eq!(
            s.outbox().unwrap(),
            [(key(Kind::Rekey, 7), b"rk7".to_vec())]
        );
        drop(s);
        Store::open(&path).unwrap();

        let s = Store::open_in_memory().unwrap();
        let plan: Vec<String> =
            s.db.conn()
                .prepare(&format!(
                    "EXPLAIN QUERY PLAN {}",
                    member_tables::UNSENT_ROWS
                ))
                .unwrap()
                .query_map([], |r| r.get(3))
                .unwrap()
                .map(|r| r.unwrap())
                .collect();
        assert!(
            plan.iter().any(|p| p.contains("messages_unsent"))
                && !plan.iter().any(|p| p.contains("TEMP B-TREE")),
            "{plan:?}"
        );
    }

    /// History and outbox rows are numbered without `sqlite_sequence` (one write less per
    /// insert), and a database whose tables were made with AUTOINCREMENT goes on numbering.
    #[test]
    fn history_and_outbox_are_numbered_without_sqlite_sequence() {
        let key = ItemKey {
            kind: Kind::Message,
            id: [4; 16],
        };
        let presence = |user: &str| RecordBody::Presence {
            user: user.into(),
            online: true,
        };
        let mut s = Store::open_in_memory().unwrap();
        assert_eq!(s.append(1, "bob", presence("bob")).unwrap().seq, 1);
        assert_eq!(s.append(2, "bob", presence("bob")).unwrap().seq, 2);
        s.outbox_push(key, b"x").unwrap();
        let count =
            |s: &Store, sql: &str| -> i64 { s.db.conn().query_row(sql, [], |r| r.get(0)).unwrap() };
        assert_eq!(
            count(
                &s,
                "SELECT COUNT(*) FROM sqlite_sequence WHERE name IN ('history', 'outbox')"
            ),
            0,
            "no sqlite_sequence row for history or outbox"
        );

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let old = Connection::open(&path).unwrap();
            old.execute_batch(
                "CREATE TABLE history (seq INTEGER PRIMARY KEY AUTOINCREMENT,
                     time_ms INTEGER NOT NULL, peer TEXT NOT NULL, body BLOB NOT NULL, kind TEXT);
                 CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL,
                     id BLOB NOT NULL, item BLOB NOT NULL, UNIQUE(kind, id));
                 CREATE INDEX history_kind ON history(kind, seq);",
            )
            .unwrap();
        }
        let mut s = Store::open(&path).unwrap();
        assert_eq!(
            count(
                &s,
                "SELECT COUNT(*) FROM sqlite_master WHERE name = 'history_kind'"
            ),
            0,
            "the unused (kind, seq) index is dropped"
        );
        assert_eq!(s.append(1, "bob", presence("bob")).unwrap().seq, 1);
        assert_eq!(s.append(2, "carol", presence("carol")).unwrap().seq, 2);
        s.outbox_push(key, b"x").unwrap();
        assert_eq!(s.outbox().unwrap(), [(key, b"x".to_vec())]);
        assert_eq!(s.records(1, None, None).unwrap()[0].body.peer(), "carol");
    }

    /// The bundled SQLite is built with `.cargo/config.toml`'s flags: no process-wide mutex per
    /// page-cache fetch or allocation on the message path, and room in the lookaside. Fails if
    /// the build ran outside this tree or with `LIBSQLITE3_FLAGS` set in the environment, which
    /// cargo lets win over the file.
    #[test]
    fn sqlite_is_built_with_the_flags_of_cargo_config() {
        let s = Store::open_in_memory().unwrap();
        let opts = strings(&s, "PRAGMA compile_options");
        assert!(opts.iter().any(|o| o == "DEFAULT_MEMSTATUS=0"), "{opts:?}");
        assert!(
            !opts.iter().any(|o| o == "ENABLE_MEMORY_MANAGEMENT"),
            "{opts:?}"
        );
        assert!(
            opts.iter().any(|o| o == "DEFAULT_LOOKASIDE=1200,200"),
            "{opts:?}"
        );
    }

    /// One peer's records are read through the `(peer, seq)` index, not by reading the whole
    /// history; the rows a start still has to give a kind are found through their own (empty)
    /// index; and no `(kind, seq)` index costs the appends anything.
    #[test]
    fn history_reads_use_their_indexes_and_appends_pay_for_no_other() {
        let s = Store::open_in_memory().unwrap();
        let plan = |sql: &str, peer: Option<&str>| -> String {
            let mut stmt =
                s.db.conn()
                    .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                    .unwrap();
            let rows = stmt
                .query_map(params![0i64, peer, 10i64, None::<String>], |r| {
                    r.get::<_, String>(3)
                })
                .unwrap();
            rows.map(|r| r.unwrap()).collect::<Vec<_>>().join("; ")
        };
        for sql in [member_tables::PAGE_OF_PEER, member_tables::LAST_OF_PEER] {
            let p = plan(sql, Some("bob"));
            assert!(p.contains("INDEX history_peer"), "{p}");
        }
        let unkinded = UNKINDED;
        let detail: String =
            s.db.conn()
                .query_row(&format!("EXPLAIN QUERY PLAN {unkinded}"), [], |r| r.get(3))
                .unwrap();
        assert!(detail.contains("history_unkinded"), "{detail}");
        let indexes = strings(
            &s,
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'history'",
        );
        assert_eq!(indexes.len(), 2, "{indexes:?}");
        assert!(!indexes.iter().any(|i| i == "history_kind"), "{indexes:?}");

        // The code's own statements give the same answers with and without a peer.
        let mut s = s;
        for (i, peer) in ["bob", "carol", "bob"].iter().enumerate() {
            s.append(
                i as u64,
                peer,
                RecordBody::Presence {
                    user: peer.to_string(),
                    online: true,
                },
            )
            .unwrap();
        }
        let seqs =
            |f: &Filter| -> Vec<u64> { s.page(0, f, 10).unwrap().iter().map(|r| r.seq).collect() };
        assert_eq!(seqs(&Filter::peer(Some("bob"))), [1, 3]);
        assert_eq!(seqs(&Filter::peer(None)), [1, 2, 3]);
        assert_eq!(
            s.start_of_last(0, &Filter::peer(Some("bob")), 1).unwrap(),
            2
        );
        assert_eq!(s.start_of_last(0, &Filter::peer(None), 2).unwrap(), 1);
    }

    #[test]
    fn message_ids_stored_once_and_replays_detected() {
        let mut s = Store::open_in_memory().unwrap();
        let id = [1; 16];
        assert!(s
            .add_message(&id, "bob", Dir::In, MsgState::Delivered, &[2; 16], 5)
            .unwrap());
        assert!(!s
            .add_message(&id, "bob", Dir::In, MsgState::Delivered, &[2; 16], 5)
            .unwrap());
        // A replay: a new id, but the (peer, session, counter) of a message already in.
        assert!(!s
            .add_message(&[3; 16], "bob", Dir::In, MsgState::Delivered, &[2; 16], 5)
            .unwrap());
        assert!(s
            .add_message(&[4; 16], "bob", Dir::In, MsgState::Delivered, &[2; 16], 6)
            .unwrap());
        // Sent messages are not in the replay index: their counters are our own.
        assert!(s
            .add_message(&[5; 16], "bob", Dir::Out, MsgState::Queued, &[2; 16], 5)
            .unwrap());
    }

    #[test]
    fn rollback_discards_the_turn() {
        let mut s = Store::open_in_memory().unwrap();
        s.begin().unwrap();
        s.bind("alice", b"k").unwrap();
        s.rollback();
        assert!(s.bindings().unwrap().is_empty());
        s.begin().unwrap();
        s.bind("alice", b"k").unwrap();
        s.fail_writes(true);
        assert!(s.commit().is_err());
        s.fail_writes(false);
        assert!(s.bindings().unwrap().is_empty());
    }

    #[test]
    fn queue_roundtrip() {
        let mut s = Store::open_in_memory().unwrap();
        let k = ItemKey {
            kind: Kind::Receipt,
            id: [9; 16],
        };
        s.enqueue("bob", k, b"x").unwrap();
        s.enqueue("bob", k, b"x").unwrap();
        assert_eq!(s.queued().unwrap().len(), 1);
        s.dequeue("bob", k).unwrap();
        assert!(s.queued().unwrap().is_empty());
    }
}
