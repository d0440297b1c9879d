//! Writing one batch to SQLite, in one transaction.
//!
//! For each row: convert its values to the columns' types (a value that does
//! not fit is a reject), note its key in the run's key set (a key already
//! written by this run makes the record a `duplicate`), read the stored row
//! by primary key, then insert, update only when a column really changed,
//! skip a stale version (older cursor), or delete. The batch's rejects, the
//! checkpoint it reaches and, for the last batch, the run's ending commit in
//! the same transaction.

use chrono::Utc;
use rusqlite::types::Value as Sql;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, TransactionBehavior};

use super::bookkeeping::{self, fence, write_checkpoint};
use super::{declared_type, read_schema, Inner, Run};
use crate::config::Mode;
use crate::destination::schema::{Column, SqlValue, TableSchema};
use crate::destination::sql::{column_list, key_match, quote};
use crate::destination::Commit;
use crate::error::{Error, Result};
use crate::key::Cursor;
use crate::pipeline::plan::{PlannedBatch, Row};
use crate::pipeline::stats::RunStats;
use crate::record::Reject;
use crate::state::{format_time, REJECTS_TABLE};

/// Writes a planned batch; returns its full stats (the planner's and ours).
pub(super) fn write_batch(
    inner: &mut Inner,
    batch: PlannedBatch,
    commit: Commit,
) -> Result<RunStats> {
    let Inner { conn, run, lock } = inner;
    let run = run
        .as_mut()
        .ok_or_else(|| Error::destination("sqlite", "write before begin"))?;
    let (pipeline, run_id, lease) = lock
        .clone()
        .ok_or_else(|| Error::destination("sqlite", "write without the run lock"))?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    fence(&tx, &pipeline, &run_id, lease)?;

    let PlannedBatch {
        rows,
        mut rejects,
        mut stats,
        ..
    } = batch;
    if !rows.is_empty() {
        let table = run
            .stage
            .clone()
            .unwrap_or_else(|| run.target.table.clone());
        let schema = ensure_table(&tx, run, &table, &rows)?;
        let staged = run.stage.is_some();
        let mode = if staged { Mode::Merge } else { run.target.mode };
        let mut writer = RowWriter::new(&tx, &table, &schema, &run.target, mode)?;
        for row in rows {
            match writer.write(row)? {
                Ok(outcome) if staged => {
                    // Staged rows are counted when the stage is applied.
                    if outcome == Outcome::Duplicate {
                        stats.duplicates += 1;
                    }
                }
                Ok(outcome) => outcome.count(&mut stats),
                Err(reject) => {
                    stats.rejected += 1;
                    rejects.push(reject);
                }
            }
        }
    }
    insert_rejects(&tx, &pipeline, &run_id, &rejects)?;
    if let Some(checkpoint) = &commit.checkpoint {
        write_checkpoint(&tx, &pipeline, Some(checkpoint), &run_id)?;
    }
    if let Some(finish) = &commit.finish {
        if let Some(stage) = run.stage.clone() {
            stats += apply_stage(&tx, run, &stage)?;
        }
        let end = finish.resolve(stats);
        if let Some(checkpoint) = &end.checkpoint {
            write_checkpoint(&tx, &pipeline, Some(checkpoint), &run_id)?;
        }
        let after = end
            .checkpoint
            .as_ref()
            .or(run.info.checkpoint_before.as_ref());
        bookkeeping::finish(
            &tx,
            &run_id,
            end.status,
            &end.stats,
            after,
            end.error.as_deref(),
        )?;
    }
    tx.commit()?;
    Ok(stats)
}

/// What happened to one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Inserted,
    Updated,
    Unchanged,
    Deleted,
    /// An older version than the stored row.
    Stale,
    /// The key was already written earlier in this run.
    Duplicate,
}

impl Outcome {
    fn count(self, stats: &mut RunStats) {
        match self {
            Outcome::Inserted => stats.inserted += 1,
            Outcome::Updated => stats.updated += 1,
            Outcome::Unchanged => stats.unchanged += 1,
            Outcome::Deleted => stats.deleted += 1,
            Outcome::Stale => stats.skipped += 1,
            Outcome::Duplicate => stats.duplicates += 1,
        }
    }
}

/// Prepared statements for one batch into one table.
struct RowWriter<'c> {
    conn: &'c Connection,
    schema: &'c TableSchema,
    mode: Mode,
    /// Positions of the key columns and of the others in `schema`.
    keys: Vec<usize>,
    others: Vec<usize>,
    cursor: Option<usize>,
    select: String,
    insert: String,
    update: String,
    delete: String,
}

impl<'c> RowWriter<'c> {
    fn new(
        conn: &'c Connection,
        table: &str,
        schema: &'c TableSchema,
        target: &crate::destination::Target,
        mode: Mode,
    ) -> Result<Self> {
        let keys = target
            .key_columns
            .iter()
            .map(|k| {
                schema.position(k).ok_or_else(|| {
                    Error::destination(
                        format!("table {table:?}"),
                        format!("has no key column {k:?}"),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let others: Vec<usize> = (0..schema.columns.len())
            .filter(|i| !keys.contains(i))
            .collect();
        let t = quote(table);
        let names: Vec<&str> = schema.columns.iter().map(|c| c.name.as_str()).collect();
        let key_where = keys
            .iter()
            .enumerate()
            .map(|(n, &i)| format!("{} = ?{}", quote(names[i]), n + 1))
            .collect::<Vec<_>>()
            .join(" AND ");
        let placeholders = (1..=names.len())
            .map(|i| format!("?{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let set = others
            .iter()
            .enumerate()
            .map(|(n, &i)| format!("{} = ?{}", quote(names[i]), n + 1))
            .collect::<Vec<_>>()
            .join(", ");
        let update_where = keys
            .iter()
            .enumerate()
            .map(|(n, &i)| format!("{} = ?{}", quote(names[i]), others.len() + n + 1))
            .collect::<Vec<_>>()
            .join(" AND ");
        Ok(RowWriter {
            conn,
            schema,
            mode,
            cursor: target.cursor.as_deref().and_then(|c| schema.position(c)),
            select: format!("SELECT {} FROM {t} WHERE {key_where}", column_list(&names)),
            insert: format!(
                "INSERT INTO {t} ({}) VALUES ({placeholders})",
                column_list(&names)
            ),
            update: format!("UPDATE {t} SET {set} WHERE {update_where}"),
            delete: format!("DELETE FROM {t} WHERE {key_where}"),
            keys,
            others,
        })
    }

    /// Writes one row; `Ok(Err(reject))` when a value does not fit.
    fn write(&mut self, row: Row) -> Result<std::result::Result<Outcome, Reject>> {
        let mut values = Vec::with_capacity(self.schema.columns.len());
        for column in &self.schema.columns {
            let value = row
                .fields
                .get(&column.name)
                .unwrap_or(&serde_json::Value::Null);
            match column.ty.convert(&column.name, value) {
                Ok(v) => values.push(to_sqlite(v)),
                Err(reason) => {
                    return Ok(Err(Reject {
                        source: row.source.clone(),
                        key: Some(row.key.to_string()),
                        raw: serde_json::to_string(&row.fields).unwrap_or_default(),
                        reason,
                    }))
                }
            }
        }
        let first_time = self
            .conn
            .prepare_cached("INSERT OR IGNORE INTO temp._idemload_run_keys (k) VALUES (?1)")?
            .execute([row.key.canonical()])?
            == 1;
        let key_values: Vec<&Sql> = self.keys.iter().map(|&i| &values[i]).collect();
        let stored: Option<Vec<Sql>> = self
            .conn
            .prepare_cached(&self.select)?
            .query_row(params_from_iter(key_values.iter()), |r| {
                (0..values.len()).map(|i| r.get::<_, Sql>(i)).collect()
            })
            .optional()?;
        let outcome = match stored {
            None if row.delete => Outcome::Unchanged,
            None => {
                self.conn
                    .prepare_cached(&self.insert)?
                    .execute(params_from_iter(values.iter()))?;
                Outcome::Inserted
            }
            Some(_) if self.mode == Mode::InsertNew => Outcome::Unchanged,
            Some(stored) => {
                let stale = match (self.cursor, &row.cursor) {
                    (Some(i), Some(new)) => stored_cursor(&stored[i]).is_some_and(|old| *new < old),
                    _ => false,
                };
                if stale {
                    Outcome::Stale
                } else if row.delete {
                    self.conn
                        .prepare_cached(&self.delete)?
                        .execute(params_from_iter(key_values.iter()))?;
                    Outcome::Deleted
                } else if self.others.iter().all(|&i| same(&stored[i], &values[i])) {
                    Outcome::Unchanged
                } else {
                    let params = self
                        .others
                        .iter()
                        .chain(self.keys.iter())
                        .map(|&i| &values[i]);
                    self.conn
                        .prepare_cached(&self.update)?
                        .execute(params_from_iter(params))?;
                    Outcome::Updated
                }
            }
        };
        Ok(Ok(if first_time {
            outcome
        } else {
            Outcome::Duplicate
        }))
    }
}

fn to_sqlite(v: SqlValue) -> Sql {
    match v {
        SqlValue::Null => Sql::Null,
        SqlValue::Int(i) => Sql::Integer(i),
        SqlValue::Float(f) => Sql::Real(f),
        SqlValue::Bool(b) => Sql::Integer(b as i64),
        SqlValue::Text(s) | SqlValue::Json(s) => Sql::Text(s),
    }
}

/// Equal as stored: integers and reals compare by value (a column of a
/// table idemload did not create may have stored one for the other).
fn same(stored: &Sql, new: &Sql) -> bool {
    match (stored, new) {
        (Sql::Integer(a), Sql::Real(b)) | (Sql::Real(b), Sql::Integer(a)) => *a as f64 == *b,
        (a, b) => a == b,
    }
}

fn stored_cursor(v: &Sql) -> Option<Cursor> {
    match v {
        Sql::Integer(i) => Some(Cursor::Int(*i)),
        Sql::Real(f) if f.fract() == 0.0 => Some(Cursor::Int(*f as i64)),
        Sql::Text(t) => Some(Cursor::from_text(t)),
        _ => None,
    }
}

/// `CREATE TABLE` with a primary key on the key columns.
pub(super) fn create_table(
    conn: &Connection,
    table: &str,
    columns: &[Column],
    keys: &[String],
) -> Result<()> {
    let defs = columns
        .iter()
        .map(|c| {
            let not_null = if keys.contains(&c.name) {
                " NOT NULL"
            } else {
                ""
            };
            format!("{} {}{not_null}", quote(&c.name), declared_type(c.ty))
        })
        .collect::<Vec<_>>()
        .join(", ");
    conn.execute_batch(&format!(
        "CREATE TABLE {} ({defs}, PRIMARY KEY ({}))",
        quote(table),
        column_list(keys)
    ))?;
    Ok(())
}

/// Creates the table or adds the columns the rows need; returns its schema.
fn ensure_table(
    conn: &Connection,
    run: &mut Run,
    table: &str,
    rows: &[Row],
) -> Result<TableSchema> {
    let mut schema = match run.schema.take() {
        Some(s) => s,
        None => read_schema(conn, table)?.unwrap_or_default(),
    };
    let missing = schema.missing(rows.iter().map(|r| &r.fields));
    if schema.columns.is_empty() {
        // Key columns must exist even when this batch only has nulls there
        // (it cannot: keys are never null), so `missing` holds them.
        create_table(conn, table, &missing, &run.target.key_columns)?;
        tracing::info!(table, columns = missing.len(), "Table created.");
        schema.columns = missing;
    } else if !missing.is_empty() {
        for column in &missing {
            conn.execute_batch(&format!(
                "ALTER TABLE {} ADD COLUMN {} {}",
                quote(table),
                quote(&column.name),
                declared_type(column.ty)
            ))?;
        }
        tracing::info!(table, added = missing.len(), "Columns added.");
        schema.columns.extend(missing);
    }
    run.schema = Some(schema.clone());
    Ok(schema)
}

fn insert_rejects(
    conn: &Connection,
    pipeline: &str,
    run_id: &str,
    rejects: &[Reject],
) -> Result<()> {
    if rejects.is_empty() {
        return Ok(());
    }
    let now = format_time(Utc::now());
    let mut stmt = conn.prepare_cached(&format!(
        "INSERT INTO {} (run_id, pipeline, source_ref, record_key, reason, raw, rejected_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        quote(REJECTS_TABLE)
    ))?;
    for r in rejects {
        stmt.execute(params![
            run_id,
            pipeline,
            r.source.to_string(),
            r.key,
            r.reason,
            r.raw,
            now
        ])?;
    }
    Ok(())
}

/// Applies a `replace`/`window` stage to the target, writing only the
/// differences, and drops the stage. Returns the logical change.
fn apply_stage(conn: &Connection, run: &mut Run, stage: &str) -> Result<RunStats> {
    let target = run.target.table.clone();
    let keys = run.target.key_columns.clone();
    let mut stats = RunStats::default();
    let Some(stage_schema) = read_schema(conn, stage)? else {
        // Nothing was staged: a replace empties the table, a window touches nothing.
        if run.target.mode == Mode::Replace && read_schema(conn, &target)?.is_some() {
            let removed = conn.execute(&format!("DELETE FROM {}", quote(&target)), [])? as u64;
            stats.deleted = removed;
            stats.removed = removed;
        }
        return Ok(stats);
    };
    let mut target_schema = match read_schema(conn, &target)? {
        Some(s) => s,
        None => {
            create_table(conn, &target, &stage_schema.columns, &keys)?;
            stage_schema.clone()
        }
    };
    // Both tables get every column of the other, so a snapshot without a
    // field sets it to null.
    for c in &stage_schema.columns {
        if target_schema.position(&c.name).is_none() {
            conn.execute_batch(&format!(
                "ALTER TABLE {} ADD COLUMN {} {}",
                quote(&target),
                quote(&c.name),
                declared_type(c.ty)
            ))?;
            target_schema.columns.push(c.clone());
        }
    }
    for c in &target_schema.columns {
        if stage_schema.position(&c.name).is_none() {
            conn.execute_batch(&format!(
                "ALTER TABLE {} ADD COLUMN {} {}",
                quote(stage),
                quote(&c.name),
                declared_type(c.ty)
            ))?;
        }
    }
    let (t, s) = (quote(&target), quote(stage));
    let names: Vec<&str> = target_schema
        .columns
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    let others: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| !keys.iter().any(|k| k == n))
        .collect();
    let matched = key_match(&keys, &t, &s);
    let scope = match (&run.target.mode, &run.target.window_field) {
        (Mode::Window, Some(w)) => {
            let w = quote(w);
            format!("{t}.{w} BETWEEN (SELECT min({w}) FROM {s}) AND (SELECT max({w}) FROM {s})")
        }
        _ => "1".to_string(),
    };
    let staged: u64 = conn.query_row(&format!("SELECT count(*) FROM {s}"), [], |r| r.get(0))?;
    let removed = conn.execute(
        &format!(
            "DELETE FROM {t} WHERE {scope} AND NOT EXISTS (SELECT 1 FROM {s} WHERE {matched})"
        ),
        [],
    )? as u64;
    let updated = if others.is_empty() {
        0
    } else {
        let set = others
            .iter()
            .map(|c| format!("{q} = {s}.{q}", q = quote(c)))
            .collect::<Vec<_>>()
            .join(", ");
        let differs = others
            .iter()
            .map(|c| format!("{t}.{q} IS NOT {s}.{q}", q = quote(c)))
            .collect::<Vec<_>>()
            .join(" OR ");
        conn.execute(
            &format!("UPDATE {t} SET {set} FROM {s} WHERE {matched} AND ({differs})"),
            [],
        )? as u64
    };
    let cols = column_list(&names);
    let inserted = conn.execute(
        &format!(
            "INSERT INTO {t} ({cols}) SELECT {cols} FROM {s} WHERE NOT EXISTS (SELECT 1 FROM {t} WHERE {matched})"
        ),
        [],
    )? as u64;
    conn.execute_batch(&format!("DROP TABLE {s}"))?;
    run.schema = None;
    stats.inserted = inserted;
    stats.updated = updated;
    stats.unchanged = staged - inserted - updated;
    stats.deleted = removed;
    stats.removed = removed;
    Ok(stats)
}
