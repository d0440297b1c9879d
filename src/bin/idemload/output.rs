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

/// The one-line summary of a run.
pub fn summary(report: &RunReport) -> String {
    let s = &report.stats;
    let mut line = format!(
        "{}: read {}, inserted {}, updated {}, unchanged {}, deleted {}, skipped {}, duplicates {}, rejected {} in {:.1}s",
        report.pipeline,
        s.read,
        s.inserted,
        s.updated,
        s.unchanged,
        s.deleted,
        s.skipped,
        s.duplicates,
        s.rejected,
        report.duration_ms as f64 / 1000.0
    );
    if report.checkpoint_before.is_some() || report.checkpoint_after.is_some() {
        line.push_str(&format!(
            "; checkpoint {} -> {}",
            cursor(&report.checkpoint_before),
            cursor(&report.checkpoint_after)
        ));
    }
    if report.status == RunStatus::SucceededWithRejects {
        line.push_str(" (see `idemload rejects`)");
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
        stdout_line(&format!("{}:{key} {}\n    {raw}", r.source_ref, r.reason));
    }
}
