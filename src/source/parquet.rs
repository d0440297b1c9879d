//! Parquet files (local or objects), read row group by row group.
//!
//! Only one row group's columns are in memory at a time, in batches of at
//! most a chunk of rows. Each row becomes a record, named
//! `file:ROWGROUP:ROW` (both counted from 0, as Parquet tools count them).
//! Values map to JSON as `docs/object-storage.md` lists: nested lists,
//! structs and maps become JSON values; decimals keep every digit (text,
//! or an integer when the scale is 0 and they fit 64 bits); timestamps
//! with a zone become RFC 3339 instants in UTC, without one a local
//! date-time; dates `YYYY-MM-DD`.

use std::io;
use std::ops::Range;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::{Array, ArrayRef, ArrowPrimitiveType, OffsetSizeTrait, RecordBatch};
use arrow_schema::{DataType, TimeUnit};
use chrono::{DateTime, NaiveDate, NaiveTime, SecondsFormat};
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};
use parquet::file::reader::ChunkReader;
use serde_json::{Map, Number, Value};

use super::sink::{ReadError, Sink};
use crate::record::{Fields, Item, Name, Record, SourceRef};

/// Reads every row group of a Parquet file; `open` gives a fresh handle on
/// the same bytes for the footer (no ranges) and for each row group, with
/// the byte ranges of that row group's column chunks (which an object
/// fetches in one go).
pub(super) fn read_parquet<R, F>(
    reader: &mut impl Sink,
    name: Arc<str>,
    open: F,
) -> Result<(), ReadError>
where
    R: ChunkReader + 'static,
    F: Fn(&[Range<u64>]) -> io::Result<R>,
{
    let bad = |e: parquet::errors::ParquetError| {
        io::Error::other(format!("not a readable Parquet file: {e}"))
    };
    let metadata =
        ArrowReaderMetadata::load(&open(&[])?, ArrowReaderOptions::new()).map_err(bad)?;
    let names: Vec<Name> = metadata
        .schema()
        .fields()
        .iter()
        .map(|f| Name::new(f.name()))
        .collect();
    let groups = metadata.metadata().num_row_groups();
    let batch_size = reader.chunk_size().max(1);
    for group in 0..groups {
        let path: Arc<str> = format!("{name}:{group}").into();
        let ranges: Vec<Range<u64>> = metadata
            .metadata()
            .row_group(group)
            .columns()
            .iter()
            .map(|column| {
                let (start, len) = column.byte_range();
                start..start + len
            })
            .collect();
        let batches =
            ParquetRecordBatchReaderBuilder::new_with_metadata(open(&ranges)?, metadata.clone())
                .with_row_groups(vec![group])
                .with_batch_size(batch_size)
                .build()
                .map_err(bad)?;
        let mut row = 0u64;
        for batch in batches {
            let batch = batch.map_err(|e| io::Error::other(format!("row group {group}: {e}")))?;
            for fields in records(&batch, &names).map_err(io::Error::other)? {
                let source = SourceRef::Line {
                    path: path.clone(),
                    line: row,
                };
                row += 1;
                reader.push(Item::Record(Record {
                    fields,
                    source,
                    raw_len: usize::MAX,
                }))?;
            }
        }
    }
    Ok(())
}

/// The rows of a batch as records.
fn records(batch: &RecordBatch, names: &[Name]) -> Result<Vec<Fields>, String> {
    let mut columns = Vec::with_capacity(batch.num_columns());
    for (name, array) in names.iter().zip(batch.columns()) {
        let values =
            values(array.as_ref()).map_err(|e| format!("column {:?}: {e}", name.as_str()))?;
        columns.push(values.into_iter());
    }
    let mut rows = Vec::with_capacity(batch.num_rows());
    for _ in 0..batch.num_rows() {
        let mut fields = Fields::with_capacity(names.len());
        for (name, column) in names.iter().zip(columns.iter_mut()) {
            fields.insert(name.clone(), column.next().unwrap_or(Value::Null));
        }
        rows.push(fields);
    }
    Ok(rows)
}

/// Every value of a column, nulls as `null`.
fn values(array: &dyn Array) -> Result<Vec<Value>, String> {
    let len = array.len();
    let out: Vec<Value> = match array.data_type() {
        DataType::Null => vec![Value::Null; len],
        DataType::Boolean => {
            let a = array.as_boolean();
            (0..len).map(|i| Value::Bool(a.value(i))).collect()
        }
        DataType::Int8 => primitive::<Int8Type>(array, |v| v.into()),
        DataType::Int16 => primitive::<Int16Type>(array, |v| v.into()),
        DataType::Int32 => primitive::<Int32Type>(array, |v| v.into()),
        DataType::Int64 => primitive::<Int64Type>(array, |v| v.into()),
        DataType::UInt8 => primitive::<UInt8Type>(array, |v| v.into()),
        DataType::UInt16 => primitive::<UInt16Type>(array, |v| v.into()),
        DataType::UInt32 => primitive::<UInt32Type>(array, |v| v.into()),
        DataType::UInt64 => primitive::<UInt64Type>(array, |v| v.into()),
        DataType::Float16 => primitive::<Float16Type>(array, |v| float32(v.to_f32())),
        DataType::Float32 => primitive::<Float32Type>(array, float32),
        DataType::Float64 => primitive::<Float64Type>(array, float64),
        DataType::Utf8 => strings(array.as_string::<i32>().iter()),
        DataType::LargeUtf8 => strings(array.as_string::<i64>().iter()),
        DataType::Utf8View => strings(array.as_string_view().iter()),
        DataType::Binary => binaries(array.as_binary::<i32>().iter()),
        DataType::LargeBinary => binaries(array.as_binary::<i64>().iter()),
        DataType::BinaryView => binaries(array.as_binary_view().iter()),
        DataType::FixedSizeBinary(_) => binaries(array.as_fixed_size_binary().iter()),
        DataType::Date32 => primitive::<Date32Type>(array, |days| {
            date(i64::from(days) * 86_400_000)
        }),
        DataType::Date64 => primitive::<Date64Type>(array, date),
        DataType::Time32(TimeUnit::Second) => {
            primitive::<Time32SecondType>(array, |v| time(i64::from(v) * 1_000_000_000))
        }
        DataType::Time32(_) => {
            primitive::<Time32MillisecondType>(array, |v| time(i64::from(v) * 1_000_000))
        }
        DataType::Time64(TimeUnit::Microsecond) => {
            primitive::<Time64MicrosecondType>(array, |v| time(v * 1_000))
        }
        DataType::Time64(_) => primitive::<Time64NanosecondType>(array, time),
        DataType::Timestamp(unit, zone) => {
            let zoned = zone.is_some();
            match unit {
                TimeUnit::Second => primitive::<TimestampSecondType>(array, |v| {
                    timestamp(i128::from(v) * 1_000_000_000, zoned)
                }),
                TimeUnit::Millisecond => primitive::<TimestampMillisecondType>(array, |v| {
                    timestamp(i128::from(v) * 1_000_000, zoned)
                }),
                TimeUnit::Microsecond => primitive::<TimestampMicrosecondType>(array, |v| {
                    timestamp(i128::from(v) * 1_000, zoned)
                }),
                TimeUnit::Nanosecond => primitive::<TimestampNanosecondType>(array, |v| {
                    timestamp(i128::from(v), zoned)
                }),
            }
        }
        DataType::Decimal32(p, s) => decimals::<Decimal32Type>(array, *p, *s),
        DataType::Decimal64(p, s) => decimals::<Decimal64Type>(array, *p, *s),
        DataType::Decimal128(p, s) => decimals::<Decimal128Type>(array, *p, *s),
        DataType::Decimal256(p, s) => decimals::<Decimal256Type>(array, *p, *s),
        DataType::List(_) => lists(array.as_list::<i32>())?,
        DataType::LargeList(_) => lists(array.as_list::<i64>())?,
        DataType::FixedSizeList(_, size) => {
            let a = array.as_fixed_size_list();
            let size = (*size).max(0) as usize;
            let mut items = values(a.values().as_ref())?.into_iter();
            (0..len)
                .map(|_| Value::Array(items.by_ref().take(size).collect()))
                .collect()
        }
        DataType::Struct(fields) => {
            let a = array.as_struct();
            let mut children = Vec::with_capacity(fields.len());
            for (field, child) in fields.iter().zip(a.columns()) {
                let child = values(child.as_ref()).map_err(|e| format!("{}: {e}", field.name()))?;
                children.push((field.name().clone(), child.into_iter()));
            }
            (0..len)
                .map(|_| {
                    let mut object = Map::with_capacity(children.len());
                    for (name, child) in children.iter_mut() {
                        object.insert(name.clone(), child.next().unwrap_or(Value::Null));
                    }
                    Value::Object(object)
                })
                .collect()
        }
        DataType::Map(_, _) => {
            let a = array.as_map();
            let keys = values(a.keys().as_ref())?;
            let items = values(a.values().as_ref())?.into_iter();
            let offsets = a.value_offsets();
            // A sliced map's entries begin at its first offset.
            let start = offsets.first().map_or(0, |o| (*o).max(0) as usize);
            let mut keys = keys.into_iter().skip(start);
            let mut items = items.skip(start);
            (0..len)
                .map(|i| {
                    let n = (offsets[i + 1] - offsets[i]).max(0) as usize;
                    let mut object = Map::with_capacity(n);
                    for _ in 0..n {
                        let key = match keys.next() {
                            Some(Value::String(s)) => s,
                            Some(other) => other.to_string(),
                            None => String::new(),
                        };
                        object.insert(key, items.next().unwrap_or(Value::Null));
                    }
                    Value::Object(object)
                })
                .collect()
        }
        DataType::Dictionary(_, _) => {
            let Some(a) = array.as_any_dictionary_opt() else {
                return Err(format!("type {} is not supported", array.data_type()));
            };
            let dictionary = values(a.values().as_ref())?;
            a.normalized_keys()
                .into_iter()
                .map(|k| dictionary.get(k).cloned().unwrap_or(Value::Null))
                .collect()
        }
        other => {
            return Err(format!(
                "type {other} is not supported (supported: numbers, booleans, strings, binary, decimals, dates, times, timestamps, lists, structs, maps, dictionaries)"
            ))
        }
    };
    // Nulls are applied here once for every type (a struct or list slot
    // that is null is null, whatever its children hold).
    if array.null_count() == 0 {
        return Ok(out);
    }
    Ok(out
        .into_iter()
        .enumerate()
        .map(|(i, v)| if array.is_null(i) { Value::Null } else { v })
        .collect())
}

fn primitive<T: ArrowPrimitiveType>(
    array: &dyn Array,
    f: impl Fn(T::Native) -> Value,
) -> Vec<Value> {
    array
        .as_primitive::<T>()
        .values()
        .iter()
        .map(|&v| f(v))
        .collect()
}

fn strings<'a>(iter: impl Iterator<Item = Option<&'a str>>) -> Vec<Value> {
    iter.map(|v| v.map_or(Value::Null, |s| Value::String(s.to_string())))
        .collect()
}

/// Binary values as lowercase hex text.
fn binaries<'a>(iter: impl Iterator<Item = Option<&'a [u8]>>) -> Vec<Value> {
    iter.map(|v| v.map_or(Value::Null, |b| Value::String(hex::encode(b))))
        .collect()
}

/// A float32 as the shortest decimal that reads back as it (0.1, not
/// 0.10000000149011612).
fn float32(v: f32) -> Value {
    if !v.is_finite() {
        return Value::String(v.to_string());
    }
    v.to_string()
        .parse::<f64>()
        .ok()
        .and_then(Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

/// A non-finite float has no JSON number: it stays text (`NaN`, `inf`).
fn float64(v: f64) -> Value {
    Number::from_f64(v).map_or_else(|| Value::String(v.to_string()), Value::Number)
}

fn date(millis: i64) -> Value {
    DateTime::from_timestamp_millis(millis)
        .map(|t| t.date_naive())
        .map_or(Value::Null, |d: NaiveDate| Value::String(d.to_string()))
}

fn time(nanos: i64) -> Value {
    let secs = nanos.div_euclid(1_000_000_000);
    let frac = nanos.rem_euclid(1_000_000_000);
    NaiveTime::from_num_seconds_from_midnight_opt(secs as u32, frac as u32)
        .map_or(Value::Null, |t| Value::String(t.to_string()))
}

/// A timestamp in nanoseconds since the epoch: with a zone an RFC 3339
/// instant in UTC, without one a local date-time (no offset).
fn timestamp(nanos: i128, zoned: bool) -> Value {
    let secs = nanos.div_euclid(1_000_000_000);
    let frac = nanos.rem_euclid(1_000_000_000) as u32;
    let Some(at) = i64::try_from(secs)
        .ok()
        .and_then(|s| DateTime::from_timestamp(s, frac))
    else {
        return Value::Null;
    };
    Value::String(if zoned {
        at.to_rfc3339_opts(SecondsFormat::AutoSi, true)
    } else {
        // `%Y-%m-%dT%H:%M:%S%.f`, by the types' own Display (a format
        // string is parsed again for every value: a sixth of a load's time).
        let at = at.naive_utc();
        format!("{}T{}", at.date(), at.time())
    })
}

/// Decimals keep every digit: an integer when the scale is 0 and the
/// precision fits 64 bits, else text.
fn decimals<T>(array: &dyn Array, precision: u8, scale: i8) -> Vec<Value>
where
    T: arrow_array::types::DecimalType,
{
    let a = array.as_primitive::<T>();
    let integer = scale == 0 && precision <= 18;
    (0..a.len())
        .map(|i| {
            let text = a.value_as_string(i);
            match integer.then(|| text.parse::<i64>().ok()).flatten() {
                Some(n) => Value::from(n),
                None => Value::String(text),
            }
        })
        .collect()
}

fn lists<O: OffsetSizeTrait>(a: &arrow_array::GenericListArray<O>) -> Result<Vec<Value>, String> {
    let child: &ArrayRef = a.values();
    let offsets = a.value_offsets();
    let first = offsets.first().map_or(0, |o| o.as_usize());
    let last = offsets.last().map_or(0, |o| o.as_usize());
    let mut items = values(child.slice(first, last - first).as_ref())?.into_iter();
    Ok((0..a.len())
        .map(|i| {
            let n = offsets[i + 1].as_usize() - offsets[i].as_usize();
            Value::Array(items.by_ref().take(n).collect())
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_keep_their_instant_digits_and_date() {
        assert_eq!(float32(0.1), serde_json::json!(0.1));
        assert_eq!(date(-86_400_000), "1969-12-31");
        assert_eq!(time(3_723_500_000_000), "01:02:03.500");
        assert_eq!(
            timestamp(1_714_521_600_123_456_789, true),
            "2024-05-01T00:00:00.123456789Z"
        );
        assert_eq!(
            timestamp(1_714_521_600_000_000_000, false),
            "2024-05-01T00:00:00"
        );
        assert_eq!(
            timestamp(1_714_521_600_120_000_000, false),
            "2024-05-01T00:00:00.120"
        );
        assert_eq!(
            timestamp(1_714_521_600_000_001_000, false),
            "2024-05-01T00:00:00.000001"
        );
        assert_eq!(time(3_723_000_000_007), "01:02:03.000000007");
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(timestamp(-1_000_000_000, true), "1969-12-31T23:59:59Z");
    }
}
