//! What the binary prints: results on stdout, the summary on stderr.

use std::io::Write;

use idemload::state::{RejectRecord, RunRecord};
use idemload::{RunReport, RunStatus};
use serde_json::Value;

/// Writes a line to stdout; a closed pipe ends the process quietly.
pub fn stdout_line(text: &str) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{text}").and_then(|_| out.flush()).is_err() {
        std::process::exit(0);
    }
}

/// Raw bytes on stdout (a completion script, a man page).
pub fn stdout_bytes(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    if out.write_all(bytes).and_then(|_| out.flush()).is_err() {
        std::process::exit(0);
    }
}

/// Every field of the `load`/`run` report, so that the object has one shape
/// whatever the run did (docs/reference.md lists them).
const RUN_FIELDS: [&str; 25] = [
    "pipeline",
    "run_id",
    "status",
    "read",
    "inserted",
    "updated",
    "unchanged",
    "deleted",
    "removed",
    "skipped",
    "duplicates",
    "rejected",
    "deferred",
    "known_rejects",
    "files_skipped",
    "looked_up_api",
    "looked_up_table",
    "api_requests",
    "checkpoint_before",
    "checkpoint_after",
    "started_at",
    "finished_at",
    "duration_ms",
    "rows_per_second",
    "error",
];

/// The counters among [`RUN_FIELDS`]: zero when absent, never missing.
fn is_count(field: &str) -> bool {
    !matches!(
        field,
        "pipeline"
            | "run_id"
            | "status"
            | "checkpoint_before"
            | "checkpoint_after"
            | "started_at"
            | "finished_at"
            | "error"
    )
}

/// Fills the fields a report left out (zeros, nulls), in the documented order.
fn full_shape(mut given: serde_json::Map<String, Value>) -> Value {
    let mut out = serde_json::Map::new();
    for field in RUN_FIELDS {
        let value = given.remove(field).unwrap_or(if is_count(field) {
            Value::from(0)
        } else {
            Value::Null
        });
        out.insert(field.to_string(), value);
    }
    // Fields a newer library adds stay, after the documented ones.
    out.extend(given);
    Value::Object(out)
}

/// Records read per second of the run (0 for a run too short to time).
fn rows_per_second(report: &RunReport) -> f64 {
    if report.duration_ms == 0 {
        return 0.0;
    }
    let rate = report.stats.read as f64 * 1000.0 / report.duration_ms as f64;
    (rate * 10.0).round() / 10.0
}

/// The `--json` object of a finished run.
pub fn run_json(report: &RunReport) -> Value {
    let mut map = match serde_json::to_value(report) {
        Ok(Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    map.insert(
        "rows_per_second".into(),
        Value::from(rows_per_second(report)),
    );
    full_shape(map)
}

/// The `--json` object of a run that stopped with an error.
pub fn failed_run(pipeline: &str, error: &str) -> Value {
    let mut map = serde_json::Map::new();
    map.insert("pipeline".into(), Value::from(pipeline));
    map.insert("status".into(), Value::from("failed"));
    map.insert("error".into(), Value::from(error));
    full_shape(map)
}

/// One JSON object on stdout.
pub fn json(value: &impl serde::Serialize) {
    stdout_line(&serde_json::to_string(value).unwrap_or_default());
}

fn cursor(v: &Option<Value>) -> String {
    match v {
        None => "none".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// The one-line summary of a run; `rejects` is the command that lists its
/// rejects (for `load`, with the --url and --table it was given).
pub fn summary(report: &RunReport, rejects: &str) -> String {
    let s = &report.stats;
    let read = match report.status {
        RunStatus::Interrupted => "interrupted; committed read",
        _ => "read",
    };
    let mut line = format!(
        "{}: {read} {}, inserted {}, updated {}, unchanged {}, deleted {}, skipped {}, duplicates {}, rejected {} in {:.1}s ({} rows/s)",
        report.pipeline,
        s.read,
        s.inserted,
        s.updated,
        s.unchanged,
        s.deleted,
        s.skipped,
        s.duplicates,
        s.rejected,
        report.duration_ms as f64 / 1000.0,
        rows_per_second(report).round()
    );
    if report.checkpoint_before.is_some() || report.checkpoint_after.is_some() {
        line.push_str(&format!(
            "; checkpoint {} -> {}",
            cursor(&report.checkpoint_before),
            cursor(&report.checkpoint_after)
        ));
    }
    if s.known_rejects > 0 {
        line.push_str(&format!(
            " ({} of the rejects were rejected by an earlier run too)",
            s.known_rejects
        ));
    }
    if s.files_skipped > 0 {
        line.push_str(&format!(
            "; {} file{} unchanged since an earlier run loaded {} (not read; --full-refresh reads every file)",
            s.files_skipped,
            if s.files_skipped == 1 { "" } else { "s" },
            if s.files_skipped == 1 { "it" } else { "them" },
        ));
    }
    if s.deferred > 0 {
        line.push_str(&format!(
            "; {} deferred: the daily request budget (requests_per_day) is spent, the checkpoint stays, and the next run writes them",
            s.deferred
        ));
    }
    if report.status == RunStatus::SucceededWithRejects {
        line.push_str(&format!(" (see `{rejects}`)"));
    }
    if report.status == RunStatus::Interrupted {
        line.push_str("; committed batches stay, and running again resumes from there");
    }
    line
}

pub fn history_table(runs: &[RunRecord]) {
    if runs.is_empty() {
        stdout_line("no runs yet");
        return;
    }
    stdout_line(&format!(
        "{:<36}  {:<22}  {:<24}  {:>9} {:>9} {:>9} {:>9} {:>9}",
        "run_id", "status", "started_at", "read", "inserted", "updated", "unchanged", "rejected"
    ));
    for r in runs {
        let s = r.stats.unwrap_or_default();
        stdout_line(&format!(
            "{:<36}  {:<22}  {:<24}  {:>9} {:>9} {:>9} {:>9} {:>9}{}",
            r.run_id,
            r.status,
            r.started_at,
            s.read,
            s.inserted,
            s.updated,
            s.unchanged,
            s.rejected,
            r.error
                .as_deref()
                .map(|e| format!("  error: {e}"))
                .unwrap_or_default()
        ));
    }
}

pub fn rejects_list(rejects: &[RejectRecord]) {
    if rejects.is_empty() {
        stdout_line("no rejects");
        return;
    }
    for r in rejects {
        let key = r
            .record_key
            .as_deref()
            .map(|k| format!(" key {k}"))
            .unwrap_or_default();
        let mut raw = r.raw.clone();
        if raw.len() > 200 {
            let mut cut = 200;
            while !raw.is_char_boundary(cut) {
                cut -= 1;
            }
            raw.truncate(cut);
            raw.push_str("...");
        }
        let known = if r.known {
            " (known: an earlier run rejected it too)"
        } else {
            ""
        };
        stdout_line(&format!(
            "{}:{key} {}{known}\n    {raw}",
            r.source_ref, r.reason
        ));
    }
}
