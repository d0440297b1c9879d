//! `verify` on every backend (issue 14): it proves idempotence on a scratch
//! destination of the pipeline's own backend, removes it afterwards, names
//! only the columns that really differ, and refuses an HTTP destination.

use serde_json::{json, Value};

use crate::common::{http_server, jsonl, BackendKind, HttpResponse};

fn records(n: u64) -> Vec<Value> {
    (1..=n)
        .map(|i| json!({"id": i, "name": format!("n{i}"), "score": i as f64 + 0.5}))
        .collect()
}

/// Scratch schemas (PostgreSQL) or databases (MySQL) verify left behind.
fn leftovers(env: &crate::common::Env) -> Vec<Option<String>> {
    match env.backend.kind {
        BackendKind::Sqlite => Vec::new(),
        BackendKind::Postgres => env.backend.texts(
            "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE '\\_idemload\\_verify\\_%'",
        ),
        BackendKind::Mysql => env.backend.texts(
            "SELECT CAST(schema_name AS CHAR) FROM information_schema.schemata WHERE schema_name LIKE '\\_idemload\\_verify\\_%'",
        ),
    }
}

idemtest!(
    verify_runs_on_a_scratch_copy_of_the_backend_and_leaves_nothing,
    |env| {
        env.write("in.jsonl", jsonl(&records(5)));
        let p = env.pipeline("scores", "in.jsonl", "key = [\"id\"]");
        let before = leftovers(env);
        let out = env.idemload(&["verify", &p]);
        out.code(0);
        assert!(out.stdout.starts_with("PASS"), "{}", out.stdout);
        assert!(out.stdout.contains(" 5 rows"), "{}", out.stdout);
        assert!(
            env.backend.tables().is_empty(),
            "verify writes nothing into the destination: {:?}",
            env.backend.tables()
        );
        // Other tests' verify runs may hold a scratch of their own for a moment.
        let gone = crate::common::wait_until(std::time::Duration::from_secs(20), || {
            leftovers(env).iter().all(|l| before.contains(l))
        });
        assert!(
            gone,
            "the scratch schema/database is dropped: {:?}",
            leftovers(env)
        );

        if env.backend.kind == BackendKind::Sqlite {
            return;
        }
        // The scratch lives on the pipeline's own server: an unreachable one
        // fails verify instead of passing on a local SQLite file.
        let url = env.url();
        let (scheme, rest) = url.split_once("://").unwrap();
        let path = rest.split_once('/').map_or("", |(_, p)| p);
        let dead = format!("{scheme}://root@127.0.0.1:1/{path}");
        env.write(
        "dead.toml",
        format!(
            "name = \"dead\"\n[source]\ntype = \"file\"\npath = \"in.jsonl\"\n[destination]\nurl = \"{dead}\"\ntable = \"scores\"\n[load]\nkey = [\"id\"]\n"
        ),
    );
        let out = env.idemload(&["verify", "dead.toml"]);
        assert_ne!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
        assert!(!out.stdout.contains("PASS"), "{}", out.stdout);
    }
);

idemtest!(
    verify_hints_name_no_column_when_the_second_read_only_adds_rows,
    |env| {
        let reads = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = reads.clone();
        let server = http_server(move |_| {
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            HttpResponse::json(Value::Array(records(2 + n.min(1))))
        });
        env.write(
        "grow.toml",
        format!(
            "name = \"grow\"\n[source]\ntype = \"http\"\nurl = \"{}/items\"\n[destination]\nurl = \"{}\"\ntable = \"grow\"\n[load]\nkey = [\"id\"]\n",
            server.base,
            env.url()
        ),
    );
        let out = env.idemload(&["verify", "grow.toml", "--json"]);
        out.code(1);
        let report = out.json();
        assert_eq!(report["rows_first"], 2);
        assert_eq!(report["rows_second"], 3);
        assert_eq!(report["differing_keys"], json!([[3]]), "{report}");
        let hints = report["hints"].as_array().unwrap();
        assert!(
            hints
                .iter()
                .all(|h| !h.as_str().unwrap().contains("changes on every read")),
            "no column changed, yet a hint blames one: {hints:?}"
        );
        assert!(
            hints
                .iter()
                .any(|h| h.as_str().unwrap().contains("different records")),
            "{hints:?}"
        );
    }
);

#[test]
fn verify_refuses_an_http_destination_and_sends_nothing() {
    let server = http_server(|_| HttpResponse::json(json!({"id": 1, "results": []})));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("contacts.jsonl"), jsonl(&records(3))).unwrap();
    std::fs::write(
        dir.path().join("crm.toml"),
        format!(
            r#"name = "crm"
[source]
type = "file"
path = "contacts.jsonl"
[load]
key = ["id"]
[destination]
type = "http"
base_url = "{}"
lookup = {{ method = "GET", path = "/contacts/search?id={{id}}", id = "results.0.id" }}
create = {{ method = "POST", path = "/contacts", body = {{ name = "{{name}}" }} }}
update = {{ method = "PATCH", path = "/contacts/{{remote_id}}", body = {{ name = "{{name}}" }} }}
ledger = "sqlite://ledger.db"
"#,
            server.base
        ),
    )
    .unwrap();
    let out = crate::common::idemload_in(dir.path(), &["verify", "crm.toml"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("HTTP destination"), "{stderr}");
    assert!(
        server.requests().is_empty(),
        "verify sent requests to the API: {:?}",
        server.requests()
    );
}

// `audit` reconciles each run's inserts with the table's growth on every
// backend: a row written behind the pipeline's back is a mismatch.
idemtest!(audit_reconciles_runs_on_every_backend, |env| {
    env.write("in.jsonl", jsonl(&records(3)));
    let p = env.pipeline("recon", "in.jsonl", "key = [\"id\"]");
    env.run(&p, &[]).code(0);
    env.write("in.jsonl", jsonl(&records(4)));
    env.run(&p, &[]).code(0);
    let audit = env.idemload(&["audit", &p, "--json"]);
    let report = audit.json();
    assert_eq!(report["runs_checked"], 2, "{report}");
    assert_eq!(report["run_mismatches"], json!([]), "{report}");

    let q = |n: &str| match env.backend.kind {
        BackendKind::Mysql => format!("`{n}`"),
        _ => format!("\"{n}\""),
    };
    env.backend.execute(&format!(
        "INSERT INTO {} ({}, {}, {}) VALUES (100, 'x', 1.5)",
        q("recon"),
        q("id"),
        q("name"),
        q("score")
    ));
    env.write("in.jsonl", jsonl(&records(5)));
    env.run(&p, &[]).code(0);
    let report = env.idemload(&["audit", &p, "--json"]).json();
    assert_eq!(report["runs_checked"], 3, "{report}");
    let mismatches = report["run_mismatches"].as_array().unwrap();
    assert_eq!(mismatches.len(), 1, "{report}");
    assert_eq!(mismatches[0]["inserted"], 1);
    assert_eq!(mismatches[0]["grew_by"], 2);
});
