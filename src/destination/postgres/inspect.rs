//! PostgreSQL inspection and repairs for `audit`, `dedupe` and `verify`.
//!
//! Rows come back through `row_to_json`, which keeps column order and
//! writes floats exactly; quarantined rows are restored with
//! `json_populate_record`, so every column gets its own type back.

use async_trait::async_trait;
use chrono::Utc;
use serde_json::Value;
use tokio_postgres::GenericClient;

use super::{pg_error, qualified, PostgresDestination};
use crate::destination::inspect::{DedupeApply, DedupeDone, Dialect, Inspect};
use crate::destination::sql::{all_not_null, column_list, quote};
use crate::error::{Error, Result};
use crate::state::QUARANTINE_TABLE;

/// A PostgreSQL schema opened for inspection.
pub struct PostgresInspect {
    dest: PostgresDestination,
}

impl PostgresInspect {
    /// Connects; with `write` false (audit) creates nothing.
    pub async fn open(url: &str, write: bool) -> Result<PostgresInspect> {
        let (dest, _) = PostgresDestination::connect(url, None, write).await?;
        dest.client
            .batch_execute(&format!("SET search_path TO {}", quote(&dest.schema)))
            .await
            .map_err(pg_error("search_path"))?;
        Ok(PostgresInspect { dest })
    }

    fn quarantine(&self) -> String {
        qualified(&self.dest.schema, QUARANTINE_TABLE)
    }
}

async fn ensure_quarantine(tx: &tokio_postgres::Transaction<'_>, quarantine: &str) -> Result<()> {
    {
        tx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {} (
                 id bigserial PRIMARY KEY, run_id text NOT NULL, table_name text NOT NULL,
                 record_key text, row_id text, row_json text NOT NULL, constraint_added text,
                 quarantined_at text NOT NULL, restored_at text)",
            quarantine
        ))
        .await
        .map_err(pg_error("quarantine table"))
    }
}

#[async_trait]
impl Inspect for PostgresInspect {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    async fn query(&mut self, sql: &str) -> Result<Vec<Vec<Value>>> {
        let rows = self
            .dest
            .client
            .query(&format!("SELECT row_to_json(x)::text FROM ({sql}) x"), &[])
            .await
            .map_err(pg_error("query"))?;
        Ok(rows
            .iter()
            .map(|r| {
                let text: String = r.get(0);
                match serde_json::from_str::<Value>(&text) {
                    Ok(Value::Object(o)) => o.into_iter().map(|(_, v)| v).collect(),
                    _ => Vec::new(),
                }
            })
            .collect())
    }

    async fn execute(&mut self, sql: &str) -> Result<()> {
        self.dest
            .client
            .batch_execute(sql)
            .await
            .map_err(pg_error("statement"))
    }

    async fn columns(&mut self, table: &str) -> Result<Vec<String>> {
        let rows = self
            .dest
            .client
            .query(
                "SELECT column_name::text FROM information_schema.columns
                 WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position",
                &[&self.dest.schema, &table],
            )
            .await
            .map_err(pg_error("columns"))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn unique_covering(&mut self, table: &str, key: &[String]) -> Result<Option<String>> {
        unique_covering(&self.dest.client, &self.dest.schema, table, key).await
    }

    async fn dedupe_apply(&mut self, plan: &DedupeApply) -> Result<DedupeDone> {
        let covered = self.unique_covering(&plan.table, &plan.key).await?;
        let t = qualified(&self.dest.schema, &plan.table);
        let keys = column_list(&plan.key);
        let not_null = all_not_null(&plan.key, quote);
        let key_json = plan
            .key
            .iter()
            .map(|k| format!("t.{}", quote(k)))
            .collect::<Vec<_>>()
            .join(", ");
        let constraint = covered.is_none().then(|| plan.constraint.clone());
        let quarantine = self.quarantine();
        let tx = self
            .dest
            .client
            .transaction()
            .await
            .map_err(pg_error("begin"))?;
        ensure_quarantine(&tx, &quarantine).await?;
        tx.batch_execute(&format!(
            "CREATE TEMP TABLE _idemload_dedupe ON COMMIT DROP AS
                 SELECT rid FROM (SELECT ctid AS rid, ROW_NUMBER() OVER (PARTITION BY {keys} ORDER BY {rank}) AS rn
                                  FROM {t} WHERE {not_null}) x
                 WHERE rn > 1",
            rank = plan.rank
        ))
        .await
        .map_err(pg_error("dedupe"))?;
        tx.execute(
            &format!(
                "INSERT INTO {quarantine} (run_id, table_name, record_key, row_id, row_json, constraint_added, quarantined_at)
                 SELECT $1, $2, json_build_array({key_json})::text, t.ctid::text, row_to_json(t)::text, $3, $4
                 FROM {t} t WHERE t.ctid IN (SELECT rid FROM _idemload_dedupe)"
            ),
            &[&plan.run_id, &plan.table, &constraint, &Utc::now().to_rfc3339()],
        )
        .await
        .map_err(pg_error("quarantine"))?;
        let removed = tx
            .execute(
                &format!("DELETE FROM {t} WHERE ctid IN (SELECT rid FROM _idemload_dedupe)"),
                &[],
            )
            .await
            .map_err(pg_error("dedupe"))?;
        if let Some(name) = &constraint {
            tx.batch_execute(&format!(
                "CREATE UNIQUE INDEX {} ON {t} ({keys})",
                quote(name)
            ))
            .await
            .map_err(pg_error("unique index"))?;
        }
        tx.commit().await.map_err(pg_error("commit"))?;
        Ok(DedupeDone {
            removed,
            constraint_added: constraint,
        })
    }

    async fn restore(&mut self, run_id: &str) -> Result<u64> {
        let quarantine = self.quarantine();
        let schema = self.dest.schema.clone();
        let tx = self
            .dest
            .client
            .transaction()
            .await
            .map_err(pg_error("begin"))?;
        ensure_quarantine(&tx, &quarantine).await?;
        let rows = tx
            .query(
                &format!("SELECT id, table_name, row_json, constraint_added FROM {quarantine} WHERE run_id = $1 AND restored_at IS NULL ORDER BY id"),
                &[&run_id],
            )
            .await
            .map_err(pg_error("quarantine"))?;
        if let Some(Some(name)) = rows.first().map(|r| r.get::<_, Option<String>>(3)) {
            tx.batch_execute(&format!(
                "DROP INDEX IF EXISTS {}",
                qualified(&schema, &name)
            ))
            .await
            .map_err(pg_error("drop index"))?;
        }
        for r in &rows {
            let (id, table, json): (i64, String, String) = (r.get(0), r.get(1), r.get(2));
            let t = qualified(&schema, &table);
            tx.execute(
                &format!(
                    "INSERT INTO {t} SELECT * FROM json_populate_record(NULL::{t}, $1::text::json)"
                ),
                &[&json],
            )
            .await
            .map_err(pg_error(format!("restore into {table:?}")))?;
            tx.execute(
                &format!("UPDATE {quarantine} SET restored_at = $2 WHERE id = $1"),
                &[&id, &Utc::now().to_rfc3339()],
            )
            .await
            .map_err(pg_error("quarantine"))?;
        }
        tx.commit()
            .await
            .map_err(|e| Error::destination("restore", e))?;
        Ok(rows.len() as u64)
    }
}

/// The primary key or unique index whose columns are exactly `key`.
pub(super) async fn unique_covering(
    client: &impl GenericClient,
    schema: &str,
    table: &str,
    key: &[String],
) -> Result<Option<String>> {
    let mut wanted = key.to_vec();
    wanted.sort();
    let rows = client
        .query(
            "SELECT c.relname::text, i.indisprimary,
                    array_agg(a.attname::text ORDER BY a.attname::text)
             FROM pg_index i
             JOIN pg_class c ON c.oid = i.indexrelid
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
             WHERE i.indrelid = $1::text::regclass AND i.indisunique AND i.indpred IS NULL
             GROUP BY c.relname, i.indisprimary",
            &[&qualified(schema, table)],
        )
        .await
        .map_err(pg_error("indexes"))?;
    for r in rows {
        let (name, primary, cols): (String, bool, Vec<String>) = (r.get(0), r.get(1), r.get(2));
        if cols == wanted {
            let kind = if primary {
                "primary key"
            } else {
                "unique index"
            };
            return Ok(Some(format!("{kind} {name}")));
        }
    }
    Ok(None)
}
