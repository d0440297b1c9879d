//! Numbers are carried exactly (issue 15): from the input text to the
//! column digit for digit, or the record is rejected with a reason that
//! quotes the number as written; never rounded through a double. Integer
//! keys beyond 64 bits stay distinct, JSON columns hold the numbers the
//! input held, and a second run finds every stored number equal.

use serde_json::Value;

use crate::common::{assert_balanced, BackendKind, Env, Report};

/// The values of one column as the database prints them as text, sorted.
/// MySQL's `DECIMAL(65,30)` prints 30 fraction digits: the zeros it pads
/// are cut, the digits are compared as stored.
fn column_text(env: &Env, table: &str, column: &str) -> Vec<Option<String>> {
    let sql = match env.backend.kind {
        BackendKind::Sqlite => format!("SELECT CAST(\"{column}\" AS TEXT) FROM \"{table}\""),
        BackendKind::Postgres => format!("SELECT \"{column}\"::text FROM \"{table}\""),
        BackendKind::Mysql => format!("SELECT CAST(`{column}` AS CHAR) FROM `{table}`"),
    };
    let mut texts: Vec<Option<String>> = env
        .backend
        .texts(&sql)
        .into_iter()
        .map(|t| t.map(|t| cut_padding(&t)))
        .collect();
    texts.sort();
    texts
}

fn cut_padding(text: &str) -> String {
    if text.starts_with(['{', '[']) || !text.contains('.') || text.contains(['e', 'E']) {
        return text.to_string();
    }
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn texts(values: &[&str]) -> Vec<Option<String>> {
    let mut v: Vec<Option<String>> = values.iter().map(|s| Some(s.to_string())).collect();
    v.sort();
    v
}

/// The reasons of the rejects of one pipeline, by source reference.
fn reasons(env: &Env, pipeline: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = env
        .backend
        .raw_rows("_idemload_rejects")
        .into_iter()
        .filter(|r| r["pipeline"] == pipeline)
        .map(|r| {
            (
                r["source_ref"].as_str().unwrap_or_default().to_string(),
                r["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

#[track_caller]
fn identity_holds(r: &Report) {
    assert_balanced(r);
    assert_eq!(
        r.read,
        r.inserted + r.updated + r.unchanged + r.deleted + r.skipped + r.duplicates + r.rejected,
        "{}",
        r.raw
    );
}

/// Loads the file again: nothing changes, every row compares equal.
#[track_caller]
fn second_run_changes_nothing(env: &Env, table: &str, file: &str, rows: u64) {
    let again = env.load(table, &[file], &[]).code(0).report();
    identity_holds(&again);
    assert_eq!((again.inserted, again.updated), (0, 0), "{}", again.raw);
    assert_eq!(again.unchanged, rows, "{}", again.raw);
}

idemtest!(
    integers_beyond_64_bits_are_distinct_keys_stored_exactly,
    |env| {
        env.write(
        "big.jsonl",
        concat!(
            r#"{"id":18446744073709551616,"n":123456789012345678901234567890,"info":{"a":9007199254740993}}"#,
            "\n",
            r#"{"id":18446744073709551617,"n":1,"info":{"a":1.50,"b":[123456789012345678901234567891]}}"#,
            "\n",
            r#"{"id":7,"n":2.5,"info":null}"#,
            "\n",
        ),
    );
        let r = env.load("big", &["big.jsonl"], &[]).code(0).report();
        identity_holds(&r);
        assert_eq!((r.read, r.inserted, r.duplicates), (3, 3, 0), "{}", r.raw);
        assert_eq!(env.backend.count("big"), 3);
        assert_eq!(
            column_text(env, "big", "id"),
            texts(&["18446744073709551616", "18446744073709551617", "7"])
        );
        assert_eq!(
            column_text(env, "big", "n"),
            texts(&["123456789012345678901234567890", "1", "2.5"])
        );
        // The JSON column: every digit, whatever spacing the database prints.
        let info: Vec<Value> = column_text(env, "big", "info")
            .into_iter()
            .flatten()
            .map(|t| serde_json::from_str(&t).unwrap_or_else(|e| panic!("{t}: {e}")))
            .collect();
        let mut numbers: Vec<String> = info
            .iter()
            .flat_map(|v| {
                [&v["a"], &v["b"][0]]
                    .into_iter()
                    .filter(|n| n.is_number())
                    .map(|n| n.to_string())
            })
            .collect();
        numbers.sort();
        assert_eq!(
            numbers,
            ["1.5", "123456789012345678901234567891", "9007199254740993"]
        );
        second_run_changes_nothing(env, "big", "big.jsonl", 3);

        // One of them again, spelled differently: the same key and value.
        env.write(
        "again.jsonl",
        r#"{"id":1.8446744073709551616e19,"n":123456789012345678901234567890.0,"info":{"a":9007199254740993}}"#,
    );
        let r = env.load("big", &["again.jsonl"], &[]).code(0).report();
        identity_holds(&r);
        assert_eq!(r.changes(), (0, 0, 1, 0), "{}", r.raw);
    }
);

idemtest!(
    numbers_a_column_cannot_hold_exactly_are_rejected_as_written,
    |env| {
        env.write(
            "fixed.jsonl",
            concat!(
                r#"{"id":1,"x":0.5,"k":5}"#,
                "\n",
                r#"{"id":2,"x":0.1000000000000000055511151231257827,"k":6}"#,
                "\n",
                r#"{"id":3,"x":9007199254740993,"k":7}"#,
                "\n",
                r#"{"id":4,"x":1.5,"k":18446744073709551617}"#,
                "\n",
                r#"{"id":5,"x":0.1,"k":9223372036854775807}"#,
                "\n",
            ),
        );
        let r = env.load("fixed", &["fixed.jsonl"], &[]).code(4).report();
        identity_holds(&r);
        assert_eq!((r.read, r.inserted, r.rejected), (5, 2, 3), "{}", r.raw);
        assert_eq!(
            column_text(env, "fixed", "k"),
            texts(&["5", "9223372036854775807"])
        );
        let got = reasons(env, "fixed");
        let expected = [
            ("fixed.jsonl:2", "0.1000000000000000055511151231257827"),
            ("fixed.jsonl:3", "9007199254740993"),
            ("fixed.jsonl:4", "18446744073709551617"),
        ];
        assert_eq!(got.len(), expected.len(), "{got:#?}");
        for ((at, reason), (want_at, number)) in got.iter().zip(expected) {
            assert_eq!(at, want_at);
            assert!(reason.contains(number), "{at}: {reason:?} lacks {number}");
            assert!(
                reason.contains("\"x\"") || reason.contains("\"k\""),
                "{reason}"
            );
        }
        // Rejected again, nothing rewritten.
        let again = env.load("fixed", &["fixed.jsonl"], &[]).code(0).report();
        identity_holds(&again);
        assert_eq!((again.inserted, again.updated, again.unchanged), (0, 0, 2));
    }
);

idemtest!(decimals_keep_their_digits_where_the_column_can, |env| {
    env.write(
        "dec.jsonl",
        concat!(
            r#"{"id":1,"d":0.1000000000000000055511151231257827}"#,
            "\n",
            r#"{"id":2,"d":2.50}"#,
            "\n",
            r#"{"id":3,"d":1.00000000000000000000000001}"#,
            "\n",
        ),
    );
    let out = env.load("dec", &["dec.jsonl"], &[]);
    let r = out.report();
    identity_holds(&r);
    assert_eq!(r.read, 3);
    match env.backend.kind {
        // DECIMAL(65,30) has 30 fraction digits, the first value 34: a
        // reject that names the number, not a rounded row.
        BackendKind::Mysql => {
            out.code(4);
            assert_eq!((r.inserted, r.rejected), (2, 1), "{}", r.raw);
            let got = reasons(env, "dec");
            assert_eq!(got.len(), 1, "{got:#?}");
            assert!(
                got[0].1.contains("0.1000000000000000055511151231257827"),
                "{got:?}"
            );
            assert_eq!(
                column_text(env, "dec", "d"),
                texts(&["1.00000000000000000000000001", "2.5"])
            );
        }
        _ => {
            out.code(0);
            assert_eq!(r.inserted, 3, "{}", r.raw);
            let expected = [
                "0.1000000000000000055511151231257827",
                "1.00000000000000000000000001",
                "2.5",
            ];
            assert_eq!(column_text(env, "dec", "d"), texts(&expected));
        }
    }
    // The same rejects again are known ones: exit 0.
    let again = env.load("dec", &["dec.jsonl"], &[]).code(0).report();
    identity_holds(&again);
    assert_eq!(again.raw["known_rejects"], again.rejected, "{}", again.raw);
    assert_eq!((again.inserted, again.updated), (0, 0), "{}", again.raw);
});

idemtest!(an_existing_exact_column_receives_every_digit, |env| {
    let ddl = match env.backend.kind {
        // SQLite: NUMERIC affinity would round; only DECIMAL_TEXT keeps the
        // digits, and a NUMERIC column rejects what it would round.
        BackendKind::Sqlite => {
            "CREATE TABLE pre (id INTEGER PRIMARY KEY, amount DECIMAL_TEXT, other NUMERIC)"
        }
        BackendKind::Postgres => {
            "CREATE TABLE pre (id bigint PRIMARY KEY, amount numeric, other numeric)"
        }
        BackendKind::Mysql => {
            "CREATE TABLE pre (id BIGINT PRIMARY KEY, amount DECIMAL(40,0), other DECIMAL(40,0))"
        }
    };
    env.backend.execute(ddl);
    env.write(
        "pre.jsonl",
        concat!(
            r#"{"id":1,"amount":18446744073709551617}"#,
            "\n",
            r#"{"id":2,"amount":5,"other":18446744073709551617}"#,
            "\n",
            r#"{"id":3,"amount":6,"other":18446744073709551615}"#,
            "\n",
        ),
    );
    let out = env.load("pre", &["pre.jsonl"], &[]);
    let r = out.report();
    identity_holds(&r);
    if env.backend.kind == BackendKind::Sqlite {
        // Both beyond SQLite's signed 64 bits, u64::MAX included.
        out.code(4);
        assert_eq!((r.inserted, r.rejected), (1, 2), "{}", r.raw);
        let got = reasons(env, "pre");
        assert!(got[0].1.contains("18446744073709551617"), "{got:?}");
        assert!(got[1].1.contains("18446744073709551615"), "{got:?}");
        assert_eq!(
            column_text(env, "pre", "amount"),
            texts(&["18446744073709551617"])
        );
    } else {
        out.code(0);
        assert_eq!(r.inserted, 3, "{}", r.raw);
        assert_eq!(
            column_text(env, "pre", "amount"),
            texts(&["18446744073709551617", "5", "6"])
        );
        let mut other = column_text(env, "pre", "other");
        other.retain(Option::is_some);
        assert_eq!(
            other,
            texts(&["18446744073709551615", "18446744073709551617"])
        );
    }
    let again = env.load("pre", &["pre.jsonl"], &[]).code(0).report();
    identity_holds(&again);
    assert_eq!(again.raw["known_rejects"], again.rejected, "{}", again.raw);
    assert_eq!((again.inserted, again.updated), (0, 0), "{}", again.raw);
});

idemtest!(csv_numbers_keep_every_digit, |env| {
    env.write(
        "wide.csv",
        "id,amount\n\
         123456789012345678901234567890,1.00000000000000000000000001\n\
         123456789012345678901234567891,2.5\n",
    );
    let r = env.load("wide", &["wide.csv"], &[]).code(0).report();
    identity_holds(&r);
    assert_eq!((r.read, r.inserted, r.duplicates), (2, 2, 0), "{}", r.raw);
    assert_eq!(
        column_text(env, "wide", "id"),
        texts(&[
            "123456789012345678901234567890",
            "123456789012345678901234567891"
        ])
    );
    assert_eq!(
        column_text(env, "wide", "amount"),
        texts(&["1.00000000000000000000000001", "2.5"])
    );
    second_run_changes_nothing(env, "wide", "wide.csv", 2);
});
