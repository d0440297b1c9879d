//! Files loaded once: a file source logs each file it finished loading in
//! `_idemload_files`, in the transaction of the file's last batch, and a
//! later run in `merge` or `insert_new` leaves a file whose size,
//! modification time and digest are unchanged unread (`files_skipped`).

use std::collections::BTreeSet;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::common::{kill_after, seed, Env};

/// `exports/day-NN.jsonl` for `days` days of `per_day` records each; ids
/// `day * 10_000 + i`.
fn daily(env: &Env, days: u64, per_day: u64) -> u64 {
    for day in 1..=days {
        let records: Vec<Value> = (0..per_day)
            .map(|i| json!({"id": day * 10_000 + i, "day": day, "name": format!("n{i}")}))
            .collect();
        env.write_jsonl(&format!("exports/day-{day:02}.jsonl"), &records);
    }
    days * per_day
}

fn ids(env: &Env, table: &str) -> BTreeSet<u64> {
    env.rows(table)
        .iter()
        .map(|r| r["id"].as_u64().expect("integer id"))
        .collect()
}

idemtest!(a_folder_of_daily_files_is_read_once, |env| {
    let total = daily(env, 30, 20);
    let p = env.pipeline("daily", "exports/*.jsonl", "key = \"id\"");
    let first = env.run(&p, &[]).code(0).report();
    assert_eq!(
        (first.read, first.inserted, first.files_skipped),
        (total, total, 0)
    );
    assert_eq!(env.backend.count("_idemload_files"), 30);
    let stored = env.rows("daily");

    // The identical re-run reads no file.
    let again = env.run(&p, &[]).code(0).report();
    assert_eq!((again.read, again.files_skipped), (0, 30), "{}", again.raw);
    assert_eq!(again.changes(), (0, 0, 0, 0));
    assert_eq!(env.rows("daily"), stored);

    // A changed file is read again, and only it.
    let mut day7: Vec<Value> = (0..20)
        .map(|i| json!({"id": 70_000 + i, "day": 7, "name": format!("n{i}")}))
        .collect();
    day7[3]["name"] = json!("changed");
    env.write_jsonl("exports/day-07.jsonl", &day7);
    let changed = env.run(&p, &[]).code(0).report();
    assert_eq!(
        (changed.read, changed.files_skipped),
        (20, 29),
        "{}",
        changed.raw
    );
    assert_eq!(changed.changes(), (0, 1, 19, 0));

    // --full-refresh reads every file.
    let full = env.run(&p, &["--full-refresh"]).code(0).report();
    assert_eq!((full.read, full.files_skipped), (total, 0), "{}", full.raw);
    assert_eq!(full.changes(), (0, 0, total, 0));

    // The human summary says what was left unread and how to force it.
    let out = env.idemload(&["run", &p]);
    out.code(0);
    assert!(
        out.stderr.contains("30 files unchanged") && out.stderr.contains("--full-refresh"),
        "{}",
        out.stderr
    );
});

idemtest!(
    a_rejected_line_in_a_loaded_file_does_not_alarm_again,
    |env| {
        env.write("in/a.jsonl", "{\"id\": 1}\nnot json\n{\"id\": 2}\n");
        let p = env.pipeline("rej", "in/*.jsonl", "key = \"id\"");
        let first = env.run(&p, &[]).code(4).report();
        assert_eq!((first.read, first.inserted, first.rejected), (3, 2, 1));
        let again = env.run(&p, &[]).code(0).report();
        assert_eq!((again.read, again.rejected, again.files_skipped), (0, 0, 1));
        let logged = env.backend.raw_rows("_idemload_files");
        assert_eq!(logged.len(), 1, "{logged:?}");
        assert_eq!(logged[0]["rows"].as_i64(), Some(3), "{logged:?}");
    }
);

idemtest!(
    a_dropped_or_emptied_table_is_filled_again_from_every_file,
    |env| {
        let total = daily(env, 3, 10);
        let p = env.pipeline("refill", "exports/*.jsonl", "key = \"id\"");
        env.run(&p, &[]).code(0);
        env.backend.execute("DELETE FROM refill");
        let refilled = env.run(&p, &[]).code(0).report();
        assert_eq!(
            (refilled.read, refilled.inserted),
            (total, total),
            "{}",
            refilled.raw
        );
        env.backend.execute("DROP TABLE refill");
        let recreated = env.run(&p, &[]).code(0).report();
        assert_eq!((recreated.read, recreated.inserted), (total, total));
        assert_eq!(env.backend.count("refill"), total);
    }
);

idemtest!(a_replace_load_reads_every_file, |env| {
    let total = daily(env, 3, 10);
    let p = env.pipeline(
        "snap",
        "exports/*.jsonl",
        "key = \"id\"\nmode = \"replace\"",
    );
    env.run(&p, &[]).code(0);
    let again = env.run(&p, &[]).code(0).report();
    assert_eq!(
        (again.read, again.unchanged, again.files_skipped),
        (total, total, 0)
    );
});

idemtest!(
    files_are_logged_only_with_all_their_rows_under_kill_9,
    |env| {
        let total = daily(env, 30, 2_000);
        let load = "key = \"id\"\nbatch_size = 500";
        // How long one uninterrupted run takes here, so the kills land inside.
        let timing = env.pipeline("timing", "exports/*.jsonl", load);
        let started = std::time::Instant::now();
        env.run(&timing, &[]).code(0);
        let whole = started.elapsed().as_millis() as u64;
        let p = env.pipeline("killed", "exports/*.jsonl", load);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed("files_once_kill"));
        let mut mid_run = 0;
        for _ in 0..5 {
            env.backend.execute("DROP TABLE IF EXISTS killed");
            env.backend
                .execute("DELETE FROM _idemload_files WHERE pipeline = 'killed'");
            let delay = Duration::from_millis(rng.gen_range(whole / 10..whole * 9 / 10 + 1));
            kill_after(env.root(), &["run", &p], delay);
            // Every file the log names has every one of its rows stored.
            let present = if env.backend.tables().iter().any(|t| t == "killed") {
                ids(env, "killed")
            } else {
                BTreeSet::new()
            };
            let logged = env.backend.raw_rows("_idemload_files");
            let logged: Vec<&Value> = logged
                .iter()
                .filter(|f| f["pipeline"] == "killed")
                .collect();
            eprintln!(
                "kill after {delay:?} of {whole} ms: {} files logged, {} rows",
                logged.len(),
                present.len()
            );
            if logged.len() < 30 {
                mid_run += 1;
            }
            for file in &logged {
                let path = file["path"].as_str().unwrap();
                let day: u64 = path[path.len() - 8..path.len() - 6].parse().unwrap();
                let missing = (0..2_000)
                    .filter(|i| !present.contains(&(day * 10_000 + i)))
                    .count();
                assert_eq!(
                    missing, 0,
                    "{path} is logged as loaded but lacks {missing} rows"
                );
            }
            // The run after reads exactly the files the log does not name.
            let rerun = env.run(&p, &[]).code(0).report();
            assert_eq!(rerun.files_skipped, logged.len() as u64, "{}", rerun.raw);
            assert_eq!(
                rerun.read,
                (30 - logged.len() as u64) * 2_000,
                "{}",
                rerun.raw
            );
            assert_eq!(env.backend.count("killed"), total);
        }
        assert!(
            mid_run > 0,
            "no kill landed before the run ended (a run takes {whole} ms)"
        );
        let again = env.run(&p, &[]).code(0).report();
        assert_eq!((again.read, again.files_skipped), (0, 30));
    }
);
