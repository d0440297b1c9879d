//! What the binary prints around a run: one `--json` shape, logs that fit
//! pipes and log collectors, completions, a man page, help that points to
//! docs/reference.md (issue 16).

use serde_json::Value;

use crate::common::*;

const REFERENCE: &str = include_str!("../../docs/reference.md");

/// The `--json` fields docs/reference.md lists for `load` and `run`.
fn documented_run_fields() -> Vec<String> {
    let start = REFERENCE
        .find("## `--json` output")
        .expect("a --json section");
    REFERENCE[start..]
        .lines()
        .take_while(|l| !l.starts_with("`read ="))
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_string)
        .collect()
}

#[test]
fn the_json_report_has_every_documented_field_even_when_zero_or_failed() {
    with_backend("cli_json", BackendKind::Sqlite, |env| {
        let fields = documented_run_fields();
        assert!(fields.len() >= 16, "{fields:?}");
        env.write("in.jsonl", "{\"id\": 1}\n");
        let ok = env.load("t", &["in.jsonl"], &[]).code(0).json();
        let failed = env.load("t", &["missing.jsonl"], &[]);
        assert_ne!(failed.code, 0);
        let failed = failed.json();
        for field in &fields {
            assert!(ok.get(field).is_some(), "success lacks {field:?}: {ok}");
            assert!(
                failed.get(field).is_some(),
                "failure lacks {field:?}: {failed}"
            );
        }
        assert_eq!(ok["looked_up_api"], Value::from(0));
        assert_eq!(failed["status"], Value::from("failed"));
        assert!(failed["error"]
            .as_str()
            .unwrap_or_default()
            .contains("missing.jsonl"));
    });
}

#[test]
fn the_summary_line_gives_rows_per_second() {
    with_backend("cli_rate", BackendKind::Sqlite, |env| {
        env.write("in.jsonl", "{\"id\": 1}\n{\"id\": 2}\n");
        let url = env.url();
        let out = env.idemload(&["load", "in.jsonl", "--into", &url, "--table", "t"]);
        out.code(0);
        assert!(out.stderr.contains(" rows/s)"), "{}", out.stderr);
    });
}

#[test]
fn logs_into_a_pipe_carry_no_colour_codes() {
    with_backend("cli_ansi", BackendKind::Sqlite, |env| {
        env.write("in.jsonl", "{\"id\": 1}\n");
        let url = env.url();
        let out = env.idemload(&["-v", "load", "in.jsonl", "--into", &url, "--table", "t"]);
        out.code(0);
        assert!(out.stderr.contains("INFO"), "-v logs runs: {}", out.stderr);
        assert!(
            !out.stderr.contains('\u{1b}'),
            "ANSI codes in a pipe: {:?}",
            out.stderr
        );
    });
}

#[test]
fn log_format_json_writes_one_object_per_event() {
    with_backend("cli_logjson", BackendKind::Sqlite, |env| {
        env.write("in.jsonl", "{\"id\": 1}\n");
        let url = env.url();
        let out = env.idemload(&[
            "-v",
            "--log-format",
            "json",
            "load",
            "in.jsonl",
            "--into",
            &url,
            "--table",
            "t",
        ]);
        out.code(0);
        let events: Vec<Value> = out
            .stderr
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert!(!events.is_empty(), "{}", out.stderr);
        assert!(
            events.iter().all(|e| e.get("level").is_some()),
            "{events:?}"
        );
    });
}

#[test]
fn completions_and_man_page_are_printed() {
    with_backend("cli_pack", BackendKind::Sqlite, |env| {
        let bash = env.idemload(&["completions", "bash"]);
        bash.code(0);
        assert!(bash.stdout.contains("_idemload"), "{}", bash.stdout);
        assert!(bash.stdout.contains("--full-refresh"), "{}", bash.stdout);
        let man = env.idemload(&["man"]);
        man.code(0);
        assert!(
            man.stdout.starts_with(".ie") || man.stdout.contains(".TH"),
            "{}",
            man.stdout
        );
    });
}

#[test]
fn help_run_points_to_the_reference_and_the_readme_stays_in_the_repo() {
    with_backend("cli_help", BackendKind::Sqlite, |env| {
        let help = env.idemload(&["help", "run"]);
        help.code(0);
        assert!(help.stdout.contains("docs/reference.md"), "{}", help.stdout);
        assert!(help.stdout.contains("batch_size"), "{}", help.stdout);
    });
    let readme = include_str!("../../README.md");
    assert!(
        !readme.contains("../shared"),
        "README points outside the repo"
    );
    assert!(readme.contains("docs/reference.md"));
}
