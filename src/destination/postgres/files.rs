//! The files log (`_idemload_files`): which files a pipeline loaded
//! completely into which table, so a later run leaves them unread.

use tokio_postgres::{Client, GenericClient};

use super::ddl::advisory_key;
use super::{pg_error, qualified};
use crate::error::Result;
use crate::files::{LoadedFile, FILES_TABLE};
use crate::state::RUNS_TABLE;

/// `_idemload_files` (see [`crate::files`]), also in a schema whose other
/// bookkeeping tables are older than it. Under the bookkeeping advisory
/// lock: concurrent `CREATE TABLE IF NOT EXISTS` race in PostgreSQL.
pub(super) async fn create_files_table(client: &Client, schema: &str) -> Result<()> {
    let present: bool = client
        .query_one(
            "SELECT count(*) > 0 FROM information_schema.tables
             WHERE table_schema = $1 AND table_name = $2",
            &[&schema, &FILES_TABLE],
        )
        .await
        .map_err(pg_error("bookkeeping tables"))?
        .get(0);
    if present {
        return Ok(());
    }
    client
        .batch_execute(&format!(
            "BEGIN;
             SELECT pg_advisory_xact_lock({lock});
             CREATE TABLE IF NOT EXISTS {files} (
                 pipeline text NOT NULL, path text NOT NULL, table_name text NOT NULL,
                 size bigint NOT NULL, modified text NOT NULL, digest text NOT NULL,
                 run_id text NOT NULL, rows bigint NOT NULL, loaded_at timestamptz NOT NULL,
                 PRIMARY KEY (pipeline, path));
             COMMIT;",
            lock = advisory_key("", "_idemload_bookkeeping"),
            files = qualified(schema, FILES_TABLE)
        ))
        .await
        .map_err(pg_error("creating the files table"))?;
    Ok(())
}

/// Logs files as loaded into `table` by `run_id`.
pub(super) async fn log_files(
    tx: &impl GenericClient,
    schema: &str,
    pipeline: &str,
    table: &str,
    run_id: &str,
    files: &[LoadedFile],
) -> Result<()> {
    let paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
    let sizes: Vec<i64> = files.iter().map(|f| f.size as i64).collect();
    let modified: Vec<&str> = files.iter().map(|f| f.modified.as_str()).collect();
    let digests: Vec<&str> = files.iter().map(|f| f.digest.as_str()).collect();
    let rows: Vec<i64> = files.iter().map(|f| f.rows as i64).collect();
    tx.execute(
        &format!(
            "INSERT INTO {} (pipeline, path, table_name, size, modified, digest, run_id, rows, loaded_at)
             SELECT $1, u.p, $2, u.s, u.m, u.d, $3, u.r, now()
             FROM unnest($4::text[], $5::bigint[], $6::text[], $7::text[], $8::bigint[])
                 AS u(p, s, m, d, r)
             ON CONFLICT (pipeline, path) DO UPDATE SET table_name = excluded.table_name,
                 size = excluded.size, modified = excluded.modified, digest = excluded.digest,
                 run_id = excluded.run_id, rows = excluded.rows, loaded_at = excluded.loaded_at",
            qualified(schema, FILES_TABLE)
        ),
        &[&pipeline, &table, &run_id, &paths, &sizes, &modified, &digests, &rows],
    )
    .await
    .map_err(pg_error("logging loaded files"))?;
    Ok(())
}

/// Empties the pipeline's files log: `state --set`/`--reset` mean "read
/// again from there", whatever file holds it.
pub(super) async fn forget_files(
    tx: &impl GenericClient,
    schema: &str,
    pipeline: &str,
) -> Result<()> {
    tx.execute(
        &format!(
            "DELETE FROM {} WHERE pipeline = $1",
            qualified(schema, FILES_TABLE)
        ),
        &[&pipeline],
    )
    .await
    .map_err(pg_error("forgetting loaded files"))?;
    Ok(())
}

/// The files earlier runs of `pipeline` loaded into `table`; none when the
/// table is missing or empty (dropped or emptied since: read them again).
pub(super) async fn loaded_files(
    client: &Client,
    schema: &str,
    pipeline: &str,
    table: &str,
) -> Result<Vec<LoadedFile>> {
    let holds_rows = client
        .query_opt(
            &format!("SELECT 1 FROM {} LIMIT 1", qualified(schema, table)),
            &[],
        )
        .await
        .ok()
        .flatten()
        .is_some();
    if !holds_rows {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            &format!(
                "SELECT path, size, modified, digest, rows FROM {}
                 WHERE pipeline = $1 AND table_name = $2",
                qualified(schema, FILES_TABLE)
            ),
            &[&pipeline, &table],
        )
        .await
        .map_err(pg_error("reading the files table"))?;
    Ok(rows
        .iter()
        .map(|r| LoadedFile {
            path: r.get(0),
            size: r.get::<_, i64>(1) as u64,
            modified: r.get(2),
            digest: r.get(3),
            rows: r.get::<_, i64>(4) as u64,
        })
        .collect())
}

/// Adds `rows_after` to a runs table made before it existed. Looked up
/// first, so that a current install takes no lock on the table.
pub(super) async fn add_rows_after(client: &Client, schema: &str) -> Result<()> {
    let present: bool = client
        .query_one(
            "SELECT count(*) > 0 FROM information_schema.columns
             WHERE table_schema = $1 AND table_name = $2 AND column_name = 'rows_after'",
            &[&schema, &RUNS_TABLE],
        )
        .await
        .map_err(pg_error("bookkeeping tables"))?
        .get(0);
    if !present {
        client
            .batch_execute(&format!(
                "ALTER TABLE {} ADD COLUMN IF NOT EXISTS rows_after bigint",
                qualified(schema, RUNS_TABLE)
            ))
            .await
            .map_err(pg_error("adding rows_after to the runs table"))?;
    }
    Ok(())
}
