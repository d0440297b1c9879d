//! CSV files: a header row, per-column type inference, empty = null.
//!
//! Types are inferred per column from the first rows (up to
//! [`SAMPLE_ROWS`]): a column whose values are all integers becomes integers
//! (a value with a leading zero, such as a zip code `007`, keeps the column
//! text), all numbers floats (numbers keep every digit as written, never
//! read through a double), all `true`/`false` booleans; everything else,
//! timestamps included, stays text (the destination recognises RFC 3339
//! timestamps). The sample is held in memory once; after it, rows stream.
//! A row with the wrong number of fields is rejected with both counts.

use std::collections::VecDeque;
use std::io::{BufRead, Read};
use std::sync::Arc;

use serde_json::Value;

use super::sink::{ReadError, Sink};
use crate::record::{stored_raw, value_too_large, Fields, Item, Name, Record, Reject, SourceRef};

/// Rows read before column types are decided.
pub const SAMPLE_ROWS: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CellType {
    /// Seen nothing but empty cells.
    Unknown,
    Integer,
    Float,
    Boolean,
    Text,
}

impl CellType {
    fn of(cell: &str) -> CellType {
        if is_integer(cell) {
            CellType::Integer
        } else if is_float(cell) {
            CellType::Float
        } else if cell.eq_ignore_ascii_case("true") || cell.eq_ignore_ascii_case("false") {
            CellType::Boolean
        } else {
            CellType::Text
        }
    }

    fn join(self, other: CellType) -> CellType {
        use CellType::*;
        match (self, other) {
            (Unknown, t) | (t, Unknown) => t,
            (a, b) if a == b => a,
            (Integer, Float) | (Float, Integer) => Float,
            _ => Text,
        }
    }
}

/// Digits, however many: an integer beyond 64 bits stays an integer and
/// keeps every digit (the destination decides whether a column holds it).
fn is_integer(cell: &str) -> bool {
    let digits = cell.strip_prefix('-').unwrap_or(cell);
    !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !(digits.len() > 1 && digits.starts_with('0'))
}

fn is_float(cell: &str) -> bool {
    let body = cell.strip_prefix('-').unwrap_or(cell);
    let first = body.as_bytes().first().copied();
    // No leading `+`, no `inf`/`nan`, no `007.5`.
    matches!(first, Some(b'0'..=b'9') | Some(b'.'))
        && !(body.len() > 1 && body.starts_with('0') && !body[1..].starts_with('.'))
        && body
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'))
        && cell.parse::<f64>().is_ok_and(f64::is_finite)
}

fn typed(cell: &str, column: CellType) -> Value {
    if cell.is_empty() {
        return Value::Null;
    }
    let column = if column == CellType::Unknown {
        CellType::of(cell)
    } else {
        column
    };
    match column {
        CellType::Integer if is_integer(cell) => json_number(cell, false),
        CellType::Integer => None,
        CellType::Float if is_float(cell) || is_integer(cell) => json_number(cell, true),
        CellType::Float => None,
        CellType::Boolean => match cell.to_ascii_lowercase().as_str() {
            "true" => Some(Value::Bool(true)),
            "false" => Some(Value::Bool(false)),
            _ => None,
        },
        CellType::Text | CellType::Unknown => None,
    }
    // A cell that does not fit its column's type stays text; the destination
    // rejects it if the column cannot hold text.
    .unwrap_or_else(|| Value::String(cell.to_string()))
}

/// The cell as a JSON number with all its digits (`.5` -> `0.5`), never
/// through a double; `as_float` marks a whole number as a float (`5.0`),
/// as the rest of its column is.
fn json_number(cell: &str, as_float: bool) -> Option<Value> {
    let (sign, body) = match cell.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", cell),
    };
    let (mantissa, exponent) = match body.find(['e', 'E']) {
        Some(at) => (&body[..at], &body[at..]),
        None => (body, ""),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let int = if int.is_empty() { "0" } else { int };
    let frac = if frac.is_empty() && as_float && exponent.is_empty() {
        "0"
    } else {
        frac
    };
    let dot = if frac.is_empty() { "" } else { "." };
    let text = format!("{sign}{int}{dot}{frac}{exponent}");
    serde_json::from_str::<serde_json::Number>(&text)
        .ok()
        .filter(|n| n.as_f64().is_some())
        .map(Value::Number)
}

/// Reads a whole CSV file into the reader's batches.
pub(super) fn read_csv(
    reader: &mut impl Sink,
    name: Arc<str>,
    input: impl BufRead,
) -> Result<(), ReadError> {
    let mut csv = csv::ReaderBuilder::new()
        .flexible(true)
        .has_headers(true)
        .from_reader(CrlfEnds::new(input));
    let at = |line: u64| SourceRef::Line {
        path: name.clone(),
        line,
    };
    let headers = match csv.byte_headers() {
        Ok(h) => h.clone(),
        Err(e) => return reject_file(reader, at(1), format!("cannot read the header row: {e}")),
    };
    let mut names = Vec::with_capacity(headers.len());
    for (i, raw) in headers.iter().enumerate() {
        let Ok(text) = std::str::from_utf8(raw) else {
            return reject_file(
                reader,
                at(1),
                format!("header column {} is not valid UTF-8", i + 1),
            );
        };
        let text = text.trim_start_matches('\u{feff}').to_string();
        if text.is_empty() {
            return reject_file(
                reader,
                at(1),
                format!(
                    "header column {} is empty: every column needs a name",
                    i + 1
                ),
            );
        }
        if names.iter().any(|n: &Name| **n == *text) {
            return reject_file(reader, at(1), format!("header names column {text:?} twice"));
        }
        // Made once: every row's fields share the header's names.
        names.push(Name::from(text));
    }

    let mut types = vec![CellType::Unknown; names.len()];
    let mut sample = Vec::new();
    let mut row = csv::ByteRecord::new();
    let mut sampling = true;
    loop {
        let more = match csv.read_byte_record(&mut row) {
            Ok(more) => {
                correct_line(&mut csv, &mut row);
                more
            }
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                if let csv::ErrorKind::Io(_) = e.kind() {
                    return Err(ReadError::Io(std::io::Error::other(e.to_string())));
                }
                flush_sample(reader, &names, &types, &mut sample, &at)?;
                sampling = false;
                reader.push(Item::Reject(Reject::new(
                    at(line),
                    format!("malformed CSV row: {e}"),
                    "",
                )))?;
                continue;
            }
        };
        if sampling && more && sample.len() < super::csv::SAMPLE_ROWS {
            if row.len() == names.len() {
                for (t, cell) in types.iter_mut().zip(row.iter()) {
                    if !cell.is_empty() {
                        if let Ok(text) = std::str::from_utf8(cell) {
                            *t = t.join(CellType::of(text));
                        }
                    }
                }
            }
            sample.push(row.clone());
            continue;
        }
        if sampling {
            flush_sample(reader, &names, &types, &mut sample, &at)?;
            sampling = false;
        }
        if !more {
            return Ok(());
        }
        let item = to_item(&row, &names, &types, &at, reader.max_value_bytes());
        reader.push(item)?;
    }
}

/// Remembers where the line ends (`\r` and `\n` bytes) lie in the input.
/// The csv crate gives a record the position where reading it began, which
/// is before the line ends it skipped first: the `\n` of the `\r\n` that
/// ended the previous line in a CRLF file, and any blank lines. Each `\n`
/// skipped puts the record one line further.
struct CrlfEnds<R> {
    inner: R,
    offset: u64,
    /// Offsets of `\r` and `\n` bytes not yet passed by a record, each
    /// with whether it is a `\n`.
    ends: VecDeque<(u64, bool)>,
}

impl<R> CrlfEnds<R> {
    fn new(inner: R) -> Self {
        CrlfEnds {
            inner,
            offset: 0,
            ends: VecDeque::new(),
        }
    }

    /// How many `\n`s lie in the run of line ends at `offset` (asked with
    /// offsets that only grow).
    fn newlines_at(&mut self, offset: u64) -> u64 {
        while self.ends.front().is_some_and(|&(o, _)| o < offset) {
            self.ends.pop_front();
        }
        (offset..)
            .zip(&self.ends)
            .take_while(|(at, &(o, _))| o == *at)
            .filter(|(_, &(_, newline))| newline)
            .count() as u64
    }
}

impl<R: Read> Read for CrlfEnds<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        for (i, &b) in buf[..n].iter().enumerate() {
            if b == b'\n' || b == b'\r' {
                self.ends.push_back((self.offset + i as u64, b == b'\n'));
            }
        }
        self.offset += n as u64;
        Ok(n)
    }
}

/// Moves a record past the line ends it was read after, so its
/// `file:line` names the line it is on.
fn correct_line<R: Read>(csv: &mut csv::Reader<CrlfEnds<R>>, row: &mut csv::ByteRecord) {
    let Some(mut pos) = row.position().cloned() else {
        return;
    };
    let skipped = csv.get_mut().newlines_at(pos.byte());
    if skipped > 0 {
        let line = pos.line() + skipped;
        pos.set_line(line);
        row.set_position(Some(pos));
    }
}

fn flush_sample(
    reader: &mut impl Sink,
    names: &[Name],
    types: &[CellType],
    sample: &mut Vec<csv::ByteRecord>,
    at: &impl Fn(u64) -> SourceRef,
) -> Result<(), ReadError> {
    let max_value = reader.max_value_bytes();
    for row in sample.drain(..) {
        reader.push(to_item(&row, names, types, at, max_value))?;
    }
    Ok(())
}

fn to_item(
    row: &csv::ByteRecord,
    names: &[Name],
    types: &[CellType],
    at: &impl Fn(u64) -> SourceRef,
    max_value_bytes: Option<usize>,
) -> Item {
    let line = row.position().map_or(0, |p| p.line());
    if row.len() != names.len() {
        return Item::Reject(Reject::new(
            at(line),
            format!(
                "row has {} fields, the header has {}",
                row.len(),
                names.len()
            ),
            raw_row(row),
        ));
    }
    let mut fields = Fields::with_capacity(names.len());
    let mut bytes = 0;
    for ((name, cell), column) in names.iter().zip(row.iter()).zip(types) {
        let Ok(text) = std::str::from_utf8(cell) else {
            let valid = std::str::from_utf8(cell)
                .map_err(|e| e.valid_up_to())
                .err()
                .unwrap_or(0);
            return Item::Reject(Reject::new(
                at(line),
                format!("invalid UTF-8 in column {name:?} at byte {valid}"),
                raw_row(row),
            ));
        };
        // A cell over the limit that stays text (as one that is not a
        // number must) is rejected here, before it is copied into a value
        // and the row into a JSON text; the planner checks the rest.
        if let Some(max) = max_value_bytes.filter(|&max| text.len() > max) {
            if !is_integer(text) && !is_float(text) {
                return Item::Reject(Reject::new(
                    at(line),
                    value_too_large(name, text.len(), max),
                    stored_raw(&raw_row(row)),
                ));
            }
        }
        bytes += text.len();
        fields.insert(name.clone(), typed(text, *column));
    }
    Item::Record(Record {
        fields,
        source: at(line),
        raw_len: bytes,
    })
}

/// A CSV row written back as CSV text, for the rejects table.
fn raw_row(row: &csv::ByteRecord) -> String {
    let mut out = csv::WriterBuilder::new()
        .terminator(csv::Terminator::Any(b'\n'))
        .from_writer(Vec::new());
    let _ = out.write_byte_record(row);
    let bytes = out.into_inner().unwrap_or_default();
    String::from_utf8_lossy(trim_newline(&bytes)).into_owned()
}

fn trim_newline(b: &[u8]) -> &[u8] {
    b.strip_suffix(b"\n").unwrap_or(b)
}

fn reject_file(reader: &mut impl Sink, at: SourceRef, reason: String) -> Result<(), ReadError> {
    reader.push(Item::Reject(Reject::new(
        at,
        format!("{reason}; the file was not read"),
        "",
    )))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zip_codes_with_leading_zeros_stay_text() {
        assert_eq!(CellType::of("007"), CellType::Text);
        assert_eq!(CellType::of("0"), CellType::Integer);
        assert_eq!(CellType::of("-12"), CellType::Integer);
        assert_eq!(CellType::of("1.5"), CellType::Float);
        assert_eq!(CellType::of("0.5"), CellType::Float);
        assert_eq!(CellType::of("inf"), CellType::Text);
        assert_eq!(CellType::of("+5"), CellType::Text);
        assert_eq!(CellType::of("TRUE"), CellType::Boolean);
        assert_eq!(CellType::Integer.join(CellType::Float), CellType::Float);
        assert_eq!(CellType::Integer.join(CellType::Text), CellType::Text);
    }

    #[test]
    fn cells_follow_their_column_type() {
        assert_eq!(typed("", CellType::Integer), Value::Null);
        assert_eq!(typed("42", CellType::Integer), Value::from(42));
        assert_eq!(typed("42", CellType::Text), Value::from("42"));
        assert_eq!(typed("42", CellType::Float), Value::from(42.0));
        assert_eq!(typed("abc", CellType::Integer), Value::from("abc"));
    }

    #[test]
    fn numbers_keep_every_digit() {
        // Issue 15: a CSV integer beyond 64 bits was read as a rounded float.
        let big = "123456789012345678901234567890";
        assert_eq!(CellType::of(big), CellType::Integer);
        assert_eq!(typed(big, CellType::Integer).to_string(), big);
        assert_eq!(typed(big, CellType::Float).to_string(), format!("{big}.0"));
        let long = "0.1000000000000000055511151231257827";
        assert_eq!(typed(long, CellType::Float).to_string(), long);
        assert_eq!(typed(".5", CellType::Float).to_string(), "0.5");
        assert_eq!(typed("-1.5e3", CellType::Float).to_string(), "-1.5e+3");
    }
}
