//! PostgreSQL column types: what idemload creates, what it reads back from
//! the catalog, and how a value is checked for a column before it is sent.
//!
//! New columns are `bigint`, `double precision`, `numeric` (exact numbers:
//! an integer beyond the 64-bit range, a decimal a double cannot hold),
//! `boolean`, `timestamptz`, `text` or `jsonb`. A table
//! idemload did not create keeps its own types: each maps to a logical
//! [`ColumnType`] for checking and to the [`Stage`] type the binary COPY
//! sends, cast to the column's type in SQL when they differ. Every check
//! happens in Rust, so a value that does not fit is a reject and never a
//! failed batch.

use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio_postgres::{GenericClient, Transaction};

use super::{pg_error, qualified, Run};
use crate::batch::Row;
use crate::destination::fills::{uncovered_key, Fill, Fills};
use crate::destination::schema::{logical, shorten, ColumnRules, ColumnType, SqlValue};
use crate::destination::sql::{column_definitions, column_list, quote};
use crate::error::Result;
use crate::record::{Fields, Reject};
use crate::stats::RunStats;

/// The type a value travels in through the binary COPY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    Int8,
    Float8,
    Bool,
    Timestamptz,
    Text,
    Jsonb,
}

impl Stage {
    pub(super) fn sql(self) -> &'static str {
        match self {
            Stage::Int8 => "bigint",
            Stage::Float8 => "double precision",
            Stage::Bool => "boolean",
            Stage::Timestamptz => "timestamp with time zone",
            Stage::Text => "text",
            Stage::Jsonb => "jsonb",
        }
    }
}

/// One column of a PostgreSQL table.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct PgColumn {
    pub name: String,
    /// The logical type values are checked against.
    pub ty: ColumnType,
    /// The catalog's type name (`int4`, `varchar`, `numeric`, …).
    pub udt: String,
    /// The type as SQL writes it (`character varying(20)`).
    pub sql: String,
}

impl PgColumn {
    /// A column idemload creates for its first non-null value.
    pub(super) fn new(name: &str, ty: ColumnType, _first: Option<&Value>) -> PgColumn {
        let (udt, sql) = match ty {
            ColumnType::Decimal => ("numeric", "numeric"),
            ColumnType::Integer => ("int8", "bigint"),
            ColumnType::Float => ("float8", "double precision"),
            ColumnType::Boolean => ("bool", "boolean"),
            ColumnType::Timestamp => ("timestamptz", "timestamp with time zone"),
            ColumnType::Json => ("jsonb", "jsonb"),
            ColumnType::Text | ColumnType::Any => ("text", "text"),
        };
        PgColumn {
            name: name.to_string(),
            ty,
            udt: udt.into(),
            sql: sql.into(),
        }
    }

    /// A column read from the catalog.
    fn read(name: String, udt: String, sql: String) -> PgColumn {
        let ty = match udt.as_str() {
            "int8" | "int4" | "int2" => ColumnType::Integer,
            "numeric" => ColumnType::Decimal,
            "float8" | "float4" => ColumnType::Float,
            "bool" => ColumnType::Boolean,
            "timestamptz" | "timestamp" => ColumnType::Timestamp,
            "text" | "varchar" | "bpchar" | "name" | "citext" => ColumnType::Text,
            "jsonb" | "json" => ColumnType::Json,
            _ => ColumnType::Any,
        };
        PgColumn { name, ty, udt, sql }
    }

    pub(super) fn is_numeric(&self) -> bool {
        self.udt == "numeric"
    }

    /// The type this column's values are sent as.
    pub(super) fn stage(&self) -> Stage {
        if self.is_numeric() {
            return Stage::Text;
        }
        match self.ty {
            ColumnType::Integer => Stage::Int8,
            ColumnType::Float => Stage::Float8,
            ColumnType::Decimal => Stage::Text,
            ColumnType::Boolean => Stage::Bool,
            ColumnType::Timestamp => Stage::Timestamptz,
            ColumnType::Json => Stage::Jsonb,
            ColumnType::Text | ColumnType::Any => Stage::Text,
        }
    }

    /// `expr` cast to the column's type when the stage type differs.
    pub(super) fn cast(&self, expr: &str) -> String {
        if self.stage().sql() == self.sql {
            expr.to_string()
        } else {
            format!("{expr}::{}", self.sql)
        }
    }

    /// `expr` as it is compared for "unchanged": by value, never as text
    /// (`json` has no equality, so it compares as `jsonb`).
    pub(super) fn comparable(&self, expr: &str) -> String {
        match (self.udt.as_str(), self.ty) {
            ("json", _) => format!("{expr}::jsonb"),
            (_, ColumnType::Any) => format!("{expr}::text"),
            _ => expr.to_string(),
        }
    }

    /// Checks and converts a value for this column, or says why it does not fit.
    pub(super) fn convert(&self, value: &Value) -> std::result::Result<SqlValue, String> {
        let name = &self.name;
        if self.is_numeric() {
            return match value {
                Value::Null => Ok(SqlValue::Null),
                Value::Number(n) => Ok(SqlValue::Text(n.to_string())),
                other => {
                    let what = match other {
                        Value::String(_) => "text",
                        Value::Bool(_) => "a boolean",
                        _ => "an object or array",
                    };
                    Err(format!(
                        "value {} of field {name:?} is {what}, but the column is numeric",
                        shorten(other)
                    ))
                }
            };
        }
        let converted = self.ty.convert(name, value)?;
        let range = match self.udt.as_str() {
            "int4" => Some((i32::MIN as i64, i32::MAX as i64, "integer")),
            "int2" => Some((i16::MIN as i64, i16::MAX as i64, "smallint")),
            _ => None,
        };
        match (&converted, range) {
            (SqlValue::Int(i), Some((lo, hi, ty))) if *i < lo || *i > hi => {
                return Err(format!(
                    "value {i} of field {name:?} is out of the range of the column's type {ty}"
                ))
            }
            (SqlValue::Float(f), _) if self.udt == "float4" && f.abs() > f32::MAX as f64 => {
                return Err(format!(
                    "value {f} of field {name:?} is out of the range of the column's type real"
                ))
            }
            (SqlValue::Text(s), _) if s.contains('\0') => {
                return Err(format!(
                    "value of field {name:?} contains a NUL character, which PostgreSQL text cannot hold"
                ))
            }
            (SqlValue::Json(_), _) if has_nul(value) => {
                return Err(format!(
                    "value of field {name:?} contains a NUL character, which PostgreSQL jsonb cannot hold"
                ))
            }
            _ => {}
        }
        Ok(converted)
    }
}

fn has_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// The columns of a table, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct PgSchema {
    pub columns: Vec<PgColumn>,
}

impl PgSchema {
    pub(super) fn position(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }

    /// The column names, in order.
    pub(super) fn names(&self) -> Vec<&str> {
        self.columns.iter().map(|c| c.name.as_str()).collect()
    }

    /// Columns the rows need that the table lacks (the shared inference of
    /// [`TableSchema::missing`], with `numeric` for integers beyond 64 bits).
    pub(super) fn missing<'a>(
        &self,
        rows: impl Iterator<Item = &'a Fields> + Clone,
    ) -> Vec<PgColumn> {
        let logical = logical(self.columns.iter().map(|c| (c.name.as_str(), c.ty)));
        logical
            .missing(rows.clone())
            .into_iter()
            .map(|c| {
                let first = rows
                    .clone()
                    .filter_map(|f| f.get(&c.name))
                    .find(|v| !v.is_null());
                PgColumn::new(&c.name, c.ty, first)
            })
            .collect()
    }
}

/// The columns of `schema.table`, or `None` when it does not exist.
pub(super) async fn read_schema(
    client: &impl GenericClient,
    schema: &str,
    table: &str,
) -> Result<Option<PgSchema>> {
    let rows = client
        .query(
            "SELECT a.attname::text, t.typname::text, format_type(a.atttypid, a.atttypmod)
             FROM pg_catalog.pg_attribute a
             JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
             JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped
               AND c.relkind IN ('r', 'p')
             ORDER BY a.attnum",
            &[&schema, &table],
        )
        .await
        .map_err(pg_error(format!("table {schema:?}.{table:?}")))?;
    let columns: Vec<PgColumn> = rows
        .into_iter()
        .map(|r| PgColumn::read(r.get(0), r.get(1), r.get(2)))
        .collect();
    Ok((!columns.is_empty()).then_some(PgSchema { columns }))
}

/// For a table that exists when a run starts: stops when no primary key or
/// unique index covers the key, else says what the table fills in itself.
pub(super) async fn existing_table(
    client: &impl GenericClient,
    schema: &str,
    table: &str,
    keys: &[String],
) -> Result<Fills> {
    let Some(existing) = read_schema(client, schema, table).await? else {
        return Ok(Fills::default());
    };
    if super::inspect::unique_covering(client, schema, table, keys)
        .await?
        .is_none()
    {
        let columns: Vec<&str> = existing.columns.iter().map(|c| c.name.as_str()).collect();
        return Err(uncovered_key(table, keys, &columns));
    }
    let rows = client
        .query(
            "SELECT a.attname::text, a.attgenerated <> '', a.atthasdef OR a.attidentity <> '',
                    a.attnotnull
             FROM pg_catalog.pg_attribute a
             JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&schema, &table],
        )
        .await
        .map_err(pg_error(format!("table {schema:?}.{table:?}")))?;
    Ok(Fills(
        rows.iter()
            .filter_map(|r| {
                let fill = match (r.get(1), r.get(2), r.get(3)) {
                    (true, _, _) => Fill::Generated,
                    (false, true, _) => Fill::Default,
                    (false, false, true) => Fill::Required,
                    (false, false, false) => return None,
                };
                Some((r.get(0), fill))
            })
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_are_checked_against_the_real_column_type() {
        let int4 = PgColumn::read("n".into(), "int4".into(), "integer".into());
        assert_eq!(int4.convert(&json!(7)).unwrap(), SqlValue::Int(7));
        assert!(int4
            .convert(&json!(3_000_000_000i64))
            .unwrap_err()
            .contains("out of the range"));
        let text = PgColumn::new("t", ColumnType::Text, None);
        assert!(text.convert(&json!("a\u{0}b")).unwrap_err().contains("NUL"));
        assert!(text.convert(&json!(7)).is_err());
        let big = json!(18_000_000_000_000_000_000u64);
        let numeric = PgColumn::new("b", ColumnType::infer(&big), Some(&big));
        assert_eq!(numeric.sql, "numeric");
        assert_eq!(
            numeric.convert(&big).unwrap(),
            SqlValue::Text("18000000000000000000".into())
        );
        assert_eq!(numeric.cast("s.b"), "s.b::numeric");
        assert!(numeric.convert(&json!("1")).is_err());
        let json_col = PgColumn::new("j", ColumnType::Json, None);
        assert!(json_col.convert(&json!({"a": "\u{0}"})).is_err());
        let varchar = PgColumn::read("v".into(), "varchar".into(), "character varying(5)".into());
        assert_eq!(varchar.cast("s.v"), "s.v::character varying(5)");
    }
}

/// `CREATE TABLE` with a primary key on the key columns.
pub(super) async fn create_table(
    tx: &impl GenericClient,
    schema: &str,
    table: &str,
    columns: &[PgColumn],
    keys: &[String],
    unlogged: bool,
) -> Result<()> {
    let defs = column_definitions(
        columns.iter().map(|c| (c.name.as_str(), c.sql.as_str())),
        keys,
        quote,
    );
    let kind = if unlogged { "UNLOGGED " } else { "" };
    tx.batch_execute(&format!(
        "CREATE {kind}TABLE {} ({defs}, PRIMARY KEY ({}))",
        qualified(schema, table),
        column_list(keys)
    ))
    .await
    .map_err(pg_error(format!("creating table {table:?}")))?;
    Ok(())
}

pub(super) async fn add_columns(
    tx: &impl GenericClient,
    schema: &str,
    table: &str,
    columns: &[PgColumn],
) -> Result<()> {
    if columns.is_empty() {
        return Ok(());
    }
    let adds = columns
        .iter()
        .map(|c| format!("ADD COLUMN {} {}", quote(&c.name), c.sql))
        .collect::<Vec<_>>()
        .join(", ");
    tx.batch_execute(&format!("ALTER TABLE {} {adds}", qualified(schema, table)))
        .await
        .map_err(pg_error(format!("adding columns to table {table:?}")))?;
    Ok(())
}

/// Creates the table or adds the columns the rows need (a row that cannot
/// get a column for each field becomes a reject, see [`ColumnRules::fit`]);
/// returns its schema, what changed and the rows.
#[allow(clippy::too_many_arguments)]
pub(super) async fn ensure_table(
    tx: &Transaction<'_>,
    schema: &str,
    run: &mut Run,
    table: &str,
    rows: Vec<Row>,
    unlogged: bool,
    stats: &mut RunStats,
    rejects: &mut Vec<Reject>,
) -> Result<(PgSchema, Ddl, Vec<Row>)> {
    let mut current = match run.schema.take() {
        Some(s) => s,
        None => read_schema(tx, schema, table).await?.unwrap_or_default(),
    };
    let rows = ColumnRules::POSTGRES.fit(
        table,
        current.columns.iter().map(|c| c.name.as_str()),
        rows,
        stats,
        rejects,
    );
    if rows.is_empty() {
        run.schema = Some(current.clone());
        return Ok((current, Ddl::None, rows));
    }
    let mut missing = current.missing(rows.iter().map(|r| &r.fields));
    if !missing.is_empty() {
        // Another writer (a second pipeline into the same table) may be
        // creating or altering it at this moment: take the table's DDL lock,
        // held to the end of the batch, and look again.
        tx.execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[&advisory_key(schema, &format!("ddl\0{table}"))],
        )
        .await
        .map_err(pg_error(format!("locking table {table:?} for DDL")))?;
        current = read_schema(tx, schema, table).await?.unwrap_or_default();
        missing = current.missing(rows.iter().map(|r| &r.fields));
    }
    let known = current.columns.len();
    let created = current.columns.is_empty();
    if created {
        create_table(
            tx,
            schema,
            table,
            &missing,
            &run.target.key_columns,
            unlogged,
        )
        .await?;
        tracing::info!(table, columns = missing.len(), "Table created.");
        current.columns = missing;
    } else if !missing.is_empty() {
        add_columns(tx, schema, table, &missing).await?;
        tracing::info!(table, added = missing.len(), "Columns added.");
        current.columns.extend(missing);
    }
    run.schema = Some(current.clone());
    let ddl = match (created, current.columns.len() > known) {
        (true, _) => Ddl::Created,
        (false, true) => Ddl::Altered,
        (false, false) => Ddl::None,
    };
    Ok((current, ddl, rows))
}

/// What [`ensure_table`] changed.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Ddl {
    None,
    Created,
    Altered,
}

/// A stable 64-bit advisory lock key: the first 8 bytes of the SHA-256 of
/// schema and pipeline. The same on every machine and every version.
pub(super) fn advisory_key(schema: &str, pipeline: &str) -> i64 {
    let digest = Sha256::digest(format!("idemload\0{schema}\0{pipeline}").as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(bytes)
}
