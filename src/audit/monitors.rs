//! `[audit]` monitors: missing dates per group (`gaps`) and values far above
//! their group's recent median (`spikes`).
//!
//! Both read the columns they need with one plain `SELECT` (dates cast to
//! text, so every backend answers alike) and compute in Rust: a group's
//! rows are sorted by date, a gap is a step missing between two present
//! dates (before the first and after the last date nothing is expected),
//! and a spike is a value over `factor` × the median of the same group's
//! values dated in the `days` before it (a row with no such value is not
//! judged).

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::destination::inspect::{Dialect, Inspect};
use crate::error::{Error, Result};
use crate::key::parse_duration;

/// `[audit]` of a pipeline.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Missing dates per group.
    pub gaps: Option<GapsConfig>,
    /// Values over `factor` × the group's median of the preceding days.
    pub spikes: Option<SpikesConfig>,
    /// Where findings are POSTed whenever the audit finds anything.
    pub alert: Option<super::alert::AlertConfig>,
}

/// `gaps = { field = "usage_date", by = ["service_line_id"], step = "1d" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GapsConfig {
    /// The date (or timestamp) column.
    pub field: String,
    /// Columns that make a group; none: the whole table is one group.
    #[serde(default)]
    pub by: Vec<String>,
    /// The expected distance between consecutive dates (default `1d`).
    #[serde(default = "one_day")]
    pub step: String,
}

/// `spikes = { field = "consumed_gb", by = ["service_line_id"], factor = 3, days = 30 }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpikesConfig {
    /// The numeric column judged.
    pub field: String,
    #[serde(default)]
    pub by: Vec<String>,
    /// A value over `factor` × the median is a spike (default 3).
    #[serde(default = "three")]
    pub factor: f64,
    /// How many days before a row make its baseline (default 30).
    #[serde(default = "thirty")]
    pub days: u32,
    /// The date column that orders the rows (default: `gaps.field`).
    pub date: Option<String>,
}

fn one_day() -> String {
    "1d".into()
}
fn three() -> f64 {
    3.0
}
fn thirty() -> u32 {
    30
}

/// A group with missing dates.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Gap {
    /// The `by` values of the group.
    pub group: Vec<Value>,
    /// The missing dates (the first 100).
    pub missing: Vec<String>,
    /// How many are missing in all.
    pub count: u64,
}

/// A value far above its group's recent median.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Spike {
    pub group: Vec<Value>,
    /// The row's date.
    pub at: String,
    pub value: f64,
    /// The median of the group's values in the `days` before.
    pub median: f64,
}

const MAX_LISTED: usize = 100;
const NANOS_PER_DAY: i128 = 86_400 * 1_000_000_000;

/// A column as text in a query.
fn as_text(d: Dialect, column: &str) -> String {
    let q = d.quote(column);
    match d {
        Dialect::Mysql => format!("CAST({q} AS CHAR)"),
        _ => format!("CAST({q} AS TEXT)"),
    }
}

/// Reads `by..., extra...` of every row.
async fn read(
    conn: &mut dyn Inspect,
    table: &str,
    by: &[String],
    extra: &[String],
) -> Result<Vec<Vec<Value>>> {
    let d = conn.dialect();
    let columns: Vec<String> = by
        .iter()
        .map(|c| d.quote(c))
        .chain(extra.iter().cloned())
        .collect();
    conn.query(&format!(
        "SELECT {} FROM {}",
        columns.join(", "),
        d.quote(table)
    ))
    .await
}

/// An instant (nanoseconds since the epoch) from a date or timestamp text:
/// `2025-01-31`, RFC 3339, or the `YYYY-MM-DD HH:MM:SS[+zz]` databases
/// print. Also reports whether it was a bare date.
pub fn parse_when(v: &Value) -> Option<(i128, bool)> {
    let text = v.as_str()?.trim();
    let nanos = |t: DateTime<Utc>| {
        t.timestamp() as i128 * 1_000_000_000 + t.timestamp_subsec_nanos() as i128
    };
    if let Ok(d) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Some((nanos(d.and_hms_opt(0, 0, 0)?.and_utc()), true));
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some((nanos(t.with_timezone(&Utc)), false));
    }
    if let Ok(t) = DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z") {
        return Some((nanos(t.with_timezone(&Utc)), false));
    }
    NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f")
        .ok()
        .map(|t| (nanos(t.and_utc()), false))
}

fn show(nanos: i128, as_date: bool) -> String {
    let secs = nanos.div_euclid(1_000_000_000) as i64;
    let sub = nanos.rem_euclid(1_000_000_000) as u32;
    match DateTime::<Utc>::from_timestamp(secs, sub) {
        Some(t) if as_date => t.format("%Y-%m-%d").to_string(),
        Some(t) => t.to_rfc3339_opts(SecondsFormat::AutoSi, true),
        None => nanos.to_string(),
    }
}

/// The missing steps of each group.
pub async fn gaps(conn: &mut dyn Inspect, table: &str, g: &GapsConfig) -> Result<Vec<Gap>> {
    let step = parse_duration(&g.step)
        .map_err(|e| Error::config(format!("[audit] gaps.step = {:?}: {e}", g.step)))?;
    let step = step.as_nanos() as i128;
    if step == 0 {
        return Err(Error::config("[audit] gaps.step must be greater than 0"));
    }
    let d = conn.dialect();
    let rows = read(conn, table, &g.by, &[as_text(d, &g.field)]).await?;
    let n = g.by.len();
    let mut groups: BTreeMap<String, (Vec<Value>, Vec<i128>, bool)> = BTreeMap::new();
    for mut row in rows {
        let Some((at, is_date)) = row.get(n).and_then(parse_when) else {
            continue;
        };
        row.truncate(n);
        let entry = groups
            .entry(Value::Array(row.clone()).to_string())
            .or_insert_with(|| (row, Vec::new(), true));
        entry.1.push(at);
        entry.2 &= is_date;
    }
    Ok(groups
        .into_values()
        .filter_map(|(group, dates, all_dates)| {
            let found = missing_steps(dates, step);
            if found.is_empty() {
                return None;
            }
            let as_date = all_dates && step % NANOS_PER_DAY == 0;
            Some(Gap {
                group,
                count: found.len() as u64,
                missing: found
                    .into_iter()
                    .take(MAX_LISTED)
                    .map(|at| show(at, as_date))
                    .collect(),
            })
        })
        .collect())
}

/// The steps missing between the present instants (any order, repeats
/// allowed).
pub fn missing_steps(mut dates: Vec<i128>, step: i128) -> Vec<i128> {
    dates.sort_unstable();
    dates.dedup();
    let mut missing = Vec::new();
    for pair in dates.windows(2) {
        let mut at = pair[0] + step;
        while at < pair[1] && missing.len() < 1_000_000 {
            missing.push(at);
            at += step;
        }
    }
    missing
}

/// The spikes of each group.
pub async fn spikes(
    conn: &mut dyn Inspect,
    table: &str,
    s: &SpikesConfig,
    gaps: Option<&GapsConfig>,
) -> Result<Vec<Spike>> {
    let date = s
        .date
        .clone()
        .or_else(|| gaps.map(|g| g.field.clone()))
        .ok_or_else(|| {
            Error::config(
                "[audit] spikes needs the date that orders the rows: set spikes.date, or gaps.field",
            )
        })?;
    if !(s.factor.is_finite() && s.factor > 0.0) {
        return Err(Error::config(
            "[audit] spikes.factor must be greater than 0",
        ));
    }
    let d = conn.dialect();
    let rows = read(conn, table, &s.by, &[as_text(d, &date), d.quote(&s.field)]).await?;
    let n = s.by.len();
    type Group = (Vec<Value>, Vec<(i128, f64)>, bool);
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    for mut row in rows {
        let Some((at, is_date)) = row.get(n).and_then(parse_when) else {
            continue;
        };
        let Some(value) = row.get(n + 1).and_then(number) else {
            continue;
        };
        row.truncate(n);
        let entry = groups
            .entry(Value::Array(row.clone()).to_string())
            .or_insert_with(|| (row, Vec::new(), true));
        entry.1.push((at, value));
        entry.2 &= is_date;
    }
    let window = i128::from(s.days) * NANOS_PER_DAY;
    let mut out = Vec::new();
    for (group, values, all_dates) in groups.into_values() {
        for (at, value, median) in spikes_in(values, window, s.factor) {
            out.push(Spike {
                group: group.clone(),
                at: show(at, all_dates),
                value,
                median,
            });
        }
    }
    Ok(out)
}

/// The `(at, value, median)` of values over `factor` × the median of the
/// values dated in `[at - window, at)`.
pub fn spikes_in(mut values: Vec<(i128, f64)>, window: i128, factor: f64) -> Vec<(i128, f64, f64)> {
    values.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
    let mut out = Vec::new();
    let mut start = 0;
    let mut first_same = 0;
    for i in 0..values.len() {
        let (at, value) = values[i];
        if i > 0 && values[i - 1].0 != at {
            first_same = i;
        }
        while values[start].0 < at - window {
            start += 1;
        }
        let mut before: Vec<f64> = values[start..first_same].iter().map(|v| v.1).collect();
        if before.is_empty() {
            continue;
        }
        let median = median(&mut before);
        if value > factor * median {
            out.push((at, value, median));
        }
    }
    out
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(d: i128) -> i128 {
        d * NANOS_PER_DAY
    }

    #[test]
    fn missing_steps_lie_between_present_dates_only() {
        let got = missing_steps(vec![day(5), day(1), day(2), day(2), day(6)], day(1));
        assert_eq!(got, vec![day(3), day(4)]);
        assert!(missing_steps(vec![day(1)], day(1)).is_empty());
        assert!(missing_steps(vec![], day(1)).is_empty());
    }

    #[test]
    fn a_value_over_factor_times_the_preceding_median_is_a_spike() {
        let mut values: Vec<(i128, f64)> = (1..=10).map(|d| (day(d), 30.0)).collect();
        values.push((day(11), 5000.0));
        values.push((day(12), 31.0));
        let got = spikes_in(values, day(30), 3.0);
        assert_eq!(got, vec![(day(11), 5000.0, 30.0)]);
    }

    #[test]
    fn the_baseline_is_only_the_window_before_and_the_first_row_is_not_judged() {
        // Day 1 is high; 40 days later it is out of the window.
        let values = vec![(day(1), 1000.0), (day(41), 10.0), (day(42), 25.0)];
        let got = spikes_in(values, day(30), 2.0);
        assert_eq!(got, vec![(day(42), 25.0, 10.0)]);
    }

    #[test]
    fn dates_parse_in_every_database_spelling() {
        let at = |s: &str| parse_when(&Value::String(s.into()));
        let midnight = 1_735_689_600i128 * 1_000_000_000;
        assert_eq!(at("2025-01-01"), Some((midnight, true)));
        assert_eq!(at("2025-01-01T00:00:00Z"), Some((midnight, false)));
        assert_eq!(at("2025-01-01 00:00:00+00"), Some((midnight, false)));
        assert_eq!(at("2025-01-01 00:00:00"), Some((midnight, false)));
        assert_eq!(at("soon"), None);
        assert_eq!(show(midnight, true), "2025-01-01");
    }
}
