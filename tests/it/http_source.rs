//! HTTP sources (spec: "HTTP sources", issue 4): every pagination style end
//! to end, faults that a retry absorbs or that fail cleanly and then re-run
//! exactly, overlapping billing cycles, and a newest-first list that shifts
//! while the run pages through it. A real server on 127.0.0.1:0 and the real
//! binary; SQLite as the destination.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

// ---- a tiny HTTP server -------------------------------------------------

#[derive(Debug, Clone)]
struct Req {
    path: String,
    query: BTreeMap<String, String>,
    headers: BTreeMap<String, String>,
}

impl Req {
    fn num(&self, name: &str, default: usize) -> usize {
        self.query
            .get(name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }
}

enum Fault {
    None,
    /// Send the headers and half the body, then close.
    Cut,
    /// Wait before answering.
    Delay(Duration),
}

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    fault: Fault,
}

fn ok(body: Value) -> Resp {
    Resp {
        status: 200,
        headers: vec![],
        body: body.to_string().into_bytes(),
        fault: Fault::None,
    }
}

fn status(code: u16, headers: &[(&str, &str)]) -> Resp {
    Resp {
        status: code,
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        body: "{\"error\":\"nope\"}".into(),
        fault: Fault::None,
    }
}

type Handler = Arc<dyn Fn(&Req) -> Resp + Send + Sync>;

struct Server {
    base: String,
    log: Arc<Mutex<Vec<Req>>>,
}

impl Server {
    fn requests(&self) -> Vec<Req> {
        self.log.lock().unwrap().clone()
    }
}

fn serve(handler: impl Fn(&Req) -> Resp + Send + Sync + 'static) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let handler: Handler = Arc::new(handler);
    let log2 = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let (handler, log) = (handler.clone(), log2.clone());
            std::thread::spawn(move || answer(stream, &handler, &log));
        }
    });
    Server { base, log }
}

fn answer(mut stream: TcpStream, handler: &Handler, log: &Mutex<Vec<Req>>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let target = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("/")
        .to_string();
    let (path, qs) = target.split_once('?').unwrap_or((&target, ""));
    let query = qs
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect();
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
        .collect();
    let req = Req {
        path: path.to_string(),
        query,
        headers,
    };
    log.lock().unwrap().push(req.clone());
    let resp = handler(&req);
    if let Fault::Delay(d) = resp.fault {
        std::thread::sleep(d);
    }
    let reason = match resp.status {
        200 => "OK",
        401 => "Unauthorized",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Whatever",
    };
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        resp.status,
        resp.body.len()
    );
    for (k, v) in &resp.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let body = &resp.body[..];
    let _ = stream.write_all(out.as_bytes());
    if let Fault::Cut = resp.fault {
        let _ = stream.write_all(&body[..body.len() / 2]);
        let _ = stream.flush();
        let _ = stream.shutdown(Shutdown::Both);
        return;
    }
    let _ = stream.write_all(body);
    let _ = stream.flush();
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---- running the binary ---------------------------------------------------

struct Dir {
    _tmp: tempfile::TempDir,
    path: PathBuf,
}

fn dir() -> Dir {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().to_path_buf();
    Dir { _tmp: tmp, path }
}

impl Dir {
    fn db(&self) -> PathBuf {
        self.path.join("w.db")
    }

    /// Writes a pipeline into table `t` with this `[source]` body and `[load]`.
    fn pipeline(&self, source: &str, load: &str) -> PathBuf {
        let file = self.path.join("p.toml");
        let text = format!(
            "name = \"api\"\n[source]\ntype = \"http\"\n{source}\n[destination]\nurl = \"sqlite://{}\"\ntable = \"t\"\n[load]\n{load}\n",
            self.db().display()
        );
        // [load] must come before nested [source.*] tables end up in it:
        // reorder so nested source tables follow [source].
        std::fs::write(&file, reorder(&text)).unwrap();
        file
    }
}

/// Moves `[load]` and `[destination]` above the first `[source.*]` table so
/// the bare keys of `[source]` stay in it.
fn reorder(text: &str) -> String {
    let mut head = String::new();
    let mut nested = String::new();
    let mut tail = String::new();
    let mut section = "head";
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("[source.") {
            section = "nested";
        } else if t == "[destination]" || t == "[load]" {
            section = "tail";
        } else if t == "[source]" {
            section = "head";
        }
        let into = match section {
            "nested" => &mut nested,
            "tail" => &mut tail,
            _ => &mut head,
        };
        into.push_str(line);
        into.push('\n');
    }
    format!("{head}{tail}{nested}")
}

struct Outcome {
    code: i32,
    json: Value,
    stderr: String,
}

fn run(pipeline: &Path, envs: &[(&str, &str)]) -> Outcome {
    let out = Command::new(env!("CARGO_BIN_EXE_idemload"))
        .arg("run")
        .arg(pipeline)
        .arg("--json")
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    Outcome {
        code: out.status.code().unwrap_or(-1),
        json: serde_json::from_str(stdout.trim()).unwrap_or(Value::Null),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn run_ok(pipeline: &Path) -> Value {
    let o = run(pipeline, &[]);
    assert_eq!(o.code, 0, "run failed:\n{}", o.stderr);
    o.json
}

/// The rows of a query, each as `a|b|c`.
fn rows(db: &Path, sql: &str) -> Vec<String> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn.prepare(sql).unwrap();
    let n = stmt.column_count();
    let mut rows = stmt.query([]).unwrap();
    let mut out = Vec::new();
    while let Some(row) = rows.next().unwrap() {
        let cells: Vec<String> = (0..n)
            .map(|i| match row.get_ref(i).unwrap() {
                rusqlite::types::ValueRef::Null => "NULL".into(),
                rusqlite::types::ValueRef::Integer(v) => v.to_string(),
                rusqlite::types::ValueRef::Real(v) => v.to_string(),
                rusqlite::types::ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
                rusqlite::types::ValueRef::Blob(_) => "BLOB".into(),
            })
            .collect();
        out.push(cells.join("|"));
    }
    out
}

fn eq_rows(got: Vec<String>, expected: Vec<String>) {
    if got != expected {
        panic!(
            "\nexpected:\n{}\n\ngot:\n{}\n",
            expected.join("\n"),
            got.join("\n")
        );
    }
}

// ---- data -----------------------------------------------------------------

fn ts(minute: i64) -> String {
    (chrono::DateTime::parse_from_rfc3339("2024-03-01T00:00:00Z").unwrap()
        + chrono::Duration::minutes(minute))
    .with_timezone(&chrono::Utc)
    .format("%Y-%m-%dT%H:%M:%SZ")
    .to_string()
}

fn contact(i: i64) -> Value {
    json!({"id": i, "name": format!("c{i}"), "updated_at": ts(i)})
}

fn contacts(n: i64) -> Vec<Value> {
    (1..=n).map(contact).collect()
}

fn expected_contacts(ids: impl IntoIterator<Item = i64>) -> Vec<String> {
    ids.into_iter().map(|i| format!("{i}|c{i}")).collect()
}

fn table(db: &Path) -> Vec<String> {
    rows(db, "SELECT id, name FROM t ORDER BY id")
}

fn page_of(all: &[Value], req: &Req) -> Vec<Value> {
    let size = req.num("per_page", 10);
    let page = req.num("page", 1);
    all.iter()
        .skip((page - 1) * size)
        .take(size)
        .cloned()
        .collect()
}

const PAGE: &str = "url = \"{base}/v1/contacts\"\nrecords = \"data.items\"\n[source.pagination]\ntype = \"page\"\nsize = 5";

fn page_source(base: &str) -> String {
    PAGE.replace("{base}", base)
}

fn page_server(all: Vec<Value>) -> Server {
    serve(move |req| ok(json!({"data": {"items": page_of(&all, req)}})))
}

// ---- pagination styles ----------------------------------------------------

#[test]
fn page_pagination_reads_a_full_last_page_and_stops_on_the_empty_one() {
    let server = page_server(contacts(25));
    let d = dir();
    let p = d.pipeline(&page_source(&server.base), "");
    let report = run_ok(&p);
    assert_eq!(report["read"], 25);
    assert_eq!(report["inserted"], 25);
    eq_rows(table(&d.db()), expected_contacts(1..=25));
    let pages: Vec<String> = server
        .requests()
        .iter()
        .map(|r| r.query["page"].clone())
        .collect();
    assert_eq!(
        pages,
        ["1", "2", "3", "4", "5", "6"],
        "five full pages, then the empty sixth"
    );
    assert!(server.requests().iter().all(|r| r.path == "/v1/contacts"));
    let again = run_ok(&p);
    assert_eq!(
        (again["inserted"].as_u64(), again["updated"].as_u64()),
        (Some(0), Some(0))
    );
}

#[test]
fn page_pagination_stops_at_the_declared_total_without_an_extra_request() {
    let all = contacts(23);
    let server =
        serve(move |req| ok(json!({"data": {"items": page_of(&all, req)}, "meta": {"total": 23}})));
    let d = dir();
    let src = format!(
        "{}\ntotal_path = \"meta.total\"\nfirst_page = 1",
        page_source(&server.base)
    );
    let p = d.pipeline(&src, "");
    run_ok(&p);
    eq_rows(table(&d.db()), expected_contacts(1..=23));
    assert_eq!(server.requests().len(), 5);
}

#[test]
fn offset_pagination_advances_by_records_read_and_stops_on_an_empty_page() {
    let all = contacts(12);
    // The API caps pages at 4 whatever the limit asked: paging must go on.
    let server = serve(move |req| {
        let offset = req.num("offset", 0);
        let limit = req.num("limit", 100).min(4);
        ok(json!({"items": all.iter().skip(offset).take(limit).collect::<Vec<_>>()}))
    });
    let d = dir();
    let src = format!(
        "url = \"{}/v1/contacts\"\nrecords = \"items\"\n[source.pagination]\ntype = \"offset\"\nsize = 5",
        server.base
    );
    run_ok(&d.pipeline(&src, ""));
    eq_rows(table(&d.db()), expected_contacts(1..=12));
    let offsets: Vec<String> = server
        .requests()
        .iter()
        .map(|r| r.query["offset"].clone())
        .collect();
    assert_eq!(offsets, ["0", "4", "8", "12"]);
}

fn cursor_server(all: Vec<Value>, size: usize, last_token: Value) -> Server {
    serve(move |req| {
        let start: usize = req
            .query
            .get("after")
            .map_or(0, |t| t.trim_start_matches("tok").parse().unwrap());
        let items: Vec<Value> = all.iter().skip(start).take(size).cloned().collect();
        let end = start + items.len();
        let next = if end < all.len() {
            json!(format!("tok{end}"))
        } else {
            last_token.clone()
        };
        let mut body = json!({"results": items, "paging": {}});
        if !next.is_null() || last_token == json!("explicit-null") {
            body["paging"]["next"] = if next == json!("explicit-null") {
                Value::Null
            } else {
                next
            };
        }
        ok(body)
    })
}

#[test]
fn cursor_pagination_stops_when_the_next_token_is_missing_null_or_empty() {
    for last in [Value::Null, json!("explicit-null"), json!("")] {
        let server = cursor_server(contacts(11), 4, last.clone());
        let d = dir();
        let src = format!(
            "url = \"{}/v1/contacts\"\nrecords = \"results\"\n[source.pagination]\ntype = \"cursor\"\ncursor_path = \"paging.next\"\ncursor_param = \"after\"",
            server.base
        );
        run_ok(&d.pipeline(&src, ""));
        eq_rows(table(&d.db()), expected_contacts(1..=11));
        assert_eq!(server.requests().len(), 3, "last token {last}");
    }
}

#[test]
fn link_pagination_follows_rel_next_and_keeps_the_api_key() {
    let all = contacts(9);
    let server = serve(move |req| {
        if req.query.get("api_key").map(String::as_str) != Some("k-123") {
            return status(401, &[]);
        }
        let page = req.num("page", 1);
        let items: Vec<Value> = all.iter().skip((page - 1) * 4).take(4).cloned().collect();
        let mut resp = ok(Value::Array(items));
        if page * 4 < all.len() {
            resp.headers.push((
                "Link".into(),
                format!(
                    "</v1/contacts?page={}>; rel=\"next\", </v1/contacts?page=1>; rel=\"first\"",
                    page + 1
                ),
            ));
        }
        resp
    });
    let d = dir();
    let src = format!(
        "url = \"{}/v1/contacts\"\nparams = {{ api_key = \"k-123\" }}\n[source.pagination]\ntype = \"link\"",
        server.base
    );
    run_ok(&d.pipeline(&src, ""));
    eq_rows(table(&d.db()), expected_contacts(1..=9));
    assert_eq!(server.requests().len(), 3);
}

#[test]
fn no_pagination_reads_one_body_that_is_the_array() {
    let all = contacts(3);
    let server = serve(move |_| ok(Value::Array(all.clone())));
    let d = dir();
    run_ok(&d.pipeline(&format!("url = \"{}/v1/contacts\"", server.base), ""));
    eq_rows(table(&d.db()), expected_contacts(1..=3));
    assert_eq!(server.requests().len(), 1);
}

// ---- faults -----------------------------------------------------------------

/// A page server whose `fault` decides, per request number (from 1) and
/// page, whether to answer normally.
fn faulty(
    all: Vec<Value>,
    fault: impl Fn(usize, &Req) -> Option<Resp> + Send + Sync + 'static,
) -> Server {
    let count = Arc::new(Mutex::new(0usize));
    serve(move |req| {
        let n = {
            let mut c = count.lock().unwrap();
            *c += 1;
            *c
        };
        fault(n, req).unwrap_or_else(|| ok(json!({"data": {"items": page_of(&all, req)}})))
    })
}

fn fast_retry(base: &str) -> String {
    format!(
        "{}\n[source.retry]\nattempts = 4\nbackoff = \"20ms\"",
        page_source(base)
    )
}

#[test]
fn a_429_with_retry_after_is_waited_out_and_the_table_is_exact() {
    let server = faulty(contacts(12), |n, _: &Req| {
        (n == 2).then(|| status(429, &[("Retry-After", "1")]))
    });
    let d = dir();
    let started = Instant::now();
    run_ok(&d.pipeline(&fast_retry(&server.base), ""));
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "Retry-After: 1 honoured"
    );
    eq_rows(table(&d.db()), expected_contacts(1..=12));
}

#[test]
fn two_500s_then_success_load_the_exact_table() {
    let server = faulty(contacts(12), |n, _: &Req| {
        (n == 2 || n == 3).then(|| status(500, &[]))
    });
    let d = dir();
    let report = run_ok(&d.pipeline(&fast_retry(&server.base), ""));
    assert_eq!(report["read"], 12);
    eq_rows(table(&d.db()), expected_contacts(1..=12));
    assert_eq!(server.requests().len(), 4 + 2);
}

#[test]
fn a_connection_cut_mid_body_is_retried_and_the_table_is_exact() {
    let all = contacts(12);
    let all2 = all.clone();
    let server = faulty(all, move |n, req: &Req| {
        (n == 2).then(|| {
            let mut r = ok(json!({"data": {"items": page_of(&all2, req)}}));
            r.fault = Fault::Cut;
            r
        })
    });
    let d = dir();
    run_ok(&d.pipeline(&fast_retry(&server.base), ""));
    eq_rows(table(&d.db()), expected_contacts(1..=12));
    assert_eq!(
        server.requests().len(),
        4 + 1,
        "the cut page was asked again"
    );
}

#[test]
fn a_response_slower_than_the_timeout_is_retried_and_the_table_is_exact() {
    let server = faulty(contacts(12), |n, _: &Req| {
        (n == 2).then(|| {
            let mut r = ok(json!({"data": {"items": []}}));
            r.fault = Fault::Delay(Duration::from_millis(1500));
            r
        })
    });
    let d = dir();
    let src = format!("timeout = \"300ms\"\n{}", fast_retry(&server.base));
    run_ok(&d.pipeline(&src, ""));
    eq_rows(table(&d.db()), expected_contacts(1..=12));
    assert_eq!(
        server.requests().len(),
        4 + 1,
        "the slow page was asked again"
    );
}

/// A server whose page `broken` is bad until `fixed` is set.
fn broken_page(broken: usize, bad: fn() -> Resp) -> (Server, Arc<Mutex<bool>>) {
    let fixed = Arc::new(Mutex::new(false));
    let f = fixed.clone();
    let all = contacts(12);
    let server = serve(move |req| {
        if req.num("page", 1) == broken && !*f.lock().unwrap() {
            return bad();
        }
        ok(json!({"data": {"items": page_of(&all, req)}}))
    });
    (server, fixed)
}

fn fails_cleanly_then_reruns_exactly(bad: fn() -> Resp, says: &str) {
    let (server, fixed) = broken_page(2, bad);
    let d = dir();
    let src = format!(
        "url = \"{}/v1/contacts\"\nparams = {{ api_key = \"s3cr3t-key\" }}\nrecords = \"data.items\"\n[source.pagination]\ntype = \"page\"\nsize = 5",
        server.base
    );
    let p = d.pipeline(&src, "batch_size = 5");
    let failed = run(&p, &[]);
    assert_eq!(failed.code, 1, "{}", failed.stderr);
    assert!(
        failed.stderr.contains(says),
        "stderr names the cause:\n{}",
        failed.stderr
    );
    assert!(
        failed
            .stderr
            .contains(&format!("{}/v1/contacts (page 2)", server.base)),
        "{}",
        failed.stderr
    );
    assert!(
        !failed.stderr.contains("s3cr3t-key"),
        "secret leaked:\n{}",
        failed.stderr
    );
    let status = rows(&d.db(), "SELECT status FROM _idemload_runs");
    assert_eq!(status, ["failed"]);
    *fixed.lock().unwrap() = true;
    run_ok(&p);
    eq_rows(table(&d.db()), expected_contacts(1..=12));
}

#[test]
fn a_non_json_page_fails_cleanly_and_the_rerun_is_exact() {
    fails_cleanly_then_reruns_exactly(
        || Resp {
            status: 200,
            headers: vec![],
            body: "<html>maintenance</html>".into(),
            fault: Fault::None,
        },
        "response body is not JSON",
    );
}

#[test]
fn a_missing_records_path_fails_cleanly_and_the_rerun_is_exact() {
    fails_cleanly_then_reruns_exactly(
        || ok(json!({"error": "rate limited"})),
        "records path \"data.items\" is not in the response body",
    );
}

#[test]
fn retries_run_out_with_the_url_status_and_attempts_named_and_no_secret() {
    let server = faulty(contacts(12), |_, req: &Req| {
        (req.num("page", 1) == 2).then(|| status(503, &[]))
    });
    let d = dir();
    let src = format!(
        "url = \"{}/v1/contacts\"\nrecords = \"data.items\"\nparams = {{ token = \"tok-s3cr3t\" }}\nheaders = {{ Authorization = \"Bearer ${{API_TOKEN}}\" }}\n[source.pagination]\ntype = \"page\"\nsize = 5\n[source.retry]\nattempts = 3\nbackoff = \"10ms\"",
        server.base
    );
    let o = run(
        &d.pipeline(&src, ""),
        &[("API_TOKEN", "hdr-s3cr3t"), ("IDEMLOAD_LOG", "debug")],
    );
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(
        o.stderr.contains(&format!(
            "GET {}/v1/contacts (page 2): HTTP 503 Service Unavailable after 3 attempts",
            server.base
        )),
        "{}",
        o.stderr
    );
    assert!(!o.stderr.contains("s3cr3t"), "secret leaked:\n{}", o.stderr);
    assert!(server
        .requests()
        .iter()
        .all(|r| r.headers.get("authorization").map(String::as_str) == Some("Bearer hdr-s3cr3t")));
}

#[test]
fn rejects_name_url_page_and_index_without_the_query() {
    let server = serve(|req| {
        if req.num("page", 1) > 1 {
            return ok(json!([]));
        }
        ok(json!([{"id": 1, "name": "c1"}, 42, {"id": 3, "name": "c3"}]))
    });
    let d = dir();
    let src = format!(
        "url = \"{}/v1/contacts?api_key=q-s3cr3t\"\n[source.pagination]\ntype = \"page\"",
        server.base
    );
    let o = run(&d.pipeline(&src, ""), &[]);
    assert_eq!(o.code, 4, "{}", o.stderr);
    let rejects = rows(&d.db(), "SELECT source_ref, raw FROM _idemload_rejects");
    assert_eq!(rejects, [format!("{}/v1/contacts#1:1|42", server.base)]);
    eq_rows(table(&d.db()), expected_contacts([1, 3]));
}

#[test]
fn ascending_order_commits_the_checkpoint_page_by_page() {
    let (server, fixed) = broken_page(3, || status(500, &[]));
    let d = dir();
    let src = format!(
        "order = \"asc\"\n{}\n[source.retry]\nattempts = 1",
        page_source(&server.base)
    );
    let p = d.pipeline(&src, "cursor = \"updated_at\"\nbatch_size = 1");
    let failed = run(&p, &[]);
    assert_eq!(failed.code, 1, "{}", failed.stderr);
    // Page 1 (records 1-5) committed when page 2 arrived, with the
    // checkpoint it reaches; page 3 failed.
    let checkpoint = rows(&d.db(), "SELECT checkpoint FROM _idemload_state");
    assert_eq!(
        checkpoint.len(),
        1,
        "a checkpoint was committed before the failure"
    );
    assert!(checkpoint[0].contains(&ts(5)), "{checkpoint:?}");
    *fixed.lock().unwrap() = true;
    run_ok(&p);
    eq_rows(table(&d.db()), expected_contacts(1..=12));
}

// ---- overlapping billing cycles ----------------------------------------------

/// Daily usage of two service lines, served by billing cycle (the 15th to
/// the 14th), so cycles overlap calendar months.
#[test]
fn overlapping_billing_cycles_leave_one_row_per_day_and_the_true_monthly_sum() {
    #[derive(Clone)]
    struct Day {
        line: &'static str,
        date: chrono::NaiveDate,
        gb: i64,
        updated_at: String,
    }
    let start = chrono::NaiveDate::from_ymd_opt(2024, 1, 15).unwrap();
    let mut truth: Vec<Day> = Vec::new();
    for line in ["SL-1", "SL-2"] {
        for i in 0..90 {
            let date = start + chrono::Duration::days(i);
            truth.push(Day {
                line,
                date,
                gb: 10 + (i % 7),
                updated_at: format!("{}T06:00:00Z", date + chrono::Duration::days(1)),
            });
        }
    }
    let state = Arc::new(Mutex::new((truth.clone(), (start, start))));
    let s2 = state.clone();
    let server = serve(move |req| {
        let (days, (from, to)) = s2.lock().unwrap().clone();
        let since = req.query.get("updated_since").cloned().unwrap_or_default();
        let mut items: Vec<Value> = days
            .iter()
            .filter(|d| d.date >= from && d.date <= to && d.updated_at >= since)
            .map(|d| json!({"service_line_id": d.line, "usage_date": d.date.to_string(), "gb": d.gb, "updated_at": d.updated_at}))
            .collect();
        let size = req.num("per_page", 10);
        let page = req.num("page", 1);
        items = items
            .into_iter()
            .skip((page - 1) * size)
            .take(size)
            .collect();
        ok(json!({"usage": items}))
    });
    let d = dir();
    let src = format!(
        "url = \"{}/v1/usage\"\nrecords = \"usage\"\n[source.pagination]\ntype = \"page\"\nsize = 7\n[source.incremental]\nparam = \"updated_since\"\nformat = \"rfc3339\"",
        server.base
    );
    let p = d.pipeline(
        &src,
        "key = [\"service_line_id\", \"usage_date\"]\ncursor = \"updated_at\"\nlookback = \"45d\"\ninitial = \"2024-01-01T00:00:00Z\"",
    );
    let cycle = |a: i64, b: i64| {
        (
            start + chrono::Duration::days(a),
            start + chrono::Duration::days(b),
        )
    };
    // Run 1: the first two cycles (Jan 15 - Mar 14).
    state.lock().unwrap().1 = cycle(0, 59);
    run_ok(&p);
    // Run 2: "the last two cycles" (Feb 15 - Apr 14): overlaps run 1 by a cycle,
    // and Feb 20 of SL-1 was corrected by the provider since.
    {
        let mut s = state.lock().unwrap();
        let feb20 = chrono::NaiveDate::from_ymd_opt(2024, 2, 20).unwrap();
        let day =
            s.0.iter_mut()
                .find(|d| d.line == "SL-1" && d.date == feb20)
                .unwrap();
        day.gb = 1000;
        day.updated_at = "2024-04-16T08:00:00Z".into();
        s.1 = cycle(31, 89);
    }
    let second = run_ok(&p);
    assert!(second["updated"].as_u64().unwrap() >= 1);
    // Run 3: everything again, by calendar months this time.
    state.lock().unwrap().1 = cycle(0, 89);
    let third = run_ok(&p);
    assert_eq!(
        (third["inserted"].as_u64(), third["updated"].as_u64()),
        (Some(0), Some(0))
    );

    let truth = state.lock().unwrap().0.clone();
    let count = rows(
        &d.db(),
        "SELECT count(*), count(DISTINCT service_line_id || usage_date) FROM t",
    );
    assert_eq!(count, [format!("{0}|{0}", truth.len())]);
    let feb = rows(&d.db(), "SELECT service_line_id, sum(gb) FROM t WHERE usage_date LIKE '2024-02-%' GROUP BY 1 ORDER BY 1");
    let want: Vec<String> = ["SL-1", "SL-2"]
        .iter()
        .map(|line| {
            let sum: i64 = truth
                .iter()
                .filter(|d| d.line == *line && d.date.to_string().starts_with("2024-02-"))
                .map(|d| d.gb)
                .sum();
            format!("{line}|{sum}")
        })
        .collect();
    eq_rows(feb, want);
    assert_eq!(
        rows(
            &d.db(),
            "SELECT gb FROM t WHERE service_line_id = 'SL-1' AND usage_date = '2024-02-20'"
        ),
        ["1000"]
    );
}

// ---- a newest-first list that shifts while the run pages ----------------------

#[test]
fn items_inserted_at_the_head_while_paging_are_neither_lost_nor_doubled_after_the_next_run() {
    // Newest first, by updated_at; offset pagination.
    let list = Arc::new(Mutex::new((contacts(20), false)));
    let l2 = list.clone();
    let server = serve(move |req| {
        let mut state = l2.lock().unwrap();
        let offset = req.num("offset", 0);
        let limit = req.num("limit", 5);
        let since = req.query.get("updated_since").cloned().unwrap_or_default();
        let mut view: Vec<Value> = state
            .0
            .iter()
            .filter(|c| c["updated_at"].as_str().unwrap() >= since.as_str())
            .cloned()
            .collect();
        view.sort_by(|a, b| b["updated_at"].as_str().cmp(&a["updated_at"].as_str()));
        let page: Vec<Value> = view.into_iter().skip(offset).take(limit).collect();
        if offset == 0 && !state.1 {
            // Right after the first page went out, three contacts arrive
            // (one of them updated an existing contact), shifting offsets.
            state.1 = true;
            for i in [21, 22] {
                state.0.push(contact(i));
            }
            let c5 = state.0.iter_mut().find(|c| c["id"] == 5).unwrap();
            c5["name"] = json!("c5");
            c5["updated_at"] = json!(ts(23));
        }
        ok(json!({"items": page}))
    });
    let d = dir();
    let src = format!(
        "url = \"{}/v1/contacts\"\nrecords = \"items\"\norder = \"desc\"\n[source.pagination]\ntype = \"offset\"\nsize = 5\n[source.incremental]\nparam = \"updated_since\"",
        server.base
    );
    let p = d.pipeline(
        &src,
        "cursor = \"updated_at\"\nlookback = \"10m\"\nbatch_size = 5",
    );
    let first = run_ok(&p);
    // The shift repeats page-1 items on page 2: merged, never doubled.
    assert!(first["duplicates"].as_u64().unwrap() > 0, "{first}");
    let n = rows(&d.db(), "SELECT count(*), count(DISTINCT id) FROM t");
    assert_eq!(
        n[0].split('|').collect::<Vec<_>>()[0],
        n[0].split('|').collect::<Vec<_>>()[1]
    );
    // The next run asks from checkpoint - lookback and picks up the rest.
    run_ok(&p);
    eq_rows(table(&d.db()), expected_contacts(1..=22));
    assert_eq!(
        rows(&d.db(), "SELECT updated_at FROM t WHERE id = 5"),
        [ts(23)]
    );
}

// ---- bounds ---------------------------------------------------------------------

#[test]
fn an_api_that_never_ends_fails_at_max_pages_instead_of_looping() {
    let server = serve(|req| {
        let n: u64 = req.query.get("after").map_or(0, |t| t.parse().unwrap());
        ok(json!({"results": [contact(n as i64 + 1)], "paging": {"next": (n + 1).to_string()}}))
    });
    let d = dir();
    let src = format!(
        "url = \"{}/v1/contacts\"\nrecords = \"results\"\n[source.pagination]\ntype = \"cursor\"\ncursor_path = \"paging.next\"\ncursor_param = \"after\"\nmax_pages = 3",
        server.base
    );
    let o = run(&d.pipeline(&src, ""), &[]);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(o.stderr.contains("max_pages = 3"), "{}", o.stderr);
    assert_eq!(server.requests().len(), 3);
}

#[test]
fn the_rate_limit_spaces_requests() {
    let server = page_server(contacts(25));
    let d = dir();
    let src = format!(
        "{}\n[source.rate_limit]\nrequests_per_second = 10",
        page_source(&server.base)
    );
    let started = Instant::now();
    run_ok(&d.pipeline(&src, ""));
    // Six requests at 10 per second: at least 0.5 s between the first and
    // the last.
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    eq_rows(table(&d.db()), expected_contacts(1..=25));
}

#[test]
fn order_asc_on_an_api_that_is_not_ascending_fails_before_the_checkpoint_runs_ahead() {
    let mut all = contacts(12);
    all.reverse();
    let server = page_server(all);
    let d = dir();
    let src = format!("order = \"asc\"\n{}", page_source(&server.base));
    let o = run(&d.pipeline(&src, "cursor = \"updated_at\""), &[]);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(
        o.stderr.contains("not in ascending \"updated_at\" order"),
        "{}",
        o.stderr
    );
    assert_eq!(
        rows(
            &d.db(),
            "SELECT count(*) FROM _idemload_state WHERE checkpoint IS NOT NULL"
        ),
        ["0"]
    );
}

#[test]
fn gzip_bodies_are_decoded() {
    use std::io::Write as _;
    let all = contacts(7);
    let server = serve(move |req| {
        let asked = req
            .headers
            .get("accept-encoding")
            .is_some_and(|v| v.contains("gzip"));
        let items = if req.num("page", 1) == 1 {
            all.clone()
        } else {
            vec![]
        };
        let body = json!({"data": {"items": items}}).to_string();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(body.as_bytes()).unwrap();
        let mut r = ok(Value::Null);
        r.body = gz.finish().unwrap();
        r.headers.push(("Content-Encoding".into(), "gzip".into()));
        if !asked {
            r.status = 406;
        }
        r
    });
    let d = dir();
    run_ok(&d.pipeline(&page_source(&server.base), ""));
    eq_rows(table(&d.db()), expected_contacts(1..=7));
}
