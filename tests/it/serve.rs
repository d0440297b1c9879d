//! `idemload serve`: each request lands exactly once (SPEC "Ingest endpoint
//! (`serve`)"), against the real binary on 127.0.0.1 and a real SQLite file,
//! PostgreSQL schema or MySQL/MariaDB database.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{BackendKind, Env};

/// A running `idemload serve`, killed when dropped.
struct Server {
    child: Child,
    addr: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    /// Starts `idemload serve PIPELINE --listen LISTEN` and waits until it
    /// listens.
    fn start(env: &Env, pipeline: &str, listen: &str, vars: &[(&str, &str)]) -> Server {
        let mut cmd = env.command(&["serve", pipeline, "--listen", listen]);
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start idemload serve");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Some(rest) = line.split(" on http://").nth(1) {
                        if line.contains("serving pipeline") {
                            let _ = tx.send(rest.trim_end_matches("/v1/records").to_string());
                        }
                    }
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "idemload serve did not start\n--- stderr ---\n{}",
                    log.lock().unwrap()
                );
            }
        };
        Server { child, addr, log }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal)
            .expect("signal the server");
    }

    /// Waits for the process to end; its exit code.
    fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes `NAME.toml`: a pipeline with no `[source]`, into table NAME, with
/// `[load]` and `[serve]` bodies.
fn pipeline(env: &Env, name: &str, load: &str, serve: &str) -> String {
    let file = format!("{name}.toml");
    env.write(
        &file,
        format!(
            "name = \"{name}\"\n\n[destination]\nurl = \"{}\"\ntable = \"{name}\"\n\n[load]\n{load}\n\n[serve]\n{serve}\n",
            env.url()
        ),
    );
    file
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime")
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

/// An answer: status, `Idempotent-Replayed`, body.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    replayed: bool,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    token: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> reqwest::Result<Answer> {
    let mut req = client.post(url).body(body);
    if let Some(key) = key {
        req = req.header("Idempotency-Key", key);
    }
    if let Some(token) = token {
        req = req.header("Authorization", format!("Bearer {token}"));
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let replayed = resp
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    Ok(Answer {
        status,
        replayed,
        body: resp.text().await?,
    })
}

fn ndjson(records: &[Value]) -> String {
    records.iter().map(|r| format!("{r}\n")).collect()
}

idemtest!(each_status_code_means_what_the_spec_says, |env| {
    const TOKEN: &str = "tok-5ecret-value";
    let p = pipeline(
        env,
        "ingest",
        "key = \"id\"",
        "token = \"${INGEST_TOKEN}\"\nmax_body = 2000\nkey_retention = \"1h\"",
    );
    let server = Server::start(env, &p, "127.0.0.1:0", &[("INGEST_TOKEN", TOKEN)]);
    let url = server.url("/v1/records");
    let rt = runtime();
    let c = client();
    rt.block_on(async {
        let health = c.get(server.url("/healthz")).send().await.unwrap();
        assert_eq!(health.status().as_u16(), 200);

        let body = ndjson(&[
            json!({"id": 1, "name": "a"}),
            json!({"name": "no key"}),
            json!({"id": 2, "name": "b"}),
        ]);
        // No token, a wrong token: 401, nothing read.
        let a = post(&c, &url, Some("\"k-1\""), None, body.clone())
            .await
            .unwrap();
        assert_eq!(a.status, 401, "{a:?}");
        let a = post(&c, &url, Some("\"k-1\""), Some("wrong"), body.clone())
            .await
            .unwrap();
        assert_eq!(a.status, 401, "{a:?}");
        // No key: 400.
        let a = post(&c, &url, None, Some(TOKEN), body.clone())
            .await
            .unwrap();
        assert_eq!(a.status, 400, "{a:?}");
        assert!(a.body.contains("Idempotency-Key"), "{a:?}");
        // Over max_body: 413.
        let big = ndjson(
            &(0..100)
                .map(|i| json!({"id": i, "pad": "x".repeat(40)}))
                .collect::<Vec<_>>(),
        );
        let a = post(&c, &url, Some("big"), Some(TOKEN), big).await.unwrap();
        assert_eq!(a.status, 413, "{a:?}");

        // The first time: 200, two rows, the bad record named by its index.
        let first = post(&c, &url, Some("\"k-1\""), Some(TOKEN), body.clone())
            .await
            .unwrap();
        assert_eq!(first.status, 200, "{first:?}");
        assert!(!first.replayed);
        let v = first.json();
        assert_eq!(v["inserted"], 2, "{v}");
        assert_eq!(v["rejected"], 1, "{v}");
        assert_eq!(v["read"], 3, "{v}");
        assert_eq!(v["rejects"][0]["index"], 1, "{v}");
        assert!(
            v["rejects"][0]["reason"].as_str().unwrap().contains("id"),
            "{v}"
        );

        // The same key (as a bare token this time) and body: the stored
        // response again, marked, and nothing written.
        let again = post(&c, &url, Some("k-1"), Some(TOKEN), body.clone())
            .await
            .unwrap();
        assert_eq!(again.status, 200, "{again:?}");
        assert!(again.replayed, "{again:?}");
        assert_eq!(again.body, first.body);

        // The same key with another body: 422.
        let other = ndjson(&[json!({"id": 3})]);
        let a = post(&c, &url, Some("\"k-1\""), Some(TOKEN), other)
            .await
            .unwrap();
        assert_eq!(a.status, 422, "{a:?}");
        // An empty body (nothing to read): 422 under that done key all the
        // same, 400 under a new one.
        let a = post(&c, &url, Some("\"k-1\""), Some(TOKEN), "")
            .await
            .unwrap();
        assert_eq!(a.status, 422, "{a:?}");
        let a = post(&c, &url, Some("\"k-new\""), Some(TOKEN), "")
            .await
            .unwrap();
        assert_eq!(a.status, 400, "{a:?}");

        // A JSON array and a single object are bodies too.
        let a = post(
            &c,
            &url,
            Some("arr"),
            Some(TOKEN),
            json!([{"id": 3}, {"id": 1, "name": "a"}]).to_string(),
        )
        .await
        .unwrap();
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(a.json()["inserted"], 1);
        assert_eq!(a.json()["unchanged"], 1);
        let a = post(
            &c,
            &url,
            Some("obj"),
            Some(TOKEN),
            json!({"id": 4}).to_string(),
        )
        .await
        .unwrap();
        assert_eq!(a.status, 200, "{a:?}");

        let metrics = c
            .get(server.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        for (name, label, value) in [
            ("idemload_requests_total", "status=\"200\"", 4),
            ("idemload_requests_total", "status=\"401\"", 2),
            ("idemload_requests_total", "status=\"413\"", 1),
            ("idemload_requests_total", "status=\"422\"", 2),
            ("idemload_requests_total", "status=\"400\"", 2),
            ("idemload_records_total", "outcome=\"inserted\"", 4),
            ("idemload_records_total", "outcome=\"rejected\"", 1),
            (
                "idemload_request_duration_seconds_count",
                "pipeline=\"ingest\"",
                11,
            ),
        ] {
            let found = metrics.lines().any(|l| {
                l.starts_with(&format!("{name}{{"))
                    && l.contains(label)
                    && l.contains("pipeline=\"ingest\"")
                    && l.ends_with(&format!("}} {value}"))
            });
            assert!(found, "no {name}{{{label}}} {value} in\n{metrics}");
        }
        assert!(
            metrics.contains("idemload_request_duration_seconds_bucket"),
            "{metrics}"
        );
    });
    assert_eq!(env.backend.count("ingest"), 4);
    assert_eq!(
        env.backend
            .scalar_i64("SELECT count(*) FROM _idemload_requests WHERE status = 'done'"),
        Some(3)
    );
    // The bad record is in the rejects table, named by the request.
    assert_eq!(
        env.backend
            .scalar_text("SELECT source_ref FROM _idemload_rejects")
            .as_deref(),
        Some("request k-1:2")
    );
    assert!(!server.log().contains(TOKEN), "the token reached the log");
    assert!(
        server.log().contains("Request committed."),
        "{}",
        server.log()
    );
});

idemtest!(
    a_key_claimed_elsewhere_answers_409_until_its_holder_is_gone,
    |env| {
        let p = pipeline(env, "claims", "key = \"id\"", "claim_lease = \"30s\"");
        let server = Server::start(env, &p, "127.0.0.1:0", &[]);
        let url = server.url("/v1/records");
        let rt = runtime();
        let c = client();
        let body = ndjson(&[json!({"id": 1})]);
        let digest = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(body.as_bytes()))
        };
        // Make the table, then leave a claim as another host's process would
        // while it works on the request.
        rt.block_on(post(
            &c,
            &url,
            Some("warm"),
            None,
            ndjson(&[json!({"id": 0})]),
        ))
        .unwrap();
        let far = chrono::Utc::now().timestamp_millis() + 600_000;
        let created = if env.backend.kind == BackendKind::Postgres {
            "now()"
        } else {
            "'2024-01-01T00:00:00Z'"
        };
        let key = match env.backend.kind {
            BackendKind::Mysql => "`key`",
            _ => "key",
        };
        env.backend.execute(&format!(
        "INSERT INTO _idemload_requests (pipeline, {key}, digest, status, claim, host, pid, created_at, expires_at)
         VALUES ('claims', 'k', '{digest}', 'processing', 'other-claim', 'another-host', 1, {created}, {far})"
    ));
        let a = rt
            .block_on(post(&c, &url, Some("k"), None, body.clone()))
            .unwrap();
        assert_eq!(a.status, 409, "{a:?}");
        assert_eq!(env.backend.count("claims"), 1);
        // Its lease runs out (the holder died): the next attempt takes it over.
        env.backend.execute(&format!(
            "UPDATE _idemload_requests SET expires_at = 0 WHERE {key} = 'k'"
        ));
        let a = rt
            .block_on(post(&c, &url, Some("k"), None, body.clone()))
            .unwrap();
        assert_eq!(a.status, 200, "{a:?}");
        assert!(!a.replayed);
        assert_eq!(a.json()["inserted"], 1);
        let a = rt.block_on(post(&c, &url, Some("k"), None, body)).unwrap();
        assert!(a.replayed, "{a:?}");
        assert_eq!(env.backend.count("claims"), 2);
    }
);

/// One client's request: its key and events.
#[derive(Clone)]
struct Request {
    key: String,
    body: String,
    events: usize,
}

/// `clients` clients send `events` events in requests of 1 to 7 events;
/// about 30% of requests are sent twice (half of those at the same moment
/// as the first attempt). Each client sends until it gets a 200 (fresh or
/// replayed), retrying on connection errors, 409 and 5xx. Returns each
/// request with its final answer.
fn send_all(
    rt: &tokio::runtime::Runtime,
    urls: Vec<String>,
    clients: usize,
    events: usize,
    done: Arc<AtomicUsize>,
) -> Vec<(Request, Answer)> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(20);
    let mut per_client: Vec<Vec<Request>> = vec![Vec::new(); clients];
    let mut id = 0usize;
    let mut n = 0usize;
    while id < events {
        let size = rng.gen_range(1..=7).min(events - id);
        let records: Vec<Value> = (id..id + size)
            .map(|i| json!({"id": i, "event": format!("e{i}"), "client": n % clients}))
            .collect();
        per_client[n % clients].push(Request {
            key: format!("\"req-{n}\""),
            body: ndjson(&records),
            events: size,
        });
        id += size;
        n += 1;
    }
    let urls = Arc::new(urls);
    rt.block_on(async {
        let mut tasks = Vec::new();
        for (c, requests) in per_client.into_iter().enumerate() {
            let urls = urls.clone();
            let done = done.clone();
            let seed = c as u64;
            tasks.push(tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let http = client();
                let mut out = Vec::new();
                for (i, r) in requests.into_iter().enumerate() {
                    let retry = rng.gen_bool(0.3);
                    let together = rng.gen_bool(0.5);
                    // Clients alternate servers: attempt k goes to server
                    // (client + i + k) % servers.
                    let pick = |k: usize| urls[(c + i + k) % urls.len()].clone();
                    let first = send_until_ok(&http, pick(0), &r);
                    let answer = if retry && together {
                        let (a, b) = tokio::join!(first, send_until_ok(&http, pick(1), &r));
                        assert_eq!(a.body, b.body, "two answers to {} differ", r.key);
                        a
                    } else if retry {
                        let a = first.await;
                        let b = send_until_ok(&http, pick(1), &r).await;
                        assert!(
                            b.replayed,
                            "a retry of {} was processed again: {b:?}",
                            r.key
                        );
                        assert_eq!(a.body, b.body, "two answers to {} differ", r.key);
                        a
                    } else {
                        first.await
                    };
                    done.fetch_add(1, Ordering::SeqCst);
                    out.push((r, answer));
                }
                out
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("client task"));
        }
        all
    })
}

/// Answers other than 200 the clients met (409, 5xx, connection errors).
static NOT_OK: AtomicUsize = AtomicUsize::new(0);

async fn send_until_ok(http: &reqwest::Client, url: String, r: &Request) -> Answer {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut pause = Duration::from_millis(20);
    loop {
        match post(http, &url, Some(&r.key), None, r.body.clone()).await {
            Ok(a) if a.status == 200 => return a,
            Ok(a) if a.status == 409 || a.status >= 500 => {}
            Ok(a) => panic!("request {} answered {a:?}", r.key),
            Err(_) => {} // the server is restarting
        }
        NOT_OK.fetch_add(1, Ordering::SeqCst);
        assert!(
            Instant::now() < deadline,
            "request {} never answered 200",
            r.key
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

/// Each event is stored once, and each request's answer (fresh or
/// replayed) says it inserted all of its events: no request was processed
/// twice, none lost.
fn assert_exactly_once(env: &Env, table: &str, answers: &[(Request, Answer)], events: usize) {
    assert_eq!(env.backend.count(table), events as u64);
    assert_eq!(env.backend.count_distinct(table, &["id"]), events as u64);
    let mut keys = HashMap::new();
    for (r, a) in answers {
        let v = a.json();
        assert_eq!(v["inserted"], r.events, "{}: {v}", r.key);
        assert_eq!(v["read"], r.events, "{}: {v}", r.key);
        keys.insert(r.key.clone(), ());
    }
    assert_eq!(
        env.backend
            .scalar_i64("SELECT count(*) FROM _idemload_requests WHERE status = 'done'"),
        Some(keys.len() as i64)
    );
}

idemtest!(
    fifty_clients_with_retries_and_a_kill_land_each_event_once,
    |env| {
        const EVENTS: usize = 2000;
        let p = pipeline(
            env,
            "events",
            "key = \"id\"\nmode = \"insert_new\"",
            "claim_lease = \"5s\"",
        );
        let mut first = Server::start(env, &p, "127.0.0.1:0", &[]);
        let addr = first.addr.clone();
        let done = Arc::new(AtomicUsize::new(0));
        let sender = {
            let done = done.clone();
            let urls = vec![format!("http://{addr}/v1/records")];
            std::thread::spawn(move || send_all(&runtime(), urls, 50, EVENTS, done))
        };
        // SIGKILL mid-load, then a new process on the same address.
        let deadline = Instant::now() + Duration::from_secs(120);
        while done.load(Ordering::SeqCst) < 100
            && !sender.is_finished()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        let at_kill = done.load(Ordering::SeqCst);
        first.signal(nix::sys::signal::Signal::SIGKILL);
        first.kill();
        let second = Server::start(env, &p, &addr, &[]);
        let answers = sender.join().expect("clients");
        assert!(
            at_kill < answers.len(),
            "the kill came after the load ({at_kill} of {})",
            answers.len()
        );
        assert_exactly_once(env, "events", &answers, EVENTS);
        eprintln!(
        "{} requests, killed after {at_kill}; answers other than 200 met: {}; keys taken over after the restart: {}",
        answers.len(),
        NOT_OK.load(Ordering::SeqCst),
        second.log().matches("Request key taken over.").count()
    );
        drop(second);
    }
);

/// Two serve processes on one server database, each request's attempts
/// alternating between them: the same holds.
fn two_servers_land_each_event_once(env: &Env) {
    const EVENTS: usize = 2000;
    let p = pipeline(env, "shared", "key = \"id\"", "connections = 4");
    let a = Server::start(env, &p, "127.0.0.1:0", &[]);
    let b = Server::start(env, &p, "127.0.0.1:0", &[]);
    let urls = vec![a.url("/v1/records"), b.url("/v1/records")];
    let answers = send_all(
        &runtime(),
        urls.clone(),
        50,
        EVENTS,
        Arc::new(AtomicUsize::new(0)),
    );
    assert_exactly_once(env, "shared", &answers, EVENTS);

    // Requests with different keys writing the same records at the
    // same moment, through both processes: every one commits (a
    // conflict is retried, never a 500), and each record is stored
    // once with one of the versions sent.
    let rt = runtime();
    let answers: Vec<Answer> = rt.block_on(async {
        let http = client();
        let mut tasks = Vec::new();
        for n in 0..24 {
            let http = http.clone();
            let url = urls[n % 2].clone();
            let body = ndjson(
                &(0..50)
                    .map(|i| json!({"id": 10_000 + i, "v": n}))
                    .collect::<Vec<_>>(),
            );
            tasks.push(tokio::spawn(async move {
                post(&http, &url, Some(&format!("overlap-{n}")), None, body)
                    .await
                    .expect("answer")
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    for a in &answers {
        assert_eq!(a.status, 200, "{a:?}");
    }
    let written: u64 = answers
        .iter()
        .map(|a| {
            let v = a.json();
            v["inserted"].as_u64().unwrap()
        })
        .sum();
    assert_eq!(
        written, 50,
        "each overlapping record inserted by exactly one request"
    );
    assert_eq!(env.backend.count("shared"), EVENTS as u64 + 50);
    drop((a, b));
}

#[test]
fn two_servers_on_one_postgres_land_each_event_once() {
    crate::common::with_backend(
        "two_servers_on_one_postgres",
        BackendKind::Postgres,
        two_servers_land_each_event_once,
    );
}

#[test]
fn two_servers_on_one_mysql_land_each_event_once() {
    crate::common::with_backend(
        "two_servers_on_one_mysql",
        BackendKind::Mysql,
        two_servers_land_each_event_once,
    );
}

/// PostgreSQL: a request held in flight (its table locked by the test)
/// makes the same key answer 409 from anywhere (its own process, which
/// also answers another body 422, and a second serve process, which holds
/// no row to compare the body with), then commits once.
#[test]
fn a_request_in_flight_answers_409_to_its_retry() {
    crate::common::with_backend("in_flight_409", BackendKind::Postgres, |env| {
        let p = pipeline(env, "inflight", "key = \"id\"", "");
        let server = Server::start(env, &p, "127.0.0.1:0", &[]);
        let elsewhere = Server::start(env, &p, "127.0.0.1:0", &[]);
        let url = server.url("/v1/records");
        let rt = runtime();
        let c = client();
        let body = ndjson(&[json!({"id": 1}), json!({"id": 2})]);
        rt.block_on(post(
            &c,
            &url,
            Some("warm"),
            None,
            ndjson(&[json!({"id": 0})]),
        ))
        .unwrap();
        env.backend
            .execute("BEGIN; LOCK TABLE inflight IN ACCESS EXCLUSIVE MODE");
        let first = {
            let (c, url, body) = (c.clone(), url.clone(), body.clone());
            rt.spawn(async move { post(&c, &url, Some("\"slow\""), None, body).await })
        };
        // Its key taken, then stuck on the lock.
        wait_for_table_lock(env, "inflight");
        let retry = rt
            .block_on(post(&c, &url, Some("\"slow\""), None, body.clone()))
            .unwrap();
        assert_eq!(retry.status, 409, "{retry:?}");
        let other = rt
            .block_on(post(&c, &url, Some("\"slow\""), None, "{\"id\": 9}"))
            .unwrap();
        assert_eq!(other.status, 422, "{other:?}");
        let there = elsewhere.url("/v1/records");
        for sent in [body.clone(), "{\"id\": 9}".to_string()] {
            let retry = rt
                .block_on(post(&c, &there, Some("\"slow\""), None, sent))
                .unwrap();
            assert_eq!(retry.status, 409, "{retry:?}");
        }
        env.backend.execute("COMMIT");
        let first = rt.block_on(first).unwrap().unwrap();
        assert_eq!(first.status, 200, "{first:?}");
        assert_eq!(first.json()["inserted"], 2);
        for url in [&url, &there] {
            let again = rt
                .block_on(post(&c, url, Some("\"slow\""), None, body.clone()))
                .unwrap();
            assert!(again.replayed, "{again:?}");
            assert_eq!(again.body, first.body);
        }
        assert_eq!(env.backend.count("inflight"), 3);
    });
}

/// PostgreSQL: a serve process that stops mid-request (SIGSTOP, or cut off
/// from the server without its connection closing) holds its key only
/// `claim_lease`: the server ends its idle transaction, another process
/// then lands the request, and the stopped one, resumed, answers with that
/// stored response.
#[test]
fn a_stopped_server_holds_its_key_only_for_the_claim_lease() {
    crate::common::with_backend("stopped_holder", BackendKind::Postgres, |env| {
        let p = pipeline(env, "stopped", "key = \"id\"", "claim_lease = \"1s\"");
        let stopped = Server::start(env, &p, "127.0.0.1:0", &[]);
        let other = Server::start(env, &p, "127.0.0.1:0", &[]);
        let rt = runtime();
        let c = client();
        let body = ndjson(&[json!({"id": 1}), json!({"id": 2})]);
        rt.block_on(post(
            &c,
            &stopped.url("/v1/records"),
            Some("warm"),
            None,
            "{\"id\": 0}",
        ))
        .unwrap();
        env.backend
            .execute("BEGIN; LOCK TABLE stopped IN ACCESS EXCLUSIVE MODE");
        let first = {
            let (c, url, body) = (c.clone(), stopped.url("/v1/records"), body.clone());
            rt.spawn(async move { post(&c, &url, Some("k"), None, body).await })
        };
        wait_for_table_lock(env, "stopped");
        stopped.signal(nix::sys::signal::Signal::SIGSTOP);
        let there = other.url("/v1/records");
        let mut retry = rt
            .block_on(post(&c, &there, Some("k"), None, body.clone()))
            .unwrap();
        assert_eq!(
            retry.status, 409,
            "held while its transaction lives: {retry:?}"
        );
        // Its statement done, the stopped process's transaction sits idle.
        env.backend.execute("COMMIT");
        let deadline = Instant::now() + Duration::from_secs(20);
        while retry.status == 409 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            retry = rt
                .block_on(post(&c, &there, Some("k"), None, body.clone()))
                .unwrap();
        }
        assert_eq!(retry.status, 200, "{retry:?}\n{}", other.log());
        assert!(!retry.replayed);
        assert_eq!(retry.json()["inserted"], 2);
        stopped.signal(nix::sys::signal::Signal::SIGCONT);
        let first = rt.block_on(first).unwrap().unwrap();
        assert_eq!(first.status, 200, "{first:?}\n{}", stopped.log());
        assert!(first.replayed, "{first:?}");
        assert_eq!(first.body, retry.body);
        assert_eq!(env.backend.count("stopped"), 3);
    });
}

/// Waits until a session waits for a lock on `table` (PostgreSQL).
fn wait_for_table_lock(env: &Env, table: &str) {
    let waiting = format!(
        "SELECT count(*) FROM pg_locks WHERE relation = '{table}'::regclass AND NOT granted"
    );
    assert!(
        crate::common::wait_until(Duration::from_secs(30), || {
            env.backend.scalar_i64(&waiting).unwrap_or(0) > 0
        }),
        "nothing waited for {table}"
    );
}

/// SIGTERM while a request is in flight: it commits and is answered, then
/// the process exits 0; nothing is half-written.
#[test]
fn sigterm_lets_the_request_in_flight_commit_and_exits_0() {
    crate::common::with_backend("sigterm", BackendKind::Postgres, |env| {
        let p = pipeline(env, "term", "key = \"id\"", "");
        let mut server = Server::start(env, &p, "127.0.0.1:0", &[]);
        let url = server.url("/v1/records");
        let rt = runtime();
        let c = client();
        rt.block_on(post(
            &c,
            &url,
            Some("warm"),
            None,
            ndjson(&[json!({"id": 0})]),
        ))
        .unwrap();
        env.backend
            .execute("BEGIN; LOCK TABLE term IN ACCESS EXCLUSIVE MODE");
        let body = ndjson(&(1..=500).map(|i| json!({"id": i})).collect::<Vec<_>>());
        let first = {
            let (c, url) = (c.clone(), url.clone());
            rt.spawn(async move { post(&c, &url, Some("in-flight"), None, body).await })
        };
        wait_for_table_lock(env, "term");
        server.signal(nix::sys::signal::Signal::SIGTERM);
        std::thread::sleep(Duration::from_millis(300));
        // Still running: it waits for the request in flight.
        assert_eq!(server.wait(Duration::ZERO), None, "{}", server.log());
        env.backend.execute("COMMIT");
        let answer = rt.block_on(first).unwrap().unwrap();
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.json()["inserted"], 500);
        assert_eq!(
            server.wait(Duration::from_secs(30)),
            Some(0),
            "{}",
            server.log()
        );
        assert_eq!(env.backend.count("term"), 501);
        assert_eq!(
            env.backend
                .scalar_i64("SELECT count(*) FROM _idemload_requests WHERE status = 'done'"),
            Some(2)
        );
    });
}

/// A pipeline without [source] is for serve only; `run` says so.
#[test]
fn a_serve_only_pipeline_has_no_source_to_run() {
    crate::common::with_backend("serve_only", BackendKind::Sqlite, |env| {
        let p = pipeline(env, "only", "key = \"id\"", "");
        let out = env.run(&p, &[]);
        out.code(2);
        assert!(out.stderr.contains("idemload serve"), "{}", out.stderr);
        let bad = env.write(
            "staged.toml",
            format!(
                "name = \"s\"\n[destination]\nurl = \"{}\"\ntable = \"s\"\n[load]\nmode = \"replace\"\n[serve]\n",
                env.url()
            ),
        );
        let out = env.idemload(&["serve", bad.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
        out.code(2);
        assert!(out.stderr.contains("merge"), "{}", out.stderr);
    });
}

idemtest!(
    expired_keys_are_deleted_in_the_background_and_free_again,
    |env| {
        let p = pipeline(env, "retained", "key = \"id\"", "key_retention = \"1s\"");
        let server = Server::start(env, &p, "127.0.0.1:0", &[]);
        let url = server.url("/v1/records");
        let rt = runtime();
        let c = client();
        let a = rt
            .block_on(post(&c, &url, Some("k"), None, "{\"id\": 1}"))
            .unwrap();
        assert_eq!(a.status, 200, "{a:?}");
        assert!(
            crate::common::wait_until(Duration::from_secs(20), || {
                env.backend
                    .scalar_i64("SELECT count(*) FROM _idemload_requests")
                    == Some(0)
            }),
            "{}",
            server.log()
        );
        // Forgotten: the key is a new request now, not a mismatch.
        let b = rt
            .block_on(post(&c, &url, Some("k"), None, "{\"id\": 2}"))
            .unwrap();
        assert_eq!(b.status, 200, "{b:?}");
        assert!(!b.replayed);
        assert_eq!(env.backend.count("retained"), 2);
        // The cleaner logs once its delete has returned, a moment after the
        // rows are gone.
        assert!(
            crate::common::wait_until(Duration::from_secs(10), || server
                .log()
                .contains("Expired request keys deleted.")),
            "{}",
            server.log()
        );
    }
);

// Requests that arrive together may share one transaction (group commit,
// PostgreSQL): each answer must still be the one the request would get
// committed alone, one after another. 200 requests at once over 10 record
// keys, every value different: each key is inserted by exactly one request
// and updated by every other, and a request naming a key twice counts one
// duplicate of its own. With an integer key (compared in memory) and a text
// key (the run's keys in a temporary table).
fn requests_together(env: &Env, text_key: bool) {
    const REQUESTS: usize = 200;
    const KEYS: usize = 10;
    let id = move |i: usize| {
        if text_key {
            json!(format!("k-{}", i % KEYS))
        } else {
            json!(i % KEYS)
        }
    };
    let p = pipeline(env, "together", "key = \"id\"", "");
    let server = Server::start(env, &p, "127.0.0.1:0", &[]);
    let url = server.url("/v1/records");
    let rt = runtime();
    let answers = send_together(&rt, &url, REQUESTS, |i| {
        let mut records = vec![json!({"id": id(i), "v": i})];
        if i % 7 == 0 {
            // The same key again in the same request, newer.
            records.push(json!({"id": id(i), "v": REQUESTS + i}));
        }
        (format!("\"together-{i}\""), records)
    });
    let (mut inserted, mut updated, mut duplicates) = (0, 0, 0);
    for (i, a) in &answers {
        assert_eq!(a.status, 200, "request {i}: {a:?}");
        let v = a.json();
        assert_eq!(
            v["inserted"].as_u64().unwrap() + v["updated"].as_u64().unwrap(),
            1,
            "request {i} changed its key's row exactly once: {v}"
        );
        assert_eq!(v["duplicates"], u64::from(i % 7 == 0), "request {i}: {v}");
        inserted += v["inserted"].as_u64().unwrap();
        updated += v["updated"].as_u64().unwrap();
        duplicates += v["duplicates"].as_u64().unwrap();
    }
    assert_eq!(inserted, KEYS as u64, "each key inserted by one request");
    assert_eq!(updated, (REQUESTS - KEYS) as u64);
    assert_eq!(duplicates, REQUESTS.div_ceil(7) as u64);
    assert_eq!(env.backend.count("together"), KEYS as u64);
    assert_eq!(
        env.backend
            .scalar_i64("SELECT count(*) FROM _idemload_requests WHERE status = 'done'"),
        Some(REQUESTS as i64)
    );
    if env.backend.kind == BackendKind::Postgres {
        assert_grouped(&rt, &server, REQUESTS);
    }
}

idemtest!(requests_committed_together_answer_as_if_alone, |env| {
    requests_together(env, false)
});

idemtest!(
    requests_committed_together_answer_as_if_alone_with_a_text_key,
    |env| { requests_together(env, true) }
);

/// Sends `n` requests at once, request `i` with the key and records
/// `request(i)`, each until it gets neither 409 nor 5xx; each answer with
/// its `i`.
fn send_together(
    rt: &tokio::runtime::Runtime,
    url: &str,
    n: usize,
    request: impl Fn(usize) -> (String, Vec<Value>),
) -> Vec<(usize, Answer)> {
    rt.block_on(async {
        let c = client();
        let tasks = (0..n).map(|i| {
            let (key, records) = request(i);
            let c = c.clone();
            async move {
                let mut pause = Duration::from_millis(20);
                loop {
                    let a = post(&c, url, Some(&key), None, ndjson(&records))
                        .await
                        .expect("the server answers");
                    if a.status != 409 && a.status < 500 {
                        return (i, a);
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
            }
        });
        futures_util::future::join_all(tasks).await
    })
}

/// On PostgreSQL, `sent` simultaneous requests were not all committed
/// alone (`idemload_commit_group_requests` in /metrics).
fn assert_grouped(rt: &tokio::runtime::Runtime, server: &Server, sent: usize) {
    let metrics = rt.block_on(async {
        client()
            .get(server.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in /metrics:\n{metrics}"))
    };
    let (requests, groups) = (
        value("idemload_commit_group_requests_sum"),
        value("idemload_commit_group_requests_count"),
    );
    assert!(
        requests > groups,
        "no two of {sent} simultaneous requests shared a transaction ({requests} requests in {groups} groups)"
    );
}

// Requests with keys of their own, sent together over a table that holds
// some of them: a group reads the stored rows once and copies its new rows
// in once, and each answer is still exactly its own: request i inserts key
// 1000 + i, and for i < 100 finds key i unchanged (even i) or changes it.
idemtest!(
    simultaneous_requests_with_their_own_keys_answer_exactly,
    |env| {
        const REQUESTS: usize = 200;
        let p = pipeline(env, "own", "key = \"id\"", "");
        let server = Server::start(env, &p, "127.0.0.1:0", &[]);
        let url = server.url("/v1/records");
        let rt = runtime();
        let stored: Vec<Value> = (0..100).map(|i| json!({"id": i, "v": 0})).collect();
        let first = rt
            .block_on(post(&client(), &url, Some("stored"), None, ndjson(&stored)))
            .unwrap();
        assert_eq!(first.json()["inserted"], 100, "{first:?}");
        let answers = send_together(&rt, &url, REQUESTS, |i| {
            let mut records = vec![json!({"id": 1000 + i, "v": i})];
            if i < 100 {
                records.push(json!({"id": i, "v": i % 2}));
            }
            (format!("own-{i}"), records)
        });
        for (i, a) in &answers {
            assert_eq!(a.status, 200, "request {i}: {a:?}");
            let v = a.json();
            let (unchanged, updated) = match i {
                i if *i >= 100 => (0, 0),
                i if i % 2 == 0 => (1, 0),
                _ => (0, 1),
            };
            assert_eq!(
                (
                    &v["inserted"],
                    &v["unchanged"],
                    &v["updated"],
                    &v["duplicates"]
                ),
                (&json!(1), &json!(unchanged), &json!(updated), &json!(0)),
                "request {i}: {v}"
            );
        }
        assert_eq!(env.backend.count("own"), 100 + REQUESTS as u64);
        assert_eq!(
            env.backend
                .scalar_i64("SELECT count(*) FROM own WHERE id < 100 AND v = 1"),
            Some(50)
        );
        if env.backend.kind == BackendKind::Postgres {
            assert_grouped(&rt, &server, REQUESTS);
        }
    }
);

// Two waves of simultaneous requests over the same keys, the second adding
// a column for its odd keys: a group reads its stored rows as it takes its
// keys, with the columns the previous group saw, so a wave that adds a
// column must read them again. Every even key is unchanged, every odd one
// updated once.
idemtest!(
    a_group_that_adds_a_column_compares_with_the_new_columns,
    |env| {
        const REQUESTS: usize = 200;
        let p = pipeline(env, "widened", "key = \"id\"", "");
        let server = Server::start(env, &p, "127.0.0.1:0", &[]);
        let url = server.url("/v1/records");
        let rt = runtime();
        let first = send_together(&rt, &url, REQUESTS, |i| {
            (format!("first-{i}"), vec![json!({"id": i, "v": i})])
        });
        assert!(first.iter().all(|(_, a)| a.json()["inserted"] == 1));
        let second = send_together(&rt, &url, REQUESTS, |i| {
            let mut record = json!({"id": i, "v": i});
            if i % 2 == 1 {
                record["w"] = json!(format!("w-{i}"));
            }
            (format!("second-{i}"), vec![record])
        });
        for (i, a) in &second {
            let v = a.json();
            assert_eq!(
                (&v["updated"], &v["unchanged"], &v["inserted"]),
                (&json!(i % 2), &json!(1 - i % 2), &json!(0)),
                "request {i}: {v}"
            );
        }
        assert_eq!(
            env.backend
                .scalar_i64("SELECT count(*) FROM widened WHERE w IS NOT NULL"),
            Some(REQUESTS as i64 / 2)
        );
        if env.backend.kind == BackendKind::Postgres {
            assert_grouped(&rt, &server, 2 * REQUESTS);
        }
    }
);

// Twenty attempts of one request at the same moment: exactly one processes
// it, every other gets 409 (its key in flight) or its stored response
// replayed, and its rows are stored once.
idemtest!(
    simultaneous_attempts_of_one_request_process_it_once,
    |env| {
        const ATTEMPTS: usize = 20;
        let p = pipeline(env, "once", "key = \"id\"", "");
        let server = Server::start(env, &p, "127.0.0.1:0", &[]);
        let url = server.url("/v1/records");
        let rt = runtime();
        let body = ndjson(&[json!({"id": 1, "v": "a"}), json!({"id": 2, "v": "b"})]);
        let answers: Vec<Answer> = rt.block_on(async {
            let c = client();
            let attempts =
                (0..ATTEMPTS).map(|_| post(&c, &url, Some("\"the-one\""), None, body.clone()));
            futures_util::future::join_all(attempts)
                .await
                .into_iter()
                .map(|a| a.expect("the server answers"))
                .collect()
        });
        let processed: Vec<&Answer> = answers
            .iter()
            .filter(|a| a.status == 200 && !a.replayed)
            .collect();
        assert_eq!(processed.len(), 1, "{answers:#?}");
        assert_eq!(processed[0].json()["inserted"], 2, "{answers:#?}");
        for a in &answers {
            assert!(
                a.status == 409 || (a.status == 200 && a.body == processed[0].body),
                "{a:?}"
            );
        }
        assert_eq!(env.backend.count("once"), 2);
    }
);
