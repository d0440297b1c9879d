//! Nested shapes (spec: "Shapes, tolerances and monitors", issue 18): a
//! `{name}` segment in `records` carries the member name into each record,
//! and `[source] set` adds constant fields, for HTTP sources and SQL JSON
//! columns alike.

use serde_json::{json, Value};

use crate::common::{http_server, HttpResponse};

/// A usage API's answer: service lines as members, days in an array.
fn nested_usage() -> Value {
    json!({
        "SL-1": {"daily_usage": [
            {"usage_date": "2025-01-01", "consumed_gb": 10.5},
            {"usage_date": "2025-01-02", "consumed_gb": 11.0}
        ]},
        "SL-2": {"daily_usage": [
            {"usage_date": "2025-01-01", "consumed_gb": 20.25}
        ]},
        "SL-3": {"daily_usage": []}
    })
}

/// The checks every shape test makes: three rows, each with its service
/// line and the constant field.
fn assert_usage_rows(env: &crate::common::Env) {
    let count = |sql: &str| env.backend.scalar_i64(sql).unwrap_or(-1);
    assert_eq!(count("SELECT count(*) FROM daily_usage"), 3);
    assert_eq!(
        count("SELECT count(*) FROM daily_usage WHERE service_line_id = 'SL-1' AND source = 'api'"),
        2
    );
    assert_eq!(
        count("SELECT count(*) FROM daily_usage WHERE service_line_id = 'SL-2' AND source = 'api'"),
        1
    );
}

idemtest!(http_records_under_member_names_carry_the_name, |env| {
    let api = http_server(|_| HttpResponse::json(nested_usage()));
    env.write(
        "usage.toml",
        format!(
            r#"name = "usage"
[source]
type = "http"
url = "{}/v1/usage"
records = "{{service_line_id}}.daily_usage"
set = {{ source = "api" }}
[destination]
url = "{}"
table = "daily_usage"
[load]
key = ["service_line_id", "usage_date"]
"#,
            api.base,
            env.url()
        ),
    );
    let first = env.run("usage.toml", &[]).code(0).report();
    assert_eq!(first.inserted, 3);
    assert_usage_rows(env);
    let again = env.run("usage.toml", &[]).code(0).report();
    assert_eq!(again.unchanged, 3);
});

idemtest!(sql_json_column_records_carry_the_member_name, |env| {
    let src = env.path("raw.db");
    let conn = rusqlite::Connection::open(&src).unwrap();
    conn.execute_batch("CREATE TABLE raw (id INTEGER PRIMARY KEY, payload TEXT)")
        .unwrap();
    conn.execute(
        "INSERT INTO raw (payload) VALUES (?1)",
        [nested_usage().to_string()],
    )
    .unwrap();
    drop(conn);
    env.write(
        "usage.toml",
        format!(
            r#"name = "usage"
[source]
type = "sql"
url = "sqlite://{}"
table = "raw"
records = "payload.{{service_line_id}}.daily_usage"
set = {{ source = "api" }}
[destination]
url = "{}"
table = "daily_usage"
[load]
key = ["service_line_id", "usage_date"]
"#,
            src.display(),
            env.url()
        ),
    );
    let first = env.run("usage.toml", &[]).code(0).report();
    assert_eq!(first.inserted, 3);
    assert_usage_rows(env);
});

idemtest!(a_member_without_the_records_path_fails_naming_it, |env| {
    let api = http_server(|_| {
        HttpResponse::json(json!({"SL-1": {"daily_usage": []}, "SL-2": {"usage": []}}))
    });
    env.write(
        "usage.toml",
        format!(
            "name = \"usage\"\n[source]\ntype = \"http\"\nurl = \"{}/v1\"\nrecords = \"{{line}}.daily_usage\"\n[destination]\nurl = \"{}\"\ntable = \"usage\"\n[load]\nkey = [\"line\"]\n",
            api.base,
            env.url()
        ),
    );
    let out = env.run("usage.toml", &[]);
    out.code(1);
    assert!(
        out.stderr.contains("\"SL-2.daily_usage\""),
        "{}",
        out.stderr
    );
});
