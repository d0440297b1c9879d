//! The set-based merge of a batch table into its target: one statement
//! that notes the run's keys, inserts new keys, updates only rows that
//! really differ (`IS DISTINCT FROM`) and are not older by cursor, deletes
//! on `delete_field`, and counts each outcome.

use super::books::RUN_KEYS;
use super::ddl::{PgColumn, PgSchema};
use crate::destination::compare::{Compare, Compared};
use crate::destination::inspect::Dialect;
use crate::destination::schema::{key_positions, ColumnType};
use crate::destination::sql::{column_list, quote};
use crate::error::Result;
use crate::mode::Mode;

/// The temporary table a batch is copied into.
pub(super) const BATCH: &str = "pg_temp._idemload_batch";
/// Its bookkeeping columns: the row deletes (`delete_field`); its key is
/// new to the run (when the run's key set is kept in memory).
pub(super) const DEL: &str = "_idemload_del";
pub(super) const FRESH: &str = "_idemload_fresh";

/// The SQL of one batch's merge into one table.
pub(super) struct Merge<'a> {
    table: String,
    schema: &'a PgSchema,
    mode: Mode,
    pub(super) keys: Vec<&'a PgColumn>,
    others: Vec<&'a PgColumn>,
    cursor: Option<&'a PgColumn>,
    compare: &'a Compare,
}

impl<'a> Merge<'a> {
    pub(super) fn new(
        table: &str,
        schema: &'a PgSchema,
        target: &'a crate::destination::Target,
        mode: Mode,
    ) -> Result<Merge<'a>> {
        let keys = key_positions(table, &schema.names(), &target.key_columns)?
            .into_iter()
            .map(|i| &schema.columns[i])
            .collect();
        let others = schema
            .columns
            .iter()
            .filter(|c| !target.key_columns.contains(&c.name))
            .collect();
        Ok(Merge {
            table: table.to_string(),
            schema,
            mode,
            cursor: target
                .cursor
                .as_deref()
                .and_then(|c| schema.position(c))
                .map(|i| &schema.columns[i]),
            keys,
            others,
            compare: &target.compare,
        })
    }

    /// The temporary table shaped like the COPY, emptied at each commit.
    pub(super) fn batch_table(&self) -> String {
        let defs: Vec<String> = self
            .schema
            .columns
            .iter()
            .map(|c| format!("{} {}", quote(&c.name), c.stage().sql()))
            .collect();
        format!(
            "CREATE TEMP TABLE _idemload_batch ({} boolean, {} boolean, {}) ON COMMIT DELETE ROWS",
            quote(DEL),
            quote(FRESH),
            defs.join(", ")
        )
    }

    /// The temporary table of the keys the run has written (typed like the
    /// batch's key columns, so a lookup is an index probe).
    pub(super) fn run_keys_table(&self) -> String {
        let defs: Vec<String> = self
            .keys
            .iter()
            .map(|c| format!("{} {}", quote(&c.name), c.stage().sql()))
            .collect();
        format!(
            "CREATE TEMP TABLE IF NOT EXISTS _idemload_run_keys ({}, PRIMARY KEY ({}))",
            defs.join(", "),
            self.key_columns()
        )
    }

    pub(super) fn key_columns(&self) -> String {
        column_list(
            &self
                .keys
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>(),
        )
    }

    pub(super) fn table_columns(&self) -> String {
        column_list(
            &self
                .schema
                .columns
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>(),
        )
    }

    pub(super) fn copy_columns(&self) -> String {
        let mut names = vec![DEL, FRESH];
        names.extend(self.schema.columns.iter().map(|c| c.name.as_str()));
        column_list(&names)
    }

    /// `(new < stored) IS TRUE`: the new version's cursor is older than the
    /// stored one (a null on either side never makes a row stale). Text
    /// cursors compare byte-wise, like the planner's.
    pub(super) fn stale(&self, new: &str, stored: &str) -> Option<String> {
        let c = self.cursor?;
        let collate = if c.ty == ColumnType::Text {
            " COLLATE \"C\""
        } else {
            ""
        };
        let q = quote(&c.name);
        Some(format!(
            "({new}{collate} < {stored}.{q}{collate}) IS TRUE",
            new = c.cast(&format!("{new}.{q}"))
        ))
    }

    /// `t.k = s.k AND …` with the batch side cast to the column's type.
    pub(super) fn key_match(&self, t: &str, s: &str) -> String {
        self.keys
            .iter()
            .map(|c| {
                let q = quote(&c.name);
                format!("{t}.{q} = {}", c.cast(&format!("{s}.{q}")))
            })
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// `a.k = b.k AND …` between two tables of batch-typed keys.
    pub(super) fn same_key(&self, a: &str, b: &str) -> String {
        self.keys
            .iter()
            .map(|c| format!("{a}.{q} = {b}.{q}", q = quote(&c.name)))
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// The merge and its counts: total, fresh (first time this run),
    /// inserted, updated, deleted, stale, of the fresh rows.
    ///
    /// New keys are inserted by a plain `INSERT` (the run lock keeps other
    /// runs of the pipeline out), rows whose columns differ by an `UPDATE`;
    /// an unchanged or stale row is never touched, not even locked, so an
    /// identical re-run writes nothing. Existence is probed per row through
    /// the primary key (`OFFSET 0` keeps the planner from scanning the
    /// whole table for a batch; the caller turns hash and merge joins off).
    pub(super) fn statement(&self, deletes: bool, in_memory: bool) -> String {
        let t = &self.table;
        let names: Vec<&str> = self
            .schema
            .columns
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        let cols = column_list(&names);
        let exprs = self
            .schema
            .columns
            .iter()
            .map(|c| c.cast(&format!("s.{}", quote(&c.name))))
            .collect::<Vec<_>>()
            .join(", ");
        let key_cols = self.key_columns();
        let s_keys = self
            .keys
            .iter()
            .map(|c| format!("s.{}", quote(&c.name)))
            .collect::<Vec<_>>()
            .join(", ");
        let del = quote(DEL);
        let stale = self
            .stale("s", "t")
            .filter(|_| self.mode != Mode::InsertNew);
        let fresh = if in_memory {
            format!("SELECT {s_keys} FROM {BATCH} s WHERE s.{}", quote(FRESH))
        } else {
            format!(
                "INSERT INTO {RUN_KEYS} ({key_cols}) SELECT {s_keys} FROM {BATCH} s
                WHERE NOT EXISTS (SELECT 1 FROM {RUN_KEYS} r WHERE {rk_match} OFFSET 0)
                RETURNING {key_cols}",
                rk_match = self.same_key("r", "s"),
            )
        };
        let mut sql = format!(
            "WITH fresh AS ({fresh}),
             ins AS (
                INSERT INTO {t} AS i ({cols}) SELECT {exprs} FROM {BATCH} s
                WHERE NOT s.{del} AND NOT EXISTS (SELECT 1 FROM {t} t WHERE {match} OFFSET 0)
                RETURNING {ins_keys}
             )",
            ins_keys = self
                .keys
                .iter()
                .map(|c| {
                    let q = quote(&c.name);
                    if c.stage().sql() == c.sql {
                        format!("i.{q}")
                    } else {
                        format!("i.{q}::{} AS {q}", c.stage().sql())
                    }
                })
                .collect::<Vec<_>>()
                .join(", "),
            match = self.key_match("t", "s"),
        );
        let mut outcomes = vec!["ins"];
        if self.mode != Mode::InsertNew && !self.others.is_empty() {
            let set = self
                .others
                .iter()
                .map(|c| {
                    format!(
                        "{} = {}",
                        quote(&c.name),
                        c.cast(&format!("s.{}", quote(&c.name)))
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            let differs = self.compare.differs(
                Dialect::Postgres,
                self.others.iter().map(|c| Compared {
                    name: &c.name,
                    ty: c.ty,
                    stored: c.comparable(&format!("t.{}", quote(&c.name))),
                    new: c.comparable(&c.cast(&format!("s.{}", quote(&c.name)))),
                }),
            );
            let not_stale = match &stale {
                Some(cond) => format!(" AND NOT {cond}"),
                None => String::new(),
            };
            // ROW() keeps a one-column list a row constructor.
            sql.push_str(&format!(
                ", upd AS (
                    UPDATE {t} t SET {set} FROM {BATCH} s
                    WHERE {match} AND NOT s.{del}
                      AND {differs}{not_stale}
                    RETURNING {returning}
                 )",
                match = self.key_match("t", "s"),
                returning = self.returning("t", "s"),
            ));
            outcomes.push("upd");
        }
        if deletes {
            let not_stale = match self.stale("s", "t") {
                Some(cond) => format!(" AND NOT {cond}"),
                None => String::new(),
            };
            sql.push_str(&format!(
                ", del AS (
                    DELETE FROM {t} t USING {BATCH} s
                    WHERE s.{del} AND {match}{not_stale}
                    RETURNING {returning}
                 )",
                match = self.key_match("t", "s"),
                returning = self.returning("t", "s"),
            ));
            outcomes.push("del");
        }
        if let Some(cond) = &stale {
            sql.push_str(&format!(
                ", stale AS (
                    SELECT {s_keys} FROM {BATCH} s JOIN {t} t ON {match} WHERE {cond}
                 )",
                match = self.key_match("t", "s"),
            ));
            outcomes.push("stale");
        }
        // Each outcome counted among the keys the run meets for the first
        // time: a set intersection, which needs no join.
        let count = |name: &str| {
            if outcomes.contains(&name) {
                format!(
                    "(SELECT count(*) FROM (SELECT {key_cols} FROM {name} \
                     INTERSECT ALL SELECT {key_cols} FROM fresh) x)"
                )
            } else {
                "0::bigint".to_string()
            }
        };
        sql.push_str(&format!(
            " SELECT (SELECT count(*) FROM {BATCH}), (SELECT count(*) FROM fresh), {}, {}, {}, {}",
            count("ins"),
            count("upd"),
            count("del"),
            count("stale"),
        ));
        sql
    }

    /// The key columns of a modified row, typed like the batch's.
    pub(super) fn returning(&self, t: &str, s: &str) -> String {
        self.keys
            .iter()
            .map(|c| {
                let q = quote(&c.name);
                if c.stage().sql() == c.sql {
                    format!("{t}.{q}")
                } else {
                    format!("{s}.{q}")
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}
