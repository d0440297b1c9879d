//! Every pipeline in `examples/` runs twice from a clean directory: exit 0
//! both times, and the second run changes nothing (issue 16). The HTTP
//! examples run against the example servers (`demo_api`, `fake_crm`), built
//! with the tests and started here on 127.0.0.1.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

use crate::common::bin;

/// An example server, stopped when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The built example binary (`target/<profile>/examples/NAME`).
fn example_bin(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let profile_dir = exe.parent()?.parent()?;
    let path = profile_dir.join("examples").join(name);
    path.exists().then_some(path)
}

/// Starts an example server on a free port and reads its address from the
/// line it prints (`... listening on http://127.0.0.1:PORT`).
fn start(name: &str) -> Option<Server> {
    let path = example_bin(name)?;
    let mut child = Command::new(path)
        .arg("0")
        .env("DEMO_API_STILL", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut out = BufReader::new(child.stdout.take()?);
    let mut line = String::new();
    out.read_line(&mut line).ok()?;
    let url = line.split("listening on ").nth(1)?.trim().to_string();
    // Keep reading what it prints: a closed pipe would kill it (println!
    // panics on EPIPE) before the first request.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    Some(Server { child, url })
}

/// An ingest example: served on a free port, one request sent twice: the
/// second answer is the first one replayed.
fn serve_twice(dir: &Path, name: &str, file: &str) {
    let mut child = Command::new(bin())
        .args(["serve", file, "--listen", "127.0.0.1:0"])
        .env("INGEST_TOKEN", "example-token")
        .env_remove("IDEMLOAD_LOG")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start idemload serve");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let url = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| l.split(" on ").nth(1).map(str::to_string))
        .unwrap_or_else(|| panic!("{name}: serve printed no address"));
    std::thread::spawn(move || lines.for_each(drop));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let answers: Vec<(u16, bool, String)> = rt.block_on(async {
        let http = reqwest::Client::new();
        let mut out = Vec::new();
        for _ in 0..2 {
            let resp = http
                .post(&url)
                .header("Authorization", "Bearer example-token")
                .header("Idempotency-Key", "\"checkout-7731\"")
                .body(r#"{"event_id": "e-1", "order_id": 7731, "kind": "paid", "amount": 42.5}"#)
                .send()
                .await
                .expect("request");
            let replayed = resp.headers().contains_key("idempotent-replayed");
            out.push((
                resp.status().as_u16(),
                replayed,
                resp.text().await.expect("body"),
            ));
        }
        out
    });
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        (answers[0].0, answers[0].1),
        (200, false),
        "{name}: {answers:?}"
    );
    assert!(
        answers[0].2.contains("\"inserted\":1"),
        "{name}: {answers:?}"
    );
    assert_eq!(
        (answers[1].0, answers[1].1),
        (200, true),
        "{name}: {answers:?}"
    );
    assert_eq!(answers[0].2, answers[1].2, "{name}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}

fn run(dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> crate::common::Output {
    let out = Command::new(bin())
        .args(args)
        .envs(envs.iter().copied())
        .env_remove("IDEMLOAD_LOG")
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run idemload");
    crate::common::Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn every_example_runs_twice_and_the_second_run_changes_nothing() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::Builder::new()
        .prefix("idemload-examples-")
        .tempdir()
        .expect("temp dir");
    copy_dir(
        &repo.join("examples/data"),
        &dir.path().join("examples/data"),
    );
    let mut pipelines: Vec<PathBuf> = std::fs::read_dir(repo.join("examples"))
        .expect("examples dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    pipelines.sort();
    assert!(pipelines.len() >= 6, "examples: {pipelines:?}");

    let demo_api = start("demo_api");
    let fake_crm = start("fake_crm");
    let mut envs: Vec<(&str, &str)> = Vec::new();
    if let Some(s) = &demo_api {
        envs.push(("IDEMLOAD_DEMO_API", s.url.as_str()));
    }
    if let Some(s) = &fake_crm {
        envs.push(("IDEMLOAD_DEMO_CRM", s.url.as_str()));
    }
    let mut skipped = Vec::new();
    for source in &pipelines {
        let name = source.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(source).expect("read example");
        let needs = if text.contains("IDEMLOAD_DEMO_API") {
            demo_api.as_ref().map(|_| ()).ok_or("demo_api")
        } else if text.contains("IDEMLOAD_DEMO_CRM") {
            fake_crm.as_ref().map(|_| ()).ok_or("fake_crm")
        } else {
            Ok(())
        };
        if let Err(server) = needs {
            skipped.push(format!(
                "{name} (example server {server} not built: cargo build --examples)"
            ));
            continue;
        }
        std::fs::copy(source, dir.path().join("examples").join(&name)).expect("copy example");
        let file = format!("examples/{name}");
        if text.contains("[serve]") {
            serve_twice(dir.path(), &name, &file);
            continue;
        }
        let watch = text.contains("[trigger]");
        let args: Vec<&str> = if watch {
            vec!["watch", &file, "--once", "--json"]
        } else {
            vec!["run", &file]
        };
        let first = run(dir.path(), &args, &envs);
        assert_eq!(
            first.code, 0,
            "{name}, first run:\n{}\n{}",
            first.stdout, first.stderr
        );
        let second = run(dir.path(), &args, &envs);
        assert_eq!(
            second.code, 0,
            "{name}, second run:\n{}\n{}",
            second.stdout, second.stderr
        );
        if watch {
            let poll: Value = second
                .stdout
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|v| v.get("poll").is_some())
                .unwrap_or_else(|| panic!("{name}: no poll line\n{}", second.stdout));
            assert_eq!(
                (poll["new"].as_u64(), poll["emitted"].as_u64()),
                (Some(0), Some(0)),
                "{name}: {poll}"
            );
        } else {
            assert!(
                second.stderr.contains("inserted 0, updated 0"),
                "{name}, second run changed something:\n{}",
                second.stderr
            );
        }
    }
    if !skipped.is_empty() {
        eprintln!("\n!!! SKIPPED examples: {} !!!\n", skipped.join(", "));
        assert!(
            std::env::var_os("IDEMLOAD_REQUIRE_SERVICES").is_none(),
            "IDEMLOAD_REQUIRE_SERVICES=1 and examples were skipped: {skipped:?}"
        );
    }
}
