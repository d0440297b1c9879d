//! `replace` and `window` runs: batches go to a staging table, and the
//! run's last batch swaps in only the differences, in its transaction.

use rusqlite::Connection;

use super::ddl::create_table;
use super::{declared_type, read_schema, Run};
use crate::destination::compare::Compared;
use crate::destination::inspect::Dialect;
use crate::destination::sql::{column_list, key_match, quote, window_scope};
use crate::error::Result;
use crate::mode::Mode;
use crate::stats::RunStats;

/// Applies a `replace`/`window` stage to the target, writing only the
/// differences, and drops the stage. Returns the logical change.
pub(super) fn apply_stage(conn: &Connection, run: &mut Run, stage: &str) -> Result<RunStats> {
    let target = run.target.table.clone();
    let keys = run.target.key_columns.clone();
    let mut stats = RunStats::default();
    let Some(stage_schema) = read_schema(conn, stage)? else {
        // Nothing was staged: a replace empties the table, a window with
        // bounds (a backfill's) empties them, a window guessed from the
        // data touches nothing.
        let stored = read_schema(conn, &target)?;
        let scope = match (
            &run.target.mode,
            &run.target.window,
            &run.target.window_field,
        ) {
            (Mode::Replace, ..) => Some("1".to_string()),
            (Mode::Window, Some(bounds), Some(w))
                if stored.as_ref().is_some_and(|t| t.position(w).is_some()) =>
            {
                Some(window_scope("", &quote(w), Some(bounds), "", false))
            }
            _ => None,
        };
        if let (Some(scope), Some(_)) = (scope, stored) {
            let removed =
                conn.execute(&format!("DELETE FROM {} WHERE {scope}", quote(&target)), [])? as u64;
            stats.removed = removed;
        }
        return Ok(stats);
    };
    let mut target_schema = match read_schema(conn, &target)? {
        Some(s) => s,
        None => {
            create_table(conn, &target, &stage_schema.columns, &keys)?;
            stage_schema.clone()
        }
    };
    // The columns the swap writes: a column the table fills in itself is
    // left to it when the records lack it.
    let written = {
        let carried = carried(conn, run, stage, &stage_schema)?;
        run.fills.swapped(
            &target,
            &target_schema.names(),
            &stage_schema.names(),
            &keys,
            |n| carried.iter().any(|c| c == n),
        )?
    };
    // Both tables get every column of the other that the swap writes, so a
    // snapshot without a field sets it to null.
    for c in &stage_schema.columns {
        if target_schema.position(&c.name).is_none() {
            conn.execute_batch(&format!(
                "ALTER TABLE {} ADD COLUMN {} {}",
                quote(&target),
                quote(&c.name),
                declared_type(c.ty)
            ))?;
            target_schema.columns.push(c.clone());
        }
    }
    for c in &target_schema.columns {
        if stage_schema.position(&c.name).is_none() && written.contains(&c.name) {
            conn.execute_batch(&format!(
                "ALTER TABLE {} ADD COLUMN {} {}",
                quote(stage),
                quote(&c.name),
                declared_type(c.ty)
            ))?;
        }
    }
    let (t, s) = (quote(&target), quote(stage));
    let names: Vec<&str> = target_schema
        .columns
        .iter()
        .map(|c| c.name.as_str())
        .filter(|n| written.iter().any(|w| w == n))
        .collect();
    let others: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| !keys.iter().any(|k| k == n))
        .collect();
    let matched = key_match(&keys, &t, &s);
    let scope = match (&run.target.mode, &run.target.window_field) {
        (Mode::Window, Some(w)) => {
            window_scope(&t, &quote(w), run.target.window.as_ref(), &s, false)
        }
        _ => "1".to_string(),
    };
    let staged: u64 = conn.query_row(&format!("SELECT count(*) FROM {s}"), [], |r| r.get(0))?;
    let removed = conn.execute(
        &format!(
            "DELETE FROM {t} WHERE {scope} AND NOT EXISTS (SELECT 1 FROM {s} WHERE {matched})"
        ),
        [],
    )? as u64;
    let updated = if others.is_empty() {
        0
    } else {
        let set = others
            .iter()
            .map(|c| format!("{q} = {s}.{q}", q = quote(c)))
            .collect::<Vec<_>>()
            .join(", ");
        let differs = run.target.compare.differs(
            Dialect::Sqlite,
            target_schema
                .columns
                .iter()
                .filter(|c| others.contains(&c.name.as_str()))
                .map(|c| Compared::between(Dialect::Sqlite, &c.name, c.ty, &t, &s)),
        );
        conn.execute(
            &format!("UPDATE {t} SET {set} FROM {s} WHERE {matched} AND {differs}"),
            [],
        )? as u64
    };
    let cols = column_list(&names);
    let inserted = conn.execute(
        &format!(
            "INSERT INTO {t} ({cols}) SELECT {cols} FROM {s} WHERE NOT EXISTS (SELECT 1 FROM {t} WHERE {matched})"
        ),
        [],
    )? as u64;
    conn.execute_batch(&format!("DROP TABLE {s}"))?;
    run.schema = None;
    stats.inserted = inserted;
    stats.updated = updated;
    stats.unchanged = staged - inserted - updated;
    stats.removed = removed;
    Ok(stats)
}

/// The stage's columns the records carried: all of them, but a column the
/// table fills in only when some staged row holds a value in it.
fn carried(
    conn: &Connection,
    run: &Run,
    stage: &str,
    stage_schema: &crate::destination::schema::TableSchema,
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for c in &stage_schema.columns {
        let held = !run.fills.fills_in(&c.name)
            || conn.query_row(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM {} WHERE {} IS NOT NULL)",
                    quote(stage),
                    quote(&c.name)
                ),
                [],
                |r| r.get::<_, bool>(0),
            )?;
        if held {
            out.push(c.name.clone());
        }
    }
    Ok(out)
}
