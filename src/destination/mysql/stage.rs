//! `replace` and `window` on MySQL: the run's rows are merged batch by batch
//! into `_idemload_stage_<table>`, and the last batch's transaction applies
//! only the differences to the target (DELETE rows absent in scope, UPDATE
//! changed rows, INSERT new ones), so an identical snapshot writes nothing.
//!
//! The DDL this needs (creating the target, giving both tables each other's
//! columns) runs in [`prepare`], before that transaction opens, because
//! MySQL commits implicitly before DDL; it is idempotent, so a crash in
//! between leaves nothing a re-run does not expect.

use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use super::ddl::{add_columns, create_table, read_table, SqlColumn};
use super::{Run, Server};
use crate::destination::compare::Compared;
use crate::destination::inspect::Dialect;
use crate::destination::sql::{quote_mysql as q, window_scope};
use crate::mode::Mode;
use crate::stats::RunStats;

type R<T> = std::result::Result<T, mysql_async::Error>;

/// What the last batch's transaction applies.
#[derive(Debug)]
pub(super) enum Plan {
    /// Nothing was staged: a replace empties an existing target, a window
    /// with bounds (a backfill's) empties them when the target has the
    /// window field.
    Nothing {
        target_exists: bool,
        has_window_field: bool,
    },
    /// Apply the stage; both tables have these columns.
    Apply { columns: Vec<SqlColumn> },
}

/// Makes target and stage ready for [`apply`] (before the transaction).
pub(super) async fn prepare(
    conn: &mut Conn,
    server: &Server,
    run: &Run,
    stage: &str,
) -> crate::error::Result<Plan> {
    let mysql = |e: mysql_async::Error| {
        crate::error::Error::destination(format!("mysql table {stage:?}"), e)
    };
    let target = &run.target.table;
    let Some(staged) = read_table(conn, server, stage).await.map_err(mysql)? else {
        let stored = read_table(conn, server, target).await.map_err(mysql)?;
        let field = run.target.window_field.as_deref();
        return Ok(Plan::Nothing {
            target_exists: stored.is_some(),
            has_window_field: stored
                .zip(field)
                .is_some_and(|(t, f)| t.position(f).is_some()),
        });
    };
    let existing = match read_table(conn, server, target).await.map_err(mysql)? {
        Some(t) => t,
        None => {
            create_table(
                conn,
                server,
                target,
                &staged.columns,
                &run.target.key_columns,
            )
            .await
            .map_err(mysql)?;
            read_table(conn, server, target)
                .await
                .map_err(mysql)?
                .unwrap_or_else(|| staged.clone())
        }
    };
    // Both tables get every column of the other, so a snapshot without a
    // field sets it to null.
    let to_target: Vec<SqlColumn> = staged
        .columns
        .iter()
        .filter(|c| existing.position(&c.name).is_none())
        .cloned()
        .collect();
    let to_stage: Vec<SqlColumn> = existing
        .columns
        .iter()
        .filter(|c| staged.position(&c.name).is_none())
        .cloned()
        .collect();
    add_columns(conn, target, &to_target).await.map_err(mysql)?;
    add_columns(conn, stage, &to_stage).await.map_err(mysql)?;
    let mut columns = existing.columns;
    columns.extend(to_target);
    Ok(Plan::Apply { columns })
}

/// Applies the stage to the target inside the last batch's transaction;
/// returns the logical change.
pub(super) async fn apply(
    conn: &mut Conn,
    run: &Run,
    stage: &str,
    plan: &Plan,
) -> crate::error::Result<RunStats> {
    let mysql = |e: mysql_async::Error| {
        crate::error::Error::destination(format!("mysql table {stage:?}"), e)
    };
    let written;
    let plan = match plan {
        Plan::Apply { columns } => {
            // The columns the swap writes (the stage holds this batch's
            // rows by now): a column the table fills in itself is left to
            // it when the records lack it.
            let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
            let carried = carried(conn, run, stage, columns).await.map_err(mysql)?;
            let keep = run.fills.swapped(
                &run.target.table,
                &names,
                &[],
                &run.target.key_columns,
                |n| carried.iter().any(|c| c == n),
            )?;
            let mut columns = columns.clone();
            columns.retain(|c| keep.contains(&c.name));
            written = Plan::Apply { columns };
            &written
        }
        nothing => nothing,
    };
    swap(conn, run, stage, plan).await.map_err(mysql)
}

async fn swap(conn: &mut Conn, run: &Run, stage: &str, plan: &Plan) -> R<RunStats> {
    let mut stats = RunStats::default();
    let (t, s) = (q(&run.target.table), q(stage));
    let columns = match plan {
        Plan::Nothing {
            target_exists,
            has_window_field,
        } => {
            let scope = match (&run.target.window, &run.target.window_field) {
                _ if run.target.mode == Mode::Replace && *target_exists => Some("TRUE".into()),
                (Some(bounds), Some(w)) if run.target.mode == Mode::Window && *has_window_field => {
                    Some(window_scope("", &q(w), Some(bounds), "", true))
                }
                _ => None,
            };
            if let Some(scope) = scope {
                conn.query_drop(format!("DELETE FROM {t} WHERE {scope}"))
                    .await?;
                stats.removed = conn.affected_rows();
            }
            return Ok(stats);
        }
        Plan::Apply { columns } => columns,
    };
    let keys = &run.target.key_columns;
    let matched = keys
        .iter()
        .map(|k| format!("t.{0} = s.{0}", q(k)))
        .collect::<Vec<_>>()
        .join(" AND ");
    let k0 = q(&keys[0]);
    let others: Vec<&SqlColumn> = columns.iter().filter(|c| !keys.contains(&c.name)).collect();
    let scope = match (&run.target.mode, &run.target.window_field) {
        (Mode::Window, Some(w)) => window_scope("t", &q(w), run.target.window.as_ref(), &s, true),
        _ => "TRUE".to_string(),
    };
    let staged: Option<i64> = conn
        .query_first(format!("SELECT COUNT(*) FROM {s}"))
        .await?;
    let staged = staged.unwrap_or_default() as u64;
    conn.query_drop(format!(
        "DELETE t FROM {t} t LEFT JOIN {s} s ON {matched} WHERE s.{k0} IS NULL AND {scope}"
    ))
    .await?;
    let removed = conn.affected_rows();
    let updated = if others.is_empty() {
        0
    } else {
        let set = others
            .iter()
            .map(|c| format!("t.{0} = s.{0}", q(&c.name)))
            .collect::<Vec<_>>()
            .join(", ");
        let differs = run.target.compare.differs(
            Dialect::Mysql,
            others
                .iter()
                .map(|c| Compared::between(Dialect::Mysql, &c.name, c.ty, "t", "s")),
        );
        conn.query_drop(format!(
            "UPDATE {t} t JOIN {s} s ON {matched} SET {set} WHERE {differs}"
        ))
        .await?;
        conn.affected_rows()
    };
    let cols = columns
        .iter()
        .map(|c| q(&c.name))
        .collect::<Vec<_>>()
        .join(", ");
    let s_cols = columns
        .iter()
        .map(|c| format!("s.{}", q(&c.name)))
        .collect::<Vec<_>>()
        .join(", ");
    conn.query_drop(format!(
        "INSERT INTO {t} ({cols}) SELECT {s_cols} FROM {s} s LEFT JOIN {t} t ON {matched}
         WHERE t.{k0} IS NULL"
    ))
    .await?;
    let inserted = conn.affected_rows();
    stats.inserted = inserted;
    stats.updated = updated;
    stats.unchanged = staged.saturating_sub(inserted + updated);
    stats.removed = removed;
    Ok(stats)
}

/// The stage's columns the records carried: all of them, but a column the
/// table fills in only when some staged row holds a value in it.
async fn carried(conn: &mut Conn, run: &Run, stage: &str, columns: &[SqlColumn]) -> R<Vec<String>> {
    let mut out = Vec::new();
    for c in columns {
        let held = !run.fills.fills_in(&c.name)
            || conn
                .query_first::<i64, _>(format!(
                    "SELECT EXISTS (SELECT 1 FROM {} WHERE {} IS NOT NULL)",
                    q(stage),
                    q(&c.name)
                ))
                .await?
                == Some(1);
        if held {
            out.push(c.name.clone());
        }
    }
    Ok(out)
}
