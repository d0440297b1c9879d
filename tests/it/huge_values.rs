//! Values over `max_value_bytes` are rejected while the file is read
//! (issue 15): a line or array element holding one huge array becomes a
//! reject naming the field, the limit and what to do, before the array is
//! built, so the run's memory stays near the line's size; the good records
//! around it load, and the rejects table keeps a bounded raw text.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::{assert_rows, bin, Env, Output};

/// Rejects stored for `pipeline`, as (source_ref, reason, raw).
fn rejects(env: &Env, pipeline: &str) -> Vec<(String, String, String)> {
    env.backend
        .raw_rows("_idemload_rejects")
        .into_iter()
        .filter(|r| r["pipeline"] == pipeline)
        .map(|r| {
            let text = |k: &str| r[k].as_str().unwrap_or_default().to_string();
            (text("source_ref"), text("reason"), text("raw"))
        })
        .collect()
}

/// A JSON object line `{"id":ID,"big":[0,0,…]}` of at least `bytes` bytes.
fn huge_array_line(id: u64, bytes: usize) -> String {
    let elements = bytes / 2;
    let mut line = String::with_capacity(elements * 2 + 32);
    line.push_str(&format!("{{\"id\":{id},\"big\":["));
    for i in 0..elements {
        line.push_str(if i == 0 { "0" } else { ",0" });
    }
    line.push_str("]}");
    line
}

fn good(id: u64) -> Value {
    json!({"id": id, "name": format!("n{id}")})
}

/// Asserts one reject for the huge line at `source_ref`, with a reason
/// that names the field, its size, the limit and what to do, and a raw
/// text cut to what the rejects table keeps.
#[track_caller]
fn assert_huge_reject(env: &Env, pipeline: &str, source_ref: &str, size: usize) {
    let stored = rejects(env, pipeline);
    assert_eq!(stored.len(), 1, "{stored:?}");
    let (at, reason, raw) = &stored[0];
    assert_eq!(at, source_ref);
    assert_eq!(
        reason,
        &format!(
            "value of field \"big\" is {size} bytes, more than max_value_bytes = 1048576: \
             raise max_value_bytes in the pipeline's [load] (up to what the column holds) to load it"
        )
    );
    assert!(raw.len() < 9000, "raw text of {} bytes", raw.len());
    assert!(
        raw.starts_with("{\"id\":2,\"big\":[0,0,0"),
        "{}",
        &raw[..64]
    );
    assert!(
        raw.contains("bytes in all, sha256 "),
        "{}",
        &raw[raw.len() - 120..]
    );
}

/// Runs the binary in the test's directory and returns its output and its
/// peak resident memory in KiB: from `/usr/bin/time` where it exists,
/// else the highest `VmHWM` of `/proc/<pid>/status` seen while it ran.
fn run_measured(env: &Env, args: &[&str]) -> (Output, u64) {
    let time = Path::new("/usr/bin/time");
    let peak_file = env.path("peak_rss_kb");
    let mut cmd = if time.exists() {
        let mut cmd = Command::new(time);
        cmd.arg("-f").arg("%M").arg("-o").arg(&peak_file).arg(bin());
        cmd
    } else {
        Command::new(bin())
    };
    let child = cmd
        .args(args)
        .current_dir(env.root())
        .env_remove("IDEMLOAD_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start idemload");
    let status = format!("/proc/{}/status", child.id());
    let sampler = std::thread::spawn(move || {
        let mut peak = 0u64;
        while let Ok(text) = std::fs::read_to_string(&status) {
            let hwm = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
            match hwm {
                Some(kb) => peak = peak.max(kb),
                // Exited: a zombie has no memory left to report.
                None => break,
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        peak
    });
    let out = child.wait_with_output().expect("wait for idemload");
    let sampled = sampler.join().expect("sampler");
    let peak = if time.exists() {
        let text = std::fs::read_to_string(&peak_file).expect("peak rss file");
        text.trim()
            .lines()
            .last()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("no peak RSS in {text:?}"))
    } else {
        sampled
    };
    let out = Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    (out, peak)
}

/// Loads `file` (a ~50 MB array line between good records) into SQLite
/// and checks the reject, the good rows and the peak memory against the
/// line's size.
fn huge_line_loads_around_it_in_bounded_memory(file: &str, text: String, line: usize) {
    let dir = tempfile::Builder::new()
        .prefix("idemload-it-")
        .tempdir()
        .expect("temp dir");
    let Some(backend) =
        crate::common::Backend::new(crate::common::BackendKind::Sqlite, "huge_line", dir.path())
    else {
        return;
    };
    let env = Env { dir, backend };
    let big = huge_array_line(2, 50 << 20);
    let size = big.len() - "{\"id\":2,\"big\":}".len();
    let text = text.replace("BIG", &big);
    drop(big);
    env.write(&format!("data/{file}"), &text);
    drop(text);
    let p = env.pipeline("huge", &format!("data/{file}"), "batch_size = 2");
    let (out, peak_kb) = run_measured(&env, &["run", &p, "--json"]);
    out.code(4);
    let r = out.report();
    assert_eq!((r.read, r.inserted, r.rejected), (4, 3, 1), "{}", r.raw);
    assert_huge_reject(&env, "huge", &format!("data/{file}:{line}"), size);
    assert_rows(&env.rows("huge"), &[good(1), good(3), good(4)]);
    // Building the array took 3.0 GB (3.6 GB from a .json file) before the
    // planner rejected it; reading it whole once is all it may cost now.
    let line_kb = (size / 1024) as u64;
    eprintln!(
        "{file}: peak RSS {} MB for a {} MB line",
        peak_kb / 1024,
        line_kb / 1024
    );
    assert!(
        peak_kb < 4 * line_kb,
        "peak RSS {peak_kb} KiB, more than 4x the {line_kb} KiB line"
    );
}

#[test]
fn a_50mb_array_line_is_rejected_while_reading_in_bounded_memory() {
    // A blank line before it: the reject names the line it is on.
    let text = format!("{}\n\nBIG\n{}\n{}\n", good(1), good(3), good(4));
    huge_line_loads_around_it_in_bounded_memory("big.jsonl", text, 3);
}

#[test]
fn a_50mb_element_of_a_json_array_file_is_rejected_in_bounded_memory() {
    let text = format!("[\n{},\nBIG,\n{},\n{}\n]\n", good(1), good(3), good(4));
    huge_line_loads_around_it_in_bounded_memory("big.json", text, 3);
}

idemtest!(
    values_over_the_limit_are_rejected_in_every_file_format,
    |env| {
        // 2 MB: over the 1 MiB default.
        let big = huge_array_line(2, 2 << 20);
        let size = big.len() - "{\"id\":2,\"big\":}".len();
        env.write("data/a.jsonl", format!("{}\n{big}\n{}\n", good(1), good(3)));
        env.write(
            "data/b.json",
            format!("[{},\n  {big}\n, {}]", good(11), good(13)),
        );
        let cell = "y".repeat(3 << 20);
        env.write(
            "data/c.csv",
            format!("id,name,big\n21,n21,\n2,n2,{cell}\n23,n23,\n"),
        );
        let p = env.pipeline("huge", "data/*", "");
        let out = env.run(&p, &[]);
        out.code(4);
        let r = out.report();
        assert_eq!((r.read, r.inserted, r.rejected), (9, 6, 3), "{}", r.raw);
        let mut stored = rejects(env, "huge");
        stored.sort();
        let got: Vec<(&str, &str)> = stored
            .iter()
            .map(|(at, reason, _)| (at.as_str(), reason.as_str()))
            .collect();
        let reason = |size: usize| {
            format!(
            "value of field \"big\" is {size} bytes, more than max_value_bytes = 1048576: \
             raise max_value_bytes in the pipeline's [load] (up to what the column holds) to load it"
        )
        };
        assert_eq!(
            got,
            [
                ("data/a.jsonl:2", reason(size).as_str()),
                ("data/b.json:2", reason(size).as_str()),
                ("data/c.csv:3", reason(cell.len()).as_str()),
            ]
        );
        for (at, _, raw) in &stored {
            assert!(raw.len() < 9000, "{at}: raw text of {} bytes", raw.len());
            assert!(raw.contains("bytes in all, sha256 "), "{at}");
        }
        let names: Vec<Value> = env.rows("huge").iter().map(|r| r["id"].clone()).collect();
        assert_eq!(names.len(), 6, "{names:?}");

        // Read again: the same rejects, recognised as known (exit 0).
        let again = env.run(&p, &["--full-refresh"]);
        again.code(0);
        let again = again.report();
        assert_eq!(again.rejected, 3, "{}", again.raw);
        assert_eq!(again.raw["known_rejects"], 3, "{}", again.raw);
        // Each run records its rejects, with the same raw texts.
        let mut both = rejects(env, "huge");
        both.sort();
        both.dedup();
        assert_eq!(both, stored);

        // A limit that holds the values loads them.
        let p = env.pipeline("roomy", "data/*", "max_value_bytes = 4194304");
        let out = env.run(&p, &[]);
        out.code(0);
        let r = out.report();
        // Each file's record 2 is one key: two are superseded in the batch.
        assert_eq!(
            (r.read, r.inserted, r.duplicates, r.rejected),
            (9, 7, 2, 0),
            "{}",
            r.raw
        );
    }
);
