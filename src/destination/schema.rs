//! Column types: inferred from the first value a column sees, kept after.
//!
//! A column keeps the type it was created with. JSON strings and numbers are
//! never coerced into each other (an integer may go into a float column), so
//! `7` and `"007"` never become one value; a value that does not fit is
//! rejected with a reason that names the column and both types.
//!
//! Numbers are carried exactly or not at all: a value that an integer or
//! float column cannot hold digit for digit (an integer beyond 64 bits, a
//! decimal with more digits than a double) is rejected with its text as
//! written, never rounded. A column created for such a value is a
//! [`ColumnType::Decimal`], which holds every digit.

use std::borrow::Cow;
use std::collections::HashMap;

use serde_json::Value;

use crate::batch::Row;
use crate::error::{Error, Result};
use crate::key::parse_instant;
use crate::number::{canonical, exact_f64, exact_i64, exact_json};
use crate::record::{Name, Reject};
use crate::stats::RunStats;

/// Logical column types, mapped to each database's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    Integer,
    Float,
    /// Exact numbers: created for an integer beyond 64 bits or a decimal a
    /// double cannot hold (PostgreSQL `numeric`, MySQL `DECIMAL`, SQLite
    /// text of the canonical digits).
    Decimal,
    Boolean,
    /// RFC 3339 text.
    Timestamp,
    Text,
    /// Objects and arrays (and anything in a column created for them).
    Json,
    /// A column idemload did not create and cannot type: takes any scalar.
    Any,
}

/// A value converted for a column.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlValue {
    Null,
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(String),
    Json(String),
}

impl ColumnType {
    /// The type a new column gets for its first non-null value.
    pub fn infer(value: &Value) -> ColumnType {
        match value {
            Value::Null => ColumnType::Text,
            Value::Bool(_) => ColumnType::Boolean,
            Value::Number(n) if n.is_i64() => ColumnType::Integer,
            Value::Number(n) if exact_f64(n).is_some() && !n.is_u64() => ColumnType::Float,
            Value::Number(_) => ColumnType::Decimal,
            Value::String(s) if parse_instant(s).is_some() => ColumnType::Timestamp,
            Value::String(_) => ColumnType::Text,
            Value::Object(_) | Value::Array(_) => ColumnType::Json,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ColumnType::Integer => "integer",
            ColumnType::Float => "float",
            ColumnType::Decimal => "decimal",
            ColumnType::Boolean => "boolean",
            ColumnType::Timestamp => "timestamp",
            ColumnType::Text => "text",
            ColumnType::Json => "json",
            ColumnType::Any => "any",
        }
    }

    /// Converts a value for this column, or says why it does not fit.
    pub fn convert(self, column: &str, value: &Value) -> Result<SqlValue, String> {
        let mismatch = |what: &str| {
            let shown = shorten(value);
            Err(format!(
                "value {shown} of field {column:?} is {what}, but the column is {}",
                self.name()
            ))
        };
        match (self, value) {
            (_, Value::Null) => Ok(SqlValue::Null),
            (ColumnType::Json, v) => Ok(SqlValue::Json(exact_json(v))),
            (_, Value::Object(_) | Value::Array(_)) => mismatch("an object or array"),
            (ColumnType::Integer, Value::Number(n)) => match exact_i64(n) {
                Some(i) => Ok(SqlValue::Int(i)),
                None if is_whole(n) => mismatch("an integer out of the 64-bit range"),
                None => mismatch("a float"),
            },
            (ColumnType::Float, Value::Number(n)) => match exact_f64(n) {
                Some(f) => Ok(SqlValue::Float(f)),
                None => mismatch("a number with more digits than a float holds exactly"),
            },
            (ColumnType::Decimal, Value::Number(n)) => Ok(SqlValue::Text(canonical(n))),
            (ColumnType::Boolean, Value::Bool(b)) => Ok(SqlValue::Bool(*b)),
            (ColumnType::Timestamp, Value::String(s)) => {
                if parse_instant(s).is_some() {
                    Ok(SqlValue::Text(s.clone()))
                } else {
                    mismatch("not an RFC 3339 timestamp")
                }
            }
            (ColumnType::Text, Value::String(s)) => Ok(SqlValue::Text(s.clone())),
            (ColumnType::Any, Value::String(s)) => Ok(SqlValue::Text(s.clone())),
            (ColumnType::Any, Value::Bool(b)) => Ok(SqlValue::Bool(*b)),
            // A value neither a 64-bit integer nor a double holds goes as
            // its digits, for the database to convert to the column's type.
            (ColumnType::Any, Value::Number(n)) => Ok(match (n.as_i64(), exact_f64(n)) {
                (Some(i), _) => SqlValue::Int(i),
                (None, Some(f)) => SqlValue::Float(f),
                (None, None) => SqlValue::Text(canonical(n)),
            }),
            (_, Value::String(_)) => mismatch("text"),
            (_, Value::Number(n)) if n.is_f64() => mismatch("a float"),
            (_, Value::Number(_)) => mismatch("a number"),
            (_, Value::Bool(_)) => mismatch("a boolean"),
        }
    }
}

/// True for a number whose value is a whole number (`7`, `7.0`, `1e30`).
fn is_whole(n: &serde_json::Number) -> bool {
    crate::number::Decimal::parse(n.as_str()).is_some_and(|d| d.is_integer())
}

/// One column of a destination table.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    pub ty: ColumnType,
}

/// The columns of a table, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TableSchema {
    pub columns: Vec<Column>,
}

/// A value as JSON text, cut to 60 bytes for a message.
pub(crate) fn shorten(value: &Value) -> String {
    let mut shown = value.to_string();
    if shown.len() > 60 {
        let mut cut = 57;
        while !shown.is_char_boundary(cut) {
            cut -= 1;
        }
        shown.truncate(cut);
        shown.push_str("...");
    }
    shown
}

/// The logical view of a backend's columns, which the type rules work on.
pub(crate) fn logical<'a>(columns: impl Iterator<Item = (&'a str, ColumnType)>) -> TableSchema {
    TableSchema {
        columns: columns
            .map(|(name, ty)| Column {
                name: name.to_string(),
                ty,
            })
            .collect(),
    }
}

/// Where each key column sits among `names` (a table's columns, in
/// order); an error names the key column the table lacks.
pub(crate) fn key_positions(table: &str, names: &[&str], keys: &[String]) -> Result<Vec<usize>> {
    keys.iter()
        .map(|k| {
            names.iter().position(|n| n == k).ok_or_else(|| {
                Error::destination(
                    format!("table {table:?}"),
                    format!("has no key column {k:?}"),
                )
            })
        })
        .collect()
}

impl TableSchema {
    pub fn position(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }

    /// The column names, in order.
    pub fn names(&self) -> Vec<&str> {
        self.columns.iter().map(|c| c.name.as_str()).collect()
    }

    /// Columns the rows need that the table lacks, typed by their first
    /// non-null value. Fields that are null everywhere get no column yet.
    pub fn missing<'a>(
        &self,
        records: impl Iterator<Item = &'a crate::record::Fields>,
    ) -> Vec<Column> {
        let mut missing: Vec<Column> = Vec::new();
        // The names of the last record whose every field has a column:
        // records with the same names need no look.
        let mut covered: Vec<Name> = Vec::new();
        for fields in records {
            if fields.len() == covered.len() && fields.keys().zip(&covered).all(|(a, b)| a.same(b))
            {
                continue;
            }
            let mut all_known = true;
            for (i, (name, value)) in fields.iter().enumerate() {
                // Records mostly list their fields in the table's order.
                let at_i = self.columns.get(i).is_some_and(|c| *c.name == **name);
                if at_i || self.position(name).is_some() {
                    continue;
                }
                all_known = false;
                if value.is_null() {
                    continue;
                }
                if missing.iter().any(|c| *c.name == **name) {
                    continue;
                }
                missing.push(Column {
                    name: name.to_string(),
                    ty: ColumnType::infer(value),
                });
            }
            if all_known {
                covered.clear();
                covered.extend(fields.keys().cloned());
            }
        }
        missing
    }
}

/// How a database compares column names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameCase {
    /// Byte for byte (PostgreSQL's quoted names): `Email` and `email` are
    /// two columns.
    Exact,
    /// ASCII letters without case, every other character exactly (SQLite).
    Ascii,
    /// Letters without case (MySQL and MariaDB): `É` and `é` are one column.
    Unicode,
}

impl NameCase {
    fn fold<'a>(self, name: &'a str) -> Cow<'a, str> {
        match self {
            NameCase::Exact => Cow::Borrowed(name),
            NameCase::Ascii if !name.bytes().any(|b| b.is_ascii_uppercase()) => Cow::Borrowed(name),
            NameCase::Ascii => Cow::Owned(name.to_ascii_lowercase()),
            NameCase::Unicode if !name.chars().any(char::is_uppercase) => Cow::Borrowed(name),
            NameCase::Unicode => Cow::Owned(name.to_lowercase()),
        }
    }
}

/// What the columns of one database's tables may be: how their names
/// compare and how many a table holds.
///
/// Every backend fits a batch's rows to its table through [`ColumnRules::fit`]
/// before any DDL, so a record that cannot get a column for each of its
/// fields is a reject with a reason, never a failed `CREATE` or `ALTER`.
#[derive(Debug, Clone, Copy)]
pub struct ColumnRules {
    /// The database's name, for reasons.
    pub database: &'static str,
    pub case: NameCase,
    /// Columns a table may have.
    pub max_columns: usize,
}

impl ColumnRules {
    /// SQLite: `SQLITE_MAX_COLUMN` is 2000 in the bundled library.
    pub const SQLITE: ColumnRules = ColumnRules {
        database: "SQLite",
        case: NameCase::Ascii,
        max_columns: 2000,
    };
    /// PostgreSQL: 1600 columns per table.
    pub const POSTGRES: ColumnRules = ColumnRules {
        database: "PostgreSQL",
        case: NameCase::Exact,
        max_columns: 1600,
    };
    /// MySQL and MariaDB with InnoDB: 1017 columns per table.
    pub const MYSQL: ColumnRules = ColumnRules {
        database: "MySQL",
        case: NameCase::Unicode,
        max_columns: 1017,
    };

    /// Fits rows to a table whose columns are `columns`, in input order.
    ///
    /// A field whose name is a column's under the database's rules (`email`
    /// where the table has `Email`, in SQLite or MySQL) goes into that
    /// column: the row's field is renamed to the column's name. A row that
    /// has two fields for one column, or whose new fields would make the
    /// table wider than the database allows (counting the columns earlier
    /// rows of the batch add), becomes a reject with the reason. Null fields
    /// get no column yet, so they do not count toward the width.
    pub fn fit<'a>(
        &self,
        table: &str,
        columns: impl Iterator<Item = &'a str>,
        rows: Vec<Row>,
        stats: &mut RunStats,
        rejects: &mut Vec<Reject>,
    ) -> Vec<Row> {
        // Folded name -> the column's name, for the table's columns and the
        // ones earlier rows of this batch bring.
        let mut known: HashMap<String, String> = HashMap::new();
        for name in columns {
            known
                .entry(self.fold(name).into_owned())
                .or_insert_with(|| name.to_string());
        }
        let existing = known.len();
        let mut kept = Vec::with_capacity(rows.len());
        // The names of the last row kept as it came: rows with the same
        // names (most rows) need no look.
        let mut covered: Vec<Name> = Vec::new();
        for mut row in rows {
            let fields = &row.fields;
            if fields.len() == covered.len() && fields.keys().zip(&covered).all(|(a, b)| a.same(b))
            {
                kept.push(row);
                continue;
            }
            match self.check(table, existing, &known, fields) {
                Err(reason) => {
                    stats.rejected += 1;
                    rejects.push(Reject {
                        source: row.source.clone(),
                        key: Some(row.key.to_string()),
                        raw: serde_json::to_string(&row.fields).unwrap_or_default(),
                        reason,
                    });
                }
                Ok(fit) => {
                    for name in fit.added {
                        known.insert(self.fold(&name).into_owned(), name);
                    }
                    if fit.renamed {
                        row.fields = std::mem::take(&mut row.fields)
                            .into_iter()
                            .map(|(name, value)| match known.get(&*self.fold(&name)) {
                                Some(column) if **column != *name => (Name::from(column), value),
                                _ => (name, value),
                            })
                            .collect();
                    } else {
                        covered.clear();
                        covered.extend(row.fields.keys().cloned());
                    }
                    kept.push(row);
                }
            }
        }
        kept
    }

    fn fold<'n>(&self, name: &'n str) -> Cow<'n, str> {
        self.case.fold(name)
    }

    /// Whether one row fits; the names of the columns it adds.
    fn check(
        &self,
        table: &str,
        existing: usize,
        known: &HashMap<String, String>,
        fields: &crate::record::Fields,
    ) -> Result<Fit, String> {
        let mut fit = Fit::default();
        // Folded name -> the field that claimed it, within this row.
        let mut claimed: HashMap<Cow<'_, str>, &str> = HashMap::with_capacity(fields.len());
        for (name, value) in fields.iter() {
            let folded = self.fold(name);
            match known.get(&*folded) {
                Some(column) if **column != **name => fit.renamed = true,
                Some(_) => {}
                None if value.is_null() => {}
                None => fit.added.push(name.to_string()),
            }
            if let Some(other) = claimed.insert(folded, name) {
                return Err(format!(
                    "fields {other:?} and {name:?} would be one column: {} column names ignore case; rename one of them",
                    self.database
                ));
            }
        }
        let width = known.len() + fit.added.len();
        if width > self.max_columns {
            let has = known.len();
            let brought = if existing == has {
                format!("table {table:?} has {has} columns")
            } else {
                format!(
                    "table {table:?} has {existing} columns and earlier records of the batch add {}",
                    has - existing
                )
            };
            return Err(format!(
                "record has {} fields with no column yet; {brought}, and a {} table holds at most {}",
                fit.added.len(),
                self.database,
                self.max_columns
            ));
        }
        Ok(fit)
    }
}

/// What a row that fits brings.
#[derive(Default)]
struct Fit {
    /// Names of the new columns it needs.
    added: Vec<String>,
    /// Some field goes into a column spelt otherwise.
    renamed: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strings_and_numbers_are_never_coerced() {
        assert!(ColumnType::Text.convert("zip", &json!(7)).is_err());
        assert!(ColumnType::Integer.convert("n", &json!("7")).is_err());
        assert_eq!(
            ColumnType::Float.convert("x", &json!(7)).unwrap(),
            SqlValue::Float(7.0)
        );
        assert_eq!(
            ColumnType::Integer.convert("n", &json!(7.0)).unwrap(),
            SqlValue::Int(7)
        );
        let err = ColumnType::Integer.convert("n", &json!(7.5)).unwrap_err();
        assert_eq!(
            err,
            "value 7.5 of field \"n\" is a float, but the column is integer"
        );
        assert!(ColumnType::Timestamp
            .convert("t", &json!("yesterday"))
            .is_err());
        assert_eq!(
            ColumnType::Json
                .convert("j", &json!({"b": 1, "a": 2}))
                .unwrap(),
            SqlValue::Json("{\"a\":2,\"b\":1}".into())
        );
    }

    fn row(id: i64, fields: serde_json::Value) -> Row {
        Row {
            key: crate::key::Key::new(vec![json!(id)]),
            fields: crate::record::Fields::try_from(fields).unwrap(),
            cursor: None,
            delete: false,
            source: crate::record::SourceRef::Line {
                path: "f.jsonl".into(),
                line: id as u64,
            },
        }
    }

    #[test]
    fn fields_fit_columns_under_each_backend_rules() {
        let rows = || {
            vec![
                row(1, json!({"id": 1, "email": "a"})),
                row(2, json!({"id": 2, "Email": "b", "EMAIL": null})),
                row(3, json!({"id": 3, "É": 1})),
                row(4, json!({"id": 4, "é": 2})),
            ]
        };
        let fit = |rules: ColumnRules| {
            let (mut stats, mut rejects) = (RunStats::default(), Vec::new());
            let kept = rules.fit("t", ["ID"].into_iter(), rows(), &mut stats, &mut rejects);
            let names: Vec<Vec<String>> = kept
                .iter()
                .map(|r| r.fields.keys().map(|n| n.to_string()).collect())
                .collect();
            (names, rejects.len() as u64, stats.rejected)
        };
        // SQLite folds ASCII only: `É` and `é` are two columns.
        let (names, rejected, counted) = fit(ColumnRules::SQLITE);
        assert_eq!((rejected, counted), (1, 1));
        assert_eq!(names[0], ["ID", "email"]);
        assert_eq!(names[1], ["ID", "É"]);
        assert_eq!(names[2], ["ID", "é"]);
        // MySQL folds every letter.
        let (names, rejected, _) = fit(ColumnRules::MYSQL);
        assert_eq!(rejected, 1);
        assert_eq!(names[2], ["ID", "É"]);
        // PostgreSQL compares quoted names exactly.
        let (names, rejected, _) = fit(ColumnRules::POSTGRES);
        assert_eq!(rejected, 0);
        assert_eq!(names[1], ["id", "Email", "EMAIL"]);
    }

    #[test]
    fn a_row_wider_than_the_table_may_be_is_rejected() {
        let rules = ColumnRules {
            max_columns: 4,
            ..ColumnRules::SQLITE
        };
        let (mut stats, mut rejects) = (RunStats::default(), Vec::new());
        let kept = rules.fit(
            "t",
            ["id", "a"].into_iter(),
            vec![
                row(1, json!({"id": 1, "b": 1, "c": 1, "d": 1})),
                row(2, json!({"id": 2, "b": 1, "x": null, "y": null})),
                row(3, json!({"id": 3, "c": 1})),
                row(4, json!({"id": 4, "e": 1})),
            ],
            &mut stats,
            &mut rejects,
        );
        assert_eq!(kept.len(), 2);
        assert_eq!(rejects.len(), 2);
        assert!(
            rejects[0]
                .reason
                .contains("record has 3 fields with no column yet; table \"t\" has 2 columns"),
            "{}",
            rejects[0].reason
        );
        assert!(
            rejects[1]
                .reason
                .contains("has 2 columns and earlier records of the batch add 2"),
            "{}",
            rejects[1].reason
        );
    }

    #[test]
    fn new_columns_take_the_type_of_their_first_non_null_value() {
        let schema = TableSchema {
            columns: vec![Column {
                name: "id".into(),
                ty: ColumnType::Integer,
            }],
        };
        let a = json!({"id": 1, "x": null, "t": "2024-01-01T00:00:00Z"});
        let b = json!({"id": 2, "x": 1.5});
        let rows = [
            crate::record::Fields::try_from(a).unwrap(),
            crate::record::Fields::try_from(b).unwrap(),
        ];
        let missing = schema.missing(rows.iter());
        assert_eq!(
            missing,
            vec![
                Column {
                    name: "t".into(),
                    ty: ColumnType::Timestamp
                },
                Column {
                    name: "x".into(),
                    ty: ColumnType::Float
                },
            ]
        );
    }
}
