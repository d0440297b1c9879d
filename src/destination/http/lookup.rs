//! `lookup_table`: a synced copy of the API's records in a SQL table, read
//! before the API is asked (no API call). The copy usually lives in the
//! warehouse, so any destination URL works: SQLite, PostgreSQL, MySQL.
//!
//! The table and both columns are checked when the run opens, so a wrong
//! name is a configuration error before any request. Values are always
//! bound, never spliced; PostgreSQL compares in the column's own type (the
//! value is cast from text), so the column's index serves every lookup.

use serde_json::Value;

use super::config::LookupTable;
use crate::connect::Backend;
use crate::destination::inspect::Dialect;
use crate::error::{Error, Result};
use crate::redact::redact;

/// An open synced copy.
pub(super) enum Table {
    Sqlite {
        conn: std::sync::Mutex<rusqlite::Connection>,
        sql: String,
    },
    Postgres {
        client: tokio_postgres::Client,
        statement: tokio_postgres::Statement,
    },
    Mysql {
        conn: tokio::sync::Mutex<mysql_async::Conn>,
        sql: String,
    },
}

/// `schema.table` quoted part by part.
fn quote_table(name: &str, dialect: Dialect) -> String {
    name.split('.')
        .map(|part| dialect.quote(part))
        .collect::<Vec<_>>()
        .join(".")
}

fn missing(t: &LookupTable, why: impl std::fmt::Display) -> Error {
    Error::config(format!(
        "[destination] lookup_table: table {:?} with columns {:?} (match) and {:?} (id) in {}: {why}",
        t.table,
        t.match_field,
        t.id,
        redact(&t.url)
    ))
}

impl Table {
    /// Opens the copy and checks that the table and its columns exist.
    pub(super) async fn open(t: &LookupTable) -> Result<Table> {
        match Backend::of_url(&t.url)? {
            Backend::Sqlite => {
                let path = t.url.trim_start_matches("sqlite://");
                let conn = rusqlite::Connection::open_with_flags(
                    path,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                )
                .map_err(|e| missing(t, e))?;
                let q = |n: &str| Dialect::Sqlite.quote(n);
                let sql = format!(
                    "SELECT {} FROM {} WHERE {} = ?1 LIMIT 1",
                    q(&t.id),
                    quote_table(&t.table, Dialect::Sqlite),
                    q(&t.match_field)
                );
                conn.prepare(&sql).map_err(|e| missing(t, e))?;
                Ok(Table::Sqlite {
                    conn: std::sync::Mutex::new(conn),
                    sql,
                })
            }
            Backend::Postgres => {
                let (client, _) = crate::connect::postgres::connect(&t.url).await?;
                // `?schema=NAME` places an unqualified table, as for a
                // destination; else the connection's search_path does.
                let table = match crate::destination::postgres::url_schema(&t.url)? {
                    Some(schema) if !t.table.contains('.') => format!(
                        "{}.{}",
                        Dialect::Postgres.quote(&schema),
                        Dialect::Postgres.quote(&t.table)
                    ),
                    _ => quote_table(&t.table, Dialect::Postgres),
                };
                let column_type: Option<String> = client
                    .query_opt(
                        "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
                         WHERE a.attrelid = to_regclass($1) AND a.attname = $2 AND NOT a.attisdropped",
                        &[&table, &t.match_field],
                    )
                    .await
                    .map_err(|e| missing(t, e))?
                    .map(|row| row.get(0));
                let Some(column_type) = column_type else {
                    return Err(missing(t, "no such table or match column"));
                };
                let q = |n: &str| Dialect::Postgres.quote(n);
                let sql = format!(
                    "SELECT {}::text FROM {table} WHERE {} = $1::text::{column_type} LIMIT 1",
                    q(&t.id),
                    q(&t.match_field)
                );
                let statement = client.prepare(&sql).await.map_err(|e| missing(t, e))?;
                Ok(Table::Postgres { client, statement })
            }
            Backend::Mysql => {
                use mysql_async::prelude::Queryable;
                let (mut conn, _, _) = crate::connect::mysql::MysqlConfig::parse(&t.url)?
                    .connect()
                    .await?;
                let q = |n: &str| Dialect::Mysql.quote(n);
                let table = quote_table(&t.table, Dialect::Mysql);
                conn.query_drop(format!(
                    "SELECT {}, {} FROM {table} WHERE 1 = 0",
                    q(&t.id),
                    q(&t.match_field)
                ))
                .await
                .map_err(|e| missing(t, e))?;
                let sql = format!(
                    "SELECT CAST({} AS CHAR) FROM {table} WHERE {} = ? LIMIT 1",
                    q(&t.id),
                    q(&t.match_field)
                );
                Ok(Table::Mysql {
                    conn: tokio::sync::Mutex::new(conn),
                    sql,
                })
            }
            Backend::Redis => Err(missing(t, "use a sqlite://, postgres:// or mysql:// URL")),
        }
    }

    /// The remote id the copy holds for `value`; `None` when it holds none
    /// (or the value cannot be one of the column's values).
    pub(super) async fn find(&self, value: &Value) -> std::result::Result<Option<String>, String> {
        let text = match value {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Null | Value::Array(_) | Value::Object(_) => return Ok(None),
        };
        match self {
            Table::Sqlite { conn, sql } => {
                use rusqlite::types::Value as V;
                use rusqlite::OptionalExtension;
                let param = match value {
                    Value::Number(n) if n.is_i64() => V::Integer(n.as_i64().unwrap_or_default()),
                    Value::Number(n) => V::Real(n.as_f64().unwrap_or_default()),
                    Value::Bool(b) => V::Integer(*b as i64),
                    _ => V::Text(text),
                };
                let conn = conn
                    .lock()
                    .map_err(|_| "lookup table poisoned".to_string())?;
                let found = conn
                    .prepare_cached(sql)
                    .and_then(|mut s| s.query_row([param], |r| r.get::<_, V>(0)).optional())
                    .map_err(|e| e.to_string())?;
                Ok(match found {
                    Some(V::Integer(i)) => Some(i.to_string()),
                    Some(V::Text(s)) => Some(s),
                    Some(V::Real(f)) => Some(f.to_string()),
                    _ => None,
                })
            }
            Table::Postgres { client, statement } => {
                match client.query_opt(statement, &[&text]).await {
                    Ok(row) => Ok(row.and_then(|r| r.get::<_, Option<String>>(0))),
                    // Class 22 (data exception): the value cannot be one of
                    // the column's values, so the copy cannot hold it.
                    Err(e) if e.code().is_some_and(|c| c.code().starts_with("22")) => Ok(None),
                    Err(e) => Err(e.to_string()),
                }
            }
            Table::Mysql { conn, sql } => {
                use mysql_async::prelude::Queryable;
                let param = match value {
                    Value::Number(n) if n.is_i64() => {
                        mysql_async::Value::Int(n.as_i64().unwrap_or_default())
                    }
                    Value::Number(n) if n.is_u64() => {
                        mysql_async::Value::UInt(n.as_u64().unwrap_or_default())
                    }
                    _ => mysql_async::Value::Bytes(text.into_bytes()),
                };
                let mut conn = conn.lock().await;
                conn.exec_first::<Option<String>, _, _>(sql.as_str(), vec![param])
                    .await
                    .map(Option::flatten)
                    .map_err(|e| e.to_string())
            }
        }
    }
}
