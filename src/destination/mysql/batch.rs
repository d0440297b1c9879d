//! A batch as MySQL sees it: every value converted for its column in Rust
//! (a value that does not fit is a reject, never a failed statement), one
//! row per key as the database compares keys, and the rows loaded into the
//! temporary table `_idemload_batch` with `LOAD DATA LOCAL INFILE` from
//! memory, or multi-row `INSERT`s where the server refuses local files.

use std::collections::HashMap;
use std::io::Write as _;

use bytes::Bytes;
use chrono::{DateTime, Datelike, NaiveDateTime, Timelike, Utc};
use futures_util::StreamExt;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Params, Value as MyValue};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::ddl::{Limit, SqlColumn, Table};
use crate::batch::Row;
use crate::destination::schema::{key_positions, ColumnType, SqlValue};
use crate::destination::seen::KeyFilter;
use crate::destination::sql::quote_mysql as q;
use crate::destination::Target;
use crate::error::Result;
use crate::key::Cursor;
use crate::record::Reject;
use crate::stats::RunStats;

/// The temporary table a batch is loaded into.
pub(super) const BATCH: &str = "_idemload_batch";

/// A value ready for MySQL.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Cell {
    Null,
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(String),
    /// UTC, to the microsecond.
    Time(NaiveDateTime),
}

/// A converted row.
pub(super) struct Prepared {
    cells: Vec<Cell>,
    /// Identity of the key as the database sees it (first 16 bytes of a
    /// SHA-256 of the converted key values).
    rk: [u8; 16],
    delete: bool,
    cursor: Option<Cursor>,
}

impl Prepared {
    /// The integer in column `at`, when it holds one.
    pub(super) fn int(&self, at: usize) -> Option<i64> {
        match self.cells.get(at) {
            Some(Cell::Int(i)) => Some(*i),
            _ => None,
        }
    }

    pub(super) fn deletes(&self) -> bool {
        self.delete
    }
}

/// Converts every row for its columns, and keeps one row per key as the
/// database sees it (two timestamps with different offsets can be one
/// instant): the greatest cursor wins, a tie goes to the later row.
pub(super) fn prepare(
    schema: &Table,
    target: &Target,
    table: &str,
    rows: Vec<Row>,
    rejects: &mut Vec<Reject>,
    stats: &mut RunStats,
) -> Result<Vec<Prepared>> {
    let keys = key_positions(table, &schema.names(), &target.key_columns)?;
    let mut out: Vec<Prepared> = Vec::with_capacity(rows.len());
    let mut index: HashMap<[u8; 16], usize> = HashMap::with_capacity(rows.len());
    for row in rows {
        let cells = match convert(schema, &row) {
            Ok(cells) => cells,
            Err(reason) => {
                stats.rejected += 1;
                rejects.push(row.reject(reason));
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
        if let Some(cell) = exact_number(column, value)? {
            cells.push(cell);
            continue;
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

/// A number for a `DECIMAL(p,s)` column, written with the column's scale
/// (as MySQL prints it back), or a reject when its digits do not fit: MySQL
/// would round them. A JSON value with a number MySQL's own JSON type
/// would round to a double is a reject too (MariaDB's JSON is text and
/// keeps every digit). `None` for anything else.
fn exact_number(column: &SqlColumn, value: &Value) -> std::result::Result<Option<Cell>, String> {
    let definition = column.definition.to_ascii_lowercase();
    match (column.ty, value) {
        (ColumnType::Decimal, Value::Number(n)) => {
            let (precision, scale) = decimal_size(&definition);
            let shown = crate::number::shorten(n.as_str());
            let decimal = crate::number::Decimal::parse(n.as_str())
                .ok_or_else(|| format!("value {shown} of field {:?} is not a number", column.name))?;
            let whole = precision.saturating_sub(scale) as i64;
            if decimal.integer_digits() > whole || decimal.fraction_digits() > scale as i64 {
                return Err(format!(
                    "value {shown} of field {:?} has more digits than the column's type {} holds exactly",
                    column.name,
                    definition.split(' ').next().unwrap_or(&definition)
                ));
            }
            if decimal.is_negative() && definition.contains("unsigned") {
                return Err(format!(
                    "value {shown} of field {:?} is negative, but the column is unsigned",
                    column.name
                ));
            }
            Ok(Some(Cell::Text(decimal.plain(scale))))
        }
        (ColumnType::Json, _) if definition.starts_with("json") => {
            match crate::number::first_beyond_64_bits(value) {
                Some(n) => Err(format!(
                    "value of field {:?} holds the number {}, which a MySQL JSON column would round to a double",
                    column.name,
                    crate::number::shorten(n.as_str())
                )),
                None => Ok(None),
            }
        }
        _ => Ok(None),
    }
}

/// Precision and scale of `decimal(p,s)` (MySQL's defaults: 10 and 0).
fn decimal_size(definition: &str) -> (usize, usize) {
    let inside = definition
        .split_once('(')
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(inside, _)| inside);
    let mut parts = inside
        .unwrap_or("")
        .split(',')
        .map(|p| p.trim().parse::<usize>().ok());
    let precision = parts.next().flatten().unwrap_or(10);
    let scale = parts.next().flatten().unwrap_or(0);
    (precision, scale)
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

/// (Re)creates `_idemload_batch` for `schema` and loads the rows into it,
/// each with its key's identity, its delete flag and whether its key was
/// already written by the run (`dup`, when the run keeps its keys in
/// memory; else always 0 and the run's key table decides).
///
/// The table has no index: rows are unique by key already, every statement
/// scans it once and probes the target's primary key, and rows stay in
/// input order, which keeps those probes close together.
pub(super) async fn load(
    conn: &mut Conn,
    local_infile: &mut bool,
    schema: &Table,
    rows: &[(&Prepared, bool)],
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
            `_idemload_del` TINYINT NOT NULL DEFAULT 0,
            `_idemload_dup` TINYINT NOT NULL DEFAULT 0) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4"
    ))
    .await?;
    send(conn, local_infile, &b, schema, rows.len(), |i| {
        let (row, dup) = rows[i];
        let extra = vec![
            MyValue::Bytes(row.rk.to_vec()),
            MyValue::Int(row.delete as i64),
            MyValue::Int(dup as i64),
        ];
        (row, extra)
    })
    .await
}

/// Loads rows straight into `table`, columns only: rows whose keys the
/// table cannot hold yet (it was empty when the run began, and the run has
/// not met them).
pub(super) async fn load_into(
    conn: &mut Conn,
    local_infile: &mut bool,
    table: &str,
    schema: &Table,
    rows: &[&Prepared],
) -> std::result::Result<(), mysql_async::Error> {
    send(conn, local_infile, &q(table), schema, rows.len(), |i| {
        (rows[i], Vec::new())
    })
    .await
}

/// Sends `count` rows into `into`: each row's cells, then the extra
/// bookkeeping values `row(i)` gives (`_idemload_rk`, `_idemload_del`,
/// `_idemload_dup`, in that order, or none). `LOAD DATA LOCAL` from memory
/// where the server allows it, multi-row `INSERT`s where it does not.
async fn send<'a>(
    conn: &mut Conn,
    local_infile: &mut bool,
    into: &str,
    schema: &Table,
    count: usize,
    row: impl Fn(usize) -> (&'a Prepared, Vec<MyValue>),
) -> std::result::Result<(), mysql_async::Error> {
    const EXTRA: [&str; 3] = ["`_idemload_rk`", "`_idemload_del`", "`_idemload_dup`"];
    let extra = if count == 0 { 0 } else { row(0).1.len() };
    let cols = schema.column_list("");
    if *local_infile {
        let mut buf = Vec::with_capacity(count * (schema.columns.len() * 12 + 40));
        for i in 0..count {
            let (prepared, values) = row(i);
            for (n, cell) in prepared.cells.iter().enumerate() {
                if n > 0 {
                    buf.push(b'\t');
                }
                encode_cell(&mut buf, cell);
            }
            for value in values {
                buf.push(b'\t');
                match value {
                    MyValue::Bytes(b) => buf.extend_from_slice(hex::encode(b).as_bytes()),
                    MyValue::Int(v) => {
                        let _ = write!(buf, "{v}");
                    }
                    _ => unreachable!("bookkeeping values are bytes or integers"),
                }
            }
            buf.push(b'\n');
        }
        let (targets, set) = match extra {
            0 => (cols.clone(), String::new()),
            n => (
                format!("{cols}, @rk, {}", EXTRA[1..n].join(", ")),
                format!(" SET {} = UNHEX(@rk)", EXTRA[0]),
            ),
        };
        let data = Bytes::from(buf);
        conn.set_infile_handler(async move { Ok(futures_util::stream::iter([Ok(data)]).boxed()) });
        let loaded = conn
            .query_drop(format!(
                r"LOAD DATA LOCAL INFILE 'idemload-batch' INTO TABLE {into} CHARACTER SET utf8mb4
                  FIELDS TERMINATED BY '\t' ESCAPED BY '\\' LINES TERMINATED BY '\n'
                  ({targets}){set}"
            ))
            .await;
        match loaded {
            Ok(()) => return check_warnings(conn).await,
            // Local files refused by the server or this client: INSERT
            // instead. A refused load has loaded nothing (the refusal comes
            // before any data is sent), so there is nothing to clear first.
            Err(mysql_async::Error::Server(e)) if matches!(e.code, 1148 | 3948 | 2068) => {
                tracing::info!(
                    code = e.code,
                    "LOAD DATA LOCAL refused; loading with INSERT."
                );
                *local_infile = false;
            }
            Err(e) => return Err(e),
        }
    }
    let per_row = schema.columns.len() + extra;
    let chunk = (60_000 / per_row).clamp(1, 2_000);
    let row_marks = format!("({})", vec!["?"; per_row].join(", "));
    let targets = std::iter::once(cols.as_str())
        .chain(EXTRA[..extra].iter().copied())
        .collect::<Vec<_>>()
        .join(", ");
    let mut start = 0;
    while start < count {
        let end = (start + chunk).min(count);
        let mut params = Vec::with_capacity((end - start) * per_row);
        for i in start..end {
            let (prepared, values) = row(i);
            params.extend(prepared.cells.iter().map(to_mysql));
            params.extend(values);
        }
        conn.exec_drop(
            format!(
                "INSERT INTO {into} ({targets}) VALUES {}",
                vec![row_marks.as_str(); end - start].join(", ")
            ),
            Params::Positional(params),
        )
        .await?;
        start = end;
    }
    Ok(())
}

/// The stored rows with these integer keys (in column `key_at`), read
/// through the binary protocol, so each value comes back exactly as stored:
/// one range scan of the primary key when the keys are dense, else an
/// `IN` list.
pub(super) async fn stored_rows(
    conn: &mut Conn,
    table: &str,
    schema: &Table,
    key_at: usize,
    keys: &[i64],
) -> std::result::Result<HashMap<i64, Vec<MyValue>>, mysql_async::Error> {
    let Some(filter) = KeyFilter::of(keys) else {
        return Ok(HashMap::new());
    };

    let cols = schema.column_list("");
    let key = q(&schema.columns[key_at].name);
    let filter = match filter {
        KeyFilter::Range(lo, hi) => format!("{key} BETWEEN {lo} AND {hi}"),
        KeyFilter::List(list) => format!("{key} IN ({list})"),
    };
    let rows: Vec<mysql_async::Row> = conn
        .exec(
            format!("SELECT {cols} FROM {} WHERE {filter}", q(table)),
            (),
        )
        .await?;
    let mut stored = HashMap::with_capacity(rows.len());
    for row in rows {
        let values = row.unwrap();
        let key = match values.get(key_at) {
            Some(MyValue::Int(i)) => *i,
            Some(MyValue::UInt(u)) => match i64::try_from(*u) {
                Ok(i) => i,
                Err(_) => continue,
            },
            _ => continue,
        };
        stored.insert(key, values);
    }
    Ok(stored)
}

impl Prepared {
    /// True when the stored values are exactly the ones this row would
    /// write. Conservative: a value that merely compares equal in SQL
    /// (`-0` and `0`, a padded `CHAR`) is "different" here and goes to the
    /// classifying statement, which decides.
    pub(super) fn same_as(&self, stored: &[MyValue]) -> bool {
        self.cells.len() == stored.len()
            && self
                .cells
                .iter()
                .zip(stored)
                .all(|(cell, value)| match (cell, value) {
                    (Cell::Null, MyValue::NULL) => true,
                    (Cell::Int(i), MyValue::Int(j)) => i == j,
                    (Cell::Int(i), MyValue::UInt(u)) => u64::try_from(*i) == Ok(*u),
                    (Cell::Float(f), MyValue::Double(d)) => f.to_bits() == d.to_bits(),
                    (Cell::Bool(b), MyValue::Int(i)) => *b as i64 == *i,
                    (Cell::Text(s), MyValue::Bytes(b)) => s.as_bytes() == b.as_slice(),
                    (Cell::Time(_), MyValue::Date(..)) => to_mysql(cell) == *value,
                    _ => false,
                })
    }
}

/// `LOAD DATA LOCAL` turns bad values into warnings: values were checked
/// already, so any warning is a real problem, not something to keep.
async fn check_warnings(conn: &mut Conn) -> std::result::Result<(), mysql_async::Error> {
    if conn.get_warnings() == 0 {
        return Ok(());
    }
    let warnings: Vec<(String, u32, String)> = conn.query("SHOW WARNINGS LIMIT 3").await?;
    // A key another writer stored meanwhile: the row was skipped. Said as
    // the server says it for an INSERT, so the writer can merge instead.
    if let Some((_, code, message)) = warnings.iter().find(|(_, code, _)| *code == 1062) {
        return Err(mysql_async::Error::Server(mysql_async::ServerError {
            code: *code as u16,
            message: message.clone(),
            state: "23000".into(),
        }));
    }
    let text = warnings
        .into_iter()
        .map(|(level, code, message)| format!("{level} {code}: {message}"))
        .collect::<Vec<_>>()
        .join("; ");
    Err(mysql_async::Error::Other(
        format!("loading the batch gave warnings: {text}").into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_columns_take_exact_digits_or_reject_them() {
        let column = |definition: &str, ty| SqlColumn {
            name: "amount".into(),
            ty,
            definition: definition.into(),
            limit: None,
        };
        let number = |text: &str| -> Value { serde_json::from_str(text).unwrap() };
        let wide = column("decimal(65,30)", ColumnType::Decimal);
        assert_eq!(
            exact_number(&wide, &number("18446744073709551617")).unwrap(),
            Some(Cell::Text(format!(
                "18446744073709551617.{}",
                "0".repeat(30)
            )))
        );
        let err = exact_number(&wide, &number("0.1000000000000000055511151231257827")).unwrap_err();
        assert!(
            err.contains("0.1000000000000000055511151231257827"),
            "{err}"
        );
        assert!(err.contains("decimal(65,30)"), "{err}");
        let money = column("decimal(10,2) unsigned", ColumnType::Decimal);
        assert_eq!(
            exact_number(&money, &number("12.5")).unwrap(),
            Some(Cell::Text("12.50".into()))
        );
        assert!(exact_number(&money, &number("123456789.5")).is_err());
        assert!(exact_number(&money, &number("-1")).is_err());
        // MySQL's JSON keeps doubles and 64-bit integers; MariaDB's is text.
        let json = column("json", ColumnType::Json);
        let nested = number(r#"{"a":123456789012345678901234567890}"#);
        assert!(exact_number(&json, &nested).is_err());
        assert!(exact_number(&json, &number(r#"{"a":9007199254740993}"#))
            .unwrap()
            .is_none());
        let mariadb = column("longtext", ColumnType::Json);
        assert!(exact_number(&mariadb, &nested).unwrap().is_none());
    }

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
