//! [`Fields`]: the top-level fields of a record, in input order.
//!
//! A record's fields are mostly read and rarely changed, and the records of
//! one source mostly share their field names. So the fields are a vector of
//! (name, value) pairs whose names are interned [`Name`]s: the reader hands
//! every record of the same shape the same names, instead of allocating and
//! hashing each name of each record as a general map would, and code that
//! meets the same names again can compare them by address. Looking a name
//! up is a scan for narrow records and a hash index, built on first use,
//! for wide ones.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::sync::{Arc, Mutex, OnceLock};

use serde::de::{DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A field name, shared between the records that have it.
///
/// Names are interned for the life of the process (copied without a
/// reference count, compared by address first), up to [`INTERNED_MAX_BYTES`]
/// of them; past that, as with data whose field names never repeat, a name
/// is reference counted and freed with its last record.
#[derive(Clone)]
pub struct Name(Repr);

#[derive(Clone)]
enum Repr {
    Interned(&'static str),
    Counted(Arc<str>),
}

/// How many bytes of names the process interns at most.
pub const INTERNED_MAX_BYTES: usize = 1 << 20;

struct Interned {
    names: HashSet<&'static str>,
    bytes: usize,
}

fn interned() -> &'static Mutex<Interned> {
    static INTERNED: OnceLock<Mutex<Interned>> = OnceLock::new();
    INTERNED.get_or_init(|| {
        Mutex::new(Interned {
            names: HashSet::new(),
            bytes: 0,
        })
    })
}

impl Name {
    /// The name `text`, interned while the budget lasts.
    pub fn new(text: &str) -> Name {
        let mut table = interned().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&name) = table.names.get(text) {
            return Name(Repr::Interned(name));
        }
        if table.bytes + text.len() > INTERNED_MAX_BYTES {
            return Name(Repr::Counted(Arc::from(text)));
        }
        let name: &'static str = Box::leak(text.into());
        table.bytes += name.len();
        table.names.insert(name);
        Name(Repr::Interned(name))
    }

    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Interned(s) => s,
            Repr::Counted(s) => s,
        }
    }

    /// The same interned name (a fast, conservative equality: false says
    /// nothing).
    pub fn same(&self, other: &Name) -> bool {
        match (&self.0, &other.0) {
            (Repr::Interned(a), Repr::Interned(b)) => std::ptr::eq(*a, *b),
            (Repr::Counted(a), Repr::Counted(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Deref for Name {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for Name {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Name) -> bool {
        self.same(other) || self.as_str() == other.as_str()
    }
}

impl Eq for Name {}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl Hash for Name {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for Name {
    fn from(text: &str) -> Name {
        Name::new(text)
    }
}

impl From<String> for Name {
    fn from(text: String) -> Name {
        Name::new(&text)
    }
}

impl From<&String> for Name {
    fn from(text: &String) -> Name {
        Name::new(text)
    }
}

/// Records with more fields than this are looked up through a hash index.
const SCAN_MAX: usize = 16;

/// The fields of a record, in input order; a name appears once.
#[derive(Default)]
pub struct Fields {
    entries: Vec<(Name, Value)>,
    /// Position of each name, for wide records; built on the first lookup
    /// after a change. Boxed: most records never have one, and records are
    /// moved a lot.
    #[allow(clippy::box_collection)]
    index: OnceLock<Box<HashMap<Name, usize>>>,
}

impl Fields {
    pub fn new() -> Fields {
        Fields::default()
    }

    pub fn with_capacity(capacity: usize) -> Fields {
        Fields {
            entries: Vec::with_capacity(capacity),
            index: OnceLock::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Where `name` is.
    fn position(&self, name: &str) -> Option<usize> {
        if self.entries.len() <= SCAN_MAX {
            return self.entries.iter().position(|(n, _)| n.as_str() == name);
        }
        let index = self.index.get_or_init(|| {
            let mut index = HashMap::with_capacity(self.entries.len());
            for (at, (n, _)) in self.entries.iter().enumerate() {
                index.insert(n.clone(), at);
            }
            Box::new(index)
        });
        index.get(name).copied()
    }

    pub fn get(&self, name: &str) -> Option<&Value> {
        self.position(name).map(|at| &self.entries[at].1)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Value> {
        self.position(name).map(|at| &mut self.entries[at].1)
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.position(name).is_some()
    }

    /// Sets a field: a name already present keeps its position and gets
    /// the new value (the old one is returned); a new name goes last.
    pub fn insert(&mut self, name: impl Into<Name>, value: Value) -> Option<Value> {
        let name = name.into();
        match self.position(&name) {
            Some(at) => Some(std::mem::replace(&mut self.entries[at].1, value)),
            None => {
                self.push_new(name, value);
                None
            }
        }
    }

    /// Appends a name known not to be present.
    fn push_new(&mut self, name: Name, value: Value) {
        if let Some(index) = self.index.get_mut() {
            index.insert(name.clone(), self.entries.len());
        }
        self.entries.push((name, value));
    }

    /// Removes a field, keeping the order of the others.
    pub fn shift_remove(&mut self, name: &str) -> Option<Value> {
        let at = self.position(name)?;
        self.index.take();
        Some(self.entries.remove(at).1)
    }

    /// The fields in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&Name, &Value)> + Clone {
        self.entries.iter().map(|(n, v)| (n, v))
    }

    pub fn keys(&self) -> impl ExactSizeIterator<Item = &Name> + Clone {
        self.entries.iter().map(|(n, _)| n)
    }

    pub fn values(&self) -> impl ExactSizeIterator<Item = &Value> + Clone {
        self.entries.iter().map(|(_, v)| v)
    }
}

impl Clone for Fields {
    fn clone(&self) -> Fields {
        Fields {
            entries: self.entries.clone(),
            index: OnceLock::new(),
        }
    }
}

impl fmt::Debug for Fields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// Equal when they hold the same names with equal values, in any order
/// (as JSON objects compare).
impl PartialEq for Fields {
    fn eq(&self, other: &Fields) -> bool {
        self.len() == other.len() && self.iter().all(|(n, v)| other.get(n) == Some(v))
    }
}

impl std::ops::Index<&str> for Fields {
    type Output = Value;

    /// The value of `name`, or null when there is none (as
    /// `serde_json::Map` indexes).
    fn index(&self, name: &str) -> &Value {
        static NULL: Value = Value::Null;
        self.get(name).unwrap_or(&NULL)
    }
}

impl<N: Into<Name>> Extend<(N, Value)> for Fields {
    fn extend<I: IntoIterator<Item = (N, Value)>>(&mut self, iter: I) {
        for (name, value) in iter {
            self.insert(name, value);
        }
    }
}

impl<N: Into<Name>> FromIterator<(N, Value)> for Fields {
    fn from_iter<I: IntoIterator<Item = (N, Value)>>(iter: I) -> Fields {
        let mut fields = Fields::new();
        fields.extend(iter);
        fields
    }
}

impl IntoIterator for Fields {
    type Item = (Name, Value);
    type IntoIter = std::vec::IntoIter<(Name, Value)>;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter()
    }
}

impl From<serde_json::Map<String, Value>> for Fields {
    fn from(map: serde_json::Map<String, Value>) -> Fields {
        let mut fields = Fields::with_capacity(map.len());
        // A map's names are distinct already.
        for (name, value) in map {
            fields.push_new(name.into(), value);
        }
        fields
    }
}

impl From<Fields> for serde_json::Map<String, Value> {
    fn from(fields: Fields) -> Self {
        fields
            .entries
            .into_iter()
            .map(|(n, v)| (n.to_string(), v))
            .collect()
    }
}

/// An object's fields; any other value is given back.
impl TryFrom<Value> for Fields {
    type Error = Value;

    fn try_from(value: Value) -> Result<Fields, Value> {
        match value {
            Value::Object(map) => Ok(map.into()),
            other => Err(other),
        }
    }
}

impl From<Fields> for Value {
    fn from(fields: Fields) -> Value {
        Value::Object(fields.into())
    }
}

impl Serialize for Fields {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.len()))?;
        for (name, value) in self.iter() {
            map.serialize_entry(&**name, value)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Fields, D::Error> {
        ShapedFields {
            shape: &mut Vec::new(),
        }
        .deserialize(d)
    }
}

/// Reads a JSON object into [`Fields`], reusing the names of the previous
/// object read with the same `shape`: while the names come in the same
/// order, none is allocated or checked for repeats. A repeated name keeps
/// its first position and its last value, as `serde_json::Map` does.
pub(crate) struct ShapedFields<'a> {
    /// The names of the previous object, in order (distinct).
    pub(crate) shape: &'a mut Vec<Name>,
}

impl<'de> DeserializeSeed<'de> for ShapedFields<'_> {
    type Value = Fields;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Fields, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ShapedFields<'_> {
    type Value = Fields;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
        let shape = self.shape;
        let mut fields = Fields::with_capacity(shape.len().min(1024));
        // True while every name so far is the shape's name at its position:
        // then the names so far are distinct, and so is the next one that
        // matches.
        let mut same = true;
        while let Some(name) = map.next_key_seed(NameSeed {
            expected: if same { shape.get(fields.len()) } else { None },
        })? {
            let value = map.next_value::<Value>()?;
            match name {
                Named::Expected => {
                    let name = shape[fields.len()].clone();
                    fields.entries.push((name, value));
                }
                Named::Other(name) => {
                    if same {
                        same = false;
                        shape.truncate(fields.len());
                    }
                    let before = fields.len();
                    fields.insert(name, value);
                    if fields.len() > before {
                        shape.push(fields.entries[before].0.clone());
                    }
                }
            }
        }
        shape.truncate(fields.len());
        Ok(fields)
    }
}

/// An object key: the expected name, or another one.
enum Named {
    Expected,
    Other(Name),
}

struct NameSeed<'a> {
    expected: Option<&'a Name>,
}

impl<'de> DeserializeSeed<'de> for NameSeed<'_> {
    type Value = Named;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Named, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for NameSeed<'_> {
    type Value = Named;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Named, E> {
        match self.expected {
            Some(name) if **name == *key => Ok(Named::Expected),
            _ => Ok(Named::Other(key.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(shape: &mut Vec<Name>, text: &str) -> Fields {
        let mut de = serde_json::Deserializer::from_str(text);
        ShapedFields { shape }.deserialize(&mut de).unwrap()
    }

    fn as_map(fields: &Fields) -> serde_json::Map<String, Value> {
        fields.clone().into()
    }

    #[test]
    fn reads_objects_as_serde_json_does_whatever_the_previous_shape() {
        let texts = [
            r#"{"a":1,"b":2,"c":3}"#,
            r#"{"a":1,"b":2,"c":3}"#,
            r#"{"a":1,"b":2}"#,
            r#"{"a":1,"b":2,"a":7}"#,
            r#"{"a":1,"b":2,"c":3}"#,
            r#"{"c":1,"a":2,"c":9,"b":3}"#,
            r#"{"c":1,"a":2,"c":9,"b":3}"#,
            r#"{"c":1}"#,
            r#"{"c":1,"b":2,"c":3,"b":4,"a":5}"#,
            r#"{}"#,
            r#"{"a":{"x":1},"a":[1]}"#,
        ];
        let mut shape = Vec::new();
        for text in texts {
            let fields = read(&mut shape, text);
            let expected: serde_json::Map<String, Value> = serde_json::from_str(text).unwrap();
            assert_eq!(as_map(&fields), expected, "{text}");
            let names: Vec<&str> = fields.keys().map(|n| &**n).collect();
            let order: Vec<&str> = expected.keys().map(String::as_str).collect();
            assert_eq!(names, order, "{text}");
            assert_eq!(shape.len(), fields.len());
            // A second read with the shape just left gives the same fields.
            assert_eq!(as_map(&read(&mut shape, text)), expected, "{text} again");
        }
    }

    #[test]
    fn records_of_one_shape_share_their_names() {
        let mut shape = Vec::new();
        let a = read(&mut shape, r#"{"id":1,"name":"x"}"#);
        let b = read(&mut shape, r#"{"id":2,"name":"y"}"#);
        assert!(a.keys().next().unwrap().same(b.keys().next().unwrap()));
    }

    #[test]
    fn wide_records_are_looked_up_and_changed_through_the_index() {
        let mut fields: Fields = (0..40).map(|i| (format!("f{i}"), json!(i))).collect();
        assert_eq!(fields["f33"], json!(33));
        assert_eq!(fields.insert("f33", json!("x")), Some(json!(33)));
        assert_eq!(fields.insert("new", json!(1)), None);
        assert_eq!(fields.get("new"), Some(&json!(1)));
        assert_eq!(fields.shift_remove("f0"), Some(json!(0)));
        assert_eq!(fields.get("f33"), Some(&json!("x")));
        assert_eq!(fields.keys().next().unwrap().as_str(), "f1");
        assert_eq!(fields.get("f0"), None);
        assert_eq!(fields.len(), 40);
        assert_eq!(fields["missing"], Value::Null);
    }

    #[test]
    fn serializes_in_order_and_compares_as_an_object() {
        let a: Fields = [("b", json!(1)), ("a", json!(2))].into_iter().collect();
        let b: Fields = [("a", json!(2)), ("b", json!(1))].into_iter().collect();
        assert_eq!(serde_json::to_string(&a).unwrap(), r#"{"b":1,"a":2}"#);
        assert_eq!(a, b);
        let back: Fields = serde_json::from_str(r#"{"b":1,"a":2}"#).unwrap();
        assert_eq!(back, a);
    }
}
