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
use tokio_postgres::Transaction;

use super::ahead::{int_key, stored_keys, Shape, PROBE_MAX};
use super::books::{self, insert_rejects, write_checkpoint};
use super::copy::{encode_columns, ColumnOrder, CopyBuffer, StoredRows};
use super::ddl::{ensure_table, Ddl, PgSchema, Stage};
use super::files;
use super::lock::fence;
use super::merge::{Merge, BATCH};
use super::stage::apply_stage;
use super::statements::Statements;
use super::{pg_error, qualified, PostgresDestination, Run};
use crate::batch::{PlannedBatch, Row};
use crate::destination::commit::{commit_batch, commit_requests, BatchTx};
use crate::destination::seen::SeenKeys;
use crate::destination::Commit;
use crate::error::{Error, ErrorKind, Result};
use crate::files::LoadedFile;
use crate::mode::Mode;
use crate::record::Reject;
use crate::request::{Landed, RequestEntry};
use crate::state::Resolution;
use crate::stats::RunStats;
use crate::windows::WindowEntry;

/// Writes a planned batch through the one commit path; returns its full
/// stats (the planner's and ours).
pub(super) async fn write_batch(
    dest: &mut PostgresDestination,
    batch: PlannedBatch,
    commit: Commit,
) -> Result<RunStats> {
    let tx = begin_tx(dest, &commit).await?;
    let before = tx.run.info.checkpoint_before.clone();
    let written = commit_batch(tx, batch, &commit, before.as_ref()).await;
    forget_schema_on_error(dest, &written, commit.request.is_some());
    written
}

/// Writes a group of ingest requests in one transaction (see
/// `commit_requests`); how each request landed, in order.
pub(super) async fn write_requests(
    dest: &mut PostgresDestination,
    group: Vec<(PlannedBatch, &RequestEntry)>,
) -> Result<Vec<Landed>> {
    let Some((_, first)) = group.first() else {
        return Ok(Vec::new());
    };
    let commit = Commit {
        request: Some((*first).clone()),
        ..Default::default()
    };
    let tx = begin_tx(dest, &commit).await?;
    let written = commit_requests(tx, group).await;
    forget_schema_on_error(dest, &written, true);
    written
}

/// After a request's failed transaction: another serve process may have
/// changed the table's columns, so they are read again next time.
fn forget_schema_on_error<T>(dest: &mut PostgresDestination, written: &Result<T>, request: bool) {
    if written.is_err() && request {
        if let Some(run) = dest.run.as_mut() {
            run.schema = None;
        }
    }
}

/// Opens a batch's transaction, fenced as `commit` says (the run lock, a
/// backfill window's claim, or an ingest request's claim).
async fn begin_tx<'a>(dest: &'a mut PostgresDestination, commit: &Commit) -> Result<PgTx<'a>> {
    let PostgresDestination {
        client,
        schema,
        run,
        lock,
        batch_table,
        ahead,
        statements,
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
    let (pipeline, run_id, lease) = match &commit.request {
        // An ingest request is a run of its own: its duplicates are counted
        // within it, and its claim, not the run lock, fences it.
        Some(request) => {
            if let Some(seen) = run.seen.as_mut() {
                *seen = SeenKeys::default();
            }
            if run.run_keys {
                client
                    .batch_execute(&format!("DROP TABLE IF EXISTS {}", books::RUN_KEYS))
                    .await
                    .map_err(pg_error("dropping the run's key set"))?;
                run.run_keys = false;
            }
            (
                request.pipeline.clone(),
                request.claim.clone(),
                std::time::Duration::ZERO,
            )
        }
        // A backfill window's claim, not the run lock, fences it.
        None => match &commit.window {
            Some(w) => (w.pipeline.clone(), w.run_id.clone(), w.lease),
            None => {
                let (pipeline, run_id, lease, _) = lock
                    .clone()
                    .ok_or_else(|| Error::destination("postgres", "write without the run lock"))?;
                (pipeline, run_id, lease)
            }
        },
    };
    let context = format!("table {:?}", run.target.table);
    // A request's transaction reads its key's row after taking the key, and
    // must see the commit of the key's previous holder: each statement its
    // own snapshot, whatever the database's default isolation.
    let mut begin = client.build_transaction();
    if commit.request.is_some() {
        begin = begin.isolation_level(tokio_postgres::IsolationLevel::ReadCommitted);
    }
    let tx = begin.start().await.map_err(pg_error(context.clone()))?;
    Ok(PgTx {
        tx,
        schema: schema.as_str(),
        statements,
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
        used: Used::default(),
        group_keys: None,
        group_stored: None,
        group_direct: None,
    })
}

/// A batch's transaction, with what it makes that outlives it only if it
/// commits (temporary tables, the run's new keys).
struct PgTx<'a> {
    tx: Transaction<'a>,
    schema: &'a str,
    statements: &'a Statements,
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
    /// An earlier request of this transaction's group left rows in the
    /// batch table or keys in the run's key set.
    used: Used,
    /// A group of requests no two of which share a key (see
    /// `begin_group`): every integer key of its rows.
    group_keys: Option<Vec<i64>>,
    /// The stored rows of `group_keys`, read once with the table's shape.
    group_stored: Option<(Shape, StoredRows)>,
    /// The group's rows new to the table, copied in once it ends.
    group_direct: Option<Deferred>,
}

/// Rows held back to be copied into `table (columns)` in one COPY.
struct Deferred {
    table: String,
    columns: String,
    rows: CopyBuffer,
}

impl Deferred {
    async fn send(self, tx: &Transaction<'_>, statements: &Statements) -> Result<u64> {
        self.rows
            .send(tx, statements, &self.table, &self.columns)
            .await
    }
}

/// What an earlier request of a group left in the temporary tables, to be
/// emptied before the next request's rows (each request is a run of its
/// own, and the batch table empties only at commit).
#[derive(Default, Clone, Copy)]
struct Used {
    batch: bool,
    run_keys: bool,
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

    async fn fence_window(&mut self, window: &WindowEntry) -> Result<()> {
        super::windows::fence(&self.tx, self.schema, window).await
    }

    async fn finish_window(&mut self, window: &WindowEntry, stats: &RunStats) -> Result<()> {
        super::windows::finish(&self.tx, self.schema, window, stats).await
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
            statements,
            run,
            batch_table,
            ahead,
            read_ahead,
            context,
            made_batch_table,
            made_run_keys,
            seen_added,
            used,
            group_keys,
            group_stored,
            group_direct,
            ..
        } = self;
        let schema: &str = schema;
        let context = context.clone();
        let left: Vec<String> = [(used.batch, BATCH), (used.run_keys, books::RUN_KEYS)]
            .iter()
            .filter(|(left, _)| *left)
            .map(|(_, table)| format!("DELETE FROM {table}"))
            .collect();
        if !left.is_empty() {
            tx.batch_execute(&left.join("; "))
                .await
                .map_err(pg_error(context.clone()))?;
            *used = Used::default();
        }
        // Whether the transaction changes anything beyond the lease it fences.
        let mut writes = false;
        let table = run
            .stage
            .clone()
            .unwrap_or_else(|| run.target.table.clone());
        let staged = run.stage.is_some();
        let (mut pg_schema, ddl, rows) =
            ensure_table(tx, schema, run, &table, rows, staged, stats, rejects).await?;
        if rows.is_empty() {
            return Ok(false);
        }
        let created = ddl == Ddl::Created;
        // Into a table idemload did not create: its own columns stay its own.
        let rows = run.fills.apply(
            &table,
            &mut pg_schema.columns,
            |c| &c.name,
            &run.target.key_columns,
            rows,
            stats,
            rejects,
        )?;
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
        // A group of requests with distinct keys reads the stored rows of
        // all of them with its first request (no request of the group
        // writes another's keys, so none needs to see another's writes).
        let grouped = group_keys.is_some() && !staged;
        if grouped {
            run.probed.clone_from(&shape);
        }
        let mut ahead_rows = None;
        let lookup = match (&shape, seen) {
            (Some(shape), Some(seen)) => {
                let keys: Vec<i64> = match group_keys.as_ref() {
                    Some(_) if direct => Vec::new(),
                    Some(_) if group_stored.as_ref().is_some_and(|(s, _)| s == shape) => Vec::new(),
                    Some(all) => all.clone(),
                    None => stored_keys(&rows)
                        .filter(|&k| !direct || seen.contains(k))
                        .collect(),
                };
                match read_ahead.take() {
                    Some((read_keys, read_shape, stored))
                        if !direct && *shape == read_shape && read_keys == keys =>
                    {
                        ahead_rows = Some(stored);
                        None
                    }
                    _ if keys.is_empty() => None,
                    _ if keys.len() <= PROBE_MAX => Some(Lookup::Probe(shape.probe(), keys)),
                    _ => shape
                        .select(&keys)
                        .map(|query| Lookup::Copy(StoredRows::copy(&query), keys.len())),
                }
                .map(|lookup| (lookup, shape.key_at))
            }
            _ => None,
        };
        let read_ahead = ahead_rows.is_some();
        let fetch = async {
            match &lookup {
                Some((Lookup::Probe(query, keys), key_at)) => {
                    let rows = statements
                        .query(&*tx, query, &[keys])
                        .await
                        .map_err(pg_error(context.clone()))?;
                    StoredRows::of_rows(&rows, *key_at).map(Some)
                }
                // About the size of the rows' own encoding.
                Some((Lookup::Copy(copy, n), key_at)) => {
                    StoredRows::read(tx.copy_out(copy), *key_at, n * 256)
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
        let stored = match (group_keys.as_ref(), &shape) {
            (Some(_), Some(shape)) => {
                if let Some(read) = stored {
                    *group_stored = Some((shape.clone(), read));
                }
                group_stored
                    .as_ref()
                    .filter(|(s, _)| s == shape)
                    .map(|(_, read)| read)
            }
            _ => stored.as_ref(),
        };
        *seen_added = encoded.rows.iter().filter_map(|r| r.key).collect();
        let columns = pg_schema.columns.len();
        let mut copy = CopyBuffer::new();
        // In a group, the rows new to the table join the group's one COPY.
        let (direct_table, direct_columns) = (qualified(schema, &table), merge.table_columns());
        let mut direct_copy = match group_direct.take() {
            Some(d) if grouped && d.table == direct_table && d.columns == direct_columns => d.rows,
            Some(d) => {
                // The columns changed within the group: what was held back
                // goes in first, with the columns it was encoded for.
                d.send(tx, statements).await?;
                CopyBuffer::new()
            }
            None => CopyBuffer::new(),
        };
        let held_back = direct_copy.rows;
        let mut deletes = false;
        // The rows copied straight in, should another writer's row with the
        // same key make the copy fail (see below).
        let mut direct_rows = Vec::new();
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
                        direct_rows.push(row);
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
                        direct_rows.push(row);
                        continue;
                    }
                    _ => {}
                }
            }
            deletes |= row.delete;
            copy.push_encoded(&[Some(row.delete), row.fresh], columns, bytes);
        }
        writes |= direct_copy.rows > held_back || copy.rows > 0;
        if grouped {
            stats.inserted += direct_copy.rows - held_back;
            if direct_copy.rows > 0 {
                *group_direct = Some(Deferred {
                    table: direct_table,
                    columns: direct_columns,
                    rows: direct_copy,
                });
            }
        } else if direct_copy.rows > 0 {
            // Keys new to the run and not stored when looked at: another
            // pipeline (or any writer) may store one of them meanwhile. Its
            // row fails the copy on the primary key; the copy is then undone
            // and the same rows merged, as every later batch of the run is.
            tx.batch_execute("SAVEPOINT idemload_direct")
                .await
                .map_err(pg_error(context.clone()))?;
            let copied = direct_copy
                .send(tx, statements, &direct_table, &direct_columns)
                .await;
            match copied {
                Ok(copied) => {
                    if !staged {
                        stats.inserted += copied;
                    }
                }
                Err(e) if e.kind() == Some(ErrorKind::UniqueViolation) => {
                    tracing::info!(table = %table, error = %e, "Another writer stored keys of this batch meanwhile: merging the batch instead of copying it.");
                    tx.batch_execute("ROLLBACK TO SAVEPOINT idemload_direct")
                        .await
                        .map_err(pg_error(context.clone()))?;
                    run.empty_at_start = Some(false);
                    for row in direct_rows {
                        let bytes = &encoded.buf[row.at.clone()];
                        copy.push_encoded(&[Some(false), row.fresh], columns, bytes);
                    }
                }
                Err(e) => return Err(e),
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
            copy.send(tx, statements, BATCH, &merge.copy_columns())
                .await?;
            used.batch = true;
            used.run_keys = !in_memory;
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

    async fn known_rejects(&mut self, rejects: &[Reject]) -> Result<u64> {
        books::known_rejects(&self.tx, self.schema, &self.pipeline, &self.run_id, rejects).await
    }

    async fn insert_rejects(&mut self, rejects: &[Reject]) -> Result<()> {
        insert_rejects(&self.tx, self.schema, &self.pipeline, &self.run_id, rejects).await
    }

    async fn log_files(&mut self, files: &[LoadedFile]) -> Result<()> {
        let table = &self.run.target.table;
        files::log_files(
            &self.tx,
            self.schema,
            &self.pipeline,
            table,
            &self.run_id,
            files,
        )
        .await
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

    async fn fence_request(&mut self, request: &RequestEntry) -> Result<()> {
        match self.admit_requests(&[request]).await?.pop().flatten() {
            None => Ok(()),
            Some(_) => Err(Error::RequestLost {
                key: request.key.clone(),
            }),
        }
    }

    async fn finish_request(&mut self, request: &RequestEntry, response: &str) -> Result<()> {
        self.finish_requests(&[(request, response.to_string())])
            .await
    }

    async fn admit_requests(&mut self, requests: &[&RequestEntry]) -> Result<Vec<Option<Landed>>> {
        // A group's stored rows, read with the shape the last group read
        // them with, sent with the statements taking the keys: one round
        // trip less. (Usually just after them; on a connection's first
        // group, whose statements are prepared first, possibly before: the
        // rows read do not depend on the keys being held.) Another shape by
        // the time the rows are written (a new column) reads them again.
        let probe = match (&self.group_keys, &self.run.probed) {
            (Some(keys), Some(shape)) if !keys.is_empty() && keys.len() <= PROBE_MAX => {
                let statement = self
                    .statements
                    .prepare(&self.tx, &shape.probe())
                    .await
                    .map_err(pg_error(self.context.clone()))?;
                Some((statement, shape.clone(), keys))
            }
            _ => None,
        };
        let admit = super::requests::admit(&self.tx, self.statements, self.schema, requests);
        let read = async {
            match &probe {
                Some((statement, shape, keys)) => {
                    let rows = self
                        .tx
                        .query(statement, &[keys])
                        .await
                        .map_err(pg_error(self.context.clone()))?;
                    StoredRows::of_rows(&rows, shape.key_at).map(|read| Some((shape.clone(), read)))
                }
                None => Ok(None),
            }
        };
        let (landed, read) = tokio::try_join!(admit, read)?;
        if read.is_some() {
            self.group_stored = read;
        }
        Ok(landed)
    }

    fn begin_group(&mut self, rows: &[&[Row]]) {
        // Only when no key is in two requests: then one read of the stored
        // rows serves them all, and the rows new to the table can wait for
        // one COPY at the end, as no later request reads or writes them.
        let mut all = foldhash::HashSet::default();
        for request in rows {
            let Some(mine) = request
                .iter()
                .map(int_key)
                .collect::<Option<foldhash::HashSet<i64>>>()
            else {
                return;
            };
            if !mine.is_disjoint(&all) {
                return;
            }
            all.extend(mine);
        }
        let mut keys: Vec<i64> = all.into_iter().collect();
        keys.sort_unstable();
        self.group_keys = Some(keys);
    }

    fn begin_request(&mut self, request: &RequestEntry) {
        self.pipeline.clone_from(&request.pipeline);
        self.run_id.clone_from(&request.claim);
    }

    async fn finish_requests(&mut self, done: &[(&RequestEntry, String)]) -> Result<()> {
        // The rows new to the table the group held back, in one COPY, with
        // the statement finishing the requests sent behind it, not after its
        // answer. A key stored meanwhile by another writer fails this COPY
        // on the primary key, and with it the group: its requests are then
        // written one by one, each merging what it meets.
        let deferred = self.group_direct.take();
        let copy = async {
            match deferred {
                Some(d) => d.send(&self.tx, self.statements).await.map(|_| ()),
                None => Ok(()),
            }
        };
        let finish = super::requests::finish_all(&self.tx, self.statements, self.schema, done);
        tokio::try_join!(copy, finish).map(|_| ())
    }

    async fn finish_run(&mut self, end: &Resolution, after: Option<&Value>) -> Result<()> {
        books::finish(
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
        // Awaited, not left to the drop: a request's key (an advisory lock)
        // is free once this returns, so writing the request again at once,
        // on another connection, does not find its own key held.
        let _ = self.tx.rollback().await;
    }
}

/// How a batch reads the stored rows of its keys.
enum Lookup {
    /// A prepared `SELECT` (`Shape::probe`) and its keys.
    Probe(String, Vec<i64>),
    /// A `COPY` of `Shape::select`, and how many keys it names.
    Copy(String, usize),
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
                rejects.push(row.reject(reason));
            }
        }
    }
    if rows.len() >= DROP_LATER_ROWS {
        drop_later(rows);
    }
    Encoded { buf, rows: encoded }
}

/// Fewer records than this are freed at once: waking the freeing thread
/// costs more than freeing them.
const DROP_LATER_ROWS: usize = 1000;

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
