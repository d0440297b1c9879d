//! Writing one batch to MySQL, in one transaction.
//!
//! Before the transaction: tables and columns are created (MySQL's DDL
//! commits on its own), every value is converted for its column in Rust (a
//! value that does not fit is a reject), and the batch is loaded into a
//! temporary table, `_idemload_batch`, with `LOAD DATA LOCAL INFILE` from
//! memory. Inside the transaction, set-based statements classify every row
//! against the stored one (new, changed, unchanged by `<=>` on every column,
//! stale by cursor, to delete) and against the run's key set (a key written
//! by an earlier batch is a duplicate), then write only what changed. The
//! batch's rejects, its checkpoint and, for the last batch, the run's ending
//! commit with it.

use std::collections::HashMap;
use std::io::Write as _;

use bytes::Bytes;
use chrono::{DateTime, Datelike, NaiveDateTime, Timelike, Utc};
use futures_util::StreamExt;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Params, Value as MyValue};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::bookkeeping::{self, fence, write_checkpoint, RUN_KEYS};
use super::schema::{
    add_columns, create_table, declare, read_table, unfit_name, Limit, SqlColumn, Table,
};
use super::{stage, MysqlDestination, Run, Server};
use crate::config::Mode;
use crate::destination::schema::{ColumnType, SqlValue};
use crate::destination::sql::quote_mysql as q;
use crate::destination::{Commit, Target};
use crate::error::{Error, Result};
use crate::key::Cursor;
use crate::pipeline::plan::{PlannedBatch, Row};
use crate::pipeline::stats::RunStats;
use crate::record::Reject;

/// The temporary table a batch is loaded into.
const BATCH: &str = "_idemload_batch";

/// Row classes of a batch.
const OP_INSERT: i64 = 1;
const OP_UPDATE: i64 = 2;
const OP_UNCHANGED: i64 = 3;
const OP_DELETE: i64 = 4;
const OP_STALE: i64 = 5;

/// A value ready for MySQL.
#[derive(Debug, Clone, PartialEq)]
enum Cell {
    Null,
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(String),
    /// UTC, to the microsecond.
    Time(NaiveDateTime),
}

/// A converted row.
struct Prepared {
    cells: Vec<Cell>,
    /// Identity of the key as the database sees it (first 16 bytes of a
    /// SHA-256 of the converted key values).
    rk: [u8; 16],
    delete: bool,
    cursor: Option<Cursor>,
}

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
    let lock = lock
        .clone()
        .ok_or_else(|| Error::destination("mysql", "write without the run lock"))?;
    let PlannedBatch {
        rows,
        mut rejects,
        mut stats,
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
    if !rows.is_empty() {
        let (schema, rows) =
            ensure_table(conn, server, run, &table, rows, &mut rejects, &mut stats).await?;
        if !rows.is_empty() {
            let clock = std::time::Instant::now();
            let prepared = prepare(&schema, &run.target, &table, rows, &mut rejects, &mut stats)?;
            let converted = clock.elapsed().as_millis() as u64;
            if !prepared.is_empty() {
                load(conn, local_infile, &schema, &prepared)
                    .await
                    .map_err(|e| Error::destination(ctx.clone(), e))?;
                loaded = Some(schema);
            }
            tracing::debug!(
                converted,
                ms = clock.elapsed().as_millis() as u64,
                rows = prepared.len(),
                "Batch loaded."
            );
        }
    }
    let finishing_stage = match (&commit.finish, &run.stage) {
        (Some(_), Some(stage)) => Some((
            stage.clone(),
            stage::prepare(conn, server, run, stage)
                .await
                .map_err(|e| Error::destination(format!("mysql table {stage:?}"), e))?,
        )),
        _ => None,
    };

    conn.query_drop("START TRANSACTION")
        .await
        .map_err(|e| Error::destination(ctx.clone(), e))?;
    let result = async {
        fence(conn, &lock).await?;
        if let Some(schema) = &loaded {
            let counts = merge(conn, &table, schema, &run.target, mode)
                .await
                .map_err(|e| Error::destination(ctx.clone(), e))?;
            if staged {
                // Staged rows are counted when the stage is applied.
                stats.duplicates += counts.duplicates;
            } else {
                stats += counts;
            }
        }
        let bk = |e| Error::destination("mysql bookkeeping", e);
        bookkeeping::insert_rejects(conn, &lock.pipeline, &lock.run_id, &rejects)
            .await
            .map_err(bk)?;
        if let Some(checkpoint) = &commit.checkpoint {
            write_checkpoint(conn, &lock.pipeline, Some(checkpoint), &lock.run_id)
                .await
                .map_err(bk)?;
        }
        if let Some(finish) = &commit.finish {
            if let Some((stage, plan)) = &finishing_stage {
                stats += stage::apply(conn, run, stage, plan)
                    .await
                    .map_err(|e| Error::destination(format!("mysql table {stage:?}"), e))?;
            }
            let end = finish.resolve(stats);
            if let Some(checkpoint) = &end.checkpoint {
                write_checkpoint(conn, &lock.pipeline, Some(checkpoint), &lock.run_id)
                    .await
                    .map_err(bk)?;
            }
            let after = end
                .checkpoint
                .as_ref()
                .or(run.info.checkpoint_before.as_ref());
            bookkeeping::finish(
                conn,
                &lock.run_id,
                end.status,
                &end.stats,
                after,
                end.error.as_deref(),
            )
            .await
            .map_err(bk)?;
        }
        let clock = std::time::Instant::now();
        conn.query_drop("COMMIT")
            .await
            .map_err(|e| Error::destination(ctx.clone(), e))?;
        tracing::debug!(ms = clock.elapsed().as_millis() as u64, "Batch committed.");
        Ok::<_, Error>(())
    }
    .await;
    if let Err(e) = result {
        let _ = conn.query_drop("ROLLBACK").await;
        return Err(e);
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

fn reject(row: &Row, reason: String) -> Reject {
    Reject {
        source: row.source.clone(),
        key: Some(row.key.to_string()),
        raw: serde_json::to_string(&row.fields).unwrap_or_default(),
        reason,
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
    let mut new_names: HashMap<String, String> = HashMap::new();
    let mut kept = Vec::with_capacity(rows.len());
    for row in rows {
        let mut problem = None;
        for name in row.fields.keys() {
            if schema.position(name).is_some() {
                continue;
            }
            if let Some(p) = unfit_name(name, &schema) {
                problem = Some(p);
                break;
            }
            match new_names.get(&name.to_lowercase()) {
                Some(exact) if exact != name => {
                    problem = Some(format!(
                        "field name {name:?} differs from field {exact:?} only by case, and MySQL column names ignore case"
                    ));
                    break;
                }
                Some(_) => {}
                None => {
                    new_names.insert(name.to_lowercase(), name.clone());
                }
            }
        }
        match problem {
            Some(reason) => {
                stats.rejected += 1;
                rejects.push(reject(&row, reason));
            }
            None => kept.push(row),
        }
    }
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

/// Converts every row for its columns, and keeps one row per key as the
/// database sees it (two timestamps with different offsets can be one
/// instant): the greatest cursor wins, a tie goes to the later row.
fn prepare(
    schema: &Table,
    target: &Target,
    table: &str,
    rows: Vec<Row>,
    rejects: &mut Vec<Reject>,
    stats: &mut RunStats,
) -> Result<Vec<Prepared>> {
    let keys = target
        .key_columns
        .iter()
        .map(|k| {
            schema.position(k).ok_or_else(|| {
                Error::destination(
                    format!("mysql table {table:?}"),
                    format!("has no key column {k:?}"),
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut out: Vec<Prepared> = Vec::with_capacity(rows.len());
    let mut index: HashMap<[u8; 16], usize> = HashMap::with_capacity(rows.len());
    for row in rows {
        let cells = match convert(schema, &row) {
            Ok(cells) => cells,
            Err(reason) => {
                stats.rejected += 1;
                rejects.push(reject(&row, reason));
                continue;
            }
        };
        let rk = key_hash(&cells, &keys);
        let prepared = Prepared {
            cells,
            rk,
            delete: row.delete,
            cursor: row.cursor,
        };
        match index.get(&rk) {
            Some(&at) => {
                stats.duplicates += 1;
                let newer = match (&prepared.cursor, &out[at].cursor) {
                    (Some(new), Some(old)) => new >= old,
                    _ => true,
                };
                if newer {
                    out[at] = prepared;
                }
            }
            None => {
                index.insert(rk, out.len());
                out.push(prepared);
            }
        }
    }
    Ok(out)
}

fn convert(schema: &Table, row: &Row) -> std::result::Result<Vec<Cell>, String> {
    let mut cells = Vec::with_capacity(schema.columns.len());
    for column in &schema.columns {
        let value = row.fields.get(&column.name).unwrap_or(&Value::Null);
        if let (ColumnType::Timestamp, Value::String(text)) = (column.ty, value) {
            // Parsed once here; `convert` words the reason when it fails.
            if let Ok(t) = to_utc(&column.name, text) {
                cells.push(Cell::Time(t));
                continue;
            }
        }
        let cell = match column.ty.convert(&column.name, value)? {
            SqlValue::Null => Cell::Null,
            SqlValue::Int(i) => Cell::Int(i),
            SqlValue::Float(f) => Cell::Float(f),
            SqlValue::Bool(b) => Cell::Bool(b),
            SqlValue::Text(s) if column.ty == ColumnType::Timestamp => {
                Cell::Time(to_utc(&column.name, &s)?)
            }
            SqlValue::Text(s) | SqlValue::Json(s) => {
                check_limit(column, &s)?;
                Cell::Text(s)
            }
        };
        cells.push(cell);
    }
    Ok(cells)
}

/// An RFC 3339 timestamp as a UTC `DATETIME(6)`.
fn to_utc(column: &str, text: &str) -> std::result::Result<NaiveDateTime, String> {
    let out_of_range = || {
        format!(
            "value {text:?} of field {column:?} is outside a MySQL DATETIME (years 1000 to 9999)"
        )
    };
    let t = DateTime::parse_from_rfc3339(text)
        .map_err(|_| format!("value {text:?} of field {column:?} is not an RFC 3339 timestamp"))?
        .with_timezone(&Utc)
        .naive_utc();
    if !(1000..=9999).contains(&t.year()) || t.nanosecond() >= 1_000_000_000 {
        return Err(out_of_range());
    }
    t.with_nanosecond(t.nanosecond() / 1000 * 1000)
        .ok_or_else(out_of_range)
}

fn check_limit(column: &SqlColumn, text: &str) -> std::result::Result<(), String> {
    let too_long = |n: usize, unit: &str| {
        Err(format!(
            "value of field {:?} is longer than the column's {n} {unit}",
            column.name
        ))
    };
    match column.limit {
        Some(Limit::Chars(n)) if text.len() > n && text.chars().count() > n => {
            too_long(n, "characters")
        }
        Some(Limit::Bytes(n)) if text.len() > n => too_long(n, "bytes"),
        _ => Ok(()),
    }
}

fn key_hash(cells: &[Cell], keys: &[usize]) -> [u8; 16] {
    let mut h = Sha256::new();
    let mut buf = Vec::new();
    for &i in keys {
        buf.clear();
        encode_cell(&mut buf, &cells[i]);
        h.update(&buf);
        // 0xff never occurs in UTF-8: an unambiguous separator.
        h.update([0xff]);
    }
    let digest = h.finalize();
    let mut rk = [0u8; 16];
    rk.copy_from_slice(&digest[..16]);
    rk
}

/// One field of `LOAD DATA` text (tab-separated, backslash escapes).
fn encode_cell(buf: &mut Vec<u8>, cell: &Cell) {
    match cell {
        Cell::Null => buf.extend_from_slice(b"\\N"),
        Cell::Int(i) => {
            let _ = write!(buf, "{i}");
        }
        Cell::Float(f) => {
            let _ = write!(buf, "{f:e}");
        }
        Cell::Bool(b) => buf.push(if *b { b'1' } else { b'0' }),
        Cell::Time(t) => {
            let _ = write!(buf, "{}", t.format("%Y-%m-%d %H:%M:%S%.6f"));
        }
        Cell::Text(s) => {
            for &b in s.as_bytes() {
                match b {
                    b'\\' => buf.extend_from_slice(b"\\\\"),
                    b'\t' => buf.extend_from_slice(b"\\t"),
                    b'\n' => buf.extend_from_slice(b"\\n"),
                    b'\r' => buf.extend_from_slice(b"\\r"),
                    0 => buf.extend_from_slice(b"\\0"),
                    _ => buf.push(b),
                }
            }
        }
    }
}

fn to_mysql(cell: &Cell) -> MyValue {
    match cell {
        Cell::Null => MyValue::NULL,
        Cell::Int(i) => MyValue::Int(*i),
        Cell::Float(f) => MyValue::Double(*f),
        Cell::Bool(b) => MyValue::Int(*b as i64),
        Cell::Text(s) => MyValue::Bytes(s.as_bytes().to_vec()),
        Cell::Time(t) => MyValue::Date(
            t.year() as u16,
            t.month() as u8,
            t.day() as u8,
            t.hour() as u8,
            t.minute() as u8,
            t.second() as u8,
            t.nanosecond() / 1000,
        ),
    }
}

/// (Re)creates `_idemload_batch` for `schema` and loads the rows into it.
///
/// The table has no index: rows are unique by key already, every statement
/// scans it once and probes the target's primary key, and rows stay in
/// input order, which keeps those probes close together.
async fn load(
    conn: &mut Conn,
    local_infile: &mut bool,
    schema: &Table,
    rows: &[Prepared],
) -> std::result::Result<(), mysql_async::Error> {
    let b = q(BATCH);
    conn.query_drop(format!("DROP TEMPORARY TABLE IF EXISTS {b}"))
        .await?;
    let defs = schema
        .columns
        .iter()
        .map(|c| format!("{} {}", q(&c.name), c.definition))
        .collect::<Vec<_>>()
        .join(", ");
    conn.query_drop(format!(
        "CREATE TEMPORARY TABLE {b} ({defs},
            `_idemload_rk` BINARY(16) NOT NULL,
            `_idemload_del` TINYINT NOT NULL DEFAULT 0) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4"
    ))
    .await?;
    let cols = schema
        .names()
        .iter()
        .map(|n| q(n))
        .collect::<Vec<_>>()
        .join(", ");
    if *local_infile {
        let mut buf = Vec::with_capacity(rows.len() * (schema.columns.len() * 12 + 40));
        for row in rows {
            for cell in &row.cells {
                encode_cell(&mut buf, cell);
                buf.push(b'\t');
            }
            buf.extend_from_slice(hex::encode(row.rk).as_bytes());
            buf.push(b'\t');
            buf.push(if row.delete { b'1' } else { b'0' });
            buf.push(b'\n');
        }
        let data = Bytes::from(buf);
        conn.set_infile_handler(async move { Ok(futures_util::stream::iter([Ok(data)]).boxed()) });
        let loaded = conn
            .query_drop(format!(
                r"LOAD DATA LOCAL INFILE 'idemload-batch' INTO TABLE {b} CHARACTER SET utf8mb4
                  FIELDS TERMINATED BY '\t' ESCAPED BY '\\' LINES TERMINATED BY '\n'
                  ({cols}, @rk, `_idemload_del`) SET `_idemload_rk` = UNHEX(@rk)"
            ))
            .await;
        match loaded {
            Ok(()) => return check_warnings(conn).await,
            // Local files refused by the server or this client: INSERT instead.
            Err(mysql_async::Error::Server(e)) if matches!(e.code, 1148 | 3948 | 2068) => {
                tracing::info!(
                    code = e.code,
                    "LOAD DATA LOCAL refused; loading with INSERT."
                );
                *local_infile = false;
                conn.query_drop(format!("DELETE FROM {b}")).await?;
            }
            Err(e) => return Err(e),
        }
    }
    let per_row = schema.columns.len() + 2;
    let chunk = (60_000 / per_row).clamp(1, 2_000);
    let row_marks = format!("({})", vec!["?"; per_row].join(", "));
    for part in rows.chunks(chunk) {
        let mut params = Vec::with_capacity(part.len() * per_row);
        for row in part {
            params.extend(row.cells.iter().map(to_mysql));
            params.push(MyValue::Bytes(row.rk.to_vec()));
            params.push(MyValue::Int(row.delete as i64));
        }
        conn.exec_drop(
            format!(
                "INSERT INTO {b} ({cols}, `_idemload_rk`, `_idemload_del`) VALUES {}",
                vec![row_marks.as_str(); part.len()].join(", ")
            ),
            Params::Positional(params),
        )
        .await?;
    }
    Ok(())
}

/// `LOAD DATA LOCAL` turns bad values into warnings: values were checked
/// already, so any warning is a real problem, not something to keep.
async fn check_warnings(conn: &mut Conn) -> std::result::Result<(), mysql_async::Error> {
    if conn.get_warnings() == 0 {
        return Ok(());
    }
    let warnings: Vec<(String, u32, String)> = conn.query("SHOW WARNINGS LIMIT 3").await?;
    let text = warnings
        .into_iter()
        .map(|(level, code, message)| format!("{level} {code}: {message}"))
        .collect::<Vec<_>>()
        .join("; ");
    Err(mysql_async::Error::Other(
        format!("loading the batch gave warnings: {text}").into(),
    ))
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
    let same = if others.is_empty() {
        "TRUE".to_string()
    } else {
        others
            .iter()
            .map(|c| format!("t.{0} <=> s.{0}", q(c)))
            .collect::<Vec<_>>()
            .join(" AND ")
    };
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
    let del = "s.`_idemload_del` = 1";
    let clock = std::time::Instant::now();
    let counts: Vec<(i64, i64, i64)> = conn
        .query(format!(
            "SELECT CASE
                 WHEN t.{k0} IS NULL THEN IF({del}, {OP_UNCHANGED}, {OP_INSERT})
                 WHEN {insert_new} THEN {OP_UNCHANGED}
                 WHEN {stale} THEN {OP_STALE}
                 WHEN {del} THEN {OP_DELETE}
                 WHEN {same} THEN {OP_UNCHANGED}
                 ELSE {OP_UPDATE} END AS op,
               r.k IS NOT NULL AS dup, COUNT(*)
             FROM {b} s LEFT JOIN {t} t ON {matched} LEFT JOIN {rk} r ON r.k = s.`_idemload_rk`
             GROUP BY op, dup"
        ))
        .await?;
    tracing::debug!(ms = clock.elapsed().as_millis() as u64, "Batch classified.");
    // Keys of this batch seen before are kept: IGNORE skips exactly those.
    conn.query_drop(format!(
        "INSERT IGNORE INTO {rk} (k) SELECT `_idemload_rk` FROM {b} ORDER BY `_idemload_rk`"
    ))
    .await?;
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
             WHERE NOT {del} AND NOT {stale} AND NOT ({same})"
        ))
        .await?;
    }
    if todo[OP_INSERT as usize] {
        let cols = schema
            .names()
            .iter()
            .map(|n| q(n))
            .collect::<Vec<_>>()
            .join(", ");
        let s_cols = schema
            .names()
            .iter()
            .map(|n| format!("s.{}", q(n)))
            .collect::<Vec<_>>()
            .join(", ");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_data_text_escapes_what_would_split_a_field() {
        let mut buf = Vec::new();
        encode_cell(&mut buf, &Cell::Text("a\tb\nc\\d\r\0".into()));
        assert_eq!(buf, b"a\\tb\\nc\\\\d\\r\\0");
        buf.clear();
        encode_cell(&mut buf, &Cell::Null);
        assert_eq!(buf, b"\\N");
        buf.clear();
        encode_cell(&mut buf, &Cell::Float(0.1));
        assert_eq!(buf, b"1e-1");
    }

    #[test]
    fn timestamps_become_utc_microseconds() {
        let t = to_utc("t", "2024-03-01T01:30:00.1234567+02:00").unwrap();
        assert_eq!(
            t.format("%Y-%m-%d %H:%M:%S%.6f").to_string(),
            "2024-02-29 23:30:00.123456"
        );
        assert!(to_utc("t", "0999-12-31T23:59:59Z").is_err());
    }

    #[test]
    fn one_instant_is_one_key_whatever_its_offset() {
        let a = Cell::Time(to_utc("t", "2024-01-01T02:00:00+02:00").unwrap());
        let b = Cell::Time(to_utc("t", "2024-01-01T00:00:00Z").unwrap());
        assert_eq!(key_hash(&[a], &[0]), key_hash(&[b], &[0]));
        let a = Cell::Text("a".into());
        let b = Cell::Text("a ".into());
        assert_ne!(key_hash(&[a], &[0]), key_hash(&[b], &[0]));
    }
}
