//! MySQL/MariaDB inspection and repairs for `audit`, `dedupe` and `verify`.
//!
//! A MySQL row has no physical identity, so a surplus row is named by its
//! primary key, or by all its column values where the table has none (two
//! identical rows are told apart by deleting with `LIMIT`). DDL is not
//! transactional here, so `dedupe --apply` runs in steps ordered so that a
//! crash between them loses no row: the surplus rows are copied into
//! `_idemload_quarantine` and deleted in one InnoDB transaction, and only
//! after its commit is the unique index added. A crash before the commit
//! changes nothing; after it the rows are in quarantine (restorable) and
//! the index may be missing, which a second `--apply` adds. `--restore`
//! drops the index first, then puts the rows back in one transaction.

use async_trait::async_trait;
use mysql_async::prelude::Queryable;
use mysql_async::Value as My;
use serde_json::Value;

use chrono::Utc;
use mysql_async::{Conn, TxOpts};

use super::MysqlDestination;
use crate::destination::inspect::{DedupeApply, DedupeDone, Dialect, Inspect};
use crate::destination::sql::{all_not_null, quote_mysql, quote_mysql as q};
use crate::error::{Error, Result};
use crate::state::{format_time, QUARANTINE_TABLE};

pub struct MysqlInspect {
    dest: MysqlDestination,
}

impl MysqlInspect {
    /// Connects; with `write` false (audit) creates nothing.
    pub async fn open(url: &str, write: bool) -> Result<MysqlInspect> {
        Ok(MysqlInspect {
            dest: MysqlDestination::connect(url, write).await?.0,
        })
    }
}

fn to_json(v: My) -> Value {
    match v {
        My::NULL => Value::Null,
        My::Int(i) => Value::from(i),
        My::UInt(u) => Value::from(u),
        My::Float(f) => {
            serde_json::Number::from_f64(f64::from(f)).map_or(Value::Null, Value::Number)
        }
        My::Double(f) => serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number),
        My::Bytes(b) => Value::String(String::from_utf8_lossy(&b).into_owned()),
        other => Value::String(other.as_sql(true).trim_matches('\'').to_string()),
    }
}

fn err(e: mysql_async::Error) -> Error {
    Error::destination("mysql", e)
}

#[async_trait]
impl Inspect for MysqlInspect {
    fn dialect(&self) -> Dialect {
        Dialect::Mysql
    }

    async fn query(&mut self, sql: &str) -> Result<Vec<Vec<Value>>> {
        let rows: Vec<mysql_async::Row> = self.dest.conn.exec(sql, ()).await.map_err(err)?;
        Ok(rows
            .into_iter()
            .map(|r| r.unwrap().into_iter().map(to_json).collect())
            .collect())
    }

    async fn execute(&mut self, sql: &str) -> Result<()> {
        self.dest.conn.query_drop(sql).await.map_err(err)
    }

    async fn columns(&mut self, table: &str) -> Result<Vec<String>> {
        self.dest
            .conn
            .exec(
                "SELECT column_name FROM information_schema.columns
                 WHERE table_schema = DATABASE() AND table_name = ? ORDER BY ordinal_position",
                (table,),
            )
            .await
            .map_err(err)
    }

    async fn unique_covering(&mut self, table: &str, key: &[String]) -> Result<Option<String>> {
        super::ddl::unique_covering(&mut self.dest.conn, table, key)
            .await
            .map_err(err)
    }

    async fn dedupe_apply(&mut self, plan: &DedupeApply) -> Result<DedupeDone> {
        dedupe_apply(&mut self.dest.conn, plan).await
    }

    async fn restore(&mut self, run_id: &str) -> Result<u64> {
        restore(&mut self.dest.conn, run_id).await
    }
}

async fn ensure_quarantine(conn: &mut Conn) -> Result<()> {
    conn.query_drop(format!(
        "CREATE TABLE IF NOT EXISTS {} (
             id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, run_id VARCHAR(64) NOT NULL,
             table_name VARCHAR(255) NOT NULL, record_key LONGTEXT, row_id LONGTEXT,
             row_json LONGTEXT NOT NULL, constraint_added VARCHAR(255),
             quarantined_at VARCHAR(40) NOT NULL, restored_at VARCHAR(40),
             KEY `_idemload_quarantine_run` (run_id)) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4",
        q(QUARANTINE_TABLE)
    ))
    .await
    .map_err(err)
}

/// A JSON value bound back as a parameter: integers and floats exactly,
/// text as text (the column converts it to its own type).
fn from_json(v: &Value) -> My {
    match v {
        Value::Null => My::NULL,
        Value::Bool(b) => My::Int(i64::from(*b)),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => My::Int(i),
            (_, Some(u)) => My::UInt(u),
            _ => match n.to_string().parse::<f64>() {
                Ok(f) => My::Double(f),
                Err(_) => My::Bytes(n.to_string().into_bytes()),
            },
        },
        Value::String(s) => My::Bytes(s.clone().into_bytes()),
        other => My::Bytes(other.to_string().into_bytes()),
    }
}

async fn primary_key(conn: &mut Conn, table: &str) -> Result<Vec<String>> {
    conn.exec(
        "SELECT column_name FROM information_schema.statistics
         WHERE table_schema = DATABASE() AND table_name = ? AND index_name = 'PRIMARY'
         ORDER BY seq_in_index",
        (table,),
    )
    .await
    .map_err(err)
}

async fn has_index(conn: &mut Conn, table: &str, index: &str) -> Result<bool> {
    let n: Option<i64> = conn
        .exec_first(
            "SELECT count(*) FROM information_schema.statistics
             WHERE table_schema = DATABASE() AND table_name = ? AND index_name = ?",
            (table, index),
        )
        .await
        .map_err(err)?;
    Ok(n.unwrap_or(0) > 0)
}

async fn dedupe_apply(conn: &mut Conn, plan: &DedupeApply) -> Result<DedupeDone> {
    ensure_quarantine(conn).await?;
    let columns: Vec<String> = conn
        .exec(
            "SELECT column_name FROM information_schema.columns
             WHERE table_schema = DATABASE() AND table_name = ? ORDER BY ordinal_position",
            (&plan.table,),
        )
        .await
        .map_err(err)?;
    let primary = primary_key(conn, &plan.table).await?;
    // Positions of the columns that name a row: the primary key, else all.
    let identity: Vec<usize> = if primary.is_empty() {
        (0..columns.len()).collect()
    } else {
        primary
            .iter()
            .filter_map(|p| columns.iter().position(|c| c == p))
            .collect()
    };
    let key_pos: Vec<usize> = plan
        .key
        .iter()
        .filter_map(|k| columns.iter().position(|c| c == k))
        .collect();
    let covered = super::ddl::unique_covering(conn, &plan.table, &plan.key)
        .await
        .map_err(err)?;
    let constraint = covered.is_none().then(|| plan.constraint.clone());
    let t = q(&plan.table);
    let cols = columns.iter().map(|c| q(c)).collect::<Vec<_>>().join(", ");
    let keys = plan.key.iter().map(|k| q(k)).collect::<Vec<_>>().join(", ");
    let not_null = all_not_null(&plan.key, quote_mysql);
    let matches = identity
        .iter()
        .map(|&i| format!("{} <=> ?", q(&columns[i])))
        .collect::<Vec<_>>()
        .join(" AND ");
    let now = format_time(Utc::now());
    let mut tx = conn
        .start_transaction(TxOpts::default())
        .await
        .map_err(err)?;
    let surplus: Vec<mysql_async::Row> = tx
        .query(format!(
            "SELECT {cols} FROM (SELECT {cols}, ROW_NUMBER() OVER (PARTITION BY {keys} ORDER BY {rank}) AS `_idemload_rn`
                                 FROM {t} WHERE {not_null}) x
             WHERE `_idemload_rn` > 1",
            rank = plan.rank
        ))
        .await
        .map_err(err)?;
    // Rows with the same identity are deleted together, as many as are surplus.
    let mut groups: Vec<(Vec<My>, u64)> = Vec::new();
    for row in surplus {
        let values: Vec<My> = row.unwrap();
        let mut object = serde_json::Map::new();
        for (name, v) in columns.iter().zip(&values) {
            object.insert(name.clone(), to_json(v.clone()));
        }
        let key = Value::Array(
            key_pos
                .iter()
                .map(|&i| to_json(values[i].clone()))
                .collect(),
        );
        let id: Vec<My> = identity.iter().map(|&i| values[i].clone()).collect();
        tx.exec_drop(
            format!(
                "INSERT INTO {} (run_id, table_name, record_key, row_json, constraint_added, quarantined_at)
                 VALUES (?, ?, ?, ?, ?, ?)",
                q(QUARANTINE_TABLE)
            ),
            (
                &plan.run_id,
                &plan.table,
                key.to_string(),
                Value::Object(object).to_string(),
                &constraint,
                &now,
            ),
        )
        .await
        .map_err(err)?;
        match groups.iter_mut().find(|(g, _)| *g == id) {
            Some((_, n)) => *n += 1,
            None => groups.push((id, 1)),
        }
    }
    let mut removed = 0;
    for (id, n) in groups {
        tx.exec_drop(format!("DELETE FROM {t} WHERE {matches} LIMIT {n}"), id)
            .await
            .map_err(err)?;
        let deleted = tx.affected_rows();
        if deleted != n {
            // Dropping the transaction rolls it back: nothing changed.
            return Err(Error::destination(
                "mysql dedupe",
                format!(
                    "table {:?} changed while it was deduplicated (expected to remove {n} rows, found {deleted}); nothing was changed, run dedupe again",
                    plan.table
                ),
            ));
        }
        removed += deleted;
    }
    tx.commit().await.map_err(err)?;
    if let Some(name) = &constraint {
        conn.query_drop(format!("ALTER TABLE {t} ADD UNIQUE INDEX {} ({keys})", q(name)))
            .await
            .map_err(|e| {
                Error::destination(
                    "mysql dedupe",
                    format!(
                        "{removed} surplus rows were moved to {QUARANTINE_TABLE} (run {}; undo with --restore {}), but the unique index {name:?} on ({}) could not be added: {e}; run dedupe --apply again to add it",
                        plan.run_id,
                        plan.run_id,
                        plan.key.join(", ")
                    ),
                )
            })?;
    }
    Ok(DedupeDone {
        removed,
        constraint_added: constraint,
    })
}

/// A quarantined row: id, table, row as JSON, constraint added.
type Quarantined = (i64, String, String, Option<String>);

async fn restore(conn: &mut Conn, run_id: &str) -> Result<u64> {
    ensure_quarantine(conn).await?;
    let rows: Vec<Quarantined> = conn
        .exec(
            format!(
                "SELECT id, table_name, row_json, constraint_added FROM {}
                 WHERE run_id = ? AND restored_at IS NULL ORDER BY id",
                q(QUARANTINE_TABLE)
            ),
            (run_id,),
        )
        .await
        .map_err(err)?;
    // The index goes first (DDL commits by itself): a crash after it leaves
    // the rows in quarantine, and a second --restore finishes.
    if let Some((_, table, _, Some(name))) = rows.first() {
        if has_index(conn, table, name).await? {
            conn.query_drop(format!("ALTER TABLE {} DROP INDEX {}", q(table), q(name)))
                .await
                .map_err(err)?;
        }
    }
    let now = format_time(Utc::now());
    let mut tx = conn
        .start_transaction(TxOpts::default())
        .await
        .map_err(err)?;
    for (id, table, json, _) in &rows {
        let object: serde_json::Map<String, Value> = serde_json::from_str(json)
            .map_err(|e| Error::destination(format!("quarantine row {id}"), e))?;
        let cols = object.keys().map(|c| q(c)).collect::<Vec<_>>().join(", ");
        let marks = vec!["?"; object.len()].join(", ");
        let values: Vec<My> = object.values().map(from_json).collect();
        tx.exec_drop(
            format!("INSERT INTO {} ({cols}) VALUES ({marks})", q(table)),
            values,
        )
        .await
        .map_err(err)?;
        tx.exec_drop(
            format!(
                "UPDATE {} SET restored_at = ? WHERE id = ?",
                q(QUARANTINE_TABLE)
            ),
            (&now, id),
        )
        .await
        .map_err(err)?;
    }
    tx.commit().await.map_err(err)?;
    Ok(rows.len() as u64)
}
