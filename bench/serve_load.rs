//! A load generator for `idemload serve` (see `bench/serve.sh`).
//!
//! `cargo run --release --example serve_load -- --url URL --connections 16
//! --requests 2000 --per-request 100 [--first-id 0] [--token T]
//! [--jsonl FILE]` sends `requests` POSTs of `per-request` NDJSON records
//! each (ids from `first-id` on, each request its own `Idempotency-Key`)
//! over `connections` concurrent connections, and prints one JSON object:
//! requests/s, records/s and latency percentiles. `--jsonl FILE` also
//! writes the same records to a file, to load them with `idemload load` for
//! comparison.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Args {
    url: String,
    connections: usize,
    requests: usize,
    per_request: usize,
    first_id: usize,
    token: Option<String>,
    jsonl: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        url: "http://127.0.0.1:8080/v1/records".into(),
        connections: 16,
        requests: 2000,
        per_request: 1,
        first_id: 0,
        token: None,
        jsonl: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        let number = || value.parse::<usize>().expect("a number");
        match flag.as_str() {
            "--url" => a.url = value.clone(),
            "--connections" => a.connections = number(),
            "--requests" => a.requests = number(),
            "--per-request" => a.per_request = number(),
            "--first-id" => a.first_id = number(),
            "--token" => a.token = Some(value.clone()),
            "--jsonl" => a.jsonl = Some(value.clone()),
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

/// The NDJSON body of request `n`.
fn body(a: &Args, n: usize) -> String {
    let mut out = String::new();
    for i in 0..a.per_request {
        let id = a.first_id + n * a.per_request + i;
        out.push_str(&format!(
            "{{\"id\":{id},\"account\":\"acct-{}\",\"kind\":\"{}\",\"amount\":{}.{:02},\"at\":\"2025-05-{:02}T{:02}:{:02}:00Z\"}}\n",
            id % 997,
            ["click", "view", "buy", "refund"][id % 4],
            id % 500,
            id % 100,
            1 + id % 28,
            id % 24,
            id % 60
        ));
    }
    out
}

fn main() {
    let a = Arc::new(args());
    if let Some(path) = &a.jsonl {
        let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create jsonl"));
        for n in 0..a.requests {
            f.write_all(body(&a, n).as_bytes()).expect("write jsonl");
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let latencies: Vec<Duration> = rt.block_on(async {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(a.connections)
            .timeout(Duration::from_secs(120))
            .build()
            .expect("client");
        let mut tasks = Vec::new();
        for _ in 0..a.connections {
            let (a, next, http) = (a.clone(), next.clone(), http.clone());
            tasks.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    if n >= a.requests {
                        return mine;
                    }
                    let body = body(&a, n);
                    let t = Instant::now();
                    let mut req = http
                        .post(&a.url)
                        .header("Idempotency-Key", format!("\"bench-{}-{n}\"", a.first_id))
                        .body(body);
                    if let Some(token) = &a.token {
                        req = req.header("Authorization", format!("Bearer {token}"));
                    }
                    let resp = req.send().await.expect("request");
                    let status = resp.status();
                    let text = resp.text().await.expect("body");
                    assert!(status.is_success(), "{status}: {text}");
                    mine.push(t.elapsed());
                }
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("task"));
        }
        all
    });
    let wall = started.elapsed().as_secs_f64();
    let mut ms: Vec<f64> = latencies.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let pct = |p: f64| ms[((ms.len() as f64 * p).ceil() as usize).clamp(1, ms.len()) - 1];
    println!(
        "{{\"requests\":{},\"per_request\":{},\"connections\":{},\"wall_s\":{:.3},\"requests_per_s\":{:.1},\"records_per_s\":{:.1},\"p50_ms\":{:.2},\"p99_ms\":{:.2}}}",
        a.requests,
        a.per_request,
        a.connections,
        wall,
        a.requests as f64 / wall,
        (a.requests * a.per_request) as f64 / wall,
        pct(0.50),
        pct(0.99)
    );
}
