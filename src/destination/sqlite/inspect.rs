//! SQLite inspection and repairs for `audit`, `dedupe` and `verify`.
//!
//! Quarantined rows are read into Rust and written as JSON by serde_json,
//! whose floats round-trip exactly (SQLite's own `json_object` keeps 15
//! digits), so `dedupe --restore` puts back the same bytes, rowid included.

use std::path::PathBuf;

use async_trait::async_trait;
use chrono::Utc;
use rusqlite::types::Value as Sql;
use rusqlite::{params, Connection, TransactionBehavior};
use serde_json::Value;

use super::books::connect;
use super::ddl::unique_covering;
use super::worker::Worker;
use crate::destination::inspect::{DedupeApply, DedupeDone, Dialect, Inspect};
use crate::destination::sql::{all_not_null, column_list, quote};
use crate::error::{Error, Result};
use crate::state::{format_time, QUARANTINE_TABLE};

/// A SQLite file opened for inspection.
pub struct SqliteInspect {
    conn: Worker<Connection>,
}

impl SqliteInspect {
    /// Opens the file of a `sqlite://` URL; with `write` false (audit),
    /// only an existing file, read-only.
    pub async fn open(url: &str, write: bool) -> Result<SqliteInspect> {
        let path: PathBuf = super::path_of(url)?;
        let name = path.display().to_string();
        let conn = Worker::open(name, move || {
            if write {
                return connect(&path);
            }
            super::books::connect_read_only(&path)?.ok_or_else(|| {
                Error::config(format!(
                    "{}: no such database file (check the path; nothing was created)",
                    path.display()
                ))
            })
        })
        .await?;
        Ok(SqliteInspect { conn })
    }
}

/// A stored value as JSON (exact for integers and floats).
pub(crate) fn to_json(v: Sql) -> Value {
    match v {
        Sql::Null => Value::Null,
        Sql::Integer(i) => Value::from(i),
        Sql::Real(f) => serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number),
        Sql::Text(t) => Value::String(t),
        Sql::Blob(b) => Value::String(hex::encode(b)),
    }
}

fn from_json(v: &Value) -> Sql {
    match v {
        Value::Null => Sql::Null,
        Value::Bool(b) => Sql::Integer(*b as i64),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Sql::Integer(i),
            None => Sql::Real(n.as_f64().unwrap_or_default()),
        },
        Value::String(s) => Sql::Text(s.clone()),
        other => Sql::Text(other.to_string()),
    }
}

fn ensure_quarantine(conn: &Connection) -> Result<()> {
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {} (
             id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, table_name TEXT NOT NULL,
             record_key TEXT, row_id INTEGER, row_json TEXT NOT NULL, constraint_added TEXT,
             quarantined_at TEXT NOT NULL, restored_at TEXT)",
        quote(QUARANTINE_TABLE)
    ))?;
    Ok(())
}

#[async_trait]
impl Inspect for SqliteInspect {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    async fn query(&mut self, sql: &str) -> Result<Vec<Vec<Value>>> {
        let sql = sql.to_string();
        self.conn
            .run(move |conn| {
                let mut stmt = conn.prepare(&sql)?;
                let n = stmt.column_count();
                let rows = stmt
                    .query_map([], |r| {
                        (0..n).map(|i| r.get::<_, Sql>(i).map(to_json)).collect()
                    })?
                    .collect::<rusqlite::Result<Vec<Vec<Value>>>>()?;
                Ok(rows)
            })
            .await
    }

    async fn execute(&mut self, sql: &str) -> Result<()> {
        let sql = sql.to_string();
        self.conn
            .run(move |conn| Ok(conn.execute_batch(&sql)?))
            .await
    }

    async fn columns(&mut self, table: &str) -> Result<Vec<String>> {
        let table = table.to_string();
        self.conn
            .run(move |conn| {
                let mut stmt = conn.prepare("SELECT name FROM pragma_table_info(?1)")?;
                let names = stmt
                    .query_map([table], |r| r.get(0))?
                    .collect::<rusqlite::Result<Vec<String>>>()?;
                Ok(names)
            })
            .await
    }

    async fn unique_covering(&mut self, table: &str, key: &[String]) -> Result<Option<String>> {
        let (table, key) = (table.to_string(), key.to_vec());
        self.conn
            .run(move |conn| unique_covering(conn, &table, &key))
            .await
    }

    async fn dedupe_apply(&mut self, plan: &DedupeApply) -> Result<DedupeDone> {
        let plan = plan.clone();
        self.conn.run(move |conn| dedupe_apply(conn, &plan)).await
    }

    async fn restore(&mut self, run_id: &str) -> Result<u64> {
        let run_id = run_id.to_string();
        self.conn.run(move |conn| restore(conn, &run_id)).await
    }
}

fn dedupe_apply(conn: &mut Connection, plan: &DedupeApply) -> Result<DedupeDone> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    ensure_quarantine(&tx)?;
    let t = quote(&plan.table);
    let keys = column_list(&plan.key);
    let not_null = all_not_null(&plan.key, quote);
    tx.execute_batch(&format!(
        "DROP TABLE IF EXISTS temp._idemload_dedupe;
         CREATE TEMP TABLE _idemload_dedupe AS
             SELECT rid FROM (SELECT rowid AS rid, ROW_NUMBER() OVER (PARTITION BY {keys} ORDER BY {rank}) AS rn
                              FROM {t} WHERE {not_null})
             WHERE rn > 1;",
        rank = plan.rank
    ))?;
    let columns: Vec<String> = {
        let mut stmt = tx.prepare("SELECT name FROM pragma_table_info(?1)")?;
        let names = stmt
            .query_map([&plan.table], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<String>>>()?;
        names
    };
    let key_pos: Vec<usize> = plan
        .key
        .iter()
        .filter_map(|k| columns.iter().position(|c| c == k))
        .collect();
    let constraint = if unique_covering(&tx, &plan.table, &plan.key)?.is_none() {
        Some(plan.constraint.clone())
    } else {
        None
    };
    let now = format_time(Utc::now());
    let mut removed = 0u64;
    {
        let mut select = tx.prepare(&format!(
            "SELECT rowid, {} FROM {t} WHERE rowid IN (SELECT rid FROM temp._idemload_dedupe) ORDER BY rowid",
            column_list(&columns)
        ))?;
        let mut insert = tx.prepare(&format!(
            "INSERT INTO {} (run_id, table_name, record_key, row_id, row_json, constraint_added, quarantined_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            quote(QUARANTINE_TABLE)
        ))?;
        let mut rows = select.query([])?;
        while let Some(row) = rows.next()? {
            let rowid: i64 = row.get(0)?;
            let mut object = serde_json::Map::new();
            let mut values = Vec::with_capacity(columns.len());
            for (i, name) in columns.iter().enumerate() {
                let v = to_json(row.get::<_, Sql>(i + 1)?);
                values.push(v.clone());
                object.insert(name.clone(), v);
            }
            let key = Value::Array(key_pos.iter().map(|&i| values[i].clone()).collect());
            insert.execute(params![
                plan.run_id,
                plan.table,
                key.to_string(),
                rowid,
                Value::Object(object).to_string(),
                constraint,
                now
            ])?;
            removed += 1;
        }
    }
    tx.execute(
        &format!("DELETE FROM {t} WHERE rowid IN (SELECT rid FROM temp._idemload_dedupe)"),
        [],
    )?;
    tx.execute_batch("DROP TABLE temp._idemload_dedupe")?;
    if let Some(name) = &constraint {
        tx.execute_batch(&format!(
            "CREATE UNIQUE INDEX {} ON {t} ({keys})",
            quote(name)
        ))?;
    }
    tx.commit()?;
    Ok(DedupeDone {
        removed,
        constraint_added: constraint,
    })
}

/// A quarantined row: id, table, rowid, row as JSON, constraint added.
type Quarantined = (i64, String, Option<i64>, String, Option<String>);

fn restore(conn: &mut Connection, run_id: &str) -> Result<u64> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    ensure_quarantine(&tx)?;
    let rows: Vec<Quarantined> = {
        let mut stmt = tx.prepare(&format!(
            "SELECT id, table_name, row_id, row_json, constraint_added FROM {}
             WHERE run_id = ?1 AND restored_at IS NULL ORDER BY id",
            quote(QUARANTINE_TABLE)
        ))?;
        let rows = stmt
            .query_map([run_id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows
    };
    for (_, _, _, _, constraint) in rows.iter().take(1) {
        if let Some(name) = constraint {
            tx.execute_batch(&format!("DROP INDEX IF EXISTS {}", quote(name)))?;
        }
    }
    let now = format_time(Utc::now());
    for (id, table, row_id, json, _) in &rows {
        let object: serde_json::Map<String, Value> = serde_json::from_str(json)
            .map_err(|e| Error::destination(format!("quarantine row {id}"), e))?;
        let names: Vec<&String> = object.keys().collect();
        let mut values: Vec<Sql> = object.values().map(from_json).collect();
        let mut cols = column_list(&names);
        let mut marks = (1..=values.len())
            .map(|i| format!("?{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        if let Some(rowid) = row_id {
            values.push(Sql::Integer(*rowid));
            cols.push_str(", rowid");
            marks.push_str(&format!(", ?{}", values.len()));
        }
        tx.execute(
            &format!("INSERT INTO {} ({cols}) VALUES ({marks})", quote(table)),
            rusqlite::params_from_iter(values.iter()),
        )?;
        tx.execute(
            &format!(
                "UPDATE {} SET restored_at = ?2 WHERE id = ?1",
                quote(QUARANTINE_TABLE)
            ),
            params![id, now],
        )?;
    }
    tx.commit()?;
    Ok(rows.len() as u64)
}
