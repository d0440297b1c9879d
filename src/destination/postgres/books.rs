//! PostgreSQL bookkeeping: the `_idemload_*` tables, the checkpoint, and
//! the run and reject records. The run lock is in `lock.rs`, the files log
//! in `files.rs`.

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_postgres::{Client, GenericClient};

use super::ddl::{advisory_key, read_schema};
use super::files::{add_rows_after, create_files_table};
use super::{identifier, pg_error, qualified};
use crate::destination::sql::{column_list, quote};
use crate::destination::Target;
use crate::error::Result;
use crate::state::{
    format_time, status_shown, RejectRecord, RunInfo, RunRecord, LOCKS_TABLE, REJECTS_TABLE,
    RUNS_TABLE, STATE_TABLE,
};
use crate::stats::{RunStats, RunStatus};

/// The temporary table of the keys this session's run has written.
pub(super) const RUN_KEYS: &str = "pg_temp._idemload_run_keys";

/// Creates the schema and the bookkeeping tables when missing. A
/// transaction-level advisory lock serialises processes that start at the
/// same moment (concurrent `CREATE … IF NOT EXISTS` can collide).
/// Whether the schema holds the bookkeeping tables (a run has written here).
pub(super) async fn has_books(client: &Client, schema: &str) -> Result<bool> {
    Ok(client
        .query_one(
            "SELECT count(*) = 4 FROM pg_catalog.pg_class c
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname IN ($2, $3, $4, $5)",
            &[
                &schema,
                &STATE_TABLE,
                &RUNS_TABLE,
                &REJECTS_TABLE,
                &LOCKS_TABLE,
            ],
        )
        .await
        .map_err(pg_error("bookkeeping tables"))?
        .get(0))
}

pub(super) async fn create_tables(client: &Client, schema: &str) -> Result<()> {
    if has_books(client, schema).await? {
        add_rows_after(client, schema).await?;
        return create_files_table(client, schema).await;
    }
    let q = |t: &str| qualified(schema, t);
    client
        .batch_execute(&format!(
            "BEGIN;
             SELECT pg_advisory_xact_lock({lock});
             CREATE SCHEMA IF NOT EXISTS {schema_q};
             CREATE TABLE IF NOT EXISTS {state} (
                 pipeline text PRIMARY KEY, checkpoint jsonb, run_id text,
                 updated_at timestamptz NOT NULL);
             CREATE TABLE IF NOT EXISTS {runs} (
                 run_id text PRIMARY KEY, pipeline text NOT NULL, table_name text,
                 status text NOT NULL, started_at timestamptz NOT NULL, finished_at timestamptz,
                 stats jsonb, checkpoint_before jsonb, checkpoint_after jsonb, error text,
                 rows_after bigint);
             CREATE INDEX IF NOT EXISTS {runs_idx} ON {runs} (pipeline, started_at);
             CREATE TABLE IF NOT EXISTS {rejects} (
                 id bigserial PRIMARY KEY, run_id text NOT NULL, pipeline text NOT NULL,
                 source_ref text NOT NULL, record_key text, reason text NOT NULL, raw text,
                 rejected_at timestamptz NOT NULL);
             CREATE INDEX IF NOT EXISTS {rejects_idx} ON {rejects} (pipeline, run_id);
             CREATE TABLE IF NOT EXISTS {locks} (
                 pipeline text PRIMARY KEY, run_id text NOT NULL, host text NOT NULL,
                 pid bigint NOT NULL, since timestamptz NOT NULL, expires_at bigint NOT NULL);
             COMMIT;",
            lock = advisory_key("", "_idemload_bookkeeping"),
            schema_q = quote(schema),
            state = q(STATE_TABLE),
            runs = q(RUNS_TABLE),
            runs_idx = quote("_idemload_runs_pipeline"),
            rejects = q(REJECTS_TABLE),
            rejects_idx = quote("_idemload_rejects_pipeline"),
            locks = q(LOCKS_TABLE),
        ))
        .await
        .map_err(pg_error("creating the bookkeeping tables"))?;
    create_files_table(client, schema).await
}

pub(super) async fn checkpoint(
    client: &Client,
    schema: &str,
    pipeline: &str,
) -> Result<Option<Value>> {
    let row = client
        .query_opt(
            &format!(
                "SELECT checkpoint FROM {} WHERE pipeline = $1",
                qualified(schema, STATE_TABLE)
            ),
            &[&pipeline],
        )
        .await
        .map_err(pg_error("reading the checkpoint"))?;
    Ok(row.and_then(|r| r.get::<_, Option<Value>>(0)))
}

pub(super) async fn write_checkpoint(
    tx: &impl GenericClient,
    schema: &str,
    pipeline: &str,
    value: Option<&Value>,
    run_id: &str,
) -> Result<()> {
    tx.execute(
        &format!(
            "INSERT INTO {} (pipeline, checkpoint, run_id, updated_at) VALUES ($1, $2, $3, now())
             ON CONFLICT (pipeline) DO UPDATE SET checkpoint = EXCLUDED.checkpoint,
                 run_id = EXCLUDED.run_id, updated_at = EXCLUDED.updated_at",
            qualified(schema, STATE_TABLE)
        ),
        &[&pipeline, &value, &run_id],
    )
    .await
    .map_err(pg_error("writing the checkpoint"))?;
    Ok(())
}

/// The staging table of a `replace`/`window` run.
pub(super) fn stage_name(table: &str) -> String {
    identifier(&format!("_idemload_stage_{table}"))
}

/// Records the run, prepares the run's key set and, for staged modes, a
/// fresh staging table shaped like the target.
pub(super) async fn begin(
    client: &mut Client,
    schema: &str,
    run: &RunInfo,
    target: &Target,
) -> Result<Option<String>> {
    let context = format!("starting run {}", run.run_id);
    client
        .batch_execute(&format!("DROP TABLE IF EXISTS {RUN_KEYS}"))
        .await
        .map_err(pg_error(context.clone()))?;
    let tx = client
        .transaction()
        .await
        .map_err(pg_error(context.clone()))?;
    tx.execute(
        &format!(
            "INSERT INTO {} (run_id, pipeline, table_name, status, started_at, checkpoint_before)
             VALUES ($1, $2, $3, $4, $5, $6)",
            qualified(schema, RUNS_TABLE)
        ),
        &[
            &run.run_id,
            &run.pipeline,
            &target.table,
            &RunStatus::Running.as_str(),
            &run.started_at,
            &run.checkpoint_before,
        ],
    )
    .await
    .map_err(pg_error(context.clone()))?;
    let stage = if target.mode.is_staged() {
        let stage = match &target.window {
            // Workers stage their windows side by side.
            Some(w) => identifier(&format!("_idemload_stage_{}_{}", target.table, w.position)),
            None => stage_name(&target.table),
        };
        tx.batch_execute(&format!(
            "DROP TABLE IF EXISTS {}",
            qualified(schema, &stage)
        ))
        .await
        .map_err(pg_error(context.clone()))?;
        if let Some(existing) = read_schema(&tx, schema, &target.table).await? {
            super::ddl::create_table(
                &tx,
                schema,
                &stage,
                &existing.columns,
                &target.key_columns,
                true,
            )
            .await?;
        }
        Some(stage)
    } else {
        None
    };
    tx.commit().await.map_err(pg_error(context))?;
    Ok(stage)
}

/// Finishes the run row (inside the last batch's transaction).
pub(super) async fn finish(
    tx: &impl GenericClient,
    schema: &str,
    run_id: &str,
    status: RunStatus,
    stats: &RunStats,
    checkpoint_after: Option<&Value>,
    error: Option<&str>,
) -> Result<()> {
    let stats = serde_json::to_value(stats).unwrap_or_default();
    // The table's size after the run lets `audit` reconcile growth with
    // what each run inserted (counted in the run's last transaction).
    let finished = matches!(
        status,
        RunStatus::Succeeded | RunStatus::SucceededWithRejects
    );
    let mut rows_after: Option<i64> = None;
    if finished {
        let table: Option<String> = tx
            .query_opt(
                &format!(
                    "SELECT table_name FROM {} WHERE run_id = $1",
                    qualified(schema, RUNS_TABLE)
                ),
                &[&run_id],
            )
            .await
            .map_err(pg_error(format!("finishing run {run_id}")))?
            .and_then(|r| r.get(0));
        // A run that wrote nothing may leave no table to count.
        let exists = match &table {
            Some(t) => tx
                .query_one(
                    "SELECT to_regclass($1::text) IS NOT NULL",
                    &[&qualified(schema, t)],
                )
                .await
                .map_err(pg_error(format!("finishing run {run_id}")))?
                .get(0),
            None => false,
        };
        if let Some(t) = table.filter(|_| exists) {
            rows_after = Some(
                tx.query_one(
                    &format!("SELECT count(*) FROM {}", qualified(schema, &t)),
                    &[],
                )
                .await
                .map_err(pg_error(format!("finishing run {run_id}")))?
                .get(0),
            );
        }
    }
    tx.execute(
        &format!(
            "UPDATE {} SET status = $2, finished_at = now(), stats = $3, checkpoint_after = $4,
                 error = $5, rows_after = $6
             WHERE run_id = $1",
            qualified(schema, RUNS_TABLE)
        ),
        &[
            &run_id,
            &status.as_str(),
            &stats,
            &checkpoint_after,
            &error.map(without_nul),
            &rows_after,
        ],
    )
    .await
    .map_err(pg_error(format!("finishing run {run_id}")))?;
    Ok(())
}

pub(super) async fn fail(
    client: &Client,
    schema: &str,
    run_id: &str,
    stats: &RunStats,
    error: &str,
) -> Result<()> {
    finish(
        client,
        schema,
        run_id,
        RunStatus::Failed,
        stats,
        None,
        Some(error),
    )
    .await
}

/// Text PostgreSQL can store: NUL becomes U+FFFD.
pub(super) fn without_nul(text: &str) -> String {
    text.replace('\0', "\u{fffd}")
}

/// Writes the batch's rejects in one statement.
/// How many of `rejects` an earlier run of the pipeline recorded already.
pub(super) async fn known_rejects(
    tx: &impl GenericClient,
    schema: &str,
    pipeline: &str,
    run_id: &str,
    rejects: &[crate::record::Reject],
) -> Result<u64> {
    let sources: Vec<String> = rejects
        .iter()
        .map(|r| without_nul(&r.source.to_string()))
        .collect();
    let raws: Vec<String> = rejects.iter().map(|r| without_nul(&r.raw)).collect();
    let row = tx
        .query_one(
            &format!(
                "SELECT count(*) FROM unnest($1::text[], $2::text[]) AS u(s, w)
                 WHERE EXISTS (SELECT 1 FROM {} e WHERE e.pipeline = $3 AND e.run_id <> $4
                               AND e.source_ref = u.s AND e.raw = u.w)",
                qualified(schema, REJECTS_TABLE)
            ),
            &[&sources, &raws, &pipeline, &run_id],
        )
        .await
        .map_err(pg_error("reading earlier rejects"))?;
    Ok(row.get::<_, i64>(0) as u64)
}

pub(super) async fn insert_rejects(
    tx: &impl GenericClient,
    schema: &str,
    pipeline: &str,
    run_id: &str,
    rejects: &[crate::record::Reject],
) -> Result<()> {
    if rejects.is_empty() {
        return Ok(());
    }
    let sources: Vec<String> = rejects
        .iter()
        .map(|r| without_nul(&r.source.to_string()))
        .collect();
    let keys: Vec<Option<String>> = rejects
        .iter()
        .map(|r| r.key.as_deref().map(without_nul))
        .collect();
    let reasons: Vec<String> = rejects.iter().map(|r| without_nul(&r.reason)).collect();
    let raws: Vec<String> = rejects.iter().map(|r| without_nul(&r.raw)).collect();
    tx.execute(
        &format!(
            "INSERT INTO {} ({})
             SELECT $1, $2, u.s, u.k, u.r, u.w, now()
             FROM unnest($3::text[], $4::text[], $5::text[], $6::text[]) WITH ORDINALITY
                 AS u(s, k, r, w, n) ORDER BY u.n",
            qualified(schema, REJECTS_TABLE),
            column_list(&[
                "run_id",
                "pipeline",
                "source_ref",
                "record_key",
                "reason",
                "raw",
                "rejected_at"
            ])
        ),
        &[&run_id, &pipeline, &sources, &keys, &reasons, &raws],
    )
    .await
    .map_err(pg_error("writing rejects"))?;
    Ok(())
}

pub(super) async fn history(
    client: &Client,
    schema: &str,
    pipeline: &str,
    limit: usize,
) -> Result<Vec<RunRecord>> {
    let rows = client
        .query(
            &format!(
                "SELECT r.run_id, r.pipeline, r.status, r.started_at, r.finished_at, r.stats,
                        r.checkpoint_before, r.checkpoint_after, r.error, l.host, l.pid
                 FROM {} r LEFT JOIN {} l ON l.pipeline = r.pipeline AND l.run_id = r.run_id
                 WHERE r.pipeline = $1 ORDER BY r.started_at DESC, r.run_id DESC LIMIT $2",
                qualified(schema, RUNS_TABLE),
                qualified(schema, LOCKS_TABLE)
            ),
            &[&pipeline, &(limit as i64)],
        )
        .await
        .map_err(pg_error("reading the run history"))?;
    Ok(rows
        .into_iter()
        .map(|r| RunRecord {
            run_id: r.get(0),
            pipeline: r.get(1),
            status: status_shown(
                r.get(2),
                r.get::<_, Option<String>>(9)
                    .zip(r.get::<_, Option<i64>>(10).map(|pid| pid as u32)),
            ),
            started_at: format_time(r.get::<_, DateTime<Utc>>(3)),
            finished_at: r.get::<_, Option<DateTime<Utc>>>(4).map(format_time),
            stats: r
                .get::<_, Option<Value>>(5)
                .and_then(|v| serde_json::from_value(v).ok()),
            checkpoint_before: r.get(6),
            checkpoint_after: r.get(7),
            error: r.get(8),
        })
        .collect())
}

pub(super) async fn rejects(
    client: &Client,
    schema: &str,
    pipeline: &str,
    run_id: Option<&str>,
    limit: usize,
) -> Result<Vec<RejectRecord>> {
    let table = qualified(schema, REJECTS_TABLE);
    let context = "reading rejects";
    let run_id = match run_id {
        Some(r) => Some(r.to_string()),
        None => client
            .query_opt(
                &format!("SELECT run_id FROM {table} WHERE pipeline = $1 ORDER BY id DESC LIMIT 1"),
                &[&pipeline],
            )
            .await
            .map_err(pg_error(context))?
            .map(|r| r.get(0)),
    };
    let Some(run_id) = run_id else {
        return Ok(Vec::new());
    };
    let rows = client
        .query(
            &format!(
                "SELECT r.run_id, r.pipeline, r.source_ref, r.record_key, r.reason, r.raw,
                        r.rejected_at, EXISTS (SELECT 1 FROM {table} e WHERE e.pipeline = r.pipeline AND e.source_ref = r.source_ref AND e.raw = r.raw AND e.id < r.id AND e.run_id <> r.run_id)
                 FROM {table} r WHERE r.pipeline = $1 AND r.run_id = $2 ORDER BY r.id LIMIT $3"
            ),
            &[&pipeline, &run_id, &(limit as i64)],
        )
        .await
        .map_err(pg_error(context))?;
    Ok(rows
        .into_iter()
        .map(|r| RejectRecord {
            run_id: r.get(0),
            pipeline: r.get(1),
            source_ref: r.get(2),
            record_key: r.get(3),
            reason: r.get(4),
            raw: r.get::<_, Option<String>>(5).unwrap_or_default(),
            rejected_at: format_time(r.get::<_, DateTime<Utc>>(6)),
            known: r.get(7),
        })
        .collect())
}
