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
