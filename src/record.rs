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
///
/// A text this function already cut is returned as it is, so a reader may
/// cut a huge raw text as soon as it rejects it (rather than carry it
/// whole to the commit) and the stored text stays the same. The prefix is
/// built without copying the whole text first.
pub fn stored_raw(raw: &str) -> String {
    if is_stored_cut(raw) {
        return raw.to_string();
    }
    let nuls = raw.bytes().filter(|&b| b == 0).count();
    // Each NUL becomes U+FFFD: three bytes for one.
    if raw.len() + 2 * nuls <= STORED_RAW_BYTES {
        return raw.replace('\0', "\u{fffd}");
    }
    let mut prefix = String::with_capacity(STORED_RAW_BYTES);
    for c in raw.chars() {
        let c = if c == '\0' { '\u{fffd}' } else { c };
        if prefix.len() + c.len_utf8() > STORED_RAW_BYTES {
            break;
        }
        prefix.push(c);
    }
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(raw.as_bytes()));
    format!(
        "{prefix}{CUT_MARK}{} bytes in all, sha256 {digest}]",
        raw.len()
    )
}

/// What [`stored_raw`] puts between a cut text's prefix and its length.
const CUT_MARK: &str = "… [";

/// Whether `raw` is what [`stored_raw`] made of a longer text.
fn is_stored_cut(raw: &str) -> bool {
    // The longest tail: the mark, 20 digits, the words and 64 hex digits.
    if raw.len() <= STORED_RAW_BYTES || raw.len() > STORED_RAW_BYTES + 128 {
        return false;
    }
    let Some(at) = raw.rfind(CUT_MARK) else {
        return false;
    };
    let (prefix, tail) = (&raw[..at], &raw[at + CUT_MARK.len()..]);
    let Some((length, digest)) = tail.split_once(" bytes in all, sha256 ") else {
        return false;
    };
    let Some(digest) = digest.strip_suffix(']') else {
        return false;
    };
    prefix.len() <= STORED_RAW_BYTES
        && !prefix.contains('\0')
        && length.parse::<usize>().is_ok()
        && digest.len() == 64
        && digest
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The reason a record is rejected for one value over `max_value_bytes`,
/// whichever part of the run finds it.
pub fn value_too_large(field: &str, size: usize, max: usize) -> String {
    format!(
        "value of field {field:?} is {size} bytes, more than max_value_bytes = {max}: \
         raise max_value_bytes in the pipeline's [load] (up to what the column holds) to load it"
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

    /// A reader may cut a huge raw text when it rejects it; the commit
    /// cuts it again and must store the same text as from the whole one.
    #[test]
    fn stored_raw_cuts_once_whoever_cuts_first() {
        for raw in [
            "x".repeat(STORED_RAW_BYTES),
            "x".repeat(STORED_RAW_BYTES + 1),
            format!("{}\0tail", "é".repeat(STORED_RAW_BYTES)),
            "\0".repeat(STORED_RAW_BYTES),
            "a\0b".into(),
        ] {
            let once = stored_raw(&raw);
            assert!(once.len() <= STORED_RAW_BYTES + 128, "{}", once.len());
            assert!(!once.contains('\0'));
            assert_eq!(stored_raw(&once), once);
        }
        // What the text was before: the cleaned text cut at a character
        // boundary, its length and the digest of the input.
        let raw = format!("\0{}", "ab".repeat(STORED_RAW_BYTES));
        let clean = raw.replace('\0', "\u{fffd}");
        use sha2::Digest;
        assert_eq!(
            stored_raw(&raw),
            format!(
                "{}… [{} bytes in all, sha256 {}]",
                &clean[..STORED_RAW_BYTES],
                raw.len(),
                hex::encode(sha2::Sha256::digest(raw.as_bytes()))
            )
        );
        assert_eq!(stored_raw("a\0b"), "a\u{fffd}b");
    }
}
