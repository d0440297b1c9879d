//! Record shapes: where the records sit in a JSON document, and the fields
//! the document adds to them.
//!
//! A `records` path is dotted: a plain segment names an object member (or
//! an array index), and a segment `{name}` matches every member of an
//! object, adding the member's name to each record below it as the field
//! `name`. `"{service_line_id}.daily_usage"` turns
//! `{"SL-1": {"daily_usage": [{…}]}}` into records carrying
//! `service_line_id = "SL-1"`. The path ends at an array (its elements are
//! the records), or after a `{name}` segment at an object (each member is
//! one record); null holds no records. `[source] set` adds constant fields.
//! The HTTP source walks each page's body, the SQL source each row (the
//! path then starts with the JSON column's name).

use std::collections::BTreeMap;

use serde_json::Value;

use super::pagination::kind;
use crate::record::Fields;

/// One segment of a records path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// An object member or an array index.
    Member(String),
    /// Every member of an object; its name becomes this field.
    Each(String),
}

/// A parsed `records` path.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RecordsPath {
    text: String,
    segments: Vec<Segment>,
}

/// Why a document does not hold records where the path says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShapeError {
    /// Nothing at `at` (a concrete path: member names filled in).
    Missing { at: String },
    /// `at` holds this kind of value where an array was expected.
    NotArray { at: String, kind: &'static str },
    /// A `{name}` segment met something that is not an object.
    NotObject { at: String, kind: &'static str },
}

/// An element found by the path, with the fields its members add.
#[derive(Debug, Clone, PartialEq)]
pub struct Element {
    pub value: Value,
    pub captured: Vec<(String, Value)>,
}

impl RecordsPath {
    /// Parses a path; `""` is the document itself.
    pub fn parse(text: &str) -> Result<RecordsPath, String> {
        let mut segments = Vec::new();
        if !text.is_empty() {
            for part in text.split('.') {
                if let Some(inner) = part.strip_prefix('{') {
                    let name = inner.strip_suffix('}').unwrap_or_default();
                    if name.is_empty() || name.contains(['{', '}']) {
                        return Err(format!(
                            "records = {text:?}: {part:?} is not a segment; write {{field}} to match every member and keep its name in `field`"
                        ));
                    }
                    segments.push(Segment::Each(name.to_string()));
                } else if part.contains(['{', '}']) {
                    return Err(format!(
                        "records = {text:?}: {part:?} mixes braces into a member name; a {{field}} segment stands alone between dots"
                    ));
                } else {
                    segments.push(Segment::Member(part.to_string()));
                }
            }
        }
        Ok(RecordsPath {
            text: text.to_string(),
            segments,
        })
    }

    /// The path as configured.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the path has a `{name}` segment.
    pub fn has_members(&self) -> bool {
        self.segments.iter().any(|s| matches!(s, Segment::Each(_)))
    }

    /// How many elements the document holds, without moving them.
    pub fn count(&self, doc: &Value) -> Result<usize, ShapeError> {
        let mut n = 0;
        self.walk(doc, 0, &mut String::new(), &mut |v| {
            n += match v {
                Value::Array(items) => items.len(),
                Value::Null => 0,
                _ => 1,
            };
        })?;
        Ok(n)
    }

    /// Moves the elements out of the document.
    pub fn take(&self, mut doc: Value) -> Result<Vec<Element>, ShapeError> {
        let mut out = Vec::new();
        take_at(
            &self.segments,
            0,
            &mut doc,
            &mut Vec::new(),
            &mut String::new(),
            &mut out,
        )?;
        Ok(out)
    }

    /// Checks the shape and calls `found` at every place records sit.
    fn walk(
        &self,
        at: &Value,
        depth: usize,
        path: &mut String,
        found: &mut dyn FnMut(&Value),
    ) -> Result<(), ShapeError> {
        match self.segments.get(depth) {
            None => {
                check_end(
                    at,
                    depth > 0 && matches!(self.segments[depth - 1], Segment::Each(_)),
                    path,
                )?;
                found(at);
                Ok(())
            }
            Some(Segment::Member(name)) => {
                let next = member(at, name).ok_or_else(|| ShapeError::Missing {
                    at: join(path, name),
                })?;
                let len = path.len();
                push(path, name);
                let r = self.walk(next, depth + 1, path, found);
                path.truncate(len);
                r
            }
            Some(Segment::Each(_)) => match at {
                Value::Object(map) => {
                    for (name, next) in map {
                        let len = path.len();
                        push(path, name);
                        let r = self.walk(next, depth + 1, path, found);
                        path.truncate(len);
                        r?;
                    }
                    Ok(())
                }
                Value::Null => Ok(()),
                other => Err(ShapeError::NotObject {
                    at: path.clone(),
                    kind: kind(other),
                }),
            },
        }
    }
}

/// At the path's end: an array, null, or (after `{name}`) an object.
fn check_end(at: &Value, after_each: bool, path: &str) -> Result<(), ShapeError> {
    match at {
        Value::Array(_) | Value::Null => Ok(()),
        Value::Object(_) if after_each => Ok(()),
        other => Err(ShapeError::NotArray {
            at: path.to_string(),
            kind: kind(other),
        }),
    }
}

fn take_at(
    segments: &[Segment],
    depth: usize,
    at: &mut Value,
    captured: &mut Vec<(String, Value)>,
    path: &mut String,
    out: &mut Vec<Element>,
) -> Result<(), ShapeError> {
    match segments.get(depth) {
        None => {
            let after_each = depth > 0 && matches!(segments[depth - 1], Segment::Each(_));
            check_end(at, after_each, path)?;
            match std::mem::take(at) {
                Value::Array(items) => out.extend(items.into_iter().map(|value| Element {
                    value,
                    captured: captured.clone(),
                })),
                Value::Null => {}
                value => out.push(Element {
                    value,
                    captured: captured.clone(),
                }),
            }
            Ok(())
        }
        Some(Segment::Member(name)) => {
            let missing = || ShapeError::Missing {
                at: join(path, name),
            };
            let next = match at {
                Value::Object(map) => map.get_mut(name.as_str()).ok_or_else(missing)?,
                Value::Array(items) => name
                    .parse::<usize>()
                    .ok()
                    .and_then(|i| items.get_mut(i))
                    .ok_or_else(missing)?,
                _ => return Err(missing()),
            };
            let len = path.len();
            push(path, name);
            let r = take_at(segments, depth + 1, next, captured, path, out);
            path.truncate(len);
            r
        }
        Some(Segment::Each(field)) => match at {
            Value::Object(map) => {
                for (name, next) in map.iter_mut() {
                    let len = path.len();
                    push(path, name);
                    captured.push((field.clone(), Value::String(name.clone())));
                    let r = take_at(segments, depth + 1, next, captured, path, out);
                    captured.pop();
                    path.truncate(len);
                    r?;
                }
                Ok(())
            }
            Value::Null => Ok(()),
            other => Err(ShapeError::NotObject {
                at: path.clone(),
                kind: kind(other),
            }),
        },
    }
}

fn member<'a>(at: &'a Value, name: &str) -> Option<&'a Value> {
    match at {
        Value::Object(map) => map.get(name),
        Value::Array(items) => items.get(name.parse::<usize>().ok()?),
        _ => None,
    }
}

fn push(path: &mut String, name: &str) {
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(name);
}

fn join(path: &str, name: &str) -> String {
    let mut p = path.to_string();
    push(&mut p, name);
    p
}

impl std::fmt::Display for ShapeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ShapeError::Missing { at } => write!(f, "nothing at {at:?}"),
            ShapeError::NotArray { at, kind } => {
                write!(f, "{at:?} holds {kind}, not an array")
            }
            ShapeError::NotObject { at, kind } => write!(
                f,
                "{at:?} holds {kind}, but a {{field}} segment needs an object"
            ),
        }
    }
}

/// Constant fields from `[source] set`, as JSON.
pub fn constants(set: &BTreeMap<String, toml::Value>) -> Result<Vec<(String, Value)>, String> {
    set.iter()
        .map(|(name, value)| {
            let json = match value {
                toml::Value::Datetime(d) => Value::String(d.to_string()),
                other => {
                    serde_json::to_value(other).map_err(|e| format!("[source] set.{name}: {e}"))?
                }
            };
            Ok((name.clone(), json))
        })
        .collect()
}

/// Adds the captured member names, then the constants, to a record; both
/// replace a field of the same name.
pub fn add_fields(
    fields: &mut Fields,
    captured: Vec<(String, Value)>,
    constants: &[(String, Value)],
) {
    for (name, value) in captured {
        fields.insert(name, value);
    }
    for (name, value) in constants {
        fields.insert(name.clone(), value.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn records(path: &str, doc: Value) -> Vec<Value> {
        let p = RecordsPath::parse(path).unwrap();
        let n = p.count(&doc).unwrap();
        let out: Vec<Value> = p
            .take(doc)
            .unwrap()
            .into_iter()
            .map(|e| {
                let mut v = e.value;
                for (k, x) in e.captured {
                    v.as_object_mut().unwrap().insert(k, x);
                }
                v
            })
            .collect();
        assert_eq!(n, out.len(), "count agrees with take");
        out
    }

    #[test]
    fn a_member_segment_carries_the_member_name_into_each_record() {
        let doc = json!({
            "SL-1": {"daily_usage": [{"d": 1}, {"d": 2}]},
            "SL-2": {"daily_usage": [{"d": 1}]},
            "SL-3": {"daily_usage": null}
        });
        assert_eq!(
            records("{service_line_id}.daily_usage", doc),
            vec![
                json!({"d": 1, "service_line_id": "SL-1"}),
                json!({"d": 2, "service_line_id": "SL-1"}),
                json!({"d": 1, "service_line_id": "SL-2"}),
            ]
        );
    }

    #[test]
    fn two_member_segments_and_objects_as_records() {
        let doc = json!({"data": {"SL-1": {"2025-01-01": {"gb": 1}, "2025-01-02": {"gb": 2}}}});
        assert_eq!(
            records("data.{line}.{day}", doc),
            vec![
                json!({"gb": 1, "line": "SL-1", "day": "2025-01-01"}),
                json!({"gb": 2, "line": "SL-1", "day": "2025-01-02"}),
            ]
        );
    }

    #[test]
    fn plain_paths_still_work() {
        assert_eq!(records("", json!([{"a": 1}])), vec![json!({"a": 1})]);
        assert_eq!(
            records("data.items", json!({"data": {"items": [{"a": 1}]}})),
            vec![json!({"a": 1})]
        );
        assert_eq!(
            records("pages.1", json!({"pages": [[], [{"a": 2}]]})),
            vec![json!({"a": 2})]
        );
    }

    #[test]
    fn wrong_shapes_name_the_concrete_place() {
        let p = RecordsPath::parse("{line}.daily_usage").unwrap();
        let doc = json!({"SL-1": {"daily_usage": []}, "SL-2": {"other": []}});
        assert_eq!(
            p.count(&doc),
            Err(ShapeError::Missing {
                at: "SL-2.daily_usage".into()
            })
        );
        let p = RecordsPath::parse("").unwrap();
        assert_eq!(
            p.take(json!({"SL-1": {}})),
            Err(ShapeError::NotArray {
                at: "".into(),
                kind: "an object"
            })
        );
        let p = RecordsPath::parse("{line}").unwrap();
        assert!(matches!(
            p.count(&json!([1])),
            Err(ShapeError::NotObject { .. })
        ));
        assert!(RecordsPath::parse("a.{}.b").is_err());
        assert!(RecordsPath::parse("a{x}").is_err());
    }

    #[test]
    fn constants_and_captured_names_replace_fields() {
        let set: BTreeMap<String, toml::Value> =
            toml::from_str("source = \"api\"\nversion = 2").unwrap();
        let constants = constants(&set).unwrap();
        let mut fields = Fields::try_from(json!({"source": "x", "gb": 1})).unwrap();
        add_fields(
            &mut fields,
            vec![("line".into(), json!("SL-1"))],
            &constants,
        );
        assert_eq!(
            Value::from(fields),
            json!({"source": "api", "gb": 1, "line": "SL-1", "version": 2})
        );
    }
}
