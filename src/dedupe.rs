//! `dedupe`: collapse each group of rows sharing a key to one row, safely.
//!
//! A dry run (the default) shows what would be kept and removed. `--apply`
//! moves every removed row, whole, into `_idemload_quarantine`, deletes it
//! and adds the unique index that stops duplicates coming back, all in one
//! transaction: a crash leaves the table either untouched or repaired.
//! Running it again does nothing; `--restore RUN_ID` puts the rows back.
//!
//! The row kept is the first by `--order-by` (default the pipeline's
//! cursor), newest or oldest; ties, and rows where that column is NULL, are
//! broken by the database's row identity (SQLite's rowid, PostgreSQL's ctid):
//! the row stored last wins for `newest`, first for `oldest`.

use serde::Serialize;
use serde_json::Value;

use crate::audit::{as_u64, check_table, duplicate_counts, KeySql};
use crate::destination::inspect::{DedupeApply, Inspect};
use crate::error::{Error, Result};

/// Which row of a group survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    Newest,
    Oldest,
}

impl std::str::FromStr for Keep {
    type Err = Error;
    fn from_str(s: &str) -> Result<Keep> {
        match s {
            "newest" => Ok(Keep::Newest),
            "oldest" => Ok(Keep::Oldest),
            other => Err(Error::config(format!(
                "--keep {other}: use newest or oldest"
            ))),
        }
    }
}

/// What to dedupe and how.
#[derive(Debug, Clone)]
pub struct DedupeOptions {
    pub table: String,
    pub key: Vec<String>,
    pub keep: Keep,
    pub order_by: Option<String>,
    pub apply: bool,
}

/// One row of the plan's sample.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedRow {
    pub key: Vec<Value>,
    pub order_value: Value,
    pub keep: bool,
}

/// What dedupe found and did (the `--json` object).
#[derive(Debug, Clone, Serialize)]
pub struct DedupeReport {
    pub table: String,
    pub key: Vec<String>,
    pub order_by: Option<String>,
    pub duplicate_groups: u64,
    pub rows_to_remove: u64,
    pub sample: Vec<PlannedRow>,
    pub applied: bool,
    pub run_id: Option<String>,
    pub removed: u64,
    pub constraint_added: Option<String>,
    /// The unique constraint already in place, if any.
    pub constraint: Option<String>,
}

/// Plans, and with `apply` performs, a dedupe.
pub async fn dedupe(conn: &mut dyn Inspect, options: &DedupeOptions) -> Result<DedupeReport> {
    let columns = check_table(conn, &options.table, &options.key).await?;
    if let Some(o) = &options.order_by {
        if !columns.contains(o) {
            return Err(Error::config(format!(
                "--order-by {o:?}: table {:?} has no such column",
                options.table
            )));
        }
    }
    let d = conn.dialect();
    let k = KeySql::new(d, &options.table, &options.key);
    // Without a row identity (MySQL) ties are broken by the key alone: the
    // plan is still shown, and applying it is refused by that backend.
    let row_id = d.row_identity().unwrap_or("1");
    let dir = match options.keep {
        Keep::Newest => "DESC",
        Keep::Oldest => "ASC",
    };
    let rank = match &options.order_by {
        Some(o) => {
            let o = d.quote(o);
            format!("CASE WHEN {o} IS NULL THEN 1 ELSE 0 END, {o} {dir}, {row_id} {dir}")
        }
        None => format!("{row_id} {dir}"),
    };
    let (duplicate_groups, rows_to_remove) = duplicate_counts(conn, &k).await?;
    let order_expr = options
        .order_by
        .as_deref()
        .map_or_else(|| "NULL".to_string(), |o| d.quote(o));
    let sample = if duplicate_groups == 0 {
        Vec::new()
    } else {
        conn.query(&format!(
            "SELECT {keys}, o, rn FROM (
                 SELECT {keys}, {order_expr} AS o,
                        ROW_NUMBER() OVER (PARTITION BY {keys} ORDER BY {rank}) AS rn,
                        count(*) OVER (PARTITION BY {keys}) AS n
                 FROM {t} WHERE {nn}) g
             WHERE n > 1 ORDER BY {keys}, rn LIMIT 30",
            t = k.table,
            nn = k.not_null,
            keys = k.keys
        ))
        .await?
        .into_iter()
        .map(|mut row| {
            let rn = as_u64(row.pop().as_ref());
            let order_value = row.pop().unwrap_or(Value::Null);
            PlannedRow {
                key: row,
                order_value,
                keep: rn == 1,
            }
        })
        .collect()
    };
    let constraint = conn.unique_covering(&options.table, &options.key).await?;
    let mut report = DedupeReport {
        table: options.table.clone(),
        key: options.key.clone(),
        order_by: options.order_by.clone(),
        duplicate_groups,
        rows_to_remove,
        sample,
        applied: false,
        run_id: None,
        removed: 0,
        constraint_added: None,
        constraint: constraint.clone(),
    };
    if !options.apply || (duplicate_groups == 0 && constraint.is_some()) {
        return Ok(report);
    }
    let run_id = uuid::Uuid::now_v7().to_string();
    let mut name = format!("{}_idemload_unique_key", options.table);
    if name.len() > 63 {
        name = format!("idemload_unique_{}", &run_id[..8]);
    }
    let done = conn
        .dedupe_apply(&DedupeApply {
            table: options.table.clone(),
            key: options.key.clone(),
            rank,
            run_id: run_id.clone(),
            constraint: name,
        })
        .await?;
    report.applied = true;
    report.run_id = Some(run_id);
    report.removed = done.removed;
    report.constraint_added = done.constraint_added;
    Ok(report)
}
