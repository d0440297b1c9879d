//! Writing one batch to PostgreSQL, in one transaction.
//!
//! Fence the lease; create the table or add the columns the rows need;
//! check every value in Rust (a value that does not fit is a reject) and
//! encode it in binary COPY form.
//!
//! With a single integer key and columns of the types idemload sends, the
//! stored versions of the batch's keys are read back (one range scan or
//! one probe per key, binary COPY out) and compared byte for byte: a row
//! equal to its stored version is counted and never sent, a key not stored
//! is copied straight into the table. An identical re-run thus writes
//! nothing and sends nothing but the keys' range. The rows are usually
//! read ahead, while the batch before is written (see `ahead`).
//!
//! Every other row is copied into a temporary table and one statement
//! merges it: it notes the run's keys (a key this run already wrote makes
//! the record a `duplicate`), inserts new keys, updates a row only when a
//! column really differs (`IS DISTINCT FROM`, compared as typed values) and
//! its cursor is not older than the stored one, deletes on `delete_field`,
//! and counts each outcome exactly. Rejects, the checkpoint and, for the
//! last batch, the run's ending commit with it.

use std::ops::Range;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::OnceLock;

use bytes::BytesMut;
use serde_json::Value;
use tokio_postgres::{GenericClient, Transaction};

use super::ahead::Shape;
use super::bookkeeping::{self, fence, insert_rejects, write_checkpoint, RUN_KEYS};
use super::copy::{encode_columns, ColumnOrder, CopyBuffer, StoredRows};
use super::types::{read_schema, PgColumn, PgSchema, Stage};
use super::{pg_error, qualified, PostgresDestination, Run};
use crate::batch::{PlannedBatch, Row};
use crate::destination::commit::{commit_batch, BatchTx};
use crate::destination::schema::ColumnType;
use crate::destination::seen::SeenKeys;
use crate::destination::sql::{column_list, quote};
use crate::destination::Commit;
use crate::error::{Error, Result};
use crate::mode::Mode;
use crate::record::Reject;
use crate::state::Resolution;
use crate::stats::RunStats;

/// The temporary table a batch is copied into.
const BATCH: &str = "pg_temp._idemload_batch";
/// Its bookkeeping columns: the row deletes (`delete_field`); its key is
/// new to the run (when the run's key set is kept in memory).
const DEL: &str = "_idemload_del";
const FRESH: &str = "_idemload_fresh";

/// Writes a planned batch through the one commit path; returns its full
/// stats (the planner's and ours).
pub(super) async fn write_batch(
    dest: &mut PostgresDestination,
    batch: PlannedBatch,
    commit: Commit,
) -> Result<RunStats> {
    let PostgresDestination {
        client,
        schema,
        run,
        lock,
        batch_table,
        ahead,
        ..
    } = dest;
    // The stored rows read ahead for this batch, collected before the
    // transaction takes any lock the read could wait for.
    let read_ahead = match ahead.as_ref().and_then(|a| a.take()) {
        Some(pending) => pending.rows().await,
        None => None,
    };
    let run = run
        .as_mut()
        .ok_or_else(|| Error::destination("postgres", "write before begin"))?;
    let (pipeline, run_id, lease, _) = lock
        .clone()
        .ok_or_else(|| Error::destination("postgres", "write without the run lock"))?;
    let context = format!("table {:?}", run.target.table);
    let before = run.info.checkpoint_before.clone();
    let tx = PgTx {
        tx: client
            .transaction()
            .await
            .map_err(pg_error(context.clone()))?,
        schema: schema.as_str(),
        run,
        batch_table,
        ahead: ahead.as_deref(),
        read_ahead,
        context,
        pipeline,
        run_id,
        lease,
        made_batch_table: None,
        made_run_keys: false,
        seen_added: Vec::new(),
    };
    commit_batch(tx, batch, &commit, before.as_ref()).await
}

/// A batch's transaction, with what it makes that outlives it only if it
/// commits (temporary tables, the run's new keys).
struct PgTx<'a> {
    tx: Transaction<'a>,
    schema: &'a str,
    run: &'a mut Run,
    /// The shape of the temporary batch table this connection holds.
    batch_table: &'a mut Option<String>,
    ahead: Option<&'a super::ahead::Ahead>,
    read_ahead: Option<(Vec<i64>, Shape, StoredRows)>,
    context: String,
    pipeline: String,
    run_id: String,
    lease: std::time::Duration,
    made_batch_table: Option<String>,
    made_run_keys: bool,
    seen_added: Vec<i64>,
}

impl BatchTx for PgTx<'_> {
    async fn fence(&mut self) -> Result<()> {
        fence(
            &self.tx,
            self.schema,
            &self.pipeline,
            &self.run_id,
            self.lease,
        )
        .await
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
        let PgTx {
            tx,
            schema,
            run,
            batch_table,
            ahead,
            read_ahead,
            context,
            made_batch_table,
            made_run_keys,
            seen_added,
            ..
        } = self;
        let schema: &str = schema;
        let context = context.clone();
        // Whether the transaction changes anything beyond the lease it fences.
        let mut writes = false;
        let table = run
            .stage
            .clone()
            .unwrap_or_else(|| run.target.table.clone());
        let staged = run.stage.is_some();
        let (pg_schema, ddl) = ensure_table(tx, schema, run, &table, &rows, staged).await?;
        let created = ddl == Ddl::Created;
        writes |= ddl != Ddl::None;
        let mode = if staged { Mode::Merge } else { run.target.mode };
        let merge = Merge::new(&qualified(schema, &table), &pg_schema, &run.target, mode)?;
        // A single integer key: the run's key set is kept in memory, exact
        // and cheaper than a temporary table.
        let key_at = match merge.keys.as_slice() {
            [k] if k.stage() == Stage::Int8 => pg_schema.position(&k.name),
            _ => None,
        };
        if key_at.is_some() && run.seen.is_none() && !run.run_keys {
            run.seen = Some(SeenKeys::default());
        }
        let seen = run.seen.as_ref().filter(|_| key_at.is_some());
        let in_memory = seen.is_some();
        // The table was empty when this run first wrote to it: a key the run
        // has not met cannot be stored (the run lock keeps the pipeline's
        // other runs out), so such rows are copied straight into the table,
        // as fast as a plain COPY. Another writer's row with the same key
        // fails the batch on the primary key; it never doubles a row.
        if in_memory && run.empty_at_start.is_none() {
            let empty = created
                || !tx
                    .query_one(
                        &format!(
                            "SELECT EXISTS (SELECT 1 FROM {})",
                            qualified(schema, &table)
                        ),
                        &[],
                    )
                    .await
                    .map_err(pg_error(context.clone()))?
                    .get::<_, bool>(0);
            run.empty_at_start = Some(empty);
        }
        // Every column is sent as its own type, so rows can be copied
        // straight into the table and compared byte-wise with stored ones.
        let native = pg_schema.columns.iter().all(|c| c.stage().sql() == c.sql);
        let direct = in_memory && run.empty_at_start == Some(true) && native;
        // The stored versions of the keys the batch may already hold (not
        // the keys new to a table that was empty): a row equal to its stored
        // version is settled here, without sending it; a key not stored is
        // copied straight in. The server reads them while the rows are
        // encoded.
        //
        // Read ahead (see `ahead`), they are trusted only for keys new to
        // the run. The next batch is read ahead with this batch's shape.
        let shape = match (key_at, seen) {
            (Some(key_at), Some(_)) if native && !staged => Some(Shape {
                table: qualified(schema, &table),
                columns: pg_schema
                    .columns
                    .iter()
                    .map(|c| (c.name.clone(), c.sql.clone()))
                    .collect(),
                key_at,
            }),
            _ => None,
        };
        // Into a table empty at the start only keys the run met can be
        // stored: those are read in the transaction, never ahead.
        if let Some(ahead) = ahead.as_ref() {
            ahead.set_shape(shape.clone().filter(|_| !direct));
        }
        let mut ahead_rows = None;
        let lookup = match (&shape, seen) {
            (Some(shape), Some(seen)) => {
                let keys: Vec<i64> = stored_keys(&rows)
                    .filter(|&k| !direct || seen.contains(k))
                    .collect();
                match read_ahead.take() {
                    Some((read_keys, read_shape, stored))
                        if !direct && *shape == read_shape && read_keys == keys =>
                    {
                        ahead_rows = Some(stored);
                        None
                    }
                    _ => shape
                        .select(&keys)
                        .map(|query| (query, shape.key_at, keys.len())),
                }
            }
            _ => None,
        };
        let read_ahead = ahead_rows.is_some();
        let fetch = async {
            match &lookup {
                // About the size of the rows' own encoding.
                Some((query, key_at, n)) => {
                    let copy = StoredRows::copy(query);
                    StoredRows::read(tx.copy_out(&copy), *key_at, n * 256)
                        .await
                        .map(Some)
                }
                None => Ok(ahead_rows),
            }
        };
        let (stored, encoded) = tokio::join!(fetch, async {
            // Let the connection send the query before encoding starts.
            tokio::task::yield_now().await;
            encode(&pg_schema, rows, key_at, seen, stats, rejects)
        });
        let stored = stored?;
        *seen_added = encoded.rows.iter().filter_map(|r| r.key).collect();
        let columns = pg_schema.columns.len();
        let mut copy = CopyBuffer::new();
        let mut direct_copy = CopyBuffer::new();
        let mut deletes = false;
        for row in &encoded.rows {
            let bytes = &encoded.buf[row.at.clone()];
            let fresh = row.fresh == Some(true);
            if !row.delete {
                let found = match (&stored, row.key) {
                    (Some(stored), Some(key)) if fresh || !read_ahead => Some(stored.get(key)),
                    _ => None,
                };
                match found {
                    _ if direct && fresh => {
                        direct_copy.push_encoded(&[], columns, bytes);
                        continue;
                    }
                    Some(Some(old)) if mode == Mode::InsertNew || old == bytes => {
                        if fresh {
                            stats.unchanged += 1;
                        } else {
                            stats.duplicates += 1;
                        }
                        continue;
                    }
                    Some(None) if fresh => {
                        direct_copy.push_encoded(&[], columns, bytes);
                        continue;
                    }
                    _ => {}
                }
            }
            deletes |= row.delete;
            copy.push_encoded(&[Some(row.delete), row.fresh], columns, bytes);
        }
        writes |= direct_copy.rows > 0 || copy.rows > 0;
        if direct_copy.rows > 0 {
            let copied = direct_copy
                .send(tx, &qualified(schema, &table), &merge.table_columns())
                .await?;
            if !staged {
                stats.inserted += copied;
            }
        }
        if copy.rows > 0 {
            let shape = merge.batch_table();
            if batch_table.as_deref() != Some(shape.as_str()) {
                tx.batch_execute(&format!("DROP TABLE IF EXISTS {BATCH}; {shape}"))
                    .await
                    .map_err(pg_error(context.clone()))?;
                *made_batch_table = Some(shape);
            }
            if !run.run_keys && !in_memory {
                tx.batch_execute(&merge.run_keys_table())
                    .await
                    .map_err(pg_error(context.clone()))?;
                *made_run_keys = true;
            }
            copy.send(tx, BATCH, &merge.copy_columns()).await?;
            // A batch is small against its table: every row is looked up
            // through the key's index, never by scanning the table.
            tx.batch_execute("SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off")
                .await
                .map_err(pg_error(context.clone()))?;
            let counts = tx
                .query_one(&merge.statement(deletes, in_memory), &[])
                .await
                .map_err(pg_error(context.clone()))?;
            tx.batch_execute(
                "SET LOCAL enable_hashjoin TO DEFAULT; SET LOCAL enable_mergejoin TO DEFAULT",
            )
            .await
            .map_err(pg_error(context.clone()))?;
            let get = |i: usize| counts.get::<_, i64>(i) as u64;
            let (total, fresh, inserted, updated, deleted, stale) =
                (get(0), get(1), get(2), get(3), get(4), get(5));
            stats.duplicates += total - fresh;
            // Staged rows are counted when the stage is applied.
            if !staged {
                stats.inserted += inserted;
                stats.updated += updated;
                stats.deleted += deleted;
                stats.skipped += stale;
                stats.unchanged += fresh - inserted - updated - deleted - stale;
            }
        }
        Ok(writes)
    }

    async fn insert_rejects(&mut self, rejects: &[Reject]) -> Result<()> {
        insert_rejects(&self.tx, self.schema, &self.pipeline, &self.run_id, rejects).await
    }

    async fn write_checkpoint(&mut self, checkpoint: &Value) -> Result<()> {
        write_checkpoint(
            &self.tx,
            self.schema,
            &self.pipeline,
            Some(checkpoint),
            &self.run_id,
        )
        .await
    }

    async fn apply_stage(&mut self) -> Result<RunStats> {
        match self.run.stage.clone() {
            Some(stage) => apply_stage(&self.tx, self.schema, self.run, &stage).await,
            None => Ok(RunStats::default()),
        }
    }

    async fn finish_run(&mut self, end: &Resolution, after: Option<&Value>) -> Result<()> {
        bookkeeping::finish(
            &self.tx,
            self.schema,
            &self.run_id,
            end.status,
            &end.stats,
            after,
            end.error.as_deref(),
        )
        .await
    }

    async fn commit(self, changed: bool) -> Result<()> {
        let PgTx {
            tx,
            run,
            batch_table,
            context,
            lease,
            made_batch_table,
            made_run_keys,
            seen_added,
            ..
        } = self;
        // A batch that changes nothing has only the lease's new expiry to
        // keep; while the last one kept is recent, a rollback spares the
        // server a WAL flush per batch of an unchanged re-run. (The advisory
        // lock, not the expiry, keeps other runs out: the lease row is for
        // people to read.)
        if changed || run.renewed.elapsed() >= lease / 2 {
            tx.commit()
                .await
                .map_err(pg_error(format!("{context}, commit")))?;
            run.renewed = std::time::Instant::now();
        } else {
            tx.rollback()
                .await
                .map_err(pg_error(format!("{context}, rollback")))?;
        }
        if let Some(shape) = made_batch_table {
            *batch_table = Some(shape);
        }
        run.run_keys |= made_run_keys;
        if let Some(seen) = run.seen.as_mut() {
            seen.extend(seen_added);
        }
        Ok(())
    }

    async fn rollback(self) {
        // Dropping the transaction rolls it back.
    }
}

/// A batch's rows checked and encoded, each row's columns in `buf`.
struct Encoded {
    buf: BytesMut,
    rows: Vec<EncodedRow>,
}

struct EncodedRow {
    /// The single integer key, when the run's key set is kept in memory.
    key: Option<i64>,
    /// The key is new to the run (known only with the in-memory key set).
    fresh: Option<bool>,
    delete: bool,
    at: Range<usize>,
}

/// Checks and encodes every row; a value that does not fit makes its
/// record a reject. With `seen` (a single integer key) the run's key set is
/// kept here and each row says whether its key is new to the run.
fn encode(
    schema: &PgSchema,
    rows: Vec<Row>,
    key_at: Option<usize>,
    seen: Option<&SeenKeys>,
    stats: &mut RunStats,
    rejects: &mut Vec<Reject>,
) -> Encoded {
    let mut buf = BytesMut::with_capacity(rows.len() * 160);
    let mut encoded = Vec::with_capacity(rows.len());
    let mut order = ColumnOrder::default();
    for row in &rows {
        // The key as its column holds it (7.0 is 7; a key that does not fit
        // the column is rejected below with the rest of the row).
        let key = match (seen, key_at) {
            (Some(_), Some(_)) => int_key(row),
            _ => None,
        };
        let fresh = match (seen, key) {
            (Some(seen), Some(k)) => Some(!seen.contains(k)),
            _ => None,
        };
        let start = buf.len();
        match encode_columns(&mut buf, &schema.columns, &row.fields, &mut order) {
            Ok(()) => encoded.push(EncodedRow {
                key,
                fresh,
                delete: row.delete,
                at: start..buf.len(),
            }),
            Err(reason) => {
                stats.rejected += 1;
                rejects.push(Reject {
                    source: row.source.clone(),
                    key: Some(row.key.to_string()),
                    raw: serde_json::to_string(&row.fields).unwrap_or_default(),
                    reason,
                });
            }
        }
    }
    drop_later(rows);
    Encoded { buf, rows: encoded }
}

/// Frees a batch's records on a thread of its own while this one goes on
/// with the batch (ten thousand records take milliseconds to free). One
/// batch waits at most: in rayon's pool, busy parsing, several batches
/// could wait, all of them resident.
fn drop_later<T: Send + 'static>(value: T) {
    type Garbage = Box<dyn Send>;
    static DROPPER: OnceLock<Option<SyncSender<Garbage>>> = OnceLock::new();
    let dropper = DROPPER.get_or_init(|| {
        let (tx, rx) = sync_channel::<Garbage>(1);
        std::thread::Builder::new()
            .name("idemload-free".into())
            .spawn(move || rx.into_iter().for_each(drop))
            .ok()?;
        Some(tx)
    });
    match dropper {
        Some(tx) => {
            if let Err(unsent) = tx.send(Box::new(value)) {
                drop(unsent.0);
            }
        }
        None => drop(value),
    }
}

/// The keys whose stored rows a batch compares with: the single integer
/// keys of the rows that do not delete.
pub(super) fn stored_keys(rows: &[Row]) -> impl Iterator<Item = i64> + '_ {
    rows.iter().filter(|r| !r.delete).filter_map(int_key)
}

/// A single integer key as its `bigint` column holds it (7.0 is 7; a key
/// that does not fit the column has none, and is rejected with its row).
pub(super) fn int_key(row: &Row) -> Option<i64> {
    row.key.values().first().and_then(Value::as_i64)
}

/// The SQL of one batch's merge into one table.
struct Merge<'a> {
    table: String,
    schema: &'a PgSchema,
    mode: Mode,
    keys: Vec<&'a PgColumn>,
    others: Vec<&'a PgColumn>,
    cursor: Option<&'a PgColumn>,
}

impl<'a> Merge<'a> {
    fn new(
        table: &str,
        schema: &'a PgSchema,
        target: &crate::destination::Target,
        mode: Mode,
    ) -> Result<Merge<'a>> {
        let keys = target
            .key_columns
            .iter()
            .map(|k| {
                schema
                    .position(k)
                    .map(|i| &schema.columns[i])
                    .ok_or_else(|| {
                        Error::destination(
                            format!("table {table}"),
                            format!("has no key column {k:?}"),
                        )
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let others = schema
            .columns
            .iter()
            .filter(|c| !target.key_columns.contains(&c.name))
            .collect();
        Ok(Merge {
            table: table.to_string(),
            schema,
            mode,
            cursor: target
                .cursor
                .as_deref()
                .and_then(|c| schema.position(c))
                .map(|i| &schema.columns[i]),
            keys,
            others,
        })
    }

    /// The temporary table shaped like the COPY, emptied at each commit.
    fn batch_table(&self) -> String {
        let defs: Vec<String> = self
            .schema
            .columns
            .iter()
            .map(|c| format!("{} {}", quote(&c.name), c.stage().sql()))
            .collect();
        format!(
            "CREATE TEMP TABLE _idemload_batch ({} boolean, {} boolean, {}) ON COMMIT DELETE ROWS",
            quote(DEL),
            quote(FRESH),
            defs.join(", ")
        )
    }

    /// The temporary table of the keys the run has written (typed like the
    /// batch's key columns, so a lookup is an index probe).
    fn run_keys_table(&self) -> String {
        let defs: Vec<String> = self
            .keys
            .iter()
            .map(|c| format!("{} {}", quote(&c.name), c.stage().sql()))
            .collect();
        format!(
            "CREATE TEMP TABLE IF NOT EXISTS _idemload_run_keys ({}, PRIMARY KEY ({}))",
            defs.join(", "),
            self.key_columns()
        )
    }

    fn key_columns(&self) -> String {
        column_list(
            &self
                .keys
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>(),
        )
    }

    fn table_columns(&self) -> String {
        column_list(
            &self
                .schema
                .columns
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>(),
        )
    }

    fn copy_columns(&self) -> String {
        let mut names = vec![DEL, FRESH];
        names.extend(self.schema.columns.iter().map(|c| c.name.as_str()));
        column_list(&names)
    }

    /// `(new < stored) IS TRUE`: the new version's cursor is older than the
    /// stored one (a null on either side never makes a row stale). Text
    /// cursors compare byte-wise, like the planner's.
    fn stale(&self, new: &str, stored: &str) -> Option<String> {
        let c = self.cursor?;
        let collate = if c.ty == ColumnType::Text {
            " COLLATE \"C\""
        } else {
            ""
        };
        let q = quote(&c.name);
        Some(format!(
            "({new}{collate} < {stored}.{q}{collate}) IS TRUE",
            new = c.cast(&format!("{new}.{q}"))
        ))
    }

    /// `t.k = s.k AND …` with the batch side cast to the column's type.
    fn key_match(&self, t: &str, s: &str) -> String {
        self.keys
            .iter()
            .map(|c| {
                let q = quote(&c.name);
                format!("{t}.{q} = {}", c.cast(&format!("{s}.{q}")))
            })
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// `a.k = b.k AND …` between two tables of batch-typed keys.
    fn same_key(&self, a: &str, b: &str) -> String {
        self.keys
            .iter()
            .map(|c| format!("{a}.{q} = {b}.{q}", q = quote(&c.name)))
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// The merge and its counts: total, fresh (first time this run),
    /// inserted, updated, deleted, stale, of the fresh rows.
    ///
    /// New keys are inserted by a plain `INSERT` (the run lock keeps other
    /// runs of the pipeline out), rows whose columns differ by an `UPDATE`;
    /// an unchanged or stale row is never touched, not even locked, so an
    /// identical re-run writes nothing. Existence is probed per row through
    /// the primary key (`OFFSET 0` keeps the planner from scanning the
    /// whole table for a batch; the caller turns hash and merge joins off).
    fn statement(&self, deletes: bool, in_memory: bool) -> String {
        let t = &self.table;
        let names: Vec<&str> = self
            .schema
            .columns
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        let cols = column_list(&names);
        let exprs = self
            .schema
            .columns
            .iter()
            .map(|c| c.cast(&format!("s.{}", quote(&c.name))))
            .collect::<Vec<_>>()
            .join(", ");
        let key_cols = self.key_columns();
        let s_keys = self
            .keys
            .iter()
            .map(|c| format!("s.{}", quote(&c.name)))
            .collect::<Vec<_>>()
            .join(", ");
        let del = quote(DEL);
        let stale = self
            .stale("s", "t")
            .filter(|_| self.mode != Mode::InsertNew);
        let fresh = if in_memory {
            format!("SELECT {s_keys} FROM {BATCH} s WHERE s.{}", quote(FRESH))
        } else {
            format!(
                "INSERT INTO {RUN_KEYS} ({key_cols}) SELECT {s_keys} FROM {BATCH} s
                WHERE NOT EXISTS (SELECT 1 FROM {RUN_KEYS} r WHERE {rk_match} OFFSET 0)
                RETURNING {key_cols}",
                rk_match = self.same_key("r", "s"),
            )
        };
        let mut sql = format!(
            "WITH fresh AS ({fresh}),
             ins AS (
                INSERT INTO {t} AS i ({cols}) SELECT {exprs} FROM {BATCH} s
                WHERE NOT s.{del} AND NOT EXISTS (SELECT 1 FROM {t} t WHERE {match} OFFSET 0)
                RETURNING {ins_keys}
             )",
            ins_keys = self
                .keys
                .iter()
                .map(|c| {
                    let q = quote(&c.name);
                    if c.stage().sql() == c.sql {
                        format!("i.{q}")
                    } else {
                        format!("i.{q}::{} AS {q}", c.stage().sql())
                    }
                })
                .collect::<Vec<_>>()
                .join(", "),
            match = self.key_match("t", "s"),
        );
        let mut outcomes = vec!["ins"];
        if self.mode != Mode::InsertNew && !self.others.is_empty() {
            let set = self
                .others
                .iter()
                .map(|c| {
                    format!(
                        "{} = {}",
                        quote(&c.name),
                        c.cast(&format!("s.{}", quote(&c.name)))
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            let stored = self
                .others
                .iter()
                .map(|c| c.comparable(&format!("t.{}", quote(&c.name))))
                .collect::<Vec<_>>()
                .join(", ");
            let new = self
                .others
                .iter()
                .map(|c| c.comparable(&c.cast(&format!("s.{}", quote(&c.name)))))
                .collect::<Vec<_>>()
                .join(", ");
            let not_stale = match &stale {
                Some(cond) => format!(" AND NOT {cond}"),
                None => String::new(),
            };
            // ROW() keeps a one-column list a row constructor.
            sql.push_str(&format!(
                ", upd AS (
                    UPDATE {t} t SET {set} FROM {BATCH} s
                    WHERE {match} AND NOT s.{del}
                      AND ROW({stored}) IS DISTINCT FROM ROW({new}){not_stale}
                    RETURNING {returning}
                 )",
                match = self.key_match("t", "s"),
                returning = self.returning("t", "s"),
            ));
            outcomes.push("upd");
        }
        if deletes {
            let not_stale = match self.stale("s", "t") {
                Some(cond) => format!(" AND NOT {cond}"),
                None => String::new(),
            };
            sql.push_str(&format!(
                ", del AS (
                    DELETE FROM {t} t USING {BATCH} s
                    WHERE s.{del} AND {match}{not_stale}
                    RETURNING {returning}
                 )",
                match = self.key_match("t", "s"),
                returning = self.returning("t", "s"),
            ));
            outcomes.push("del");
        }
        if let Some(cond) = &stale {
            sql.push_str(&format!(
                ", stale AS (
                    SELECT {s_keys} FROM {BATCH} s JOIN {t} t ON {match} WHERE {cond}
                 )",
                match = self.key_match("t", "s"),
            ));
            outcomes.push("stale");
        }
        // Each outcome counted among the keys the run meets for the first
        // time: a set intersection, which needs no join.
        let count = |name: &str| {
            if outcomes.contains(&name) {
                format!(
                    "(SELECT count(*) FROM (SELECT {key_cols} FROM {name} \
                     INTERSECT ALL SELECT {key_cols} FROM fresh) x)"
                )
            } else {
                "0::bigint".to_string()
            }
        };
        sql.push_str(&format!(
            " SELECT (SELECT count(*) FROM {BATCH}), (SELECT count(*) FROM fresh), {}, {}, {}, {}",
            count("ins"),
            count("upd"),
            count("del"),
            count("stale"),
        ));
        sql
    }

    /// The key columns of a modified row, typed like the batch's.
    fn returning(&self, t: &str, s: &str) -> String {
        self.keys
            .iter()
            .map(|c| {
                let q = quote(&c.name);
                if c.stage().sql() == c.sql {
                    format!("{t}.{q}")
                } else {
                    format!("{s}.{q}")
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `CREATE TABLE` with a primary key on the key columns.
pub(super) async fn create_table(
    tx: &impl GenericClient,
    schema: &str,
    table: &str,
    columns: &[PgColumn],
    keys: &[String],
    unlogged: bool,
) -> Result<()> {
    let defs = columns
        .iter()
        .map(|c| {
            let not_null = if keys.contains(&c.name) {
                " NOT NULL"
            } else {
                ""
            };
            format!("{} {}{not_null}", quote(&c.name), c.sql)
        })
        .collect::<Vec<_>>()
        .join(", ");
    let kind = if unlogged { "UNLOGGED " } else { "" };
    tx.batch_execute(&format!(
        "CREATE {kind}TABLE {} ({defs}, PRIMARY KEY ({}))",
        qualified(schema, table),
        column_list(keys)
    ))
    .await
    .map_err(pg_error(format!("creating table {table:?}")))?;
    Ok(())
}

async fn add_columns(
    tx: &impl GenericClient,
    schema: &str,
    table: &str,
    columns: &[PgColumn],
) -> Result<()> {
    if columns.is_empty() {
        return Ok(());
    }
    let adds = columns
        .iter()
        .map(|c| format!("ADD COLUMN {} {}", quote(&c.name), c.sql))
        .collect::<Vec<_>>()
        .join(", ");
    tx.batch_execute(&format!("ALTER TABLE {} {adds}", qualified(schema, table)))
        .await
        .map_err(pg_error(format!("adding columns to table {table:?}")))?;
    Ok(())
}

/// Creates the table or adds the columns the rows need; returns its schema.
async fn ensure_table(
    tx: &Transaction<'_>,
    schema: &str,
    run: &mut Run,
    table: &str,
    rows: &[Row],
    unlogged: bool,
) -> Result<(PgSchema, Ddl)> {
    let mut current = match run.schema.take() {
        Some(s) => s,
        None => read_schema(tx, schema, table).await?.unwrap_or_default(),
    };
    let missing = current.missing(rows.iter().map(|r| &r.fields));
    let known = current.columns.len();
    let created = current.columns.is_empty();
    if created {
        create_table(
            tx,
            schema,
            table,
            &missing,
            &run.target.key_columns,
            unlogged,
        )
        .await?;
        tracing::info!(table, columns = missing.len(), "Table created.");
        current.columns = missing;
    } else if !missing.is_empty() {
        add_columns(tx, schema, table, &missing).await?;
        tracing::info!(table, added = missing.len(), "Columns added.");
        current.columns.extend(missing);
    }
    run.schema = Some(current.clone());
    let ddl = match (created, current.columns.len() > known) {
        (true, _) => Ddl::Created,
        (false, true) => Ddl::Altered,
        (false, false) => Ddl::None,
    };
    Ok((current, ddl))
}

/// What [`ensure_table`] changed.
#[derive(Debug, PartialEq, Eq)]
enum Ddl {
    None,
    Created,
    Altered,
}

/// Applies a `replace`/`window` stage to the target, writing only the
/// differences, and drops the stage. Returns the logical change.
async fn apply_stage(
    tx: &Transaction<'_>,
    schema: &str,
    run: &mut Run,
    stage: &str,
) -> Result<RunStats> {
    let target = run.target.table.clone();
    let keys = run.target.key_columns.clone();
    let context = format!("applying the stage of table {target:?}");
    let (t, s) = (qualified(schema, &target), qualified(schema, stage));
    let mut stats = RunStats::default();
    let Some(stage_schema) = read_schema(tx, schema, stage).await? else {
        // Nothing was staged: a replace empties the table, a window touches nothing.
        if run.target.mode == Mode::Replace && read_schema(tx, schema, &target).await?.is_some() {
            let removed = tx
                .execute(&format!("DELETE FROM {t}"), &[])
                .await
                .map_err(pg_error(context))?;
            stats.deleted = removed;
            stats.removed = removed;
        }
        return Ok(stats);
    };
    let mut target_schema = match read_schema(tx, schema, &target).await? {
        Some(ts) => ts,
        None => {
            create_table(tx, schema, &target, &stage_schema.columns, &keys, false).await?;
            stage_schema.clone()
        }
    };
    // Both tables get every column of the other, so a snapshot without a
    // field sets it to null.
    let to_target: Vec<PgColumn> = stage_schema
        .columns
        .iter()
        .filter(|c| target_schema.position(&c.name).is_none())
        .cloned()
        .collect();
    add_columns(tx, schema, &target, &to_target).await?;
    target_schema.columns.extend(to_target);
    let to_stage: Vec<PgColumn> = target_schema
        .columns
        .iter()
        .filter(|c| stage_schema.position(&c.name).is_none())
        .cloned()
        .collect();
    add_columns(tx, schema, stage, &to_stage).await?;

    let names: Vec<&str> = target_schema
        .columns
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    let others: Vec<&PgColumn> = target_schema
        .columns
        .iter()
        .filter(|c| !keys.contains(&c.name))
        .collect();
    let matched = keys
        .iter()
        .map(|k| format!("t.{q} = s.{q}", q = quote(k)))
        .collect::<Vec<_>>()
        .join(" AND ");
    let scope = match (&run.target.mode, &run.target.window_field) {
        (Mode::Window, Some(w)) => {
            let w = quote(w);
            format!("t.{w} BETWEEN (SELECT min({w}) FROM {s}) AND (SELECT max({w}) FROM {s})")
        }
        _ => "true".to_string(),
    };
    let run_sql = |sql: String| {
        let context = context.clone();
        async move { tx.execute(&sql, &[]).await.map_err(pg_error(context)) }
    };
    let staged: i64 = tx
        .query_one(&format!("SELECT count(*) FROM {s}"), &[])
        .await
        .map_err(pg_error(context.clone()))?
        .get(0);
    let removed = run_sql(format!(
        "DELETE FROM {t} t WHERE {scope} AND NOT EXISTS (SELECT 1 FROM {s} s WHERE {matched})"
    ))
    .await?;
    let updated = if others.is_empty() {
        0
    } else {
        let set = others
            .iter()
            .map(|c| format!("{q} = s.{q}", q = quote(&c.name)))
            .collect::<Vec<_>>()
            .join(", ");
        let stored = others
            .iter()
            .map(|c| c.comparable(&format!("t.{}", quote(&c.name))))
            .collect::<Vec<_>>()
            .join(", ");
        let new = others
            .iter()
            .map(|c| c.comparable(&format!("s.{}", quote(&c.name))))
            .collect::<Vec<_>>()
            .join(", ");
        run_sql(format!(
            "UPDATE {t} t SET {set} FROM {s} s
             WHERE {matched} AND ROW({stored}) IS DISTINCT FROM ROW({new})"
        ))
        .await?
    };
    let cols = column_list(&names);
    let s_cols = names
        .iter()
        .map(|n| format!("s.{}", quote(n)))
        .collect::<Vec<_>>()
        .join(", ");
    let inserted = run_sql(format!(
        "INSERT INTO {t} ({cols}) SELECT {s_cols} FROM {s} s
         WHERE NOT EXISTS (SELECT 1 FROM {t} t WHERE {matched})"
    ))
    .await?;
    tx.batch_execute(&format!("DROP TABLE {s}"))
        .await
        .map_err(pg_error(context))?;
    run.schema = None;
    stats.inserted = inserted;
    stats.updated = updated;
    stats.unchanged = staged as u64 - inserted - updated;
    stats.deleted = removed;
    stats.removed = removed;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::super::testing::{server, TestSchema};

    use crate::stats::RunStats;
    use crate::RunStatus;

    /// Runs the same input into SQLite and PostgreSQL: the stats must agree.
    async fn both(
        pg: &TestSchema,
        dir: &std::path::Path,
        records: &[Value],
        load: &str,
    ) -> RunStats {
        let sqlite = format!("sqlite://{}", dir.join("ref.db").display());
        let expected = pg.run(dir, Some(&sqlite), records, load).await.unwrap();
        let got = pg.run(dir, None, records, load).await.unwrap();
        assert_eq!(
            got.stats, expected.stats,
            "\nexpected (sqlite):\n{:?}\ngot (postgres):\n{:?}",
            expected.stats, got.stats
        );
        assert_eq!(got.status, expected.status);
        assert!(got.stats.is_balanced(), "{:?}", got.stats);
        got.stats
    }

    async fn xmins(pg: &TestSchema) -> Vec<String> {
        pg.client
            .query(
                &format!(
                    "SELECT xmin::text FROM {}.t ORDER BY id",
                    super::quote(&pg.name)
                ),
                &[],
            )
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// Rows whose columns all travel as their own types are compared with
    /// their stored versions byte for byte, in Rust: what is settled there
    /// must be counted exactly as the merge statement would.
    #[tokio::test]
    async fn rows_settled_against_their_stored_versions_count_like_the_merge() {
        let Some(url) = server("rows_settled_against_their_stored_versions_count_like_the_merge")
        else {
            return;
        };
        let pg = TestSchema::new(&url, "settled").await;
        let dir = tempfile::tempdir().unwrap();
        let record = |i: i64| {
            json!({
                "id": i * 1000, "name": format!("n{i}"), "score": i as f64 / 7.0,
                "ok": i % 3 == 0, "at": format!("2024-05-01T10:{:02}:00.5+02:00", i % 60),
            })
        };
        let mut records: Vec<Value> = (0..40).map(record).collect();
        records[4]["score"] = json!(0.0);
        records[5]["name"] = Value::Null;
        let load = "batch_size = 6";
        let first = both(&pg, dir.path(), &records, load).await;
        assert_eq!(first.inserted, 40);
        let before = xmins(&pg).await;
        // The same rows, some spelled differently, and keys met again in
        // later batches (sparse keys: each batch probes key by key).
        let mut again = records.clone();
        again[1] = json!({"at": "2024-05-01T10:01:00.5+02:00", "ok": false, "score": 1.0 / 7.0,
                          "name": "n1", "id": 1000});
        again[6].as_object_mut().unwrap().remove("ok");
        again[6]["ok"] = json!(true);
        again.push(records[2].clone());
        again.push(records[30].clone());
        let stats = both(&pg, dir.path(), &again, load).await;
        assert_eq!(
            (
                stats.inserted,
                stats.updated,
                stats.unchanged,
                stats.duplicates
            ),
            (0, 0, 40, 2),
            "{stats:?}"
        );
        assert_eq!(xmins(&pg).await, before, "an identical re-run wrote rows");
        // -0.0 differs in bytes but not in value: still unchanged; a field
        // left out is a null, a change; a new key goes straight in; a key
        // met again in a later batch is a duplicate, and its later version
        // is written.
        let mut changed = records.clone();
        changed[4]["score"] = json!(-0.0);
        changed[7].as_object_mut().unwrap().remove("name");
        changed.push(record(99));
        changed.push(
            json!({"id": 12000, "name": "twice", "score": 1.5, "ok": true,
                            "at": "2024-05-01T10:12:00Z"}),
        );
        let stats = both(&pg, dir.path(), &changed, load).await;
        assert_eq!(
            (
                stats.inserted,
                stats.updated,
                stats.unchanged,
                stats.duplicates
            ),
            (1, 1, 39, 1),
            "{stats:?}"
        );
        let rows = pg.rows("id").await;
        assert_eq!(rows.len(), 41);
        assert_eq!(rows[7]["name"], Value::Null);
        assert_eq!(rows[12]["name"], json!("twice"));
        assert_eq!(rows[4]["score"].as_f64(), Some(0.0));
        let insert_new = both(
            &pg,
            dir.path(),
            &records,
            "mode = \"insert_new\"\nbatch_size = 6",
        )
        .await;
        assert_eq!((insert_new.inserted, insert_new.unchanged), (0, 40));
        pg.drop().await;
    }

    /// The next batch's stored rows are read ahead, before the batch being
    /// written commits: a key changed in one batch and changed back in the
    /// next must end with the later version, not be settled as equal to
    /// what was stored before the run.
    #[tokio::test]
    async fn rows_read_ahead_never_hide_the_previous_batch_writes() {
        let Some(url) = server("rows_read_ahead_never_hide_the_previous_batch_writes") else {
            return;
        };
        let pg = TestSchema::new(&url, "ahead").await;
        let dir = tempfile::tempdir().unwrap();
        let record = |i: i64, name: &str| json!({"id": i, "name": name, "n": i * 3});
        let records: Vec<Value> = (0..40).map(|i| record(i, &format!("n{i}"))).collect();
        let load = "batch_size = 4";
        assert_eq!(both(&pg, dir.path(), &records, load).await.inserted, 40);
        // Batch b changes key 4b and puts back key 4(b-1), which batch b-1
        // changed; the last batch puts back key 36.
        let mut input = Vec::new();
        for b in 0..10i64 {
            input.push(record(4 * b, "changed"));
            input.push(records[4 * b as usize + 1].clone());
            input.push(records[4 * b as usize + 2].clone());
            input.push(match b {
                0 => records[3].clone(),
                _ => records[4 * (b - 1) as usize].clone(),
            });
        }
        input.push(records[36].clone());
        let stats = both(&pg, dir.path(), &input, load).await;
        assert_eq!(
            (stats.inserted, stats.updated, stats.duplicates),
            (0, 10, 10),
            "{stats:?}"
        );
        assert_eq!(
            pg.rows("id").await,
            records,
            "a key put back was left changed"
        );
        // A column added by one batch: the next batch's rows read ahead
        // without it are not trusted, and the run still counts exactly.
        let mut wider = records.clone();
        for r in wider.iter_mut().skip(8) {
            r["extra"] = json!(1);
        }
        let stats = both(&pg, dir.path(), &wider, load).await;
        assert_eq!((stats.updated, stats.unchanged), (32, 8), "{stats:?}");
        let stats = both(&pg, dir.path(), &wider, load).await;
        assert_eq!(stats.unchanged, 40, "{stats:?}");
        pg.drop().await;
    }

    #[tokio::test]
    async fn run_twice_changes_nothing_and_counts_exactly() {
        let Some(url) = server("run_twice_changes_nothing_and_counts_exactly") else {
            return;
        };
        let pg = TestSchema::new(&url, "run_twice").await;
        let dir = tempfile::tempdir().unwrap();
        let mut records: Vec<Value> = (0..50)
            .map(|i| {
                json!({
                    "id": i, "name": format!("n{i}"), "score": i as f64 / 3.0, "ok": i % 2 == 0,
                    "at": format!("2024-05-01T10:{:02}:00.123456789+02:00", i % 60),
                    "meta": {"b": [1, 2, {"z": null}], "a": "x"},
                })
            })
            .collect();
        // An in-input duplicate in the same batch: the later version wins.
        records.insert(
            5,
            json!({"id": 3, "name": "three", "score": 1.0, "ok": true,
            "at": "2024-05-01T10:00:00Z", "meta": {"a": 1}}),
        );
        let load = "batch_size = 7";
        let first = both(&pg, dir.path(), &records, load).await;
        assert_eq!((first.inserted, first.duplicates), (50, 1));
        let before = xmins(&pg).await;
        let again = both(&pg, dir.path(), &records, load).await;
        assert_eq!((again.inserted, again.updated, again.unchanged), (0, 0, 50));
        assert_eq!(xmins(&pg).await, before, "an identical re-run wrote rows");
        // The same instants written with another offset, the same object
        // with its keys in another order: still unchanged.
        let respelled: Vec<Value> = records
            .iter()
            .map(|r| {
                let mut r = r.clone();
                if r["id"] == json!(5) {
                    r["at"] = json!("2024-05-01T08:05:00.123457Z");
                    r["meta"] = json!({"a": "x", "b": [1, 2, {"z": null}]});
                }
                r
            })
            .collect();
        let pg_only = pg.run(dir.path(), None, &respelled, load).await.unwrap();
        assert_eq!((pg_only.stats.updated, pg_only.stats.unchanged), (0, 50));
        // One change, one new key, one new field.
        records[11]["name"] = json!("changed"); // id 10
        records.push(json!({"id": 100, "name": "new", "extra": 18_000_000_000_000_000_000u64}));
        // (SQLite rejects the integer beyond 64 bits; PostgreSQL makes the
        // new column numeric.)
        let changed = pg
            .run(dir.path(), None, &records, load)
            .await
            .unwrap()
            .stats;
        assert_eq!(
            (
                changed.inserted,
                changed.updated,
                changed.unchanged,
                changed.rejected
            ),
            (1, 1, 49, 0)
        );
        let rows = pg.rows("id").await;
        assert_eq!(rows.len(), 51);
        assert_eq!(rows[3]["name"], json!("three"));
        assert_eq!(rows[10]["name"], json!("changed"));
        assert_eq!(rows[50]["extra"], json!(18_000_000_000_000_000_000u64));
        let types: Vec<(String, String)> = pg
            .client
            .query(
                "SELECT column_name::text, data_type::text FROM information_schema.columns
                 WHERE table_schema = $1 AND table_name = 't' ORDER BY ordinal_position",
                &[&pg.name],
            )
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let names: Vec<&str> = types.iter().map(|(_, t)| t.as_str()).collect();
        assert_eq!(
            names,
            [
                "bigint",
                "text",
                "double precision",
                "boolean",
                "timestamp with time zone",
                "jsonb",
                "numeric"
            ]
        );
        pg.drop().await;
    }

    #[tokio::test]
    async fn older_versions_never_overwrite_newer_rows() {
        let Some(url) = server("older_versions_never_overwrite_newer_rows") else {
            return;
        };
        let pg = TestSchema::new(&url, "stale").await;
        let dir = tempfile::tempdir().unwrap();
        let load = "cursor = \"updated_at\"\nbatch_size = 2";
        let newer = [
            json!({"id": 1, "v": "new", "updated_at": "2024-05-02T00:00:00Z"}),
            json!({"id": 2, "v": "new", "updated_at": "2024-05-02T00:00:00Z"}),
            json!({"id": 3, "v": "new", "updated_at": "2024-05-02T00:00:00Z"}),
        ];
        both(&pg, dir.path(), &newer, load).await;
        // 1: older (02:00+03:00 is 23:00Z the day before); 2: the same instant
        // with another offset and another value; 3: newer.
        let mixed = [
            json!({"id": 1, "v": "old", "updated_at": "2024-05-02T02:00:00+03:00"}),
            json!({"id": 2, "v": "tie", "updated_at": "2024-05-02T02:00:00+02:00"}),
            json!({"id": 3, "v": "newest", "updated_at": "2024-05-03T00:00:00Z"}),
            json!({"id": 4, "v": "fresh", "updated_at": "2024-05-01T00:00:00Z"}),
        ];
        let stats = both(
            &pg,
            dir.path(),
            &mixed,
            &format!("{load}\nlookback = \"30d\""),
        )
        .await;
        assert_eq!(
            (stats.skipped, stats.updated, stats.inserted),
            (1, 2, 1),
            "{stats:?}"
        );
        let v: Vec<Value> = pg.rows("id").await.iter().map(|r| r["v"].clone()).collect();
        assert_eq!(
            v,
            [json!("new"), json!("tie"), json!("newest"), json!("fresh")]
        );
        pg.drop().await;
    }

    #[tokio::test]
    async fn values_that_do_not_fit_are_rejected_not_fatal() {
        let Some(url) = server("values_that_do_not_fit_are_rejected_not_fatal") else {
            return;
        };
        let pg = TestSchema::new(&url, "rejects").await;
        let dir = tempfile::tempdir().unwrap();
        let records = [
            json!({"id": 1, "n": 5, "t": "a"}),
            json!({"id": 2, "n": "five", "t": "b"}),
            json!({"id": 3, "n": 7.5, "t": "c"}),
            json!({"id": 4, "n": 9, "t": {"nested": true}}),
            json!({"id": 5, "n": 10, "t": "nul\u{0}byte"}),
            json!({"id": 6, "n": 18_000_000_000_000_000_000u64, "t": "big"}),
        ];
        let report = pg.run(dir.path(), None, &records, "").await.unwrap();
        assert_eq!(report.status, RunStatus::SucceededWithRejects);
        assert_eq!((report.stats.inserted, report.stats.rejected), (1, 5));
        assert!(report.stats.is_balanced());
        let mut dest = crate::destination::open(&pg.url()).await.unwrap();
        let rejects = dest.rejects("p", None, 100).await.unwrap();
        let reasons: Vec<&str> = rejects.iter().map(|r| r.reason.as_str()).collect();
        assert_eq!(reasons.len(), 5, "{reasons:?}");
        assert!(
            reasons[0].contains("\"n\" is text, but the column is integer"),
            "{reasons:?}"
        );
        assert!(reasons[1].contains("is a float"), "{reasons:?}");
        assert!(reasons[2].contains("object or array"), "{reasons:?}");
        assert!(reasons[3].contains("NUL"), "{reasons:?}");
        assert!(reasons[4].contains("64-bit range"), "{reasons:?}");
        assert_eq!(
            rejects[0].source_ref,
            format!("{}:2", dir.path().join("in.jsonl").display())
        );
        let history = dest.history("p", 10).await.unwrap();
        assert_eq!(history[0].status, "succeeded_with_rejects");
        assert_eq!(history[0].stats.unwrap().rejected, 5);
        // Again in batches of two: the batches that change no row still
        // keep their rejects (they commit, not roll back).
        let again = pg
            .run(dir.path(), None, &records, "batch_size = 2")
            .await
            .unwrap();
        assert_eq!((again.stats.unchanged, again.stats.rejected), (1, 5));
        let rejects = dest.rejects("p", Some(&again.run_id), 100).await.unwrap();
        assert_eq!(rejects.len(), 5, "{rejects:?}");
        pg.drop().await;
    }

    #[tokio::test]
    async fn deletes_and_insert_new_count_like_sqlite() {
        let Some(url) = server("deletes_and_insert_new_count_like_sqlite") else {
            return;
        };
        let pg = TestSchema::new(&url, "deletes").await;
        let dir = tempfile::tempdir().unwrap();
        let base: Vec<Value> = (0..6).map(|i| json!({"id": i, "v": i})).collect();
        both(&pg, dir.path(), &base, "delete_field = \"_deleted\"").await;
        let batch = [
            json!({"id": 1, "_deleted": true}),
            json!({"id": 9, "_deleted": true}),
            json!({"id": 2, "v": 20}),
            json!({"id": 1, "_deleted": true}),
            json!({"id": 3, "v": 3}),
        ];
        let stats = both(
            &pg,
            dir.path(),
            &batch,
            "delete_field = \"_deleted\"\nbatch_size = 3",
        )
        .await;
        assert_eq!(
            (stats.deleted, stats.updated, stats.duplicates),
            (1, 1, 1),
            "{stats:?}"
        );
        let insert_new = [json!({"id": 2, "v": 99}), json!({"id": 50, "v": 50})];
        let stats = both(&pg, dir.path(), &insert_new, "mode = \"insert_new\"").await;
        assert_eq!((stats.inserted, stats.unchanged), (1, 1));
        let ids: Vec<Value> = pg.rows("id").await.iter().map(|r| r["v"].clone()).collect();
        assert_eq!(
            ids,
            [json!(0), json!(20), json!(3), json!(4), json!(5), json!(50)]
        );
        pg.drop().await;
    }

    #[tokio::test]
    async fn replace_and_window_write_only_the_difference() {
        let Some(url) = server("replace_and_window_write_only_the_difference") else {
            return;
        };
        let pg = TestSchema::new(&url, "replace").await;
        let dir = tempfile::tempdir().unwrap();
        let load = "mode = \"replace\"\nbatch_size = 2";
        let a: Vec<Value> = (0..5).map(|i| json!({"id": i, "v": i})).collect();
        let first = both(&pg, dir.path(), &a, load).await;
        assert_eq!(first.inserted, 5);
        let before = xmins(&pg).await;
        let same = both(&pg, dir.path(), &a, load).await;
        assert_eq!(
            (same.inserted, same.updated, same.deleted, same.unchanged),
            (0, 0, 0, 5)
        );
        assert_eq!(xmins(&pg).await, before);
        let b = [
            json!({"id": 0, "v": 0}),
            json!({"id": 1, "v": 100}),
            json!({"id": 3, "v": 3, "w": "new"}),
            json!({"id": 7, "v": 7}),
        ];
        let changed = both(&pg, dir.path(), &b, load).await;
        assert_eq!(
            (
                changed.inserted,
                changed.updated,
                changed.deleted,
                changed.removed
            ),
            (1, 2, 2, 2),
            "{changed:?}"
        );
        assert_eq!(pg.rows("id").await.len(), 4);
        let empty = both(&pg, dir.path(), &[], load).await;
        assert_eq!(empty.deleted, 4);

        let window = "mode = \"window\"\nwindow_field = \"day\"\nkey = [\"id\"]";
        let days: Vec<Value> = (0..6)
            .map(|i| json!({"id": i, "day": format!("2024-05-0{}T00:00:00Z", i % 3 + 1), "v": i}))
            .collect();
        pg.client
            .batch_execute(&format!("DROP TABLE {}.t", super::quote(&pg.name)))
            .await
            .unwrap();
        both(&pg, dir.path(), &days, window).await;
        let reload = [
            json!({"id": 1, "day": "2024-05-02T00:00:00Z", "v": 10}),
            json!({"id": 2, "day": "2024-05-03T00:00:00Z", "v": 2}),
        ];
        let stats = both(&pg, dir.path(), &reload, window).await;
        // Days 2 and 3 are reloaded: ids 4 and 5 go, 1 changes, 2 stays.
        assert_eq!(
            (stats.updated, stats.unchanged, stats.deleted),
            (1, 1, 2),
            "{stats:?}"
        );
        assert_eq!(pg.rows("id").await.len(), 4);
        pg.drop().await;
    }

    #[tokio::test]
    async fn a_statement_timeout_fails_the_run_naming_pipeline_and_batch() {
        let Some(url) = server("a_statement_timeout_fails_the_run_naming_pipeline_and_batch")
        else {
            return;
        };
        let pg = TestSchema::new(&url, "timeout").await;
        let dir = tempfile::tempdir().unwrap();
        let records: Vec<Value> = (0..10).map(|i| json!({"id": i, "v": i})).collect();
        pg.run(dir.path(), None, &records[..1], "").await.unwrap();
        // Another session holds the table: the batch's merge waits, and the
        // server cancels it after 300 ms.
        pg.client
            .batch_execute(&format!(
                "BEGIN; LOCK TABLE {}.t IN ACCESS EXCLUSIVE MODE",
                super::quote(&pg.name)
            ))
            .await
            .unwrap();
        let timed = format!("{}&options=-c%20statement_timeout%3D300", pg.url());
        let err = pg
            .run(dir.path(), Some(&timed), &records, "")
            .await
            .unwrap_err();
        pg.client.batch_execute("ROLLBACK").await.unwrap();
        let message = err.to_string();
        assert_eq!(err.exit_code(), 1);
        assert!(message.contains("pipeline \"p\", batch 1"), "{message}");
        assert!(message.contains("statement timeout"), "{message}");
        let report = pg.run(dir.path(), None, &records, "").await.unwrap();
        assert_eq!((report.stats.inserted, report.stats.unchanged), (9, 1));
        assert_eq!(pg.rows("id").await.len(), 10);
        pg.drop().await;
    }

    #[tokio::test]
    async fn text_and_composite_keys_count_duplicates_across_batches() {
        let Some(url) = server("text_and_composite_keys_count_duplicates_across_batches") else {
            return;
        };
        let pg = TestSchema::new(&url, "textkeys").await;
        let dir = tempfile::tempdir().unwrap();
        let records: Vec<Value> = (0..12)
            .map(|i| json!({"line": format!("L{}", i % 5), "day": format!("2024-05-0{}T00:00:00Z", 1 + i % 2), "n": i}))
            .collect();
        let load = "key = [\"line\", \"day\"]\nbatch_size = 4";
        let first = both(&pg, dir.path(), &records, load).await;
        assert!(first.duplicates > 0, "{first:?}");
        let again = both(&pg, dir.path(), &records, load).await;
        assert_eq!(again.inserted, 0);
        pg.client
            .batch_execute(&format!("DROP TABLE {}.t", super::quote(&pg.name)))
            .await
            .unwrap();
        std::fs::remove_file(dir.path().join("ref.db")).unwrap();
        let hashed = both(
            &pg,
            dir.path(),
            &records,
            "hash_key = [\"line\"]\nbatch_size = 4",
        )
        .await;
        assert_eq!((hashed.inserted, hashed.duplicates), (5, 7), "{hashed:?}");
        pg.drop().await;
    }
}
