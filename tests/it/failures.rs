//! Failures that stop a run before any batch: the error says what failed
//! and the hint says what to check, by the kind of failure (a closed port,
//! an unknown database), not a generic "committed batches stay".

use crate::common::{idemload_in, server_url};

fn load_into(url: &str) -> (i32, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("c.jsonl"), "{\"id\":1}\n").unwrap();
    let out = idemload_in(
        dir.path(),
        &["load", "c.jsonl", "--into", url, "--table", "c"],
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[track_caller]
fn assert_hint(url: &str, hint: &str) {
    let (code, stderr) = load_into(url);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(hint),
        "expected a hint with {hint:?}, got:\n{stderr}"
    );
    assert!(
        !stderr.contains("committed batches are correct"),
        "a failure before any batch must not talk of committed batches:\n{stderr}"
    );
}

#[test]
fn closed_port_hints_at_the_server_and_its_address() {
    assert_hint("postgres://root@127.0.0.1:1/test", "is the server running");
    assert_hint("mysql://root@127.0.0.1:1/test", "is the server running");
}

#[test]
fn unknown_postgres_database_hints_to_create_it() {
    let Some(base) = server_url("IDEMLOAD_TEST_POSTGRES") else {
        return;
    };
    let url = replace_database(&base, "idemload_no_such_database");
    assert_hint(&url, "create the database first");
}

#[test]
fn unknown_mysql_database_hints_to_create_it() {
    let Some(base) = server_url("IDEMLOAD_TEST_MYSQL") else {
        return;
    };
    let url = replace_database(&base, "idemload_no_such_database");
    assert_hint(&url, "create the database first");
}

/// `scheme://auth@host:port/db?q` with another database name.
fn replace_database(url: &str, db: &str) -> String {
    let (without_query, query) = match url.find('?') {
        Some(i) => (&url[..i], &url[i..]),
        None => (url, ""),
    };
    let authority = without_query.find("://").map_or(0, |i| i + 3);
    let server = match without_query[authority..].find('/') {
        Some(i) => &without_query[..authority + i],
        None => without_query,
    };
    format!("{server}/{db}{query}")
}
