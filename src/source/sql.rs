//! The SQL source: a table or query of SQLite, PostgreSQL or MySQL/MariaDB.
//!
//! With a cursor, the filter `cursor >= low` and `ORDER BY cursor` are pushed
//! into the query (a user query becomes a subquery), so an incremental run
//! reads only what it needs and the checkpoint moves batch by batch. Rows
//! stream: SQLite steps one statement on a thread of its own, PostgreSQL
//! reads a server-side portal `batch_size` rows at a time, MySQL reads the
//! result set row by row; batches go through a bounded channel, so memory
//! stays flat on a table of any size.
//!
//! Column values become JSON: integers and floats as numbers, booleans as
//! booleans, text as strings, timestamps as RFC 3339 (a value without a
//! zone is taken as UTC), json/jsonb as JSON, NUMERIC/DECIMAL as JSON
//! numbers (cast to text in the query to keep every digit), binary as hex.
//! PostgreSQL and MySQL temporal cursor columns are filtered exactly; a
//! cursor held as text (SQLite, or a MySQL string column) is filtered from
//! the day before the bound (see `loose_low`), so up to a day of rows more
//! is read and counted as `skipped`.
//! MySQL's `TINYINT(1)` (its BOOLEAN) becomes a boolean. Each record's
//! source reference is `sql:TABLE:N` (or `sql:query:N`), N counting rows
//! from 1.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Number, Value};
use tokio::sync::mpsc;

use super::pagination::kind;
use super::shape::{add_fields, constants, RecordsPath};
use super::{AscendingCheck, Source, SourceQuery};
use crate::connect::Backend;
use crate::destination::sql::quote;
use crate::error::{Error, Result};
use crate::key::Cursor;
use crate::record::{Fields, Item, Name, Record, Reject, SourceRef};
use crate::redact::redact;

/// `[source] type = "sql"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlSourceConfig {
    /// `sqlite://PATH`, `postgres://…` (or `postgresql://`), `mysql://…`.
    pub url: String,
    /// A SELECT; it is wrapped as a subquery to add the cursor filter and
    /// order. Give this or `table`.
    pub query: Option<String>,
    /// A table (`schema.table` allowed), read whole or incrementally.
    pub table: Option<String>,
    /// Records inside a JSON column: a dotted path that starts with the
    /// column's name (`"payload.{service_line_id}.daily_usage"`), with
    /// `{name}` segments as for HTTP sources. Each row then yields the
    /// records its column holds, and the cursor filter is applied to the
    /// records, not pushed into the query.
    pub records: Option<String>,
    /// Constant fields added to every record.
    #[serde(default)]
    pub set: std::collections::BTreeMap<String, toml::Value>,
}

/// Which database the URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Sqlite,
    Postgres,
    Mysql,
}

/// Streams rows from a task or thread of its own.
pub struct SqlSource {
    rx: mpsc::Receiver<Result<Vec<Item>>>,
    ordered: bool,
}

impl SqlSource {
    /// Checks the configuration and starts reading.
    pub async fn open(config: &SqlSourceConfig, query: &SourceQuery) -> Result<SqlSource> {
        let dialect = match Backend::of_url(&config.url) {
            Ok(Backend::Sqlite) => Dialect::Sqlite,
            Ok(Backend::Postgres) => Dialect::Postgres,
            Ok(Backend::Mysql) => Dialect::Mysql,
            Ok(Backend::Redis) | Err(_) => {
                return Err(Error::config(format!(
                    "[source] url {}: a SQL source reads sqlite://, postgres:// or mysql://",
                    redact(&config.url)
                )))
            }
        };
        let (from, label) = match (&config.query, &config.table) {
            (Some(q), None) => (format!("({q})"), "query".to_string()),
            (None, Some(t)) => (quote_table(t, dialect), t.clone()),
            _ => {
                return Err(Error::config(
                    "[source] type = \"sql\" needs exactly one of `query` and `table`",
                ))
            }
        };
        let shape = match &config.records {
            None => None,
            Some(path) => {
                Some(RecordsPath::parse(path).map_err(|e| Error::config(format!("[source] {e}")))?)
            }
        };
        let set = constants(&config.set).map_err(Error::config)?;
        let plan = Plan {
            from,
            label: format!("sql:{label}").into(),
            // Inside JSON columns, the cursor is a field of the records.
            cursor: query.cursor.clone().filter(|_| shape.is_none()),
            shape,
            set,
            low: query.low.clone().filter(|_| config.records.is_none()),
            high: query.high.clone().filter(|_| config.records.is_none()),
            batch_size: query.batch_size.max(1),
            shown: redact(&config.url),
        };
        let (tx, rx) = mpsc::channel(2);
        let url = config.url.clone();
        match dialect {
            Dialect::Sqlite => {
                let path = url
                    .trim_start_matches("sqlite://")
                    .split('?')
                    .next()
                    .unwrap_or_default()
                    .to_string();
                std::thread::Builder::new()
                    .name("idemload-sql-source".into())
                    .spawn(move || {
                        if let Err(e) = read_sqlite(&path, &plan, &tx) {
                            let _ = tx.blocking_send(Err(e));
                        }
                    })
                    .map_err(|e| {
                        plan_error(
                            &redact(&config.url),
                            format!("cannot start reader thread: {e}"),
                        )
                    })?;
            }
            Dialect::Postgres => {
                tokio::spawn(async move {
                    if let Err(e) = read_postgres(&url, &plan, &tx).await {
                        let _ = tx.send(Err(e)).await;
                    }
                });
            }
            Dialect::Mysql => {
                tokio::spawn(async move {
                    if let Err(e) = read_mysql(&url, &plan, &tx).await {
                        let _ = tx.send(Err(e)).await;
                    }
                });
            }
        }
        Ok(SqlSource {
            rx,
            ordered: query.cursor.is_some() && config.records.is_none(),
        })
    }
}

#[async_trait]
impl Source for SqlSource {
    async fn next_batch(&mut self) -> Result<Option<Vec<Item>>> {
        self.rx.recv().await.transpose()
    }

    /// Rows come `ORDER BY cursor` whenever the pipeline has a cursor.
    fn ordered_by_cursor(&self) -> bool {
        self.ordered
    }
}

/// What to read, for every dialect.
struct Plan {
    /// `"table"` or `(query)`.
    from: String,
    label: Arc<str>,
    cursor: Option<String>,
    /// `records`: where the records sit in each row.
    shape: Option<RecordsPath>,
    set: Vec<(String, Value)>,
    low: Option<Cursor>,
    /// A backfill window's end (exclusive).
    high: Option<Cursor>,
    batch_size: usize,
    shown: String,
}

impl Plan {
    /// `SELECT {select} FROM {from} AS _idemload_q [WHERE c >= {low} [AND c
    /// < {high}]] [ORDER BY c]`; `param(n)` writes the n-th parameter.
    fn sql(&self, select: &str, dialect: Dialect, param: impl Fn(usize) -> String) -> String {
        let mut sql = format!("SELECT {select} FROM {} AS _idemload_q", self.from);
        if let Some(c) = &self.cursor {
            let c = format!("_idemload_q.{}", quote_ident(c, dialect));
            let mut filters = Vec::new();
            if self.low.is_some() {
                filters.push(format!("{c} >= {}", param(filters.len() + 1)));
            }
            if self.high.is_some() {
                filters.push(format!("{c} < {}", param(filters.len() + 1)));
            }
            if !filters.is_empty() {
                sql.push_str(&format!(" WHERE {}", filters.join(" AND ")));
            }
            sql.push_str(&format!(" ORDER BY {c}"));
        }
        sql
    }

    /// The bounds to bind, in order: `low`, then `high`, each written by
    /// `bind` (`true` for the high bound).
    fn bounds<T>(&self, bind: impl Fn(&Cursor, bool) -> T) -> Vec<T> {
        let low = self.low.iter().map(|c| bind(c, false));
        let high = self.high.iter().map(|c| bind(c, true));
        low.chain(high).collect()
    }

    fn error(&self, message: impl std::fmt::Display) -> Error {
        plan_error(&format!("{} {}", self.shown, self.label), message)
    }

    /// A failed connect: an unsatisfiable TLS mode stays a configuration
    /// error; the rest is the source's.
    fn connect_error(&self, e: Error) -> Error {
        match e {
            Error::Destination { message, .. } => self.error(format!("cannot connect: {message}")),
            other => other,
        }
    }

    /// The row as a record (or the records its JSON column holds), checked
    /// against the ORDER BY promise (a text cursor whose spellings sort
    /// differently from their instants).
    fn record(
        &self,
        check: &mut AscendingCheck,
        mut fields: Fields,
        row: u64,
        batch: &mut Vec<Item>,
    ) -> Result<()> {
        let Some(shape) = &self.shape else {
            let at = SourceRef::Line {
                path: self.label.clone(),
                line: row,
            };
            if let Some(message) = check.check(&fields, &at) {
                return Err(self.error(message));
            }
            add_fields(&mut fields, Vec::new(), &self.set);
            batch.push(Item::Record(Record::new(fields, at)));
            return Ok(());
        };
        let mut doc = Value::from(fields);
        // SQLite (and text columns anywhere) hold JSON as text.
        if let Some(column) = shape.as_str().split('.').next() {
            if let Some(cell) = doc.get_mut(column) {
                if let Value::String(text) = cell {
                    if let Ok(parsed) = serde_json::from_str::<Value>(text) {
                        *cell = parsed;
                    }
                }
            }
        }
        let elements = shape.take(doc).map_err(|e| {
            plan_error(
                &format!("{} {}:{row}", self.shown, self.label),
                format!("records path {:?}: {e}", shape.as_str()),
            )
        })?;
        for (index, element) in elements.into_iter().enumerate() {
            let at = SourceRef::Page {
                url: self.label.clone(),
                page: row,
                index: index as u64,
            };
            match element.value {
                Value::Object(map) => {
                    let mut fields = Fields::from(map);
                    add_fields(&mut fields, element.captured, &self.set);
                    batch.push(Item::Record(Record::new(fields, at)));
                }
                other => batch.push(Item::Reject(Reject::new(
                    at,
                    format!("element is {}, not a JSON object", kind(&other)),
                    other.to_string(),
                ))),
            }
        }
        Ok(())
    }
}

fn plan_error(location: &str, message: impl std::fmt::Display) -> Error {
    Error::Source {
        location: location.to_string(),
        message: message.to_string(),
    }
}

fn quote_ident(name: &str, dialect: Dialect) -> String {
    match dialect {
        Dialect::Mysql => format!("`{}`", name.replace('`', "``")),
        _ => quote(name),
    }
}

fn quote_table(name: &str, dialect: Dialect) -> String {
    name.split('.')
        .map(|part| quote_ident(part, dialect))
        .collect::<Vec<_>>()
        .join(".")
}

/// The low bound for databases that compare timestamps as text or in a
/// session zone (SQLite, MySQL): the day before, as `YYYY-MM-DD`, which
/// sorts at or below every spelling of any instant at or above `low`
/// (`T` or space, any offset up to a day). The planner drops the few rows
/// below the exact bound; the filter must only never drop one above it.
///
/// A high bound (a backfill window's end) is loosened the other way: two
/// days after, which sorts above every spelling of any instant below it.
fn loose_bound(bound: &Cursor, high: bool) -> LowParam {
    match (bound, bound.as_instant()) {
        (Cursor::Int(i), _) => LowParam::Int(*i),
        (_, Some(nanos)) => {
            let shift = if high { 2 * 86_400 } else { -86_400 };
            let secs = nanos.div_euclid(1_000_000_000) as i64 + shift;
            let day = chrono::DateTime::<chrono::Utc>::from_timestamp(secs, 0)
                .map(|t| t.format("%Y-%m-%d").to_string())
                .unwrap_or_else(|| if high { "9999-12-31" } else { "0000-01-01" }.into());
            LowParam::Text(day)
        }
        (other, None) => LowParam::Text(other.to_string()),
    }
}

enum LowParam {
    Int(i64),
    Text(String),
}

/// Sends a full batch; false when the run has stopped listening.
fn send_blocking(tx: &mpsc::Sender<Result<Vec<Item>>>, batch: &mut Vec<Item>, size: usize) -> bool {
    let full = std::mem::replace(batch, Vec::with_capacity(size));
    tx.blocking_send(Ok(full)).is_ok()
}

fn read_sqlite(path: &str, plan: &Plan, tx: &mpsc::Sender<Result<Vec<Item>>>) -> Result<()> {
    let mut check = AscendingCheck::new(plan.cursor.clone());
    use rusqlite::types::ValueRef;
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| plan.error(format!("cannot open: {e}")))?;
    let sql = plan.sql("*", Dialect::Sqlite, |n| format!("?{n}"));
    tracing::debug!(%sql, "SQL source query.");
    let mut stmt = conn.prepare(&sql).map_err(|e| plan.error(e))?;
    let names: Vec<Name> = stmt.column_names().into_iter().map(Name::from).collect();
    let bounds = plan.bounds(loose_bound);
    let mut rows = stmt
        .query(rusqlite::params_from_iter(bounds.iter().map(|b| match b {
            LowParam::Int(i) => rusqlite::types::Value::Integer(*i),
            LowParam::Text(t) => rusqlite::types::Value::Text(t.clone()),
        })))
        .map_err(|e| plan.error(e))?;
    let mut batch = Vec::with_capacity(plan.batch_size);
    let mut n = 0u64;
    while let Some(row) = rows.next().map_err(|e| plan.error(e))? {
        n += 1;
        let mut fields = Fields::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            let value = match row.get_ref(i).map_err(|e| plan.error(e))? {
                ValueRef::Null => Value::Null,
                ValueRef::Integer(v) => Value::from(v),
                ValueRef::Real(v) => Number::from_f64(v).map_or(Value::Null, Value::Number),
                ValueRef::Text(t) => Value::String(String::from_utf8_lossy(t).into_owned()),
                ValueRef::Blob(b) => Value::String(hex::encode(b)),
            };
            fields.insert(name.clone(), value);
        }
        plan.record(&mut check, fields, n, &mut batch)?;
        if batch.len() >= plan.batch_size && !send_blocking(tx, &mut batch, plan.batch_size) {
            return Ok(());
        }
    }
    if !batch.is_empty() {
        let _ = tx.blocking_send(Ok(batch));
    }
    Ok(())
}

/// The `schema` parameter of a PostgreSQL URL, percent-decoded.
fn schema_param(url: &str) -> Option<String> {
    let (_, query) = url.split_once('?')?;
    query.split('&').find_map(|pair| {
        let value = pair.strip_prefix("schema=")?;
        Some(
            percent_encoding::percent_decode_str(value)
                .decode_utf8_lossy()
                .into_owned(),
        )
    })
}

async fn read_postgres(url: &str, plan: &Plan, tx: &mpsc::Sender<Result<Vec<Item>>>) -> Result<()> {
    let mut check = AscendingCheck::new(plan.cursor.clone());
    use tokio_postgres::types::{ToSql, Type};
    let (mut client, _) = crate::connect::postgres::connect(url)
        .await
        .map_err(|e| plan.connect_error(e))?;
    // The server's message, detail, position and SQLSTATE, not the
    // driver's bare "db error".
    let pg = |e: tokio_postgres::Error| plan.error(crate::error::Cause::message(&e));
    client
        .batch_execute("SET TIME ZONE 'UTC'")
        .await
        .map_err(pg)?;
    // `?schema=NAME`, as on a destination URL: unqualified tables are
    // looked up there.
    if let Some(schema) = schema_param(url) {
        client
            .batch_execute(&format!(
                "SET search_path TO {}",
                crate::destination::sql::quote(&schema)
            ))
            .await
            .map_err(pg)?;
    }
    // The columns' types: the cursor's, for its cast, and which are
    // timestamps without a zone, to mark them UTC.
    let probe = client
        .prepare(&format!(
            "SELECT * FROM {} AS _idemload_q LIMIT 0",
            plan.from
        ))
        .await
        .map_err(pg)?;
    let naive: Vec<String> = probe
        .columns()
        .iter()
        .filter(|c| *c.type_() == Type::TIMESTAMP)
        .map(|c| c.name().to_string())
        .collect();
    let cast = match &plan.cursor {
        Some(c) => {
            let col = probe
                .columns()
                .iter()
                .find(|col| col.name() == c)
                .ok_or_else(|| plan.error(format!("the result has no cursor column {c:?}")))?;
            let t = col.type_();
            format!(
                "CAST(${{}}::text AS {}.{})",
                quote(t.schema()),
                quote(t.name())
            )
        }
        None => String::new(),
    };
    let sql = plan.sql("to_json(_idemload_q)", Dialect::Postgres, |n| {
        cast.replace("${}", &format!("${n}"))
    });
    tracing::debug!(%sql, "SQL source query.");
    let stmt = client.prepare(&sql).await.map_err(pg)?;
    let transaction = client.transaction().await.map_err(pg)?;
    let bounds = plan.bounds(|c, _| c.to_string());
    let params: Vec<&(dyn ToSql + Sync)> =
        bounds.iter().map(|b| b as &(dyn ToSql + Sync)).collect();
    let portal = transaction.bind(&stmt, &params).await.map_err(pg)?;
    let mut n = 0u64;
    loop {
        let rows = transaction
            .query_portal(&portal, plan.batch_size.min(i32::MAX as usize) as i32)
            .await
            .map_err(pg)?;
        if rows.is_empty() {
            break;
        }
        let mut batch = Vec::with_capacity(rows.len());
        for row in rows {
            n += 1;
            let value: Value = row.try_get(0).map_err(pg)?;
            let Value::Object(mut fields) = value else {
                return Err(plan.error("row did not become a JSON object"));
            };
            for name in &naive {
                if let Some(Value::String(s)) = fields.get_mut(name) {
                    s.push('Z');
                }
            }
            plan.record(&mut check, fields.into(), n, &mut batch)?;
        }
        if tx.send(Ok(batch)).await.is_err() {
            return Ok(());
        }
    }
    transaction.commit().await.map_err(pg)?;
    Ok(())
}

async fn read_mysql(url: &str, plan: &Plan, tx: &mpsc::Sender<Result<Vec<Item>>>) -> Result<()> {
    let mut check = AscendingCheck::new(plan.cursor.clone());
    use mysql_async::prelude::Queryable;
    let my = |e: mysql_async::Error| plan.error(e);
    let (mut conn, _, _) = crate::connect::mysql::MysqlConfig::parse(url)?
        .connect()
        .await
        .map_err(|e| plan.connect_error(e))?;
    conn.query_drop("SET time_zone = '+00:00'")
        .await
        .map_err(my)?;
    let sql = plan.sql("*", Dialect::Mysql, |_| "?".to_string());
    tracing::debug!(%sql, "SQL source query.");
    let stmt = conn.prep(sql).await.map_err(my)?;
    // A DATETIME/TIMESTAMP/DATE cursor compares as a date: the bound is
    // exact. Text holding timestamps compares as text: the loose bound.
    let temporal = plan.cursor.as_ref().is_some_and(|c| {
        use mysql_async::consts::ColumnType as T;
        stmt.columns().iter().any(|col| {
            col.name_str() == c.as_str()
                && matches!(
                    col.column_type(),
                    T::MYSQL_TYPE_DATETIME
                        | T::MYSQL_TYPE_DATETIME2
                        | T::MYSQL_TYPE_TIMESTAMP
                        | T::MYSQL_TYPE_TIMESTAMP2
                        | T::MYSQL_TYPE_DATE
                        | T::MYSQL_TYPE_NEWDATE
                )
        })
    });
    let bounds = plan.bounds(|c, high| match c {
        Cursor::Instant(nanos, _) if temporal => {
            let secs = nanos.div_euclid(1_000_000_000) as i64;
            let sub = nanos.rem_euclid(1_000_000_000) as u32;
            chrono::DateTime::<chrono::Utc>::from_timestamp(secs, sub)
                .map(|t| LowParam::Text(t.format("%Y-%m-%d %H:%M:%S%.6f").to_string()))
                .unwrap_or_else(|| loose_bound(c, high))
        }
        c => loose_bound(c, high),
    });
    let params = if bounds.is_empty() {
        mysql_async::Params::Empty
    } else {
        mysql_async::Params::Positional(
            bounds
                .into_iter()
                .map(|b| match b {
                    LowParam::Int(i) => i.into(),
                    LowParam::Text(t) => t.into(),
                })
                .collect(),
        )
    };
    let mut result = conn.exec_iter(&stmt, params).await.map_err(my)?;
    let columns: Vec<mysql_async::Column> = result.columns_ref().to_vec();
    let names: Vec<Name> = columns.iter().map(|c| Name::from(&*c.name_str())).collect();
    let mut batch = Vec::with_capacity(plan.batch_size);
    let mut n = 0u64;
    while let Some(row) = result.next().await.map_err(my)? {
        n += 1;
        let mut fields = Fields::with_capacity(columns.len());
        for ((col, name), value) in columns.iter().zip(&names).zip(row.unwrap()) {
            fields.insert(name.clone(), mysql_value(col, value));
        }
        plan.record(&mut check, fields, n, &mut batch)?;
        if batch.len() >= plan.batch_size {
            let full = std::mem::replace(&mut batch, Vec::with_capacity(plan.batch_size));
            if tx.send(Ok(full)).await.is_err() {
                return Ok(());
            }
        }
    }
    drop(result);
    if !batch.is_empty() {
        let _ = tx.send(Ok(batch)).await;
    }
    let _ = conn.disconnect().await;
    Ok(())
}

/// A MySQL value as JSON, by its column's type.
fn mysql_value(col: &mysql_async::Column, value: mysql_async::Value) -> Value {
    use mysql_async::consts::ColumnType as T;
    use mysql_async::Value as V;
    let ty = col.column_type();
    match value {
        V::NULL => Value::Null,
        V::Int(i) if ty == T::MYSQL_TYPE_TINY && col.column_length() == 1 => Value::Bool(i != 0),
        V::Int(i) => Value::from(i),
        V::UInt(u) => Value::from(u),
        V::Float(f) => Number::from_f64(f as f64).map_or(Value::Null, Value::Number),
        V::Double(f) => Number::from_f64(f).map_or(Value::Null, Value::Number),
        V::Date(y, mo, d, h, mi, s, us) => {
            if ty == T::MYSQL_TYPE_DATE {
                Value::String(format!("{y:04}-{mo:02}-{d:02}"))
            } else if us == 0 {
                Value::String(format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z"))
            } else {
                Value::String(format!(
                    "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{us:06}Z"
                ))
            }
        }
        V::Time(neg, days, h, mi, s, us) => {
            let sign = if neg { "-" } else { "" };
            let hours = days * 24 + h as u32;
            if us == 0 {
                Value::String(format!("{sign}{hours:02}:{mi:02}:{s:02}"))
            } else {
                Value::String(format!("{sign}{hours:02}:{mi:02}:{s:02}.{us:06}"))
            }
        }
        V::Bytes(bytes) => match ty {
            T::MYSQL_TYPE_JSON => serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned())),
            T::MYSQL_TYPE_DECIMAL | T::MYSQL_TYPE_NEWDECIMAL => {
                let text = String::from_utf8_lossy(&bytes);
                serde_json::from_str::<Number>(&text)
                    .map(Value::Number)
                    .unwrap_or_else(|_| Value::String(text.into_owned()))
            }
            _ if col.character_set() == 63 => Value::String(hex::encode(&bytes)),
            _ => Value::String(String::from_utf8_lossy(&bytes).into_owned()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(cursor: Option<&str>, low: Option<Cursor>) -> Plan {
        Plan {
            from: "(SELECT * FROM usage)".into(),
            label: "sql:query".into(),
            cursor: cursor.map(String::from),
            shape: None,
            set: Vec::new(),
            low,
            high: None,
            batch_size: 10,
            shown: "sqlite://w.db".into(),
        }
    }

    #[test]
    fn cursor_filter_and_order_are_pushed_into_the_query() {
        let p = plan(Some("updated_at"), Some(Cursor::Int(5)));
        assert_eq!(
            p.sql("*", Dialect::Sqlite, |n| format!("?{n}")),
            r#"SELECT * FROM (SELECT * FROM usage) AS _idemload_q WHERE _idemload_q."updated_at" >= ?1 ORDER BY _idemload_q."updated_at""#
        );
        let p = plan(Some("updated_at"), None);
        assert_eq!(
            p.sql("*", Dialect::Mysql, |_| "?".to_string()),
            "SELECT * FROM (SELECT * FROM usage) AS _idemload_q ORDER BY _idemload_q.`updated_at`"
        );
        let p = plan(None, None);
        assert_eq!(
            p.sql("*", Dialect::Sqlite, |n| format!("?{n}")),
            "SELECT * FROM (SELECT * FROM usage) AS _idemload_q"
        );
    }

    #[test]
    fn loose_low_bound_never_excludes_an_instant_at_or_above_low() {
        let LowParam::Text(day) =
            loose_bound(&Cursor::from_text("2024-05-02T00:30:00+02:00"), false)
        else {
            panic!()
        };
        // 2024-05-01T22:30Z, a day before: 2024-04-30.
        assert_eq!(day, "2024-04-30");
        for stored in [
            "2024-05-01T22:30:00Z",
            "2024-05-01 22:30:00",
            "2024-05-02T00:30:00+02:00",
        ] {
            assert!(stored >= day.as_str(), "{stored}");
        }
    }

    #[test]
    fn tables_are_quoted_per_part() {
        assert_eq!(
            quote_table("sales.orders", Dialect::Postgres),
            r#""sales"."orders""#
        );
        assert_eq!(quote_table("a`b", Dialect::Mysql), "`a``b`");
    }
}
