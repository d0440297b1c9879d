//! SQL text shared by the SQL destinations: quoting and column lists.
//!
//! Every identifier that reaches SQL goes through [`quote`] (or
//! [`quote_mysql`] for MySQL): names come from data and are never trusted.

/// Quotes an identifier for SQLite and PostgreSQL: `"a""b"`.
pub fn quote(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for c in name.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Quotes an identifier for MySQL and MariaDB: `` `a``b` ``.
pub fn quote_mysql(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('`');
    for c in name.chars() {
        if c == '`' {
            out.push('`');
        }
        out.push(c);
    }
    out.push('`');
    out
}

/// `"a", "b", "c"`.
pub fn column_list<S: AsRef<str>>(names: &[S]) -> String {
    names
        .iter()
        .map(|n| quote(n.as_ref()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The column definitions of a `CREATE TABLE`: `"a" TEXT NOT NULL, "b"
/// BIGINT`, each `(name, declared type)` quoted by `quote`, the key
/// columns NOT NULL.
pub(crate) fn column_definitions<'a>(
    columns: impl Iterator<Item = (&'a str, &'a str)>,
    keys: &[String],
    quote: fn(&str) -> String,
) -> String {
    columns
        .map(|(name, ty)| {
            let not_null = if keys.iter().any(|k| k == name) {
                " NOT NULL"
            } else {
                ""
            };
            format!("{} {ty}{not_null}", quote(name))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `"a" IS NOT NULL AND "b" IS NOT NULL`, each name quoted by `quote`.
pub(crate) fn all_not_null<S: AsRef<str>>(keys: &[S], quote: fn(&str) -> String) -> String {
    keys.iter()
        .map(|k| format!("{} IS NOT NULL", quote(k.as_ref())))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// `"a" = ? AND "b" = ?` with `alias.` prefixes when given.
pub fn key_match<S: AsRef<str>>(keys: &[S], left: &str, right: &str) -> String {
    keys.iter()
        .map(|k| {
            let q = quote(k.as_ref());
            format!("{left}.{q} = {right}.{q}")
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// Which stored rows a `window` load replaces: `column >= start AND column
/// < end` with a backfill window's bounds as literals (integers bare, the
/// rest quoted text, which each database compares with the column's own
/// type); without a window, the range the staged rows span.
pub(crate) fn window_scope(
    table: &str,
    field: &str,
    window: Option<&crate::windows::Window>,
    stage: &str,
    mysql: bool,
) -> String {
    let column = if table.is_empty() {
        field.to_string()
    } else {
        format!("{table}.{field}")
    };
    match window {
        Some(w) => format!(
            "{column} >= {} AND {column} < {}",
            bound_literal(&w.start, mysql),
            bound_literal(&w.end, mysql)
        ),
        None => format!(
            "{column} BETWEEN (SELECT min({field}) FROM {stage}) AND (SELECT max({field}) FROM {stage})"
        ),
    }
}

/// A window bound as an SQL literal; MySQL gets instants in its DATETIME
/// form (UTC), which also sorts right against RFC 3339 text.
fn bound_literal(bound: &crate::key::Cursor, mysql: bool) -> String {
    use crate::key::Cursor;
    let text = match bound {
        Cursor::Int(i) => return i.to_string(),
        Cursor::Instant(nanos, _) if mysql => {
            let secs = nanos.div_euclid(1_000_000_000) as i64;
            let sub = nanos.rem_euclid(1_000_000_000) as u32;
            chrono::DateTime::<chrono::Utc>::from_timestamp(secs, sub)
                .map(|t| t.format("%Y-%m-%d %H:%M:%S%.6f").to_string())
                .unwrap_or_else(|| bound.to_string())
        }
        other => other.to_string(),
    };
    format!("'{}'", text.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_are_doubled() {
        assert_eq!(
            quote("x\"; DROP TABLE t; --"),
            "\"x\"\"; DROP TABLE t; --\""
        );
        assert_eq!(column_list(&["a", "b c"]), "\"a\", \"b c\"");
        assert_eq!(key_match(&["id"], "t", "s"), "t.\"id\" = s.\"id\"");
        assert_eq!(
            quote_mysql("x`; DROP TABLE t; --"),
            "`x``; DROP TABLE t; --`"
        );
    }
}
