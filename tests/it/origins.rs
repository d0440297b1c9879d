//! Credentials cross no origin (spec: "Shapes, tolerances and monitors",
//! issue 18): configured headers, query secrets and a `Referer` go only to
//! the configured origin, whatever a `Link` header or a redirect names.
//! Two servers on two ports of 127.0.0.1 are two origins.

use serde_json::{json, Value};

use crate::common::{http_server, HttpRequest, HttpResponse, HttpServer};

const TOKEN: &str = "tok-s3cret";
const KEY: &str = "hdr-s3cret";
const PARAM: &str = "param-s3cret";

/// Asserts `other` never saw a credential: no `Authorization`, no
/// `X-Api-Key`, no `Referer`, no secret anywhere in the request.
#[track_caller]
fn assert_no_credentials(other: &HttpServer) {
    let seen = other.requests();
    assert!(!seen.is_empty(), "the other origin was never asked");
    for r in &seen {
        let text = format!("{r:?}");
        for name in ["authorization", "x-api-key", "referer"] {
            assert!(
                !r.headers.contains_key(name),
                "{name} went to the other origin: {text}"
            );
        }
        for secret in [TOKEN, KEY, PARAM] {
            assert!(
                !text.contains(secret),
                "{secret} went to the other origin: {text}"
            );
        }
    }
}

/// The configured origin checks every credential it should get.
fn has_credentials(r: &HttpRequest) -> bool {
    r.headers.get("authorization").map(String::as_str) == Some(&format!("Bearer {TOKEN}"))
        && r.headers.get("x-api-key").map(String::as_str) == Some(KEY)
        && r.query.get("api_key").map(String::as_str) == Some(PARAM)
}

fn usage(day: u32) -> Value {
    json!({"id": day, "usage_date": format!("2025-01-{day:02}"), "gb": day})
}

fn http_pipeline(env: &crate::common::Env, url: &str, pagination: &str) -> String {
    env.write(
        "api.toml",
        format!(
            r#"name = "api"
[source]
type = "http"
url = "{url}"
records = "items"
params = {{ api_key = "{PARAM}" }}
headers = {{ Authorization = "Bearer {TOKEN}", X-Api-Key = "{KEY}" }}
pagination = {pagination}
retry = {{ attempts = 1 }}
[destination]
url = "{}"
table = "usage"
[load]
key = ["id"]
"#,
            env.url()
        ),
    );
    "api.toml".into()
}

idemtest!(link_to_another_origin_gets_no_credentials, |env| {
    let other = http_server(|_| HttpResponse::json(json!({"items": [usage(3)]})));
    let next = format!("{}/v1/usage?page=2", other.base);
    let home = http_server(move |r| {
        if !has_credentials(r) {
            return HttpResponse::status(401);
        }
        HttpResponse::json(json!({"items": [usage(1), usage(2)]}))
            .header("Link", &format!("<{next}>; rel=\"next\""))
    });
    let p = http_pipeline(
        env,
        &format!("{}/v1/usage", home.base),
        "{ type = \"link\" }",
    );
    let report = env.run(&p, &[]).code(0).json();
    assert_eq!(report["inserted"], 3, "{report}");
    assert_no_credentials(&other);
});

idemtest!(redirect_to_another_origin_gets_no_credentials, |env| {
    let other = http_server(|_| HttpResponse::json(json!({"items": [usage(1), usage(2)]})));
    let target = format!("{}/cdn/usage.json", other.base);
    let home = http_server(move |r| {
        if !has_credentials(r) {
            return HttpResponse::status(401);
        }
        HttpResponse::status(302).header("Location", &target)
    });
    let p = http_pipeline(
        env,
        &format!("{}/v1/usage", home.base),
        "{ type = \"none\" }",
    );
    let report = env.run(&p, &[]).code(0).json();
    assert_eq!(report["inserted"], 2, "{report}");
    assert_no_credentials(&other);
});

idemtest!(link_within_the_origin_keeps_the_credentials, |env| {
    let home = http_server(|r| {
        if !has_credentials(r) {
            return HttpResponse::status(401);
        }
        if r.path == "/v1/usage" {
            HttpResponse::json(json!({"items": [usage(1)]}))
                .header("Link", "</v1/usage/2>; rel=\"next\"")
        } else {
            HttpResponse::json(json!({"items": [usage(2)]}))
        }
    });
    let p = http_pipeline(
        env,
        &format!("{}/v1/usage", home.base),
        "{ type = \"link\" }",
    );
    let report = env.run(&p, &[]).code(0).json();
    assert_eq!(report["inserted"], 2, "{report}");
});

#[test]
fn writeback_redirected_to_another_origin_sends_it_nothing() {
    let env_dir = tempfile::tempdir().unwrap();
    let dir = env_dir.path();
    let other = http_server(|_| HttpResponse::json(json!({"results": []})));
    let target = other.base.clone();
    let home = http_server(move |r| {
        HttpResponse::status(307).header("Location", &format!("{target}{}", r.path))
    });
    std::fs::write(
        dir.join("contacts.jsonl"),
        "{\"email\":\"a@x.io\",\"name\":\"A\"}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("crm.toml"),
        format!(
            r#"name = "crm"
[source]
type = "file"
path = "contacts.jsonl"
[load]
key = ["email"]
[destination]
type = "http"
base_url = "{}"
headers = {{ Authorization = "Bearer {TOKEN}", X-Api-Key = "{KEY}" }}
lookup = {{ method = "GET", path = "/contacts/search?email={{email}}", id = "results.0.id" }}
create = {{ method = "POST", path = "/contacts" }}
update = {{ method = "PATCH", path = "/contacts/{{remote_id}}" }}
ledger = "sqlite://ledger.db"
retry = {{ attempts = 1, backoff = "10ms" }}
"#,
            home.base
        ),
    )
    .unwrap();
    let out = crate::common::idemload_in(dir, &["run", "crm.toml", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(!home.requests().is_empty());
    assert!(
        other.requests().is_empty(),
        "the other origin was asked: {:?}",
        other.requests()
    );
    assert!(
        !stderr.contains(TOKEN) && !stderr.contains(KEY),
        "a secret in the output: {stderr}"
    );
}

#[test]
fn webhook_redirected_to_another_origin_sends_it_nothing() {
    let env_dir = tempfile::tempdir().unwrap();
    let dir = env_dir.path();
    let other = http_server(|_| HttpResponse::status(200));
    let target = format!("{}/hook", other.base);
    let home = http_server(move |_| HttpResponse::status(307).header("Location", &target));
    std::fs::write(dir.join("items.jsonl"), "{\"id\":1}\n").unwrap();
    std::fs::write(
        dir.join("w.toml"),
        format!(
            r#"name = "hooked"
[source]
type = "file"
path = "items.jsonl"
[trigger]
store = "sqlite://seen.db"
prime = false
attempts = 1
backoff = "10ms"
[trigger.emit]
type = "webhook"
url = "{}/hook"
headers = {{ X-Api-Key = "{KEY}" }}
"#,
            home.base
        ),
    )
    .unwrap();
    let out = crate::common::idemload_in(dir, &["watch", "w.toml", "--once"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!home.requests().is_empty(), "{stderr}");
    assert!(
        other.requests().is_empty(),
        "the other origin was asked: {:?}",
        other.requests()
    );
    assert!(!stderr.contains(KEY), "a secret in the output: {stderr}");
}
