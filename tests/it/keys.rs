//! Keys: composite keys, `hash_key` (hex SHA-256 of the RFC 8785 canonical
//! JSON of the named fields), and the rule for numbers: `7` and `7.0` are
//! one key, `"7"` is a string and never equals the number.

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::common::assert_rows;

fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

idemtest!(hash_key_is_sha256_of_the_canonical_json, |env| {
    env.write_jsonl(
        "e.jsonl",
        &[json!({"name": "Ann", "email": "ann@example.com", "n": 7.0, "note": "x"})],
    );
    let r = env
        .load("e", &["e.jsonl"], &["--hash-key", "name,email,n,missing"])
        .code(0)
        .report();
    assert_eq!(r.inserted, 1);
    // JCS: keys sorted, 7.0 written 7, an absent field null.
    let expected = sha256_hex(r#"{"email":"ann@example.com","missing":null,"n":7,"name":"Ann"}"#);
    let rows = env.backend.raw_rows("e");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["_idemload_key"], json!(expected));

    // The same fields in another order (and 7 for 7.0) hash the same.
    env.write_jsonl(
        "f.jsonl",
        &[json!({"n": 7, "email": "ann@example.com", "name": "Ann", "note": "y"})],
    );
    let r = env
        .load("e", &["f.jsonl"], &["--hash-key", "name,email,n,missing"])
        .code(0)
        .report();
    assert_eq!(r.changes(), (0, 1, 0, 0), "{}", r.raw);
    assert_eq!(env.backend.count("e"), 1);
});

idemtest!(hash_key_star_covers_every_field, |env| {
    env.write_jsonl(
        "e.jsonl",
        &[
            json!({"a": 1, "b": {"y": 2, "x": 1}}),
            json!({"b": {"x": 1, "y": 2}, "a": 1}),
            json!({"a": 2, "b": null}),
        ],
    );
    let r = env
        .load("e", &["e.jsonl"], &["--hash-key", "*"])
        .code(0)
        .report();
    assert_eq!((r.inserted, r.duplicates), (2, 1), "{}", r.raw);
    let keys: Vec<String> = env
        .backend
        .raw_rows("e")
        .iter()
        .map(|r| r["_idemload_key"].as_str().unwrap().to_string())
        .collect();
    assert!(
        keys.contains(&sha256_hex(r#"{"a":1,"b":{"x":1,"y":2}}"#)),
        "{keys:?}"
    );
    assert!(
        keys.contains(&sha256_hex(r#"{"a":2,"b":null}"#)),
        "{keys:?}"
    );
});

idemtest!(
    seven_and_seven_point_zero_are_one_key_but_string_seven_is_rejected,
    |env| {
        env.write_jsonl("a.jsonl", &[json!({"id": 7, "v": "int"})]);
        env.load("k", &["a.jsonl"], &[]).code(0);
        env.write_jsonl("b.jsonl", &[json!({"id": 7.0, "v": "float"})]);
        let r = env.load("k", &["b.jsonl"], &[]).code(0).report();
        assert_eq!(r.changes(), (0, 1, 0, 0), "7.0 is the key 7: {}", r.raw);
        assert_rows(&env.rows("k"), &[json!({"id": 7, "v": "float"})]);

        env.write_jsonl("c.jsonl", &[json!({"id": "7", "v": "string"})]);
        let out = env.load("k", &["c.jsonl"], &[]);
        out.code(4);
        let r = out.report();
        assert_eq!(r.rejected, 1);
        assert_rows(&env.rows("k"), &[json!({"id": 7, "v": "float"})]);
        let rejects = env.backend.raw_rows("_idemload_rejects");
        let reason = rejects[0]["reason"].as_str().unwrap();
        assert!(
            reason.contains("\"id\" is text, but the column is integer"),
            "{reason}"
        );
        assert_eq!(rejects[0]["source_ref"], "c.jsonl:1");
    }
);

idemtest!(composite_keys_identify_rows_by_all_parts, |env| {
    env.write_jsonl(
        "u.jsonl",
        &[
            json!({"line": "SL-1", "day": "2024-05-01", "gb": 1}),
            json!({"line": "SL-1", "day": "2024-05-02", "gb": 2}),
            json!({"line": "SL-2", "day": "2024-05-01", "gb": 3}),
            json!({"line": "SL-1", "day": "2024-05-01", "gb": 4}),
        ],
    );
    let r = env
        .load("u", &["u.jsonl"], &["--key", "line,day"])
        .code(0)
        .report();
    assert_eq!((r.inserted, r.duplicates), (3, 1));
    assert_eq!(env.backend.count("u"), 3);
    // A key the table has no column of stops the run before anything is
    // read as a reject, naming the column and the ones there are.
    let out = env.load("u", &["u.jsonl"], &["--key", "line,nope"]);
    out.code(2);
    assert!(
        out.stderr.contains("\"nope\"") && out.stderr.contains("day"),
        "{}",
        out.stderr
    );
    assert_eq!(env.backend.count("u"), 3);
});

// Ids beyond 2^53 (snowflake ids) are distinct keys: written as doubles
// they would round to one value and the second record would be dropped as
// a duplicate of the first.
idemtest!(snowflake_ids_beyond_two_to_the_53_stay_distinct, |env| {
    env.write(
        "ids.jsonl",
        "{\"id\":1234567890123456789,\"v\":1}\n{\"id\":1234567890123456788,\"v\":2}\n",
    );
    let r = env
        .load("ids", &["ids.jsonl"], &["--key", "id"])
        .code(0)
        .report();
    assert_eq!((r.inserted, r.duplicates), (2, 0), "{}", r.raw);
    let again = env
        .load("ids", &["ids.jsonl"], &["--key", "id"])
        .code(0)
        .report();
    assert_eq!((again.inserted, again.unchanged), (0, 2), "{}", again.raw);
    assert_eq!(env.backend.count("ids"), 2);
});

// A key or cursor name no record has is a mistake in the command, not sixty
// bad records: the run stops before writing, naming the fields there are.
idemtest!(a_key_no_record_has_stops_the_run_naming_the_fields, |env| {
    let records: Vec<_> = (1..=60)
        .map(|i| json!({"id": i, "email": format!("u{i}@example.com"), "updated": i}))
        .collect();
    env.write_jsonl("contacts.jsonl", &records);
    let out = env.load("contacts", &["contacts.jsonl"], &["--key", "contact_id"]);
    out.code(2);
    assert!(
        out.stderr.contains("\"contact_id\"") && out.stderr.contains("email"),
        "{}",
        out.stderr
    );
    assert_eq!(env.backend.count("contacts"), 0);
    let out = env.load(
        "contacts",
        &["contacts.jsonl"],
        &["--key", "id", "--cursor", "updated_at"],
    );
    out.code(2);
    assert!(
        out.stderr.contains("cursor field \"updated_at\""),
        "{}",
        out.stderr
    );
    assert_eq!(env.backend.count("contacts"), 0);
    // Some records without the key are rejects; the rest load.
    env.write_jsonl(
        "some.jsonl",
        &[json!({"id": 1, "email": "a"}), json!({"email": "b"})],
    );
    let r = env
        .load("contacts", &["some.jsonl"], &["--key", "id"])
        .code(4)
        .report();
    assert_eq!((r.inserted, r.rejected), (1, 1));
});
