//! MySQL column types: how idemload's column types are declared, how the
//! columns of an existing table are read back from `information_schema`,
//! and creating tables and columns before a batch's transaction opens.
//!
//! MySQL commits implicitly before DDL, so every change here is made on its
//! own, before the batch, and is idempotent (`CREATE TABLE IF NOT EXISTS`,
//! columns added only when the freshly read table lacks them).

use std::collections::HashMap;

use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use super::Server;
use crate::destination::fills::{uncovered_key, Fill, Fills};
use crate::destination::schema::{logical, Column, ColumnType, TableSchema};
use crate::destination::sql::{column_definitions, quote_mysql, quote_mysql as q};

/// The longest text a key column holds: keys need a bounded `VARCHAR`.
pub(super) const KEY_TEXT_CHARS: usize = 255;

/// The most a column's text may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Limit {
    Chars(usize),
    Bytes(usize),
}

/// One column of a MySQL table.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct SqlColumn {
    pub name: String,
    pub ty: ColumnType,
    /// The type as declared, with its character set and collation, so that
    /// a staging table compares exactly like the target.
    pub definition: String,
    pub limit: Option<Limit>,
}

/// The columns of a table, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Table {
    pub columns: Vec<SqlColumn>,
}

impl Table {
    pub fn position(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }

    pub fn names(&self) -> Vec<&str> {
        self.columns.iter().map(|c| c.name.as_str()).collect()
    }

    /// The quoted column names, comma separated, each after `alias`
    /// (`"s."`, or `""` for none).
    pub fn column_list(&self, alias: &str) -> String {
        self.columns
            .iter()
            .map(|c| format!("{alias}{}", q(&c.name)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The logical view the engine's type rules work on.
    pub fn logical(&self) -> TableSchema {
        logical(self.columns.iter().map(|c| (c.name.as_str(), c.ty)))
    }
}

/// The declaration of a new column of `ty`.
pub(super) fn declare(server: &Server, column: &Column, is_key: bool) -> SqlColumn {
    let text = |sql: &str| format!("{sql} CHARACTER SET utf8mb4 COLLATE {}", server.collation);
    let (definition, limit) = match column.ty {
        ColumnType::Integer => ("BIGINT".to_string(), None),
        ColumnType::Float => ("DOUBLE".to_string(), None),
        // Exact numbers: 35 digits before the point and 30 after, MySQL's
        // widest; a value beyond them is a reject, never rounded.
        ColumnType::Decimal => ("DECIMAL(65,30)".to_string(), None),
        ColumnType::Boolean => ("TINYINT(1)".to_string(), None),
        // Instants in UTC (the session's time zone) to the microsecond.
        ColumnType::Timestamp => ("DATETIME(6)".to_string(), None),
        _ if is_key => (
            text(&format!("VARCHAR({KEY_TEXT_CHARS})")),
            Some(Limit::Chars(KEY_TEXT_CHARS)),
        ),
        // MariaDB: LONGTEXT with a JSON_VALID check; MySQL: native JSON.
        ColumnType::Json => ("JSON".to_string(), None),
        ColumnType::Text | ColumnType::Any => (text("LONGTEXT"), None),
    };
    SqlColumn {
        name: column.name.clone(),
        ty: column.ty,
        definition,
        limit,
    }
}

/// The column type of a MySQL type (of a table idemload may not have
/// created).
fn column_type(data_type: &str, column_type: &str, json_checked: bool) -> ColumnType {
    match data_type {
        "tinyint" if column_type.starts_with("tinyint(1)") => ColumnType::Boolean,
        "bool" | "boolean" => ColumnType::Boolean,
        "tinyint" | "smallint" | "mediumint" | "int" | "integer" | "bigint" => ColumnType::Integer,
        "double" | "float" | "real" => ColumnType::Float,
        "decimal" | "numeric" => ColumnType::Decimal,
        "datetime" | "timestamp" => ColumnType::Timestamp,
        "json" => ColumnType::Json,
        "longtext" if json_checked => ColumnType::Json,
        "varchar" | "char" | "tinytext" | "text" | "mediumtext" | "longtext" => ColumnType::Text,
        _ => ColumnType::Any,
    }
}

fn limit(data_type: &str, max_chars: Option<u64>) -> Option<Limit> {
    match data_type {
        "varchar" | "char" => max_chars.map(|n| Limit::Chars(n as usize)),
        "tinytext" => Some(Limit::Bytes(255)),
        "text" => Some(Limit::Bytes(65_535)),
        "mediumtext" => Some(Limit::Bytes(16_777_215)),
        _ => None,
    }
}

type ColumnRow = (
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<u64>,
);

/// The columns of a table of the connection's database, or `None` when it
/// does not exist.
pub(super) async fn read_table(
    conn: &mut Conn,
    server: &Server,
    table: &str,
) -> Result<Option<Table>, mysql_async::Error> {
    let rows: Vec<ColumnRow> = conn
        .exec(
            "SELECT COLUMN_NAME, LOWER(DATA_TYPE), LOWER(COLUMN_TYPE), CHARACTER_SET_NAME,
                    COLLATION_NAME, CHARACTER_MAXIMUM_LENGTH
             FROM information_schema.COLUMNS
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?
             ORDER BY ORDINAL_POSITION",
            (table,),
        )
        .await?;
    if rows.is_empty() {
        return Ok(None);
    }
    // MariaDB's JSON is LONGTEXT with a `json_valid` check named after the column.
    let mut json_checked: HashMap<String, bool> = HashMap::new();
    if server.mariadb {
        let checks: Vec<(String, String)> = conn
            .exec(
                "SELECT CONSTRAINT_NAME, CHECK_CLAUSE FROM information_schema.CHECK_CONSTRAINTS
                 WHERE CONSTRAINT_SCHEMA = DATABASE() AND TABLE_NAME = ?",
                (table,),
            )
            .await?;
        for (name, clause) in checks {
            if clause.to_ascii_lowercase().starts_with("json_valid(") {
                json_checked.insert(name, true);
            }
        }
    }
    let columns = rows
        .into_iter()
        .map(
            |(name, data_type, declared, charset, collation, max_chars)| {
                let checked = json_checked.contains_key(&name);
                let mut definition = declared.clone();
                if let (Some(cs), Some(coll)) = (charset, collation) {
                    definition.push_str(&format!(" CHARACTER SET {cs} COLLATE {coll}"));
                }
                SqlColumn {
                    ty: column_type(&data_type, &declared, checked),
                    limit: limit(&data_type, max_chars),
                    name,
                    definition,
                }
            },
        )
        .collect();
    Ok(Some(Table { columns }))
}

/// `CREATE TABLE IF NOT EXISTS` with a primary key on the key columns.
pub(super) async fn create_table(
    conn: &mut Conn,
    server: &Server,
    table: &str,
    columns: &[SqlColumn],
    keys: &[String],
) -> Result<(), mysql_async::Error> {
    let defs = column_definitions(
        columns
            .iter()
            .map(|c| (c.name.as_str(), c.definition.as_str())),
        keys,
        quote_mysql,
    );
    let keys = keys.iter().map(|k| q(k)).collect::<Vec<_>>().join(", ");
    conn.query_drop(format!(
        "CREATE TABLE IF NOT EXISTS {} ({defs}, PRIMARY KEY ({keys}))
         ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = {}",
        q(table),
        server.collation
    ))
    .await
}

/// Adds columns in one `ALTER TABLE`.
pub(super) async fn add_columns(
    conn: &mut Conn,
    table: &str,
    columns: &[SqlColumn],
) -> Result<(), mysql_async::Error> {
    if columns.is_empty() {
        return Ok(());
    }
    let adds = columns
        .iter()
        .map(|c| format!("ADD COLUMN {} {}", q(&c.name), c.definition))
        .collect::<Vec<_>>()
        .join(", ");
    conn.query_drop(format!("ALTER TABLE {} {adds}", q(table)))
        .await
}

/// Why a field name cannot be a MySQL column, if it cannot: MySQL names are
/// at most 64 characters and may not end in a space. (Case is one of the
/// rules every backend shares: `ColumnRules::fit`.)
pub(super) fn unfit_name(name: &str) -> Option<String> {
    if name.chars().count() > 64 {
        return Some(format!(
            "field name {name:?} is longer than the 64 characters of a MySQL column name"
        ));
    }
    if name.ends_with(' ') {
        return Some(format!(
            "field name {name:?} ends with a space, which a MySQL column name cannot"
        ));
    }
    None
}

/// A table name of at most 64 characters: long names end in a hash.
pub(super) fn short_name(prefix: &str, table: &str) -> String {
    let name = format!("{prefix}{table}");
    if name.chars().count() <= 64 {
        return name;
    }
    use sha2::{Digest, Sha256};
    let digest = hex::encode(Sha256::digest(table.as_bytes()));
    format!("{prefix}{}", &digest[..32])
}

/// The primary key or unique index whose columns are exactly `key`.
pub(super) async fn unique_covering(
    conn: &mut Conn,
    table: &str,
    key: &[String],
) -> Result<Option<String>, mysql_async::Error> {
    let rows: Vec<(String, String)> = conn
        .exec(
            "SELECT index_name, GROUP_CONCAT(column_name ORDER BY column_name SEPARATOR '\\0')
             FROM information_schema.statistics
             WHERE table_schema = DATABASE() AND table_name = ? AND non_unique = 0
             GROUP BY index_name",
            (table,),
        )
        .await?;
    let mut wanted = key.to_vec();
    wanted.sort();
    Ok(rows.into_iter().find_map(|(name, cols)| {
        let cols: Vec<String> = cols.split('\0').map(String::from).collect();
        (cols == wanted).then(|| {
            if name == "PRIMARY" {
                "primary key".to_string()
            } else {
                format!("unique index {name}")
            }
        })
    }))
}

/// For a table that exists when a run starts: stops when no primary key or
/// unique index covers the key, else says what the table fills in itself.
pub(super) async fn existing_table(
    conn: &mut Conn,
    table: &str,
    keys: &[String],
) -> crate::error::Result<Fills> {
    let ctx = || format!("mysql table {table:?}");
    let rows: Vec<(String, Option<String>, String, String)> = conn
        .exec(
            "SELECT COLUMN_NAME, COLUMN_DEFAULT, IS_NULLABLE, UPPER(EXTRA)
             FROM information_schema.COLUMNS
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?
             ORDER BY ORDINAL_POSITION",
            (table,),
        )
        .await
        .map_err(|e| crate::error::Error::destination(ctx(), e))?;
    if rows.is_empty() {
        return Ok(Fills::default());
    }
    if unique_covering(conn, table, keys)
        .await
        .map_err(|e| crate::error::Error::destination(ctx(), e))?
        .is_none()
    {
        let columns: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        return Err(uncovered_key(table, keys, &columns));
    }
    Ok(Fills(
        rows.into_iter()
            .filter_map(|(name, default, nullable, extra)| {
                // MariaDB shows a NULL default as the text NULL (a text
                // default is quoted), MySQL as no default at all.
                let default = default.is_some_and(|d| d != "NULL");
                let generated = [
                    "VIRTUAL GENERATED",
                    "STORED GENERATED",
                    "PERSISTENT GENERATED",
                ]
                .iter()
                .any(|g| extra.contains(g));
                let fill = if generated {
                    Fill::Generated
                } else if default || extra.contains("AUTO_INCREMENT") {
                    Fill::Default
                } else if nullable == "NO" {
                    Fill::Required
                } else {
                    return None;
                };
                Some((name, fill))
            })
            .collect(),
    ))
}
