//! Backfills (spec: "Backfills, windows and many workers"): `idemload
//! backfill PIPELINE --from X --to Y --window D` loads the cursor range
//! `[X, Y)` as windows kept in `_idemload_windows`, each asked of the source
//! for exactly its bounds and loaded as a run of its own; any number of
//! processes (and `--workers N` claimers in one) share the windows, a window
//! whose worker died is taken again, and the pipeline's checkpoint never
//! moves. The APIs here are real servers on 127.0.0.1 that log who asked
//! for which window and when.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, Utc};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::common::{
    assert_balanced, assert_rows, http_server, seed, BackendKind, Env, HttpResponse, HttpServer,
    Output, Report,
};

// ---- running backfills --------------------------------------------------------

/// The fields `backfill --json` promises.
const SUMMARY_FIELDS: &[&str] = &[
    "pipeline",
    "status",
    "from",
    "to",
    "window",
    "workers",
    "windows",
    "windows_done",
    "windows_loaded",
    "windows_skipped",
    "windows_failed",
    "read",
    "inserted",
    "updated",
    "unchanged",
    "deleted",
    "skipped",
    "duplicates",
    "rejected",
    "started_at",
    "finished_at",
    "duration_ms",
];

fn finished(out: std::process::Output) -> Output {
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs the binary to the end with extra environment variables.
fn idemload_with(env: &Env, args: &[&str], vars: &[(&str, &str)]) -> Output {
    finished(
        env.command(args)
            .envs(vars.iter().copied())
            .output()
            .expect("run the idemload binary"),
    )
}

/// `idemload backfill PIPELINE --json ARGS...` with extra environment.
fn backfill_with(env: &Env, pipeline: &str, args: &[&str], vars: &[(&str, &str)]) -> Output {
    let mut all = vec!["backfill", pipeline, "--json"];
    all.extend_from_slice(args);
    idemload_with(env, &all, vars)
}

fn backfill(env: &Env, pipeline: &str, args: &[&str]) -> Output {
    backfill_with(env, pipeline, args, &[])
}

/// The `--json` object of a backfill: every promised field, and the
/// accounting identity on its sums.
#[track_caller]
fn summary(out: &Output) -> Report {
    let raw = out.json();
    for field in SUMMARY_FIELDS {
        assert!(
            raw.get(*field).is_some(),
            "backfill --json lacks {field:?}: {raw}\n--- stderr ---\n{}",
            out.stderr
        );
    }
    let report = Report::from_value(raw);
    assert_balanced(&report);
    report
}

/// A count of a backfill summary or a status object.
#[track_caller]
fn count(raw: &Value, field: &str) -> u64 {
    raw[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field:?} is not a count in {raw}"))
}

/// `(windows, windows_done, windows_loaded, windows_skipped, windows_failed)`.
#[track_caller]
fn windows(r: &Report) -> (u64, u64, u64, u64, u64) {
    (
        count(&r.raw, "windows"),
        count(&r.raw, "windows_done"),
        count(&r.raw, "windows_loaded"),
        count(&r.raw, "windows_skipped"),
        count(&r.raw, "windows_failed"),
    )
}

/// `idemload backfill PIPELINE --status --json ARGS...`: exit code and object.
fn status_with(env: &Env, pipeline: &str, args: &[&str], vars: &[(&str, &str)]) -> (i32, Value) {
    let mut all = vec!["backfill", pipeline, "--status", "--json"];
    all.extend_from_slice(args);
    let out = idemload_with(env, &all, vars);
    let json = out.json();
    for field in [
        "pipeline", "pending", "running", "done", "failed", "windows",
    ] {
        assert!(
            json.get(field).is_some(),
            "--status --json lacks {field:?}: {json}"
        );
    }
    (out.code, json)
}

/// `(pending, running, done, failed)` of a status object.
#[track_caller]
fn by_status(st: &Value) -> (u64, u64, u64, u64) {
    (
        count(st, "pending"),
        count(st, "running"),
        count(st, "done"),
        count(st, "failed"),
    )
}

/// A window bound as text (an integer cursor's bound may come as a number).
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The `(start, end)` of every window of a status object, sorted.
fn bounds(st: &Value) -> Vec<(String, String)> {
    let mut b: Vec<(String, String)> = st["windows"]
        .as_array()
        .expect("windows is a list")
        .iter()
        .map(|w| (text(&w["start"]), text(&w["end"])))
        .collect();
    b.sort();
    b
}

/// Rows of `_idemload_windows` of a pipeline with this status, read from
/// the table itself (0 when it does not exist).
fn windows_in(env: &Env, pipeline: &str, status: &str) -> i64 {
    if !env
        .backend
        .tables()
        .iter()
        .any(|t| t == "_idemload_windows")
    {
        return 0;
    }
    env.backend
        .scalar_i64(&format!(
            "SELECT count(*) FROM _idemload_windows WHERE pipeline = '{pipeline}' AND status = '{status}'"
        ))
        .unwrap_or(0)
}

fn all_windows(env: &Env, pipeline: &str) -> i64 {
    if !env
        .backend
        .tables()
        .iter()
        .any(|t| t == "_idemload_windows")
    {
        return 0;
    }
    env.backend
        .scalar_i64(&format!(
            "SELECT count(*) FROM _idemload_windows WHERE pipeline = '{pipeline}'"
        ))
        .unwrap_or(0)
}

/// The runs of `history --json`, each finished run's stats balanced.
fn history_with(env: &Env, pipeline: &str, vars: &[(&str, &str)]) -> Vec<Value> {
    let out = idemload_with(
        env,
        &["history", pipeline, "--json", "--limit", "1000"],
        vars,
    );
    out.code(0);
    let runs = out.json()["runs"].as_array().cloned().unwrap_or_default();
    for run in &runs {
        if run["status"] != "running" && !run["stats"].is_null() {
            assert_balanced(&Report::from_value(run["stats"].clone()));
        }
    }
    runs
}

/// The run ids of the windows of a status object, one per window.
fn window_run_ids(st: &Value) -> BTreeSet<String> {
    st["windows"]
        .as_array()
        .expect("windows")
        .iter()
        .map(|w| {
            w["run_id"]
                .as_str()
                .unwrap_or_else(|| panic!("a window without its run id: {w}"))
                .to_string()
        })
        .collect()
}

fn succeeded_run_ids(runs: &[Value]) -> BTreeSet<String> {
    runs.iter()
        .filter(|r| r["status"] == "succeeded")
        .map(|r| r["run_id"].as_str().expect("run_id").to_string())
        .collect()
}

// ---- data -------------------------------------------------------------------

const DAY: i64 = 86_400_000;
const HOUR: i64 = 3_600_000;

fn ms(text: &str) -> i64 {
    DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("{text}: {e}"))
        .timestamp_millis()
}

fn rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .expect("instant")
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// `per_window` events in each of `windows` windows of `width` ms from
/// `start`, spread evenly so that the first sits exactly on the window's
/// start; ids `window * 1000 + k`.
fn events(start: &str, windows: i64, width: i64, per_window: i64) -> Vec<Value> {
    let start = ms(start);
    let mut out = Vec::new();
    for w in 0..windows {
        for k in 0..per_window {
            let at = start + w * width + k * (width / per_window);
            out.push(json!({"id": w * 1000 + k, "at": rfc3339(at), "v": format!("w{w}k{k}")}));
        }
    }
    out
}

/// Day `day` of January 2024 as `YYYY-MM-DD`.
fn jan(day: i64) -> String {
    format!("2024-01-{day:02}")
}

/// The `(start, end)` of daily windows from January `first` to `last`.
fn days(first: i64, last: i64) -> Vec<(String, String)> {
    (first..=last).map(|d| (jan(d), jan(d + 1))).collect()
}

const LOAD: &str = "key = \"id\"\ncursor = \"at\"";

// ---- a windowed API ------------------------------------------------------------

/// One request the API answered: who asked (`X-Worker`), for which window
/// (ms since the epoch), which page, and when the answer started and ended
/// (since the test began).
#[derive(Debug, Clone)]
struct Asked {
    worker: String,
    window: Option<(i64, i64)>,
    page: u64,
    started: Duration,
    finished: Duration,
}

/// An events API: `GET /v1/events?since=S&until=U&page=N&per_page=M`
/// answers `{"items": [...], "total": T}` with the events whose `at` lies in
/// `[since, until)` (every event without them), after `latency` per page.
/// A window whose start is in `broken` answers 500.
struct EventsApi {
    server: HttpServer,
    log: Arc<Mutex<Vec<Asked>>>,
    broken: Arc<Mutex<BTreeSet<i64>>>,
}

impl EventsApi {
    fn asked(&self) -> Vec<Asked> {
        self.log.lock().unwrap().clone()
    }

    fn forget(&self) {
        self.log.lock().unwrap().clear();
    }
}

/// A bound as the API takes it: RFC 3339, or a date (its midnight UTC).
fn bound(text: &str) -> Option<i64> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.timestamp_millis());
    }
    let date = NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()?;
    Some(date.and_hms_opt(0, 0, 0)?.and_utc().timestamp_millis())
}

fn events_api(events: Vec<Value>, latency: Duration, t0: Instant) -> EventsApi {
    let events: Vec<(i64, Value)> = events
        .into_iter()
        .map(|e| (ms(e["at"].as_str().expect("at")), e))
        .collect();
    let log = Arc::new(Mutex::new(Vec::new()));
    let broken = Arc::new(Mutex::new(BTreeSet::new()));
    let (log2, broken2) = (log.clone(), broken.clone());
    let server = http_server(move |req| {
        let started = t0.elapsed();
        let since = req.query.get("since").map(|s| (s.clone(), bound(s)));
        let until = req.query.get("until").map(|s| (s.clone(), bound(s)));
        let window = match (since, until) {
            (None, None) => None,
            (Some((_, Some(s))), Some((_, Some(u)))) => Some((s, u)),
            (s, u) => {
                // An unreplaced placeholder, or a bound the API cannot read.
                return HttpResponse {
                    status: 400,
                    headers: vec![],
                    body: json!({"error": format!("bad window: since {s:?}, until {u:?}")})
                        .to_string(),
                };
            }
        };
        let page: usize = req
            .query
            .get("page")
            .and_then(|p| p.parse().ok())
            .unwrap_or(1);
        let size: usize = req
            .query
            .get("per_page")
            .and_then(|p| p.parse().ok())
            .unwrap_or(10);
        let selected: Vec<&Value> = events
            .iter()
            .filter(|(at, _)| window.is_none_or(|(s, u)| s <= *at && *at < u))
            .map(|(_, e)| e)
            .collect();
        let items: Vec<&Value> = selected
            .iter()
            .skip(page.saturating_sub(1) * size)
            .take(size)
            .copied()
            .collect();
        std::thread::sleep(latency);
        let fail = window.is_some_and(|(s, _)| broken2.lock().unwrap().contains(&s));
        log2.lock().unwrap().push(Asked {
            worker: req.headers.get("x-worker").cloned().unwrap_or_default(),
            window,
            page: page as u64,
            started,
            finished: t0.elapsed(),
        });
        if fail {
            return HttpResponse {
                status: 500,
                headers: vec![],
                body: "{\"error\":\"internal\"}".into(),
            };
        }
        HttpResponse::json(json!({"items": items, "total": selected.len()}))
    });
    EventsApi {
        server,
        log,
        broken,
    }
}

/// Writes `NAME.toml`: the events API into table NAME. `windowed` asks for
/// `{window_start}`/`{window_end}` and names the worker (`${WORKER}`) in a
/// header; `source` and `load` are added to `[source]` and `[load]`.
fn http_pipeline(
    env: &Env,
    name: &str,
    base: &str,
    windowed: bool,
    source: &str,
    load: &str,
) -> String {
    let window = if windowed {
        "params = { since = \"{window_start}\", until = \"{window_end}\" }\nheaders = { X-Worker = \"${WORKER}\" }\n"
    } else {
        ""
    };
    let file = format!("{name}.toml");
    env.write(
        &file,
        format!(
            "name = \"{name}\"\n\n[source]\ntype = \"http\"\nurl = \"{base}/v1/events\"\nrecords = \"items\"\n{window}\n[source.pagination]\ntype = \"page\"\nsize = 10\ntotal_path = \"total\"\n{source}\n\n[destination]\nurl = \"{}\"\ntable = \"{name}\"\n\n[load]\n{LOAD}\n{load}\n",
            env.url()
        ),
    );
    file
}

/// Per window, per worker: the span from its first request's start to its
/// last request's end.
type Spans = BTreeMap<(i64, i64), BTreeMap<String, (Duration, Duration)>>;

fn spans(asked: &[Asked]) -> Spans {
    let mut spans = Spans::new();
    for a in asked {
        let Some(window) = a.window else { continue };
        spans
            .entry(window)
            .or_default()
            .entry(a.worker.clone())
            .and_modify(|(s, f)| {
                *s = (*s).min(a.started);
                *f = (*f).max(a.finished);
            })
            .or_insert((a.started, a.finished));
    }
    spans
}

/// How many first pages each window was asked for.
fn first_pages(asked: &[Asked]) -> BTreeMap<(i64, i64), usize> {
    let mut n = BTreeMap::new();
    for a in asked.iter().filter(|a| a.page == 1) {
        if let Some(w) = a.window {
            *n.entry(w).or_insert(0) += 1;
        }
    }
    n
}

/// The most windows being read at one moment.
fn most_at_once(spans: &Spans) -> usize {
    let mut edges: Vec<(Duration, i32)> = Vec::new();
    for by in spans.values() {
        for (s, f) in by.values() {
            edges.push((*s, 1));
            edges.push((*f, -1));
        }
    }
    // An end sorts before a start at the same instant.
    edges.sort();
    let (mut now, mut most) = (0, 0);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    most as usize
}

fn show(w: (i64, i64)) -> String {
    format!("[{}, {})", rfc3339(w.0), rfc3339(w.1))
}

// ---- 1. a file source, day by day ----------------------------------------------

idemtest!(a_daily_backfill_loads_what_a_full_load_loads_once, |env| {
    let data = events("2024-01-01T00:00:00Z", 10, DAY, 12);
    env.write_jsonl("data/events.jsonl", &data);
    let p = env.pipeline("events", "data/events.jsonl", LOAD);
    // The incremental runs' checkpoint: a backfill leaves it where it is.
    env.idemload(&["state", &p, "--set", "2024-01-05T00:00:00Z"])
        .code(0);
    let checkpoint = env.backend.checkpoint("events");
    assert!(checkpoint.is_some(), "state --set wrote no checkpoint");
    let range = [
        "--from",
        "2024-01-01",
        "--to",
        "2024-01-11",
        "--window",
        "1d",
    ];

    let out = backfill(env, &p, &range);
    out.code(0);
    let first = summary(&out);
    assert_eq!(first.status, "succeeded", "{}", first.raw);
    assert_eq!(windows(&first), (10, 10, 10, 0, 0), "{}", first.raw);
    assert_eq!(count(&first.raw, "workers"), 1, "{}", first.raw);
    // Each window reads the file and keeps its day: every record is
    // inserted by one window and skipped by the nine others.
    assert_eq!(
        (first.read, first.inserted, first.skipped),
        (1_200, 120, 1_080),
        "{}",
        first.raw
    );
    assert_eq!(first.changes(), (120, 0, 0, 0), "{}", first.raw);
    assert_eq!((first.duplicates, first.rejected), (0, 0), "{}", first.raw);

    // The table a plain full load of the same file gives.
    let reference = env.pipeline("reference", "data/events.jsonl", LOAD);
    env.run(&reference, &["--full-refresh"]).code(0);
    assert_rows(&env.rows("events"), &env.rows("reference"));
    assert_rows(&env.rows("events"), &data);

    assert_eq!(all_windows(env, "events"), 10);
    assert_eq!(windows_in(env, "events", "done"), 10);
    assert_eq!(
        env.backend.checkpoint("events"),
        checkpoint,
        "a backfill moved the pipeline's checkpoint"
    );

    // One run per window, each with its day.
    let runs = env.history(&p);
    assert_eq!(runs.len(), 10, "{runs:?}");
    for run in &runs {
        assert_eq!(run["status"], "succeeded", "{run}");
        let stats = Report::from_value(run["stats"].clone());
        assert_eq!(
            (stats.read, stats.inserted, stats.skipped),
            (120, 12, 108),
            "{run}"
        );
    }

    let (code, st) = status_with(env, &p, &[], &[]);
    assert_eq!(code, 0, "{st}");
    assert_eq!(st["pipeline"], "events");
    assert_eq!(by_status(&st), (0, 0, 10, 0), "{st}");
    // Date-form --from and whole days: the bounds are dates.
    assert_eq!(bounds(&st), days(1, 10), "{st}");
    for w in st["windows"].as_array().unwrap() {
        assert_eq!(w["status"], "done", "{w}");
        assert_eq!(w["stats"]["inserted"], 12, "{w}");
        assert!(w["finished_at"].is_string(), "{w}");
    }
    assert_eq!(window_run_ids(&st), succeeded_run_ids(&runs));
    // --status over part of the range counts that part.
    let (code, part) = status_with(
        env,
        &p,
        &[
            "--from",
            "2024-01-03",
            "--to",
            "2024-01-05",
            "--window",
            "1d",
        ],
        &[],
    );
    assert_eq!(code, 0, "{part}");
    assert_eq!(by_status(&part), (0, 0, 2, 0), "{part}");
    assert_eq!(bounds(&part), days(3, 4), "{part}");

    // Again: every window is done, nothing is read, no run is recorded.
    let out = backfill(env, &p, &range);
    out.code(0);
    let again = summary(&out);
    assert_eq!(again.status, "succeeded", "{}", again.raw);
    assert_eq!(windows(&again), (10, 10, 0, 10, 0), "{}", again.raw);
    assert_eq!((again.read, again.skipped), (0, 0), "{}", again.raw);
    assert_eq!(again.changes(), (0, 0, 0, 0));
    assert_eq!(env.history(&p).len(), 10, "a skipped window recorded a run");

    // --redo reads every window again and changes nothing.
    let out = backfill(env, &p, &[&range[..], &["--redo"][..]].concat());
    out.code(0);
    let redo = summary(&out);
    assert_eq!(windows(&redo), (10, 10, 10, 0, 0), "{}", redo.raw);
    assert_eq!((redo.read, redo.skipped), (1_200, 1_080), "{}", redo.raw);
    assert_eq!(redo.changes(), (0, 0, 120, 0), "{}", redo.raw);
    assert_eq!(env.history(&p).len(), 20);
    assert_rows(&env.rows("events"), &data);
    assert_eq!(windows_in(env, "events", "done"), 10);
    assert_eq!(env.backend.checkpoint("events"), checkpoint);
});

// ---- 2. four processes killed and restarted, one API --------------------------

/// 60 windows of 6 hours over 15 days, 25 events each (three pages).
const KILL_FROM: &str = "2024-01-01T00:00:00Z";
const KILL_TO: &str = "2024-01-16T00:00:00Z";
const KILL_WINDOWS: i64 = 60;
const KILL_PER_WINDOW: i64 = 25;
const KILLS_PER_WORKER: u32 = 3;

/// One `idemload backfill` process of a worker slot; `name` is
/// `worker.life`, sent as `X-Worker`.
struct Life {
    worker: usize,
    life: usize,
    name: String,
    child: Child,
    kill_at: Option<Instant>,
    kills_left: u32,
}

fn start_life(
    env: &Env,
    pipeline: &str,
    args: &[&str],
    worker: usize,
    life: usize,
    kills_left: u32,
    rng: &mut rand::rngs::StdRng,
) -> Life {
    let name = format!("{worker}.{life}");
    let mut all = vec!["backfill", pipeline, "--json"];
    all.extend_from_slice(args);
    let out = File::create(env.path(&format!("worker-{name}.out"))).expect("stdout file");
    let err = File::create(env.path(&format!("worker-{name}.err"))).expect("stderr file");
    let child = env
        .command(&all)
        .env("WORKER", &name)
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .expect("spawn idemload backfill");
    let kill_at =
        (kills_left > 0).then(|| Instant::now() + Duration::from_millis(rng.gen_range(50..900)));
    Life {
        worker,
        life,
        name,
        child,
        kill_at,
        kills_left,
    }
}

/// The processes still running; killed if the test fails before they end.
struct Lives(Vec<Life>);

impl Drop for Lives {
    fn drop(&mut self) {
        for life in &mut self.0 {
            let _ = life.child.kill();
            let _ = life.child.wait();
        }
    }
}

fn four_workers_killed_and_restarted_leave_one_clean_load(env: &Env) {
    let t0 = Instant::now();
    let data = events(KILL_FROM, KILL_WINDOWS, 6 * HOUR, KILL_PER_WINDOW);
    let api = events_api(data.clone(), Duration::from_millis(10), t0);
    let p = http_pipeline(
        env,
        "events",
        &api.server.base,
        true,
        "",
        "lock_lease = \"3s\"",
    );
    let reference = http_pipeline(env, "reference", &api.server.base, false, "", "");
    env.run(&reference, &[]).code(0);
    assert_eq!(env.backend.count("reference"), data.len() as u64);
    api.forget();

    let args = ["--from", KILL_FROM, "--to", KILL_TO, "--window", "6h"];
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed("backfill_kill"));
    let mut lives = Lives(
        (0..4)
            .map(|w| start_life(env, &p, &args, w, 0, KILLS_PER_WORKER, &mut rng))
            .collect(),
    );
    // Process name -> when it was sent SIGKILL.
    let mut killed: BTreeMap<String, Duration> = BTreeMap::new();
    let mut mid_range = 0;
    let mut summaries = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(45);
    while !lives.0.is_empty() {
        assert!(
            Instant::now() < deadline,
            "backfill workers still running after 45 s: {:?}",
            lives.0.iter().map(|l| &l.name).collect::<Vec<_>>()
        );
        let mut i = 0;
        while i < lives.0.len() {
            let life = &mut lives.0[i];
            if let Some(status) = life.child.try_wait().expect("try_wait") {
                let read = |ext: &str| {
                    std::fs::read_to_string(env.path(&format!("worker-{}.{ext}", life.name)))
                        .unwrap_or_default()
                };
                let out = Output {
                    code: status.code().unwrap_or(-1),
                    stdout: read("out"),
                    stderr: read("err"),
                };
                assert_eq!(
                    out.code, 0,
                    "worker {} exited on its own with {status:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    life.name, out.stdout, out.stderr
                );
                summaries.push((life.name.clone(), summary(&out)));
                lives.0.remove(i);
                continue;
            }
            if life.kill_at.is_some_and(|at| Instant::now() >= at) {
                life.child.kill().expect("SIGKILL");
                killed.insert(life.name.clone(), t0.elapsed());
                life.child.wait().expect("reap");
                if windows_in(env, "events", "done") < KILL_WINDOWS {
                    mid_range += 1;
                }
                let (worker, next, left) = (life.worker, life.life + 1, life.kills_left - 1);
                *life = start_life(env, &p, &args, worker, next, left, &mut rng);
            }
            i += 1;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!(
        "{} kills ({mid_range} before the range was done) in {:?}",
        killed.len(),
        t0.elapsed()
    );
    assert!(
        mid_range > 0,
        "no kill landed before the range was done: the test proved nothing"
    );

    // Every process that ended on its own saw the whole range done.
    for (name, s) in &summaries {
        assert_eq!(s.status, "succeeded", "worker {name}: {}", s.raw);
        let (total, done, ..) = windows(s);
        assert_eq!((total, done), (60, 60), "worker {name}: {}", s.raw);
    }
    assert_eq!(windows_in(env, "events", "done"), KILL_WINDOWS);
    assert_eq!(all_windows(env, "events"), KILL_WINDOWS);
    assert_eq!(env.backend.doubled("events", &["id"]), 0);
    assert_rows(&env.rows("events"), &env.rows("reference"));

    // The API's log: each window asked for, never by two living workers at
    // once, and read again only after its earlier readers were killed.
    let asked = api.asked();
    assert!(
        asked
            .iter()
            .all(|a| a.window.is_some() && a.worker.contains('.')),
        "a request without a window or a worker: {:?}",
        asked
            .iter()
            .find(|a| a.window.is_none() || !a.worker.contains('.'))
    );
    let spans = spans(&asked);
    assert_eq!(spans.len(), KILL_WINDOWS as usize, "windows asked for");
    // A kill inside a window leaves it to be read again by another worker.
    let reread = spans.values().filter(|by| by.len() > 1).count();
    eprintln!("{reread} windows read again after their reader was killed");
    assert!(
        reread > 0,
        "no kill landed inside a window: taking a dead worker's window was not tried"
    );
    let at = |d: &Duration| format!("{} ms", d.as_millis());
    for (window, by) in &spans {
        let mut readers: Vec<(&String, &(Duration, Duration))> = by.iter().collect();
        readers.sort_by_key(|(_, (s, _))| *s);
        for (i, (a, (a_start, a_end))) in readers.iter().enumerate() {
            for (b, (b_start, _)) in &readers[i + 1..] {
                if b_start < a_end {
                    let excused = killed.get(*a).is_some_and(|k| k <= b_start);
                    assert!(
                        excused,
                        "window {}: worker {a} read it from {} to {} and worker {b} from {}; {a} was {}",
                        show(*window),
                        at(a_start),
                        at(a_end),
                        at(b_start),
                        killed
                            .get(*a)
                            .map_or("never killed".to_string(), |k| format!("killed at {}", at(k)))
                    );
                }
            }
        }
        let (last, _) = readers.last().expect("a reader");
        for (i, (reader, (start, _))) in readers[..readers.len() - 1].iter().enumerate() {
            let Some(death) = killed.get(*reader) else {
                panic!(
                    "window {} was read by worker {reader} (from {}, never killed) and again by {last}",
                    show(*window),
                    at(start)
                );
            };
            // Same host, dead pid: its window is taken at once, not after
            // the 3 s lease.
            let (next, (next_start, _)) = readers[i + 1];
            assert!(
                next_start.saturating_sub(*death) < Duration::from_secs(3),
                "window {}: worker {reader} was killed at {} and {next} read it only from {}",
                show(*window),
                at(death),
                at(next_start)
            );
        }
    }

    // Exactly one succeeded run per window: the runs the windows name.
    let vars = [("WORKER", "status")];
    let (code, st) = status_with(env, &p, &[], &vars);
    assert_eq!(code, 0, "{st}");
    assert_eq!(by_status(&st), (0, 0, 60, 0), "{st}");
    let runs = history_with(env, &p, &vars);
    let succeeded = succeeded_run_ids(&runs);
    assert_eq!(succeeded.len(), 60, "succeeded runs");
    assert_eq!(window_run_ids(&st), succeeded);
    assert_eq!(env.backend.checkpoint("events"), None);

    // Running the backfill again asks the API nothing.
    let before = api.asked().len();
    let out = backfill_with(env, &p, &args, &[("WORKER", "again")]);
    out.code(0);
    let again = summary(&out);
    assert_eq!(windows(&again), (60, 60, 0, 60, 0), "{}", again.raw);
    assert_eq!(again.read, 0);
    assert_eq!(
        api.asked().len(),
        before,
        "a done window was asked for again"
    );
}

crate::server_test! {
    fn four_workers_killed_and_restarted_leave_one_clean_load_postgres() {
        crate::common::with_backend(
            "backfill_kill",
            BackendKind::Postgres,
            four_workers_killed_and_restarted_leave_one_clean_load,
        );
    }
}

crate::server_test! {
    fn four_workers_killed_and_restarted_leave_one_clean_load_mysql() {
        crate::common::with_backend(
            "backfill_kill",
            BackendKind::Mysql,
            four_workers_killed_and_restarted_leave_one_clean_load,
        );
    }
}

// ---- 3. two processes at once on SQLite --------------------------------------

#[test]
fn two_processes_share_twenty_days_on_sqlite() {
    crate::common::with_backend("backfill_two", BackendKind::Sqlite, |env| {
        let t0 = Instant::now();
        let data = events("2024-01-01T00:00:00Z", 20, DAY, 25);
        let api = events_api(data.clone(), Duration::from_millis(20), t0);
        let p = http_pipeline(env, "events", &api.server.base, true, "", "");
        let reference = http_pipeline(env, "reference", &api.server.base, false, "", "");
        env.run(&reference, &[]).code(0);
        api.forget();

        let args = [
            "backfill",
            p.as_str(),
            "--json",
            "--from",
            "2024-01-01",
            "--to",
            "2024-01-21",
            "--window",
            "1d",
        ];
        let children: Vec<Child> = ["1", "2"]
            .iter()
            .map(|w| {
                env.command(&args)
                    .env("WORKER", w)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("spawn idemload backfill")
            })
            .collect();
        let mut loaded = 0;
        let mut inserted = 0;
        for child in children {
            let out = finished(child.wait_with_output().expect("wait"));
            out.code(0);
            let s = summary(&out);
            let (total, done, mine, skipped, failed) = windows(&s);
            assert_eq!((total, done, failed), (20, 20, 0), "{}", s.raw);
            assert_eq!(mine + skipped, 20, "{}", s.raw);
            assert!(mine > 0, "one process loaded every window: {}", s.raw);
            loaded += mine;
            inserted += s.inserted;
        }
        assert_eq!(loaded, 20, "each window loaded by one process");
        assert_eq!(inserted, data.len() as u64);
        assert_eq!(windows_in(env, "events", "done"), 20);
        assert_eq!(env.backend.doubled("events", &["id"]), 0);
        assert_rows(&env.rows("events"), &env.rows("reference"));

        let asked = api.asked();
        let firsts = first_pages(&asked);
        assert_eq!(firsts.len(), 20);
        assert!(
            firsts.values().all(|n| *n == 1),
            "a window asked for twice: {firsts:?}"
        );
        let workers: BTreeSet<&str> = asked.iter().map(|a| a.worker.as_str()).collect();
        assert_eq!(workers, BTreeSet::from(["1", "2"]));
        let runs = history_with(env, &p, &[("WORKER", "history")]);
        assert_eq!(succeeded_run_ids(&runs).len(), 20);
    });
}

// ---- 4. mode = "window": the window's bounds decide what is deleted ------------

idemtest!(
    a_window_redo_deletes_what_the_source_lost_in_its_bounds,
    |env| {
        // Four events a day over January 1-5, window_field the cursor.
        let data = events("2024-01-01T00:00:00Z", 5, DAY, 4);
        env.write_jsonl("data/events.jsonl", &data);
        let p = env.pipeline(
            "events",
            "data/events.jsonl",
            &format!("{LOAD}\nmode = \"window\"\nwindow_field = \"at\""),
        );
        let out = backfill(
            env,
            &p,
            &[
                "--from",
                "2024-01-01",
                "--to",
                "2024-01-06",
                "--window",
                "1d",
            ],
        );
        out.code(0);
        let first = summary(&out);
        assert_eq!(first.changes(), (20, 0, 0, 0), "{}", first.raw);
        assert_rows(&env.rows("events"), &data);

        // Marks: day 1's row must stay as it is; day 3's must be reloaded.
        let id = |day: i64, k: i64| (day - 1) * 1000 + k;
        env.backend.execute(&format!(
            "UPDATE events SET v = 'marked' WHERE id IN ({}, {})",
            id(1, 0),
            id(3, 0)
        ));
        // The source loses all of day 5 and one event of day 3.
        let lost = [id(3, 2), id(5, 0), id(5, 1), id(5, 2), id(5, 3)];
        let kept: Vec<Value> = data
            .iter()
            .filter(|e| !lost.contains(&e["id"].as_i64().unwrap()))
            .cloned()
            .collect();
        env.write_jsonl("data/events.jsonl", &kept);

        let out = backfill(
            env,
            &p,
            &[
                "--from",
                "2024-01-03",
                "--to",
                "2024-01-06",
                "--window",
                "1d",
                "--redo",
            ],
        );
        out.code(0);
        let redo = summary(&out);
        assert_eq!(windows(&redo), (3, 3, 3, 0, 0), "{}", redo.raw);
        // Three windows read the 15 events left; 7 fall in them.
        assert_eq!((redo.read, redo.skipped), (45, 38), "{}", redo.raw);
        assert_eq!(redo.changes(), (0, 1, 6, 0), "{}", redo.raw);

        let mut expected: Vec<Value> = kept.clone();
        for e in &mut expected {
            if e["id"] == id(1, 0) {
                e["v"] = json!("marked");
            }
        }
        assert_rows(&env.rows("events"), &expected);

        // The window with no event left removed its four rows: its bounds, not
        // its (absent) data, said which.
        let (code, st) = status_with(env, &p, &[], &[]);
        assert_eq!(code, 0, "{st}");
        let removed: BTreeMap<String, u64> = st["windows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| {
                (
                    text(&w["start"]),
                    w["stats"]["removed"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        assert_eq!(
            removed,
            BTreeMap::from([
                (jan(1), 0),
                (jan(2), 0),
                (jan(3), 1),
                (jan(4), 0),
                (jan(5), 4)
            ]),
            "{st}"
        );
    }
);

// ---- 5. a window that fails ----------------------------------------------------

#[test]
fn a_failing_window_fails_alone_and_is_the_only_one_loaded_again() {
    crate::common::with_backend("backfill_fail", BackendKind::Sqlite, |env| {
        let t0 = Instant::now();
        let data = events("2024-01-01T00:00:00Z", 10, DAY, 15);
        let api = events_api(data.clone(), Duration::ZERO, t0);
        let p = http_pipeline(
            env,
            "events",
            &api.server.base,
            true,
            "\n[source.retry]\nattempts = 1",
            "",
        );
        let reference = http_pipeline(env, "reference", &api.server.base, false, "", "");
        env.run(&reference, &[]).code(0);
        api.forget();
        let day4 = ms("2024-01-04T00:00:00Z");
        api.broken.lock().unwrap().insert(day4);
        let vars = [("WORKER", "1")];
        let range = [
            "--from",
            "2024-01-01",
            "--to",
            "2024-01-11",
            "--window",
            "1d",
        ];

        let out = backfill_with(env, &p, &range, &vars);
        out.code(1);
        let failed = summary(&out);
        assert_eq!(failed.status, "failed", "{}", failed.raw);
        assert_eq!(windows(&failed), (10, 9, 9, 0, 1), "{}", failed.raw);
        assert_eq!(failed.inserted, 9 * 15, "{}", failed.raw);
        assert_eq!(windows_in(env, "events", "failed"), 1);
        assert_eq!(windows_in(env, "events", "done"), 9);
        assert_eq!(env.backend.count("events"), 9 * 15);

        let (code, st) = status_with(env, &p, &[], &vars);
        assert_eq!(code, 1, "{st}");
        assert_eq!(by_status(&st), (0, 0, 9, 1), "{st}");
        let bad: Vec<&Value> = st["windows"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["status"] == "failed")
            .collect();
        assert_eq!(bad.len(), 1, "{st}");
        assert_eq!(text(&bad[0]["start"]), jan(4), "{st}");
        assert!(
            bad[0]["error"].as_str().is_some_and(|e| e.contains("500")),
            "the failed window says why: {}",
            bad[0]
        );
        let runs = history_with(env, &p, &vars);
        assert_eq!(runs.len(), 10, "{runs:?}");
        assert_eq!(runs.iter().filter(|r| r["status"] == "failed").count(), 1);

        // The API is fixed: only the failed window is asked for again.
        api.broken.lock().unwrap().clear();
        api.forget();
        let out = backfill_with(env, &p, &range, &vars);
        out.code(0);
        let fixed = summary(&out);
        assert_eq!(fixed.status, "succeeded", "{}", fixed.raw);
        assert_eq!(windows(&fixed), (10, 10, 1, 9, 0), "{}", fixed.raw);
        assert_eq!((fixed.read, fixed.inserted), (15, 15), "{}", fixed.raw);
        let asked = api.asked();
        assert!(!asked.is_empty());
        assert!(
            asked.iter().all(|a| a.window == Some((day4, day4 + DAY))),
            "asked for another window than the failed one: {:?}",
            asked.iter().map(|a| a.window.map(show)).collect::<Vec<_>>()
        );
        assert_rows(&env.rows("events"), &env.rows("reference"));
        let (code, st) = status_with(env, &p, &[], &vars);
        assert_eq!(code, 0, "{st}");
        assert_eq!(by_status(&st), (0, 0, 10, 0), "{st}");
    });
}

// ---- 6. what a backfill refuses ------------------------------------------------

#[test]
fn a_backfill_it_cannot_do_exits_2_and_says_what_to_change() {
    crate::common::with_backend("backfill_config", BackendKind::Sqlite, |env| {
        env.write_jsonl(
            "data/events.jsonl",
            &events("2024-01-01T00:00:00Z", 2, DAY, 3),
        );
        let range = ["--from", "2024-01-01", "--to", "2024-01-03"];
        let day = ["--window", "1d"];
        let cases: [(&str, String, Vec<&str>, &[&str]); 5] = [
            ("no_window", LOAD.to_string(), range.to_vec(), &["--window"]),
            (
                "replace",
                format!("{LOAD}\nmode = \"replace\""),
                [&range[..], &day[..]].concat(),
                &["replace"],
            ),
            (
                "no_cursor",
                "key = \"id\"".to_string(),
                [&range[..], &day[..]].concat(),
                &["cursor"],
            ),
            (
                "backwards",
                LOAD.to_string(),
                vec![
                    "--from",
                    "2024-01-03",
                    "--to",
                    "2024-01-01",
                    "--window",
                    "1d",
                ],
                &["--from", "--to"],
            ),
            (
                "empty",
                LOAD.to_string(),
                vec![
                    "--from",
                    "2024-01-02",
                    "--to",
                    "2024-01-02",
                    "--window",
                    "1d",
                ],
                &["--from", "--to"],
            ),
        ];
        for (name, load, args, says) in &cases {
            let p = env.pipeline(name, "data/events.jsonl", load);
            let out = backfill(env, &p, args);
            assert_eq!(
                out.code, 2,
                "{name}: exit code\n--- stdout ---\n{}\n--- stderr ---\n{}",
                out.stdout, out.stderr
            );
            for word in *says {
                assert!(
                    out.stderr.contains(word),
                    "{name}: the message does not name {word:?}:\n{}",
                    out.stderr
                );
            }
            assert_eq!(env.backend.count(name), 0, "{name}: rows were loaded");
            assert_eq!(all_windows(env, name), 0, "{name}: windows were written");
        }

        // `[load] window` is the default of --window.
        let p = env.pipeline(
            "default_window",
            "data/events.jsonl",
            &format!("{LOAD}\nwindow = \"1d\""),
        );
        let out = backfill(env, &p, &range);
        out.code(0);
        let s = summary(&out);
        assert_eq!(windows(&s), (2, 2, 2, 0, 0), "{}", s.raw);
        assert_eq!(s.inserted, 6, "{}", s.raw);
    });
}

// ---- 7. --workers in one process -----------------------------------------------

crate::server_test! {
    fn four_claimers_in_one_process_load_each_window_once_postgres() {
        crate::common::with_backend("backfill_workers", BackendKind::Postgres, |env| {
            let t0 = Instant::now();
            let data = events("2024-01-01T00:00:00Z", 30, 6 * HOUR, 25);
            let api = events_api(data.clone(), Duration::from_millis(20), t0);
            let p = http_pipeline(env, "events", &api.server.base, true, "", "");
            let reference = http_pipeline(env, "reference", &api.server.base, false, "", "");
            env.run(&reference, &[]).code(0);
            api.forget();

            let out = backfill_with(
                env,
                &p,
                &[
                    "--from",
                    "2024-01-01T00:00:00Z",
                    "--to",
                    "2024-01-08T12:00:00Z",
                    "--window",
                    "6h",
                    "--workers",
                    "4",
                ],
                &[("WORKER", "solo")],
            );
            out.code(0);
            let s = summary(&out);
            assert_eq!(s.status, "succeeded", "{}", s.raw);
            assert_eq!(count(&s.raw, "workers"), 4, "{}", s.raw);
            assert_eq!(windows(&s), (30, 30, 30, 0, 0), "{}", s.raw);
            assert_eq!(
                (s.read, s.inserted, s.skipped),
                (750, 750, 0),
                "the API filters: only each window's events are read: {}",
                s.raw
            );
            assert_eq!(windows_in(env, "events", "done"), 30);
            assert_eq!(env.backend.doubled("events", &["id"]), 0);
            assert_rows(&env.rows("events"), &env.rows("reference"));

            let asked = api.asked();
            let firsts = first_pages(&asked);
            assert_eq!(firsts.len(), 30);
            assert!(
                firsts.values().all(|n| *n == 1),
                "a window asked for twice: {firsts:?}"
            );
            // RFC 3339 --from: the bounds are instants, 6 hours apart.
            assert!(firsts
                .keys()
                .all(|(s, e)| e - s == 6 * HOUR && (s - ms("2024-01-01T00:00:00Z")) % (6 * HOUR) == 0));
            let most = most_at_once(&spans(&asked));
            assert!(
                most >= 2,
                "--workers 4 never read two windows at once (at most {most})"
            );
            let runs = history_with(env, &p, &[("WORKER", "history")]);
            assert_eq!(succeeded_run_ids(&runs).len(), 30);
            assert_eq!(env.backend.checkpoint("events"), None);
        });
    }
}

// ---- integer cursors and SQL sources ---------------------------------------------

#[test]
fn integer_windows_are_pushed_into_the_sql_query() {
    crate::common::with_backend("backfill_sql", BackendKind::Sqlite, |env| {
        let source = env.path("source.db");
        let conn = rusqlite::Connection::open(&source).expect("source db");
        conn.execute_batch("CREATE TABLE items (id INTEGER PRIMARY KEY, seq INTEGER, name TEXT)")
            .expect("create");
        for seq in 0..110 {
            conn.execute(
                "INSERT INTO items (id, seq, name) VALUES (?1, ?2, ?3)",
                rusqlite::params![seq + 1, seq, format!("n{seq}")],
            )
            .expect("insert");
        }
        drop(conn);
        env.write(
            "items.toml",
            format!(
                "name = \"items\"\n\n[source]\ntype = \"sql\"\nurl = \"sqlite://{}\"\ntable = \"items\"\n\n[destination]\nurl = \"{}\"\ntable = \"items\"\n\n[load]\nkey = \"id\"\ncursor = \"seq\"\n",
                source.display(),
                env.url()
            ),
        );
        let out = backfill(
            env,
            "items.toml",
            &["--from", "0", "--to", "100", "--window", "25"],
        );
        out.code(0);
        let s = summary(&out);
        assert_eq!(windows(&s), (4, 4, 4, 0, 0), "{}", s.raw);
        // Pushed into WHERE: no row outside a window leaves the source.
        assert_eq!((s.read, s.inserted, s.skipped), (100, 100, 0), "{}", s.raw);
        let expected: Vec<Value> = (0..100)
            .map(|seq| json!({"id": seq + 1, "seq": seq, "name": format!("n{seq}")}))
            .collect();
        assert_rows(&env.rows("items"), &expected);
        let (code, st) = status_with(env, "items.toml", &[], &[]);
        assert_eq!(code, 0, "{st}");
        let mut got = bounds(&st);
        got.sort_by_key(|(s, _)| s.parse::<i64>().unwrap_or(i64::MAX));
        assert_eq!(
            got,
            [("0", "25"), ("25", "50"), ("50", "75"), ("75", "100")]
                .map(|(s, e)| (s.to_string(), e.to_string()))
                .to_vec(),
            "{st}"
        );
    });
}

// ---- a stop asked for by SIGTERM ----------------------------------------------

/// SIGTERM stops a backfill after the batch being written: the done
/// windows stay done, the window being loaded goes back to pending (no
/// window is left `running` to wait out its lease), the process exits 143,
/// and running again loads exactly the rest.
#[test]
fn sigterm_releases_the_window_being_loaded_and_a_rerun_finishes() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    crate::common::with_backend("backfill_term", BackendKind::Sqlite, |env| {
        let t0 = Instant::now();
        let data = events("2024-01-01T00:00:00Z", 20, DAY, 25);
        let api = events_api(data.clone(), Duration::from_millis(30), t0);
        let p = http_pipeline(env, "events", &api.server.base, true, "", "");
        let reference = http_pipeline(env, "reference", &api.server.base, false, "", "");
        env.run(&reference, &[]).code(0);
        api.forget();
        let args = [
            "backfill",
            p.as_str(),
            "--json",
            "--from",
            "2024-01-01",
            "--to",
            "2024-01-21",
            "--window",
            "1d",
        ];
        let child = env
            .command(&args)
            .env("WORKER", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn idemload backfill");
        assert!(
            crate::common::wait_until(Duration::from_secs(20), || windows_in(
                env, "events", "done"
            ) >= 3),
            "three windows were not done within 20 s"
        );
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
        let out = finished(child.wait_with_output().expect("wait"));
        assert_eq!(out.code, 143, "{}\n{}", out.stdout, out.stderr);
        let stopped = summary(&out);
        assert_eq!(stopped.status, "interrupted", "{}", stopped.raw);
        let done = windows_in(env, "events", "done");
        assert!((3..20).contains(&done), "done after the stop: {done}");
        assert_eq!(
            windows_in(env, "events", "running"),
            0,
            "a window was left running"
        );
        assert_eq!(windows_in(env, "events", "pending"), 20 - done);
        assert_eq!(env.backend.checkpoint("events"), None);

        let again = backfill_with(env, &p, &args[3..], &[("WORKER", "2")]);
        again.code(0);
        let s = summary(&again);
        let (total, all_done, loaded, skipped, failed) = windows(&s);
        assert_eq!((total, all_done, failed), (20, 20, 0), "{}", s.raw);
        assert_eq!(
            (loaded, skipped),
            ((20 - done) as u64, done as u64),
            "{}",
            s.raw
        );
        assert_eq!(env.backend.doubled("events", &["id"]), 0);
        assert_rows(&env.rows("events"), &env.rows("reference"));
    });
}
