//! The files log (`_idemload_files`): which files a pipeline loaded
//! completely into which table, so a later run leaves them unread.

use chrono::Utc;
use rusqlite::{params, Connection, OptionalExtension};

use crate::destination::sql::quote;
use crate::error::Result;
use crate::files::{LoadedFile, FILES_TABLE};
use crate::state::format_time;

/// Logs files as loaded into `table` by `run_id` (see [`crate::files`]).
pub(crate) fn log_files(
    conn: &Connection,
    pipeline: &str,
    table: &str,
    run_id: &str,
    files: &[LoadedFile],
) -> Result<()> {
    let now = format_time(Utc::now());
    let mut stmt = conn.prepare_cached(&format!(
        "INSERT INTO {} (pipeline, path, table_name, size, modified, digest, run_id, rows, loaded_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (pipeline, path) DO UPDATE SET table_name = excluded.table_name,
             size = excluded.size, modified = excluded.modified, digest = excluded.digest,
             run_id = excluded.run_id, rows = excluded.rows, loaded_at = excluded.loaded_at",
        quote(FILES_TABLE)
    ))?;
    for f in files {
        stmt.execute(params![
            pipeline,
            f.path,
            table,
            f.size as i64,
            f.modified,
            f.digest,
            run_id,
            f.rows as i64,
            now
        ])?;
    }
    Ok(())
}

/// Empties the pipeline's files log: `state --set`/`--reset` mean "read
/// again from there", whatever file holds it.
pub(crate) fn forget_files(conn: &Connection, pipeline: &str) -> Result<()> {
    conn.execute(
        &format!("DELETE FROM {} WHERE pipeline = ?1", quote(FILES_TABLE)),
        [pipeline],
    )?;
    Ok(())
}

/// The files earlier runs of `pipeline` loaded into `table`; none when the
/// table is missing or empty (dropped or emptied since: read them again).
pub(crate) fn loaded_files(
    conn: &Connection,
    pipeline: &str,
    table: &str,
) -> Result<Vec<LoadedFile>> {
    let holds_rows = conn
        .query_row(
            &format!("SELECT 1 FROM {} LIMIT 1", quote(table)),
            [],
            |_| Ok(()),
        )
        .optional()
        .unwrap_or(None)
        .is_some();
    if !holds_rows {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare(&format!(
        "SELECT path, size, modified, digest, rows FROM {}
         WHERE pipeline = ?1 AND table_name = ?2",
        quote(FILES_TABLE)
    ))?;
    let files = stmt
        .query_map(params![pipeline, table], |r| {
            Ok(LoadedFile {
                path: r.get(0)?,
                size: r.get::<_, i64>(1)? as u64,
                modified: r.get(2)?,
                digest: r.get(3)?,
                rows: r.get::<_, i64>(4)? as u64,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(files)
}
