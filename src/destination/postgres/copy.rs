//! The binary COPY of a batch into its temporary table.
//!
//! Rows are encoded straight from checked [`SqlValue`]s into PostgreSQL's
//! binary COPY format (no text escaping, no per-value trait objects) and
//! sent in large chunks. Encoding happens before anything is sent, so a
//! value that cannot be encoded is a reject, not a failed batch.

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::SinkExt;
use tokio_postgres::Transaction;

use super::pg_error;
use serde_json::Value;

use super::types::{PgColumn, Stage};
use crate::destination::schema::{ColumnType, SqlValue};
use crate::error::Result;
use crate::key::parse_instant;
use crate::record::Fields;

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

    /// Encodes one row straight from its record: `flags` first (booleans,
    /// `None` as null), then each column's value, checked exactly as
    /// [`PgColumn::convert`] does but without copying text. On error nothing
    /// of the row is kept.
    pub(super) fn push_record(
        &mut self,
        flags: &[Option<bool>],
        columns: &[PgColumn],
        fields: &Fields,
    ) -> std::result::Result<(), String> {
        let start = self.buf.len();
        self.buf.put_i16((flags.len() + columns.len()) as i16);
        for flag in flags {
            match flag {
                Some(b) => {
                    self.buf.put_i32(1);
                    self.buf.put_u8(*b as u8);
                }
                None => self.buf.put_i32(-1),
            }
        }
        for column in columns {
            let value = fields.get(&column.name).unwrap_or(&Value::Null);
            if let Err(e) = self.put_value(column, value) {
                self.buf.truncate(start);
                return Err(e);
            }
        }
        self.rows += 1;
        if self.buf.len() >= CHUNK {
            self.chunks.push(self.buf.split().freeze());
        }
        Ok(())
    }

    fn put_value(&mut self, column: &PgColumn, value: &Value) -> std::result::Result<(), String> {
        let buf = &mut self.buf;
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
                if let Some(f) = n.as_f64() {
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
        encode(buf, column.stage(), &converted)
    }

    /// Sends every row into `table (columns)`; returns the rows copied.
    pub(super) async fn send(
        mut self,
        tx: &Transaction<'_>,
        table: &str,
        columns: &str,
    ) -> Result<u64> {
        self.buf.put_i16(-1);
        self.chunks.push(self.buf.split().freeze());
        let context = format!("copy into {table}");
        let sink = tx
            .copy_in::<_, Bytes>(&format!(
                "COPY {table} ({columns}) FROM STDIN (FORMAT binary)"
            ))
            .await
            .map_err(pg_error(context.clone()))?;
        futures_util::pin_mut!(sink);
        for chunk in self.chunks {
            sink.feed(chunk).await.map_err(pg_error(context.clone()))?;
        }
        sink.as_mut().finish().await.map_err(pg_error(context))
    }
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
        let mut copy = CopyBuffer::new();
        let before = copy.buf.len();
        let bad = serde_json::json!({"id": 1, "at": "nope"});
        let err = copy.push_record(&[Some(false)], &columns, bad.as_object().unwrap());
        assert!(err.unwrap_err().contains("not an RFC 3339 timestamp"));
        assert_eq!(copy.buf.len(), before);
        assert_eq!(copy.rows, 0);
        let good = serde_json::json!({"id": 1, "at": "2000-01-01T00:00:00Z"});
        copy.push_record(&[None], &columns, good.as_object().unwrap())
            .unwrap();
        // count, flag (null), id, at
        assert_eq!(copy.buf.len() - before, 2 + 4 + (4 + 8) + (4 + 8));
    }
}
