//! `audit`: find the damage in a table: duplicate keys, NULL key parts, a
//! missing unique constraint, and runs after which the table grew by more
//! than they inserted.
//!
//! Every check is one set-based, read-only query (no table lock: writers go
//! on), so it runs on a large table and on tables idemload never created.
//! A pipeline's `[audit]` adds monitors ([`monitors`]: missing dates,
//! spikes) and an alert ([`alert`]) that POSTs the findings.

pub mod alert;
pub mod monitors;

use serde::Serialize;
use serde_json::Value;

use crate::destination::inspect::{Dialect, Inspect};
use crate::error::{Error, Result};
use crate::state::RUNS_TABLE;
use crate::stats::RunStats;

pub use self::alert::{AlertConfig, AlertOutcome};
pub use self::monitors::{AuditConfig, Gap, GapsConfig, Spike, SpikesConfig};

/// What to audit.
#[derive(Debug, Clone)]
pub struct AuditTarget {
    pub table: String,
    pub key: Vec<String>,
    /// Reconcile with this pipeline's runs (when audited through a pipeline).
    pub pipeline: Option<String>,
    /// The pipeline's `[audit]`: monitors and alert.
    pub monitors: Option<AuditConfig>,
}

/// One group of rows sharing a key.
#[derive(Debug, Clone, Serialize)]
pub struct DuplicateGroup {
    pub key: Vec<Value>,
    pub count: u64,
}

/// A run after which the table grew by more than it inserted.
#[derive(Debug, Clone, Serialize)]
pub struct Mismatch {
    pub run_id: String,
    pub started_at: String,
    pub inserted: u64,
    pub grew_by: i64,
}

/// The audit's findings (the `--json` object).
#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    pub table: String,
    pub key: Vec<String>,
    pub rows: u64,
    pub duplicate_groups: u64,
    pub surplus_rows: u64,
    pub worst: Vec<DuplicateGroup>,
    pub null_key_rows: u64,
    /// The primary key, unique constraint or unique index covering the key.
    pub unique_constraint: Option<String>,
    pub runs_checked: u64,
    pub run_mismatches: Vec<Mismatch>,
    /// `[audit] gaps`: groups with missing dates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gaps: Option<Vec<Gap>>,
    /// `[audit] spikes`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spikes: Option<Vec<Spike>>,
    /// `[audit] alert`, when the audit found something.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alert: Option<AlertOutcome>,
    pub clean: bool,
}

impl AuditReport {
    /// The checks that failed, as the alert sends them (and hashes them).
    pub fn findings(&self) -> Value {
        let mut f = serde_json::Map::new();
        if self.duplicate_groups > 0 {
            f.insert(
                "duplicates".into(),
                serde_json::json!({"groups": self.duplicate_groups, "surplus_rows": self.surplus_rows, "worst": self.worst}),
            );
        }
        if self.null_key_rows > 0 {
            f.insert("null_key_rows".into(), self.null_key_rows.into());
        }
        if self.unique_constraint.is_none() {
            f.insert("unique_constraint_missing".into(), Value::Bool(true));
        }
        if !self.run_mismatches.is_empty() {
            f.insert(
                "run_mismatches".into(),
                serde_json::to_value(&self.run_mismatches).unwrap_or_default(),
            );
        }
        if let Some(g) = self.gaps.as_ref().filter(|g| !g.is_empty()) {
            f.insert("gaps".into(), serde_json::to_value(g).unwrap_or_default());
        }
        if let Some(s) = self.spikes.as_ref().filter(|s| !s.is_empty()) {
            f.insert("spikes".into(), serde_json::to_value(s).unwrap_or_default());
        }
        Value::Object(f)
    }
}

/// Builds the SQL pieces for a table and key.
pub(crate) struct KeySql {
    pub table: String,
    pub keys: String,
    pub not_null: String,
    pub any_null: String,
}

impl KeySql {
    pub(crate) fn new(d: Dialect, table: &str, key: &[String]) -> KeySql {
        let q: Vec<String> = key.iter().map(|k| d.quote(k)).collect();
        KeySql {
            table: d.quote(table),
            keys: q.join(", "),
            not_null: q
                .iter()
                .map(|k| format!("{k} IS NOT NULL"))
                .collect::<Vec<_>>()
                .join(" AND "),
            any_null: q
                .iter()
                .map(|k| format!("{k} IS NULL"))
                .collect::<Vec<_>>()
                .join(" OR "),
        }
    }
}

pub(crate) fn as_u64(v: Option<&Value>) -> u64 {
    match v {
        Some(Value::Number(n)) => n
            .as_u64()
            .or_else(|| n.as_f64().map(|f| f as u64))
            .unwrap_or(0),
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        _ => 0,
    }
}

/// How many keys appear more than once, and how many rows are surplus.
pub(crate) async fn duplicate_counts(conn: &mut dyn Inspect, k: &KeySql) -> Result<(u64, u64)> {
    let groups = conn
        .query(&format!(
            "SELECT count(*), sum(n - 1) FROM (SELECT count(*) AS n FROM {t} WHERE {nn} GROUP BY {keys} HAVING count(*) > 1) g",
            t = k.table,
            nn = k.not_null,
            keys = k.keys
        ))
        .await?;
    let first = groups.first();
    Ok((
        as_u64(first.and_then(|r| r.first())),
        as_u64(first.and_then(|r| r.get(1))),
    ))
}

/// Checks that the table and key columns exist.
pub(crate) async fn check_table(
    conn: &mut dyn Inspect,
    table: &str,
    key: &[String],
) -> Result<Vec<String>> {
    let columns = conn.columns(table).await?;
    if columns.is_empty() {
        return Err(Error::config(format!("table {table:?} does not exist")));
    }
    for k in key {
        if !columns.contains(k) {
            return Err(Error::config(format!(
                "table {table:?} has no column {k:?} (columns: {})",
                columns.join(", ")
            )));
        }
    }
    Ok(columns)
}

/// Audits a table.
pub async fn audit(conn: &mut dyn Inspect, target: &AuditTarget) -> Result<AuditReport> {
    check_table(conn, &target.table, &target.key).await?;
    let d = conn.dialect();
    let k = KeySql::new(d, &target.table, &target.key);
    let rows = as_u64(
        conn.query(&format!("SELECT count(*) FROM {}", k.table))
            .await?
            .first()
            .and_then(|r| r.first()),
    );
    let (duplicate_groups, surplus_rows) = duplicate_counts(conn, &k).await?;
    let worst = if duplicate_groups == 0 {
        Vec::new()
    } else {
        conn.query(&format!(
            "SELECT {keys}, count(*) AS n FROM {t} WHERE {nn} GROUP BY {keys} HAVING count(*) > 1 ORDER BY n DESC, {keys} LIMIT 10",
            t = k.table,
            nn = k.not_null,
            keys = k.keys
        ))
        .await?
        .into_iter()
        .map(|mut row| {
            let count = as_u64(row.last());
            row.pop();
            DuplicateGroup { key: row, count }
        })
        .collect()
    };
    let null_key_rows = as_u64(
        conn.query(&format!(
            "SELECT count(*) FROM {} WHERE {}",
            k.table, k.any_null
        ))
        .await?
        .first()
        .and_then(|r| r.first()),
    );
    let unique_constraint = conn.unique_covering(&target.table, &target.key).await?;
    let (runs_checked, run_mismatches) = match &target.pipeline {
        Some(p) => reconcile(conn, p, &target.table).await,
        None => (0, Vec::new()),
    };
    let monitors = target.monitors.clone().unwrap_or_default();
    let gaps = match &monitors.gaps {
        Some(g) => Some(monitors::gaps(conn, &target.table, g).await?),
        None => None,
    };
    let spikes = match &monitors.spikes {
        Some(s) => Some(monitors::spikes(conn, &target.table, s, monitors.gaps.as_ref()).await?),
        None => None,
    };
    let clean = duplicate_groups == 0
        && null_key_rows == 0
        && unique_constraint.is_some()
        && run_mismatches.is_empty()
        && gaps.as_ref().is_none_or(Vec::is_empty)
        && spikes.as_ref().is_none_or(Vec::is_empty);
    let mut report = AuditReport {
        table: target.table.clone(),
        key: target.key.clone(),
        rows,
        duplicate_groups,
        surplus_rows,
        worst,
        null_key_rows,
        unique_constraint,
        runs_checked,
        run_mismatches,
        gaps,
        spikes,
        alert: None,
        clean,
    };
    if let (false, Some(a)) = (report.clean, &monitors.alert) {
        let findings = report.findings();
        let pipeline = target.pipeline.clone().unwrap_or_default();
        let key = alert::idempotency_key(&pipeline, &target.table, &findings);
        let body = serde_json::json!({
            "pipeline": pipeline,
            "table": target.table,
            "findings": findings,
        });
        report.alert = Some(alert::send(a, &key, &body).await?);
    }
    Ok(report)
}

/// Compares how much the table grew after each run with what the run
/// inserted. Runs recorded without a row count are passed over.
async fn reconcile(conn: &mut dyn Inspect, pipeline: &str, table: &str) -> (u64, Vec<Mismatch>) {
    let d = conn.dialect();
    let sql = format!(
        "SELECT run_id, started_at, stats, rows_after FROM {runs}
         WHERE pipeline = {p} AND table_name = {t} AND status IN ('succeeded', 'succeeded_with_rejects')
           AND rows_after IS NOT NULL
         ORDER BY started_at, run_id",
        runs = d.quote(RUNS_TABLE),
        p = d.literal(pipeline),
        t = d.literal(table)
    );
    let Ok(runs) = conn.query(&sql).await else {
        return (0, Vec::new());
    };
    let mut mismatches = Vec::new();
    let mut previous: Option<i64> = None;
    for run in &runs {
        let stats: RunStats = match run.get(2) {
            Some(Value::String(s)) => serde_json::from_str(s).unwrap_or_default(),
            Some(v @ Value::Object(_)) => serde_json::from_value(v.clone()).unwrap_or_default(),
            _ => RunStats::default(),
        };
        let after = as_u64(run.get(3)) as i64;
        if let Some(before) = previous {
            let grew_by = after - before;
            if grew_by > stats.inserted as i64 - stats.deleted as i64 {
                mismatches.push(Mismatch {
                    run_id: run
                        .first()
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    started_at: run
                        .get(1)
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    inserted: stats.inserted,
                    grew_by,
                });
            }
        }
        previous = Some(after);
    }
    (runs.len() as u64, mismatches)
}
