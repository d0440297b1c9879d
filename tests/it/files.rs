//! File sources: JSON array files, stdin, globs in a stable order, and the
//! exit code of a configuration that names no file.

use std::io::Write;
use std::process::Stdio;

use serde_json::json;

use crate::common::{assert_rows, Output, Report};

idemtest!(json_array_files_load_like_jsonl, |env| {
    env.write(
        "a.json",
        "[\n  {\"id\": 1, \"name\": \"a\"},\n  {\"id\": 2, \"name\": \"b\"},\n  3\n]\n",
    );
    let out = env.load("t", &["a.json"], &[]);
    out.code(4);
    let r = out.report();
    assert_eq!((r.read, r.inserted, r.rejected), (3, 2, 1), "{}", r.raw);
    assert_rows(
        &env.rows("t"),
        &[json!({"id": 1, "name": "a"}), json!({"id": 2, "name": "b"})],
    );
    // Each element names the line it begins on.
    let rejects = env.backend.raw_rows("_idemload_rejects");
    assert_eq!(rejects[0]["source_ref"], "a.json:4", "{rejects:?}");
    assert!(
        rejects[0]["reason"]
            .as_str()
            .unwrap()
            .contains("expected a JSON object"),
        "{rejects:?}"
    );
});

idemtest!(stdin_is_read_with_a_dash, |env| {
    let url = env.url();
    let mut child = env
        .command(&["load", "-", "--into", &url, "--table", "t", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"id\": 1}\n{\"id\": 2}\n{\"id\": 1}\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let out = Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    };
    let r: Report = out.code(0).report();
    assert_eq!((r.read, r.inserted, r.duplicates), (3, 2, 1), "{}", r.raw);
});

idemtest!(
    a_glob_that_matches_nothing_is_a_configuration_error,
    |env| {
        let p = env.pipeline("t", "nothing/*.jsonl", "");
        let out = env.run(&p, &[]);
        out.code(2);
        assert!(out.stderr.contains("no file matches"), "{}", out.stderr);
        env.write_jsonl("a.jsonl", &[json!({"id": 1})]);
        let out = env.load("t", &["a.jsonl"], &["--mode", "upsert"]);
        out.code(2);
    }
);
