//! The relay role's tables: name bindings and queued items. Every SQL statement of the relay
//! lives here but those of the message path, held prepared in `prepared.rs`. Must never: decide
//! a protocol question (the relay core does), or read an item's contents (they are sealed
//! envelopes and receipts, stored as bytes).

use rusqlite::{params, OptionalExtension};

use super::*;

impl Store {
    // ---- relay: bindings ----

    /// Every name binding.
    pub fn bindings(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let mut stmt = self
            .db
            .conn()
            .prepare_cached("SELECT user, key FROM bindings ORDER BY user")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<std::result::Result<Vec<_>, _>>()?)
    }

    /// Bind a name to a key.
    pub fn bind(&mut self, user: &str, key: &[u8]) -> Result<()> {
        self.check_write()?;
        self.db
            .conn()
            .prepare_cached("INSERT OR REPLACE INTO bindings (user, key) VALUES (?1, ?2)")?
            .execute(params![user, key])?;
        Ok(())
    }

    /// Drop a name's binding and queue.
    pub fn unbind(&mut self, user: &str) -> Result<()> {
        self.check_write()?;
        self.db
            .conn()
            .prepare_cached("DELETE FROM bindings WHERE user = ?1")?
            .execute(params![user])?;
        self.db
            .conn()
            .prepare_cached("DELETE FROM queue WHERE user = ?1")?
            .execute(params![user])?;
        Ok(())
    }

    // ---- relay: notices for senders whose queued items were dropped ----

    /// Remember to tell `user` that their item `key` was dropped, and why (idempotent).
    pub fn add_notice(&mut self, user: &str, key: ItemKey, reason: &str) -> Result<()> {
        self.check_write()?;
        self.db
            .conn()
            .prepare_cached(
                "INSERT OR IGNORE INTO notices (user, kind, id, reason) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![user, kind_str(key.kind), &key.id[..], reason])?;
        Ok(())
    }

    /// Take every notice for `user`: returned, and gone from the table.
    pub fn take_notices(&mut self, user: &str) -> Result<Vec<(ItemKey, String)>> {
        self.check_write()?;
        let mut out = Vec::new();
        {
            let mut stmt = self
                .db
                .conn()
                .prepare_cached("SELECT kind, id, reason FROM notices WHERE user = ?1")?;
            let mut rows = stmt.query(params![user])?;
            while let Some(r) = rows.next()? {
                let (kind, id, reason): (String, Vec<u8>, String) =
                    (r.get(0)?, r.get(1)?, r.get(2)?);
                out.push((
                    ItemKey {
                        kind: kind_parse(&kind)?,
                        id: id16(id)?,
                    },
                    reason,
                ));
            }
        }
        self.db
            .conn()
            .prepare_cached("DELETE FROM notices WHERE user = ?1")?
            .execute(params![user])?;
        Ok(out)
    }

    // ---- relay: queues ----

    /// Queue an item for `user` (idempotent).
    pub fn enqueue(&mut self, user: &str, key: ItemKey, item: &[u8]) -> Result<()> {
        self.check_write()?;
        self.db.with(Sql::QueuePush, |st| {
            st.execute(params![user, kind_str(key.kind), &key.id[..], item])
        })?;
        Ok(())
    }

    /// Drop an acknowledged item.
    pub fn dequeue(&mut self, user: &str, key: ItemKey) -> Result<()> {
        self.check_write()?;
        self.db.with(Sql::QueueRemove, |st| {
            st.execute(params![user, kind_str(key.kind), &key.id[..]])
        })?;
        Ok(())
    }

    /// Every queued item's recipient, key and encoded size, in arrival order.
    pub fn queued_sizes(&self) -> Result<Vec<(String, ItemKey, usize)>> {
        let mut stmt = self
            .db
            .conn()
            .prepare_cached("SELECT user, kind, id, length(item) FROM queue ORDER BY seq")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Vec<u8>>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (user, kind, id, size) = row?;
            out.push((
                user,
                ItemKey {
                    kind: kind_parse(&kind)?,
                    id: id16(id)?,
                },
                size.max(0) as usize,
            ));
        }
        Ok(out)
    }

    /// One queued item's encoded bytes.
    pub fn queued_item(&self, user: &str, key: ItemKey) -> Result<Option<Vec<u8>>> {
        self.db.with(Sql::QueueItem, |st| {
            st.query_row(params![user, kind_str(key.kind), &key.id[..]], |r| {
                r.get::<_, Vec<u8>>(0)
            })
            .optional()
        })
    }

    /// Every queued item, in arrival order.
    pub fn queued(&self) -> Result<Vec<Queued>> {
        let mut stmt = self
            .db
            .conn()
            .prepare_cached("SELECT user, kind, id, item FROM queue ORDER BY seq")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Vec<u8>>(2)?,
                r.get::<_, Vec<u8>>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (user, kind, id, item) = row?;
            out.push(Queued {
                user,
                key: ItemKey {
                    kind: kind_parse(&kind)?,
                    id: id16(id)?,
                },
                item,
            });
        }
        Ok(out)
    }
}
