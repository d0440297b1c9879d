//! Signals and dead runs (issue 14): SIGTERM or SIGINT stops a run after the
//! batch being written, records it as `interrupted`, releases the lock and
//! exits 143 or 130; a second signal aborts at once. A run that died
//! (kill -9) is never shown as `running`: it is `died` in the history.

use std::collections::HashMap;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::common::{assert_rows, wait_until, BackendKind, Env, Output, Report};

/// Every key once and a fifth of them again with other cursors, in a fixed
/// random order: long enough a run that a signal finds it working (SQLite
/// loads several times faster than a server). Returns the lines and the
/// table one whole run gives.
fn input(env: &Env) -> (String, Vec<Value>) {
    let keys: u64 = match env.backend.kind {
        BackendKind::Sqlite => 120_000,
        _ => 40_000,
    };
    let mut rng = StdRng::seed_from_u64(14);
    let mut versions: Vec<(u64, i64)> = (0..keys)
        .map(|id| (id, rng.gen_range(0..1_000_000)))
        .collect();
    for _ in 0..keys / 4 {
        versions.push((rng.gen_range(0..keys), rng.gen_range(0..1_000_000)));
    }
    versions.shuffle(&mut rng);
    let mut text = String::new();
    let mut latest: HashMap<u64, i64> = HashMap::new();
    for &(id, v) in &versions {
        text.push_str(&format!("{{\"id\":{id},\"v\":{v},\"name\":\"n{v}\"}}\n"));
        let newest = latest.entry(id).or_insert(v);
        *newest = (*newest).max(v);
    }
    let expected = latest
        .into_iter()
        .map(|(id, v)| json!({"id": id, "v": v, "name": format!("n{v}")}))
        .collect();
    (text, expected)
}

/// Starts `idemload run PIPELINE [--json]` and waits until it holds the
/// lock (its lease row is there), so a signal finds it running.
fn start_run(env: &Env, pipeline: &str, as_json: bool) -> Child {
    let (child, locked) = try_start_run(env, pipeline, as_json);
    assert!(locked, "the run took its lock");
    child
}

/// Starts a run and waits until it holds the lock; `false` when it
/// finished before it was seen holding it.
fn try_start_run(env: &Env, pipeline: &str, as_json: bool) -> (Child, bool) {
    let mut args = vec!["run", pipeline];
    if as_json {
        args.push("--json");
    }
    let child = env
        .command(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn idemload");
    let mut child = child;
    let mut exited = false;
    let locked = wait_until(Duration::from_secs(30), || {
        exited = exited || child.try_wait().ok().flatten().is_some();
        exited
            || (env.backend.tables().iter().any(|t| t == "_idemload_locks")
                && env.backend.count("_idemload_locks") == 1)
    });
    assert!(locked, "the run neither took its lock nor finished");
    (child, !exited)
}

fn finish(child: Child) -> Output {
    let out = child.wait_with_output().expect("wait");
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// No key twice, and a checkpoint no greater than the greatest cursor
/// committed.
#[track_caller]
fn assert_consistent(env: &Env, round: usize) {
    if !env.backend.tables().iter().any(|t| t == "sig") {
        return;
    }
    let doubled = env
        .backend
        .scalar_i64("SELECT count(*) - count(DISTINCT id) FROM sig")
        .unwrap_or(0);
    assert_eq!(doubled, 0, "round {round}: {doubled} keys appear twice");
    if let Some(checkpoint) = env.backend.checkpoint("sig") {
        let committed = env
            .backend
            .scalar_i64("SELECT max(v) FROM sig")
            .unwrap_or(i64::MIN);
        let checkpoint = checkpoint.as_i64().expect("integer checkpoint");
        assert!(
            checkpoint <= committed,
            "round {round}: checkpoint {checkpoint} is ahead of the greatest committed cursor {committed}"
        );
    }
}

idemtest!(signals_stop_a_run_cleanly_and_the_next_run_resumes, |env| {
    let (lines, expected) = input(env);
    env.write("data/sig.jsonl", &lines);
    let load = "cursor = \"v\"\nbatch_size = 1000";
    let p = env.pipeline("sig", "data/sig.jsonl", load);

    // One uninterrupted run into its own table: how long a run takes, and
    // the table a run must give.
    let calibration = env.pipeline("sig_calibration", "data/sig.jsonl", load);
    let started = Instant::now();
    env.run(&calibration, &[]).code(0);
    let whole = started.elapsed();
    assert_rows(&env.rows("sig_calibration"), &expected);

    let mut rng = StdRng::seed_from_u64(crate::common::seed(
        "signals_stop_a_run_cleanly_and_the_next_run_resumes",
    ));
    // 20 rounds at random moments, a third of them SIGINT.
    let signals: Vec<Signal> = (0..20)
        .map(|i| {
            if i % 3 == 1 {
                Signal::SIGINT
            } else {
                Signal::SIGTERM
            }
        })
        .collect();
    let mut interrupted = 0;
    for (round, &signal) in signals.iter().enumerate() {
        // Round 1 has no --json: the one-line summary goes to stderr.
        let as_json = round != 1;
        let (child, running) = try_start_run(env, &p, as_json);
        let delay = Duration::from_micros(rng.gen_range(0..whole.as_micros() as u64 / 2));
        if running {
            std::thread::sleep(delay);
            let _ = kill(Pid::from_raw(child.id() as i32), signal);
        }
        let out = finish(child);
        let runs = env.history(&p);
        let latest = &runs[0];
        if out.code == 0 {
            // The signal came as the last batch committed: the run finished.
            assert_eq!(latest["status"], "succeeded", "round {round}: {latest}");
        } else {
            let code = if signal == Signal::SIGINT { 130 } else { 143 };
            out.code(code);
            interrupted += 1;
            assert_eq!(latest["status"], "interrupted", "round {round}: {latest}");
            assert!(latest["finished_at"].is_string(), "round {round}: {latest}");
            if as_json {
                let report = out.report();
                assert_eq!(report.status, "interrupted");
                assert_eq!(
                    Report::from_value(latest["stats"].clone()).changes(),
                    report.changes(),
                    "round {round}: the report and the history tell what was committed"
                );
                assert_eq!(
                    env.backend.checkpoint("sig").unwrap_or(Value::Null),
                    report.checkpoint_after(),
                    "round {round}: the report names the checkpoint left"
                );
            } else {
                assert!(
                    out.stderr.contains("sig: interrupted; committed read")
                        && out.stderr.contains("running again resumes"),
                    "round {round}: {}",
                    out.stderr
                );
            }
        }
        assert_eq!(
            env.backend.count("_idemload_locks"),
            0,
            "round {round}: the lock is released"
        );
        assert_consistent(env, round);
        eprintln!(
            "round {round}: {signal} after {delay:?}, exit {}, {} rows committed",
            out.code,
            env.backend.count("sig")
        );
    }
    assert!(
        interrupted > 0,
        "no run was interrupted: the input is too small"
    );

    // The next run starts at once (no --wait) and completes the load.
    let last = env.run(&p, &[]).code(0).report();
    assert_eq!(last.status, "succeeded");
    assert_consistent(env, signals.len());
    assert_rows(&env.rows("sig"), &expected);
    assert_eq!(
        env.backend.checkpoint("sig"),
        env.backend.checkpoint("sig_calibration")
    );
    assert!(env
        .history(&p)
        .iter()
        .all(|r| r["status"] == "interrupted" || r["status"] == "succeeded"));
});

idemtest!(a_second_signal_aborts_at_once, |env| {
    let (lines, expected) = input(env);
    env.write("data/sig.jsonl", &lines);
    let p = env.pipeline("sig", "data/sig.jsonl", "cursor = \"v\"\nbatch_size = 500");
    let child = start_run(env, &p, true);
    let pid = Pid::from_raw(child.id() as i32);
    let _ = kill(pid, Signal::SIGINT);
    std::thread::sleep(Duration::from_millis(20));
    let _ = kill(pid, Signal::SIGTERM);
    // The code of the first signal.
    finish(child).code(130);
    // The lock is left to its lease (or to the dead pid), and the next run
    // takes it over and finishes the load.
    env.run(&p, &[]).code(0);
    assert_rows(&env.rows("sig"), &expected);
    let runs = env.history(&p);
    assert_eq!(runs.len(), 2);
    assert!(
        runs[1]["status"] == "died" || runs[1]["status"] == "interrupted",
        "{}",
        runs[1]
    );
});

idemtest!(a_killed_run_is_shown_as_died, |env| {
    let (lines, expected) = input(env);
    env.write("data/sig.jsonl", &lines);
    let p = env.pipeline("sig", "data/sig.jsonl", "cursor = \"v\"\nbatch_size = 500");
    let child = start_run(env, &p, false);
    let killed = wait_until(Duration::from_secs(30), || {
        env.backend.tables().iter().any(|t| t == "sig") && env.backend.count("sig") > 0
    });
    assert!(killed, "the run committed a batch");
    let pid = Pid::from_raw(child.id() as i32);
    kill(pid, Signal::SIGKILL).expect("kill");
    let out = finish(child);
    assert_eq!(out.code, -1, "the run was killed, not finished");

    // Its lease row stays, but its process is gone: never `running`.
    let runs = env.history(&p);
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["status"], "died", "{}", runs[0]);

    // The next run takes the lock over and records the killed run as died.
    let started = Instant::now();
    env.run(&p, &[]).code(0);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took over in {:?}",
        started.elapsed()
    );
    assert_rows(&env.rows("sig"), &expected);
    let runs = env.history(&p);
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0]["status"], "succeeded");
    assert_eq!(runs[1]["status"], "died", "{}", runs[1]);
    assert!(
        runs[1]["error"]
            .as_str()
            .is_some_and(|e| e.contains("took its lock over")),
        "{}",
        runs[1]
    );
    // Recorded, not only shown.
    let stored: Vec<Value> = env
        .backend
        .rows("_idemload_runs")
        .into_iter()
        .filter(|r| r["status"] == "died")
        .collect();
    assert_eq!(stored.len(), 1, "{stored:?}");
});

idemtest!(a_signal_while_waiting_for_the_lock_ends_the_wait, |env| {
    env.write_jsonl("data/c.jsonl", &[json!({"id": 1, "name": "a"})]);
    let p = env.pipeline("c", "data/c.jsonl", "");
    // Another run holds the lock for the whole test: on SQLite a living
    // lease of another host; on a server, a run that holds its session
    // lock while it is stopped (SIGSTOP).
    let mut holder = None;
    if env.backend.kind == BackendKind::Sqlite {
        env.idemload(&["state", &p, "--reset"]).code(0);
        let far = chrono::Utc::now().timestamp_millis() + 600_000;
        env.backend
            .insert_lock("c", "run-elsewhere", "elsewhere.invalid", 4242, far);
    } else {
        let (lines, _) = input(env);
        env.write("data/c.jsonl", &lines);
        let child = start_run(env, &p, true);
        kill(Pid::from_raw(child.id() as i32), Signal::SIGSTOP).expect("stop the holder");
        holder = Some(child);
    }
    let waiter = env
        .command(&["run", &p, "--wait", "60s"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn idemload");
    std::thread::sleep(Duration::from_millis(500));
    let signalled = Instant::now();
    let _ = kill(Pid::from_raw(waiter.id() as i32), Signal::SIGTERM);
    let out = finish(waiter);
    out.code(143);
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "{:?}",
        signalled.elapsed()
    );
    assert!(
        out.stderr.contains("stopped while waiting"),
        "{}",
        out.stderr
    );
    if let Some(child) = holder {
        kill(Pid::from_raw(child.id() as i32), Signal::SIGCONT).expect("continue the holder");
        finish(child).code(0);
        assert_eq!(env.history(&p).len(), 1, "the waiting run recorded no run");
    } else {
        assert!(
            env.history(&p).is_empty(),
            "the waiting run recorded no run"
        );
    }
});

#[test]
fn sigterm_stops_a_watch_between_polls_and_frees_its_lock() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("items.jsonl"),
        "{\"id\":1,\"updated_at\":\"2025-01-01T00:00:00Z\"}\n",
    )
    .expect("write items");
    std::fs::write(
        dir.path().join("w.toml"),
        "name = \"items\"\n[source]\ntype = \"file\"\npath = \"items.jsonl\"\n[trigger]\ninterval = \"60s\"\nstore = \"sqlite://seen.db\"\n",
    )
    .expect("write pipeline");
    let mut child = std::process::Command::new(crate::common::bin())
        .args(["watch", "w.toml", "--json"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn idemload");
    // The first poll's report: the watcher now sleeps until the next poll.
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).expect("read a poll report");
    assert!(line.contains("\"poll\":1"), "{line}");
    let signalled = Instant::now();
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("signal");
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{stderr}");
    assert!(signalled.elapsed() < Duration::from_secs(5));
    assert!(stderr.contains("interrupted"), "{stderr}");
    // The lock is free: another watcher starts at once, without --wait.
    let again = crate::common::idemload_in(dir.path(), &["watch", "w.toml", "--once"]);
    assert_eq!(
        again.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}

idemtest!(an_interrupted_replace_leaves_the_old_snapshot, |env| {
    let rows: u64 = match env.backend.kind {
        BackendKind::Sqlite => 120_000,
        _ => 40_000,
    };
    let snapshot = |tag: &str| {
        let mut text = String::new();
        for id in 0..rows {
            text.push_str(&format!("{{\"id\":{id},\"name\":\"{tag}{id}\"}}\n"));
        }
        text
    };
    env.write("a.jsonl", snapshot("a"));
    env.write("b.jsonl", snapshot("b"));
    let args = ["--mode", "replace", "--batch-size", "1000"];
    env.load("t", &["a.jsonl"], &args).code(0);

    let url = env.url();
    let mut cmd = vec!["load", "b.jsonl", "--into", &url, "--table", "t", "--json"];
    cmd.extend_from_slice(&args);
    let child = env
        .command(&cmd)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn idemload");
    let loading = wait_until(Duration::from_secs(30), || {
        env.backend.count("_idemload_locks") == 1
    });
    assert!(loading, "the load took its lock");
    std::thread::sleep(Duration::from_millis(50));
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let out = finish(child);
    eprintln!("a replace signalled 50ms into its run exits {}", out.code);
    let b_rows = env
        .backend
        .scalar_i64("SELECT count(*) FROM t WHERE name LIKE 'b%'")
        .unwrap_or(0);
    if out.code == 0 {
        assert_eq!(
            b_rows, rows as i64,
            "a finished replace swapped the snapshot in"
        );
    } else {
        out.code(143);
        let report = out.report();
        assert_eq!(report.status, "interrupted");
        // The staged load is dropped whole: the table and the counts say
        // that nothing changed.
        assert_eq!((report.read, report.changes()), (0, (0, 0, 0, 0)));
        assert_eq!(
            b_rows, 0,
            "an interrupted replace swapped part of the snapshot in"
        );
        assert_eq!(env.backend.count("t"), rows);
    }
    env.load("t", &["b.jsonl"], &args).code(0);
    assert_eq!(
        env.backend
            .scalar_i64("SELECT count(*) FROM t WHERE name LIKE 'b%'"),
        Some(rows as i64)
    );
});
