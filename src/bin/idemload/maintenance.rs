//! `audit`, `dedupe` and `verify`: print what the library found.

use idemload::audit::{AuditReport, AuditTarget};
use idemload::config::TableDestination;
use idemload::dedupe::{DedupeOptions, DedupeReport};
use idemload::{Error, Pipeline, PipelineConfig};
use serde_json::Value;

use crate::args::{AuditArgs, DedupeArgs};
use crate::output::{json, stdout_line};

/// The URL, table, key, cursor and pipeline name the arguments name.
struct Target {
    url: String,
    table: String,
    key: Vec<String>,
    cursor: Option<String>,
    pipeline: Option<String>,
    monitors: Option<idemload::audit::AuditConfig>,
}

fn target(args: &AuditArgs) -> anyhow::Result<Target> {
    match (&args.pipeline, &args.url, &args.table, &args.key) {
        (Some(path), _, _, _) => {
            let pipeline = Pipeline::new(PipelineConfig::from_file(path)?)?;
            let database = database_of(&pipeline)?;
            Ok(Target {
                url: database.url.clone(),
                table: args.table.clone().unwrap_or_else(|| database.table.clone()),
                key: args
                    .key
                    .clone()
                    .unwrap_or_else(|| pipeline.settings.key.columns()),
                cursor: pipeline.settings.cursor.clone(),
                pipeline: Some(pipeline.name().to_string()),
                monitors: pipeline.config.audit.clone(),
            })
        }
        (None, Some(url), Some(table), Some(key)) => Ok(Target {
            url: url.clone(),
            table: table.clone(),
            key: key.clone(),
            cursor: None,
            pipeline: None,
            monitors: None,
        }),
        _ => Err(Error::config("give a pipeline file, or --url, --table and --key").into()),
    }
}

/// The database table a pipeline writes: audit and dedupe read tables.
fn database_of(pipeline: &Pipeline) -> anyhow::Result<&TableDestination> {
    pipeline.config.destination.database().ok_or_else(|| {
        Error::config(format!(
            "pipeline {:?} writes to an API (type = \"http\"): audit and dedupe read a database table",
            pipeline.name()
        ))
        .into()
    })
}

fn show(v: &[Value]) -> String {
    Value::Array(v.to_vec()).to_string()
}

pub async fn audit(args: AuditArgs) -> anyhow::Result<u8> {
    let t = target(&args)?;
    let report = audit_target(t).await?;
    if args.json {
        json(&report);
    } else {
        print_audit(&report);
    }
    Ok(if report.clean { 0 } else { 1 })
}

async fn audit_target(t: Target) -> anyhow::Result<AuditReport> {
    let mut conn = idemload::destination::open_inspect(&t.url, false).await?;
    Ok(idemload::audit::audit(
        conn.as_mut(),
        &AuditTarget {
            table: t.table,
            key: t.key,
            pipeline: t.pipeline,
            monitors: t.monitors,
        },
    )
    .await?)
}

/// `run --audit`: audits the pipeline's table after its run.
pub async fn audit_after_run(pipeline: &Pipeline) -> anyhow::Result<AuditReport> {
    let database = database_of(pipeline)?;
    audit_target(Target {
        url: database.url.clone(),
        table: database.table.clone(),
        key: pipeline.settings.key.columns(),
        cursor: pipeline.settings.cursor.clone(),
        pipeline: Some(pipeline.name().to_string()),
        monitors: pipeline.config.audit.clone(),
    })
    .await
}

/// Prints an audit's findings in words (stdout).
pub fn print_audit_report(r: &AuditReport) {
    print_audit(r);
}

fn print_audit(r: &AuditReport) {
    stdout_line(&format!(
        "table {:?}: {} rows, key ({})",
        r.table,
        r.rows,
        r.key.join(", ")
    ));
    if r.duplicate_groups == 0 {
        stdout_line("ok   duplicates: none");
    } else {
        stdout_line(&format!(
            "fail duplicates: {} keys appear more than once ({} surplus rows); worst:",
            r.duplicate_groups, r.surplus_rows
        ));
        for g in &r.worst {
            stdout_line(&format!("       {} x{}", show(&g.key), g.count));
        }
    }
    if r.null_key_rows == 0 {
        stdout_line("ok   null keys: none");
    } else {
        stdout_line(&format!(
            "fail null keys: {} rows have a NULL key part",
            r.null_key_rows
        ));
    }
    match &r.unique_constraint {
        Some(c) => stdout_line(&format!("ok   constraint: {c} covers the key")),
        None => stdout_line(
            "fail constraint: no primary key, unique constraint or unique index covers the key (`idemload dedupe --apply` adds one)",
        ),
    }
    if let Some(gaps) = &r.gaps {
        if gaps.is_empty() {
            stdout_line("ok   gaps: no missing dates");
        }
        for g in gaps {
            stdout_line(&format!(
                "fail gaps: {} missing {} date(s): {}",
                show(&g.group),
                g.count,
                g.missing.join(", ")
            ));
        }
    }
    if let Some(spikes) = &r.spikes {
        if spikes.is_empty() {
            stdout_line("ok   spikes: none");
        }
        for s in spikes {
            stdout_line(&format!(
                "fail spikes: {} at {}: {} against a median of {}",
                show(&s.group),
                s.at,
                s.value,
                s.median
            ));
        }
    }
    if let Some(a) = &r.alert {
        match &a.error {
            None => stdout_line(&format!("sent alert: key {}", a.idempotency_key)),
            Some(e) => stdout_line(&format!("fail alert: {e}")),
        }
    }
    if r.run_mismatches.is_empty() {
        stdout_line(&format!(
            "ok   runs: {} runs reconciled with the table's growth",
            r.runs_checked
        ));
    } else {
        for m in &r.run_mismatches {
            stdout_line(&format!(
                "fail runs: after run {} ({}) the table grew by {} rows but the run inserted {}",
                m.run_id, m.started_at, m.grew_by, m.inserted
            ));
        }
    }
}

pub async fn dedupe(args: DedupeArgs) -> anyhow::Result<u8> {
    let t = target(&args.target)?;
    // A dry run only reads.
    let write = args.apply || args.restore.is_some();
    let mut conn = idemload::destination::open_inspect(&t.url, write).await?;
    if let Some(run_id) = &args.restore {
        let restored = conn.restore(run_id).await?;
        if args.target.json {
            json(&serde_json::json!({"run_id": run_id, "restored": restored}));
        } else {
            stdout_line(&format!(
                "restored {restored} rows quarantined by run {run_id}"
            ));
        }
        return Ok(0);
    }
    let options = DedupeOptions {
        table: t.table,
        key: t.key,
        keep: args.keep.parse()?,
        order_by: args.order_by.or(t.cursor),
        apply: args.apply,
    };
    let report = idemload::dedupe::dedupe(conn.as_mut(), &options).await?;
    if args.target.json {
        json(&report);
    } else {
        print_dedupe(&report);
    }
    Ok(0)
}

fn print_dedupe(r: &DedupeReport) {
    let by = r
        .order_by
        .as_deref()
        .map_or("row identity".to_string(), |o| {
            format!("{o:?}, then row identity")
        });
    if r.duplicate_groups == 0 {
        stdout_line(&format!("table {:?}: no duplicate keys", r.table));
    } else {
        stdout_line(&format!(
            "table {:?}: {} keys appear more than once; {} rows {} (ranked by {by}):",
            r.table,
            r.duplicate_groups,
            r.rows_to_remove,
            if r.applied {
                "removed"
            } else {
                "would be removed"
            }
        ));
        for row in &r.sample {
            stdout_line(&format!(
                "  {} {} {}",
                if row.keep { "keep  " } else { "remove" },
                show(&row.key),
                row.order_value
            ));
        }
    }
    match (&r.constraint, &r.constraint_added, r.applied) {
        (Some(c), _, _) => stdout_line(&format!("constraint: {c} already covers the key")),
        (None, Some(c), true) => stdout_line(&format!("constraint: added unique index {c}")),
        (None, _, false) => {
            stdout_line("constraint: none yet; --apply adds a unique index on the key")
        }
        _ => {}
    }
    match (&r.run_id, r.applied) {
        (Some(run_id), true) => stdout_line(&format!(
            "applied as run {run_id}: {} rows moved to _idemload_quarantine (undo: idemload dedupe ... --restore {run_id})",
            r.removed
        )),
        _ if r.duplicate_groups > 0 || r.constraint.is_none() => stdout_line("dry run: nothing changed; run again with --apply"),
        _ => stdout_line("nothing to do"),
    }
}

pub async fn verify(path: &std::path::Path, as_json: bool) -> anyhow::Result<u8> {
    let pipeline = Pipeline::new(PipelineConfig::from_file(path)?)?;
    let report = idemload::verify::verify(&pipeline).await?;
    if as_json {
        json(&report);
    } else if report.pass {
        stdout_line(&format!(
            "PASS {}: two runs give the same {} rows (digest {}); the second run changed nothing",
            report.pipeline,
            report.rows_second,
            &report.digest_second[..16]
        ));
    } else {
        stdout_line(&format!(
            "FAIL {}: first run {} rows, second run {} rows; second run inserted {}, updated {}, deleted {}",
            report.pipeline,
            report.rows_first,
            report.rows_second,
            report.second_run.stats.inserted,
            report.second_run.stats.updated,
            report.second_run.stats.deleted
        ));
        if !report.differing_keys.is_empty() {
            stdout_line(&format!(
                "keys that differ: {}",
                report
                    .differing_keys
                    .iter()
                    .map(Value::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        for hint in &report.hints {
            stdout_line(&format!("hint: {hint}"));
        }
    }
    Ok(if report.pass { 0 } else { 1 })
}
