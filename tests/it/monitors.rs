//! `[audit]` monitors (spec: "Shapes, tolerances and monitors", issue 18):
//! a usage archive rebuilt end to end from a nested API over two
//! overlapping billing-cycle pulls, with a correction within the tolerance
//! and one beyond it, one missing day and one spike; `run --audit` and
//! `audit` report exactly the day and the spike and POST them with a
//! stable `Idempotency-Key`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};

use crate::common::{http_server, BackendKind, HttpResponse};

/// SL-1: 30 GB a day over days 1..=12, day 5 missing, 5000 GB on day 11.
/// SL-2: 20 GB a day over days 1..=12.
fn usage(line: &str, day: u32) -> Option<Value> {
    let gb = match (line, day) {
        ("SL-1", 5) => return None,
        ("SL-1", 11) => 5000.0,
        ("SL-1", _) => 30.0,
        _ => 20.0,
    };
    Some(json!({"usage_date": format!("2025-01-{day:02}"), "consumed_gb": gb}))
}

/// The second pull corrects SL-2: day 6 by 0.004 GB (within the 0.01
/// tolerance: unchanged), day 7 by a whole GB (updated).
fn corrected(line: &str, day: u32) -> Option<Value> {
    let mut record = usage(line, day)?;
    match (line, day) {
        ("SL-2", 6) => record["consumed_gb"] = json!(20.004),
        ("SL-2", 7) => record["consumed_gb"] = json!(21.0),
        _ => {}
    }
    Some(record)
}

/// One billing cycle's answer, nested by service line.
fn cycle(days: std::ops::RangeInclusive<u32>, usage: fn(&str, u32) -> Option<Value>) -> Value {
    let mut body = serde_json::Map::new();
    for line in ["SL-1", "SL-2"] {
        let rows: Vec<Value> = days.clone().filter_map(|d| usage(line, d)).collect();
        body.insert(line.into(), json!({"daily_usage": rows}));
    }
    Value::Object(body)
}

fn sum_sql(kind: BackendKind, line: &str) -> String {
    let int = match kind {
        BackendKind::Sqlite => "INTEGER",
        BackendKind::Postgres => "bigint",
        BackendKind::Mysql => "SIGNED",
    };
    format!(
        "SELECT CAST(sum(consumed_gb) AS {int}) FROM daily_usage WHERE service_line_id = '{line}'"
    )
}

idemtest!(
    usage_archive_audit_reports_the_missing_day_and_the_spike_once,
    |env| {
        // Two overlapping cycles: days 1..=8, then days 6..=12.
        let pulls = Arc::new(AtomicUsize::new(0));
        let p = pulls.clone();
        let api = http_server(move |_| {
            let n = p.fetch_add(1, Ordering::SeqCst);
            HttpResponse::json(if n == 0 {
                cycle(1..=8, usage)
            } else {
                cycle(6..=12, corrected)
            })
        });
        let alerts = http_server(|_| HttpResponse::status(202));
        env.write(
            "usage.toml",
            format!(
                r#"name = "usage"
[source]
type = "http"
url = "{}/v1/usage"
records = "{{service_line_id}}.daily_usage"
set = {{ source = "api" }}
[destination]
url = "{}"
table = "daily_usage"
[load]
key = ["service_line_id", "usage_date"]
tolerance = {{ consumed_gb = 0.01 }}
loaded_at = "_loaded_at"
[audit]
gaps = {{ field = "usage_date", by = ["service_line_id"], step = "1d" }}
spikes = {{ field = "consumed_gb", by = ["service_line_id"], factor = 3, days = 30 }}
alert = {{ url = "{}/alerts" }}
"#,
                api.base,
                env.url(),
                alerts.base
            ),
        );
        let first = env.run("usage.toml", &[]).code(0).report();
        assert_eq!(first.inserted, 15, "days 1..=8 less SL-1's day 5");
        assert!(alerts.requests().is_empty(), "no audit without --audit");

        // The second cycle overlaps days 6..=8: unchanged, but for SL-2's
        // day 7, corrected beyond the tolerance.
        let out = env.run("usage.toml", &["--audit"]);
        out.code(1);
        let report = out.report();
        assert_eq!(
            (report.inserted, report.updated, report.unchanged),
            (8, 1, 5),
            "{}",
            report.raw
        );
        // The load-time column moved for exactly the 9 rows written.
        let count = |filter: &str| {
            env.backend
                .scalar_i64(&format!("SELECT count(*) FROM daily_usage WHERE {filter}"))
                .unwrap_or(-1)
        };
        assert_eq!(
            count("_loaded_at > (SELECT min(_loaded_at) FROM daily_usage)"),
            9
        );
        assert_eq!(
            count("service_line_id = 'SL-2' AND usage_date = '2025-01-06' AND consumed_gb = 20"),
            1,
            "a correction within the tolerance is not written"
        );
        let audit = &out.json()["audit"];
        assert_eq!(
            audit["gaps"],
            json!([{"group": ["SL-1"], "missing": ["2025-01-05"], "count": 1}]),
            "{audit}"
        );
        assert_eq!(
            audit["spikes"],
            json!([{"group": ["SL-1"], "at": "2025-01-11", "value": 5000.0, "median": 30.0}]),
            "{audit}"
        );
        assert_eq!(audit["clean"], false);

        let sum = |line: &str| env.backend.scalar_i64(&sum_sql(env.backend.kind, line));
        assert_eq!(sum("SL-1"), Some(10 * 30 + 5000));
        assert_eq!(sum("SL-2"), Some(11 * 20 + 21));

        let posted = alerts.requests();
        assert_eq!(posted.len(), 1, "one alert for one audit");
        let key = posted[0].headers["idempotency-key"].clone();
        assert_eq!(audit["alert"]["idempotency_key"], key.as_str());
        let body: Value = serde_json::from_str(&posted[0].body).unwrap();
        assert_eq!(body["findings"]["gaps"], audit["gaps"]);
        assert_eq!(body["findings"]["spikes"], audit["spikes"]);
        assert_eq!(
            body["findings"].as_object().unwrap().len(),
            2,
            "only the gap and the spike: {body}"
        );

        // `audit` again: the same findings, the same key.
        let again = env.idemload(&["audit", "usage.toml", "--json"]);
        again.code(1);
        let posted = alerts.requests();
        assert_eq!(posted.len(), 2);
        assert_eq!(posted[1].headers["idempotency-key"], key);
        assert_eq!(posted[1].body, posted[0].body);
    }
);

idemtest!(a_clean_archive_passes_run_audit_and_posts_nothing, |env| {
    let api = http_server(|_| {
        HttpResponse::json(
            json!({"SL-2": {"daily_usage": (1..=5).map(|d| usage("SL-2", d).unwrap()).collect::<Vec<_>>()}}),
        )
    });
    let alerts = http_server(|_| HttpResponse::status(202));
    env.write(
        "usage.toml",
        format!(
            r#"name = "usage"
[source]
type = "http"
url = "{}/v1/usage"
records = "{{service_line_id}}.daily_usage"
[destination]
url = "{}"
table = "daily_usage"
[load]
key = ["service_line_id", "usage_date"]
[audit]
gaps = {{ field = "usage_date", by = ["service_line_id"] }}
spikes = {{ field = "consumed_gb", by = ["service_line_id"] }}
alert = {{ url = "{}/alerts" }}
"#,
            api.base,
            env.url(),
            alerts.base
        ),
    );
    let out = env.run("usage.toml", &["--audit"]);
    out.code(0);
    let audit = &out.json()["audit"];
    assert_eq!(audit["clean"], true, "{audit}");
    assert_eq!(audit["gaps"], json!([]));
    assert!(alerts.requests().is_empty());
    env.idemload(&["audit", "usage.toml"]).code(0);
});
