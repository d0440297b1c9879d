//! Columns a table fills in itself, and columns it demands: how a batch is
//! written into a table idemload did not create.
//!
//! A column with a DEFAULT, an identity, `serial` or `AUTO_INCREMENT` that no
//! record of a batch carries is left out of its INSERT and UPDATE, so the
//! table's own value applies and an update never overwrites it. A generated
//! column is never written. A NOT NULL column without a default must be
//! carried: when no record of a batch carries it the run stops (a
//! configuration error naming the column); a record that lacks it alone is
//! rejected with a reason. Tables idemload creates have none of these, so
//! their batches are written whole.

use crate::batch::Row;
use crate::error::{Error, Result};
use crate::record::Reject;
use crate::stats::RunStats;

/// What a table does with a column a record leaves out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// A DEFAULT, identity, serial or auto-increment value.
    Default,
    /// Computed by the database; never written.
    Generated,
    /// NOT NULL without a default: every record must carry it.
    Required,
}

/// The columns of a table that are not plain nullable columns, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fills(pub Vec<(String, Fill)>);

impl Fills {
    fn of(&self, column: &str) -> Option<Fill> {
        self.0.iter().find(|(c, _)| c == column).map(|&(_, f)| f)
    }

    /// Which of `columns` (the table's, in order) the batch writes, with the
    /// rows that lack a required column moved to `rejects`. Key columns are
    /// always written (a record without its key never gets here).
    pub fn plan(
        &self,
        table: &str,
        columns: &[&str],
        keys: &[String],
        rows: Vec<Row>,
        stats: &mut RunStats,
        rejects: &mut Vec<Reject>,
    ) -> Result<(Vec<bool>, Vec<Row>)> {
        if self.0.is_empty() {
            return Ok((vec![true; columns.len()], rows));
        }
        let carried = |name: &str, non_null: bool| {
            rows.iter().any(|r| match r.fields.get(name) {
                Some(v) => !non_null || !v.is_null(),
                None => false,
            })
        };
        let mut written = Vec::with_capacity(columns.len());
        let mut required = Vec::new();
        let mut generated = Vec::new();
        for &name in columns {
            let keep = match self.of(name) {
                _ if keys.iter().any(|k| k == name) => true,
                None => true,
                Some(Fill::Default) => carried(name, false),
                Some(Fill::Generated) => {
                    if carried(name, false) {
                        generated.push(name);
                    }
                    false
                }
                Some(Fill::Required) => {
                    if !carried(name, true) {
                        return Err(unfilled(table, name));
                    }
                    required.push(name);
                    true
                }
            };
            written.push(keep);
        }
        if required.is_empty() && generated.is_empty() {
            return Ok((written, rows));
        }
        let mut kept = Vec::with_capacity(rows.len());
        for row in rows {
            let reason = if let Some(c) = generated.iter().find(|c| row.fields.contains_key(c)) {
                Some(format!(
                    "field {c:?} is a generated column of table {table:?}: the database computes it, so the record's value cannot be stored"
                ))
            } else {
                required
                    .iter()
                    .find(|c| row.fields.get(c).is_none_or(|v| v.is_null()))
                    .map(|c| {
                        format!(
                            "column {c:?} of table {table:?} is NOT NULL and has no default, and the record has no value for it"
                        )
                    })
            };
            match reason {
                Some(reason) => {
                    stats.rejected += 1;
                    rejects.push(row.reject(reason));
                }
                None => kept.push(row),
            }
        }
        Ok((written, kept))
    }

    /// Whether the table fills `column` in itself (a default, identity,
    /// serial or generated value). A stage holds such a column like any
    /// other, so whether the records carried it is whether a staged row
    /// holds a value in it.
    pub fn fills_in(&self, column: &str) -> bool {
        matches!(self.of(column), Some(Fill::Default | Fill::Generated))
    }

    /// The columns a `replace`/`window` swap writes from its stage: of the
    /// table's columns and the stage's new ones, in that order. `carried`
    /// says whether the records carried a column. A column they lack is set
    /// to NULL (a snapshot without a field) unless the table fills it in: a
    /// DEFAULT, identity, serial or auto-increment column is then left to
    /// the table (inserted rows get its value, updated rows keep theirs); a
    /// generated column is never written (records carrying one stop the
    /// run); a NOT NULL column without a default stops the run.
    pub fn swapped(
        &self,
        table: &str,
        target: &[&str],
        stage: &[&str],
        keys: &[String],
        carried: impl Fn(&str) -> bool,
    ) -> Result<Vec<String>> {
        let mut written = Vec::new();
        let new = stage.iter().filter(|c| !target.contains(c));
        for &name in target.iter().chain(new) {
            let write = match self.of(name) {
                _ if keys.iter().any(|k| k == name) => true,
                None => true,
                Some(Fill::Generated) if carried(name) => {
                    return Err(Error::config(format!(
                        "field {name:?} is a generated column of table {table:?}: the database \
                         computes it, so the records' values cannot be stored; leave the field out"
                    )))
                }
                Some(Fill::Generated) => false,
                Some(Fill::Default) => carried(name),
                Some(Fill::Required) if carried(name) => true,
                Some(Fill::Required) => return Err(unfilled(table, name)),
            };
            if write {
                written.push(name.to_string());
            }
        }
        Ok(written)
    }

    /// [`Fills::plan`] for a backend's own columns: leaves in `columns`
    /// those the batch writes and returns the rows to write.
    #[allow(clippy::too_many_arguments)]
    pub fn apply<C>(
        &self,
        table: &str,
        columns: &mut Vec<C>,
        name: impl Fn(&C) -> &str,
        keys: &[String],
        rows: Vec<Row>,
        stats: &mut RunStats,
        rejects: &mut Vec<Reject>,
    ) -> Result<Vec<Row>> {
        if self.0.is_empty() {
            return Ok(rows);
        }
        let names: Vec<&str> = columns.iter().map(&name).collect();
        let (written, rows) = self.plan(table, &names, keys, rows, stats, rejects)?;
        let mut at = 0;
        columns.retain(|_| {
            let keep = written[at];
            at += 1;
            keep
        });
        Ok(rows)
    }
}

/// The error for a NOT NULL column without a default that no record of a
/// batch carries.
fn unfilled(table: &str, column: &str) -> Error {
    Error::config(format!(
        "column {column:?} of table {table:?} is NOT NULL and has no default, \
         and no record carries a value for it: add the field to the records, \
         give the column a DEFAULT, or load into another table"
    ))
}

/// The error for an existing table no primary key or unique index covers
/// the key of (`columns` are the table's): a merge into it could not keep a
/// key to one row.
pub fn uncovered_key(table: &str, keys: &[String], columns: &[&str]) -> Error {
    let absent: Vec<&str> = keys
        .iter()
        .map(String::as_str)
        .filter(|k| !columns.contains(k))
        .collect();
    if !absent.is_empty() {
        return Error::config(format!(
            "table {table:?} has no column {} of the key ({}); its columns are {}: check the key, or load into a new table",
            absent.iter().map(|k| format!("{k:?}")).collect::<Vec<_>>().join(", "),
            keys.join(", "),
            columns.join(", ")
        ));
    }
    Error::config(format!(
        "table {table:?} has no primary key or unique index on ({}), so loads into it cannot be kept free of duplicates; \
         `idemload audit` shows what is there and `idemload dedupe --apply` repairs it and adds one",
        keys.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_swap_leaves_to_the_table_what_the_records_lack() {
        let fills = Fills(vec![
            ("n".into(), Fill::Default),
            ("twice".into(), Fill::Generated),
            ("owner".into(), Fill::Required),
            ("note".into(), Fill::Default),
        ]);
        let target = ["n", "id", "v", "twice", "owner"];
        let stage = ["id", "v", "owner", "note"];
        let keys = ["id".to_string()];
        let swap = |carried: fn(&str) -> bool| fills.swapped("t", &target, &stage, &keys, carried);
        // The records carried id, v, owner and the new note; not n.
        let carried = |c: &str| matches!(c, "id" | "v" | "owner" | "note");
        assert_eq!(swap(carried).unwrap(), ["id", "v", "owner", "note"]);
        // A plain column the snapshot lacks is written (as NULL).
        let no_v = |c: &str| matches!(c, "id" | "owner");
        assert_eq!(swap(no_v).unwrap(), ["id", "v", "owner"]);
        let e = swap(|c| matches!(c, "id" | "v")).unwrap_err();
        assert!(e.to_string().contains("\"owner\""), "{e}");
        let e = swap(|c| matches!(c, "id" | "owner" | "twice")).unwrap_err();
        assert!(e.to_string().contains("generated"), "{e}");
    }
}
