//! Object storage, Parquet, compressed files: `.gz`/`.zst` files stream
//! into the same readers as plain ones; `s3://` globs list and stream from
//! a real S3 protocol server (`IDEMLOAD_TEST_S3`, e.g. `moto_server`);
//! Parquet written by pyarrow maps every logical type.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::common::{assert_rows, with_backend, BackendKind, Env, Output};

fn gzip(text: &str) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(text.as_bytes()).unwrap();
    e.finish().unwrap()
}

fn zstd(text: &str) -> Vec<u8> {
    zstd::encode_all(text.as_bytes(), 3).unwrap()
}

idemtest!(
    gzip_and_zstd_files_load_and_a_rerun_changes_nothing,
    |env| {
        env.write(
            "a.jsonl.gz",
            gzip("{\"id\":1,\"name\":\"a\"}\n{\"id\":2,\"name\":\"b\"}\nnot json\n"),
        );
        env.write("b.csv.zst", zstd("id,name\n3,c\n4,d\n"));
        env.write("c.json.gz", gzip("[{\"id\":5,\"name\":\"e\"}]"));
        env.write("d.ndjson.zst", zstd("{\"id\":6,\"name\":\"f\"}\n"));
        let files = ["a.jsonl.gz", "b.csv.zst", "c.json.gz", "d.ndjson.zst"];
        let first = env.load("t", &files, &[]).code(4).report();
        assert_eq!(
            (first.read, first.inserted, first.rejected),
            (7, 6, 1),
            "{}",
            first.raw
        );
        let expected: Vec<Value> = (1..=6)
            .map(|i| json!({"id": i, "name": ((b'a' + i as u8 - 1) as char).to_string()}))
            .collect();
        assert_rows(&env.rows("t"), &expected);
        // The reject names the decompressed line.
        let rejects = env.backend.raw_rows("_idemload_rejects");
        assert_eq!(rejects[0]["source_ref"], "a.jsonl.gz:3", "{rejects:?}");

        let again = env.load("t", &files, &[]).code(0).report();
        assert_eq!(
            (again.inserted, again.updated, again.unchanged),
            (0, 0, 6),
            "{}",
            again.raw
        );
        assert_rows(&env.rows("t"), &expected);
    }
);

idemtest!(
    a_compressed_parquet_or_unknown_extension_is_a_configuration_error,
    |env| {
        env.write("a.parquet.gz", gzip("x"));
        env.write("a.txt.gz", gzip("{\"id\":1}\n"));
        let out = env.load("t", &["a.parquet.gz"], &[]);
        out.code(2);
        assert!(
            out.stderr.contains("a.parquet.gz: a Parquet file"),
            "{}",
            out.stderr
        );
        let out = env.load("t", &["a.txt.gz"], &[]);
        out.code(2);
        assert!(
            out.stderr.contains("cannot tell the format"),
            "{}",
            out.stderr
        );
        // `--format` names the format; the extension still says gzip.
        let r = env
            .load("t", &["a.txt.gz"], &["--format", "jsonl"])
            .code(0)
            .report();
        assert_eq!(r.inserted, 1, "{}", r.raw);
    }
);

// ---------------------------------------------------------------- S3

const KEY_ID: &str = "idemloadtestkey";
/// A secret that must appear in no output.
const SECRET: &str = "SECRET-MARKER-7f3e9c1d-never-printed";

/// A bucket of its own on the test S3 server.
struct S3 {
    endpoint: String,
    bucket: String,
    rt: tokio::runtime::Runtime,
    store: Arc<dyn ObjectStore>,
}

/// The test server from `IDEMLOAD_TEST_S3`; unset: skipped loudly (a
/// failure under `IDEMLOAD_REQUIRE_SERVICES=1`).
fn s3(test: &str) -> Option<S3> {
    let Ok(endpoint) = std::env::var("IDEMLOAD_TEST_S3") else {
        if std::env::var("IDEMLOAD_REQUIRE_SERVICES").as_deref() == Ok("1") {
            panic!("{test}: IDEMLOAD_TEST_S3 is not set and IDEMLOAD_REQUIRE_SERVICES=1");
        }
        eprintln!("SKIPPED {test} (set IDEMLOAD_TEST_S3=http://127.0.0.1:PORT, a local S3 server such as moto_server)");
        return None;
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let mut bucket: String = format!("t-{}", test.replace('_', "-"))
        .chars()
        .take(40)
        .collect();
    bucket = format!("{}-{nanos:x}", bucket.trim_end_matches('-'));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let created = rt.block_on(async {
        reqwest::Client::new()
            .put(format!("{endpoint}/{bucket}"))
            .send()
            .await
    });
    let status = created.expect("create bucket").status();
    assert!(status.is_success(), "create bucket {bucket}: {status}");
    let store = AmazonS3Builder::new()
        .with_endpoint(&endpoint)
        .with_allow_http(true)
        .with_bucket_name(&bucket)
        .with_region("us-east-1")
        .with_access_key_id(KEY_ID)
        .with_secret_access_key(SECRET)
        .build()
        .unwrap();
    Some(S3 {
        endpoint,
        bucket,
        rt,
        store: Arc::new(store),
    })
}

impl S3 {
    fn put(&self, key: &str, bytes: impl Into<Vec<u8>>) {
        let bytes: Vec<u8> = bytes.into();
        self.rt
            .block_on(
                self.store
                    .put(&ObjectPath::from(key), PutPayload::from(bytes)),
            )
            .unwrap_or_else(|e| panic!("put {key}: {e}"));
    }

    /// Puts objects eight at a time.
    fn put_many(&self, objects: Vec<(String, Vec<u8>)>) {
        use futures_util::StreamExt;
        let store = self.store.clone();
        self.rt.block_on(async move {
            futures_util::stream::iter(objects)
                .map(|(key, bytes)| {
                    let store = store.clone();
                    async move {
                        store
                            .put(&ObjectPath::from(key.as_str()), PutPayload::from(bytes))
                            .await
                            .unwrap_or_else(|e| panic!("put {key}: {e}"));
                    }
                })
                .buffer_unordered(8)
                .collect::<Vec<()>>()
                .await;
        });
    }

    fn url(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    /// The binary with the test credentials in its environment (none of
    /// the machine's own).
    fn command(&self, env: &Env, args: &[&str]) -> Command {
        let mut cmd = env.command(args);
        for (name, _) in std::env::vars() {
            if name.starts_with("AWS_") {
                cmd.env_remove(name);
            }
        }
        cmd.env("AWS_ACCESS_KEY_ID", KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .env("AWS_REGION", "us-east-1")
            .env("HOME", env.root());
        cmd
    }

    /// `load URLS --endpoint E --into URL --table T --json ARGS...`.
    fn load(&self, env: &Env, table: &str, urls: &[&str], args: &[&str]) -> Output {
        let into = env.url();
        let mut all = vec!["load"];
        all.extend_from_slice(urls);
        all.extend_from_slice(&[
            "--endpoint",
            &self.endpoint,
            "--into",
            &into,
            "--table",
            table,
            "--json",
        ]);
        all.extend_from_slice(args);
        output(self.command(env, &all))
    }
}

fn output(mut cmd: Command) -> Output {
    let out = cmd.output().expect("run idemload");
    let out = Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(
        !out.stdout.contains(SECRET) && !out.stderr.contains(SECRET),
        "the secret key was printed\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.stdout,
        out.stderr
    );
    out
}

/// A test body that uses a bucket.
type S3Body = fn(&Env, &S3);

/// Runs `body` on one backend with a bucket of its own.
fn s3_test(test: &'static str, kind: BackendKind, body: S3Body) {
    let Some(s3) = s3(test) else { return };
    std::thread_local! {
        static S3_OF_TEST: std::cell::RefCell<Option<(S3, S3Body)>> = const { std::cell::RefCell::new(None) };
    }
    S3_OF_TEST.with_borrow_mut(|slot| *slot = Some((s3, body)));
    with_backend(test, kind, |env| {
        S3_OF_TEST.with_borrow(|slot| {
            let (s3, body) = slot.as_ref().expect("bucket");
            body(env, s3)
        })
    });
    S3_OF_TEST.with_borrow_mut(|slot| *slot = None);
}

fn day_records(day: usize, per_day: usize) -> String {
    let mut text = String::new();
    for i in 0..per_day {
        text.push_str(&format!(
            "{{\"id\":{},\"day\":{day},\"n\":{i}}}\n",
            day * per_day + i
        ));
    }
    text
}

#[test]
fn a_glob_over_many_objects_loads_each_matching_object_once() {
    s3_test("s3_glob_many", BackendKind::Sqlite, |env, s3| {
        let objects: Vec<(String, Vec<u8>)> = (0..300)
            .map(|day| {
                (
                    format!("exports/day-{day:03}.jsonl"),
                    day_records(day, 3).into_bytes(),
                )
            })
            .collect();
        s3.put_many(objects);
        // Around the prefix: keys the glob must not match.
        s3.put("exports/day-x.csv", "id\n999999\n");
        s3.put("exports/sub/day-1.jsonl", "{\"id\":999998}\n");
        s3.put("exports/da.jsonl", "{\"id\":999997}\n");
        s3.put("exportsz/day-1.jsonl", "{\"id\":999996}\n");
        s3.put("a-first.jsonl", "{\"id\":999995}\n");

        let glob = s3.url("exports/day-*.jsonl");
        let r = s3.load(env, "t", &[&glob], &[]).code(0).report();
        assert_eq!((r.read, r.inserted), (900, 900), "{}", r.raw);
        assert_eq!(env.backend.count("t"), 900);
        assert_eq!(env.backend.scalar_i64("SELECT max(id) FROM t"), Some(899));
        let again = s3.load(env, "t", &[&glob], &[]).code(0).report();
        assert_eq!((again.read, again.unchanged), (900, 900), "{}", again.raw);

        let none = s3.load(env, "t", &[&s3.url("exports/nothing-*.jsonl")], &[]);
        none.code(2);
        assert!(none.stderr.contains("no object matches"), "{}", none.stderr);
        let missing = s3.load(env, "t", &[&s3.url("exports/missing.jsonl")], &[]);
        missing.code(2);
        assert!(
            missing.stderr.contains("no such object"),
            "{}",
            missing.stderr
        );
    });
}

#[test]
fn a_changed_object_is_reloaded_and_rejects_name_the_object() {
    s3_test("s3_changed", BackendKind::Sqlite, |env, s3| {
        s3.put(
            "a.jsonl",
            "{\"id\":1,\"v\":\"one\"}\n{\"id\":2,\"v\":\"two\"}\n",
        );
        let url = s3.url("a.jsonl");
        s3.load(env, "t", &[&url], &[]).code(0);
        s3.put(
            "a.jsonl",
            "{\"id\":1,\"v\":\"ONE\"}\n[1]\n{\"id\":2,\"v\":\"two\"}\n",
        );
        let r = s3.load(env, "t", &[&url], &[]).code(4).report();
        assert_eq!((r.updated, r.unchanged, r.rejected), (1, 1, 1), "{}", r.raw);
        assert_rows(
            &env.rows("t"),
            &[json!({"id": 1, "v": "ONE"}), json!({"id": 2, "v": "two"})],
        );
        let rejects = env.backend.raw_rows("_idemload_rejects");
        assert_eq!(
            rejects[0]["source_ref"],
            format!("s3://{}/a.jsonl:2", s3.bucket),
            "{rejects:?}"
        );
    });
}

#[test]
fn gzip_zstd_and_parquet_objects_load() {
    s3_test("s3_compressed", BackendKind::Sqlite, |env, s3| {
        s3.put("in/a.jsonl.gz", gzip("{\"id\":1}\n{\"id\":2}\n"));
        s3.put("in/b.csv.zst", zstd("id\n3\n4\n"));
        let parquet = env.path("c.parquet");
        if write_parquet_ids(&parquet, &[5, 6]) {
            s3.put("in/c.parquet", std::fs::read(&parquet).unwrap());
        }
        let r = s3.load(env, "t", &[&s3.url("in/*")], &[]).code(0).report();
        let expected = if parquet.exists() { 6 } else { 4 };
        assert_eq!(r.inserted, expected, "{}", r.raw);
    });
}

#[test]
fn credentials_are_never_printed() {
    s3_test("s3_credentials", BackendKind::Sqlite, |env, s3| {
        s3.put("a.jsonl", "{\"id\":1}\n");
        // Every run goes through `output`, which fails on the secret; runs
        // that fail, with every log line on.
        let into = env.url();
        for args in [
            vec!["load", "s3://no-such-bucket-here/a.jsonl"],
            vec!["load", "s3://no-such-bucket-here/*.jsonl"],
        ] {
            let mut all = args.clone();
            all.extend_from_slice(&["--endpoint", &s3.endpoint, "--into", &into, "--table", "t"]);
            let mut cmd = s3.command(env, &all);
            cmd.env("IDEMLOAD_LOG", "trace");
            let out = output(cmd);
            assert_ne!(out.code, 0, "{}", out.stderr);
        }
        let mut cmd = s3.command(
            env,
            &[
                "load",
                &s3.url("a.jsonl"),
                "--endpoint",
                &s3.endpoint,
                "--into",
                &into,
                "--table",
                "t",
            ],
        );
        cmd.env("IDEMLOAD_LOG", "trace");
        output(cmd).code(0);
        // A pipeline with the endpoint in `[source]`, through `check` too.
        let p = env.write(
            "p.toml",
            format!(
                "name = \"p\"\n[source]\ntype = \"file\"\npath = \"{}\"\nendpoint = \"{}\"\n[destination]\nurl = \"{into}\"\ntable = \"p\"\n",
                s3.url("*.jsonl"),
                s3.endpoint
            ),
        );
        let p = p.to_str().unwrap();
        output(s3.command(env, &["run", p, "--json"])).code(0);
        output(s3.command(env, &["check", p]));
        assert_eq!(env.backend.count("p"), 1);
    });
}

#[test]
fn aws_endpoint_url_and_a_profile_reach_the_store() {
    s3_test("s3_env_profile", BackendKind::Sqlite, |env, s3| {
        s3.put("a.jsonl", "{\"id\":1}\n");
        env.write(
            ".aws/credentials",
            format!("[other]\naws_access_key_id = x\n\n[dev]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n"),
        );
        let into = env.url();
        let mut cmd = s3.command(
            env,
            &[
                "load",
                &s3.url("a.jsonl"),
                "--into",
                &into,
                "--table",
                "t",
                "--json",
            ],
        );
        cmd.env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env("AWS_PROFILE", "dev")
            .env("AWS_ENDPOINT_URL", &s3.endpoint);
        let r = output(cmd).code(0).report();
        assert_eq!(r.inserted, 1, "{}", r.raw);
    });
}

/// A TCP proxy to the S3 server that cuts the first GET of `key` after
/// `limit` bytes of its response (never, for `u64::MAX`); every other
/// exchange passes whole. It counts the GETs of `key`.
struct CuttingProxy {
    port: u16,
    cut: Arc<AtomicBool>,
    gets: Arc<AtomicU64>,
}

impl CuttingProxy {
    fn start(upstream: &str, key: &str, limit: u64) -> CuttingProxy {
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let gets = Arc::new(AtomicU64::new(0));
        let request_line = format!("GET /{key} ");
        let cut_flag = cut.clone();
        let get_count = gets.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let armed = Arc::new(AtomicBool::new(false));
                let sent = Arc::new(AtomicU64::new(0));
                // Client to server: arm the cut on the object's first GET.
                {
                    let (mut from, mut to) =
                        (client.try_clone().unwrap(), server.try_clone().unwrap());
                    let (armed, cut, line, gets) = (
                        armed.clone(),
                        cut_flag.clone(),
                        request_line.clone(),
                        get_count.clone(),
                    );
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 << 10];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            let text = String::from_utf8_lossy(&buf[..n]);
                            gets.fetch_add(text.matches(&line).count() as u64, Ordering::SeqCst);
                            if !cut.load(Ordering::SeqCst)
                                && text.contains(&line)
                                && !text.to_ascii_lowercase().contains("range:")
                            {
                                armed.store(true, Ordering::SeqCst);
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(Shutdown::Write);
                    });
                }
                // Server to client: stop after `limit` bytes once armed.
                let (mut from, mut to) = (server, client);
                let cut = cut_flag.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        if armed.load(Ordering::SeqCst) && !cut.load(Ordering::SeqCst) {
                            let done = sent.fetch_add(n as u64, Ordering::SeqCst);
                            if done + n as u64 > limit {
                                let keep = limit.saturating_sub(done) as usize;
                                let _ = to.write_all(&buf[..keep]);
                                cut.store(true, Ordering::SeqCst);
                                let _ = to.shutdown(Shutdown::Both);
                                let _ = from.shutdown(Shutdown::Both);
                                return;
                            }
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(Shutdown::Write);
                });
            }
        });
        CuttingProxy { port, cut, gets }
    }
}

#[test]
fn a_connection_dropped_mid_object_resumes_from_its_offset() {
    s3_test("s3_dropped", BackendKind::Sqlite, |env, s3| {
        let text = day_records(0, 50_000);
        s3.put("big.jsonl", text.clone());
        let proxy = CuttingProxy::start(&s3.endpoint, &format!("{}/big.jsonl", s3.bucket), 300_000);
        let endpoint = format!("http://127.0.0.1:{}", proxy.port);
        let into = env.url();
        let url = s3.url("big.jsonl");
        let mut cmd = s3.command(
            env,
            &[
                "load",
                &url,
                "--endpoint",
                &endpoint,
                "--into",
                &into,
                "--table",
                "t",
                "--json",
            ],
        );
        cmd.env("IDEMLOAD_LOG", "info");
        let out = output(cmd);
        assert!(
            proxy.cut.load(Ordering::SeqCst),
            "the proxy never cut the read\n{}",
            out.stderr
        );
        let r = out.code(0).report();
        assert_eq!(
            (r.read, r.inserted, r.rejected),
            (50_000, 50_000, 0),
            "{}\n{}",
            r.raw,
            out.stderr
        );
        assert_eq!(env.backend.count("t"), 50_000);
        assert_eq!(
            env.backend.scalar_i64("SELECT sum(n) FROM t"),
            Some(49_999 * 50_000 / 2)
        );
    });
}

#[test]
fn a_parquet_object_is_read_in_a_few_gets_not_one_per_page() {
    s3_test("s3_parquet_gets", BackendKind::Sqlite, |env, s3| {
        // Two row groups of 100,000 rows in pages of 4 KiB: hundreds of
        // pages, each of which a reader going page by page would GET.
        let path = env.path("pages.parquet");
        let script = format!(
            "import pyarrow as pa, pyarrow.parquet as pq\n\
             n = 200000\n\
             t = pa.table({{'id': pa.array(range(n), pa.int64()), 'name': pa.array(['contact-%d' % i for i in range(n)]), 'n': pa.array([i % 97 for i in range(n)], pa.int32())}})\n\
             pq.write_table(t, {:?}, row_group_size=100000, data_page_size=4096)",
            path.display().to_string()
        );
        if !pyarrow(&script) {
            return;
        }
        s3.put("pages.parquet", std::fs::read(&path).unwrap());
        let proxy = CuttingProxy::start(
            &s3.endpoint,
            &format!("{}/pages.parquet", s3.bucket),
            u64::MAX,
        );
        let endpoint = format!("http://127.0.0.1:{}", proxy.port);
        let into = env.url();
        let url = s3.url("pages.parquet");
        let args = ["load", &url, "--endpoint", &endpoint, "--into", &into];
        let out = output(s3.command(env, &[&args[..], &["--table", "t", "--json"]].concat()));
        let r = out.code(0).report();
        assert_eq!((r.read, r.inserted), (200_000, 200_000), "{}", r.raw);
        assert_eq!(
            env.backend.scalar_i64("SELECT sum(id) FROM t"),
            Some(199_999 * 200_000 / 2)
        );
        // The footer (two ranged GETs at most) and one coalesced GET per
        // row group; a page-by-page reader makes over 400.
        let gets = proxy.gets.load(Ordering::SeqCst);
        eprintln!("{gets} GETs of the object");
        assert!(
            gets <= 6,
            "{gets} GETs of one Parquet object of 2 row groups"
        );
    });
}

#[test]
fn a_killed_s3_load_run_again_gives_the_exact_table() {
    for kind in [BackendKind::Sqlite, BackendKind::Postgres] {
        s3_test("s3_killed", kind, |env, s3| {
            const OBJECTS: usize = 20;
            const PER: usize = 10_000;
            let objects: Vec<(String, Vec<u8>)> = (0..OBJECTS)
                .map(|day| {
                    (
                        format!("k/day-{day:02}.jsonl.gz"),
                        gzip(&day_records(day, PER)),
                    )
                })
                .collect();
            s3.put_many(objects);
            let glob = s3.url("k/day-*.jsonl.gz");
            let args = ["--batch-size", "2000"];
            let started = Instant::now();
            s3.load(env, "calibration", &[&glob], &args).code(0);
            let whole = started.elapsed();
            let mut rng = rand::rngs::StdRng::seed_from_u64(crate::common::seed("s3_killed"));
            let into = env.url();
            for round in 0..5 {
                let delay =
                    Duration::from_micros(rng.gen_range(0..whole.as_micros() as u64 * 8 / 10));
                let mut all = vec!["load", glob.as_str(), "--endpoint", &s3.endpoint];
                all.extend_from_slice(&["--into", &into, "--table", "t"]);
                all.extend_from_slice(&args);
                let mut child = s3
                    .command(env, &all)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("spawn");
                std::thread::sleep(delay);
                let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
                let _ = child.wait();
                assert_eq!(
                    env.backend.doubled("t", &["id"]),
                    0,
                    "round {round}: a key twice"
                );
                let count = env.backend.count("t");
                eprintln!("round {round}: killed after {delay:?}, {count} rows committed");
            }
            let r = s3.load(env, "t", &[&glob], &args).code(0).report();
            assert_eq!(r.status, "succeeded", "{}", r.raw);
            let expected = env.rows("calibration");
            assert_eq!(expected.len(), OBJECTS * PER);
            assert_rows(&env.rows("t"), &expected);
        });
    }
}

// ---------------------------------------------------------------- Parquet

/// Runs a pyarrow script; false (skipped loudly) when python3 cannot
/// import pyarrow, a failure under `IDEMLOAD_REQUIRE_SERVICES=1`.
fn pyarrow(script: &str) -> bool {
    let available = Command::new("python3")
        .args(["-c", "import pyarrow"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !available {
        if std::env::var("IDEMLOAD_REQUIRE_SERVICES").as_deref() == Ok("1") {
            panic!("python3 cannot import pyarrow and IDEMLOAD_REQUIRE_SERVICES=1 (pip install pyarrow)");
        }
        eprintln!("SKIPPED Parquet test (python3 cannot import pyarrow: pip install pyarrow)");
        return false;
    }
    let out = Command::new("python3")
        .args(["-c", script])
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "pyarrow script failed\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

fn write_parquet_ids(path: &std::path::Path, ids: &[i64]) -> bool {
    pyarrow(&format!(
        "import pyarrow as pa, pyarrow.parquet as pq\npq.write_table(pa.table({{'id': pa.array({ids:?}, pa.int64())}}), {:?})",
        path.display().to_string()
    ))
}

idemtest!(parquet_maps_every_logical_type, |env| {
    let path = env.path("types.parquet");
    let script = format!(
        r#"
import datetime, decimal
import pyarrow as pa, pyarrow.parquet as pq
D = decimal.Decimal
t = pa.table({{
    "id": pa.array([1, 2, None], pa.int64()),
    "i8": pa.array([-8, 8, 0], pa.int8()),
    "u32": pa.array([4294967295, 0, 1], pa.uint32()),
    "u64": pa.array([1099511627776, 0, 1], pa.uint64()),
    "f32": pa.array([0.1, -1.5, 0.0], pa.float32()),
    "f64": pa.array([2.5, None, 1e300], pa.float64()),
    "flag": pa.array([True, False, None]),
    "name": pa.array(["a", "é ü", None]),
    "big": pa.array(["x", "y", "z"], pa.large_string()),
    "raw": pa.array([b"\x00\xff", b"", None], pa.binary()),
    "price": pa.array([D("12345.678"), D("-0.001"), None], pa.decimal128(12, 3)),
    "whole": pa.array([D("42"), D("-7"), D("0")], pa.decimal128(10, 0)),
    "huge": pa.array([D("123456789012345678901234567890.12345"), D("0.00000"), None], pa.decimal256(40, 5)),
    "day": pa.array([datetime.date(2024, 5, 1), datetime.date(1969, 12, 31), None], pa.date32()),
    "at": pa.array([datetime.time(1, 2, 3, 500000), datetime.time(0, 0), None], pa.time64("us")),
    "ts_s": pa.array([1714521600, 0, None], pa.timestamp("s")),
    "ts_ms": pa.array([1714521600123, 0, None], pa.timestamp("ms", tz="UTC")),
    "ts_us": pa.array([1714521600123456, 0, None], pa.timestamp("us", tz="America/New_York")),
    "ts_ns": pa.array([1714521600123456789, 0, None], pa.timestamp("ns", tz="+05:30")),
    "tags": pa.array([["a", "b"], [], None], pa.list_(pa.string())),
    "point": pa.array([{{"x": 1.5, "y": None}}, {{"x": 0.0, "y": 2.0}}, None], pa.struct([("x", pa.float64()), ("y", pa.float64())])),
    "attrs": pa.array([[("k", 1)], [], None], pa.map_(pa.string(), pa.int32())),
    "cat": pa.array(["red", "blue", "red"]).dictionary_encode(),
}})
pq.write_table(t, {path:?}, row_group_size=2)
"#,
        path = path.display().to_string()
    );
    if !pyarrow(&script) {
        return;
    }
    let r = env.load("t", &["types.parquet"], &[]).code(4).report();
    assert_eq!((r.read, r.inserted, r.rejected), (3, 2, 1), "{}", r.raw);
    // Row 2 is row 0 of row group 1, and has no key.
    let rejects = env.backend.raw_rows("_idemload_rejects");
    assert_eq!(rejects[0]["source_ref"], "types.parquet:1:0", "{rejects:?}");
    let rows = env.rows("t");
    let row = |id: i64| {
        rows.iter()
            .find(|r| r["id"] == json!(id))
            .cloned()
            .unwrap_or_else(|| panic!("no row {id}: {rows:?}"))
    };
    let mut got = row(1);
    // PostgreSQL and MySQL hold microseconds (one rounds, the other
    // truncates): the instant to the microsecond there, exact in SQLite.
    let ts_ns = got.as_object_mut().unwrap().remove("ts_ns");
    let exact: &[&str] = if env.backend.kind == BackendKind::Sqlite {
        &["2024-05-01T00:00:00.123456789Z"]
    } else {
        &["2024-05-01T00:00:00.123457Z", "2024-05-01T00:00:00.123456Z"]
    };
    assert!(
        exact.iter().any(|e| ts_ns == Some(json!(e))),
        "ts_ns {ts_ns:?} in {got}"
    );
    let expected = crate::common::norm_rows(vec![json!({
        "id": 1, "i8": -8, "u32": 4294967295u64, "u64": 1099511627776u64, "f32": 0.1,
        "f64": 2.5, "flag": true, "name": "a", "big": "x", "raw": "00ff",
        "price": "12345.678", "whole": 42,
        "huge": "123456789012345678901234567890.12345",
        "day": "2024-05-01", "at": "01:02:03.500",
        "ts_s": "2024-05-01T00:00:00",
        "ts_ms": "2024-05-01T00:00:00.123Z",
        "ts_us": "2024-05-01T00:00:00.123456Z",
        "tags": ["a", "b"], "point": {"x": 1.5, "y": null}, "attrs": {"k": 1},
        "cat": "red",
    })])
    .remove(0);
    assert_eq!(
        got, expected,
        "row 1\n--- got ---\n{got:#}\n--- expected ---\n{expected:#}"
    );
    let second = row(2);
    assert_eq!(second["name"], "é ü", "{second}");
    assert_eq!(second["price"], "-0.001", "{second}");
    assert_eq!(second["day"], "1969-12-31", "{second}");
    assert_eq!(second["ts_ms"], "1970-01-01T00:00:00Z", "{second}");
    assert_eq!(second["cat"], "blue", "{second}");

    let again = env.load("t", &["types.parquet"], &[]).code(0).report();
    assert_eq!(
        (again.inserted, again.updated, again.unchanged),
        (0, 0, 2),
        "{}",
        again.raw
    );
});

/// Files loaded once, on objects: a pipeline's re-run leaves the objects it
/// loaded unread while their ETag, size and last-modified are unchanged,
/// and reads a changed one again.
#[test]
fn an_unchanged_object_is_skipped_and_a_changed_one_reloaded() {
    s3_test("s3_loaded_once", BackendKind::Sqlite, |env, s3| {
        for day in 0..3 {
            s3.put(&format!("daily/day-{day}.jsonl"), day_records(day, 4));
        }
        env.write(
            "objects.toml",
            format!(
                "name = \"objects\"\n\n[source]\ntype = \"file\"\npath = \"{}\"\nendpoint = \"{}\"\n\n[destination]\nurl = \"{}\"\ntable = \"objects\"\n\n[load]\nkey = \"id\"\n",
                s3.url("daily/*.jsonl"),
                s3.endpoint,
                env.url()
            ),
        );
        let run = || output(s3.command(env, &["run", "objects.toml", "--json"]));
        let first = run().code(0).report();
        assert_eq!(
            (first.read, first.inserted, first.files_skipped),
            (12, 12, 0)
        );
        let again = run().code(0).report();
        assert_eq!((again.read, again.files_skipped), (0, 3), "{}", again.raw);
        s3.put(
            "daily/day-1.jsonl",
            day_records(1, 4).replace("\"n\":2", "\"n\":20"),
        );
        let changed = run().code(0).report();
        assert_eq!(
            (changed.read, changed.files_skipped),
            (4, 2),
            "{}",
            changed.raw
        );
        assert_eq!(changed.changes(), (0, 1, 3, 0), "{}", changed.raw);
    });
}

/// `az://` against a real Azure Blob emulator (`IDEMLOAD_TEST_AZURE`, e.g.
/// Azurite's `http://127.0.0.1:10000`), configured as a user would:
/// `AZURE_STORAGE_USE_EMULATOR=true`.
#[test]
fn azure_blobs_load_once_with_their_rejects_named() {
    if crate::common::server_url("IDEMLOAD_TEST_AZURE").is_none() {
        return;
    }
    with_backend("azure_blobs", BackendKind::Sqlite, |env| {
        let azurite = std::env::var("IDEMLOAD_TEST_AZURE").unwrap_or_default();
        let container = format!("idemload-{}", rand::random::<u32>());
        let emulator = [
            ("AZURE_STORAGE_USE_EMULATOR", "true"),
            ("AZURITE_BLOB_STORAGE_URL", azurite.as_str()),
        ];
        // The container, through Azure's own Python client (object_store
        // writes blobs but makes no containers).
        let made = Command::new("python3")
            .args([
                "-c",
                "import sys\nfrom azure.storage.blob import BlobServiceClient\n\
                 url = sys.argv[1].rstrip('/') + '/devstoreaccount1'\n\
                 key = 'Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=='\n\
                 s = BlobServiceClient.from_connection_string(\n\
                     f'DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={key};BlobEndpoint={url};')\n\
                 s.create_container(sys.argv[2])\n",
                &azurite,
                &container,
            ])
            .output()
            .expect("run python3");
        assert!(
            made.status.success(),
            "creating the container (pip install azure-storage-blob): {}",
            String::from_utf8_lossy(&made.stderr)
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let store = object_store::azure::MicrosoftAzureBuilder::new()
            .with_use_emulator(true)
            .with_endpoint(format!(
                "{}/devstoreaccount1",
                azurite.trim_end_matches('/')
            ))
            .with_allow_http(true)
            .with_container_name(&container)
            .build()
            .expect("azure client");
        let put = |key: &str, bytes: Vec<u8>| {
            rt.block_on(store.put(&ObjectPath::from(key), PutPayload::from(bytes)))
                .unwrap_or_else(|e| panic!("put {key}: {e}"));
        };
        put(
            "exports/day1.jsonl.gz",
            gzip("{\"id\":1,\"v\":\"a\"}\n{\"id\":2,\"v\":\"b\"}\n"),
        );
        put(
            "exports/day2.jsonl",
            b"{\"id\":3,\"v\":\"c\"}\nnot json\n".to_vec(),
        );
        put("other/skip.jsonl", b"{\"id\":9}\n".to_vec());
        let glob = format!("az://{container}/exports/*");
        // The binary with the emulator's settings, as a user would run it.
        let emulated = |args: &[&str]| {
            let out = env.command(args).envs(emulator).output().expect("run");
            Output {
                code: out.status.code().unwrap_or(-1),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }
        };
        let url = env.url();
        let load = |_: &Env| {
            emulated(&[
                "load", &glob, "--into", &url, "--table", "blobs", "--key", "id", "--json",
            ])
        };
        let first = load(env).code(4).report();
        assert_eq!(
            (first.read, first.inserted, first.rejected),
            (4, 3, 1),
            "{}",
            first.raw
        );
        let rejects = env.backend.raw_rows("_idemload_rejects");
        assert_eq!(
            rejects[0]["source_ref"],
            format!("az://{container}/exports/day2.jsonl:2"),
            "{rejects:?}"
        );
        assert_rows(
            &env.rows("blobs"),
            &[
                json!({"id": 1, "v": "a"}),
                json!({"id": 2, "v": "b"}),
                json!({"id": 3, "v": "c"}),
            ],
        );
        // A pipeline of the same name (`load` names its run after the
        // table) reads only what changed since.
        let pipeline = format!(
            "name = \"blobs\"\n[source]\ntype = \"file\"\npath = \"{glob}\"\n[load]\nkey = \"id\"\n[destination]\nurl = \"{}\"\ntable = \"blobs\"\n",
            env.url()
        );
        env.write("blobs.toml", pipeline);
        let run = |_: &Env| emulated(&["run", "blobs.toml", "--json"]);
        let again = run(env).code(0).report();
        assert_eq!((again.read, again.files_skipped), (0, 2), "{}", again.raw);
        put(
            "exports/day1.jsonl.gz",
            gzip("{\"id\":1,\"v\":\"a2\"}\n{\"id\":2,\"v\":\"b\"}\n"),
        );
        let changed = run(env).code(0).report();
        assert_eq!(
            (changed.read, changed.updated, changed.files_skipped),
            (2, 1, 1),
            "{}",
            changed.raw
        );
    });
}
