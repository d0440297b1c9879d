//! Read-only commands (`audit`, `check`, `history`, `state` without
//! `--set`, `rejects`, a `dedupe` dry run) never create a database file,
//! schema or table.

use serde_json::json;

use crate::common::{server_url, BackendKind, Env};

/// Nothing of idemload's in the destination: no file (SQLite), no table.
#[track_caller]
fn assert_untouched(env: &Env, after: &str) {
    if let Some(path) = env.backend.sqlite_path() {
        assert!(!path.exists(), "{after} created {}", path.display());
        return;
    }
    let tables = env.backend.tables();
    assert!(tables.is_empty(), "{after} created {tables:?}");
}

idemtest!(read_only_commands_create_nothing, |env| {
    env.write_jsonl("data.jsonl", &[json!({"id": 1})]);
    let p = env.pipeline("never_ran", "data.jsonl", "key = [\"id\"]\ncursor = \"id\"");

    let history = env.idemload(&["history", &p, "--json"]);
    history.code(0);
    assert_eq!(history.json()["runs"], json!([]));
    assert_untouched(env, "history");

    let state = env.idemload(&["state", &p, "--json"]);
    state.code(0);
    assert_eq!(state.json()["checkpoint"], json!(null));
    assert_untouched(env, "state");

    let rejects = env.idemload(&["rejects", &p, "--json"]);
    rejects.code(0);
    assert_eq!(rejects.json()["rejects"], json!([]));
    assert_untouched(env, "rejects");

    env.idemload(&["check", &p]).code(0);
    assert_untouched(env, "check");

    // The table is not there: audit says so and creates nothing.
    let url = env.url();
    let audit = env.idemload(&[
        "audit",
        "--url",
        &url,
        "--table",
        "never_ran",
        "--key",
        "id",
    ]);
    assert_ne!(audit.code, 0, "{}", audit.stdout);
    assert_untouched(env, "audit");
    let dry = env.idemload(&[
        "dedupe",
        "--url",
        &url,
        "--table",
        "never_ran",
        "--key",
        "id",
    ]);
    assert_ne!(dry.code, 0);
    assert_untouched(env, "a dedupe dry run");

    // After a run they read what it wrote.
    env.run(&p, &[]).code(0);
    let state = env.idemload(&["state", &p, "--json"]);
    assert_eq!(state.code(0).json()["checkpoint"], json!(1));
    assert_eq!(env.history(&p).len(), 1);
});

idemtest!(a_mistyped_destination_is_not_created_by_reading_it, |env| {
    let url = match env.backend.kind {
        BackendKind::Sqlite => format!("sqlite://{}", env.path("typo.db").display()),
        BackendKind::Postgres => {
            let base = server_url("IDEMLOAD_TEST_POSTGRES").expect("IDEMLOAD_TEST_POSTGRES");
            env.backend
                .execute("DROP SCHEMA IF EXISTS never_made_here CASCADE");
            let sep = if base.contains('?') { '&' } else { '?' };
            format!("{base}{sep}schema=never_made_here")
        }
        // A MySQL database is never created by idemload, only its tables.
        BackendKind::Mysql => return,
    };
    let audit = env.idemload(&["audit", "--url", &url, "--table", "t", "--key", "id"]);
    assert_ne!(audit.code, 0);
    for args in [
        vec!["history", "--url", &url, "--table", "t"],
        vec!["state", "--url", &url, "--table", "t"],
        vec!["rejects", "--url", &url, "--table", "t"],
    ] {
        env.idemload(&args).code(0);
    }
    match env.backend.kind {
        BackendKind::Sqlite => assert!(!env.path("typo.db").exists(), "typo.db was created"),
        _ => assert_eq!(
            env.backend
                .scalar_i64("SELECT count(*) FROM pg_namespace WHERE nspname = 'never_made_here'"),
            Some(0),
            "the schema was created"
        ),
    }
    assert!(
        audit.stderr.contains("typo.db")
            || audit.stderr.contains("never_made_here")
            || audit.stderr.contains("\"t\""),
        "audit names what is missing:\n{}",
        audit.stderr
    );
});
