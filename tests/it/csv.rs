//! CSV files: header row, quoted fields (commas, newlines), CRLF, empty =
//! null, per-column type inference, a header-only file is zero rows.

use serde_json::json;

use crate::common::assert_rows;

idemtest!(quoted_fields_crlf_and_empty_cells_load_as_expected, |env| {
    env.write_csv(
        "people.csv",
        "id,name,zip,score,active,note\r\n\
         1,\"Smith, John\",007,1.5,true,\"first line\r\nsecond line\"\r\n\
         2,Ann,12345,2,false,\r\n\
         3,\"Quote \"\"Q\"\" Lee\",,,TRUE,plain\r\n",
    );
    let r = env.load("people", &["people.csv"], &[]).code(0).report();
    assert_eq!(r.changes(), (3, 0, 0, 0));
    assert_rows(
        &env.rows("people"),
        &[
            json!({"id": 1, "name": "Smith, John", "zip": "007", "score": 1.5, "active": true,
                   "note": "first line\r\nsecond line"}),
            json!({"id": 2, "name": "Ann", "zip": "12345", "score": 2.0, "active": false}),
            json!({"id": 3, "name": "Quote \"Q\" Lee", "active": true, "note": "plain"}),
        ],
    );
    // Zip codes stay text: a JSON number 7 cannot become the same value.
    let zip = env.backend.raw_rows("people");
    let one = zip.iter().find(|r| r["id"] == json!(1)).unwrap();
    assert_eq!(one["zip"], json!("007"));

    let again = env.load("people", &["people.csv"], &[]).code(0).report();
    assert_eq!(again.changes(), (0, 0, 3, 0));
});

idemtest!(header_only_csv_is_zero_rows, |env| {
    env.write_csv("empty.csv", "id,name\n");
    let r = env.load("people", &["empty.csv"], &[]).code(0).report();
    assert_eq!((r.read, r.rejected), (0, 0), "{}", r.raw);
    assert_eq!(r.status, "succeeded");
    assert_eq!(env.backend.count("people"), 0);
});

idemtest!(csv_with_integer_and_text_ids_keeps_types, |env| {
    env.write_csv("a.csv", "id,code\n1,10\n2,010\n");
    env.load("c", &["a.csv"], &[]).code(0);
    assert_rows(
        &env.rows("c"),
        &[
            json!({"id": 1, "code": "10"}),
            json!({"id": 2, "code": "010"}),
        ],
    );
});

idemtest!(crlf_rows_name_their_own_line, |env| {
    // Line 2-3: a quoted field spanning two lines; line 4: a ragged row.
    env.write_csv(
        "crlf.csv",
        "id,note\r\n1,\"two\r\nlines\"\r\n2\r\n3,fine\r\n",
    );
    let out = env.load("c", &["crlf.csv"], &[]);
    out.code(4);
    assert_eq!(out.report().inserted, 2);
    let rejects = env.backend.raw_rows("_idemload_rejects");
    assert_eq!(rejects.len(), 1);
    assert_eq!(rejects[0]["source_ref"], "crlf.csv:4", "{rejects:?}");
    assert_rows(
        &env.rows("c"),
        &[
            json!({"id": 1, "note": "two\r\nlines"}),
            json!({"id": 3, "note": "fine"}),
        ],
    );
});

idemtest!(
    a_header_naming_a_column_twice_rejects_the_file_not_the_run,
    |env| {
        env.write_csv("twice.csv", "id,name,name\n1,a,b\n");
        env.write_csv("good.csv", "id,name\n2,c\n");
        let out = env.load("c", &["twice.csv", "good.csv"], &[]);
        out.code(4);
        let rejects = env.backend.raw_rows("_idemload_rejects");
        assert_eq!(rejects.len(), 1, "{rejects:?}");
        let reason = rejects[0]["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("\"name\" twice"), "{reason}");
        assert_rows(&env.rows("c"), &[json!({"id": 2, "name": "c"})]);
    }
);
