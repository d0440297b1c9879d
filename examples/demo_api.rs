//! A small JSON API to try the HTTP source against:
//!
//! ```text
//! cargo run --release --example demo_api            # listens on 127.0.0.1:8080
//! cargo run --release --example demo_api -- 9090    # another port (0: any free one)
//! cargo run --release -- run examples/usage_api.toml
//! cargo run --release -- run examples/contacts_api.toml
//! ```
//!
//! - `GET /v1/usage?cycles=N&page=P&per_page=S&updated_since=T`: daily data
//!   usage of two service lines over the last N billing cycles. A cycle runs
//!   from the 15th to the 14th, so every cycle overlaps two calendar months,
//!   and "the last 2 cycles" today overlaps last month's import. Some days
//!   were corrected after the fact (a later `updated_at`). Page pagination,
//!   `meta.total` declares the count.
//! - `GET /v1/contacts?limit=L&after=TOKEN&updated_since=T`: contacts, newest
//!   first, with an opaque next-page token in `paging.next`. Each new listing
//!   (a request without `after`) first adds a contact and updates another, so
//!   every run finds something new (unless `DEMO_API_STILL=1`, which keeps
//!   the contacts as they are: the examples test runs each example twice
//!   and expects the second run to change nothing).
//!
//! Plain `std` threads and a hand-written HTTP/1.1 answer: nothing to learn
//! but the API itself.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use chrono::{Datelike, Duration, NaiveDate};
use serde_json::{json, Value};

/// "Today" for the demo, so every run sees the same history.
const TODAY: (i32, u32, u32) = (2024, 6, 20);

struct Contacts {
    /// (id, name, email, updated_at), any order.
    list: Vec<(u64, String, String, String)>,
    clock: chrono::DateTime<chrono::Utc>,
}

fn main() {
    let port = std::env::args().nth(1).unwrap_or_else(|| "8080".into());
    let listener = TcpListener::bind(format!("127.0.0.1:{port}")).expect("cannot listen");
    let addr = listener.local_addr().expect("no address");
    println!("demo API listening on http://{addr}");
    println!("  http://{addr}/v1/usage?cycles=2&page=1&per_page=100");
    println!("  http://{addr}/v1/contacts?limit=50");
    let start = chrono::DateTime::parse_from_rfc3339("2024-06-01T00:00:00Z")
        .expect("start time")
        .with_timezone(&chrono::Utc);
    let contacts = Arc::new(Mutex::new(Contacts {
        list: (1..=240)
            .map(|i| {
                (
                    i,
                    format!("Contact {i}"),
                    format!("contact{i}@example.com"),
                    rfc3339(start + Duration::minutes(i as i64 * 90)),
                )
            })
            .collect(),
        clock: start + Duration::minutes(240 * 90),
    }));
    for stream in listener.incoming().flatten() {
        let contacts = contacts.clone();
        std::thread::spawn(move || handle(stream, &contacts));
    }
}

fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn handle(mut stream: TcpStream, contacts: &Mutex<Contacts>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&head);
    let target = text.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let params: BTreeMap<String, String> = query
        .split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_string(), decode(v)))
        .collect();
    let (status, body) = match path {
        "/v1/usage" => (200, usage(&params)),
        "/v1/contacts" => (200, list_contacts(&params, contacts)),
        _ => (404, json!({"error": "not found"})),
    };
    let body = body.to_string();
    let reason = if status == 200 { "OK" } else { "Not Found" };
    let _ = write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn num(params: &BTreeMap<String, String>, name: &str, default: usize) -> usize {
    params
        .get(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The first day of the billing cycle that holds `day`.
fn cycle_start(day: NaiveDate) -> NaiveDate {
    let this_month = day.with_day(15).expect("15th");
    if day.day() >= 15 {
        this_month
    } else {
        this_month - chrono::Months::new(1)
    }
}

fn usage(params: &BTreeMap<String, String>) -> Value {
    let today = NaiveDate::from_ymd_opt(TODAY.0, TODAY.1, TODAY.2).expect("today");
    let cycles = num(params, "cycles", 1).clamp(1, 24) as u32;
    let from = cycle_start(today) - chrono::Months::new(cycles - 1);
    let since = params.get("updated_since").cloned().unwrap_or_default();
    let mut rows = Vec::new();
    for line in ["SL-1", "SL-2"] {
        let mut day = from;
        while day < today {
            let n = day.num_days_from_ce() as i64;
            let mut gb = 20 + (n * 7 + if line == "SL-1" { 3 } else { 11 }) % 17;
            let mut updated = day + Duration::days(1);
            // Every eleventh day was corrected two days later.
            if n % 11 == 0 {
                gb += 5;
                updated += Duration::days(2);
            }
            let updated_at = format!("{updated}T06:00:00Z");
            if updated_at >= since {
                rows.push(json!({
                    "service_line_id": line,
                    "usage_date": day.to_string(),
                    "gb": gb,
                    "plan_gb": 1000,
                    "updated_at": updated_at,
                }));
            }
            day += Duration::days(1);
        }
    }
    let total = rows.len();
    let size = num(params, "per_page", 100).clamp(1, 1000);
    let page = num(params, "page", 1).max(1);
    let items: Vec<Value> = rows
        .into_iter()
        .skip((page - 1) * size)
        .take(size)
        .collect();
    json!({"data": {"items": items}, "meta": {"page": page, "per_page": size, "total": total}})
}

fn list_contacts(params: &BTreeMap<String, String>, contacts: &Mutex<Contacts>) -> Value {
    let mut state = contacts.lock().expect("contacts");
    let still = std::env::var_os("DEMO_API_STILL").is_some_and(|v| v == "1");
    if !params.contains_key("after") && !still {
        // A new listing: the world moved on a little since the last one.
        state.clock += Duration::minutes(30);
        let now = rfc3339(state.clock);
        let id = state.list.len() as u64 + 1;
        state.list.push((
            id,
            format!("Contact {id}"),
            format!("contact{id}@example.com"),
            now.clone(),
        ));
        let changed = (id * 37) % (id - 1) + 1;
        if let Some(c) = state.list.iter_mut().find(|c| c.0 == changed) {
            c.1 = format!("Contact {changed} (renamed)");
            c.3 = now;
        }
    }
    let since = params.get("updated_since").cloned().unwrap_or_default();
    let mut view: Vec<&(u64, String, String, String)> =
        state.list.iter().filter(|c| c.3 >= since).collect();
    // Newest first; ties by id, so the keyset token is exact.
    view.sort_by(|a, b| b.3.cmp(&a.3).then(b.0.cmp(&a.0)));
    let after = params.get("after").and_then(|t| {
        let raw = hex_decode(t)?;
        let (at, id) = raw.split_once('|')?;
        Some((at.to_string(), id.parse::<u64>().ok()?))
    });
    let start = match &after {
        None => 0,
        Some((at, id)) => view
            .iter()
            .position(|c| (c.3.as_str(), c.0) < (at.as_str(), *id))
            .unwrap_or(view.len()),
    };
    let limit = num(params, "limit", 50).clamp(1, 200);
    let page: Vec<_> = view.iter().skip(start).take(limit).collect();
    let next = (start + page.len() < view.len())
        .then(|| page.last().map(|c| hex_encode(&format!("{}|{}", c.3, c.0))))
        .flatten();
    let results: Vec<Value> = page
        .iter()
        .map(|c| json!({"id": c.0, "name": c.1, "email": c.2, "updated_at": c.3}))
        .collect();
    let mut body = json!({"results": results, "paging": {}});
    if let Some(next) = next {
        body["paging"]["next"] = json!(next);
    }
    body
}

fn hex_encode(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(s: &str) -> Option<String> {
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}
