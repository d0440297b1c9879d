//! `replace` and `window` runs: batches go to a staging table, and the
//! run's last batch swaps in only the differences, in its transaction.

use tokio_postgres::Transaction;

use super::ddl::{add_columns, create_table, read_schema, PgColumn};
use super::{pg_error, qualified, Run};
use crate::destination::compare::Compared;
use crate::destination::inspect::Dialect;
use crate::destination::sql::{column_list, quote, window_scope};
use crate::error::Result;
use crate::mode::Mode;
use crate::stats::RunStats;

/// Applies a `replace`/`window` stage to the target, writing only the
/// differences, and drops the stage. Returns the logical change.
pub(super) async fn apply_stage(
    tx: &Transaction<'_>,
    schema: &str,
    run: &mut Run,
    stage: &str,
) -> Result<RunStats> {
    let target = run.target.table.clone();
    let keys = run.target.key_columns.clone();
    let context = format!("applying the stage of table {target:?}");
    let (t, s) = (qualified(schema, &target), qualified(schema, stage));
    let mut stats = RunStats::default();
    let Some(stage_schema) = read_schema(tx, schema, stage).await? else {
        // Nothing was staged: a replace empties the table, a window with
        // bounds (a backfill's) empties them, a window guessed from the
        // data touches nothing.
        let stored = read_schema(tx, schema, &target).await?;
        let scope = match (&run.target.window, &run.target.window_field) {
            _ if run.target.mode == Mode::Replace => Some("true".to_string()),
            (Some(bounds), Some(w))
                if run.target.mode == Mode::Window
                    && stored.as_ref().is_some_and(|t| t.position(w).is_some()) =>
            {
                Some(window_scope("", &quote(w), Some(bounds), "", false))
            }
            _ => None,
        };
        if let (Some(scope), Some(_)) = (scope, stored) {
            let removed = tx
                .execute(&format!("DELETE FROM {t} WHERE {scope}"), &[])
                .await
                .map_err(pg_error(context))?;
            stats.removed = removed;
        }
        return Ok(stats);
    };
    let mut target_schema = match read_schema(tx, schema, &target).await? {
        Some(ts) => ts,
        None => {
            create_table(tx, schema, &target, &stage_schema.columns, &keys, false).await?;
            stage_schema.clone()
        }
    };
    // The columns the swap writes: a column the table fills in itself is
    // left to it when the records lack it.
    let written = {
        let carried = carried(tx, run, &s, &stage_schema).await?;
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
    let to_target: Vec<PgColumn> = stage_schema
        .columns
        .iter()
        .filter(|c| target_schema.position(&c.name).is_none())
        .cloned()
        .collect();
    add_columns(tx, schema, &target, &to_target).await?;
    target_schema.columns.extend(to_target);
    let to_stage: Vec<PgColumn> = target_schema
        .columns
        .iter()
        .filter(|c| stage_schema.position(&c.name).is_none() && written.contains(&c.name))
        .cloned()
        .collect();
    add_columns(tx, schema, stage, &to_stage).await?;
    target_schema.columns.retain(|c| written.contains(&c.name));

    let names: Vec<&str> = target_schema
        .columns
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    let others: Vec<&PgColumn> = target_schema
        .columns
        .iter()
        .filter(|c| !keys.contains(&c.name))
        .collect();
    let matched = keys
        .iter()
        .map(|k| format!("t.{q} = s.{q}", q = quote(k)))
        .collect::<Vec<_>>()
        .join(" AND ");
    let scope = match (&run.target.mode, &run.target.window_field) {
        (Mode::Window, Some(w)) => {
            window_scope("t", &quote(w), run.target.window.as_ref(), &s, false)
        }
        _ => "true".to_string(),
    };
    let run_sql = |sql: String| {
        let context = context.clone();
        async move { tx.execute(&sql, &[]).await.map_err(pg_error(context)) }
    };
    let staged: i64 = tx
        .query_one(&format!("SELECT count(*) FROM {s}"), &[])
        .await
        .map_err(pg_error(context.clone()))?
        .get(0);
    let removed = run_sql(format!(
        "DELETE FROM {t} t WHERE {scope} AND NOT EXISTS (SELECT 1 FROM {s} s WHERE {matched})"
    ))
    .await?;
    let updated = if others.is_empty() {
        0
    } else {
        let set = others
            .iter()
            .map(|c| format!("{q} = s.{q}", q = quote(&c.name)))
            .collect::<Vec<_>>()
            .join(", ");
        let differs = run.target.compare.differs(
            Dialect::Postgres,
            others.iter().map(|c| Compared {
                name: &c.name,
                ty: c.ty,
                stored: c.comparable(&format!("t.{}", quote(&c.name))),
                new: c.comparable(&format!("s.{}", quote(&c.name))),
            }),
        );
        run_sql(format!(
            "UPDATE {t} t SET {set} FROM {s} s WHERE {matched} AND {differs}"
        ))
        .await?
    };
    let cols = column_list(&names);
    let s_cols = names
        .iter()
        .map(|n| format!("s.{}", quote(n)))
        .collect::<Vec<_>>()
        .join(", ");
    let inserted = run_sql(format!(
        "INSERT INTO {t} ({cols}) SELECT {s_cols} FROM {s} s
         WHERE NOT EXISTS (SELECT 1 FROM {t} t WHERE {matched})"
    ))
    .await?;
    tx.batch_execute(&format!("DROP TABLE {s}"))
        .await
        .map_err(pg_error(context))?;
    run.schema = None;
    stats.inserted = inserted;
    stats.updated = updated;
    stats.unchanged = staged as u64 - inserted - updated;
    stats.removed = removed;
    Ok(stats)
}

/// The stage's columns the records carried: all of them, but a column the
/// table fills in only when some staged row holds a value in it.
async fn carried(
    tx: &Transaction<'_>,
    run: &Run,
    stage: &str,
    stage_schema: &super::ddl::PgSchema,
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for c in &stage_schema.columns {
        let held = !run.fills.fills_in(&c.name)
            || tx
                .query_one(
                    &format!(
                        "SELECT EXISTS (SELECT 1 FROM {stage} WHERE {} IS NOT NULL)",
                        quote(&c.name)
                    ),
                    &[],
                )
                .await
                .map_err(pg_error(format!("reading the stage {stage}")))?
                .get::<_, bool>(0);
        if held {
            out.push(c.name.clone());
        }
    }
    Ok(out)
}
