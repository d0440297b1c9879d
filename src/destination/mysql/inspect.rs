//! MySQL/MariaDB inspection for `audit` and `dedupe` (dry run).
//!
//! MySQL tables have no row identity to break ties between identical rows
//! and no transactional DDL to add the constraint atomically with the
//! delete, so `dedupe --apply` is refused here rather than done unsafely.

use async_trait::async_trait;
use mysql_async::prelude::Queryable;
use mysql_async::Value as My;
use serde_json::Value;

use super::MysqlDestination;
use crate::destination::inspect::{DedupeApply, DedupeDone, Dialect, Inspect};
use crate::error::{Error, Result};

pub struct MysqlInspect {
    dest: MysqlDestination,
}

impl MysqlInspect {
    /// Connects; with `write` false (audit) creates nothing.
    pub async fn open(url: &str, write: bool) -> Result<MysqlInspect> {
        Ok(MysqlInspect {
            dest: MysqlDestination::connect(url, write).await?.0,
        })
    }
}

fn to_json(v: My) -> Value {
    match v {
        My::NULL => Value::Null,
        My::Int(i) => Value::from(i),
        My::UInt(u) => Value::from(u),
        My::Float(f) => {
            serde_json::Number::from_f64(f64::from(f)).map_or(Value::Null, Value::Number)
        }
        My::Double(f) => serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number),
        My::Bytes(b) => Value::String(String::from_utf8_lossy(&b).into_owned()),
        other => Value::String(other.as_sql(true).trim_matches('\'').to_string()),
    }
}

fn err(e: mysql_async::Error) -> Error {
    Error::destination("mysql", e)
}

#[async_trait]
impl Inspect for MysqlInspect {
    fn dialect(&self) -> Dialect {
        Dialect::Mysql
    }

    async fn query(&mut self, sql: &str) -> Result<Vec<Vec<Value>>> {
        let rows: Vec<mysql_async::Row> = self.dest.conn.exec(sql, ()).await.map_err(err)?;
        Ok(rows
            .into_iter()
            .map(|r| r.unwrap().into_iter().map(to_json).collect())
            .collect())
    }

    async fn execute(&mut self, sql: &str) -> Result<()> {
        self.dest.conn.query_drop(sql).await.map_err(err)
    }

    async fn columns(&mut self, table: &str) -> Result<Vec<String>> {
        self.dest
            .conn
            .exec(
                "SELECT column_name FROM information_schema.columns
                 WHERE table_schema = DATABASE() AND table_name = ? ORDER BY ordinal_position",
                (table,),
            )
            .await
            .map_err(err)
    }

    async fn unique_covering(&mut self, table: &str, key: &[String]) -> Result<Option<String>> {
        super::ddl::unique_covering(&mut self.dest.conn, table, key)
            .await
            .map_err(err)
    }

    async fn dedupe_apply(&mut self, _plan: &DedupeApply) -> Result<DedupeDone> {
        Err(Error::config(
            "dedupe --apply is not available for MySQL/MariaDB: without a row identity and transactional DDL it cannot be done atomically; the dry run lists what to remove",
        ))
    }

    async fn restore(&mut self, _run_id: &str) -> Result<u64> {
        Err(Error::config(
            "dedupe --restore is not available for MySQL/MariaDB",
        ))
    }
}
