//! The load planner: from what a source read to what a destination writes.
//!
//! For each batch it checks every record (field names, value sizes, key,
//! cursor), counts what falls below the checkpoint window as `skipped`, and
//! keeps one version per key: the greatest cursor wins, ties go to the later
//! record, and the superseded versions are counted as `duplicates`. The
//! destination then applies the stale-version rule against stored rows.
//! Nothing here touches a database, so it is where the merge rules are
//! property-tested.

use std::collections::hash_map::{Entry, HashMap};
use std::hash::BuildHasher;

use serde_json::Value;

pub use crate::batch::{AbsentField, PlannedBatch, Row};
use crate::key::{Cursor, Key, KeySpec, HASH_KEY_COLUMN};
use crate::record::{invalid_column_name, value_too_large, Fields, Item, Name, Record, Reject};
use crate::windows::compare;

/// The rules a run plans with.
#[derive(Debug, Clone)]
pub struct Planner {
    pub key: KeySpec,
    pub cursor: Option<String>,
    /// Records below this cursor are skipped.
    pub low: Option<Cursor>,
    /// Records at or above this cursor are skipped (a backfill window's
    /// end).
    pub high: Option<Cursor>,
    pub delete_field: Option<String>,
    pub window_field: Option<String>,
    pub max_value_bytes: usize,
    /// `[load] loaded_at`: the load-time column, stamped on every row of a
    /// batch (a store keeps it only where the row really changed).
    pub loaded_at: Option<String>,
}

impl Planner {
    /// The planner of a pipeline's `[load]` settings, reading everything
    /// (no window).
    pub fn of(settings: &crate::config::LoadSettings) -> Planner {
        Planner {
            key: settings.key.clone(),
            cursor: settings.cursor.clone(),
            low: None,
            high: None,
            delete_field: settings.delete_field.clone(),
            window_field: settings.window_field.clone(),
            max_value_bytes: settings.max_value_bytes,
            loaded_at: settings.compare.loaded_at.clone(),
        }
    }

    /// Plans one batch.
    pub fn plan(&self, items: Vec<Item>) -> PlannedBatch {
        let mut batch = PlannedBatch {
            rows: Vec::with_capacity(items.len()),
            ..Default::default()
        };
        // Rows by a hash of their key's canonical text; keys whose hash an
        // other key already has go to `collided`.
        // foldhash (seeded per process) rather than SipHash: one hash per
        // record; keys whose hashes collide are told apart below.
        let hasher = foldhash::fast::RandomState::default();
        let mut index: HashMap<u64, usize, _> =
            HashMap::with_capacity_and_hasher(items.len(), hasher.clone());
        let mut collided: HashMap<String, usize> = HashMap::new();
        let mut names = NameCheck::default();
        // The fields every record must carry, each with whether one did.
        let mut wanted: Vec<(&'static str, &str, bool)> = Vec::new();
        if let KeySpec::Fields(fields) = &self.key {
            wanted.extend(fields.iter().map(|f| ("key", f.as_str(), false)));
        }
        wanted.extend(self.cursor.iter().map(|f| ("cursor", f.as_str(), false)));
        wanted.extend(
            self.window_field
                .iter()
                .map(|f| ("window", f.as_str(), false)),
        );
        let mut first_fields: Option<Vec<String>> = None;
        for item in items {
            let item = match item {
                Item::FileLoaded(file) => {
                    batch.files.push(file);
                    continue;
                }
                Item::FileSkipped => {
                    batch.stats.files_skipped += 1;
                    continue;
                }
                item => item,
            };
            batch.stats.read += 1;
            let record = match item {
                Item::Reject(reject) => {
                    batch.stats.rejected += 1;
                    batch.rejects.push(reject);
                    continue;
                }
                Item::Skipped => {
                    batch.stats.skipped += 1;
                    continue;
                }
                Item::Record(record) => record,
                Item::FileLoaded(_) | Item::FileSkipped => continue,
            };
            for (_, field, seen) in wanted.iter_mut().filter(|w| !w.2) {
                *seen = record.fields.get(field).is_some_and(|v| !v.is_null());
            }
            if first_fields.is_none() {
                first_fields = Some(record.fields.keys().map(|k| k.to_string()).collect());
            }
            let row = match self.check(record, &mut names) {
                Ok(Some(row)) => row,
                Ok(None) => {
                    batch.stats.skipped += 1;
                    continue;
                }
                Err(reject) => {
                    batch.stats.rejected += 1;
                    batch.rejects.push(*reject);
                    continue;
                }
            };
            if let Some(c) = &row.cursor {
                if batch.max_cursor.as_ref().is_none_or(|m| c > m) {
                    batch.max_cursor = Some(c.clone());
                }
            }
            let canonical = row.key.canonical();
            let found = match index.entry(hasher.hash_one(canonical)) {
                Entry::Vacant(slot) => {
                    slot.insert(batch.rows.len());
                    None
                }
                Entry::Occupied(slot) if batch.rows[*slot.get()].key.canonical() == canonical => {
                    Some(*slot.get())
                }
                Entry::Occupied(_) => match collided.get(canonical) {
                    Some(&at) => Some(at),
                    None => {
                        collided.insert(canonical.to_string(), batch.rows.len());
                        None
                    }
                },
            };
            match found {
                Some(at) => {
                    batch.stats.duplicates += 1;
                    let kept = &batch.rows[at];
                    // Greatest cursor wins; a tie goes to the later record.
                    let newer = match (&row.cursor, &kept.cursor) {
                        (Some(new), Some(old)) => new >= old,
                        _ => true,
                    };
                    if newer {
                        batch.rows[at] = row;
                    }
                }
                None => batch.rows.push(row),
            }
        }
        if let Some(column) = &self.loaded_at {
            let now = Value::String(
                chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            );
            for row in &mut batch.rows {
                row.fields.insert(column.clone(), now.clone());
            }
        }
        if let Some(present) = first_fields {
            batch.absent = wanted
                .iter()
                .find(|w| !w.2)
                .map(|&(role, field, _)| AbsentField {
                    role,
                    field: field.to_string(),
                    present,
                });
        }
        batch
    }

    /// Checks one record: `Ok(None)` when it is below the checkpoint window.
    fn check(&self, mut record: Record, names: &mut NameCheck) -> Result<Option<Row>, Box<Reject>> {
        let reject = |record: &Record, key: Option<&Key>, reason: String| {
            Box::new(Reject::record(record, key.map(|k| k.to_string()), reason))
        };
        // A record below the window is skipped whatever else is wrong with
        // it, as a source that filters while reading skips it unparsed.
        let cursor = self
            .cursor
            .as_ref()
            .and_then(|name| record.fields.get(name))
            .and_then(Cursor::from_json);
        if let Some(c) = &cursor {
            // A date-only value compares as its midnight against
            // timestamp bounds (see `windows::compare`).
            let below = self.low.as_ref().is_some_and(|low| compare(c, low).is_lt());
            let above = self
                .high
                .as_ref()
                .is_some_and(|high| compare(c, high).is_ge());
            if below || above {
                return Ok(None);
            }
        }
        if let Some(reason) = names.first_invalid(&record.fields) {
            return Err(reject(&record, None, reason));
        }
        if record.raw_len > self.max_value_bytes {
            if let Some(reason) = oversized_value(&record.fields, self.max_value_bytes) {
                return Err(reject(&record, None, reason));
            }
        }
        if let Some(reason) = crate::number::beyond_double(&record.fields) {
            return Err(reject(&record, None, reason));
        }
        let key = match self
            .key
            .key_of(&record.fields, self.delete_field.as_deref())
        {
            Ok(key) => key,
            Err(reason) => return Err(reject(&record, None, reason)),
        };
        let cursor = match (&self.cursor, cursor) {
            (None, _) => None,
            (Some(_), Some(c)) => Some(c),
            (Some(name), None) => {
                let reason = match record.fields.get(name) {
                    None | Some(Value::Null) => format!("missing cursor field {name:?}"),
                    Some(value) => format!(
                        "cursor field {name:?} is {value}, not a number, timestamp or string"
                    ),
                };
                return Err(reject(&record, Some(&key), reason));
            }
        };
        if let Some(window) = &self.window_field {
            if record.fields.get(window).is_none_or(Value::is_null) {
                return Err(reject(
                    &record,
                    Some(&key),
                    format!("missing window field {window:?}"),
                ));
            }
        }
        if let Some(column) = &self.loaded_at {
            if record.fields.contains_key(column) {
                return Err(reject(
                    &record,
                    Some(&key),
                    format!(
                        "field {column:?} is the load-time column ([load] loaded_at), which \
                         idemload writes; rename the field or choose another loaded_at"
                    ),
                ));
            }
        }
        let mut delete = false;
        if let Some(name) = &self.delete_field {
            match record.fields.shift_remove(name) {
                None | Some(Value::Null) | Some(Value::Bool(false)) => {}
                Some(Value::Bool(true)) => delete = true,
                Some(other) => {
                    record.fields.insert(name.clone(), other.clone());
                    return Err(reject(
                        &record,
                        Some(&key),
                        format!("delete field {name:?} is {other}, expected true, false or null"),
                    ));
                }
            }
        }
        let fields = match &self.key {
            KeySpec::Hash(_) => {
                let mut with_key = Fields::with_capacity(record.fields.len() + 1);
                with_key.insert(HASH_KEY_COLUMN.to_string(), key.values()[0].clone());
                with_key.extend(record.fields);
                with_key
            }
            KeySpec::Fields(_) => record.fields,
        };
        Ok(Some(Row {
            key,
            fields,
            cursor,
            delete,
            source: record.source,
        }))
    }
}

/// Checks field names, remembering the valid names of the previous record
/// by position: records of one source mostly share theirs.
#[derive(Default)]
struct NameCheck {
    valid: Vec<Name>,
}

impl NameCheck {
    /// Why the first field name that cannot be a column cannot be one.
    fn first_invalid(&mut self, fields: &Fields) -> Option<String> {
        for (at, name) in fields.keys().enumerate() {
            if let Some(valid) = self.valid.get(at) {
                // Records read by one reader share their names.
                if valid == name {
                    continue;
                }
            }
            if let Some(reason) = invalid_column_name(name) {
                return Some(reason);
            }
            if at < self.valid.len() {
                self.valid[at] = name.clone();
            } else {
                self.valid.push(name.clone());
            }
        }
        None
    }
}

/// The first value larger than `max` bytes, described.
fn oversized_value(fields: &Fields, max: usize) -> Option<String> {
    fields.iter().find_map(|(name, value)| {
        let size = match value {
            Value::String(s) => s.len(),
            Value::Object(_) | Value::Array(_) => value.to_string().len(),
            _ => 0,
        };
        (size > max).then(|| value_too_large(name, size, max))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::SourceRef;
    use proptest::prelude::*;
    use serde_json::json;

    fn item(line: u64, v: Value) -> Item {
        Item::Record(Record {
            fields: Fields::try_from(v).unwrap(),
            source: SourceRef::Line {
                path: "t.jsonl".into(),
                line,
            },
            raw_len: 100,
        })
    }

    fn planner(cursor: Option<&str>) -> Planner {
        Planner {
            key: KeySpec::Fields(vec!["id".into()]),
            cursor: cursor.map(String::from),
            low: None,
            high: None,
            delete_field: None,
            window_field: None,
            max_value_bytes: 1 << 20,
            loaded_at: None,
        }
    }

    #[test]
    fn greatest_cursor_wins_and_ties_go_to_the_later_record() {
        let batch = planner(Some("v")).plan(vec![
            item(1, json!({"id": 1, "v": 2, "x": "a"})),
            item(2, json!({"id": 1, "v": 3, "x": "b"})),
            item(3, json!({"id": 1, "v": 1, "x": "c"})),
            item(4, json!({"id": 1, "v": 3, "x": "d"})),
        ]);
        assert_eq!(batch.rows.len(), 1);
        assert_eq!(batch.rows[0].fields["x"], json!("d"));
        assert_eq!(batch.stats.duplicates, 3);
        assert!(batch.stats.read == 4);
    }

    #[test]
    fn records_below_the_window_are_skipped_and_bad_ones_rejected() {
        let mut p = planner(Some("v"));
        p.low = Some(Cursor::Int(10));
        let batch = p.plan(vec![
            item(1, json!({"id": 1, "v": 9})),
            item(2, json!({"id": 2, "v": 10})),
            item(3, json!({"id": 3})),
            item(4, json!({"v": 11})),
        ]);
        assert_eq!(batch.rows.len(), 1);
        assert_eq!(batch.stats.skipped, 1);
        assert_eq!(batch.stats.rejected, 2);
        assert_eq!(batch.rejects[0].reason, "missing cursor field \"v\"");
        assert_eq!(batch.rejects[1].reason, "missing key field \"id\"");
        assert_eq!(batch.rejects[1].source.to_string(), "t.jsonl:4");
    }

    proptest! {
        /// Whatever the order and repetition, the planned batch holds, for
        /// each key, the version with the greatest cursor (the last such one
        /// on ties), and every record is accounted for.
        #[test]
        fn plan_keeps_latest_version_of_each_key(
            versions in proptest::collection::vec((0u8..20, 0u8..5, any::<u16>()), 0..200)
        ) {
            let items: Vec<Item> = versions
                .iter()
                .enumerate()
                .map(|(i, (k, c, x))| item(i as u64, json!({"id": k, "c": c, "x": x})))
                .collect();
            let batch = planner(Some("c")).plan(items);
            let mut expected: std::collections::BTreeMap<u8, (u8, u16)> = Default::default();
            for (k, c, x) in &versions {
                match expected.get(k) {
                    Some((old, _)) if c < old => {}
                    _ => { expected.insert(*k, (*c, *x)); }
                }
            }
            prop_assert_eq!(batch.rows.len(), expected.len());
            for row in &batch.rows {
                let k = row.fields["id"].as_u64().unwrap() as u8;
                let (c, x) = expected[&k];
                prop_assert_eq!(row.fields["c"].as_u64().unwrap() as u8, c);
                prop_assert_eq!(row.fields["x"].as_u64().unwrap() as u16, x);
            }
            prop_assert_eq!(batch.stats.read, versions.len() as u64);
            prop_assert_eq!(batch.stats.duplicates + batch.rows.len() as u64, versions.len() as u64);
        }
    }
}
