//! audit, dedupe and verify (issue 5), on SQLite: the usage-report story of
//! a table that already holds duplicates.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rusqlite::Connection;
use serde_json::Value;

use crate::common::{idemload_in as idemload, kill_after};

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}):\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Every row with its rowid, in rowid order, as text: "the table, byte for byte".
fn dump(db: &Path, table: &str) -> Vec<String> {
    let conn = Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare(&format!("SELECT rowid, quote(\"service line\"), quote(\"Usage Date\"), quote(gb_used), quote(created_at) FROM \"{table}\" ORDER BY rowid"))
        .unwrap();
    let rows = stmt
        .query_map([], |r| {
            Ok((0..5)
                .map(|i| {
                    r.get::<_, rusqlite::types::Value>(i)
                        .map(|v| format!("{v:?}"))
                        .unwrap()
                })
                .collect::<Vec<_>>()
                .join("|"))
        })
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    rows
}

/// A usage table written by another tool: no key, some days loaded two or
/// three times with different created_at; column names that need quoting.
fn seed_usage(db: &Path) -> usize {
    let conn = Connection::open(db).unwrap();
    conn.execute_batch(
        "CREATE TABLE usage (\"service line\" TEXT, \"Usage Date\" TEXT, gb_used REAL, created_at TEXT);",
    )
    .unwrap();
    let mut surplus = 0;
    for line in ["SL-1", "SL-2"] {
        for day in 1..=10 {
            let date = format!("2025-01-{day:02}");
            let copies = match day % 4 {
                0 => 3,
                1 => 2,
                _ => 1,
            };
            surplus += copies - 1;
            for c in 0..copies {
                conn.execute(
                    "INSERT INTO usage VALUES (?1, ?2, ?3, ?4)",
                    rusqlite::params![
                        line,
                        date,
                        10.0 + day as f64 * 0.1 + c as f64 / 3.0,
                        format!("2025-02-0{}T00:00:00Z", c + 1)
                    ],
                )
                .unwrap();
            }
        }
    }
    surplus
}

const TARGET: [&str; 6] = [
    "--url",
    "sqlite://legacy.db",
    "--table",
    "usage",
    "--key",
    "service line,Usage Date",
];

#[test]
fn usage_report_duplicates_are_found_repaired_and_restored() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("legacy.db");
    let surplus = seed_usage(&db);
    let original = dump(&db, "usage");

    let audit = idemload(dir.path(), &[&["audit"], &TARGET[..], &["--json"]].concat());
    assert_eq!(audit.status.code(), Some(1), "audit finds the duplicates");
    let report = json_of(&audit);
    assert_eq!(
        report["duplicate_groups"], 10,
        "days 1,4,5,8,9 of two lines"
    );
    assert_eq!(report["surplus_rows"], surplus);
    assert_eq!(report["worst"][0]["count"], 3);
    assert!(report["unique_constraint"].is_null());

    let dry = idemload(
        dir.path(),
        &[
            &["dedupe"],
            &TARGET[..],
            &["--order-by", "created_at", "--json"],
        ]
        .concat(),
    );
    assert_eq!(dry.status.code(), Some(0));
    assert_eq!(json_of(&dry)["rows_to_remove"], surplus);
    assert_eq!(dump(&db, "usage"), original, "a dry run changes nothing");

    let apply = idemload(
        dir.path(),
        &[
            &["dedupe"],
            &TARGET[..],
            &["--order-by", "created_at", "--apply", "--json"],
        ]
        .concat(),
    );
    let applied = json_of(&apply);
    assert_eq!(applied["removed"], surplus);
    let run_id = applied["run_id"].as_str().unwrap().to_string();
    let conn = Connection::open(&db).unwrap();
    let kept_newest: i64 = conn
        .query_row(
            "SELECT count(*) FROM usage u WHERE created_at < (SELECT max(created_at) FROM usage v
               WHERE v.\"service line\" = u.\"service line\" AND v.\"Usage Date\" = u.\"Usage Date\")",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(kept_newest, 0, "only the newest row of each group remains");
    let quarantined: i64 = conn
        .query_row(
            "SELECT count(*) FROM _idemload_quarantine WHERE run_id = ?1",
            [&run_id],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(quarantined as usize, surplus);

    let again = idemload(
        dir.path(),
        &[&["dedupe"], &TARGET[..], &["--apply", "--json"]].concat(),
    );
    let again = json_of(&again);
    assert_eq!(again["applied"], false, "a second apply is a no-op");
    assert_eq!(again["removed"], 0);

    let clean = idemload(dir.path(), &[&["audit"], &TARGET[..]].concat());
    assert_eq!(
        clean.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&clean.stdout)
    );

    let restore = idemload(
        dir.path(),
        &[&["dedupe"], &TARGET[..], &["--restore", &run_id]].concat(),
    );
    assert_eq!(restore.status.code(), Some(0));
    assert_eq!(
        dump(&db, "usage"),
        original,
        "restore brings the table back byte for byte"
    );
}

#[test]
fn dedupe_killed_at_random_moments_leaves_the_original_or_the_repaired_table() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("legacy.db");
    let conn = Connection::open(&db).unwrap();
    conn.execute_batch("CREATE TABLE usage (\"service line\" TEXT, \"Usage Date\" TEXT, gb_used REAL, created_at TEXT); BEGIN;")
        .unwrap();
    let n = 100_000;
    for i in 0..n {
        // 1% of keys appear twice.
        let key = if i % 100 == 99 { i - 1 } else { i };
        conn.execute(
            "INSERT INTO usage VALUES (?1, '2025-01-01', ?2, ?3)",
            rusqlite::params![
                format!("SL-{key}"),
                i as f64,
                format!("2025-02-01T00:00:{:02}Z", i % 60)
            ],
        )
        .unwrap();
    }
    conn.execute_batch("COMMIT").unwrap();
    let surplus = n / 100;
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut repaired_seen = 0;
    for round in 0..12 {
        kill_after(
            dir.path(),
            &[&["dedupe"], &TARGET[..], &["--apply"]].concat(),
            Duration::from_millis(rng.gen_range(0..2_000)),
        );
        let rows: usize = conn
            .query_row("SELECT count(*) FROM usage", [], |r| r.get(0))
            .unwrap();
        let quarantined: usize = conn
            .query_row(
                "SELECT count(*) FROM _idemload_quarantine WHERE restored_at IS NULL",
                [],
                |r| r.get(0),
            )
            .unwrap_or(0);
        let indexed: usize = conn
            .query_row(
                "SELECT count(*) FROM pragma_index_list('usage') WHERE \"unique\" = 1",
                [],
                |r| r.get(0),
            )
            .unwrap();
        if rows == n {
            assert_eq!(
                (quarantined, indexed),
                (0, 0),
                "round {round}: original table, nothing quarantined"
            );
        } else {
            assert_eq!(
                rows,
                n - surplus,
                "round {round}: table is either original or repaired"
            );
            assert_eq!(
                (quarantined, indexed),
                (surplus, 1),
                "round {round}: repaired table has its quarantine and index"
            );
            repaired_seen += 1;
            let run_id: String = conn
                .query_row(
                    "SELECT run_id FROM _idemload_quarantine WHERE restored_at IS NULL LIMIT 1",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            let out = idemload(
                dir.path(),
                &[&["dedupe"], &TARGET[..], &["--restore", &run_id]].concat(),
            );
            assert_eq!(out.status.code(), Some(0));
        }
    }
    eprintln!("rounds that completed before the kill: {repaired_seen}");
}

#[test]
fn audit_flags_a_run_after_which_the_table_grew_more_than_it_inserted() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.jsonl"), "{\"id\":1}\n{\"id\":2}\n").unwrap();
    std::fs::write(dir.path().join("b.jsonl"), "{\"id\":3}\n").unwrap();
    let pipeline = "name = \"p\"\n[source]\ntype = \"file\"\npath = \"in.jsonl\"\n[destination]\nurl = \"sqlite://w.db\"\ntable = \"t\"\n";
    std::fs::write(dir.path().join("p.toml"), pipeline).unwrap();
    std::fs::copy(dir.path().join("a.jsonl"), dir.path().join("in.jsonl")).unwrap();
    assert_eq!(
        idemload(dir.path(), &["run", "p.toml"]).status.code(),
        Some(0)
    );
    let clean = idemload(dir.path(), &["audit", "p.toml", "--json"]);
    assert_eq!(
        clean.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&clean.stdout)
    );
    // Someone else writes into the table between runs.
    Connection::open(dir.path().join("w.db"))
        .unwrap()
        .execute_batch("INSERT INTO t (id) VALUES (100), (101)")
        .unwrap();
    std::fs::copy(dir.path().join("b.jsonl"), dir.path().join("in.jsonl")).unwrap();
    assert_eq!(
        idemload(dir.path(), &["run", "p.toml"]).status.code(),
        Some(0)
    );
    let audit = idemload(dir.path(), &["audit", "p.toml", "--json"]);
    assert_eq!(audit.status.code(), Some(1));
    let report = json_of(&audit);
    assert_eq!(report["run_mismatches"][0]["grew_by"], 3);
    assert_eq!(report["run_mismatches"][0]["inserted"], 1);
}

#[test]
fn verify_passes_on_the_example_pipelines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for pipeline in ["examples/usage.toml", "examples/contacts.toml"] {
        let out = idemload(root, &["verify", pipeline]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{pipeline}: {text}");
        assert!(text.starts_with("PASS"), "{text}");
    }
}

/// The usage-report story on every backend, with a column name that needs
/// quoting: audit finds the duplicates, the dry run changes nothing,
/// `--apply` keeps the newest and adds the constraint, a second apply does nothing, audit is clean,
/// and `--restore` brings every row back.
mod every_backend {
    use crate::common::BackendKind;
    use serde_json::Value;

    fn seed(env: &crate::common::Env) -> usize {
        let q = |n: &str| match env.backend.kind {
            BackendKind::Mysql => format!("`{n}`"),
            _ => format!("\"{n}\""),
        };
        let text = match env.backend.kind {
            BackendKind::Mysql => "VARCHAR(64)",
            _ => "TEXT",
        };
        env.backend.execute(&format!(
            "CREATE TABLE {} ({} {text}, usage_date {text}, gb_used DOUBLE PRECISION, created_at {text})",
            q("Usage Report"),
            q("Service Line")
        ));
        let mut values = Vec::new();
        let mut surplus = 0;
        for day in 1..=6 {
            let copies = if day % 2 == 0 { 3 } else { 1 };
            surplus += copies - 1;
            for c in 0..copies {
                values.push(format!(
                    "('SL-1', '2025-01-0{day}', {}, '2025-02-0{}T00:00:00Z')",
                    day as f64 + 0.1 * c as f64,
                    c + 1
                ));
            }
        }
        env.backend.execute(&format!(
            "INSERT INTO {} VALUES {}",
            q("Usage Report"),
            values.join(", ")
        ));
        surplus
    }

    fn json(out: &crate::common::Output) -> Value {
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}\n{}", out.stdout, out.stderr))
    }

    idemtest!(usage_report_duplicates_are_audited_and_repaired, |env| {
        let surplus = seed(env);
        let url = env.backend.url();
        let target = [
            "--url",
            url.as_str(),
            "--table",
            "Usage Report",
            "--key",
            "Service Line,usage_date",
        ];
        fn with<'a>(args: &[&'a str], target: &[&'a str]) -> Vec<&'a str> {
            [args, target].concat()
        }
        let original = env.backend.rows("Usage Report");

        let audit = env.idemload(&with(&["audit", "--json"], &target));
        audit.code(1);
        let report = json(&audit);
        assert_eq!(report["duplicate_groups"], 3);
        assert_eq!(report["surplus_rows"], surplus);

        let dry = env.idemload(&with(
            &["dedupe", "--order-by", "created_at", "--json"],
            &target,
        ));
        dry.code(0);
        assert_eq!(json(&dry)["rows_to_remove"], surplus);
        assert_eq!(
            env.backend.rows("Usage Report"),
            original,
            "a dry run changes nothing"
        );

        let apply = env.idemload(&with(
            &["dedupe", "--order-by", "created_at", "--apply", "--json"],
            &target,
        ));
        apply.code(0);
        let applied = json(&apply);
        assert_eq!(applied["removed"], surplus);
        assert_eq!(env.backend.count("Usage Report"), 6);
        let newest = env.backend.rows("Usage Report");
        for row in &newest {
            let day: u32 = row["usage_date"].as_str().unwrap()[8..].parse().unwrap();
            let expected = if day % 2 == 0 {
                "2025-02-03T00:00:00Z"
            } else {
                "2025-02-01T00:00:00Z"
            };
            assert_eq!(
                row["created_at"], expected,
                "the newest row of each day is kept: {row}"
            );
        }
        let again = env.idemload(&with(&["dedupe", "--apply", "--json"], &target));
        again.code(0);
        assert_eq!(json(&again)["removed"], 0, "a second apply does nothing");
        env.idemload(&with(&["audit"], &target)).code(0);

        let run_id = applied["run_id"].as_str().unwrap().to_string();
        env.idemload(&with(&["dedupe", "--restore", run_id.as_str()], &target))
            .code(0);
        assert_eq!(
            env.backend.rows("Usage Report"),
            original,
            "restore brings every row back"
        );
    });
}
