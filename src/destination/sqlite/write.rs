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
use rusqlite::types::{ToSqlOutput, Value as Sql, ValueRef};
use rusqlite::{params, params_from_iter, CachedStatement, Connection, TransactionBehavior};
use serde_json::Value;

use super::books::{self, write_checkpoint};
use super::ddl::{ensure_table, is_empty, same_name};
use super::files;
use super::lock::fence;
use super::run_keys::RunKeys;
use super::stage::apply_stage;
use super::{Inner, Run};
use crate::batch::{PlannedBatch, Row};
use crate::destination::commit::{commit_batch, BatchTx};
use crate::destination::compare::{within, Rule};
use crate::destination::schema::{key_positions, Column, ColumnType, SqlValue, TableSchema};
use crate::destination::sql::{column_list, quote};
use crate::destination::Commit;
use crate::error::{Error, Result};
use crate::files::LoadedFile;
use crate::key::{parse_instant, Cursor};
use crate::mode::Mode;
use crate::record::Reject;
use crate::request::RequestEntry;
use crate::state::{format_time, Resolution, REJECTS_TABLE};
use crate::stats::RunStats;
use crate::windows::WindowEntry;

/// Writes a planned batch through the one commit path; returns its full
/// stats (the planner's and ours).
pub(super) fn write_batch(
    inner: &mut Inner,
    batch: PlannedBatch,
    commit: Commit,
) -> Result<RunStats> {
    let Inner { conn, run, lock } = inner;
    let run = run
        .as_mut()
        .ok_or_else(|| Error::destination("sqlite", "write before begin"))?;
    let (pipeline, run_id, lease) = match &commit.request {
        // An ingest request is a run of its own: its duplicates are counted
        // within it, and its claim, not the run lock, fences it.
        Some(request) => {
            run.keys = RunKeys::default();
            super::requests::reset_run_keys(conn)?;
            (
                request.pipeline.clone(),
                request.claim.clone(),
                std::time::Duration::ZERO,
            )
        }
        // A backfill window's claim, not the run lock, fences it.
        None => match &commit.window {
            Some(w) => (w.pipeline.clone(), w.run_id.clone(), w.lease),
            None => lock
                .clone()
                .ok_or_else(|| Error::destination("sqlite", "write without the run lock"))?,
        },
    };
    let before = run.info.checkpoint_before.clone();
    let tx = SqliteTx {
        tx: conn.transaction_with_behavior(TransactionBehavior::Immediate)?,
        run,
        pipeline,
        run_id,
        lease,
    };
    // Every step is a blocking call on this thread: the future never waits.
    futures_executor::block_on(commit_batch(tx, batch, &commit, before.as_ref()))
}

/// A batch's transaction on the run's connection.
struct SqliteTx<'a> {
    tx: rusqlite::Transaction<'a>,
    run: &'a mut Run,
    pipeline: String,
    run_id: String,
    lease: std::time::Duration,
}

impl BatchTx for SqliteTx<'_> {
    async fn fence(&mut self) -> Result<()> {
        fence(&self.tx, &self.pipeline, &self.run_id, self.lease)
    }

    async fn fence_window(&mut self, window: &WindowEntry) -> Result<()> {
        super::windows::fence(&self.tx, window)
    }

    async fn finish_window(&mut self, window: &WindowEntry, stats: &RunStats) -> Result<()> {
        super::windows::finish(&self.tx, window, stats)
    }

    async fn write_rows(
        &mut self,
        rows: Vec<Row>,
        stats: &mut RunStats,
        rejects: &mut Vec<Reject>,
    ) -> Result<bool> {
        if rows.is_empty() {
            return Ok(false);
        }
        let (tx, run) = (&self.tx, &mut *self.run);
        let table = run
            .stage
            .clone()
            .unwrap_or_else(|| run.target.table.clone());
        // The first rows of the run tell whether the table was empty when
        // it started (the run lock keeps the pipeline's own runs out; other
        // writers may still add rows, see `RowWriter::fresh`).
        let fresh = match run.fresh {
            Some(fresh) => fresh,
            None => {
                let fresh = is_empty(tx, &table)?;
                run.fresh = Some(fresh);
                fresh
            }
        };
        let (mut schema, rows) = ensure_table(tx, run, &table, rows, stats, rejects)?;
        if rows.is_empty() {
            return Ok(false);
        }
        let staged = run.stage.is_some();
        // Into a table idemload did not create: its own columns stay its own.
        let rows = run.fills.apply(
            &table,
            &mut schema.columns,
            |c| &c.name,
            &run.target.key_columns,
            rows,
            stats,
            rejects,
        )?;
        let mode = if staged { Mode::Merge } else { run.target.mode };
        let mut writer = RowWriter::new(tx, &table, &schema, run, fresh, mode)?;
        // Each row is dropped once written: the batch's memory goes as it goes.
        for row in rows {
            match writer.write(&row)? {
                Ok(outcome) if staged => {
                    // Staged rows are counted when the stage is applied.
                    if outcome == Outcome::Duplicate {
                        stats.duplicates += 1;
                    }
                }
                Ok(outcome) => outcome.count(stats),
                Err(reject) => {
                    stats.rejected += 1;
                    rejects.push(reject);
                }
            }
        }
        Ok(true)
    }

    async fn known_rejects(&mut self, rejects: &[Reject]) -> Result<u64> {
        books::known_rejects(&self.tx, &self.pipeline, &self.run_id, rejects)
    }

    async fn insert_rejects(&mut self, rejects: &[Reject]) -> Result<()> {
        insert_rejects(&self.tx, &self.pipeline, &self.run_id, rejects)
    }

    async fn log_files(&mut self, files: &[LoadedFile]) -> Result<()> {
        let table = &self.run.target.table;
        files::log_files(&self.tx, &self.pipeline, table, &self.run_id, files)
    }

    async fn write_checkpoint(&mut self, checkpoint: &Value) -> Result<()> {
        write_checkpoint(&self.tx, &self.pipeline, Some(checkpoint), &self.run_id)
    }

    async fn apply_stage(&mut self) -> Result<RunStats> {
        match self.run.stage.clone() {
            Some(stage) => apply_stage(&self.tx, self.run, &stage),
            None => Ok(RunStats::default()),
        }
    }

    async fn fence_request(&mut self, request: &RequestEntry) -> Result<()> {
        super::requests::fence(&self.tx, request)
    }

    fn begin_request(&mut self, request: &RequestEntry) {
        self.pipeline.clone_from(&request.pipeline);
        self.run_id.clone_from(&request.claim);
    }

    async fn finish_request(&mut self, request: &RequestEntry, response: &str) -> Result<()> {
        super::requests::finish(&self.tx, request, response)
    }

    async fn finish_run(&mut self, end: &Resolution, after: Option<&Value>) -> Result<()> {
        books::finish(
            &self.tx,
            &self.run_id,
            end.status,
            &end.stats,
            after,
            end.error.as_deref(),
        )
    }

    async fn commit(self, _changed: bool) -> Result<()> {
        Ok(self.tx.commit()?)
    }

    async fn rollback(self) {
        // Dropping the transaction rolls it back.
    }
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
    /// How each of `others` compares for "unchanged".
    rules: Vec<Rule>,
    cursor: Option<usize>,
    /// Keys this run wrote.
    seen: &'c mut RunKeys,
    /// The table held no row when the run started: a key new to the run is
    /// most likely not stored, so it needs one `INSERT … ON CONFLICT DO
    /// NOTHING` and no look-up. A conflict means another writer stored it
    /// since (the run lock keeps out only the pipeline's own runs): that row
    /// takes the general path, so the stats stay exact.
    fresh: Option<CachedStatement<'c>>,
    select: CachedStatement<'c>,
    insert: CachedStatement<'c>,
    update: Option<CachedStatement<'c>>,
    delete: Option<CachedStatement<'c>>,
    update_sql: String,
    delete_sql: String,
}

static NULL: serde_json::Value = serde_json::Value::Null;

impl<'c> RowWriter<'c> {
    fn new(
        conn: &'c Connection,
        table: &str,
        schema: &'c TableSchema,
        run: &'c mut Run,
        fresh: bool,
        mode: Mode,
    ) -> Result<Self> {
        let target = &run.target;
        let keys = key_positions(table, &schema.names(), &target.key_columns)?;
        let others: Vec<usize> = (0..schema.columns.len())
            .filter(|i| !keys.contains(i))
            .collect();
        let rules = others
            .iter()
            .map(|&i| {
                let c = &schema.columns[i];
                target.compare.rule(&c.name, c.ty)
            })
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
        let insert = format!(
            "INSERT INTO {t} ({}) VALUES ({placeholders})",
            column_list(&names)
        );
        // A table without a primary key or unique constraint on the key
        // (one idemload did not create) takes the general path.
        let fresh = if fresh {
            conn.prepare_cached(&format!(
                "{insert} ON CONFLICT ({}) DO NOTHING",
                column_list(&target.key_columns)
            ))
            .ok()
        } else {
            None
        };
        Ok(RowWriter {
            conn,
            schema,
            mode,
            cursor: target.cursor.as_deref().and_then(|c| schema.position(c)),
            seen: &mut run.keys,
            fresh,
            select: conn.prepare_cached(&format!(
                "SELECT {} FROM {t} WHERE {key_where}",
                column_list(&names)
            ))?,
            insert: conn.prepare_cached(&insert)?,
            update: None,
            delete: None,
            update_sql: format!("UPDATE {t} SET {set} WHERE {update_where}"),
            delete_sql: format!("DELETE FROM {t} WHERE {key_where}"),
            keys,
            others,
            rules,
        })
    }

    /// Writes one row; `Ok(Err(reject))` when a value does not fit.
    fn write(&mut self, row: &Row) -> Result<std::result::Result<Outcome, Reject>> {
        let mut values: Vec<ToSqlOutput<'_>> = Vec::with_capacity(self.schema.columns.len());
        // Fields usually come in column order: walk both, look up the rest.
        let mut fields = row.fields.iter().peekable();
        for column in &self.schema.columns {
            let value = match fields.peek() {
                Some((name, value)) if same_name(name, &column.name) => {
                    let value = *value;
                    fields.next();
                    value
                }
                _ => row.fields.get(&column.name).unwrap_or(&NULL),
            };
            match bind(column, value) {
                Ok(v) => values.push(v),
                Err(reason) => return Ok(Err(row.reject(reason))),
            }
        }
        let first_time = self.seen.insert(self.conn, &row.key)?;
        if let (Some(fresh), false) = (&mut self.fresh, row.delete) {
            if fresh.execute(params_from_iter(values.iter()))? == 1 {
                return Ok(Ok(if first_time {
                    Outcome::Inserted
                } else {
                    Outcome::Duplicate
                }));
            }
            // Stored: by this run (a duplicate, applied if newer), or by
            // another writer since the run began (another pipeline into the
            // same table): then the key is new to the run and the row is
            // compared with the stored one like any other.
        }
        let outcome = self.apply(row, &values)?;
        Ok(Ok(if first_time {
            outcome
        } else {
            Outcome::Duplicate
        }))
    }

    /// Reads the stored row and inserts, updates, deletes or leaves it;
    /// returns what happened.
    fn apply(&mut self, row: &Row, values: &[ToSqlOutput<'_>]) -> Result<Outcome> {
        let key_values = || self.keys.iter().map(|&i| &values[i]);
        // (stale, unchanged) of the stored row, if there is one.
        let stored = {
            let mut rows = self.select.query(params_from_iter(key_values()))?;
            match rows.next()? {
                None => None,
                Some(stored) => {
                    let stale = match (self.cursor, &row.cursor) {
                        (Some(i), Some(new)) => {
                            stored_cursor(stored.get_ref(i)?).is_some_and(|old| *new < old)
                        }
                        _ => false,
                    };
                    let mut unchanged = true;
                    for (&i, &rule) in self.others.iter().zip(&self.rules) {
                        if !same(stored.get_ref(i)?, value_ref(&values[i]), rule) {
                            unchanged = false;
                            break;
                        }
                    }
                    Some((stale, unchanged))
                }
            }
        };
        let outcome = match stored {
            None if row.delete => Outcome::Unchanged,
            None => {
                self.insert.execute(params_from_iter(values.iter()))?;
                Outcome::Inserted
            }
            Some(_) if self.mode == Mode::InsertNew => Outcome::Unchanged,
            Some((true, _)) => Outcome::Stale,
            Some(_) if row.delete => {
                if self.delete.is_none() {
                    self.delete = Some(self.conn.prepare_cached(&self.delete_sql)?);
                }
                if let Some(delete) = &mut self.delete {
                    delete.execute(params_from_iter(key_values()))?;
                }
                Outcome::Deleted
            }
            Some((false, true)) => Outcome::Unchanged,
            Some((false, false)) => {
                if self.update.is_none() {
                    self.update = Some(self.conn.prepare_cached(&self.update_sql)?);
                }
                if let Some(update) = &mut self.update {
                    let params = self
                        .others
                        .iter()
                        .chain(self.keys.iter())
                        .map(|&i| &values[i]);
                    update.execute(params_from_iter(params))?;
                }
                Outcome::Updated
            }
        };
        Ok(outcome)
    }
}

/// Converts a value for its column, borrowing the record's text where it
/// can; the same rules as [`ColumnType::convert`], which handles the rest.
fn bind<'r>(
    column: &Column,
    value: &'r serde_json::Value,
) -> std::result::Result<ToSqlOutput<'r>, String> {
    use serde_json::Value as J;
    let borrowed = match (column.ty, value) {
        (_, J::Null) => Some(ValueRef::Null),
        (ColumnType::Integer, J::Number(n)) => n.as_i64().map(ValueRef::Integer),
        (ColumnType::Float, J::Number(n)) => crate::number::exact_f64(n).map(ValueRef::Real),
        (ColumnType::Boolean, J::Bool(b)) => Some(ValueRef::Integer(*b as i64)),
        (ColumnType::Text | ColumnType::Any, J::String(s)) => Some(ValueRef::Text(s.as_bytes())),
        (ColumnType::Timestamp, J::String(s)) if parse_instant(s).is_some() => {
            Some(ValueRef::Text(s.as_bytes()))
        }
        _ => None,
    };
    if let (ColumnType::Any, J::Number(n)) = (column.ty, value) {
        // A table idemload did not create: a declared type such as NUMERIC
        // turns the digits of a number beyond a signed 64-bit integer or a
        // double into a rounded REAL.
        if n.as_i64().is_none() && crate::number::exact_f64(n).is_none() {
            return Err(format!(
                "value {} of field {:?} has more digits than SQLite keeps exactly in a column of type other than DECIMAL_TEXT",
                crate::number::shorten(n.as_str()),
                column.name
            ));
        }
    }
    match borrowed {
        Some(v) => Ok(ToSqlOutput::Borrowed(v)),
        None => column
            .ty
            .convert(&column.name, value)
            .map(|v| ToSqlOutput::Owned(to_sqlite(v))),
    }
}

fn value_ref<'a>(v: &'a ToSqlOutput<'_>) -> ValueRef<'a> {
    match v {
        ToSqlOutput::Borrowed(r) => *r,
        ToSqlOutput::Owned(o) => ValueRef::from(o),
        // Not produced by `bind`.
        _ => ValueRef::Null,
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
/// table idemload did not create may have stored one for the other), and
/// by the column's rule (the load-time column is never compared, a
/// tolerance lets numbers differ a little).
fn same(stored: ValueRef<'_>, new: ValueRef<'_>, rule: Rule) -> bool {
    match rule {
        Rule::Skip => return true,
        Rule::Within(distance) => {
            if let (Some(a), Some(b)) = (number(stored), number(new)) {
                if within(a, b, distance) {
                    return true;
                }
            }
        }
        Rule::Exact => {}
    }
    match (stored, new) {
        (ValueRef::Integer(a), ValueRef::Real(b)) | (ValueRef::Real(b), ValueRef::Integer(a)) => {
            a as f64 == b
        }
        (ValueRef::Text(a), ValueRef::Text(b)) => {
            a == b || String::from_utf8_lossy(a) == String::from_utf8_lossy(b)
        }
        (a, b) => a == b,
    }
}

/// A stored or bound number; decimals are stored as their digits.
fn number(v: ValueRef<'_>) -> Option<f64> {
    match v {
        ValueRef::Integer(i) => Some(i as f64),
        ValueRef::Real(f) => Some(f),
        ValueRef::Text(t) => std::str::from_utf8(t).ok()?.parse().ok(),
        _ => None,
    }
}

fn stored_cursor(v: ValueRef<'_>) -> Option<Cursor> {
    match v {
        ValueRef::Integer(i) => Some(Cursor::Int(i)),
        ValueRef::Real(f) if f.fract() == 0.0 => Some(Cursor::Int(f as i64)),
        ValueRef::Text(t) => Some(Cursor::from_text(&String::from_utf8_lossy(t))),
        _ => None,
    }
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
