//! SQLite bookkeeping: connection set-up, the `_idemload_*` tables,
//! checkpoint, runs and rejects. The run lock lease and its heartbeat are
//! in `lock.rs`, the files log in `files.rs`.

use std::path::Path;
use std::time::Duration;

use chrono::Utc;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde_json::Value;

use crate::destination::fills::Fills;
use crate::destination::sql::quote;
use crate::destination::Target;
use crate::error::{Error, Result};
use crate::files::FILES_TABLE;
use crate::state::{
    format_time, status_shown, RejectRecord, RunInfo, RunRecord, LOCKS_TABLE, REJECTS_TABLE,
    RUNS_TABLE, STATE_TABLE,
};
use crate::stats::{RunStats, RunStatus};

/// Opens the file with the settings every connection uses, and makes sure
/// the bookkeeping tables exist.
pub(crate) fn connect(path: &Path) -> Result<Connection> {
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() && !parent.exists() {
            std::fs::create_dir_all(parent).map_err(|source| Error::Io {
                path: parent.to_path_buf(),
                source,
            })?;
        }
    }
    let conn =
        Connection::open(path).map_err(|e| Error::destination(path.display().to_string(), e))?;
    conn.busy_timeout(Duration::from_secs(60))?;
    // A new file gets 16 KiB pages (fewer B-tree splits and WAL frames per
    // row); an existing file keeps its own.
    conn.execute_batch("PRAGMA page_size = 16384")?;
    // Switching to WAL needs a moment without readers; retry while others
    // open the same file at the same time.
    let mut attempts = 0;
    loop {
        match conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0)) {
            Ok(_) => break,
            Err(e) if attempts < 100 && is_busy(&e) => {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(Error::destination(path.display().to_string(), e)),
        }
    }
    conn.execute_batch(
        "PRAGMA synchronous = NORMAL; PRAGMA temp_store = FILE; PRAGMA cache_size = -8000;
         PRAGMA wal_autocheckpoint = 4096;",
    )?;
    conn.execute_batch(&format!(
        "BEGIN IMMEDIATE;
         CREATE TABLE IF NOT EXISTS {state} (
             pipeline TEXT PRIMARY KEY, checkpoint TEXT, run_id TEXT, updated_at TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS {runs} (
             run_id TEXT PRIMARY KEY, pipeline TEXT NOT NULL, table_name TEXT, status TEXT NOT NULL,
             started_at TEXT NOT NULL, finished_at TEXT, stats TEXT,
             checkpoint_before TEXT, checkpoint_after TEXT, error TEXT, rows_after INTEGER);
         CREATE INDEX IF NOT EXISTS {runs_idx} ON {runs} (pipeline, started_at);
         CREATE TABLE IF NOT EXISTS {rejects} (
             id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, pipeline TEXT NOT NULL,
             source_ref TEXT NOT NULL, record_key TEXT, reason TEXT NOT NULL, raw TEXT,
             rejected_at TEXT NOT NULL);
         CREATE INDEX IF NOT EXISTS {rejects_idx} ON {rejects} (pipeline, run_id);
         CREATE TABLE IF NOT EXISTS {locks} (
             pipeline TEXT PRIMARY KEY, run_id TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL,
             since TEXT NOT NULL, expires_at INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS {files} (
             pipeline TEXT NOT NULL, path TEXT NOT NULL, table_name TEXT NOT NULL,
             size INTEGER NOT NULL, modified TEXT NOT NULL, digest TEXT NOT NULL,
             run_id TEXT NOT NULL, rows INTEGER NOT NULL, loaded_at TEXT NOT NULL,
             PRIMARY KEY (pipeline, path));
         COMMIT;",
        state = quote(STATE_TABLE),
        runs = quote(RUNS_TABLE),
        runs_idx = quote("_idemload_runs_pipeline"),
        rejects = quote(REJECTS_TABLE),
        rejects_idx = quote("_idemload_rejects_pipeline"),
        locks = quote(LOCKS_TABLE),
        files = quote(FILES_TABLE),
    ))?;
    Ok(conn)
}

/// Opens an existing database file without writing to it: `None` when the
/// file does not exist. Read-only commands use it, so that a mistyped path
/// never leaves a new database behind.
pub(crate) fn connect_read_only(path: &Path) -> Result<Option<Connection>> {
    if !path.exists() {
        return Ok(None);
    }
    let conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| Error::destination(path.display().to_string(), e))?;
    conn.busy_timeout(Duration::from_secs(60))?;
    Ok(Some(conn))
}

/// Whether the bookkeeping tables are there (a run has written here).
pub(crate) fn has_books(conn: &Connection) -> Result<bool> {
    Ok(conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
        [RUNS_TABLE],
        |r| r.get::<_, i64>(0),
    )? > 0)
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

pub(super) fn checkpoint(conn: &Connection, pipeline: &str) -> Result<Option<Value>> {
    let text: Option<Option<String>> = conn
        .query_row(
            &format!(
                "SELECT checkpoint FROM {} WHERE pipeline = ?1",
                quote(STATE_TABLE)
            ),
            [pipeline],
            |r| r.get(0),
        )
        .optional()?;
    Ok(text.flatten().and_then(|t| serde_json::from_str(&t).ok()))
}

pub(super) fn write_checkpoint(
    conn: &Connection,
    pipeline: &str,
    value: Option<&Value>,
    run_id: &str,
) -> Result<()> {
    conn.execute(
        &format!(
            "INSERT INTO {} (pipeline, checkpoint, run_id, updated_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (pipeline) DO UPDATE SET checkpoint = excluded.checkpoint,
                 run_id = excluded.run_id, updated_at = excluded.updated_at",
            quote(STATE_TABLE)
        ),
        params![
            pipeline,
            value.map(|v| v.to_string()),
            run_id,
            format_time(Utc::now())
        ],
    )?;
    Ok(())
}

/// Records the run and, for staged modes, prepares a fresh staging table.
pub(super) fn begin(
    conn: &mut Connection,
    run: &RunInfo,
    target: &Target,
) -> Result<(Option<String>, Fills)> {
    conn.execute_batch(
        "CREATE TEMP TABLE IF NOT EXISTS _idemload_run_keys (k TEXT PRIMARY KEY) WITHOUT ROWID;
         DELETE FROM temp._idemload_run_keys;",
    )?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // This run holds the lock, so a run of this pipeline still marked as
    // running died without finishing: say so in its history. (A backfill
    // window's run holds no lock: other windows run meanwhile.)
    if target.window.is_none() {
        tx.execute(
            &format!(
                "UPDATE {} SET status = ?2, finished_at = ?3,
                 error = 'the process ended before the run finished'
             WHERE pipeline = ?1 AND status = ?4",
                quote(RUNS_TABLE)
            ),
            params![
                run.pipeline,
                RunStatus::Died.as_str(),
                format_time(Utc::now()),
                RunStatus::Running.as_str()
            ],
        )?;
    }
    tx.execute(
        &format!(
            "INSERT INTO {} (run_id, pipeline, table_name, status, started_at, checkpoint_before)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            quote(RUNS_TABLE)
        ),
        params![
            run.run_id,
            run.pipeline,
            target.table,
            RunStatus::Running.as_str(),
            format_time(run.started_at),
            run.checkpoint_before.as_ref().map(Value::to_string)
        ],
    )?;
    let fills = super::ddl::existing_table(&tx, &target.table, &target.key_columns)?;
    let stage = if target.mode.is_staged() {
        let stage = match &target.window {
            // Workers stage their windows side by side.
            Some(w) => format!("_idemload_stage_{}_{}", target.table, w.position),
            None => format!("_idemload_stage_{}", target.table),
        };
        tx.execute_batch(&format!("DROP TABLE IF EXISTS {}", quote(&stage)))?;
        if let Some(schema) = super::read_schema(&tx, &target.table)? {
            super::ddl::create_table(&tx, &stage, &schema.columns, &target.key_columns)?;
        }
        Some(stage)
    } else {
        None
    };
    tx.commit()?;
    Ok((stage, fills))
}

/// How many of `rejects` an earlier run of the pipeline recorded already.
pub(super) fn known_rejects(
    conn: &Connection,
    pipeline: &str,
    run_id: &str,
    rejects: &[crate::record::Reject],
) -> Result<u64> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT EXISTS (SELECT 1 FROM {} WHERE pipeline = ?1 AND source_ref = ?2 AND raw = ?3 AND run_id <> ?4)",
        quote(REJECTS_TABLE)
    ))?;
    let mut known = 0;
    for r in rejects {
        let source = r.source.to_string();
        if stmt.query_row(params![pipeline, source, r.raw, run_id], |row| {
            row.get::<_, bool>(0)
        })? {
            known += 1;
        }
    }
    Ok(known)
}

/// Finishes the run row (inside the last batch's transaction).
pub(super) fn finish(
    conn: &Connection,
    run_id: &str,
    status: RunStatus,
    stats: &RunStats,
    checkpoint_after: Option<&Value>,
    error: Option<&str>,
) -> Result<()> {
    // The table's size after the run lets `audit` reconcile growth with
    // what each run inserted.
    let table: Option<String> = conn
        .query_row(
            &format!(
                "SELECT table_name FROM {} WHERE run_id = ?1",
                quote(RUNS_TABLE)
            ),
            [run_id],
            |r| r.get(0),
        )
        .optional()?
        .flatten();
    let finished = matches!(
        status,
        RunStatus::Succeeded | RunStatus::SucceededWithRejects
    );
    let rows_after: Option<i64> = match table {
        Some(t) if finished => conn
            .query_row(&format!("SELECT count(*) FROM {}", quote(&t)), [], |r| {
                r.get(0)
            })
            .optional()
            .unwrap_or(None),
        _ => None,
    };
    conn.execute(
        &format!(
            "UPDATE {} SET status = ?2, finished_at = ?3, stats = ?4, checkpoint_after = ?5, error = ?6,
                 rows_after = ?7
             WHERE run_id = ?1",
            quote(RUNS_TABLE)
        ),
        params![
            run_id,
            status.as_str(),
            format_time(Utc::now()),
            serde_json::to_string(stats).unwrap_or_default(),
            checkpoint_after.map(Value::to_string),
            error,
            rows_after
        ],
    )?;
    Ok(())
}

pub(super) fn fail(conn: &Connection, run_id: &str, stats: &RunStats, error: &str) -> Result<()> {
    finish(conn, run_id, RunStatus::Failed, stats, None, Some(error))
}

pub(super) fn history(conn: &Connection, pipeline: &str, limit: usize) -> Result<Vec<RunRecord>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT r.run_id, r.pipeline, r.status, r.started_at, r.finished_at, r.stats,
                r.checkpoint_before, r.checkpoint_after, r.error, l.host, l.pid
         FROM {} r LEFT JOIN {} l ON l.pipeline = r.pipeline AND l.run_id = r.run_id
         WHERE r.pipeline = ?1 ORDER BY r.started_at DESC, r.run_id DESC LIMIT ?2",
        quote(RUNS_TABLE),
        quote(LOCKS_TABLE)
    ))?;
    fn json<T: serde::de::DeserializeOwned>(t: Option<String>) -> Option<T> {
        t.and_then(|t| serde_json::from_str(&t).ok())
    }
    let rows = stmt
        .query_map(params![pipeline, limit as i64], |r| {
            let holder = match (r.get::<_, Option<String>>(9)?, r.get::<_, Option<u32>>(10)?) {
                (Some(host), Some(pid)) => Some((host, pid)),
                _ => None,
            };
            Ok(RunRecord {
                run_id: r.get(0)?,
                pipeline: r.get(1)?,
                status: status_shown(r.get(2)?, holder),
                started_at: r.get(3)?,
                finished_at: r.get(4)?,
                stats: json(r.get(5)?),
                checkpoint_before: json(r.get(6)?),
                checkpoint_after: json(r.get(7)?),
                error: r.get(8)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

pub(super) fn rejects(
    conn: &Connection,
    pipeline: &str,
    run_id: Option<&str>,
    limit: usize,
) -> Result<Vec<RejectRecord>> {
    let table = quote(REJECTS_TABLE);
    let run_id = match run_id {
        Some(r) => Some(r.to_string()),
        None => conn
            .query_row(
                &format!("SELECT run_id FROM {table} WHERE pipeline = ?1 ORDER BY id DESC LIMIT 1"),
                [pipeline],
                |r| r.get(0),
            )
            .optional()?,
    };
    let Some(run_id) = run_id else {
        return Ok(Vec::new());
    };
    let mut stmt = conn.prepare(&format!(
        "SELECT r.run_id, r.pipeline, r.source_ref, r.record_key, r.reason, r.raw, r.rejected_at,
                EXISTS (SELECT 1 FROM {table} e WHERE e.pipeline = r.pipeline AND e.source_ref = r.source_ref AND e.raw = r.raw AND e.id < r.id AND e.run_id <> r.run_id)
         FROM {table} r WHERE r.pipeline = ?1 AND r.run_id = ?2 ORDER BY r.id LIMIT ?3"
    ))?;
    let rows = stmt
        .query_map(params![pipeline, run_id, limit as i64], |r| {
            Ok(RejectRecord {
                run_id: r.get(0)?,
                pipeline: r.get(1)?,
                source_ref: r.get(2)?,
                record_key: r.get(3)?,
                reason: r.get(4)?,
                raw: r.get::<_, Option<String>>(5)?.unwrap_or_default(),
                rejected_at: r.get(6)?,
                known: r.get(7)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}
