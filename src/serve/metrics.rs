//! `GET /metrics`: Prometheus text of requests by status, records by
//! outcome and request latency.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts, Registry, TextEncoder};

use crate::stats::RunStats;

/// The counters of one serve process.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    records: IntCounterVec,
    latency: Histogram,
    group: Histogram,
}

impl Metrics {
    pub fn new(pipeline: &str) -> Metrics {
        let labels =
            std::collections::HashMap::from([("pipeline".to_string(), pipeline.to_string())]);
        let registry = Registry::new_custom(Some("idemload".into()), Some(labels))
            .expect("a valid registry prefix");
        let requests = IntCounterVec::new(
            Opts::new(
                "requests_total",
                "Ingest requests answered, by HTTP status.",
            ),
            &["status"],
        )
        .expect("valid metric");
        let records = IntCounterVec::new(
            Opts::new(
                "records_total",
                "Records of committed requests, by outcome (inserted, updated, unchanged, deleted, skipped, duplicates, rejected).",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let latency = Histogram::with_opts(
            HistogramOpts::new(
                "request_duration_seconds",
                "Time from a request's arrival to its answer, POST /v1/records.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )
        .expect("valid metric");
        let group = Histogram::with_opts(
            HistogramOpts::new(
                "commit_group_requests",
                "Requests committed together in one transaction (group commit).",
            )
            .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0]),
        )
        .expect("valid metric");
        for c in [&requests, &records] {
            registry
                .register(Box::new(c.clone()))
                .expect("registered once");
        }
        for h in [&latency, &group] {
            registry
                .register(Box::new(h.clone()))
                .expect("registered once");
        }
        Metrics {
            registry,
            requests,
            records,
            latency,
            group,
        }
    }

    /// A request was answered with `status` after `seconds`.
    pub fn answered(&self, status: u16, seconds: f64) {
        self.requests
            .with_label_values(&[status.to_string().as_str()])
            .inc();
        self.latency.observe(seconds);
    }

    /// A request committed with these stats.
    pub fn committed(&self, stats: &RunStats) {
        for (outcome, n) in [
            ("inserted", stats.inserted),
            ("updated", stats.updated),
            ("unchanged", stats.unchanged),
            ("deleted", stats.deleted),
            ("skipped", stats.skipped),
            ("duplicates", stats.duplicates),
            ("rejected", stats.rejected),
        ] {
            self.records.with_label_values(&[outcome]).inc_by(n);
        }
    }

    /// A transaction committed `n` requests together.
    pub fn grouped(&self, n: usize) {
        self.group.observe(n as f64);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}
