//! SQLite tables: created with a primary key on the key columns, widened
//! with the columns new fields need, read back as a schema.

use rusqlite::{Connection, OptionalExtension};

use super::{declared_type, read_schema, Run};
use crate::batch::Row;
use crate::destination::fills::{uncovered_key, Fill, Fills};
use crate::destination::schema::{Column, ColumnRules, TableSchema};
use crate::destination::sql::{column_definitions, column_list, quote};
use crate::error::Result;
use crate::record::Reject;
use crate::stats::RunStats;

/// For a table that exists when a run starts: stops when no primary key or
/// unique index covers the key, else says what the table fills in itself.
pub(super) fn existing_table(conn: &Connection, table: &str, keys: &[String]) -> Result<Fills> {
    let Some(schema) = read_schema(conn, table)? else {
        return Ok(Fills::default());
    };
    if unique_covering(conn, table, keys)?.is_none() {
        let columns: Vec<&str> = schema.columns.iter().map(|c| c.name.as_str()).collect();
        return Err(uncovered_key(table, keys, &columns));
    }
    let mut stmt = conn.prepare(
        "SELECT name, \"notnull\", dflt_value IS NOT NULL, pk, hidden, upper(type),
                (SELECT count(*) FROM pragma_table_xinfo(?1) WHERE pk > 0)
         FROM pragma_table_xinfo(?1)",
    )?;
    let rows = stmt.query_map([table], |r| {
        let (name, not_null, default, pk, hidden, ty, pks): (
            String,
            bool,
            bool,
            i64,
            i64,
            String,
            i64,
        ) = (
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
            r.get(6)?,
        );
        // An INTEGER PRIMARY KEY alone is the rowid: SQLite numbers it.
        let rowid = pk == 1 && pks == 1 && ty == "INTEGER";
        let fill = match () {
            _ if hidden == 2 || hidden == 3 => Some(Fill::Generated),
            _ if default || rowid => Some(Fill::Default),
            _ if not_null => Some(Fill::Required),
            _ => None,
        };
        Ok(fill.map(|f| (name, f)))
    })?;
    let fills = rows.collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Fills(fills.into_iter().flatten().collect()))
}

/// `CREATE TABLE` with a primary key on the key columns.
pub(super) fn create_table(
    conn: &Connection,
    table: &str,
    columns: &[Column],
    keys: &[String],
) -> Result<()> {
    let defs = column_definitions(
        columns
            .iter()
            .map(|c| (c.name.as_str(), declared_type(c.ty))),
        keys,
        quote,
    );
    conn.execute_batch(&format!(
        "CREATE TABLE {} ({defs}, PRIMARY KEY ({}))",
        quote(table),
        column_list(keys)
    ))?;
    Ok(())
}

/// Creates the table or adds the columns the rows need (a row that cannot
/// get a column for each field becomes a reject, see [`ColumnRules::fit`]);
/// returns its schema and the rows.
pub(super) fn ensure_table(
    conn: &Connection,
    run: &mut Run,
    table: &str,
    rows: Vec<Row>,
    stats: &mut RunStats,
    rejects: &mut Vec<Reject>,
) -> Result<(TableSchema, Vec<Row>)> {
    let mut schema = match run.schema.take() {
        Some(s) => s,
        None => read_schema(conn, table)?.unwrap_or_default(),
    };
    let rows = ColumnRules::SQLITE.fit(
        table,
        schema.columns.iter().map(|c| c.name.as_str()),
        rows,
        stats,
        rejects,
    );
    if rows.is_empty() {
        run.schema = Some(schema.clone());
        return Ok((schema, rows));
    }
    let missing = if rows.iter().all(|r| has_columns_for(&schema, &r.fields)) {
        Vec::new()
    } else {
        schema.missing(rows.iter().map(|r| &r.fields))
    };
    if schema.columns.is_empty() {
        // Key columns must exist even when this batch only has nulls there
        // (it cannot: keys are never null), so `missing` holds them.
        create_table(conn, table, &missing, &run.target.key_columns)?;
        tracing::info!(table, columns = missing.len(), "Table created.");
        schema.columns = missing;
    } else if !missing.is_empty() {
        for column in &missing {
            conn.execute_batch(&format!(
                "ALTER TABLE {} ADD COLUMN {} {}",
                quote(table),
                quote(&column.name),
                declared_type(column.ty)
            ))?;
        }
        tracing::info!(table, added = missing.len(), "Columns added.");
        schema.columns.extend(missing);
    }
    run.schema = Some(schema.clone());
    Ok((schema, rows))
}

/// Whether every non-null field has a column (fields usually come in
/// column order, so this is one pass over both).
fn has_columns_for(schema: &TableSchema, fields: &crate::record::Fields) -> bool {
    let mut at = 0;
    fields.iter().all(|(name, value)| {
        if value.is_null() {
            return true;
        }
        match schema.columns[at..]
            .iter()
            .position(|c| same_name(&c.name, name))
        {
            Some(p) => {
                at += p + 1;
                true
            }
            None => schema.position(name).is_some(),
        }
    })
}

/// String equality for short names, inlined (this runs for every field).
#[inline]
pub(super) fn same_name(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).all(|(x, y)| x == y)
}

/// True when the table does not exist or holds no row.
pub(super) fn is_empty(conn: &Connection, table: &str) -> Result<bool> {
    if read_schema(conn, table)?.is_none() {
        return Ok(true);
    }
    let any: bool = conn.query_row(
        &format!("SELECT EXISTS (SELECT 1 FROM {})", quote(table)),
        [],
        |r| r.get(0),
    )?;
    Ok(!any)
}

/// The primary key, unique constraint or unique index whose columns are
/// exactly `key`, named; `None` when there is none.
pub(crate) fn unique_covering(
    conn: &Connection,
    table: &str,
    key: &[String],
) -> Result<Option<String>> {
    let mut wanted: Vec<&str> = key.iter().map(String::as_str).collect();
    wanted.sort_unstable();
    let mut indexes =
        conn.prepare("SELECT name, origin FROM pragma_index_list(?1) WHERE \"unique\" = 1")?;
    let list = indexes
        .query_map([table], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    for (name, origin) in list {
        let mut cols = conn.prepare("SELECT name FROM pragma_index_info(?1)")?;
        let mut names = cols
            .query_map([&name], |r| r.get::<_, Option<String>>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect::<Vec<_>>();
        names.sort_unstable();
        if names == wanted {
            let kind = match origin.as_str() {
                "pk" => "primary key",
                "u" => "unique constraint",
                _ => "unique index",
            };
            return Ok(Some(format!("{kind} {name}")));
        }
    }
    // An INTEGER PRIMARY KEY is the rowid and has no index of its own.
    if wanted.len() == 1 {
        let pk: Option<String> = conn
            .query_row(
                "SELECT name FROM pragma_table_info(?1) WHERE pk = 1 AND (SELECT count(*) FROM pragma_table_info(?1) WHERE pk > 0) = 1",
                [table],
                |r| r.get(0),
            )
            .optional()?;
        if pk.as_deref() == Some(wanted[0]) {
            return Ok(Some(format!("primary key ({})", wanted[0])));
        }
    }
    Ok(None)
}
