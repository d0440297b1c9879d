//! A small fake CRM to try the HTTP destination against: no bulk upsert,
//! search by email, create, update.
//!
//! ```text
//! cargo run --release --example fake_crm              # listens on 127.0.0.1:8090
//! cargo run --release --example fake_crm -- 8090 50   # port, and 50 ms of latency per request
//! cargo run --release -- run examples/crm_writeback.toml   # pushes examples/data/contacts.csv
//! ```
//!
//! - `GET /contacts/search?email=E` -> `{"results": [{"id": 1001, ...}]}`
//! - `POST /contacts` (JSON body) -> `201 {"id": 1001, ...}`; it ignores
//!   `Idempotency-Key`, as many real APIs do
//! - `PATCH /contacts/ID` (JSON body) -> `200` or `404`
//! - `GET /stats` -> request counts per endpoint
//!
//! Plain `std` threads and a hand-written HTTP/1.1 answer.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

#[derive(Default)]
struct Crm {
    contacts: BTreeMap<u64, Value>,
    next_id: u64,
    counts: BTreeMap<&'static str, u64>,
}

fn main() {
    let mut args = std::env::args().skip(1);
    let port = args.next().unwrap_or_else(|| "8090".into());
    let latency = Duration::from_millis(args.next().and_then(|l| l.parse().ok()).unwrap_or(0));
    let listener = TcpListener::bind(format!("127.0.0.1:{port}")).expect("cannot listen");
    println!(
        "fake CRM listening on http://{}",
        listener.local_addr().expect("no address")
    );
    let crm = Arc::new(Mutex::new(Crm {
        next_id: 1000,
        ..Default::default()
    }));
    for stream in listener.incoming().flatten() {
        let crm = crm.clone();
        std::thread::spawn(move || {
            std::thread::sleep(latency);
            let _ = handle(stream, &crm);
        });
    }
}

fn decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap_or(b'?'));
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn handle(mut stream: TcpStream, crm: &Mutex<Crm>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut first = String::new();
    reader.read_line(&mut first)?;
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut parts = first.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, answer) = {
        let mut c = crm.lock().unwrap_or_else(|e| e.into_inner());
        match (method, target) {
            ("GET", t) if t.starts_with("/contacts/search?email=") => {
                *c.counts.entry("search").or_default() += 1;
                let email = decode(&t["/contacts/search?email=".len()..]);
                let results: Vec<Value> = c
                    .contacts
                    .values()
                    .filter(|v| v["email"] == email)
                    .cloned()
                    .collect();
                (200, json!({ "results": results }))
            }
            ("POST", "/contacts") => {
                *c.counts.entry("create").or_default() += 1;
                c.next_id += 1;
                let id = c.next_id;
                let mut contact = body;
                contact["id"] = json!(id);
                c.contacts.insert(id, contact.clone());
                (201, contact)
            }
            ("PATCH", t) if t.starts_with("/contacts/") => {
                *c.counts.entry("update").or_default() += 1;
                let id: u64 = t["/contacts/".len()..].parse().unwrap_or(0);
                match (c.contacts.get_mut(&id), body.as_object()) {
                    (Some(contact), Some(fields)) => {
                        for (k, v) in fields {
                            contact[k] = v.clone();
                        }
                        (200, contact.clone())
                    }
                    _ => (404, json!({"error": "no such contact"})),
                }
            }
            ("GET", "/stats") => (
                200,
                json!({"contacts": c.contacts.len(), "requests": c.counts}),
            ),
            _ => (
                400,
                json!({"error": format!("unknown route {method} {target}")}),
            ),
        }
    };
    let text = answer.to_string();
    write!(
        stream,
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
        text.len()
    )
}
