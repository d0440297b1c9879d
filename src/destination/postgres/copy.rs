//! The binary COPY of a batch into its temporary table.
//!
//! Rows are encoded straight from checked [`SqlValue`]s into PostgreSQL's
//! binary COPY format (no text escaping, no per-value trait objects) and
//! sent in large chunks. Encoding happens before anything is sent, so a
//! value that cannot be encoded is a reject, not a failed batch.

use bytes::{BufMut, Bytes, BytesMut};
use std::collections::HashMap;
use std::ops::Range;

use futures_util::{SinkExt, StreamExt};
use tokio_postgres::{CopyOutStream, Transaction};

use super::pg_error;
use super::statements::Statements;
use serde_json::Value;

use super::ddl::{PgColumn, Stage};
use crate::destination::schema::{ColumnType, SqlValue};
use crate::error::{Error, Result};
use crate::key::parse_instant;
use crate::record::{Fields, Name};

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// Bytes sent per COPY message.
const CHUNK: usize = 1 << 20;

/// A batch encoded for `COPY … FROM STDIN (FORMAT binary)`.
pub(super) struct CopyBuffer {
    buf: BytesMut,
    chunks: Vec<Bytes>,
    pub rows: u64,
}

impl CopyBuffer {
    pub(super) fn new() -> CopyBuffer {
        let mut buf = BytesMut::with_capacity(CHUNK + 4096);
        buf.put_slice(b"PGCOPY\n\xff\r\n\0");
        buf.put_i32(0); // flags
        buf.put_i32(0); // header extension
        CopyBuffer {
            buf,
            chunks: Vec::new(),
            rows: 0,
        }
    }

    /// Adds one row: `flags` first (booleans, `None` as null), then its
    /// columns as [`encode_columns`] wrote them.
    pub(super) fn push_encoded(&mut self, flags: &[Option<bool>], columns: usize, encoded: &[u8]) {
        self.buf.put_i16((flags.len() + columns) as i16);
        for flag in flags {
            match flag {
                Some(b) => {
                    self.buf.put_i32(1);
                    self.buf.put_u8(*b as u8);
                }
                None => self.buf.put_i32(-1),
            }
        }
        self.buf.put_slice(encoded);
        self.rows += 1;
        if self.buf.len() >= CHUNK {
            self.chunks.push(self.buf.split().freeze());
        }
    }

    /// Sends every row into `table (columns)`; returns the rows copied.
    pub(super) async fn send(
        mut self,
        tx: &Transaction<'_>,
        statements: &Statements,
        table: &str,
        columns: &str,
    ) -> Result<u64> {
        self.buf.put_i16(-1);
        self.chunks.push(self.buf.split().freeze());
        let context = format!("copy into {table}");
        let statement = statements
            .prepare(
                tx,
                &format!("COPY {table} ({columns}) FROM STDIN (FORMAT binary)"),
            )
            .await
            .map_err(pg_error(context.clone()))?;
        let sink = tx
            .copy_in::<_, Bytes>(&statement)
            .await
            .map_err(pg_error(context.clone()))?;
        futures_util::pin_mut!(sink);
        for chunk in self.chunks {
            sink.feed(chunk).await.map_err(pg_error(context.clone()))?;
        }
        sink.as_mut().finish().await.map_err(pg_error(context))
    }
}

/// Appends each column's value of a record in binary COPY form (length,
/// then bytes; -1 for null), checked exactly as [`PgColumn::convert`] does
/// but without copying text. On error nothing of the row is kept.
///
/// For every stage type but `jsonb` the encoding is canonical: PostgreSQL's
/// binary output of a stored value of the same type is byte-for-byte the
/// same exactly when the values are the same.
pub(super) fn encode_columns(
    buf: &mut BytesMut,
    columns: &[PgColumn],
    fields: &Fields,
    order: &mut ColumnOrder,
) -> std::result::Result<(), String> {
    let start = buf.len();
    let put = |buf: &mut BytesMut, column, value| {
        put_value(buf, column, value).inspect_err(|_| buf.truncate(start))
    };
    if order.matches(columns, fields) {
        for (column, value) in columns.iter().zip(fields.values()) {
            put(buf, column, value)?;
        }
        return Ok(());
    }
    // Otherwise fields mostly come in the table's order still: take them in
    // turn, looking a name up only when the order differs.
    let mut in_order = fields.iter().peekable();
    for column in columns {
        let value = match in_order.next_if(|(name, _)| ***name == *column.name) {
            Some((_, value)) => value,
            None => fields.get(&column.name).unwrap_or(&Value::Null),
        };
        put(buf, column, value)?;
    }
    Ok(())
}

/// The field names of the last record that listed exactly the columns, in
/// their order: a record with the same (interned) names is encoded
/// without comparing a name.
#[derive(Default)]
pub(super) struct ColumnOrder(Vec<Name>);

impl ColumnOrder {
    fn matches(&mut self, columns: &[PgColumn], fields: &Fields) -> bool {
        if fields.len() == self.0.len() && fields.keys().zip(&self.0).all(|(a, b)| a.same(b)) {
            return true;
        }
        let aligned = fields.len() == columns.len()
            && fields.keys().zip(columns).all(|(n, c)| **n == *c.name);
        if aligned {
            self.0.clear();
            self.0.extend(fields.keys().cloned());
        }
        aligned
    }
}

fn put_value(
    buf: &mut BytesMut,
    column: &PgColumn,
    value: &Value,
) -> std::result::Result<(), String> {
    // The common cases of columns idemload creates, without a detour
    // through SqlValue; anything else goes the general way.
    match (column.udt.as_str(), value) {
        (_, Value::Null) => {
            buf.put_i32(-1);
            return Ok(());
        }
        ("int8", Value::Number(n)) if n.is_i64() => {
            buf.put_i32(8);
            buf.put_i64(n.as_i64().unwrap_or_default());
            return Ok(());
        }
        ("float8", Value::Number(n)) if column.ty == ColumnType::Float => {
            if let Some(f) = crate::number::exact_f64(n) {
                buf.put_i32(8);
                buf.put_f64(f);
                return Ok(());
            }
        }
        ("bool", Value::Bool(b)) => {
            buf.put_i32(1);
            buf.put_u8(*b as u8);
            return Ok(());
        }
        ("text", Value::String(s)) if !s.contains('\0') => {
            buf.put_i32(s.len() as i32);
            buf.put_slice(s.as_bytes());
            return Ok(());
        }
        ("timestamptz", Value::String(s)) => {
            if let Some(micros) = timestamp_micros(s) {
                buf.put_i32(8);
                buf.put_i64(micros);
                return Ok(());
            }
        }
        _ => {}
    }
    let converted = column.convert(value)?;
    if let ("jsonb", SqlValue::Json(_)) = (column.udt.as_str(), &converted) {
        // The value checked, written in the form PostgreSQL prints jsonb
        // in, so that an unchanged stored value reads back byte for byte.
        let start = buf.len();
        buf.put_i32(0);
        buf.put_u8(1);
        write_jsonb(buf, value);
        let len = (buf.len() - start - 4) as i32;
        buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
        return Ok(());
    }
    encode(buf, column.stage(), &converted)
}

/// A JSON value as PostgreSQL prints a `jsonb`: object keys ordered by
/// length then bytes, `": "` and `", "` between items, strings escaped as
/// JSON requires (the same escapes PostgreSQL writes). Numbers are written
/// as the canonical JSON (JCS) idemload has always sent, so the stored
/// value is the same, with every digit of a number a double cannot hold
/// (`jsonb` keeps them as `numeric`); where PostgreSQL prints a number differently
/// (`1e+21`), the bytes differ and the row is compared by the database.
fn write_jsonb(buf: &mut BytesMut, value: &Value) {
    match value {
        Value::Null => buf.put_slice(b"null"),
        Value::Bool(b) => buf.put_slice(if *b { b"true" } else { b"false" }),
        Value::Number(n) => buf.put_slice(crate::number::canonical(n).as_bytes()),
        Value::String(s) => write_json_string(buf, s),
        Value::Array(items) => {
            buf.put_u8(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    buf.put_slice(b", ");
                }
                write_jsonb(buf, item);
            }
            buf.put_u8(b']');
        }
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            members.sort_by(|a, b| (a.0.len(), a.0.as_bytes()).cmp(&(b.0.len(), b.0.as_bytes())));
            buf.put_u8(b'{');
            for (i, (key, item)) in members.into_iter().enumerate() {
                if i > 0 {
                    buf.put_slice(b", ");
                }
                write_json_string(buf, key);
                buf.put_slice(b": ");
                write_jsonb(buf, item);
            }
            buf.put_u8(b'}');
        }
    }
}

fn write_json_string(buf: &mut BytesMut, s: &str) {
    // Writing into memory cannot fail.
    let _ = serde_json::to_writer((&mut *buf).writer(), s);
}

fn encode(buf: &mut BytesMut, stage: Stage, value: &SqlValue) -> std::result::Result<(), String> {
    match (stage, value) {
        (_, SqlValue::Null) => buf.put_i32(-1),
        (Stage::Int8, SqlValue::Int(i)) => {
            buf.put_i32(8);
            buf.put_i64(*i);
        }
        (Stage::Float8, SqlValue::Float(f)) => {
            buf.put_i32(8);
            buf.put_f64(*f);
        }
        (Stage::Float8, SqlValue::Int(i)) => {
            buf.put_i32(8);
            buf.put_f64(*i as f64);
        }
        (Stage::Bool, SqlValue::Bool(b)) => {
            buf.put_i32(1);
            buf.put_u8(*b as u8);
        }
        (Stage::Timestamptz, SqlValue::Text(s)) => {
            let micros = timestamp_micros(s).ok_or_else(|| {
                format!("value {s:?} is not an RFC 3339 timestamp PostgreSQL can hold")
            })?;
            buf.put_i32(8);
            buf.put_i64(micros);
        }
        (Stage::Jsonb, SqlValue::Json(s)) => {
            buf.put_i32(s.len() as i32 + 1);
            buf.put_u8(1);
            buf.put_slice(s.as_bytes());
        }
        (Stage::Text, v) => {
            let text = match v {
                SqlValue::Text(s) | SqlValue::Json(s) => std::borrow::Cow::Borrowed(s.as_str()),
                SqlValue::Int(i) => i.to_string().into(),
                SqlValue::Float(f) => f.to_string().into(),
                SqlValue::Bool(b) => b.to_string().into(),
                SqlValue::Null => unreachable!("nulls are encoded above"),
            };
            buf.put_i32(text.len() as i32);
            buf.put_slice(text.as_bytes());
        }
        (stage, v) => return Err(format!("value {v:?} cannot be sent as {}", stage.sql())),
    }
    Ok(())
}

/// Stored rows read back through `COPY (SELECT …) TO STDOUT (FORMAT binary)`,
/// each as its columns' bytes (the form [`encode_columns`] writes), found
/// by the integer key in one of the columns.
pub(super) struct StoredRows {
    data: BytesMut,
    rows: HashMap<i64, Range<usize>, foldhash::fast::RandomState>,
}

/// Where errors of [`StoredRows`] happen.
const READING_STORED: &str = "reading the stored rows of a batch";

impl StoredRows {
    /// The `COPY` that reads the rows of `select` (a `SELECT` of the
    /// table's columns, in order).
    pub(super) fn copy(select: &str) -> String {
        format!("COPY ({select}) TO STDOUT (FORMAT binary)")
    }

    /// Reads the rows of a [`StoredRows::copy`] started on any connection
    /// and keys them by the `bigint` column at `key_at`; `expected` is about
    /// how many bytes of rows may come.
    pub(super) async fn read(
        copy: impl std::future::Future<
            Output = std::result::Result<CopyOutStream, tokio_postgres::Error>,
        >,
        key_at: usize,
        expected: usize,
    ) -> Result<StoredRows> {
        let data = BytesMut::with_capacity(expected + expected / 8 + 64);
        StoredRows::index(StoredRows::collect(copy, data).await?, key_at)
    }

    /// The bytes of a [`StoredRows::copy`], appended to `data`.
    pub(super) async fn collect(
        copy: impl std::future::Future<
            Output = std::result::Result<CopyOutStream, tokio_postgres::Error>,
        >,
        mut data: BytesMut,
    ) -> Result<BytesMut> {
        let stream = copy.await.map_err(pg_error(READING_STORED))?;
        futures_util::pin_mut!(stream);
        while let Some(chunk) = stream.next().await {
            data.extend_from_slice(&chunk.map_err(pg_error(READING_STORED))?);
        }
        Ok(data)
    }

    /// Keys the rows of binary COPY data by the `bigint` column at `key_at`.
    pub(super) fn index(data: BytesMut, key_at: usize) -> Result<StoredRows> {
        let rows = index_rows(&data, key_at).map_err(|e| {
            Error::destination(READING_STORED, format!("unexpected COPY data: {e}"))
        })?;
        Ok(StoredRows { data, rows })
    }

    /// Keys the rows of a `SELECT` of the table's columns in order (read
    /// in binary, as a prepared statement reads them) by the `bigint`
    /// column at `key_at`. Each row is kept as binary COPY would send it:
    /// a binary column value is the same bytes in both.
    pub(super) fn of_rows(rows: &[tokio_postgres::Row], key_at: usize) -> Result<StoredRows> {
        let mut data = BytesMut::with_capacity(rows.len() * 256);
        let mut index = HashMap::default();
        for row in rows {
            let start = data.len();
            let mut key = None;
            for column in 0..row.len() {
                let Raw(value) = row.try_get(column).map_err(pg_error(READING_STORED))?;
                match value {
                    Some(value) => {
                        data.put_i32(value.len() as i32);
                        data.extend_from_slice(value);
                        if column == key_at {
                            key = <[u8; 8]>::try_from(value).ok().map(i64::from_be_bytes);
                        }
                    }
                    None => data.put_i32(-1),
                }
            }
            let key = key.ok_or_else(|| {
                Error::destination(READING_STORED, "a row without its integer key")
            })?;
            index.insert(key, start..data.len());
        }
        Ok(StoredRows { data, rows: index })
    }

    /// The stored columns' bytes of the row with this key.
    pub(super) fn get(&self, key: i64) -> Option<&[u8]> {
        self.rows.get(&key).map(|r| &self.data[r.clone()])
    }
}

/// A column's value as the server sent it in binary (`None` for NULL),
/// whatever its type.
struct Raw<'a>(Option<&'a [u8]>);

impl<'a> tokio_postgres::types::FromSql<'a> for Raw<'a> {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(Some(raw)))
    }

    fn from_sql_null(
        _: &tokio_postgres::types::Type,
    ) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(None))
    }

    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }
}

/// Splits binary COPY data into rows: each row's columns' bytes by the
/// 8-byte integer in column `key_at`.
fn index_rows(
    data: &[u8],
    key_at: usize,
) -> std::result::Result<HashMap<i64, Range<usize>, foldhash::fast::RandomState>, String> {
    const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
    let read_i32 = |at: usize| -> std::result::Result<i32, String> {
        data.get(at..at + 4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| "truncated".to_string())
    };
    if !data.starts_with(SIGNATURE) {
        return Err("no binary COPY signature".into());
    }
    let extension = read_i32(SIGNATURE.len() + 4)?;
    let mut at = SIGNATURE.len() + 8 + usize::try_from(extension).map_err(|_| "bad header")?;
    let mut rows = HashMap::default();
    loop {
        let count = data
            .get(at..at + 2)
            .map(|b| i16::from_be_bytes([b[0], b[1]]))
            .ok_or("truncated")?;
        at += 2;
        if count < 0 {
            return Ok(rows);
        }
        let start = at;
        let mut key = None;
        for column in 0..count as usize {
            let len = read_i32(at)?;
            at += 4;
            if len < 0 {
                continue;
            }
            let value = data.get(at..at + len as usize).ok_or("truncated")?;
            if column == key_at {
                key = <[u8; 8]>::try_from(value).ok().map(i64::from_be_bytes);
            }
            at += len as usize;
        }
        let key = key.ok_or("a row without its integer key")?;
        rows.insert(key, start..at);
    }
}

/// Microseconds since 2000-01-01 UTC, rounded half to even like
/// PostgreSQL's own text input.
fn timestamp_micros(text: &str) -> Option<i64> {
    let nanos = parse_instant(text)?;
    let micros = nanos.div_euclid(1000);
    let rest = nanos.rem_euclid(1000);
    let micros = match rest.cmp(&500) {
        std::cmp::Ordering::Greater => micros + 1,
        std::cmp::Ordering::Equal if micros % 2 != 0 => micros + 1,
        _ => micros,
    };
    i64::try_from(micros).ok()?.checked_sub(PG_EPOCH_MICROS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes a JSON object's fields as a row of `columns`.
    fn encode_json(
        buf: &mut BytesMut,
        columns: &[PgColumn],
        record: Value,
    ) -> std::result::Result<(), String> {
        let fields = Fields::try_from(record).unwrap();
        encode_columns(buf, columns, &fields, &mut ColumnOrder::default())
    }

    #[test]
    fn timestamps_round_like_postgres() {
        assert_eq!(timestamp_micros("2000-01-01T00:00:00Z"), Some(0));
        assert_eq!(timestamp_micros("2000-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(timestamp_micros("2000-01-01T00:00:00.0000015Z"), Some(2));
        assert_eq!(timestamp_micros("2000-01-01T00:00:00.0000025Z"), Some(2));
        assert_eq!(timestamp_micros("1999-12-31T23:59:59.999999Z"), Some(-1));
    }

    #[test]
    fn a_row_that_cannot_be_encoded_leaves_nothing_behind() {
        let columns = [
            PgColumn::new("id", ColumnType::Integer, None),
            PgColumn::new("at", ColumnType::Timestamp, None),
        ];
        let mut buf = BytesMut::from(&b"earlier row"[..]);
        let bad = serde_json::json!({"id": 1, "at": "nope"});
        let err = encode_json(&mut buf, &columns, bad);
        assert!(err.unwrap_err().contains("not an RFC 3339 timestamp"));
        assert_eq!(&buf[..], b"earlier row");
        // Fields in another order than the columns are found by name.
        let good = serde_json::json!({"at": "2000-01-01T00:00:00Z", "id": 1});
        encode_json(&mut buf, &columns, good).unwrap();
        let mut expected = BytesMut::from(&b"earlier row"[..]);
        expected.put_i32(8);
        expected.put_i64(1);
        expected.put_i32(8);
        expected.put_i64(0);
        assert_eq!(buf, expected);
        let mut copy = CopyBuffer::new();
        let before = copy.buf.len();
        copy.push_encoded(&[None], columns.len(), &buf[11..]);
        // count, flag (null), id, at
        assert_eq!(copy.buf.len() - before, 2 + 4 + (4 + 8) + (4 + 8));
        assert_eq!(copy.rows, 1);
    }

    #[test]
    fn stored_rows_are_found_by_key_and_compare_to_their_encoding() {
        let columns = [
            PgColumn::new("v", ColumnType::Text, None),
            PgColumn::new("id", ColumnType::Integer, None),
        ];
        let mut copy = CopyBuffer::new();
        let mut rows = Vec::new();
        for (id, v) in [(7, Some("a")), (-3, None), (1 << 40, Some("long text"))] {
            let mut buf = BytesMut::new();
            let record = serde_json::json!({"id": id, "v": v});
            encode_json(&mut buf, &columns, record).unwrap();
            copy.push_encoded(&[], columns.len(), &buf);
            rows.push((id, buf));
        }
        copy.buf.put_i16(-1);
        let data = copy.buf.split();
        let index = index_rows(&data, 1).unwrap();
        assert_eq!(index.len(), 3);
        for (id, encoded) in rows {
            assert_eq!(&data[index[&id].clone()], &encoded[..], "row {id}");
        }
        assert!(index_rows(&data[..data.len() - 2], 1).is_err());
        assert!(index_rows(b"not copy data", 1).is_err());
    }

    /// Our jsonb text must be PostgreSQL's own printing of the value we
    /// send (its canonical JSON, every digit kept), byte for byte, or rows with JSON
    /// never compare equal; and it must be that same value.
    #[tokio::test]
    async fn jsonb_is_written_as_postgres_prints_it() {
        let Some(url) = super::super::testing::server("jsonb_is_written_as_postgres_prints_it")
        else {
            return;
        };
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let values = [
            serde_json::json!({"bb": 1, "a": [1, 2.5, -0.125, null, true], "ccc": {"z": {}, "y": []}}),
            serde_json::json!({"é": "ü", "e": "quote \" back \\ nl \n tab \t \u{1} \u{7f} 😀", "": 0}),
            serde_json::json!([0.1, 1e-6, 123456789012345678u64, -9007199254740993i64, 2.0]),
            serde_json::json!("plain"),
            serde_json::json!(false),
            serde_json::json!({"dup": {"b": 1, "aa": 2, "a": 3}}),
        ];
        for value in values {
            let mut buf = BytesMut::new();
            write_jsonb(&mut buf, &value);
            let ours = std::str::from_utf8(&buf).unwrap().to_string();
            let sent = crate::number::exact_json(&value);
            let row = client
                .query_one(
                    "SELECT $1::text::jsonb::text, $1::text::jsonb = $2::text::jsonb",
                    &[&sent, &ours],
                )
                .await
                .unwrap();
            let printed: String = row.get(0);
            let same: bool = row.get(1);
            assert!(same, "{ours} is not the value {sent}");
            assert_eq!(ours, printed, "for {value}");
        }
        // A number PostgreSQL prints otherwise: still the same value, only
        // not the same bytes (the database then compares).
        let big = serde_json::json!({"n": 1.5e300});
        let mut buf = BytesMut::new();
        write_jsonb(&mut buf, &big);
        let ours = std::str::from_utf8(&buf).unwrap().to_string();
        let row = client
            .query_one(
                "SELECT $1::text::jsonb::text, $1::text::jsonb = '{\"n\": 1.5e300}'::jsonb",
                &[&ours],
            )
            .await
            .unwrap();
        assert_ne!(row.get::<_, String>(0), ours);
        assert!(row.get::<_, bool>(1));
    }
}
