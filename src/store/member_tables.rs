//! The member role's tables: history, message states, outbox, held envelopes, session keys and
//! pins. Every SQL statement of the member lives here but those of the message path, held
//! prepared in `prepared.rs`. Must never: decide a protocol question
//! (the member core does), or log a message text or key.

use rusqlite::{params, OptionalExtension};

use super::*;
#[cfg(test)]
use crate::proto::control::Dir;

// The history reads, one statement per filter shape (parameters: ?1 after, ?2 peer, ?3 limit or
// offset, ?4 kinds). `(?2 IS NULL OR peer = ?2)` would keep SQLite from using the `(peer, seq)`
// index, and one peer's records would be found by reading all of them.
pub(super) const PAGE_OF_PEER: &str = "SELECT seq, time_ms, body FROM history
     WHERE peer = ?2 AND seq > ?1 AND (?4 IS NULL OR instr(?4, ',' || kind || ',') > 0)
     ORDER BY seq ASC LIMIT ?3";
pub(super) const PAGE_OF_ALL: &str = "SELECT seq, time_ms, body FROM history
     WHERE seq > ?1 AND ?2 IS NULL AND (?4 IS NULL OR instr(?4, ',' || kind || ',') > 0)
     ORDER BY seq ASC LIMIT ?3";
pub(super) const LAST_OF_PEER: &str = "SELECT seq FROM history
     WHERE peer = ?2 AND seq > ?1 AND (?4 IS NULL OR instr(?4, ',' || kind || ',') > 0)
     ORDER BY seq DESC LIMIT 1 OFFSET ?3";
pub(super) const LAST_OF_ALL: &str = "SELECT seq FROM history
     WHERE seq > ?1 AND ?2 IS NULL AND (?4 IS NULL OR instr(?4, ',' || kind || ',') > 0)
     ORDER BY seq DESC LIMIT 1 OFFSET ?3";

/// The messages and receipts waiting in the outbox, through the partial index `messages_unsent`
/// (a test reads the plan: without it every message ever stored would be read at each login).
pub(super) const UNSENT_ROWS: &str = "SELECT dir, id, item FROM messages
     WHERE unsent = 1 AND item IS NOT NULL ORDER BY rowid";

impl Store {
    // ---- member: history ----

    /// Append a history record and return it with its seq.
    pub fn append(&mut self, time_ms: u64, peer: &str, body: RecordBody) -> Result<Record> {
        self.check_write()?;
        let blob = to_payload(&body).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.db.with(Sql::HistoryAppend, |st| {
            st.execute(params![time_ms as i64, peer, blob, body.kind().as_str()])
        })?;
        let seq = self.db.conn().last_insert_rowid() as u64;
        Ok(Record { seq, time_ms, body })
    }

    /// Records in seq order: those with seq > `since`, only `peer`'s if given, the last `last`
    /// of them (all if `last` is None). The same selection `tail` pages through.
    pub fn records(
        &self,
        since: u64,
        peer: Option<&str>,
        last: Option<u64>,
    ) -> Result<Vec<Record>> {
        let filter = Filter::peer(peer);
        let after = match last {
            Some(n) => self.start_of_last(since, &filter, n)?,
            None => since,
        };
        self.page(after, &filter, i64::MAX as u64)
    }

    /// The seq after which the last `n` records newer than `since` that pass `filter` begin;
    /// `since` when there are fewer.
    pub fn start_of_last(&self, since: u64, filter: &Filter, n: u64) -> Result<u64> {
        if n == 0 {
            return Ok(self.last_seq()?.max(since));
        }
        let sql = if filter.peer.is_some() {
            LAST_OF_PEER
        } else {
            LAST_OF_ALL
        };
        let seq: Option<i64> = self
            .db
            .conn()
            .prepare_cached(sql)?
            .query_row(
                params![
                    since as i64,
                    filter.peer.as_deref(),
                    (n - 1).min(i64::MAX as u64) as i64,
                    filter.kinds_param()
                ],
                |r| r.get(0),
            )
            .optional()?;
        Ok(match seq {
            Some(s) => (s as u64).saturating_sub(1).max(since),
            None => since,
        })
    }

    /// Up to `limit` records with seq > `after` that pass `filter`, oldest first.
    pub fn page(&self, after: u64, filter: &Filter, limit: u64) -> Result<Vec<Record>> {
        let sql = if filter.peer.is_some() {
            PAGE_OF_PEER
        } else {
            PAGE_OF_ALL
        };
        let mut stmt = self.db.conn().prepare_cached(sql)?;
        let out = history_rows(stmt.query(params![
            after as i64,
            filter.peer.as_deref(),
            limit as i64,
            filter.kinds_param()
        ])?)?;
        Ok(out)
    }

    /// Highest seq in the history (0 when empty).
    pub fn last_seq(&self) -> Result<u64> {
        Ok(self
            .db
            .conn()
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM history", [], |r| {
                r.get::<_, i64>(0)
            })? as u64)
    }

    // ---- member: messages ----

    /// Remember a message id in any state, with nothing to send (the tests' way to make a row;
    /// the member stores through `add_sent` and `add_received`). False if the id was already
    /// stored, or if an incoming one's (peer, session, counter) was (`messages_replay`).
    #[cfg(test)]
    pub fn add_message(
        &mut self,
        id: &[u8; 16],
        peer: &str,
        dir: Dir,
        state: MsgState,
        session: &[u8; 16],
        counter: u64,
    ) -> Result<bool> {
        self.check_write()?;
        let n = self
            .db
            .conn()
            .prepare_cached(
                "INSERT OR IGNORE INTO messages (id, peer, dir, state, session, counter)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                &id[..],
                peer,
                if dir == Dir::In { "in" } else { "out" },
                state_str(state),
                &session[..],
                counter as i64
            ])?;
        Ok(n == 1)
    }

    /// Remember a message we send: queued, with its encoded envelope kept until it is settled,
    /// and in the outbox until the relay takes it (the row is its place in the outbox: the
    /// envelope is written once). False if the id was already stored.
    pub fn add_sent(
        &mut self,
        id: &[u8; 16],
        peer: &str,
        session: &[u8; 16],
        counter: u64,
        item: &[u8],
    ) -> Result<bool> {
        self.check_write()?;
        let n = self.db.with(Sql::MessageAddSent, |st| {
            st.execute(params![&id[..], peer, &session[..], counter as i64, item])
        })?;
        Ok(n == 1)
    }

    /// Remember a message we received, delivered, with its encoded `receipt` in the outbox
    /// until the relay takes it (one row for both). False if the id was already stored, or if
    /// its (peer, session, counter) was (the replay index, `messages_replay`).
    pub fn add_received(
        &mut self,
        id: &[u8; 16],
        peer: &str,
        session: &[u8; 16],
        counter: u64,
        receipt: &[u8],
    ) -> Result<bool> {
        self.check_write()?;
        let n = self.db.with(Sql::MessageAddReceived, |st| {
            st.execute(params![
                &id[..],
                peer,
                &session[..],
                counter as i64,
                receipt
            ])
        })?;
        Ok(n == 1)
    }

    /// The relay took sent message `id`: it leaves the outbox, and if it was `queued` it
    /// becomes `relayed`. Its recipient if it was queued; `None` if it was in another state, not
    /// in the outbox, or unknown (and then it leaves the `outbox` table if it was there).
    ///
    /// The row is found once and updated by its rowid: finding it by id again, as the
    /// statements apart did, cost a second search of the id index.
    pub fn relayed(&mut self, id: &[u8; 16]) -> Result<Option<String>> {
        self.check_write()?;
        let row = self.db.with(Sql::MessageUnsent, |st| {
            st.query_row(params![&id[..]], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, bool>(2)?,
                ))
            })
            .optional()
        })?;
        let Some((rowid, peer, queued)) = row else {
            self.db.with(Sql::OutboxRemove, |st| {
                st.execute(params![kind_str(Kind::Message), &id[..]])
            })?;
            return Ok(None);
        };
        self.db
            .with(Sql::MessageTaken, |st| st.execute(params![rowid]))?;
        Ok(queued.then_some(peer))
    }

    /// Whether a message id is stored.
    pub fn has_message(&self, id: &[u8; 16]) -> Result<bool> {
        Ok(self
            .db
            .with(Sql::MessageHas, |st| {
                st.query_row(params![&id[..]], |_| Ok(())).optional()
            })?
            .is_some())
    }

    /// A sent message's recipient, session, counter and state.
    pub fn outgoing(&self, id: &[u8; 16]) -> Result<Option<Outgoing>> {
        Ok(self.outgoing_at(id)?.map(|(o, _)| o))
    }

    /// [`Store::outgoing`], and where the message is, for [`Store::set_state_at`].
    pub fn outgoing_at(&self, id: &[u8; 16]) -> Result<Option<(Outgoing, Row)>> {
        let row = self.db.with(Sql::MessageOutgoing, |st| {
            st.query_row(params![&id[..]], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })
            .optional()
        })?;
        match row {
            None => Ok(None),
            Some((peer, session, counter, state, rowid)) => Ok(Some((
                (peer, id16(session)?, counter as u64, state_parse(&state)?),
                Row(rowid),
            ))),
        }
    }

    /// Set a sent message's state.
    pub fn set_state(&mut self, id: &[u8; 16], state: MsgState) -> Result<()> {
        self.check_write()?;
        self.db.with(Sql::MessageSetState, |st| {
            st.execute(params![&id[..], state_str(state)])
        })?;
        Ok(())
    }

    /// [`Store::set_state`] of message `id` at `row`, where [`Store::outgoing_at`] found it in
    /// this turn. A row that is not message `id`'s changes nothing, and says so.
    pub fn set_state_at(&mut self, row: Row, id: &[u8; 16], state: MsgState) -> Result<()> {
        self.check_write()?;
        let n = self.db.with(Sql::MessageSetStateAt, |st| {
            st.execute(params![&id[..], state_str(state), row.0])
        })?;
        if n != 1 {
            return Err(StoreError::Internal(format!(
                "message {} is not where it was found",
                crate::proto::hex(id)
            )));
        }
        Ok(())
    }

    /// The kept envelopes of messages to `peer` in `session` that are not settled yet, in
    /// counter order.
    pub fn unsettled(&self, peer: &str, session: &[u8; 16]) -> Result<Vec<([u8; 16], Vec<u8>)>> {
        let mut stmt = self.db.conn().prepare_cached(
            "SELECT id, item FROM messages
             WHERE dir = 'out' AND peer = ?1 AND session = ?2 AND item IS NOT NULL
             AND state IN ('queued', 'relayed')
             ORDER BY counter",
        )?;
        let rows = stmt.query_map(params![peer, &session[..]], |r| {
            Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, item) = row?;
            out.push((id16(id)?, item));
        }
        Ok(out)
    }

    // ---- member: outbox ----
    //
    // A message and a receipt wait in their message's row (`unsent` = 1, the bytes in `item`);
    // `outbox` holds the rest (rekey requests, and any message or receipt whose message row is
    // not stored).

    /// Add an encoded item to the outbox (idempotent). A message's item also becomes the
    /// envelope it keeps until it is settled (a message sent again with its key packet).
    pub fn outbox_push(&mut self, key: ItemKey, item: &[u8]) -> Result<()> {
        self.check_write()?;
        let dir = match key.kind {
            Kind::Message => Some("out"),
            Kind::Receipt => Some("in"),
            Kind::Rekey => None,
        };
        if let Some(dir) = dir {
            let n = self
                .db
                .conn()
                .prepare_cached(
                    "UPDATE messages SET item = ?2, unsent = 1 WHERE id = ?1 AND dir = ?3",
                )?
                .execute(params![&key.id[..], item, dir])?;
            if n > 0 {
                return Ok(());
            }
        }
        self.db.with(Sql::OutboxPush, |st| {
            st.execute(params![kind_str(key.kind), &key.id[..], item])
        })?;
        Ok(())
    }

    /// Remove an item from the outbox; true if it was there.
    pub fn outbox_remove(&mut self, key: ItemKey) -> Result<bool> {
        self.check_write()?;
        let in_row = match key.kind {
            Kind::Message => Some(Sql::MessageSent),
            Kind::Receipt => Some(Sql::ReceiptSent),
            Kind::Rekey => None,
        };
        if let Some(sql) = in_row {
            if self.db.with(sql, |st| st.execute(params![&key.id[..]]))? > 0 {
                return Ok(true);
            }
        }
        let n = self.db.with(Sql::OutboxRemove, |st| {
            st.execute(params![kind_str(key.kind), &key.id[..]])
        })?;
        Ok(n > 0)
    }

    /// Every outbox item: the messages and receipts in the order they were stored, then the
    /// rest, oldest first.
    pub fn outbox(&self) -> Result<Vec<(ItemKey, Vec<u8>)>> {
        let mut out = Vec::new();
        let mut stmt = self.db.conn().prepare_cached(UNSENT_ROWS)?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let kind = match r.get_ref(0)?.as_str().unwrap_or("") {
                "out" => Kind::Message,
                "in" => Kind::Receipt,
                other => return Err(StoreError::Corrupt(format!("unknown direction {other:?}"))),
            };
            out.push((
                ItemKey {
                    kind,
                    id: id16(r.get(1)?)?,
                },
                r.get(2)?,
            ));
        }
        let mut stmt = self
            .db
            .conn()
            .prepare_cached("SELECT kind, id, item FROM outbox ORDER BY seq")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let kind: String = r.get(0)?;
            out.push((
                ItemKey {
                    kind: kind_parse(&kind)?,
                    id: id16(r.get(1)?)?,
                },
                r.get(2)?,
            ));
        }
        Ok(out)
    }

    /// Number of messages (not receipts) waiting in the outbox.
    pub fn outbox_messages(&self) -> Result<u64> {
        Ok(self.db.conn().query_row(
            "SELECT (SELECT COUNT(*) FROM messages
                     WHERE unsent = 1 AND dir = 'out' AND item IS NOT NULL)
                  + (SELECT COUNT(*) FROM outbox WHERE kind = 'message')",
            [],
            |r| r.get::<_, i64>(0),
        )? as u64)
    }

    // ---- member: held envelopes (sender changed key or not introduced yet) ----

    /// Keep an envelope from `peer` for later (idempotent).
    pub fn hold(&mut self, id: &[u8; 16], peer: &str, item: &[u8]) -> Result<()> {
        self.check_write()?;
        self.db
            .conn()
            .prepare_cached(
                "INSERT OR IGNORE INTO held (id, peer, item, seq)
                 VALUES (?1, ?2, ?3, (SELECT COALESCE(MAX(seq), 0) + 1 FROM held))",
            )?
            .execute(params![&id[..], peer, item])?;
        Ok(())
    }

    /// Up to `limit` envelopes held from `peer` with `after` < seq <= `upto`, oldest first, each
    /// with its seq: a release reads them in bounded batches, never all at once.
    pub fn held_batch(&self, peer: &str, after: u64, upto: u64, limit: usize) -> Result<Vec<Held>> {
        let mut stmt = self.db.conn().prepare_cached(
            "SELECT seq, id, item FROM held WHERE peer = ?1 AND seq > ?2 AND seq <= ?3
             ORDER BY seq LIMIT ?4",
        )?;
        let rows = stmt.query_map(
            params![peer, after as i64, upto as i64, limit as i64],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                ))
            },
        )?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, id, item) = row?;
            out.push((seq as u64, id16(id)?, item));
        }
        Ok(out)
    }

    /// How many envelopes are held, and their bytes: from `peer`, or from everyone.
    pub fn held_size(&self, peer: Option<&str>) -> Result<(u64, u64)> {
        let (n, bytes): (i64, i64) = self
            .db
            .conn()
            .prepare_cached(
                "SELECT COUNT(*), COALESCE(SUM(length(item)), 0) FROM held
                 WHERE ?1 IS NULL OR peer = ?1",
            )?
            .query_row(params![peer], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok((n as u64, bytes as u64))
    }

    /// The highest seq of the held table (0 when empty).
    pub fn held_last_seq(&self) -> Result<u64> {
        Ok(self
            .db
            .conn()
            .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM held")?
            .query_row([], |r| r.get::<_, i64>(0))? as u64)
    }

    /// Drop everything held from `peer`; how many envelopes and bytes that was.
    pub fn drop_held(&mut self, peer: &str) -> Result<(u64, u64)> {
        self.check_write()?;
        let size = self.held_size(Some(peer))?;
        self.db
            .conn()
            .prepare_cached("DELETE FROM held WHERE peer = ?1")?
            .execute(params![peer])?;
        Ok(size)
    }

    /// Drop a held envelope.
    pub fn unhold(&mut self, id: &[u8; 16]) -> Result<()> {
        self.check_write()?;
        self.db
            .conn()
            .prepare_cached("DELETE FROM held WHERE id = ?1")?
            .execute(params![&id[..]])?;
        Ok(())
    }

    // ---- member: sessions ----

    /// Store a session key. `sending` selects the table.
    pub fn put_session(
        &mut self,
        sending: bool,
        peer: &str,
        session: &[u8; 16],
        key: &[u8; 32],
    ) -> Result<()> {
        self.check_write()?;
        let sql = if sending {
            "INSERT OR REPLACE INTO send_sessions (peer, session, key) VALUES (?1, ?2, ?3)"
        } else {
            "INSERT OR REPLACE INTO recv_sessions (peer, session, key) VALUES (?1, ?2, ?3)"
        };
        self.db
            .conn()
            .prepare_cached(sql)?
            .execute(params![peer, &session[..], &key[..]])?;
        Ok(())
    }

    /// Look up a session key.
    pub fn session(
        &self,
        sending: bool,
        peer: &str,
        session: &[u8; 16],
    ) -> Result<Option<Vec<u8>>> {
        let q = if sending {
            Sql::SendSession
        } else {
            Sql::RecvSession
        };
        self.db.with(q, |st| {
            st.query_row(params![peer, &session[..]], |r| r.get::<_, Vec<u8>>(0))
                .optional()
        })
    }

    // ---- member: pins ----

    /// Every pin.
    pub fn pins(&self) -> Result<Vec<Pin>> {
        let mut stmt = self
            .db
            .conn()
            .prepare_cached("SELECT user, key, trust, presented FROM pins ORDER BY user")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<Vec<u8>>>(3)?,
            ))
        })?;
        let mut pins = Vec::new();
        for row in rows {
            let (user, key, trust, presented) = row?;
            pins.push(Pin {
                user,
                key,
                trust: PinTrust::parse(&trust)?,
                presented,
            });
        }
        Ok(pins)
    }

    /// Remove `user`'s pin; true if there was one.
    pub fn delete_pin(&mut self, user: &str) -> Result<bool> {
        self.check_write()?;
        let n = self
            .db
            .conn()
            .prepare_cached("DELETE FROM pins WHERE user = ?1")?
            .execute(params![user])?;
        Ok(n == 1)
    }

    /// Insert or replace a pin.
    pub fn put_pin(&mut self, pin: &Pin) -> Result<()> {
        self.check_write()?;
        self.db
            .conn()
            .prepare_cached(
                "INSERT OR REPLACE INTO pins (user, key, trust, presented) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![
                pin.user,
                pin.key,
                pin.trust.as_str(),
                pin.presented
            ])?;
        Ok(())
    }
}
