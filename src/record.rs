//! Records, where they came from, and rejected input.
//!
//! A [`Record`] is a JSON object read from a source, carrying its
//! [`SourceRef`] (`file:line` or `url#page:index`) so that every later
//! decision about it (rejected, superseded, skipped) can name it. A bad
//! record is data, not an error: it becomes a [`Reject`] and the run goes on
//! (guarantee 5 of the spec).

use std::fmt;
use std::sync::Arc;

pub use crate::fields::{Fields, Name};

/// Where a record was read: `exports/a.jsonl:17` or `http://h/v1/x#3:12`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceRef {
    /// A line of a file (1-based; 0 for the file as a whole).
    Line { path: Arc<str>, line: u64 },
    /// The `index`-th record (0-based) of page `page` (1-based) of an URL.
    Page {
        url: Arc<str>,
        page: u64,
        index: u64,
    },
    /// Anything else a library source wants to name.
    Other(Arc<str>),
}

impl fmt::Display for SourceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceRef::Line { path, line } => write!(f, "{path}:{line}"),
            SourceRef::Page { url, page, index } => write!(f, "{url}#{page}:{index}"),
            SourceRef::Other(text) => f.write_str(text),
        }
    }
}

/// One record read from a source.
#[derive(Debug, Clone)]
pub struct Record {
    pub fields: Fields,
    pub source: SourceRef,
    /// Size of the record as read, in bytes; lets the planner skip the
    /// per-value size check for the (usual) small record.
    pub raw_len: usize,
}

impl Record {
    /// A record from a library source.
    pub fn new(fields: Fields, source: SourceRef) -> Record {
        Record {
            fields,
            source,
            raw_len: usize::MAX,
        }
    }

    /// The record as compact JSON, for the rejects table.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.fields).unwrap_or_default()
    }
}

/// Input that could not become a row, with the reason, kept whole in
/// `_idemload_rejects`.
#[derive(Debug, Clone)]
pub struct Reject {
    pub source: SourceRef,
    /// The record's key when it could be read (`["SL-1","2024-05-01"]`).
    pub key: Option<String>,
    pub reason: String,
    /// The raw input (a line, a CSV row, the record as JSON).
    pub raw: String,
}

/// The most of a rejected record's raw text that is stored: a longer one
/// keeps this prefix, its length and its SHA-256, so one huge line can never
/// make the bookkeeping insert exceed what a server accepts (MySQL's
/// `max_allowed_packet`).
pub const STORED_RAW_BYTES: usize = 8 * 1024;

/// A raw record as `_idemload_rejects` stores it: NUL characters (which
/// PostgreSQL text cannot hold) replaced, and cut to [`STORED_RAW_BYTES`]
/// with its length and digest. The same text for the same input, so a
/// record rejected again is recognised.
pub fn stored_raw(raw: &str) -> String {
    let clean = raw.replace('\0', "\u{fffd}");
    if clean.len() <= STORED_RAW_BYTES {
        return clean;
    }
    let mut cut = STORED_RAW_BYTES;
    while !clean.is_char_boundary(cut) {
        cut -= 1;
    }
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(raw.as_bytes()));
    format!(
        "{}… [{} bytes in all, sha256 {digest}]",
        &clean[..cut],
        raw.len()
    )
}

impl Reject {
    pub fn new(source: SourceRef, reason: impl Into<String>, raw: impl Into<String>) -> Reject {
        Reject {
            source,
            key: None,
            reason: reason.into(),
            raw: raw.into(),
        }
    }

    /// Rejects a whole record, naming its key when known.
    pub fn record(record: &Record, key: Option<String>, reason: impl Into<String>) -> Reject {
        Reject {
            source: record.source.clone(),
            key,
            reason: reason.into(),
            raw: record.to_json(),
        }
    }
}

/// What a source yields: a record, or input that could not be one.
#[derive(Debug, Clone)]
pub enum Item {
    Record(Record),
    Reject(Reject),
    /// A record below the run's cursor window, left unparsed by a source
    /// that filters while reading; counted as `skipped`.
    Skipped,
    /// The file source finished a file: every item of it came before. The
    /// mark commits with the batch that carries it (see [`crate::files`]).
    /// Not a record: not counted in `read`.
    FileLoaded(crate::files::LoadedFile),
    /// The file source skipped a file an earlier run loaded completely and
    /// that has not changed since: counted in `files_skipped`.
    FileSkipped,
}

/// Why a field name cannot become a column, if it cannot.
///
/// Names are always quoted in SQL; this rule keeps them portable across
/// SQLite, PostgreSQL and MySQL (63 bytes) and refuses characters that have
/// no business in a column name (quotes, `;`, control characters), so a
/// field such as `x"; DROP TABLE t; --` is rejected with a reason instead of
/// becoming a strange column.
pub fn invalid_column_name(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("empty field name cannot be a column".into());
    }
    if name.len() > 63 {
        return Some(format!(
            "field name {name:?} is {} bytes, more than the 63 a column name may have",
            name.len()
        ));
    }
    if name.starts_with("_idemload") {
        return Some(format!(
            "field name {name:?} uses the reserved prefix _idemload"
        ));
    }
    if let Some(bad) = name.chars().find(|c| {
        !(c.is_alphanumeric()
            || matches!(c, '_' | '-' | '.' | ' ' | '$' | '@' | ':' | '/' | '#' | '+'))
    }) {
        return Some(format!(
            "field name {name:?} cannot be a column: character {bad:?} is not allowed (use letters, digits, space and _ - . $ @ : / # +)"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_refs_read_like_the_spec() {
        let line = SourceRef::Line {
            path: "exports/a.jsonl".into(),
            line: 17,
        };
        assert_eq!(line.to_string(), "exports/a.jsonl:17");
        let page = SourceRef::Page {
            url: "http://h/v1".into(),
            page: 3,
            index: 12,
        };
        assert_eq!(page.to_string(), "http://h/v1#3:12");
    }

    #[test]
    fn injection_shaped_field_names_are_refused() {
        assert!(invalid_column_name("x\"; DROP TABLE contacts; --").is_some());
        assert!(invalid_column_name("").is_some());
        assert!(invalid_column_name("_idemload_key").is_some());
        assert!(invalid_column_name(&"a".repeat(64)).is_some());
        assert_eq!(invalid_column_name("Usage Date-2"), None);
        assert_eq!(invalid_column_name("prénom"), None);
    }
}
