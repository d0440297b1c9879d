//! Keys and cursors: what identifies a record and what orders its versions.
//!
//! A [`Key`] is built from the key fields of a record, or from a hash of
//! some (or all) of its fields (`hash_key`): the lowercase hex SHA-256 of the
//! RFC 8785 (JCS) canonical JSON of the object made of those fields, with an
//! absent field written as null. The same input gives the same key on every
//! machine and every version.
//!
//! Key values keep their JSON type: the string `"7"` and the number `7` are
//! different keys. Numbers compare by value, so `7` and `7.0` are the same
//! key, and every digit counts: two integers beyond 64 bits that a double
//! would round to one value stay two keys.
//!
//! A [`Cursor`] orders versions of a record: integers as integers, RFC 3339
//! timestamps as instants (offsets normalised), anything else as text.

pub use crate::number::canonical_json;
use std::cmp::Ordering;
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value;
use sha2::{Digest, Sha256};

pub use crate::duration::parse_duration;
use crate::error::{Error, Result};
use crate::record::Fields;

/// The column that holds a derived (`hash_key`) key.
pub const HASH_KEY_COLUMN: &str = "_idemload_key";

/// How a record's key is found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySpec {
    /// The values of these fields, in this order.
    Fields(Vec<String>),
    /// A SHA-256 of these fields (empty = every field of the record).
    Hash(Vec<String>),
}

impl KeySpec {
    /// Builds the spec from `key` / `hash_key` settings (default `["id"]`).
    pub fn from_settings(
        key: Option<Vec<String>>,
        hash_key: Option<Vec<String>>,
    ) -> Result<KeySpec> {
        match (key, hash_key) {
            (Some(_), Some(_)) => Err(Error::config("set either `key` or `hash_key`, not both")),
            (None, Some(fields)) => {
                if fields.is_empty() {
                    return Err(Error::config(
                        "`hash_key` needs at least one field, or [\"*\"] for all",
                    ));
                }
                if fields.iter().any(|f| f == "*") {
                    if fields.len() > 1 {
                        return Err(Error::config(
                            "`hash_key = [\"*\"]` stands alone: it already covers every field",
                        ));
                    }
                    return Ok(KeySpec::Hash(Vec::new()));
                }
                Ok(KeySpec::Hash(fields))
            }
            (Some(fields), None) => {
                if fields.is_empty() {
                    return Err(Error::config("`key` needs at least one field"));
                }
                Ok(KeySpec::Fields(fields))
            }
            (None, None) => Ok(KeySpec::Fields(vec!["id".into()])),
        }
    }

    /// The columns that hold the key in the destination.
    pub fn columns(&self) -> Vec<String> {
        match self {
            KeySpec::Fields(fields) => fields.clone(),
            KeySpec::Hash(_) => vec![HASH_KEY_COLUMN.to_string()],
        }
    }

    /// Extracts the key of a record, or says why it has none.
    pub fn key_of(&self, fields: &Fields, ignore: Option<&str>) -> Result<Key, String> {
        match self {
            KeySpec::Fields(names) => {
                let mut values = Vec::with_capacity(names.len());
                for name in names {
                    match fields.get(name) {
                        None => return Err(format!("missing key field {name:?}")),
                        Some(Value::Null) => return Err(format!("key field {name:?} is null")),
                        Some(Value::Object(_) | Value::Array(_)) => {
                            return Err(format!("key field {name:?} is an object or array; a key part must be a string, number or boolean"))
                        }
                        Some(value) => values.push(normalize_number(value)),
                    }
                }
                Ok(Key::new(values))
            }
            KeySpec::Hash(names) => {
                let digest = hash_fields(fields, names, ignore);
                Ok(Key::new(vec![Value::String(digest)]))
            }
        }
    }
}

/// The hex SHA-256 of the JCS form of the object made of `names` (all
/// fields when empty, less `ignore`).
pub fn hash_fields(fields: &Fields, names: &[String], ignore: Option<&str>) -> String {
    let mut object = Fields::new();
    if names.is_empty() {
        for (name, value) in fields.iter() {
            if Some(&**name) != ignore && &**name != HASH_KEY_COLUMN {
                object.insert(name.clone(), value.clone());
            }
        }
    } else {
        for name in names {
            object.insert(
                name.clone(),
                fields.get(name).cloned().unwrap_or(Value::Null),
            );
        }
    }
    let canonical = canonical_json(&object.into());
    hex::encode(Sha256::digest(canonical.as_bytes()))
}

/// A number becomes its canonical form (`7.0` -> `7`, `1.50` -> `1.5`), so
/// that numeric keys compare by value; a value a double cannot hold keeps
/// every digit, so two different big ids stay two keys.
fn normalize_number(value: &Value) -> Value {
    match value {
        Value::Number(n) if n.as_i64().is_none() && n.as_u64().is_none() => {
            Value::Number(crate::number::normalized(n))
        }
        _ => value.clone(),
    }
}

/// The key of one record: its values in key-column order, and a canonical
/// text that identifies it (used for in-input dedup and in rejects).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    canonical: String,
    values: Vec<Value>,
}

impl Key {
    pub fn new(values: Vec<Value>) -> Key {
        let canonical = simple_canonical(&values)
            .unwrap_or_else(|| crate::number::exact_json(&Value::Array(values.clone())));
        Key { canonical, values }
    }

    /// The key values, one per key column.
    pub fn values(&self) -> &[Value] {
        &self.values
    }

    /// `["SL-1","2024-05-01"]`: the same for the same key, whatever the input.
    pub fn canonical(&self) -> &str {
        &self.canonical
    }
}

/// The JCS text of the usual key (integers, booleans, strings that need no
/// escape) without building a JSON tree; `None` otherwise.
fn simple_canonical(values: &[Value]) -> Option<String> {
    use std::fmt::Write as _;
    let mut text = String::with_capacity(2 + values.len() * 12);
    text.push('[');
    for (n, value) in values.iter().enumerate() {
        if n > 0 {
            text.push(',');
        }
        match value {
            // Integers exactly, however large: JCS would write an integer
            // beyond 2^53 as the nearest double, and two ids (snowflake
            // ids, say) would become one key.
            Value::Number(number) => match (number.as_i64(), number.as_u64()) {
                (Some(i), _) => {
                    let _ = write!(text, "{i}");
                }
                (None, Some(u)) => {
                    let _ = write!(text, "{u}");
                }
                _ => return None,
            },
            Value::Bool(b) => text.push_str(if *b { "true" } else { "false" }),
            Value::String(s) if !s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') => {
                text.push('"');
                text.push_str(s);
                text.push('"');
            }
            _ => return None,
        }
    }
    text.push(']');
    Some(text)
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical)
    }
}

/// A cursor value, ordered as the spec says.
#[derive(Debug, Clone)]
pub enum Cursor {
    Int(i64),
    /// Nanoseconds since the epoch, and the text as it came.
    Instant(i128, String),
    Text(String),
}

impl Cursor {
    /// Reads a cursor from a JSON value; `None` for null, objects, arrays,
    /// booleans and non-integral numbers other than floats.
    pub fn from_json(value: &Value) -> Option<Cursor> {
        match value {
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    return Some(Cursor::Int(i));
                }
                n.as_f64()?;
                // A whole number that fits 64 bits exactly (`7.0`); any
                // other number keeps its text, never a rounded integer.
                Some(match crate::number::exact_i64(n) {
                    Some(i) => Cursor::Int(i),
                    None => Cursor::Text(n.to_string()),
                })
            }
            Value::String(s) => Some(Cursor::from_text(s)),
            _ => None,
        }
    }

    /// Reads a cursor from text: an RFC 3339 instant when it parses, else text.
    pub fn from_text(text: &str) -> Cursor {
        match parse_instant(text) {
            Some(nanos) => Cursor::Instant(nanos, text.to_string()),
            None => Cursor::Text(text.to_string()),
        }
    }

    /// The instant a cursor names: a timestamp's, or a date's
    /// (`YYYY-MM-DD`) midnight UTC; `None` for integers and other text.
    pub fn as_instant(&self) -> Option<i128> {
        match self {
            Cursor::Instant(nanos, _) => Some(*nanos),
            Cursor::Text(t) => {
                let day = chrono::NaiveDate::parse_from_str(t, "%Y-%m-%d").ok()?;
                Some(day.and_hms_opt(0, 0, 0)?.and_utc().timestamp() as i128 * 1_000_000_000)
            }
            Cursor::Int(_) => None,
        }
    }

    /// The instant `nanos` after the epoch, written in RFC 3339 UTC.
    pub fn at_instant(nanos: i128) -> Cursor {
        Cursor::Instant(nanos, format_instant(nanos))
    }

    /// The value as JSON (for the state table and `--json`).
    pub fn to_json(&self) -> Value {
        match self {
            Cursor::Int(i) => Value::from(*i),
            Cursor::Instant(_, text) | Cursor::Text(text) => Value::String(text.clone()),
        }
    }

    /// `self - lookback`, the low bound of an incremental run.
    pub fn minus(&self, lookback: &Lookback) -> Result<Cursor> {
        match (self, lookback) {
            (_, Lookback::None) => Ok(self.clone()),
            (Cursor::Int(i), Lookback::Number(n)) => Ok(Cursor::Int(i.saturating_sub(*n))),
            (Cursor::Instant(nanos, _), Lookback::Duration(d)) => {
                let low = nanos - d.as_nanos() as i128;
                Ok(Cursor::at_instant(low))
            }
            (Cursor::Int(_), Lookback::Duration(_)) => Err(Error::config(
                "`lookback` is a duration but the cursor is an integer: give a number, e.g. lookback = 1000",
            )),
            (Cursor::Instant(..), Lookback::Number(_)) => Err(Error::config(
                "`lookback` is a number but the cursor is a timestamp: give a duration, e.g. lookback = \"15m\"",
            )),
            (Cursor::Text(_), _) => Err(Error::config(
                "`lookback` needs an integer or RFC 3339 timestamp cursor; this cursor is text",
            )),
        }
    }

    fn as_text(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Cursor::Int(i) => i.to_string().into(),
            Cursor::Instant(_, t) | Cursor::Text(t) => t.as_str().into(),
        }
    }
}

impl PartialEq for Cursor {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Cursor {}
impl PartialOrd for Cursor {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Cursor {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Cursor::Int(a), Cursor::Int(b)) => a.cmp(b),
            (Cursor::Instant(a, _), Cursor::Instant(b, _)) => a.cmp(b),
            (a, b) => a.as_text().cmp(&b.as_text()),
        }
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_text())
    }
}

/// Nanoseconds since the epoch of an RFC 3339 timestamp.
pub fn parse_instant(text: &str) -> Option<i128> {
    // Cheap pre-check: every RFC 3339 timestamp starts with `dddd-dd-dd`.
    let b = text.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !b[0].is_ascii_digit() {
        return None;
    }
    let t = DateTime::parse_from_rfc3339(text).ok()?;
    Some(t.timestamp() as i128 * 1_000_000_000 + t.timestamp_subsec_nanos() as i128)
}

fn format_instant(nanos: i128) -> String {
    let secs = nanos.div_euclid(1_000_000_000) as i64;
    let sub = nanos.rem_euclid(1_000_000_000) as u32;
    DateTime::<Utc>::from_timestamp(secs, sub)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
        .unwrap_or_default()
}

/// How far below the checkpoint a run reads again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Lookback {
    #[default]
    None,
    Duration(Duration),
    Number(i64),
}

impl Lookback {
    /// `"15m"`, `"2d"` or a number.
    pub fn parse(value: &toml::Value) -> Result<Lookback> {
        match value {
            toml::Value::Integer(n) if *n >= 0 => Ok(Lookback::Number(*n)),
            toml::Value::String(s) => parse_duration(s)
                .map(Lookback::Duration)
                .map_err(|e| Error::config(format!("lookback = {s:?}: {e}"))),
            other => Err(Error::config(format!(
                "lookback = {other}: expected a duration such as \"15m\" or a non-negative number"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(v: Value) -> Fields {
        Fields::try_from(v).unwrap()
    }

    #[test]
    fn simple_keys_read_exactly_as_jcs_writes_them() {
        let cases = [
            json!([7]),
            json!([-9007199254740992i64]),
            json!([9007199254740992i64]),
            json!(["SL-1", "2024-05-01", true, 0]),
            json!(["prénom", false]),
        ];
        for case in cases {
            let values = case.as_array().unwrap().clone();
            assert_eq!(simple_canonical(&values), Some(canonical_json(&case)));
        }
        for odd in [
            json!([1.5]),
            json!(["a\"b"]),
            json!(["\u{1}"]),
            json!([null]),
        ] {
            assert_eq!(simple_canonical(odd.as_array().unwrap()), None);
            let key = Key::new(odd.as_array().unwrap().clone());
            assert_eq!(key.canonical(), canonical_json(&odd));
        }
    }

    #[test]
    fn integer_keys_beyond_two_to_the_53_stay_distinct() {
        // Snowflake-style ids: JCS would write both as 1234567890123456800.
        let a = Key::new(vec![json!(1234567890123456789i64)]);
        let b = Key::new(vec![json!(1234567890123456788i64)]);
        assert_ne!(a.canonical(), b.canonical());
        assert_eq!(a.canonical(), "[1234567890123456789]");
        let big = Key::new(vec![json!(18446744073709551615u64), json!("x")]);
        assert_eq!(big.canonical(), "[18446744073709551615,\"x\"]");
        // A float that is exactly the same integer is still the same key.
        let spec = KeySpec::Fields(vec!["id".into()]);
        let int = spec
            .key_of(&fields(json!({"id": 10000000000000000i64})), None)
            .unwrap();
        let float = spec.key_of(&fields(json!({"id": 1e16})), None).unwrap();
        assert_eq!(int.canonical(), float.canonical());
        let seven = spec.key_of(&fields(json!({"id": 7.0})), None).unwrap();
        assert_eq!(seven.canonical(), "[7]");
    }

    #[test]
    fn hash_key_is_sha256_of_jcs() {
        // JCS sorts keys and writes 7.0 as 7; absent fields are null.
        let spec = KeySpec::Hash(vec!["b".into(), "a".into(), "z".into()]);
        let key = spec
            .key_of(&fields(json!({"a": 7.0, "b": "x"})), None)
            .unwrap();
        let expected = hex::encode(Sha256::digest(br#"{"a":7,"b":"x","z":null}"#));
        assert_eq!(key.values(), &[Value::String(expected)]);
    }

    #[test]
    fn hash_keys_of_ordinary_records_are_the_ones_they_always_were() {
        // Computed by idemload before numbers kept their text (issue 15):
        // `load --hash-key '*'` of this line, and of `--hash-key sku,qty`.
        let line = r#"{"sku":"A-1","qty":7,"price":19.99,"ratio":0.1,"big":1234567890123,"when":"2024-05-01T00:00:00Z","tags":["x",1.5e3],"ok":true,"none":null}"#;
        let record = fields(serde_json::from_str(line).unwrap());
        let all = KeySpec::Hash(Vec::new()).key_of(&record, None).unwrap();
        assert_eq!(
            all.values(),
            &[json!(
                "f9d53116a8e3363822993835c139e5b309714c7169c6afcb4be36c4a9e9670ea"
            )]
        );
        let named = KeySpec::Hash(vec!["sku".into(), "qty".into()])
            .key_of(&record, None)
            .unwrap();
        assert_eq!(
            named.values(),
            &[json!(
                "576311f8c1d6e2d62b437d1cd3ae1b054eba6afcd322aefa896401706cf5e929"
            )]
        );
    }

    #[test]
    fn keys_beyond_64_bits_stay_distinct_and_compare_by_value() {
        // Issue 15: 2^64 and 2^64 + 1 were one key.
        let spec = KeySpec::Fields(vec!["id".into()]);
        let key = |text: &str| {
            spec.key_of(&fields(serde_json::from_str(text).unwrap()), None)
                .unwrap()
        };
        let a = key(r#"{"id":18446744073709551616}"#);
        let b = key(r#"{"id":18446744073709551617}"#);
        assert_ne!(a, b);
        assert_eq!(b.canonical(), "[18446744073709551617]");
        assert_eq!(b, key(r#"{"id":18446744073709551617.0}"#));
        assert_eq!(b, key(r#"{"id":1.8446744073709551617e19}"#));
    }

    #[test]
    fn hash_key_star_covers_all_fields_in_any_order() {
        let spec = KeySpec::Hash(Vec::new());
        let a = spec
            .key_of(&fields(json!({"a": 1, "b": [1, {"y": 2, "x": 1}]})), None)
            .unwrap();
        let b = spec
            .key_of(&fields(json!({"b": [1, {"x": 1, "y": 2}], "a": 1})), None)
            .unwrap();
        assert_eq!(a, b);
        // A field that is null and a field that is absent hash the same when named.
        let named = KeySpec::Hash(vec!["a".into(), "c".into()]);
        assert_eq!(
            named.key_of(&fields(json!({"a": 1})), None).unwrap(),
            named
                .key_of(&fields(json!({"a": 1, "c": null})), None)
                .unwrap()
        );
    }

    #[test]
    fn numeric_keys_compare_by_value_but_never_equal_strings() {
        let spec = KeySpec::Fields(vec!["id".into()]);
        let seven = spec.key_of(&fields(json!({"id": 7})), None).unwrap();
        let seven_f = spec.key_of(&fields(json!({"id": 7.0})), None).unwrap();
        let seven_s = spec.key_of(&fields(json!({"id": "7"})), None).unwrap();
        let zero7 = spec.key_of(&fields(json!({"id": "007"})), None).unwrap();
        assert_eq!(seven, seven_f);
        assert_ne!(seven, seven_s);
        assert_ne!(seven_s, zero7);
    }

    #[test]
    fn missing_and_null_key_parts_are_refused() {
        let spec = KeySpec::Fields(vec!["a".into(), "b".into()]);
        assert_eq!(
            spec.key_of(&fields(json!({"a": 1})), None).unwrap_err(),
            "missing key field \"b\""
        );
        assert!(spec
            .key_of(&fields(json!({"a": 1, "b": null})), None)
            .is_err());
    }

    #[test]
    fn cursors_order_instants_across_offsets() {
        let a = Cursor::from_text("2024-05-01T10:00:00+02:00");
        let b = Cursor::from_text("2024-05-01T09:00:00Z");
        assert!(a < b, "08:00Z is before 09:00Z");
        assert_eq!(
            Cursor::from_json(&json!(10)).unwrap().cmp(&Cursor::Int(9)),
            Ordering::Greater
        );
        assert!(Cursor::from_text("b") > Cursor::from_text("a"));
    }

    #[test]
    fn lookback_moves_the_low_bound() {
        let c = Cursor::from_text("2024-05-02T00:00:00Z");
        let low = c
            .minus(&Lookback::Duration(Duration::from_secs(86_400)))
            .unwrap();
        assert_eq!(low.to_string(), "2024-05-01T00:00:00Z");
        assert_eq!(
            Cursor::Int(100).minus(&Lookback::Number(10)).unwrap(),
            Cursor::Int(90)
        );
        assert!(Cursor::Int(1)
            .minus(&Lookback::Duration(Duration::from_secs(1)))
            .is_err());
    }
}
