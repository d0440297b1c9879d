//! The files log (`_idemload_files`): which files a pipeline loaded
//! completely into which table, so a later run leaves them unread.

use chrono::Utc;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Params, Value as MyValue};
use sha2::{Digest, Sha256};

use super::books::R;
use crate::destination::sql::quote_mysql as q;
use crate::files::{LoadedFile, FILES_TABLE};
use crate::state::format_time;

/// Logs files as loaded into `table` by `run_id`.
pub(super) async fn log_files(
    conn: &mut Conn,
    pipeline: &str,
    table: &str,
    run_id: &str,
    files: &[LoadedFile],
) -> R<()> {
    let now = format_time(Utc::now());
    for chunk in files.chunks(500) {
        let rows = vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(", ");
        let mut params: Vec<MyValue> = Vec::with_capacity(chunk.len() * 10);
        for f in chunk {
            params.extend([
                pipeline.into(),
                hex::encode(Sha256::digest(f.path.as_bytes())).into(),
                f.path.clone().into(),
                table.into(),
                f.size.into(),
                f.modified.clone().into(),
                f.digest.clone().into(),
                run_id.into(),
                f.rows.into(),
                now.clone().into(),
            ]);
        }
        conn.exec_drop(
            format!(
                "INSERT INTO {} (pipeline, path_digest, path, table_name, size, modified, digest,
                     run_id, `rows`, loaded_at)
                 VALUES {rows}
                 ON DUPLICATE KEY UPDATE path = VALUES(path), table_name = VALUES(table_name),
                     size = VALUES(size), modified = VALUES(modified), digest = VALUES(digest),
                     run_id = VALUES(run_id), `rows` = VALUES(`rows`), loaded_at = VALUES(loaded_at)",
                q(FILES_TABLE)
            ),
            Params::Positional(params),
        )
        .await?;
    }
    Ok(())
}

/// Empties the pipeline's files log: `state --set`/`--reset` mean "read
/// again from there", whatever file holds it.
pub(super) async fn forget_files(conn: &mut Conn, pipeline: &str) -> R<()> {
    conn.exec_drop(
        format!("DELETE FROM {} WHERE pipeline = ?", q(FILES_TABLE)),
        (pipeline,),
    )
    .await
}

/// The files earlier runs of `pipeline` loaded into `table`; none when the
/// table is missing or empty (dropped or emptied since: read them again).
pub(super) async fn loaded_files(
    conn: &mut Conn,
    pipeline: &str,
    table: &str,
) -> R<Vec<LoadedFile>> {
    let holds_rows = conn
        .query_first::<i64, _>(format!("SELECT 1 FROM {} LIMIT 1", q(table)))
        .await
        .ok()
        .flatten()
        .is_some();
    if !holds_rows {
        return Ok(Vec::new());
    }
    let rows: Vec<(String, u64, String, String, u64)> = conn
        .exec(
            format!(
                "SELECT path, size, modified, digest, `rows` FROM {}
                 WHERE pipeline = ? AND table_name = ?",
                q(FILES_TABLE)
            ),
            (pipeline, table),
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|(path, size, modified, digest, rows)| LoadedFile {
            path,
            size,
            modified,
            digest,
            rows,
        })
        .collect())
}
