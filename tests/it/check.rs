//! `check` opens what a run would open: the source's first records, the
//! destination, an HTTP destination's API. One line per part; exit 2 when a
//! part fails (issue 16).

use crate::common::*;

/// A port nothing listens on: bound, then released.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

#[track_caller]
fn assert_fails(out: &Output, line_start: &str, parts: &[&str]) {
    out.code(2);
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with(line_start))
        .unwrap_or_else(|| panic!("no {line_start:?} line:\n{}", out.stdout));
    for part in parts {
        assert!(line.contains(part), "expected {part:?} in {line:?}");
    }
}

#[test]
fn check_fails_a_key_field_absent_from_the_csv_header() {
    with_backend("check_csv_key", BackendKind::Sqlite, |env| {
        env.write_csv("in.csv", "email,name\na@x.io,A\n");
        let p = env.pipeline("people", "in.csv", "key = [\"id\"]\n");
        let out = env.idemload(&["check", &p]);
        assert_fails(&out, "fail fields", &["key field \"id\"", "email, name"]);
    });
}

#[test]
fn check_fails_a_missing_sql_table() {
    with_backend("check_sql", BackendKind::Sqlite, |env| {
        rusqlite::Connection::open(env.path("src.db"))
            .and_then(|c| c.execute_batch("CREATE TABLE other (id INTEGER)"))
            .expect("source db");
        env.write(
            "p.toml",
            format!(
                "name = \"p\"\n[source]\ntype = \"sql\"\nurl = \"sqlite://src.db\"\ntable = \"missing_table\"\n[destination]\nurl = \"{}\"\ntable = \"p\"\n",
                env.url()
            ),
        );
        let out = env.idemload(&["check", "p.toml"]);
        assert_fails(&out, "fail source", &["missing_table"]);
    });
}

#[test]
fn check_fails_an_unreachable_http_source() {
    with_backend("check_http", BackendKind::Sqlite, |env| {
        env.write(
            "p.toml",
            format!(
                "name = \"p\"\n[source]\ntype = \"http\"\nurl = \"http://127.0.0.1:{}/v1/items\"\n[destination]\nurl = \"{}\"\ntable = \"p\"\n",
                closed_port(),
                env.url()
            ),
        );
        let out = env.idemload(&["check", "p.toml"]);
        assert_fails(&out, "fail source", &["127.0.0.1"]);
    });
}

#[test]
fn check_fails_an_http_destination_whose_api_is_down() {
    with_backend("check_api", BackendKind::Sqlite, |env| {
        env.write_jsonl(
            "in.jsonl",
            &[serde_json::json!({"id": 1, "email": "a@x.io"})],
        );
        env.write(
            "p.toml",
            format!(
                "name = \"p\"\n[source]\ntype = \"file\"\npath = \"in.jsonl\"\n[destination]\ntype = \"http\"\nbase_url = \"http://127.0.0.1:{}\"\nlookup = {{ path = \"/contacts?email={{email}}\", id = \"0.id\" }}\ncreate = {{ method = \"POST\", path = \"/contacts\" }}\nledger = \"sqlite://ledger.db\"\n",
                closed_port()
            ),
        );
        let out = env.idemload(&["check", "p.toml"]);
        assert_fails(&out, "fail destination", &["cannot connect"]);
        assert!(!out.stdout.contains("connected to ,"), "{}", out.stdout);
    });
}

#[test]
fn check_creates_no_sqlite_file() {
    with_backend("check_no_create", BackendKind::Sqlite, |env| {
        env.write("in.jsonl", "{\"id\": 1}\n");
        env.write(
            "p.toml",
            "name = \"p\"\n[source]\ntype = \"file\"\npath = \"in.jsonl\"\n[destination]\nurl = \"sqlite://out/new.db\"\ntable = \"p\"\n",
        );
        let out = env.idemload(&["check", "p.toml"]);
        out.code(0);
        assert!(out.stdout.contains("does not exist yet"), "{}", out.stdout);
        assert!(
            !env.path("out/new.db").exists(),
            "check created the database file"
        );
    });
}

/// A watch-only pipeline has a `[trigger]` and no `[destination]`: `check`
/// reads its source and says there is no destination, instead of failing
/// the file for a missing `url`.
#[test]
fn check_accepts_a_watch_only_pipeline() {
    with_backend("check_watch_only", BackendKind::Sqlite, |env| {
        env.write("in.jsonl", "{\"id\": 1}\n");
        env.write(
            "w.toml",
            "name = \"w\"\n[source]\ntype = \"file\"\npath = \"in.jsonl\"\n[trigger]\nstore = \"sqlite://seen.db\"\n",
        );
        let out = env.idemload(&["check", "w.toml"]);
        out.code(0);
        assert!(
            out.stdout
                .lines()
                .any(|l| l.starts_with("ok") && l.contains("none (a watch-only pipeline)")),
            "{}",
            out.stdout
        );
        // A run needs a destination all the same.
        let run = env.idemload(&["run", "w.toml"]);
        run.code(2);
        assert!(run.stderr.contains("missing key `url`"), "{}", run.stderr);
    });
}
