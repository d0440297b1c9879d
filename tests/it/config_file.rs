//! Pipeline files: a mistake names its file, line, column and key path, and
//! an unknown key the closest known one (issue 16).

use crate::common::{with_backend, BackendKind, Env};

const HEAD: &str = "name = \"contacts\"\n\n[source]\ntype = \"file\"\npath = \"in.jsonl\"\n\n[destination]\nurl = \"sqlite://w.db\"\ntable = \"contacts\"\n\n[load]\n";

/// Writes `p.toml` (HEAD then `load`) and runs `check` on it.
fn check_with(env: &Env, load: &str) -> crate::common::Output {
    env.write("in.jsonl", "{\"id\": 1}\n");
    env.write("p.toml", format!("{HEAD}{load}"));
    env.idemload(&["run", "p.toml"])
}

#[track_caller]
fn assert_mentions(out: &crate::common::Output, parts: &[&str]) {
    out.code(2);
    for part in parts {
        assert!(
            out.stderr.contains(part),
            "expected {part:?} in stderr\n--- stderr ---\n{}",
            out.stderr
        );
    }
}

#[test]
fn a_wrong_type_names_file_line_column_and_key() {
    with_backend("cfg_type", BackendKind::Sqlite, |env| {
        let out = check_with(env, "key = [\"id\"]\nbatch_size = \"10000\"\n");
        assert_mentions(
            &out,
            &["p.toml:13:14: [load].batch_size: invalid type: string \"10000\""],
        );
    });
}

#[test]
fn an_unknown_key_suggests_the_closest_known_one() {
    with_backend("cfg_typo", BackendKind::Sqlite, |env| {
        let out = check_with(env, "key = [\"id\"]\ncurser = \"updated_at\"\n");
        assert_mentions(
            &out,
            &["p.toml:13:1: [load]: unknown key `curser`; did you mean `cursor`?"],
        );
    });
}

#[test]
fn an_unknown_key_inside_source_is_located() {
    with_backend("cfg_source", BackendKind::Sqlite, |env| {
        env.write(
            "p.toml",
            "name = \"x\"\n[source]\ntype = \"file\"\npaht = \"in.jsonl\"\n[destination]\nurl = \"sqlite://w.db\"\ntable = \"x\"\n",
        );
        let out = env.idemload(&["run", "p.toml"]);
        assert_mentions(
            &out,
            &["p.toml:4:1: [source]: unknown key `paht`; did you mean `path`?"],
        );
        env.write(
            "q.toml",
            "name = \"x\"\n[source]\ntype = \"flie\"\npath = \"in.jsonl\"\n[destination]\nurl = \"sqlite://w.db\"\ntable = \"x\"\n",
        );
        let out = env.idemload(&["run", "q.toml"]);
        assert_mentions(
            &out,
            &["q.toml:3:8: [source].type: unknown value \"flie\"; did you mean `file`?"],
        );
    });
}

#[test]
fn a_toml_syntax_error_names_its_line() {
    with_backend("cfg_syntax", BackendKind::Sqlite, |env| {
        env.write("p.toml", "name = \"x\"\n[source\ntype = \"file\"\n");
        let out = env.idemload(&["check", "p.toml"]);
        assert!(
            out.code == 2,
            "exit code {}\n{}{}",
            out.code,
            out.stdout,
            out.stderr
        );
        assert!(out.stdout.contains("p.toml:2:"), "{}", out.stdout);
        assert!(out.stdout.contains("invalid TOML"), "{}", out.stdout);
    });
}

#[test]
fn an_unset_variable_names_itself_and_the_key_using_it() {
    with_backend("cfg_env", BackendKind::Sqlite, |env| {
        env.write("in.jsonl", "{\"id\": 1}\n");
        env.write(
            "p.toml",
            "name = \"x\"\n[source]\ntype = \"file\"\npath = \"in.jsonl\"\n[destination]\nurl = \"sqlite://${IDEMLOAD_TEST_SURELY_UNSET_DB}\"\ntable = \"x\"\n",
        );
        let out = env.idemload(&["run", "p.toml"]);
        assert_mentions(
            &out,
            &["p.toml:6:7: [destination].url: environment variable IDEMLOAD_TEST_SURELY_UNSET_DB is not set"],
        );
    });
}

#[test]
fn a_variable_default_applies_when_unset() {
    with_backend("cfg_default", BackendKind::Sqlite, |env| {
        env.write("in.jsonl", "{\"id\": 1}\n");
        env.write(
            "p.toml",
            format!("name = \"x\"\n[source]\ntype = \"file\"\npath = \"in.jsonl\"\n[destination]\nurl = \"{}\"\ntable = \"${{IDEMLOAD_TEST_SURELY_UNSET_T:-from_default}}\"\n", env.url()),
        );
        let out = env.run("p.toml", &[]);
        out.code(0);
        assert_eq!(env.rows("from_default").len(), 1);
    });
}

#[test]
fn a_setting_that_contradicts_another_names_its_key() {
    with_backend("cfg_settings", BackendKind::Sqlite, |env| {
        let out = check_with(env, "key = [\"id\"]\nbatch_size = 0\n");
        assert_mentions(
            &out,
            &["p.toml:13:14: [load].batch_size: must be at least 1"],
        );
    });
}

#[test]
fn a_single_key_field_may_be_written_alone() {
    with_backend("cfg_one_key", BackendKind::Sqlite, |env| {
        let out = check_with(env, "key = \"id\"\n");
        out.code(0);
        let out = check_with(env, "key = 7\n");
        assert_mentions(
            &out,
            &[
                "p.toml:12:7: [load].key",
                "a field name or a list of field names",
            ],
        );
    });
}

#[test]
fn a_mistake_inside_an_http_destination_is_located() {
    with_backend("cfg_http_dest", BackendKind::Sqlite, |env| {
        env.write("in.jsonl", "{\"email\": \"a@x.io\"}\n");
        let head = "name = \"crm\"\n[source]\ntype = \"file\"\npath = \"in.jsonl\"\n[load]\nkey = [\"email\"]\n[destination]\ntype = \"http\"\nbase_url = \"http://127.0.0.1:1\"\nlookup = { path = \"/s?e={email}\", id = \"results.0.id\" }\ncreate = { method = \"POST\", path = \"/c\" }\n";
        for (line, expected) in [
            (
                "concurency = 4",
                "p.toml:12:1: [destination]: unknown key `concurency`; did you mean `concurrency`?",
            ),
            (
                "concurrency = \"4\"",
                "p.toml:12:15: [destination].concurrency: invalid type: string \"4\"",
            ),
            (
                "rate_limit = { requests_per_dya = 5 }",
                "p.toml:12:16: [destination.rate_limit]: unknown key `requests_per_dya`; did you mean `requests_per_day`?",
            ),
        ] {
            env.write("p.toml", format!("{head}{line}\n"));
            assert_mentions(&env.idemload(&["run", "p.toml"]), &[expected]);
        }
    });
}

#[test]
fn a_mistake_inside_a_database_destination_is_located() {
    with_backend("cfg_db_dest", BackendKind::Sqlite, |env| {
        env.write("in.jsonl", "{\"id\": 1}\n");
        let head = "name = \"x\"\n[source]\ntype = \"file\"\npath = \"in.jsonl\"\n[destination]\n";
        for (lines, expected) in [
            (
                "url = \"sqlite://w.db\"\ntabel = \"x\"",
                "p.toml:7:1: [destination]: unknown key `tabel`; did you mean `table`?",
            ),
            (
                "url = \"sqlite://w.db\"\ntable = 5",
                "p.toml:7:9: [destination].table: invalid type: integer `5`, expected a string",
            ),
            (
                "type = \"sqlite\"\nurl = \"sqlite://w.db\"\ntable = \"x\"",
                "p.toml:6:8: [destination].type: \"sqlite\": use \"http\" for an API, or leave type out and give a database url",
            ),
            (
                "",
                "p.toml:5:1: [destination]: missing key `url`",
            ),
            // An API destination has no table: a database key there is a
            // mistake, not a setting silently ignored.
            (
                "type = \"http\"\nbase_url = \"http://127.0.0.1:1\"\nupsert = { method = \"PUT\", path = \"/c/{id}\" }\ntable = \"x\"",
                "p.toml:9:1: [destination]: unknown key `table`; known keys: `base_url`",
            ),
        ] {
            env.write("p.toml", format!("{head}{lines}\n"));
            let out = env.idemload(&["run", "p.toml"]);
            assert_mentions(&out, &[expected]);
            assert!(!env.path("w.db").exists(), "nothing is created");
        }
    });
}
