//! Guarantee 2, crash safety: a run killed at any instant (SIGKILL) and run
//! again leaves exactly the state of one uninterrupted run, and the
//! checkpoint is never ahead of the data committed.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::common::{assert_rows, Env};

const KEYS: u64 = 150_000;
const EXTRA_VERSIONS: u64 = 50_000;
const KILLS: usize = 20;

/// ~200k lines: every key once, some keys again with other cursors, in a
/// random (but fixed) order. Returns the lines and the expected fold.
fn history() -> (String, Vec<Value>, i64) {
    let mut rng = StdRng::seed_from_u64(2024);
    let mut versions: Vec<(u64, i64, u32)> = (0..KEYS)
        .map(|id| (id, rng.gen_range(0..1_000_000), rng.gen()))
        .collect();
    for _ in 0..EXTRA_VERSIONS {
        versions.push((
            rng.gen_range(0..KEYS),
            rng.gen_range(0..1_000_000),
            rng.gen(),
        ));
    }
    versions.shuffle(&mut rng);
    let mut text = String::with_capacity(versions.len() * 64);
    let mut latest: HashMap<u64, (i64, u32)> = HashMap::new();
    let mut max_v = i64::MIN;
    for &(id, v, x) in &versions {
        text.push_str(&format!(
            "{{\"id\":{id},\"v\":{v},\"name\":\"n{x}\",\"score\":{}}}\n",
            x % 1000
        ));
        max_v = max_v.max(v);
        match latest.get(&id) {
            Some(&(old, _)) if v < old => {}
            _ => {
                latest.insert(id, (v, x));
            }
        }
    }
    let expected = latest
        .into_iter()
        .map(|(id, (v, x))| json!({"id": id, "v": v, "name": format!("n{x}"), "score": x % 1000}))
        .collect();
    (text, expected, max_v)
}

/// After a kill: no key twice, and a checkpoint no greater than the
/// greatest cursor committed.
#[track_caller]
fn assert_consistent(env: &Env, round: usize) {
    let doubled = env.backend.doubled("crash", &["id"]);
    assert_eq!(doubled, 0, "round {round}: {doubled} keys appear twice");
    let Some(checkpoint) = env.backend.checkpoint("crash") else {
        return;
    };
    let committed = env
        .backend
        .scalar_i64("SELECT max(v) FROM crash")
        .unwrap_or(i64::MIN);
    let checkpoint = checkpoint.as_i64().expect("integer checkpoint");
    assert!(
        checkpoint <= committed,
        "round {round}: checkpoint {checkpoint} is ahead of the greatest committed cursor {committed}"
    );
}

idemtest!(killed_runs_resume_without_duplicates, |env| {
    let (lines, expected, max_v) = history();
    env.write("data/history.jsonl", &lines);
    let load = "cursor = \"v\"\nbatch_size = 2000";
    let p = env.pipeline("crash", "data/history.jsonl", load);

    // One uninterrupted run, into its own table, gives the time a whole
    // run takes (the range the kills fall in) and the table a run must give.
    let calibration = env.pipeline("crash_calibration", "data/history.jsonl", load);
    let started = Instant::now();
    let r = env.run(&calibration, &[]).code(0).report();
    let whole = started.elapsed();
    assert_eq!(r.inserted, KEYS);
    assert_rows(&env.rows("crash_calibration"), &expected);
    eprintln!("an uninterrupted run takes {whole:?}");

    let mut rng =
        StdRng::seed_from_u64(crate::common::seed("killed_runs_resume_without_duplicates"));
    let mut finished_before_kill = 0;
    for round in 0..KILLS {
        // Within the first 70% of a whole run: a run that finishes moves the
        // checkpoint to the end, and the runs after it have little to do.
        let delay = Duration::from_micros(rng.gen_range(0..whole.as_micros() as u64 * 7 / 10));
        let mut child = env
            .command(&["run", &p])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn idemload");
        std::thread::sleep(delay);
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
        let status = child.wait().expect("wait");
        if status.code().is_some() {
            finished_before_kill += 1;
        }
        assert_consistent(env, round);
        eprintln!(
            "round {round}: killed after {delay:?}, {} rows committed",
            env.backend.count("crash")
        );
    }
    eprintln!("{finished_before_kill} of {KILLS} runs finished before their kill");

    let last = env.run(&p, &[]).code(0).report();
    assert_eq!(last.status, "succeeded");
    assert_consistent(env, KILLS);
    assert_rows(&env.rows("crash"), &expected);
    assert_eq!(env.backend.checkpoint("crash"), Some(json!(max_v)));
});

idemtest!(killed_replace_leaves_the_old_or_the_new_snapshot, |env| {
    let snapshot = |from: u64, tag: &str| {
        let mut text = String::new();
        for id in from..from + 30_000 {
            text.push_str(&format!("{{\"id\":{id},\"name\":\"{tag}{id}\"}}\n"));
        }
        text
    };
    env.write("a.jsonl", snapshot(0, "a"));
    env.write("b.jsonl", snapshot(10_000, "b"));
    let args = ["--mode", "replace", "--batch-size", "1000"];
    let started = Instant::now();
    env.load("t", &["a.jsonl"], &args).code(0);
    let whole = started.elapsed();

    let url = env.url();
    let mut rng = StdRng::seed_from_u64(crate::common::seed(
        "killed_replace_leaves_the_old_or_the_new_snapshot",
    ));
    for round in 0..4 {
        let delay = Duration::from_micros(rng.gen_range(0..whole.as_micros() as u64));
        let mut cmd_args = vec!["load", "b.jsonl", "--into", &url, "--table", "t"];
        cmd_args.extend_from_slice(&args);
        let mut child = env
            .command(&cmd_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn idemload");
        std::thread::sleep(delay);
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
        child.wait().expect("wait");
        let b_rows = env
            .backend
            .scalar_i64("SELECT count(*) FROM t WHERE name LIKE 'b%'")
            .unwrap_or(0);
        assert_eq!(env.backend.count("t"), 30_000, "round {round}");
        assert!(
            b_rows == 0 || b_rows == 30_000,
            "round {round}: a killed replace left {b_rows} rows of the new snapshot and the rest of the old"
        );
    }
    let r = env.load("t", &["b.jsonl"], &args).code(0).report();
    assert_eq!(r.read, 30_000);
    assert_eq!(env.backend.count("t"), 30_000);
    assert_eq!(
        env.backend
            .scalar_i64("SELECT count(*) FROM t WHERE name LIKE 'b%'"),
        Some(30_000)
    );
});
