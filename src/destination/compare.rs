//! When a stored row counts as unchanged: every column the row carries
//! equal to the stored one, except the load-time column (`[load]
//! loaded_at`, written with each real change and never compared) and the
//! numeric columns given a `[load] tolerance`, equal when within that
//! absolute distance.
//!
//! Each backend compares in two places, in memory (rows it settles itself)
//! and in SQL (merge and stage statements); both take their rule per column
//! from [`Compare::rule`], and every SQL comparison is built by
//! [`Compare::differs`], so a tolerance means the same on every backend
//! and in every mode.

use super::inspect::Dialect;
use super::schema::ColumnType;

/// How rows compare for "unchanged", from `[load]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Compare {
    /// The load-time column: set with each insert and real update.
    pub loaded_at: Option<String>,
    /// Numeric columns and the absolute distance within which a new value
    /// counts as the stored one.
    pub tolerance: Vec<(String, f64)>,
}

/// How one column takes part in the comparison.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// Equal values only.
    Exact,
    /// Never compared (the load-time column).
    Skip,
    /// Numbers within this distance (the tolerance with its slack).
    Within(f64),
}

/// One column of an SQL comparison: its stored and its new expression.
pub struct Compared<'a> {
    pub name: &'a str,
    pub ty: ColumnType,
    pub stored: String,
    pub new: String,
}

impl<'a> Compared<'a> {
    /// Column `name` of the rows aliased `stored` and `new`, quoted for
    /// the dialect (`t."gb"` against `s."gb"`).
    pub fn between(
        dialect: Dialect,
        name: &'a str,
        ty: ColumnType,
        stored: &str,
        new: &str,
    ) -> Compared<'a> {
        let column = dialect.quote(name);
        Compared {
            name,
            ty,
            stored: format!("{stored}.{column}"),
            new: format!("{new}.{column}"),
        }
    }
}

impl Compare {
    /// The column's rule. A tolerance applies to numeric columns only
    /// (a column of text is compared exactly whatever its contents).
    pub fn rule(&self, column: &str, ty: ColumnType) -> Rule {
        if self.loaded_at.as_deref() == Some(column) {
            return Rule::Skip;
        }
        let numeric = matches!(
            ty,
            ColumnType::Integer | ColumnType::Float | ColumnType::Decimal
        );
        match self.tolerance.iter().find(|(c, _)| c == column) {
            Some(&(_, distance)) if numeric => Rule::Within(with_slack(distance)),
            _ => Rule::Exact,
        }
    }

    /// An SQL condition, true when the stored row differs from the new one
    /// in these columns (never NULL).
    pub fn differs<'a>(
        &self,
        dialect: Dialect,
        columns: impl IntoIterator<Item = Compared<'a>>,
    ) -> String {
        let mut exact: Vec<Compared<'a>> = Vec::new();
        let mut within: Vec<(Compared<'a>, f64)> = Vec::new();
        for c in columns {
            match self.rule(c.name, c.ty) {
                Rule::Skip => {}
                Rule::Exact => exact.push(c),
                Rule::Within(d) => within.push((c, d)),
            }
        }
        let within = within.into_iter().map(|(c, d)| {
            let (s, n) = (&c.stored, &c.new);
            match dialect {
                Dialect::Postgres => format!(
                    "NOT ({s} IS NOT DISTINCT FROM {n} \
                     OR COALESCE(abs(({s})::numeric - ({n})::numeric) <= {d}, false))"
                ),
                Dialect::Mysql => {
                    format!("NOT ({s} <=> {n} OR COALESCE(ABS({s} - {n}) <= {d}, FALSE))")
                }
                Dialect::Sqlite => {
                    format!("NOT ({s} IS {n} OR coalesce(abs({s} - {n}) <= {d}, 0))")
                }
            }
        });
        let mut parts: Vec<String> = Vec::new();
        if !exact.is_empty() {
            match dialect {
                // One row comparison, as the plans were before tolerances.
                Dialect::Postgres => {
                    let stored: Vec<&str> = exact.iter().map(|c| c.stored.as_str()).collect();
                    let new: Vec<&str> = exact.iter().map(|c| c.new.as_str()).collect();
                    parts.push(format!(
                        "ROW({}) IS DISTINCT FROM ROW({})",
                        stored.join(", "),
                        new.join(", ")
                    ));
                }
                Dialect::Mysql => parts.extend(
                    exact
                        .iter()
                        .map(|c| format!("NOT ({} <=> {})", c.stored, c.new)),
                ),
                Dialect::Sqlite => parts.extend(
                    exact
                        .iter()
                        .map(|c| format!("{} IS NOT {}", c.stored, c.new)),
                ),
            }
        }
        parts.extend(within);
        match parts.len() {
            0 => "FALSE".to_string(),
            1 => parts.remove(0),
            _ => format!("({})", parts.join(" OR ")),
        }
    }
}

/// Two numbers are the same within `distance` (a rule's, slack included).
pub fn within(a: f64, b: f64, distance: f64) -> bool {
    (a - b).abs() <= distance
}

/// A tolerance widened by a billionth of itself: `12.36` and `12.35` are
/// 0.01 apart, though as doubles they differ by 0.010000000000001563.
fn with_slack(distance: f64) -> f64 {
    distance * (1.0 + 1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compare() -> Compare {
        Compare {
            loaded_at: Some("_loaded_at".into()),
            tolerance: vec![("gb".into(), 0.01)],
        }
    }

    fn col(name: &str, ty: ColumnType) -> Compared<'_> {
        Compared {
            name,
            ty,
            stored: format!("t.{name}"),
            new: format!("s.{name}"),
        }
    }

    #[test]
    fn rules_follow_the_column_and_its_type() {
        let c = compare();
        assert_eq!(c.rule("_loaded_at", ColumnType::Timestamp), Rule::Skip);
        assert!(matches!(c.rule("gb", ColumnType::Float), Rule::Within(d) if d > 0.01));
        assert_eq!(c.rule("gb", ColumnType::Text), Rule::Exact);
        assert_eq!(c.rule("name", ColumnType::Float), Rule::Exact);
    }

    #[test]
    fn the_tolerance_holds_at_its_own_distance() {
        let Rule::Within(d) = compare().rule("gb", ColumnType::Float) else {
            panic!("no tolerance");
        };
        assert!(within(12.36, 12.35, d));
        assert!(within(12.34, 12.341, d));
        assert!(!within(12.34, 12.351, d));
        assert!(!within(12.34, f64::NAN, d));
    }

    #[test]
    fn sql_compares_exact_columns_together_and_tolerant_ones_apart() {
        let c = compare();
        let cols = || {
            vec![
                col("name", ColumnType::Text),
                col("gb", ColumnType::Float),
                col("_loaded_at", ColumnType::Timestamp),
            ]
        };
        let pg = c.differs(Dialect::Postgres, cols());
        assert!(pg.starts_with("(ROW(t.name) IS DISTINCT FROM ROW(s.name) OR NOT (t.gb"));
        assert!(!pg.contains("_loaded_at"));
        let my = c.differs(Dialect::Mysql, cols());
        assert!(my.contains("NOT (t.name <=> s.name)"));
        assert!(my.contains("ABS(t.gb - s.gb) <= 0.01"));
        let lite = c.differs(Dialect::Sqlite, cols());
        assert!(lite.contains("t.name IS NOT s.name"));
        assert_eq!(
            c.differs(Dialect::Sqlite, [col("_loaded_at", ColumnType::Timestamp)]),
            "FALSE"
        );
    }
}
