//! The harness: a fresh temp dir per test, the real `idemload` binary, the
//! `--json` report with the accounting identity checked on every run, and a
//! [`Backend`] that reads what a run left in SQLite, PostgreSQL or MySQL.

#![allow(dead_code)]

mod backend;
mod http;
mod report;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;

pub use self::backend::{norm_rows, server_url, Backend, BackendKind};
pub use self::http::{http_server, HttpRequest, HttpResponse, HttpServer};
pub use self::report::{assert_balanced, Report};

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_idemload")
}

/// Runs the binary in `dir` and waits for it.
pub fn idemload_in(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run idemload")
}

/// Starts the binary in `dir`, sends it SIGKILL after `delay` (if it is
/// still running) and reaps it.
pub fn kill_after(dir: &std::path::Path, args: &[&str], delay: std::time::Duration) {
    let mut child = std::process::Command::new(bin())
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start idemload");
    std::thread::sleep(delay);
    let _ = child.kill();
    let _ = child.wait();
}

/// One body for every backend: `idemtest!(name, |env| { ... })` expands into
/// a module `name` with the tests `sqlite`, `postgres` and `mysql`
/// (`cargo test --test it name`, or `cargo test --test it sqlite`).
#[macro_export]
macro_rules! idemtest {
    ($name:ident, |$env:ident| $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn body($env: &$crate::common::Env) $body

            #[test]
            fn sqlite() {
                $crate::common::with_backend(
                    stringify!($name),
                    $crate::common::BackendKind::Sqlite,
                    body,
                );
            }

            $crate::server_test! {
                fn postgres() {
                    $crate::common::with_backend(
                        stringify!($name),
                        $crate::common::BackendKind::Postgres,
                        body,
                    );
                }
            }

            $crate::server_test! {
                fn mysql() {
                    $crate::common::with_backend(
                        stringify!($name),
                        $crate::common::BackendKind::Mysql,
                        body,
                    );
                }
            }
        }
    };
}

/// A test of a server backend (PostgreSQL, MySQL).
#[macro_export]
macro_rules! server_test {
    ($item:item) => {
        #[test]
        $item
    };
}

/// Runs `body` in a fresh environment on one backend; a server backend whose
/// URL is not set skips (or fails under `IDEMLOAD_REQUIRE_SERVICES=1`).
pub fn with_backend(test: &str, kind: BackendKind, body: fn(&Env)) {
    let dir = tempfile::Builder::new()
        .prefix("idemload-it-")
        .tempdir()
        .expect("temp dir");
    let Some(backend) = Backend::new(kind, test, dir.path()) else {
        return;
    };
    let env = Env { dir, backend };
    body(&env);
}

/// A fresh temp dir (the working directory of every command) and a backend.
pub struct Env {
    pub dir: TempDir,
    pub backend: Backend,
}

/// What a finished command left.
#[derive(Debug, Clone)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Asserts the exit code, printing both streams when it differs.
    #[track_caller]
    pub fn code(&self, expected: i32) -> &Self {
        assert_eq!(
            self.code, expected,
            "exit code\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// The `--json` report (exactly one JSON object on stdout), balanced.
    #[track_caller]
    pub fn report(&self) -> Report {
        Report::parse(&self.stdout, &self.stderr)
    }

    /// Stdout as one JSON value.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "stdout is not one JSON object ({e})\n--- stdout ---\n{}\n--- stderr ---\n{}",
                self.stdout, self.stderr
            )
        })
    }
}

impl Env {
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.root().join(name)
    }

    /// The destination URL of this test's backend.
    pub fn url(&self) -> String {
        self.backend.url()
    }

    /// Writes a file (creating directories); returns its path.
    pub fn write(&self, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create dir");
        }
        std::fs::write(&path, bytes).expect("write file");
        path
    }

    /// Writes records as JSON lines.
    pub fn write_jsonl(&self, name: &str, records: &[Value]) -> PathBuf {
        self.write(name, jsonl(records))
    }

    /// Writes a CSV file from its text.
    pub fn write_csv(&self, name: &str, text: &str) -> PathBuf {
        self.write(name, text)
    }

    /// Writes `NAME.toml`: pipeline NAME into table NAME from `source` (a
    /// path or glob relative to the temp dir), with the given `[load]` body.
    pub fn pipeline(&self, name: &str, source: &str, load: &str) -> String {
        let file = format!("{name}.toml");
        self.write(
            &file,
            format!(
                "name = \"{name}\"\n\n[source]\ntype = \"file\"\npath = \"{source}\"\n\n[destination]\nurl = \"{}\"\ntable = \"{name}\"\n\n[load]\n{load}\n",
                self.url()
            ),
        );
        file
    }

    /// A `Command` for the binary, run in the temp dir.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin());
        cmd.args(args)
            .current_dir(self.root())
            .env_remove("IDEMLOAD_LOG")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs the binary to the end.
    pub fn idemload(&self, args: &[&str]) -> Output {
        let out = self
            .command(args)
            .output()
            .expect("run the idemload binary");
        Output {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `idemload load FILES --into URL --table T --json ARGS...`.
    pub fn load(&self, table: &str, files: &[&str], args: &[&str]) -> Output {
        let url = self.url();
        let mut all: Vec<&str> = vec!["load"];
        all.extend_from_slice(files);
        all.extend_from_slice(&["--into", &url, "--table", table, "--json"]);
        all.extend_from_slice(args);
        self.idemload(&all)
    }

    /// `idemload run PIPELINE --json ARGS...`.
    pub fn run(&self, pipeline: &str, args: &[&str]) -> Output {
        let mut all = vec!["run", pipeline, "--json"];
        all.extend_from_slice(args);
        self.idemload(&all)
    }

    /// The table's rows, normalised and sorted.
    pub fn rows(&self, table: &str) -> Vec<Value> {
        self.backend.rows(table)
    }

    /// The runs of a pipeline from `history --json`, newest first, each
    /// finished run's stats checked against the identity.
    pub fn history(&self, pipeline: &str) -> Vec<Value> {
        let out = self.idemload(&["history", pipeline, "--json", "--limit", "1000"]);
        out.code(0);
        let runs = out.json()["runs"].as_array().cloned().unwrap_or_default();
        for run in &runs {
            if run["status"] != "running" && !run["stats"].is_null() {
                let report = Report::from_value(run["stats"].clone());
                assert_balanced(&report);
            }
        }
        runs
    }
}

/// Records as JSON lines.
pub fn jsonl(records: &[Value]) -> String {
    let mut text = String::new();
    for r in records {
        text.push_str(&serde_json::to_string(r).expect("json"));
        text.push('\n');
    }
    text
}

/// Asserts two row sets are equal after normalisation, printing both as
/// blocks when not.
#[track_caller]
pub fn assert_rows(got: &[Value], expected: &[Value]) {
    let got = norm_rows(got.to_vec());
    let expected = norm_rows(expected.to_vec());
    if got != expected {
        let show = |rows: &[Value]| {
            rows.iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        };
        panic!(
            "rows differ\n--- expected ({}) ---\n{}\n--- got ({}) ---\n{}",
            expected.len(),
            show(&expected),
            got.len(),
            show(&got)
        );
    }
}

/// Polls `f` until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// This machine's host name, as lock holders report it.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// A seed from `IDEMLOAD_TEST_SEED`, else from the clock; printed so a
/// failure can be replayed.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("IDEMLOAD_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(42)
        });
    eprintln!("{test}: seed {seed} (replay with IDEMLOAD_TEST_SEED={seed})");
    seed
}
