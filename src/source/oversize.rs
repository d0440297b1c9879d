//! Values over `max_value_bytes`, found in a record's raw text before its
//! values are built.
//!
//! The planner measures each value of a built record: a string's length,
//! an array's or object's compact JSON text. Building a huge array costs
//! far more memory than its text (a `Value` per element, and a `String` per
//! number, which keep their input text): a 50 MB line holding 25 million
//! numbers took 3 GB before the planner could reject it. So the file
//! readers measure the same thing from the raw text of a line longer than
//! the limit (a value can only be over it when its line is), and reject the
//! record there, with the planner's reason and a raw text already cut to
//! what the rejects table stores. A record they let through is built and
//! checked by the planner as before; good records around a rejected one are
//! read as usual (guarantee 5: bad input never stops good input).

use std::collections::HashMap;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::record::{stored_raw, value_too_large, Item, Reject, SourceRef};

/// The reject for the JSON text of one record (a line, an array element)
/// when it cannot be a record without building a huge value: not UTF-8,
/// malformed, not an object, or an object with a top-level value over
/// `max` bytes. `None`: an object whose values are all within the limit,
/// which the caller builds.
///
/// Call it for texts longer than `max` only: it reads the text twice.
pub(super) fn oversized_json(text: &[u8], at: &SourceRef, max: usize) -> Option<Item> {
    let reject = |reason: String| {
        Some(Item::Reject(Reject::new(
            at.clone(),
            reason,
            // Cut now: the rejects table keeps a prefix, the length and
            // the digest, and the whole text need not travel to the commit.
            stored_raw(&String::from_utf8_lossy(text)),
        )))
    };
    let text = match std::str::from_utf8(text) {
        Ok(text) => text,
        Err(e) => return reject(format!("invalid UTF-8 at byte {}", e.valid_up_to())),
    };
    let fields = match serde_json::from_str::<TopFields>(text) {
        Ok(fields) => fields.0,
        Err(e) if e.classify() == serde_json::error::Category::Data => {
            // Not an object: say what it is, once it is known to be JSON.
            return match serde_json::from_str::<&RawValue>(text) {
                Err(e) => reject(format!("malformed JSON: {e}")),
                Ok(value) => reject(format!("expected a JSON object, got {}", kind(value))),
            };
        }
        Err(e) => return reject(format!("malformed JSON: {e}")),
    };
    // A repeated name keeps its first place and its last value, as the
    // record built from the text does.
    let mut sizes: Vec<(&str, usize)> = Vec::with_capacity(fields.len());
    let mut places: HashMap<&str, usize> = HashMap::with_capacity(fields.len());
    for (name, value) in &fields {
        let size = value_size(value.get());
        match places.get(name.as_str()) {
            Some(&at) => sizes[at].1 = size,
            None => {
                places.insert(name, sizes.len());
                sizes.push((name, size));
            }
        }
    }
    let (name, size) = sizes.into_iter().find(|&(_, size)| size > max)?;
    reject(value_too_large(name, size, max))
}

/// What a JSON value that is not an object is, as the rejects say it.
fn kind(value: &RawValue) -> &'static str {
    match value.get().trim_ascii_start().as_bytes().first() {
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

/// The top-level fields of a JSON object, each value as its raw text.
struct TopFields<'a>(Vec<(String, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for TopFields<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(TopFieldsVisitor(std::marker::PhantomData))
    }
}

struct TopFieldsVisitor<'a>(std::marker::PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for TopFieldsVisitor<'a> {
    type Value = TopFields<'a>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TopFields<'a>, A::Error> {
        let mut fields = Vec::new();
        while let Some(name) = map.next_key::<String>()? {
            fields.push((name, map.next_value::<&'de RawValue>()?));
        }
        Ok(TopFields(fields))
    }
}

/// The size the planner gives the value whose valid JSON text is `raw`:
/// a string's length once unescaped, an array's or object's length as
/// compact JSON (serde_json's escapes), 0 for anything else. Counted from
/// the text without building the value. (An object nested in an array
/// that repeats a name is counted with every copy; its built form keeps
/// one, so such a value may count a few bytes more than the planner says.)
pub(super) fn value_size(raw: &str) -> usize {
    let raw = raw.trim_ascii().as_bytes();
    match raw.first() {
        Some(b'"') => scan_string(raw, 1).unescaped,
        Some(b'[' | b'{') => {
            let mut size = 0;
            let mut at = 0;
            while at < raw.len() {
                match raw[at] {
                    b'"' => {
                        let string = scan_string(raw, at + 1);
                        size += 2 + string.escaped;
                        at = string.end + 1;
                    }
                    b' ' | b'\t' | b'\n' | b'\r' => at += 1,
                    _ => {
                        size += 1;
                        at += 1;
                    }
                }
            }
            size
        }
        _ => 0,
    }
}

/// A JSON string's contents measured two ways.
struct StringSize {
    /// Its length unescaped (UTF-8 bytes).
    unescaped: usize,
    /// Its length as serde_json writes it, without the quotes.
    escaped: usize,
    /// Where its closing quote is.
    end: usize,
}

/// Measures the string whose contents begin at `start` in valid JSON.
fn scan_string(raw: &[u8], start: usize) -> StringSize {
    let mut size = StringSize {
        unescaped: 0,
        escaped: 0,
        end: raw.len(),
    };
    let mut at = start;
    while at < raw.len() {
        match raw[at] {
            b'"' => {
                size.end = at;
                break;
            }
            b'\\' => {
                let escape = raw.get(at + 1).copied().unwrap_or(b'"');
                at += 2;
                let c = match escape {
                    b'u' => {
                        let (c, len) = unicode_escape(raw, at - 2);
                        at += len - 2;
                        c
                    }
                    b'b' => Some('\u{8}'),
                    b'f' => Some('\u{c}'),
                    b'n' => Some('\n'),
                    b'r' => Some('\r'),
                    b't' => Some('\t'),
                    other => Some(char::from(other)),
                };
                // A lone surrogate (which a full parse refuses) counts as
                // the three bytes of a replacement character.
                let c = c.unwrap_or('\u{fffd}');
                size.unescaped += c.len_utf8();
                size.escaped += escaped_len(c);
            }
            _ => {
                // Raw bytes are never escaped by serde_json: valid JSON
                // has no control characters, quotes or backslashes here.
                size.unescaped += 1;
                size.escaped += 1;
                at += 1;
            }
        }
    }
    size
}

/// The character of the `\uXXXX` escape at `at` (a surrogate pair taking
/// two escapes), and how many bytes it took; `None` for a lone surrogate.
fn unicode_escape(raw: &[u8], at: usize) -> (Option<char>, usize) {
    let hex = |from: usize| {
        raw.get(from..from + 4)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u32::from_str_radix(h, 16).ok())
    };
    let Some(first) = hex(at + 2) else {
        return (None, 2);
    };
    if (0xD800..0xDC00).contains(&first) && raw.get(at + 6..at + 8) == Some(b"\\u") {
        if let Some(second) = hex(at + 8).filter(|s| (0xDC00..0xE000).contains(s)) {
            let c = 0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00);
            return (char::from_u32(c), 12);
        }
    }
    (char::from_u32(first), 6)
}

/// How many bytes serde_json writes for `c` inside a string.
fn escaped_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\u{8}' | '\u{c}' | '\n' | '\r' | '\t' => 2,
        '\0'..='\u{1f}' => 6,
        c => c.len_utf8(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    /// The planner's measure of a built value.
    fn planner_size(value: &Value) -> usize {
        match value {
            Value::String(s) => s.len(),
            Value::Array(_) | Value::Object(_) => value.to_string().len(),
            _ => 0,
        }
    }

    /// `value` as JSON with every non-ASCII or special character escaped
    /// as `\uXXXX` and whitespace around every token: the longest text of
    /// the same value.
    fn loose(value: &Value) -> String {
        match value {
            Value::String(s) => {
                let mut out = String::from("\"");
                for unit in s.encode_utf16() {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
                out.push('"');
                out
            }
            Value::Array(items) => {
                let items: Vec<String> = items.iter().map(loose).collect();
                format!("[ \n{} ]", items.join(" ,\t"))
            }
            Value::Object(fields) => {
                let fields: Vec<String> = fields
                    .iter()
                    .map(|(k, v)| format!("{} : {}", loose(&Value::String(k.clone())), loose(v)))
                    .collect();
                format!("{{\r\n{} }}", fields.join(" , "))
            }
            other => format!(" {other} "),
        }
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            "-?(0|[1-9][0-9]{0,29})(\\.[0-9]{1,20})?([eE][+-]?[0-9]{1,3})?"
                .prop_map(|n| serde_json::from_str::<Value>(&n).unwrap()),
            any::<String>().prop_map(Value::String),
            "[\"\\\\/\u{0}-\u{1f}\u{7f}é€😀a]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((any::<String>(), inner), 0..6)
                    .prop_map(|fields| Value::Object(fields.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// The size counted from the text is the planner's, whatever
        /// escapes and whitespace the text uses.
        #[test]
        fn the_size_from_the_text_is_the_size_of_the_built_value(value in json_value()) {
            let expected = planner_size(&value);
            for text in [value.to_string(), serde_json::to_string_pretty(&value).unwrap(), loose(&value)] {
                let reparsed: Value = serde_json::from_str(&text).unwrap();
                prop_assert_eq!(planner_size(&reparsed), expected);
                prop_assert_eq!(value_size(&text), expected, "{}", text);
            }
        }
    }

    fn at() -> SourceRef {
        SourceRef::Line {
            path: "t.jsonl".into(),
            line: 7,
        }
    }

    fn reason(text: &str, max: usize) -> Option<String> {
        oversized_json(text.as_bytes(), &at(), max).map(|item| match item {
            Item::Reject(r) => r.reason,
            _ => panic!("not a reject"),
        })
    }

    #[test]
    fn the_first_value_over_the_limit_is_named_as_the_planner_names_it() {
        let text = r#"{"id":1,"small":"abc","big":[1, 2, 3, 4],"bigger":"0123456789"}"#;
        assert_eq!(reason(text, 8), Some(value_too_large("big", 9, 8)));
        assert_eq!(reason(text, 9), Some(value_too_large("bigger", 10, 9)));
        assert_eq!(reason(text, 10), None);
        // A repeated name is measured by its last value.
        assert_eq!(reason(r#"{"a":"0123456789","a":1}"#, 5), None);
        assert_eq!(
            reason(r#"{"a":1,"b":2,"a":"0123456789"}"#, 5),
            Some(value_too_large("a", 10, 5))
        );
    }

    #[test]
    fn a_text_that_is_no_object_is_rejected_without_being_built() {
        assert_eq!(
            reason("[1,2,3]", 1).unwrap(),
            "expected a JSON object, got an array"
        );
        assert_eq!(
            reason(" \"text\"", 1).unwrap(),
            "expected a JSON object, got a string"
        );
        assert!(reason("[1,2", 1).unwrap().starts_with("malformed JSON: "));
        assert!(reason("{\"a\":[1,2}", 1)
            .unwrap()
            .starts_with("malformed JSON: "));
        assert!(reason("{\"a\":1} x", 1)
            .unwrap()
            .starts_with("malformed JSON: "));
        let invalid = oversized_json(b"{\"a\":\"\xff\"}", &at(), 1);
        let Some(Item::Reject(r)) = invalid else {
            panic!("not a reject")
        };
        assert_eq!(r.reason, "invalid UTF-8 at byte 6");
        assert_eq!(r.source, at());
    }

    #[test]
    fn the_raw_text_of_a_huge_reject_is_cut_as_the_rejects_table_stores_it() {
        let text = format!("{{\"id\":1,\"big\":[{}1]}}", "1,".repeat(100_000));
        let Some(Item::Reject(r)) = oversized_json(text.as_bytes(), &at(), 1000) else {
            panic!("not a reject")
        };
        assert_eq!(r.raw, stored_raw(&text));
        assert!(r.raw.len() < 9000);
    }
}
