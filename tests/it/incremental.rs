//! Incremental loads: `cursor`, `lookback`, `initial`, `--full-refresh`, and
//! the commands around a pipeline (`state`, `history`, `check`).

use serde_json::{json, Value};

use crate::common::{assert_rows, Env};

fn event(id: u64, at: &str) -> Value {
    json!({"id": id, "note": format!("e{id}"), "updated_at": at})
}

const LOAD: &str =
    "cursor = \"updated_at\"\nlookback = \"1h\"\ninitial = \"2024-01-01T00:00:00Z\"\nbatch_size = 2";

fn setup(env: &Env) -> String {
    env.write_jsonl(
        "in/1.jsonl",
        &[
            event(1, "2023-12-31T23:00:00Z"), // before `initial`
            event(2, "2024-01-02T10:00:00Z"),
            event(3, "2024-01-02T12:00:00Z"),
        ],
    );
    env.pipeline("events", "in/*.jsonl", LOAD)
}

idemtest!(run_reads_from_checkpoint_minus_lookback, |env| {
    let p = setup(env);
    let first = env.run(&p, &[]).code(0).report();
    assert_eq!(
        (first.read, first.inserted, first.skipped),
        (3, 2, 1),
        "{}",
        first.raw
    );
    assert_eq!(first.checkpoint_before(), Value::Null);
    assert_eq!(first.checkpoint_after(), json!("2024-01-02T12:00:00Z"));

    // New export: one record long before the window, one inside the
    // lookback (11:30 >= 12:00 - 1h), one new.
    env.write_jsonl(
        "in/2.jsonl",
        &[
            event(4, "2024-01-02T09:00:00Z"),
            json!({"id": 2, "note": "late correction", "updated_at": "2024-01-02T11:30:00Z"}),
            event(5, "2024-01-03T08:00:00Z"),
        ],
    );
    // in/1.jsonl is unchanged since the first run loaded it: not read.
    let second = env.run(&p, &[]).code(0).report();
    assert_eq!(
        (second.read, second.files_skipped),
        (3, 1),
        "{}",
        second.raw
    );
    assert_eq!(second.skipped, 1, "id 4 is below 11:00: {}", second.raw);
    assert_eq!(
        (second.inserted, second.updated, second.unchanged),
        (1, 1, 0),
        "{}",
        second.raw
    );
    assert_eq!(second.checkpoint_before(), json!("2024-01-02T12:00:00Z"));
    assert_eq!(second.checkpoint_after(), json!("2024-01-03T08:00:00Z"));
    assert_rows(
        &env.rows("events"),
        &[
            json!({"id": 2, "note": "late correction", "updated_at": "2024-01-02T11:30:00Z"}),
            event(3, "2024-01-02T12:00:00Z"),
            event(5, "2024-01-03T08:00:00Z"),
        ],
    );

    // --full-refresh reads everything, the checkpoint ignored for one run;
    // only the stale version of id 2 (10:00, older than the stored 11:30)
    // is skipped.
    let full = env.run(&p, &["--full-refresh"]).code(0).report();
    assert_eq!(full.read, 6);
    assert_eq!(full.skipped, 1, "{}", full.raw);
    assert_eq!(full.inserted, 2, "ids 1 and 4: {}", full.raw);
    assert_eq!(env.backend.count("events"), 5);
    assert_eq!(
        env.backend.checkpoint("events"),
        Some(json!("2024-01-03T08:00:00Z"))
    );
});

idemtest!(state_set_and_reset_move_the_checkpoint, |env| {
    let p = setup(env);
    let out = env.idemload(&["state", &p]);
    out.code(0);
    assert_eq!(out.stdout.trim(), "none");
    env.run(&p, &[]).code(0);
    let out = env.idemload(&["state", &p]);
    assert_eq!(out.stdout.trim(), "2024-01-02T12:00:00Z");

    let out = env.idemload(&["state", &p, "--set", "2024-01-02T11:00:00Z"]);
    out.code(0);
    assert_eq!(out.stdout.trim(), "2024-01-02T11:00:00Z");
    assert_eq!(
        env.backend.checkpoint("events"),
        Some(json!("2024-01-02T11:00:00Z"))
    );
    // Low bound 10:00: ids 2 and 3 read again.
    let r = env.run(&p, &[]).code(0).report();
    assert_eq!((r.skipped, r.unchanged), (1, 2), "{}", r.raw);

    let out = env.idemload(&["state", &p, "--reset"]);
    out.code(0);
    assert_eq!(out.stdout.trim(), "none");
    assert_eq!(env.backend.checkpoint("events"), None);
    // From `initial` again: only id 1 is below it.
    let r = env.run(&p, &[]).code(0).report();
    assert_eq!((r.skipped, r.unchanged), (1, 2), "{}", r.raw);
    assert_eq!(r.checkpoint_before(), Value::Null);

    // A value the cursor cannot hold is refused before it is written (issue
    // 16): this cursor holds timestamps.
    let before = env.backend.checkpoint("events");
    let out = env.idemload(&["state", &p, "--set", "42"]);
    out.code(2);
    assert!(
        out.stderr.contains("2025-01-01T00:00:00Z"),
        "{}",
        out.stderr
    );
    assert_eq!(env.backend.checkpoint("events"), before);
});

idemtest!(history_lists_runs_newest_first, |env| {
    let p = setup(env);
    let first = env.run(&p, &[]).code(0).report();
    let second = env.run(&p, &[]).code(0).report();
    let runs = env.history(&p);
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0]["run_id"], json!(second.run_id()));
    assert_eq!(runs[1]["run_id"], json!(first.run_id()));
    for run in &runs {
        assert_eq!(run["status"], "succeeded");
        assert_eq!(run["pipeline"], "events");
        assert!(run["finished_at"].is_string());
    }
    assert_eq!(runs[1]["stats"]["inserted"], 2);
    assert_eq!(runs[0]["checkpoint_after"], json!("2024-01-02T12:00:00Z"));
    assert!(
        runs[0]["run_id"].as_str() > runs[1]["run_id"].as_str(),
        "run ids sort by time"
    );
    let limited = env.idemload(&["history", &p, "--json", "--limit", "1"]);
    assert_eq!(limited.json()["runs"].as_array().unwrap().len(), 1);
});

idemtest!(check_prints_ok_for_each_step, |env| {
    let p = setup(env);
    let out = env.idemload(&["check", &p]);
    out.code(0);
    let lines: Vec<&str> = out.stdout.lines().collect();
    for step in ["config", "source", "destination", "plan"] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("ok") && l.contains(&format!("{step}:"))),
            "no ok line for {step}:\n{}",
            out.stdout
        );
    }
    assert!(out.stdout.contains("1 file(s)"), "{}", out.stdout);
    assert!(
        out.stdout.contains("2024-01-01T00:00:00Z"),
        "plan names `initial`: {}",
        out.stdout
    );

    env.write("bad.toml", "name = \"x\"\n[source]\ntype = \"file\"\npath = \"a\"\n[destination]\nurl = \"sqlite://x.db\"\ntable = \"t\"\n[load]\nmode = \"window\"\n");
    let out = env.idemload(&["check", "bad.toml"]);
    out.code(2);
    assert!(out.stdout.starts_with("fail"), "{}", out.stdout);
    assert!(out.stdout.contains("window_field"), "{}", out.stdout);
});

idemtest!(integer_cursor_with_numeric_lookback, |env| {
    let rows = |ids: std::ops::Range<u64>| -> Vec<Value> {
        ids.map(|i| json!({"id": i, "seq": i * 10})).collect()
    };
    env.write_jsonl("in/1.jsonl", &rows(0..10));
    let p = env.pipeline(
        "seqs",
        "in/*.jsonl",
        "cursor = \"seq\"\nlookback = 25\ninitial = 20",
    );
    let first = env.run(&p, &[]).code(0).report();
    assert_eq!((first.inserted, first.skipped), (8, 2), "{}", first.raw);
    assert_eq!(first.checkpoint_after(), json!(90));
    // A second export overlapping the first (in/1.jsonl, unchanged, is
    // not read again). Low bound 90 - 25 = 65: seq 50 and 60 skipped, 70,
    // 80, 90 read again, 100 and 110 new.
    env.write_jsonl("in/2.jsonl", &rows(5..12));
    let second = env.run(&p, &[]).code(0).report();
    assert_eq!(second.files_skipped, 1, "{}", second.raw);
    assert_eq!(
        (second.skipped, second.unchanged, second.inserted),
        (2, 3, 2),
        "{}",
        second.raw
    );
    assert_eq!(env.backend.checkpoint("seqs"), Some(json!(110)));
    assert_rows(&env.rows("seqs"), &rows(2..12));
});

// A re-run over a large export that mostly lies below the window: those
// lines are recognised by their cursor alone and skipped unparsed, and the
// accounting is the same as when every record is parsed: below the window
// means skipped, whatever else is wrong with the record; a line that is not
// clearly below (malformed, no cursor) is read in full and rejected.
idemtest!(
    records_below_the_window_are_skipped_unparsed_and_counted,
    |env| {
        let mut old: Vec<String> = (0..3000)
            .map(|i| event(i, &format!("2024-01-0{}T00:00:00Z", 1 + i % 5)).to_string())
            .collect();
        old[10] = r#"{"note":"no id, but long ago","updated_at":"2024-01-01T00:00:00Z"}"#.into();
        old[2500] = r#"{"id":2500,"updated_at":"2024-01-01T00:00:00Z","bad":}"#.into();
        old[2600] = r#"{"id":2600,"note":"no cursor"}"#.into();
        // Out of a double's range: a reject when read in full, skipped below
        // the window however the line was read.
        old[20] = r#"{"id":20,"updated_at":"2024-01-01T00:00:00Z","x":1e400}"#.into();
        let newer: Vec<String> = (3000..3010)
            .map(|i| event(i, "2024-02-01T00:00:00Z").to_string())
            .collect();
        env.write("in/big.jsonl", old.join("\n") + "\n");
        let load = LOAD.replace("batch_size = 2", "batch_size = 500");
        let p = env.pipeline("events", "in/*.jsonl", &load);
        let first = env.run(&p, &[]).code(4).report();
        assert_eq!(first.read, 3000, "{}", first.raw);
        assert_eq!(first.rejected, 4, "{}", first.raw);
        assert_eq!(first.checkpoint_after(), json!("2024-01-05T00:00:00Z"));
        env.write(
            "in/big.jsonl",
            old.join("\n") + "\n" + &newer.join("\n") + "\n",
        );
        // A second file mostly inside the window, whose lines are parsed in
        // full first, ending with the same out-of-range line.
        let mut inside: Vec<String> = (5000..6100)
            .map(|i| event(i, "2024-02-02T00:00:00Z").to_string())
            .collect();
        inside.push(old[20].clone());
        env.write("in/z.jsonl", inside.join("\n") + "\n");
        let again = env.run(&p, &[]).code(0).report();
        // Below day 5 minus 1h: the 2,400 records of days 1 to 4 (the id-less
        // and the out-of-range ones among them) but the malformed and the
        // cursor-less lines, plus the out-of-range line of the second file.
        assert_eq!(again.read, 3010 + 1101, "{}", again.raw);
        assert_eq!(again.skipped, 2398 + 1, "{}", again.raw);
        assert_eq!(
            again.rejected, 2,
            "malformed and cursor-less lines: {}",
            again.raw
        );
        assert_eq!(
            (again.inserted, again.unchanged),
            (10 + 1100, 600),
            "{}",
            again.raw
        );
        assert_eq!(again.checkpoint_after(), json!("2024-02-02T00:00:00Z"));
        assert_eq!(env.rows("events").len(), 3000 - 4 + 10 + 1100);
    }
);
