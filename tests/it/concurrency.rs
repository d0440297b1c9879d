//! Guarantee 3, one run at a time: a pipeline is locked in its destination
//! across processes; a second run exits 3 and names the holder, or waits
//! with `--wait`; a dead holder's lock is taken over.

use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

use crate::common::{assert_rows, hostname, wait_until, Env, Output};

const ROWS: u64 = 200_000;

/// A file big enough that a run lasts a while; returns the expected table.
fn big_input(env: &Env) -> Vec<Value> {
    let mut text = String::new();
    let mut expected = Vec::new();
    for id in 0..ROWS {
        let row = json!({"id": id, "name": format!("name {id}"), "n": id * 7 % 1000});
        text.push_str(&row.to_string());
        text.push('\n');
        expected.push(row);
    }
    env.write("data/big.jsonl", text);
    expected
}

/// Starts `n` runs of the pipeline at once and waits for all of them.
fn run_at_once(env: &Env, pipeline: &str, n: usize, extra: &[&str]) -> Vec<(u32, Output)> {
    let mut args = vec!["run", pipeline, "--json"];
    args.extend_from_slice(extra);
    let children: Vec<_> = (0..n)
        .map(|_| {
            env.command(&args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn idemload")
        })
        .collect();
    children
        .into_iter()
        .map(|child| {
            let pid = child.id();
            let out = child.wait_with_output().expect("wait");
            (
                pid,
                Output {
                    code: out.status.code().unwrap_or(-1),
                    stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                },
            )
        })
        .collect()
}

idemtest!(four_runs_at_once_one_runs_and_the_others_exit_3, |env| {
    let expected = big_input(env);
    let p = env.pipeline("big", "data/big.jsonl", "batch_size = 1000");
    let results = run_at_once(env, &p, 4, &[]);
    let winners: Vec<&(u32, Output)> = results.iter().filter(|(_, o)| o.code == 0).collect();
    assert_eq!(
        winners.len(),
        1,
        "exactly one run holds the lock: {:?}",
        results.iter().map(|(_, o)| o.code).collect::<Vec<_>>()
    );
    let (winner_pid, winner) = winners[0];
    assert_eq!(winner.report().inserted, ROWS);
    let host = hostname();
    for (_, out) in results.iter().filter(|(_, o)| o.code != 0) {
        out.code(3);
        assert!(
            out.stderr.contains("is locked by run")
                && out
                    .stderr
                    .contains(&format!("on host {host} (pid {winner_pid})")),
            "exit 3 names the holder (host {host}, pid {winner_pid}):\n{}",
            out.stderr
        );
    }
    assert_rows(&env.rows("big"), &expected);
    assert_eq!(env.history(&p).len(), 1, "locked-out runs record no run");
});

idemtest!(four_runs_with_wait_succeed_one_after_another, |env| {
    let expected = big_input(env);
    let p = env.pipeline("big", "data/big.jsonl", "batch_size = 1000");
    let results = run_at_once(env, &p, 4, &["--wait", "120s"]);
    let mut inserted = 0;
    for (_, out) in &results {
        let r = out.code(0).report();
        // A run after the first finds the file logged as loaded and
        // unchanged, and leaves it unread.
        let files_skipped = r.raw["files_skipped"].as_u64().unwrap_or(0);
        assert_eq!(
            r.inserted + r.unchanged + files_skipped * ROWS,
            ROWS,
            "{}",
            r.raw
        );
        inserted += r.inserted;
    }
    assert_eq!(inserted, ROWS, "every row inserted exactly once");
    assert_rows(&env.rows("big"), &expected);

    let mut runs: Vec<(String, String)> = env
        .backend
        .rows("_idemload_runs")
        .iter()
        .map(|r| {
            assert_eq!(r["status"], "succeeded", "{r}");
            (
                r["started_at"].as_str().expect("started_at").to_string(),
                r["finished_at"].as_str().expect("finished_at").to_string(),
            )
        })
        .collect();
    assert_eq!(runs.len(), 4);
    let instant = |t: &str| chrono::DateTime::parse_from_rfc3339(t).expect("RFC 3339");
    runs.sort_by_key(|(s, _)| instant(s));
    for pair in runs.windows(2) {
        assert!(
            instant(&pair[1].0) >= instant(&pair[0].1),
            "runs overlap in _idemload_runs: {pair:?}"
        );
    }
});

idemtest!(dead_holders_lock_is_taken_at_once, |env| {
    let expected = big_input(env);
    let p = env.pipeline("big", "data/big.jsonl", "batch_size = 500");
    let mut child = env
        .command(&["run", &p])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn idemload");
    let locked = wait_until(Duration::from_secs(30), || {
        env.backend.tables().iter().any(|t| t == "_idemload_locks")
            && env.backend.count("_idemload_locks") == 1
    });
    assert!(locked, "the run took its lock");
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).expect("kill");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), None, "the run was killed, not finished");
    assert_eq!(
        env.backend.count("_idemload_locks"),
        1,
        "the dead run's lease stays"
    );

    // Same host, dead pid: the lease (30 s) need not run out.
    let started = Instant::now();
    let r = env.run(&p, &[]).code(0).report();
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took over in {:?}",
        started.elapsed()
    );
    assert_eq!(r.inserted + r.unchanged, ROWS);
    assert_rows(&env.rows("big"), &expected);
    assert_eq!(env.backend.count("_idemload_locks"), 0, "released");
});

idemtest!(
    stale_lease_of_another_host_is_taken_only_after_expiry_or_with_its_session,
    |env| {
        env.write_jsonl("data/c.jsonl", &[json!({"id": 1, "name": "a"})]);
        let p = env.pipeline("c", "data/c.jsonl", "");
        // Writing the state creates the bookkeeping tables (reading it
        // creates nothing).
        env.idemload(&["state", &p, "--reset"]).code(0);

        let now = chrono::Utc::now().timestamp_millis();
        if env.backend.kind != crate::common::BackendKind::Sqlite {
            // On a server the session lock (advisory lock, GET_LOCK) decides:
            // a lease row whose holder holds no session lock is a dead
            // holder's, and is taken at once whatever its expiry.
            env.backend.insert_lock(
                "c",
                "run-elsewhere",
                "elsewhere.invalid",
                4242,
                now + 60_000,
            );
            let started = Instant::now();
            env.run(&p, &[]).code(0).report();
            assert!(started.elapsed() < Duration::from_secs(30));
            assert_rows(&env.rows("c"), &[json!({"id": 1, "name": "a"})]);
            assert_eq!(env.backend.count("_idemload_locks"), 0);
            return;
        }
        // A living lease of another host: the run is refused and told who holds it.
        env.backend
            .insert_lock("c", "run-elsewhere", "elsewhere.invalid", 4242, now + 3_000);
        let out = env.run(&p, &[]);
        out.code(3);
        assert!(
            out.stderr.contains("on host elsewhere.invalid (pid 4242)"),
            "{}",
            out.stderr
        );
        assert_eq!(env.backend.count("c"), 0);

        // Waiting takes it once the lease has run out, not before.
        let started = Instant::now();
        env.run(&p, &["--wait", "30s"]).code(0).report();
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(1_500),
            "the lease of another host was taken before it ran out ({waited:?})"
        );
        assert_rows(&env.rows("c"), &[json!({"id": 1, "name": "a"})]);

        // An expired lease of another host is taken at once.
        let now = chrono::Utc::now().timestamp_millis();
        env.backend.insert_lock(
            "c",
            "run-elsewhere-2",
            "elsewhere.invalid",
            4243,
            now - 1_000,
        );
        env.run(&p, &[]).code(0).report();
        assert_eq!(env.backend.count("_idemload_locks"), 0);
    }
);

idemtest!(
    a_run_whose_lease_was_taken_over_commits_nothing_more,
    |env| {
        big_input(env);
        let p = env.pipeline("big", "data/big.jsonl", "batch_size = 500");
        let child = env
            .command(&["run", &p])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn idemload");
        let started = wait_until(Duration::from_secs(30), || env.backend.count("big") > 0);
        assert!(started, "the run committed a first batch");
        // Another run takes the lease over (as after an expiry): the running
        // one must not commit another batch.
        let far = chrono::Utc::now().timestamp_millis() + 600_000;
        env.backend.execute(&format!(
        "UPDATE _idemload_locks SET run_id = 'thief', host = 'elsewhere.invalid', pid = 1, expires_at = {far} WHERE pipeline = 'big'"
    ));
        let at_takeover = env.backend.count("big");
        let out = child.wait_with_output().expect("wait");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("lost its run lock"), "{stderr}");
        assert!(at_takeover < ROWS, "the theft came after the run finished");
        assert_eq!(
            env.backend.count("big"),
            at_takeover,
            "a batch committed after the lease was taken over"
        );
        assert_eq!(env.backend.checkpoint("big"), None);
    }
);

/// Three pipelines (three names, so three locks) load the same keys into
/// one table at the same moment: each run succeeds, the table holds each
/// key once, and the runs' counts add up to one load. The runs race to
/// create the table and to copy keys into a table that was empty when they
/// began; the loser of each race merges instead of failing its batch.
fn pipelines_at_once_into_one_table(env: &Env) {
    let expected = big_input(env);
    let names = ["one", "two", "three"];
    let url = env.url();
    let children: Vec<_> = names
        .iter()
        .map(|name| {
            env.command(&[
                "load",
                "data/big.jsonl",
                "--into",
                &url,
                "--table",
                "shared",
                "--name",
                name,
                "--batch-size",
                "5000",
                "--json",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn idemload")
        })
        .collect();
    let mut inserted = 0;
    for child in children {
        let out = child.wait_with_output().expect("wait");
        let out = Output {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        let r = out.code(0).report();
        assert_eq!(r.inserted + r.unchanged + r.updated, ROWS, "{}", r.raw);
        inserted += r.inserted;
    }
    assert_eq!(inserted, ROWS, "each key inserted by exactly one run");
    assert_eq!(env.backend.doubled("shared", &["id"]), 0);
    assert_rows(&env.rows("shared"), &expected);
}

#[test]
fn pipelines_at_once_into_one_table_sqlite() {
    crate::common::with_backend(
        "pipelines_at_once_into_one_table",
        crate::common::BackendKind::Sqlite,
        pipelines_at_once_into_one_table,
    );
}

crate::server_test! {
    fn pipelines_at_once_into_one_table_postgres() {
        crate::common::with_backend(
            "pipelines_at_once_into_one_table",
            crate::common::BackendKind::Postgres,
            pipelines_at_once_into_one_table,
        );
    }
}

crate::server_test! {
    fn pipelines_at_once_into_one_table_mysql() {
        crate::common::with_backend(
            "pipelines_at_once_into_one_table",
            crate::common::BackendKind::Mysql,
            pipelines_at_once_into_one_table,
        );
    }
}
