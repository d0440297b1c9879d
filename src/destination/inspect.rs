//! Looking into and repairing tables: what `audit`, `dedupe` and `verify`
//! need from a SQL destination.
//!
//! The read side is plain SQL text built with the destination's
//! [`Dialect`] (quoting, row identity) and answered as JSON values, so the
//! audit queries are written once. Repairs that must be exact and atomic
//! (moving rows into `_idemload_quarantine` and back) are implemented by each
//! backend in one transaction.

use async_trait::async_trait;
use serde_json::Value;

use crate::error::Result;

/// SQL differences that matter to the audit queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
    Mysql,
}

impl Dialect {
    /// Quotes an identifier.
    pub fn quote(self, name: &str) -> String {
        match self {
            Dialect::Mysql => format!("`{}`", name.replace('`', "``")),
            _ => super::sql::quote(name),
        }
    }

    /// A string literal (for names and ids, never for record values).
    pub fn literal(self, text: &str) -> String {
        let escaped = text.replace('\'', "''");
        match self {
            Dialect::Mysql => format!("'{}'", escaped.replace('\\', "\\\\")),
            _ => format!("'{escaped}'"),
        }
    }

    /// The expression naming a row physically, used to break ties; `None`
    /// where the database has none.
    pub fn row_identity(self) -> Option<&'static str> {
        match self {
            Dialect::Sqlite => Some("rowid"),
            Dialect::Postgres => Some("ctid"),
            Dialect::Mysql => None,
        }
    }
}

/// What `dedupe --apply` is asked to do.
#[derive(Debug, Clone)]
pub struct DedupeApply {
    pub table: String,
    pub key: Vec<String>,
    /// `ORDER BY` text that ranks the row to keep first.
    pub rank: String,
    pub run_id: String,
    /// Name of the unique index to add.
    pub constraint: String,
}

/// What an applied dedupe did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DedupeDone {
    pub removed: u64,
    pub constraint_added: Option<String>,
}

/// A SQL connection for inspection and repairs.
#[async_trait]
pub trait Inspect: Send {
    fn dialect(&self) -> Dialect;

    /// Runs a read-only query; each row as JSON values.
    async fn query(&mut self, sql: &str) -> Result<Vec<Vec<Value>>>;

    /// Runs a statement (DDL in a scratch destination).
    async fn execute(&mut self, sql: &str) -> Result<()>;

    /// Column names of a table, empty when it does not exist.
    async fn columns(&mut self, table: &str) -> Result<Vec<String>>;

    /// The name of a primary key, unique constraint or unique index whose
    /// columns are exactly `key` (in any order).
    async fn unique_covering(&mut self, table: &str, key: &[String]) -> Result<Option<String>>;

    /// Moves every row but the first-ranked of each key group into
    /// `_idemload_quarantine`, deletes it and adds the unique index, in one
    /// transaction.
    async fn dedupe_apply(&mut self, plan: &DedupeApply) -> Result<DedupeDone>;

    /// Puts back the rows a dedupe run quarantined (dropping the index it
    /// added), in one transaction; returns how many.
    async fn restore(&mut self, run_id: &str) -> Result<u64>;
}
