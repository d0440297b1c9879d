//! Writing one batch to MySQL, in one transaction.
//!
//! Before the transaction: tables and columns are created (MySQL's DDL
//! commits on its own), and the batch is converted (`batch.rs`). With one
//! integer key column the run's keys are kept in memory, and rows are
//! settled in Rust where they can be: a key new to a table that was empty
//! when the run began goes straight in; otherwise the stored versions of
//! the batch's keys are read and a row equal to its own is counted and not
//! sent, a key not stored goes straight in.
//!
//! Every other row is loaded into a temporary table, and inside the
//! transaction set-based statements classify it against the stored one
//! (new, changed, unchanged by `<=>` on every column, stale by cursor, to
//! delete) and against the run's key set (a key written by an earlier batch
//! is a duplicate), then write only what changed. The batch's rejects, its
//! checkpoint and, for the last batch, the run's ending commit with it.

use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use super::batch::{load, load_into, prepare, stored_rows, Prepared, BATCH};
use super::books::{self, write_checkpoint, RUN_KEYS};
use super::ddl::{add_columns, create_table, declare, read_table, unfit_name, SqlColumn, Table};
use super::files;
use super::lock::fence;
use super::{stage, Lock, MysqlDestination, Run, Server};
use crate::batch::{PlannedBatch, Row};
use crate::destination::commit::{commit_batch, BatchTx};
use crate::destination::compare::Compared;
use crate::destination::inspect::Dialect;
use crate::destination::schema::{ColumnRules, ColumnType};
use crate::destination::seen::SeenKeys;
use crate::destination::sql::quote_mysql as q;
use crate::destination::{Commit, Target};
use crate::error::{Error, ErrorKind, Result};
use crate::files::LoadedFile;
use crate::mode::Mode;
use crate::record::Reject;
use crate::state::Resolution;
use crate::stats::RunStats;
use crate::windows::WindowEntry;
use serde_json::Value;

/// Row classes of a batch.
const OP_INSERT: i64 = 1;
const OP_UPDATE: i64 = 2;
const OP_UNCHANGED: i64 = 3;
const OP_DELETE: i64 = 4;
const OP_STALE: i64 = 5;

/// Writes a planned batch; returns its full stats (the planner's and ours).
pub(super) async fn write_batch(
    dest: &mut MysqlDestination,
    batch: PlannedBatch,
    commit: Commit,
) -> Result<RunStats> {
    let MysqlDestination {
        conn,
        server,
        run,
        lock,
        local_infile,
        ..
    } = dest;
    let run = run
        .as_mut()
        .ok_or_else(|| Error::destination("mysql", "write before begin"))?;
    // A backfill window's claim or an ingest request's claim, not the run
    // lock, fences it.
    let lock = match (&commit.window, &commit.request) {
        (Some(w), _) => Lock {
            pipeline: w.pipeline.clone(),
            run_id: w.run_id.clone(),
            name: String::new(),
            lease: w.lease,
        },
        (None, Some(r)) => {
            // An ingest request is a run of its own: its duplicates are
            // counted within it.
            run.seen = None;
            books::empty_run_keys(conn)
                .await
                .map_err(|e| Error::destination("mysql run keys", e))?;
            Lock {
                pipeline: r.pipeline.clone(),
                run_id: r.claim.clone(),
                name: String::new(),
                lease: std::time::Duration::ZERO,
            }
        }
        (None, None) => lock
            .clone()
            .ok_or_else(|| Error::destination("mysql", "write without the run lock"))?,
    };
    let PlannedBatch {
        rows,
        mut rejects,
        mut stats,
        files,
        ..
    } = batch;
    let table = run
        .stage
        .clone()
        .unwrap_or_else(|| run.target.table.clone());
    let ctx = format!("mysql table {table:?}");
    let staged = run.stage.is_some();
    let mode = if staged { Mode::Merge } else { run.target.mode };

    // Outside the transaction: DDL, conversion, and the temporary batch table.
    let mut loaded: Option<Table> = None;
    let mut direct: Vec<Prepared> = Vec::new();
    // Rows to merge through the batch table, each with whether the run met
    // its key before.
    let mut merged: Vec<(Prepared, bool)> = Vec::new();
    let mut written_keys = Vec::new();
    let mut in_memory = false;
    if !rows.is_empty() {
        let (mut schema, rows) =
            ensure_table(conn, server, run, &table, rows, &mut rejects, &mut stats).await?;
        // Into a table idemload did not create: its own columns stay its own.
        let rows = run.fills.apply(
            &table,
            &mut schema.columns,
            |c| &c.name,
            &run.target.key_columns,
            rows,
            &mut stats,
            &mut rejects,
        )?;
        if !rows.is_empty() {
            let clock = std::time::Instant::now();
            let prepared = prepare(&schema, &run.target, &table, rows, &mut rejects, &mut stats)?;
            let converted = clock.elapsed().as_millis() as u64;
            // One integer key column: the run's keys are kept in memory.
            let key_at = match run.target.key_columns.as_slice() {
                [k] => schema
                    .position(k)
                    .filter(|&i| schema.columns[i].ty == ColumnType::Integer),
                _ => None,
            };
            if run.seen.is_none() {
                run.seen = Some(key_at.filter(|_| !staged).map(|_| SeenKeys::default()));
            }
            let seen = run.seen.as_ref().and_then(Option::as_ref);
            in_memory = seen.is_some() && key_at.is_some();
            if in_memory && run.empty_at_start.is_none() {
                let rows: Vec<i64> = conn
                    .query(format!("SELECT 1 FROM {} LIMIT 1", q(&table)))
                    .await
                    .map_err(|e| Error::destination(ctx.clone(), e))?;
                run.empty_at_start = Some(rows.is_empty());
            }
            // The stored versions of the keys the table may hold, when the
            // run keeps its keys: a row equal to its stored version is
            // settled here, a key not stored goes straight in.
            let stored = match (seen, key_at) {
                (Some(seen), Some(at)) if !staged => {
                    let keys: Vec<i64> = prepared
                        .iter()
                        .filter(|r| !r.deletes())
                        .filter_map(|r| r.int(at))
                        .filter(|k| run.empty_at_start != Some(true) || seen.contains(*k))
                        .collect();
                    Some(
                        stored_rows(conn, &table, &schema, at, &keys)
                            .await
                            .map_err(|e| Error::destination(ctx.clone(), e))?,
                    )
                }
                _ => None,
            };
            merged.reserve(prepared.len());
            for row in prepared {
                let (Some(seen), Some(key)) = (seen, key_at.and_then(|at| row.int(at))) else {
                    merged.push((row, false));
                    continue;
                };
                written_keys.push(key);
                let fresh = !seen.contains(key);
                if row.deletes() {
                    merged.push((row, !fresh));
                    continue;
                }
                // A key the run has not met in a table that was empty
                // cannot be stored: it goes straight in.
                if fresh && run.empty_at_start == Some(true) {
                    direct.push(row);
                    continue;
                }
                match stored.as_ref().map(|s| s.get(&key)) {
                    Some(Some(old)) if mode == Mode::InsertNew || row.same_as(old) => {
                        if fresh {
                            stats.unchanged += 1;
                        } else {
                            stats.duplicates += 1;
                        }
                    }
                    Some(None) if fresh => direct.push(row),
                    _ => merged.push((row, !fresh)),
                }
            }
            if !merged.is_empty() {
                let rows: Vec<(&Prepared, bool)> = merged.iter().map(|(r, d)| (r, *d)).collect();
                load(conn, local_infile, &schema, &rows)
                    .await
                    .map_err(|e| Error::destination(ctx.clone(), e))?;
                loaded = Some(schema.clone());
            }
            tracing::debug!(
                converted,
                ms = clock.elapsed().as_millis() as u64,
                rows = merged.len(),
                direct = direct.len(),
                "Batch loaded."
            );
            run.schema = Some(schema);
        }
    }
    let finishing_stage = match (&commit.finish, &run.stage) {
        (Some(_), Some(stage)) => Some((
            stage.clone(),
            stage::prepare(conn, server, run, stage).await?,
        )),
        _ => None,
    };

    conn.query_drop("START TRANSACTION")
        .await
        .map_err(|e| Error::destination(ctx.clone(), e))?;
    let before = run.info.checkpoint_before.clone();
    let tx = MysqlTx {
        conn,
        run,
        lock: &lock,
        local_infile,
        ctx: ctx.clone(),
        table: table.clone(),
        direct: &direct,
        loaded,
        mode,
        staged,
        in_memory,
        finishing_stage: finishing_stage.as_ref(),
    };
    // Kept to write the batch again should its straight load meet another
    // writer's rows (below).
    let retry = (!direct.is_empty()).then(|| (rejects.clone(), stats, files.clone()));
    let batch = PlannedBatch {
        rows: Vec::new(),
        rejects,
        stats,
        files,
        ..Default::default()
    };
    let stats = match commit_batch(tx, batch, &commit, before.as_ref()).await {
        // Keys new to the run in a table that was empty when it began were
        // loaded straight in, and another writer (a second pipeline into
        // the same table) stored some of them meanwhile: the transaction
        // rolled back; merge the same rows instead, as every later batch
        // of the run will.
        Err(e) if e.kind() == Some(ErrorKind::UniqueViolation) && retry.is_some() => {
            let (rejects, stats, files) = retry.unwrap_or_default();
            tracing::info!(table = %table, error = %e, "Another writer stored keys of this batch meanwhile: merging the batch instead of loading it straight in.");
            run.empty_at_start = Some(false);
            let schema = run
                .schema
                .clone()
                .ok_or_else(|| Error::destination(ctx.clone(), "no schema"))?;
            let mut rows: Vec<(&Prepared, bool)> = merged.iter().map(|(r, d)| (r, *d)).collect();
            rows.extend(direct.iter().map(|r| (r, false)));
            load(conn, local_infile, &schema, &rows)
                .await
                .map_err(|e| Error::destination(ctx.clone(), e))?;
            conn.query_drop("START TRANSACTION")
                .await
                .map_err(|e| Error::destination(ctx.clone(), e))?;
            let tx = MysqlTx {
                conn,
                run,
                lock: &lock,
                local_infile,
                ctx,
                table: table.clone(),
                direct: &[],
                loaded: Some(schema),
                mode,
                staged,
                in_memory,
                finishing_stage: finishing_stage.as_ref(),
            };
            let batch = PlannedBatch {
                rows: Vec::new(),
                rejects,
                stats,
                files,
                ..Default::default()
            };
            commit_batch(tx, batch, &commit, before.as_ref()).await?
        }
        result => result?,
    };
    if let Some(Some(seen)) = run.seen.as_mut() {
        seen.extend(written_keys);
    }
    if let Some((stage, _)) = finishing_stage {
        // After the commit: DROP commits on its own. A crash before it leaves
        // a stage the next run's begin drops.
        conn.query_drop(format!("DROP TABLE IF EXISTS {}", q(&stage)))
            .await
            .map_err(|e| Error::destination(format!("mysql table {stage:?}"), e))?;
        run.schema = None;
    }
    Ok(stats)
}

/// A batch's transaction: the rows were converted, and those that need the
/// server's judgement loaded into the batch table, before it began (MySQL's
/// DDL commits on its own).
struct MysqlTx<'a> {
    conn: &'a mut Conn,
    run: &'a mut Run,
    lock: &'a Lock,
    local_infile: &'a mut bool,
    ctx: String,
    table: String,
    /// Rows known new, loaded straight into the table.
    direct: &'a [Prepared],
    /// The batch table holds rows to merge, with this schema.
    loaded: Option<Table>,
    mode: Mode,
    staged: bool,
    in_memory: bool,
    finishing_stage: Option<&'a (String, stage::Plan)>,
}

fn books_error(e: mysql_async::Error) -> Error {
    Error::destination("mysql bookkeeping", e)
}

impl BatchTx for MysqlTx<'_> {
    async fn fence(&mut self) -> Result<()> {
        fence(self.conn, self.lock).await
    }

    async fn fence_window(&mut self, window: &WindowEntry) -> Result<()> {
        super::windows::fence(self.conn, window).await
    }

    async fn finish_window(&mut self, window: &WindowEntry, stats: &RunStats) -> Result<()> {
        super::windows::finish(self.conn, window, stats).await
    }

    async fn write_rows(
        &mut self,
        _rows: Vec<Row>,
        stats: &mut RunStats,
        _rejects: &mut Vec<Reject>,
    ) -> Result<bool> {
        let ctx = &self.ctx;
        let mut changed = false;
        if !self.direct.is_empty() {
            let schema = self
                .run
                .schema
                .as_ref()
                .ok_or_else(|| Error::destination(ctx.clone(), "no schema"))?;
            let rows: Vec<&Prepared> = self.direct.iter().collect();
            load_into(self.conn, self.local_infile, &self.table, schema, &rows)
                .await
                .map_err(|e| Error::destination(ctx.clone(), e))?;
            stats.inserted += self.direct.len() as u64;
            changed = true;
        }
        if let Some(schema) = &self.loaded {
            let counts = merge(
                self.conn,
                &self.table,
                schema,
                &self.run.target,
                self.mode,
                self.in_memory,
            )
            .await
            .map_err(|e| Error::destination(ctx.clone(), e))?;
            if self.staged {
                // Staged rows are counted when the stage is applied.
                stats.duplicates += counts.duplicates;
            } else {
                *stats += counts;
            }
            changed = true;
        }
        Ok(changed)
    }

    async fn known_rejects(&mut self, rejects: &[Reject]) -> Result<u64> {
        books::known_rejects(self.conn, &self.lock.pipeline, &self.lock.run_id, rejects)
            .await
            .map_err(books_error)
    }

    async fn insert_rejects(&mut self, rejects: &[Reject]) -> Result<()> {
        books::insert_rejects(self.conn, &self.lock.pipeline, &self.lock.run_id, rejects)
            .await
            .map_err(books_error)
    }

    async fn log_files(&mut self, files: &[LoadedFile]) -> Result<()> {
        let (lock, table) = (self.lock, &self.run.target.table);
        files::log_files(self.conn, &lock.pipeline, table, &lock.run_id, files)
            .await
            .map_err(books_error)
    }

    async fn write_checkpoint(&mut self, checkpoint: &Value) -> Result<()> {
        write_checkpoint(
            self.conn,
            &self.lock.pipeline,
            Some(checkpoint),
            &self.lock.run_id,
        )
        .await
        .map_err(books_error)
    }

    async fn apply_stage(&mut self) -> Result<RunStats> {
        match self.finishing_stage {
            Some((stage, plan)) => stage::apply(self.conn, self.run, stage, plan).await,
            None => Ok(RunStats::default()),
        }
    }

    async fn finish_run(&mut self, end: &Resolution, after: Option<&Value>) -> Result<()> {
        books::finish(
            self.conn,
            &self.lock.run_id,
            end.status,
            &end.stats,
            after,
            end.error.as_deref(),
        )
        .await
        .map_err(books_error)
    }

    async fn fence_request(&mut self, request: &crate::request::RequestEntry) -> Result<()> {
        super::requests::fence(self.conn, request).await
    }

    fn begin_request(&mut self, _request: &crate::request::RequestEntry) {
        // One request per transaction (`max_group` is 1): the transaction
        // was opened for this request, its claim is the run id already.
    }

    async fn finish_request(
        &mut self,
        request: &crate::request::RequestEntry,
        response: &str,
    ) -> Result<()> {
        super::requests::finish(self.conn, request, response).await
    }

    async fn commit(self, _changed: bool) -> Result<()> {
        let clock = std::time::Instant::now();
        self.conn
            .query_drop("COMMIT")
            .await
            .map_err(|e| Error::destination(self.ctx.clone(), e))?;
        tracing::debug!(ms = clock.elapsed().as_millis() as u64, "Batch committed.");
        Ok(())
    }

    async fn rollback(self) {
        let _ = self.conn.query_drop("ROLLBACK").await;
    }
}

/// Creates the table or adds the columns the rows need (rows whose field
/// names MySQL cannot hold become rejects); returns its schema and the rows.
async fn ensure_table(
    conn: &mut Conn,
    server: &Server,
    run: &mut Run,
    table: &str,
    rows: Vec<Row>,
    rejects: &mut Vec<Reject>,
    stats: &mut RunStats,
) -> Result<(Table, Vec<Row>)> {
    let ctx = || format!("mysql table {table:?}");
    let mut schema = match run.schema.take() {
        Some(s) => s,
        None => read_table(conn, server, table)
            .await
            .map_err(|e| Error::destination(ctx(), e))?
            .unwrap_or_default(),
    };
    // MySQL's own limits on a name first, then the rules every backend
    // shares (case, width).
    let mut named = Vec::with_capacity(rows.len());
    for row in rows {
        let unfit = row.fields.keys().find_map(|name| {
            schema
                .position(name)
                .is_none()
                .then(|| unfit_name(name))
                .flatten()
        });
        match unfit {
            Some(reason) => {
                stats.rejected += 1;
                rejects.push(row.reject(reason));
            }
            None => named.push(row),
        }
    }
    let kept = ColumnRules::MYSQL.fit(
        table,
        schema.columns.iter().map(|c| c.name.as_str()),
        named,
        stats,
        rejects,
    );
    let missing = schema.logical().missing(kept.iter().map(|r| &r.fields));
    let keys = &run.target.key_columns;
    if schema.columns.is_empty() && !missing.is_empty() {
        let columns: Vec<SqlColumn> = missing
            .iter()
            .map(|c| declare(server, c, keys.contains(&c.name)))
            .collect();
        create_table(conn, server, table, &columns, keys)
            .await
            .map_err(|e| Error::destination(ctx(), e))?;
        tracing::info!(table, columns = columns.len(), "Table created.");
        schema = reread(conn, server, table).await?;
    } else if !missing.is_empty() {
        // Read again: a run that died after its ALTER may have added some.
        let fresh = reread(conn, server, table).await?;
        let columns: Vec<SqlColumn> = missing
            .iter()
            .filter(|c| fresh.position(&c.name).is_none())
            .map(|c| declare(server, c, keys.contains(&c.name)))
            .collect();
        add_columns(conn, table, &columns)
            .await
            .map_err(|e| Error::destination(ctx(), e))?;
        tracing::info!(table, added = columns.len(), "Columns added.");
        schema = reread(conn, server, table).await?;
    }
    run.schema = Some(schema.clone());
    Ok((schema, kept))
}

async fn reread(conn: &mut Conn, server: &Server, table: &str) -> Result<Table> {
    read_table(conn, server, table)
        .await
        .map_err(|e| Error::destination(format!("mysql table {table:?}"), e))?
        .ok_or_else(|| Error::destination(format!("mysql table {table:?}"), "vanished"))
}

/// Classifies the loaded batch against the stored rows and the run's keys
/// (read only), then writes only what changed; returns inserted, updated,
/// unchanged, deleted, skipped (stale) and duplicates.
async fn merge(
    conn: &mut Conn,
    table: &str,
    schema: &Table,
    target: &Target,
    mode: Mode,
    in_memory: bool,
) -> std::result::Result<RunStats, mysql_async::Error> {
    let (t, b, rk) = (q(table), q(BATCH), q(RUN_KEYS));
    let keys = &target.key_columns;
    let matched = keys
        .iter()
        .map(|k| format!("t.{0} = s.{0}", q(k)))
        .collect::<Vec<_>>()
        .join(" AND ");
    let others: Vec<&str> = schema
        .names()
        .into_iter()
        .filter(|n| !keys.iter().any(|k| k == n))
        .collect();
    let differs = target.compare.differs(
        Dialect::Mysql,
        schema
            .columns
            .iter()
            .filter(|c| others.contains(&c.name.as_str()))
            .map(|c| Compared::between(Dialect::Mysql, &c.name, c.ty, "t", "s")),
    );
    // Never NULL: both sides are tested first.
    let stale = match target
        .cursor
        .as_deref()
        .filter(|c| schema.position(c).is_some())
    {
        Some(c) => {
            let c = q(c);
            format!("(s.{c} IS NOT NULL AND t.{c} IS NOT NULL AND s.{c} < t.{c})")
        }
        None => "FALSE".to_string(),
    };
    let insert_new = if mode == Mode::InsertNew {
        "TRUE"
    } else {
        "FALSE"
    };
    let k0 = q(&keys[0]);
    // Whether the run wrote the key before: from the batch's own flag when
    // the run keeps its keys in memory, else from the run's key table.
    let (dup, run_keys) = if in_memory {
        ("s.`_idemload_dup` <> 0".to_string(), String::new())
    } else {
        (
            "r.k IS NOT NULL".to_string(),
            format!(" LEFT JOIN {rk} r ON r.k = s.`_idemload_rk`"),
        )
    };
    let del = "s.`_idemload_del` = 1";
    let clock = std::time::Instant::now();
    let counts: Vec<(i64, i64, i64)> = conn
        .query(format!(
            "SELECT CASE
                 WHEN t.{k0} IS NULL THEN IF({del}, {OP_UNCHANGED}, {OP_INSERT})
                 WHEN {insert_new} THEN {OP_UNCHANGED}
                 WHEN {stale} THEN {OP_STALE}
                 WHEN {del} THEN {OP_DELETE}
                 WHEN NOT {differs} THEN {OP_UNCHANGED}
                 ELSE {OP_UPDATE} END AS op,
               {dup} AS dup, COUNT(*)
             FROM {b} s LEFT JOIN {t} t ON {matched}{run_keys}
             GROUP BY op, dup"
        ))
        .await?;
    tracing::debug!(ms = clock.elapsed().as_millis() as u64, "Batch classified.");
    if !in_memory {
        // Keys of this batch seen before are kept: IGNORE skips exactly those.
        conn.query_drop(format!(
            "INSERT IGNORE INTO {rk} (k) SELECT `_idemload_rk` FROM {b} ORDER BY `_idemload_rk`"
        ))
        .await?;
    }
    let mut stats = RunStats::default();
    let mut todo = [false; 6];
    let (mut rows, mut new_rows) = (0u64, 0u64);
    for (op, dup, n) in counts {
        let n = n as u64;
        rows += n;
        if op == OP_INSERT {
            new_rows += n;
        }
        if (1..=5).contains(&op) {
            todo[op as usize] = true;
        }
        if dup != 0 {
            stats.duplicates += n;
            continue;
        }
        match op {
            OP_INSERT => stats.inserted += n,
            OP_UPDATE => stats.updated += n,
            OP_UNCHANGED => stats.unchanged += n,
            OP_DELETE => stats.deleted += n,
            OP_STALE => stats.skipped += n,
            _ => {}
        }
    }
    let clock = std::time::Instant::now();
    if todo[OP_DELETE as usize] {
        conn.query_drop(format!(
            "DELETE t FROM {t} t JOIN {b} s ON {matched} WHERE {del} AND NOT {stale}"
        ))
        .await?;
    }
    if todo[OP_UPDATE as usize] {
        let set = others
            .iter()
            .map(|c| format!("t.{0} = s.{0}", q(c)))
            .collect::<Vec<_>>()
            .join(", ");
        conn.query_drop(format!(
            "UPDATE {t} t JOIN {b} s ON {matched} SET {set}
             WHERE NOT {del} AND NOT {stale} AND {differs}"
        ))
        .await?;
    }
    if todo[OP_INSERT as usize] {
        let cols = schema.column_list("");
        let s_cols = schema.column_list("s.");
        if new_rows == rows {
            // Every row is new (a first load): no anti-join needed.
            conn.query_drop(format!("INSERT INTO {t} ({cols}) SELECT {cols} FROM {b}"))
                .await?;
        } else {
            conn.query_drop(format!(
                "INSERT INTO {t} ({cols}) SELECT {s_cols} FROM {b} s LEFT JOIN {t} t ON {matched}
                 WHERE t.{k0} IS NULL AND NOT {del}"
            ))
            .await?;
        }
    }
    tracing::debug!(ms = clock.elapsed().as_millis() as u64, "Batch applied.");
    Ok(stats)
}
