//! Property (issue 15): the JSON-lines and CSV readers take any bytes (invalid
//! UTF-8, truncated JSON, stray quotes, CRLF, NUL, a BOM, very long fields,
//! blank lines) without panicking, and account for every line: each one
//! that is not blank becomes a record or a reject carrying its line number,
//! in order, so `read = records + rejects`. A value over `max_value_bytes`
//! is rejected by the reader exactly when the planner would reject it.
//!
//! Driven through the library's `FileSource` on temp files. The case count
//! keeps `.ci/run` quick; `PROPTEST_CASES=5000` runs more.

use idemload::source::{FileFormat, FileSource, FileSourceConfig, OneOrMany};
use idemload::{Item, Source, SourceQuery};
use proptest::prelude::*;
use serde_json::Value;

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Reads `bytes` as a file of `format`; every item, as (line, item).
fn read(bytes: &[u8], format: FileFormat, max_value_bytes: Option<usize>) -> Vec<(u64, Item)> {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("in");
    std::fs::write(&path, bytes).expect("write");
    let config = FileSourceConfig {
        path: OneOrMany::One(path.display().to_string()),
        format: Some(format),
        endpoint: None,
    };
    let query = SourceQuery {
        batch_size: 7,
        max_record_bytes: 1 << 16,
        max_value_bytes,
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut source = FileSource::open(&config, &query).expect("open");
        let mut items = Vec::new();
        while let Some(batch) = source.next_batch().await.expect("read") {
            for item in batch {
                let line = match &item {
                    Item::Record(r) => line_of(&r.source.to_string()),
                    Item::Reject(r) => line_of(&r.source.to_string()),
                    Item::Skipped => panic!("nothing is skipped without a cursor"),
                    // The file's end: not a line.
                    Item::FileLoaded(_) | Item::FileSkipped => continue,
                };
                items.push((line, item));
            }
        }
        items
    })
}

/// The line number of a `path:line` source reference.
fn line_of(source: &str) -> u64 {
    let (_, line) = source.rsplit_once(':').expect("path:line");
    line.parse().expect("line number")
}

/// The planner's size of a value (see `max_value_bytes`).
fn planner_size(value: &Value) -> usize {
    match value {
        Value::String(s) => s.len(),
        Value::Array(_) | Value::Object(_) => value.to_string().len(),
        _ => 0,
    }
}

/// A line's text as the reader sees it: without its `\r`s at the end.
fn trimmed(line: &[u8]) -> &[u8] {
    let mut end = line.len();
    while end > 0 && line[end - 1] == b'\r' {
        end -= 1;
    }
    &line[..end]
}

/// Strings that JSON and CSV find awkward.
fn awkward_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9 ]{0,12}",
        "[\"\\\\,;\r\n\t\u{0}\u{feff}\u{7f}é😀a ]{0,16}",
        any::<String>(),
    ]
}

/// Text long enough to pass a small `max_value_bytes`, and at times the
/// reader's 64 KiB line limit.
fn long_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => (0usize..3_000).prop_map(|n| "x".repeat(n)),
        1 => (60_000usize..70_000).prop_map(|n| "é".repeat(n / 2)),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        "-?(0|[1-9][0-9]{0,40})(\\.[0-9]{1,20})?([eE][+-]?[0-9]{1,3})?"
            .prop_map(|n| serde_json::from_str::<Value>(&n).expect("number")),
        awkward_text().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(("[a-z]{1,3}", inner), 0..5)
                .prop_map(|fields| Value::Object(fields.into_iter().collect())),
        ]
    })
}

/// One line of a JSON-lines file, without its `\n`.
fn json_line() -> impl Strategy<Value = Vec<u8>> {
    let object = || {
        prop::collection::vec(("[a-z_]{1,4}|\\PC{1,3}", json_value()), 0..5)
            .prop_map(|fields| Value::Object(fields.into_iter().collect()).to_string())
    };
    prop_oneof![
        4 => object().prop_map(String::into_bytes),
        // Cut short anywhere (maybe inside a character).
        2 => (object(), any::<prop::sample::Index>()).prop_map(|(text, at)| {
            let bytes = text.into_bytes();
            bytes[..at.index(bytes.len() + 1)].to_vec()
        }),
        // A BOM, a CR (a CRLF line), spaces, a NUL or a bad byte around it.
        2 => (object(), prop::sample::select(vec![
            &b"\xef\xbb\xbf"[..], b"\r", b" \t", b"\0", b"\xff", b"\xc3", b"\r\r",
        ]), any::<bool>()).prop_map(|(text, extra, before)| {
            let mut bytes = text.into_bytes();
            if before {
                bytes.splice(0..0, extra.iter().copied());
            } else {
                bytes.extend_from_slice(extra);
            }
            bytes
        }),
        1 => json_value().prop_map(|v| v.to_string().into_bytes()),
        1 => (long_text(), 0usize..400).prop_map(|(text, n)| {
            serde_json::json!({"id": 1, "long": text, "many": vec![0; n]})
                .to_string()
                .into_bytes()
        }),
        1 => prop::collection::vec(any::<u8>(), 0..64),
        1 => "[ \t\r\u{c}]{0,4}".prop_map(String::into_bytes),
    ]
    .prop_map(|mut bytes: Vec<u8>| {
        // A `\n` inside would be two lines; a NUL or bad byte stays.
        bytes.retain(|&b| b != b'\n');
        bytes
    })
}

/// A CSV cell, written quoted when it must be (or at random).
fn csv_cell() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => awkward_text().prop_map(String::into_bytes),
        1 => long_text().prop_map(String::into_bytes),
        1 => "-?[0-9]{1,30}(\\.[0-9]{1,5})?".prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 0..16),
    ]
}

fn write_cell(out: &mut Vec<u8>, cell: &[u8], quote: bool) {
    if quote
        || cell
            .iter()
            .any(|b| matches!(b, b',' | b'"' | b'\r' | b'\n'))
    {
        out.push(b'"');
        for &b in cell {
            if b == b'"' {
                out.push(b'"');
            }
            out.push(b);
        }
        out.push(b'"');
    } else {
        out.extend_from_slice(cell);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(96), ..ProptestConfig::default() })]

    /// Every line that is not blank is one item at its line number; an
    /// object is a record unless a value is over the limit, which is
    /// exactly when the planner would say so.
    #[test]
    fn every_json_line_is_a_record_or_a_reject_at_its_number(
        lines in prop::collection::vec(json_line(), 0..24),
        final_newline in any::<bool>(),
        max_value_bytes in prop::option::of(prop_oneof![1usize..64, 64usize..100_000]),
    ) {
        let mut bytes = lines.join(&b'\n');
        if final_newline && !lines.is_empty() {
            bytes.push(b'\n');
        }
        let items = read(&bytes, FileFormat::Jsonl, max_value_bytes);
        if bytes.is_empty() {
            // An empty file is one reject for the file as a whole.
            prop_assert_eq!(items.len(), 1);
            prop_assert!(matches!(&items[0], (0, Item::Reject(_))));
            return Ok(());
        }
        let expected: Vec<(u64, &[u8])> = lines
            .iter()
            .enumerate()
            .map(|(i, line)| (i as u64 + 1, &line[..]))
            .filter(|(_, line)| !trimmed(line).iter().all(u8::is_ascii_whitespace))
            .collect();
        let got: Vec<u64> = items.iter().map(|(line, _)| *line).collect();
        let want: Vec<u64> = expected.iter().map(|(line, _)| *line).collect();
        prop_assert_eq!(got, want);
        for ((line, raw), (_, item)) in expected.iter().zip(&items) {
            // Longer than the reader holds (its max_record_bytes, 64 KiB).
            let overlong = raw.len() > 1 << 16;
            let text = trimmed(raw);
            let object = match serde_json::from_slice::<Value>(text) {
                Ok(Value::Object(fields)) => Some(fields),
                _ => None,
            };
            let too_large = object.as_ref().and_then(|fields| {
                let max = max_value_bytes?;
                fields.iter().find(|(_, v)| planner_size(v) > max)
            });
            match item {
                Item::Record(r) => {
                    prop_assert!(object.is_some(), "line {} is no object but a record", line);
                    prop_assert!(!overlong, "line {} is too long to be a record", line);
                    prop_assert!(too_large.is_none(), "line {}: {:?} is over the limit", line, too_large);
                    prop_assert_eq!(r.fields.len(), object.as_ref().map_or(0, |f| f.len()));
                }
                Item::Reject(r) => {
                    prop_assert!(
                        object.is_none() || too_large.is_some() || overlong,
                        "line {}: an object within the limit rejected: {}", line, r.reason
                    );
                    if overlong {
                        prop_assert!(r.reason.starts_with("line is "), "line {}: {}", line, r.reason);
                    } else if let Some((name, _)) = too_large {
                        prop_assert!(
                            r.reason.starts_with(&format!("value of field {name:?} is ")),
                            "line {}: {}", line, r.reason
                        );
                    }
                }
                Item::Skipped | Item::FileLoaded(_) | Item::FileSkipped => unreachable!(),
            }
        }
    }

    /// Every CSV row written (cells quoted as CSV quotes them) is one item
    /// at the line it begins on: a record with the header's fields, or a
    /// reject saying which rule it breaks.
    #[test]
    fn every_csv_row_is_a_record_or_a_reject_at_its_line(
        rows in prop::collection::vec(
            prop::collection::vec((csv_cell(), any::<bool>()), 1..5), 0..24),
        crlf in any::<bool>(),
        bom in any::<bool>(),
        max_value_bytes in prop::option::of(prop_oneof![1usize..64, 64usize..100_000]),
    ) {
        let end: &[u8] = if crlf { b"\r\n" } else { b"\n" };
        let mut bytes = Vec::new();
        if bom {
            bytes.extend_from_slice("\u{feff}".as_bytes());
        }
        bytes.extend_from_slice(b"id,name,note");
        bytes.extend_from_slice(end);
        let mut starts = Vec::new();
        for row in &rows {
            starts.push(bytes.iter().filter(|&&b| b == b'\n').count() as u64 + 1);
            for (i, (cell, quote)) in row.iter().enumerate() {
                if i > 0 {
                    bytes.push(b',');
                }
                // A lone empty cell is an empty line, which CSV skips.
                write_cell(&mut bytes, cell, *quote || (row.len() == 1 && cell.is_empty()));
            }
            bytes.extend_from_slice(end);
        }
        let items = read(&bytes, FileFormat::Csv, max_value_bytes);
        let got: Vec<u64> = items.iter().map(|(line, _)| *line).collect();
        prop_assert_eq!(&got, &starts);
        for (row, (line, item)) in rows.iter().zip(&items) {
            let utf8 = row.iter().all(|(c, _)| std::str::from_utf8(c).is_ok());
            let long = max_value_bytes.is_some_and(|max| row.iter().any(|(c, _)| c.len() > max));
            // Over the limit and certainly text, not a number.
            let long_text = max_value_bytes.is_some_and(|max| {
                row.iter().any(|(c, _)| {
                    c.len() > max && !c.iter().all(|b| b.is_ascii_digit() || b"-.eE+".contains(b))
                })
            });
            match item {
                Item::Record(r) => {
                    prop_assert_eq!(row.len(), 3, "line {}", line);
                    prop_assert!(utf8, "line {}", line);
                    prop_assert!(!long_text, "line {}: a value over the limit loaded", line);
                    prop_assert_eq!(r.fields.len(), 3);
                }
                Item::Reject(r) => prop_assert!(
                    row.len() != 3 || !utf8 || long,
                    "line {}: a good row rejected: {}", line, r.reason
                ),
                Item::Skipped | Item::FileLoaded(_) | Item::FileSkipped => unreachable!(),
            }
        }
    }

    /// Raw bytes after a header (stray quotes, lone CRs and all): no panic,
    /// items in line order within the file; with no quote and no lone CR,
    /// each line that is not empty is exactly one item at its number.
    #[test]
    fn any_bytes_after_a_csv_header_are_read_to_the_end(
        lines in prop::collection::vec(prop_oneof![
            3 => prop::collection::vec(prop_oneof![
                4 => prop::sample::select(b"ab1,\" \r\t\0".to_vec()),
                1 => any::<u8>(),
            ], 0..40),
            1 => (0usize..70_000).prop_map(|n| vec![b'x'; n]),
        ], 0..20),
        crlf in any::<bool>(),
    ) {
        let end: &[u8] = if crlf { b"\r\n" } else { b"\n" };
        let lines: Vec<Vec<u8>> = lines
            .into_iter()
            .map(|mut l| {
                l.retain(|&b| b != b'\n');
                l
            })
            .collect();
        let mut bytes = b"a,b".to_vec();
        bytes.extend_from_slice(end);
        for line in &lines {
            bytes.extend_from_slice(line);
            bytes.extend_from_slice(end);
        }
        let items = read(&bytes, FileFormat::Csv, Some(1 << 20));
        let got: Vec<u64> = items.iter().map(|(line, _)| *line).collect();
        let total = lines.len() as u64 + 1;
        prop_assert!(got.windows(2).all(|w| w[0] <= w[1]), "{:?}", got);
        prop_assert!(got.iter().all(|&l| (1..=total + 1).contains(&l)), "{:?}", got);
        let plain = lines.iter().all(|l| !l.contains(&b'"') && !l.contains(&b'\r'));
        if plain {
            let want: Vec<u64> = lines
                .iter()
                .enumerate()
                .filter(|(_, l)| !l.is_empty())
                .map(|(i, _)| i as u64 + 2)
                .collect();
            prop_assert_eq!(got, want);
        }
    }
}

/// A CSV row after blank lines names its own line, not the first blank
/// one (found by the property above).
#[test]
fn a_csv_row_after_blank_lines_names_its_own_line() {
    for (text, want) in [
        (&b"a,b\n\nx,1\n\n\ny,2\n"[..], vec![3, 6]),
        (b"a,b\r\n\r\nx,1\r\n\r\n\r\ny,2\r\n", vec![3, 6]),
        (b"a,b\nx,\"1\n\n2\"\n\ny,2", vec![2, 6]),
    ] {
        let got: Vec<u64> = read(text, FileFormat::Csv, None)
            .into_iter()
            .map(|(line, _)| line)
            .collect();
        assert_eq!(got, want, "{}", String::from_utf8_lossy(text));
    }
}
