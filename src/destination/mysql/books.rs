//! MySQL bookkeeping: the `_idemload_*` tables, checkpoint, runs and
//! rejects. The run lock and its lease are in `lock.rs`, the files log in
//! `files.rs`.

use chrono::Utc;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Params, Value as MyValue};
use serde_json::Value;

use super::ddl::{create_table, read_table, short_name};
use super::Server;
use crate::destination::sql::quote_mysql as q;
use crate::destination::Target;
use crate::files::FILES_TABLE;
use crate::record::Reject;
use crate::state::{
    format_time, status_shown, RejectRecord, RunInfo, RunRecord, LOCKS_TABLE, REJECTS_TABLE,
    RUNS_TABLE, STATE_TABLE,
};
use crate::stats::{RunStats, RunStatus};

pub(super) type R<T> = std::result::Result<T, mysql_async::Error>;

/// The temporary table of the keys this run wrote (duplicates across batches).
pub(super) const RUN_KEYS: &str = "_idemload_run_keys";

/// Creates the bookkeeping tables when missing.
/// Whether the database holds the bookkeeping tables (a run has written here).
pub(super) async fn has_books(conn: &mut Conn) -> R<bool> {
    let n: Option<i64> = conn
        .exec_first(
            "SELECT count(*) FROM information_schema.TABLES
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
            (RUNS_TABLE,),
        )
        .await?;
    Ok(n.unwrap_or(0) > 0)
}

pub(super) async fn create_tables(conn: &mut Conn, server: &Server) -> R<()> {
    let tail = format!(
        "ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = {}",
        server.collation
    );
    for ddl in [
        format!(
            "CREATE TABLE IF NOT EXISTS {} (
                pipeline VARCHAR(255) NOT NULL PRIMARY KEY, `checkpoint` LONGTEXT,
                run_id VARCHAR(64), updated_at VARCHAR(40) NOT NULL) {tail}",
            q(STATE_TABLE)
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {} (
                run_id VARCHAR(64) NOT NULL PRIMARY KEY, pipeline VARCHAR(255) NOT NULL,
                table_name VARCHAR(255), status VARCHAR(32) NOT NULL,
                started_at VARCHAR(40) NOT NULL, finished_at VARCHAR(40), stats LONGTEXT,
                checkpoint_before LONGTEXT, checkpoint_after LONGTEXT, error LONGTEXT,
                rows_after BIGINT,
                KEY `_idemload_runs_pipeline` (pipeline, started_at)) {tail}",
            q(RUNS_TABLE)
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {} (
                id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, run_id VARCHAR(64) NOT NULL,
                pipeline VARCHAR(255) NOT NULL, source_ref LONGTEXT NOT NULL,
                record_key LONGTEXT, reason LONGTEXT NOT NULL, raw LONGTEXT,
                rejected_at VARCHAR(40) NOT NULL,
                KEY `_idemload_rejects_pipeline` (pipeline, run_id)) {tail}",
            q(REJECTS_TABLE)
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {} (
                pipeline VARCHAR(255) NOT NULL PRIMARY KEY, run_id VARCHAR(64) NOT NULL,
                host VARCHAR(255) NOT NULL, pid BIGINT NOT NULL, since VARCHAR(40) NOT NULL,
                expires_at BIGINT NOT NULL) {tail}",
            q(LOCKS_TABLE)
        ),
        // Keyed by a digest of the path: a path may be longer than an
        // InnoDB key allows.
        format!(
            "CREATE TABLE IF NOT EXISTS {} (
                pipeline VARCHAR(255) NOT NULL, path_digest CHAR(64) NOT NULL,
                path LONGTEXT NOT NULL, table_name VARCHAR(255) NOT NULL,
                size BIGINT NOT NULL, modified VARCHAR(40) NOT NULL, digest VARCHAR(255) NOT NULL,
                run_id VARCHAR(64) NOT NULL, `rows` BIGINT NOT NULL, loaded_at VARCHAR(40) NOT NULL,
                PRIMARY KEY (pipeline, path_digest)) {tail}",
            q(FILES_TABLE)
        ),
    ] {
        conn.query_drop(ddl).await?;
    }
    // A runs table made before `rows_after` existed gets it (MySQL has no
    // ADD COLUMN IF NOT EXISTS; MariaDB has, but both answer this lookup).
    let present: Option<i64> = conn
        .exec_first(
            "SELECT count(*) FROM information_schema.COLUMNS
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND COLUMN_NAME = 'rows_after'",
            (RUNS_TABLE,),
        )
        .await?;
    if present.unwrap_or(0) == 0 {
        conn.query_drop(format!(
            "ALTER TABLE {} ADD COLUMN rows_after BIGINT",
            q(RUNS_TABLE)
        ))
        .await?;
    }
    Ok(())
}

pub(super) async fn checkpoint(conn: &mut Conn, pipeline: &str) -> R<Option<Value>> {
    let text: Option<Option<String>> = conn
        .exec_first(
            format!(
                "SELECT `checkpoint` FROM {} WHERE pipeline = ?",
                q(STATE_TABLE)
            ),
            (pipeline,),
        )
        .await?;
    Ok(text.flatten().and_then(|t| serde_json::from_str(&t).ok()))
}

pub(super) async fn write_checkpoint(
    conn: &mut Conn,
    pipeline: &str,
    value: Option<&Value>,
    run_id: &str,
) -> R<()> {
    conn.exec_drop(
        format!(
            "INSERT INTO {} (pipeline, `checkpoint`, run_id, updated_at) VALUES (?, ?, ?, ?)
             ON DUPLICATE KEY UPDATE `checkpoint` = VALUES(`checkpoint`),
                 run_id = VALUES(run_id), updated_at = VALUES(updated_at)",
            q(STATE_TABLE)
        ),
        (
            pipeline,
            value.map(Value::to_string),
            run_id,
            format_time(Utc::now()),
        ),
    )
    .await
}

/// Makes the run's key set (a temporary table of this connection) empty.
pub(super) async fn empty_run_keys(conn: &mut Conn) -> R<()> {
    conn.query_drop(format!(
        "CREATE TEMPORARY TABLE IF NOT EXISTS {} (k BINARY(16) NOT NULL PRIMARY KEY) ENGINE = InnoDB",
        q(RUN_KEYS)
    ))
    .await?;
    conn.query_drop(format!("DELETE FROM {}", q(RUN_KEYS)))
        .await
}

/// Records the run, empties the run's key set and, for staged modes,
/// prepares a fresh staging table (all outside any batch transaction).
pub(super) async fn begin(
    conn: &mut Conn,
    server: &Server,
    run: &RunInfo,
    target: &Target,
) -> R<Option<String>> {
    empty_run_keys(conn).await?;
    conn.exec_drop(
        format!(
            "INSERT INTO {} (run_id, pipeline, table_name, status, started_at, checkpoint_before)
             VALUES (?, ?, ?, ?, ?, ?)",
            q(RUNS_TABLE)
        ),
        (
            &run.run_id,
            &run.pipeline,
            &target.table,
            RunStatus::Running.as_str(),
            format_time(run.started_at),
            run.checkpoint_before.as_ref().map(Value::to_string),
        ),
    )
    .await?;
    if !target.mode.is_staged() {
        return Ok(None);
    }
    let stage = match &target.window {
        // Workers stage their windows side by side.
        Some(w) => short_name(
            "_idemload_stage_",
            &format!("{}_{}", target.table, w.position),
        ),
        None => short_name("_idemload_stage_", &target.table),
    };
    conn.query_drop(format!("DROP TABLE IF EXISTS {}", q(&stage)))
        .await?;
    if let Some(schema) = read_table(conn, server, &target.table).await? {
        create_table(conn, server, &stage, &schema.columns, &target.key_columns).await?;
    }
    Ok(Some(stage))
}

/// Finishes the run row (inside the last batch's transaction).
pub(super) async fn finish(
    conn: &mut Conn,
    run_id: &str,
    status: RunStatus,
    stats: &RunStats,
    checkpoint_after: Option<&Value>,
    error: Option<&str>,
) -> R<()> {
    // The table's size after the run lets `audit` reconcile growth with
    // what each run inserted (counted in the run's last transaction).
    let finished = matches!(
        status,
        RunStatus::Succeeded | RunStatus::SucceededWithRejects
    );
    let mut rows_after: Option<i64> = None;
    if finished {
        let table: Option<Option<String>> = conn
            .exec_first(
                format!("SELECT table_name FROM {} WHERE run_id = ?", q(RUNS_TABLE)),
                (run_id,),
            )
            .await?;
        // A run that wrote nothing may leave no table to count.
        let table = table.flatten();
        let exists: Option<i64> = match &table {
            Some(t) => {
                conn.exec_first(
                    "SELECT count(*) FROM information_schema.TABLES
                     WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
                    (t,),
                )
                .await?
            }
            None => None,
        };
        if let Some(t) = table.filter(|_| exists.unwrap_or(0) > 0) {
            rows_after = conn
                .query_first(format!("SELECT count(*) FROM {}", q(&t)))
                .await?;
        }
    }
    conn.exec_drop(
        format!(
            "UPDATE {} SET status = ?, finished_at = ?, stats = ?, checkpoint_after = ?, error = ?,
                 rows_after = ?
             WHERE run_id = ?",
            q(RUNS_TABLE)
        ),
        (
            status.as_str(),
            format_time(Utc::now()),
            serde_json::to_string(stats).unwrap_or_default(),
            checkpoint_after.map(Value::to_string),
            error,
            rows_after,
            run_id,
        ),
    )
    .await
}

pub(super) async fn fail(conn: &mut Conn, run_id: &str, stats: &RunStats, error: &str) -> R<()> {
    finish(conn, run_id, RunStatus::Failed, stats, None, Some(error)).await
}

/// Inserts a batch's rejects (inside its transaction), many rows a statement.
/// How many of `rejects` an earlier run of the pipeline recorded already.
pub(super) async fn known_rejects(
    conn: &mut Conn,
    pipeline: &str,
    run_id: &str,
    rejects: &[Reject],
) -> R<u64> {
    let mut known = 0;
    for chunk in rejects.chunks(500) {
        let marks = vec!["?"; chunk.len()].join(", ");
        let mut params: Vec<MyValue> = vec![pipeline.into(), run_id.into()];
        params.extend(chunk.iter().map(|r| MyValue::from(r.source.to_string())));
        let stored: Vec<(String, Option<String>)> = conn
            .exec(
                format!(
                    "SELECT source_ref, raw FROM {} WHERE pipeline = ? AND run_id <> ? AND source_ref IN ({marks})",
                    q(REJECTS_TABLE)
                ),
                Params::Positional(params),
            )
            .await?;
        let stored: std::collections::HashSet<(String, String)> = stored
            .into_iter()
            .map(|(s, w)| (s, w.unwrap_or_default()))
            .collect();
        known += chunk
            .iter()
            .filter(|r| stored.contains(&(r.source.to_string(), r.raw.clone())))
            .count() as u64;
    }
    Ok(known)
}

pub(super) async fn insert_rejects(
    conn: &mut Conn,
    pipeline: &str,
    run_id: &str,
    rejects: &[Reject],
) -> R<()> {
    let now = format_time(Utc::now());
    for chunk in rejects.chunks(500) {
        let rows = vec!["(?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(", ");
        let mut params: Vec<MyValue> = Vec::with_capacity(chunk.len() * 7);
        for r in chunk {
            params.extend([
                run_id.into(),
                pipeline.into(),
                r.source.to_string().into(),
                r.key.clone().into(),
                r.reason.clone().into(),
                r.raw.clone().into(),
                now.clone().into(),
            ]);
        }
        conn.exec_drop(
            format!(
                "INSERT INTO {} (run_id, pipeline, source_ref, record_key, reason, raw, rejected_at)
                 VALUES {rows}",
                q(REJECTS_TABLE)
            ),
            Params::Positional(params),
        )
        .await?;
    }
    Ok(())
}

type RunRow = (
    String,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<u32>,
);

pub(super) async fn history(conn: &mut Conn, pipeline: &str, limit: usize) -> R<Vec<RunRecord>> {
    fn json<T: serde::de::DeserializeOwned>(t: Option<String>) -> Option<T> {
        t.and_then(|t| serde_json::from_str(&t).ok())
    }
    let rows: Vec<RunRow> = conn
        .exec(
            format!(
                "SELECT r.run_id, r.pipeline, r.status, r.started_at, r.finished_at, r.stats,
                        r.checkpoint_before, r.checkpoint_after, r.error, l.host, l.pid
                 FROM {} r LEFT JOIN {} l ON l.pipeline = r.pipeline AND l.run_id = r.run_id
                 WHERE r.pipeline = ? ORDER BY r.started_at DESC, r.run_id DESC LIMIT ?",
                q(RUNS_TABLE),
                q(LOCKS_TABLE)
            ),
            (pipeline, limit as u64),
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| RunRecord {
            run_id: r.0,
            pipeline: r.1,
            status: status_shown(r.2, r.9.zip(r.10)),
            started_at: r.3,
            finished_at: r.4,
            stats: json(r.5),
            checkpoint_before: json(r.6),
            checkpoint_after: json(r.7),
            error: r.8,
        })
        .collect())
}

type RejectRow = (
    String,
    String,
    String,
    Option<String>,
    String,
    Option<String>,
    String,
    i64,
);

pub(super) async fn rejects(
    conn: &mut Conn,
    pipeline: &str,
    run_id: Option<&str>,
    limit: usize,
) -> R<Vec<RejectRecord>> {
    let table = q(REJECTS_TABLE);
    let run_id: Option<String> = match run_id {
        Some(r) => Some(r.to_string()),
        None => {
            conn.exec_first(
                format!("SELECT run_id FROM {table} WHERE pipeline = ? ORDER BY id DESC LIMIT 1"),
                (pipeline,),
            )
            .await?
        }
    };
    let Some(run_id) = run_id else {
        return Ok(Vec::new());
    };
    let rows: Vec<RejectRow> = conn
        .exec(
            format!(
                "SELECT r.run_id, r.pipeline, r.source_ref, r.record_key, r.reason, r.raw,
                        r.rejected_at, EXISTS (SELECT 1 FROM {table} e WHERE e.pipeline = r.pipeline AND e.source_ref = r.source_ref AND e.raw = r.raw AND e.id < r.id AND e.run_id <> r.run_id)
                 FROM {table} r WHERE r.pipeline = ? AND r.run_id = ? ORDER BY r.id LIMIT ?"
            ),
            (pipeline, &run_id, limit as u64),
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| RejectRecord {
            run_id: r.0,
            pipeline: r.1,
            source_ref: r.2,
            record_key: r.3,
            reason: r.4,
            raw: r.5.unwrap_or_default(),
            rejected_at: r.6,
            known: r.7 != 0,
        })
        .collect())
}
