//! The keys a run has written, so that a key seen again in a later batch is
//! counted as a `duplicate` (exactly, never by a probabilistic filter).
//!
//! Integer keys (one key column, |value| <= 2^53, where the canonical text
//! and the integer name each other one to one) live in a chunked bitmap in
//! memory: dense ids cost one bit each. When the ids are too sparse for the
//! bitmap's budget, they move to a temporary `INTEGER PRIMARY KEY` table.
//! Every other key is kept by its canonical text, in memory up to a budget,
//! past it in the temporary table `_idemload_run_keys`, which the run's
//! `begin` empties. Temporary tables live in a file of their own, so memory
//! stays flat at any size.

use std::collections::{HashMap, HashSet};

use rusqlite::Connection;
use serde_json::Value;

use crate::error::Result;
use crate::key::Key;

/// Ids per bitmap chunk.
const CHUNK_BITS: i64 = 4096;
/// Bitmap chunks kept in memory (about 2.2 MB) before the ids move to a
/// temporary table.
const MAX_CHUNKS: usize = 4096;
/// Integers whose canonical JSON is their plain digits.
const EXACT_INT: i64 = 1 << 53;
/// Bytes of key text kept in memory before the texts move to a temporary
/// table.
const MAX_TEXT_BYTES: usize = 32 << 20;

/// Keys written by the current run.
#[derive(Default)]
pub(super) struct RunKeys {
    chunks: HashMap<i64, Box<[u64; (CHUNK_BITS / 64) as usize]>>,
    /// The integer keys moved to `temp._idemload_run_ints`.
    spilled: bool,
    /// Canonical texts of the other keys, while they fit the budget
    /// (foldhash, seeded per process: one hash per record).
    texts: HashSet<Box<str>, foldhash::fast::RandomState>,
    text_bytes: usize,
    /// The texts moved to `temp._idemload_run_keys`.
    texts_spilled: bool,
    /// Some key was noted.
    any: bool,
}

impl RunKeys {
    /// Notes a key; true when this run had not noted it before.
    pub(super) fn insert(&mut self, conn: &Connection, key: &Key) -> Result<bool> {
        self.any = true;
        match exact_int(key) {
            Some(i) if !self.spilled => {
                let (chunk, word, bit) = split(i);
                let words = self
                    .chunks
                    .entry(chunk)
                    .or_insert_with(|| Box::new([0; (CHUNK_BITS / 64) as usize]));
                let new = words[word] & bit == 0;
                words[word] |= bit;
                if self.chunks.len() > MAX_CHUNKS {
                    self.spill(conn)?;
                }
                Ok(new)
            }
            Some(i) => Ok(conn
                .prepare_cached("INSERT OR IGNORE INTO temp._idemload_run_ints (k) VALUES (?1)")?
                .execute([i])?
                == 1),
            None if !self.texts_spilled => {
                let text = key.canonical();
                if self.texts.contains(text) {
                    return Ok(false);
                }
                // The text and about a hash slot's worth of overhead.
                self.text_bytes += text.len() + 24;
                self.texts.insert(text.into());
                if self.text_bytes > MAX_TEXT_BYTES {
                    self.spill_texts(conn)?;
                }
                Ok(true)
            }
            None => Ok(conn
                .prepare_cached("INSERT OR IGNORE INTO temp._idemload_run_keys (k) VALUES (?1)")?
                .execute([key.canonical()])?
                == 1),
        }
    }

    /// Whether this run noted the key.
    #[cfg(test)]
    pub(super) fn contains(&self, conn: &Connection, key: &Key) -> Result<bool> {
        use rusqlite::OptionalExtension;
        if !self.any {
            return Ok(false);
        }
        let found = match exact_int(key) {
            Some(i) if !self.spilled => {
                let (chunk, word, bit) = split(i);
                return Ok(self.chunks.get(&chunk).is_some_and(|w| w[word] & bit != 0));
            }
            Some(i) => conn
                .prepare_cached("SELECT 1 FROM temp._idemload_run_ints WHERE k = ?1")?
                .query_row([i], |_| Ok(()))
                .optional()?,
            None if !self.texts_spilled => {
                return Ok(self.texts.contains(key.canonical()));
            }
            None => conn
                .prepare_cached("SELECT 1 FROM temp._idemload_run_keys WHERE k = ?1")?
                .query_row([key.canonical()], |_| Ok(()))
                .optional()?,
        };
        Ok(found.is_some())
    }

    /// Moves the integer keys to a temporary table: they are too sparse for
    /// the bitmap's memory budget.
    fn spill(&mut self, conn: &Connection) -> Result<()> {
        conn.execute_batch(
            "CREATE TEMP TABLE IF NOT EXISTS _idemload_run_ints (k INTEGER PRIMARY KEY);
             DELETE FROM temp._idemload_run_ints;",
        )?;
        let mut stmt = conn.prepare("INSERT INTO temp._idemload_run_ints (k) VALUES (?1)")?;
        for (chunk, words) in self.chunks.drain() {
            for (w, &bits) in words.iter().enumerate() {
                for b in 0..64 {
                    if bits & (1 << b) != 0 {
                        stmt.execute([chunk * CHUNK_BITS + w as i64 * 64 + b])?;
                    }
                }
            }
        }
        self.spilled = true;
        tracing::debug!("Run keys moved to a temporary table.");
        Ok(())
    }

    /// Moves the key texts to their temporary table: they outgrew the
    /// memory budget.
    fn spill_texts(&mut self, conn: &Connection) -> Result<()> {
        let mut stmt =
            conn.prepare("INSERT OR IGNORE INTO temp._idemload_run_keys (k) VALUES (?1)")?;
        for text in self.texts.drain() {
            stmt.execute([&*text])?;
        }
        self.texts.shrink_to_fit();
        self.texts_spilled = true;
        tracing::debug!("Run key texts moved to a temporary table.");
        Ok(())
    }
}

fn split(i: i64) -> (i64, usize, u64) {
    let (chunk, offset) = (i.div_euclid(CHUNK_BITS), i.rem_euclid(CHUNK_BITS));
    (chunk, (offset / 64) as usize, 1 << (offset % 64))
}

/// The key as an integer when it is one integer the bitmap can hold exactly.
fn exact_int(key: &Key) -> Option<i64> {
    match key.values() {
        [Value::Number(n)] => n.as_i64().filter(|i| i.abs() <= EXACT_INT),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conn() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TEMP TABLE _idemload_run_keys (k TEXT PRIMARY KEY) WITHOUT ROWID;",
        )
        .unwrap();
        conn
    }

    #[test]
    fn each_key_is_new_once_whatever_its_kind() {
        let conn = conn();
        let mut keys = RunKeys::default();
        let ints = [0i64, 1, -1, 4095, 4096, -4097, 1 << 53, -(1 << 53)];
        let others = [
            Key::new(vec![json!("7")]),
            Key::new(vec![json!(1i64 << 60)]),
            Key::new(vec![json!(1), json!("a")]),
        ];
        for round in 0..2 {
            for i in ints {
                let key = Key::new(vec![json!(i)]);
                assert_eq!(keys.insert(&conn, &key).unwrap(), round == 0, "{i}");
                assert!(keys.contains(&conn, &key).unwrap());
            }
            for key in &others {
                assert_eq!(keys.insert(&conn, key).unwrap(), round == 0, "{key}");
                assert!(keys.contains(&conn, key).unwrap());
            }
        }
        assert!(!keys.contains(&conn, &Key::new(vec![json!(2)])).unwrap());
        assert!(!keys.contains(&conn, &Key::new(vec![json!("1")])).unwrap());
    }

    #[test]
    fn sparse_ids_move_to_a_temporary_table_and_stay_exact() {
        let conn = conn();
        let mut keys = RunKeys::default();
        let id = |n: i64| Key::new(vec![json!(n * 1_000_003)]);
        for n in 0..(MAX_CHUNKS as i64 + 10) {
            assert!(keys.insert(&conn, &id(n)).unwrap());
        }
        assert!(keys.spilled);
        for n in 0..(MAX_CHUNKS as i64 + 10) {
            assert!(!keys.insert(&conn, &id(n)).unwrap());
        }
        assert!(!keys.contains(&conn, &id(-5)).unwrap());
    }

    #[test]
    fn key_texts_move_to_a_temporary_table_and_stay_exact() {
        let conn = conn();
        let mut keys = RunKeys::default();
        let id = |n: usize| Key::new(vec![json!(format!("{n:0>4096}"))]);
        let n = MAX_TEXT_BYTES / 4096 + 10;
        for i in 0..n {
            assert!(keys.insert(&conn, &id(i)).unwrap());
        }
        assert!(keys.texts_spilled);
        for i in 0..n {
            assert!(!keys.insert(&conn, &id(i)).unwrap());
            assert!(keys.contains(&conn, &id(i)).unwrap());
        }
        assert!(!keys.contains(&conn, &id(n)).unwrap());
    }
}
