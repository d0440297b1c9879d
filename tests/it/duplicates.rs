//! In-input duplicates and corrections: one version per key per run, the
//! greatest cursor wins, ties go to the later record, superseded versions
//! are counted as `duplicates`, inside one file, across files and batches.

use serde_json::json;

use crate::common::assert_rows;

idemtest!(
    same_key_three_times_in_one_file_keeps_greatest_cursor,
    |env| {
        env.write_jsonl(
            "c.jsonl",
            &[
                json!({"id": 1, "name": "second", "v": 2}),
                json!({"id": 2, "name": "only", "v": 1}),
                json!({"id": 1, "name": "latest", "v": 3}),
                json!({"id": 1, "name": "oldest", "v": 1}),
            ],
        );
        let r = env
            .load("c", &["c.jsonl"], &["--cursor", "v"])
            .code(0)
            .report();
        assert_eq!((r.read, r.inserted, r.duplicates), (4, 2, 2), "{}", r.raw);
        assert_rows(
            &env.rows("c"),
            &[
                json!({"id": 1, "name": "latest", "v": 3}),
                json!({"id": 2, "name": "only", "v": 1}),
            ],
        );
    }
);

idemtest!(ties_go_to_the_later_record, |env| {
    env.write_jsonl(
        "c.jsonl",
        &[
            json!({"id": 1, "name": "first", "v": 5}),
            json!({"id": 1, "name": "second", "v": 5}),
            json!({"id": 1, "name": "older", "v": 4}),
        ],
    );
    let r = env
        .load("c", &["c.jsonl"], &["--cursor", "v"])
        .code(0)
        .report();
    assert_eq!((r.inserted, r.duplicates), (1, 2));
    assert_rows(
        &env.rows("c"),
        &[json!({"id": 1, "name": "second", "v": 5})],
    );
});

idemtest!(
    same_key_across_files_and_batches_keeps_greatest_cursor,
    |env| {
        // Three files, two records a batch: key 1 arrives with cursors 5, 9
        // and 7, each time in another batch (and another file).
        env.write_jsonl(
            "in/a.jsonl",
            &[
                json!({"id": 1, "name": "v5", "v": 5}),
                json!({"id": 2, "name": "a", "v": 1}),
                json!({"id": 3, "name": "a", "v": 1}),
            ],
        );
        env.write_jsonl(
            "in/b.jsonl",
            &[
                json!({"id": 4, "name": "b", "v": 1}),
                json!({"id": 1, "name": "v9", "v": 9}),
                json!({"id": 2, "name": "b", "v": 2}),
            ],
        );
        env.write_jsonl(
            "in/c.jsonl",
            &[
                json!({"id": 1, "name": "v7", "v": 7}),
                json!({"id": 3, "name": "c-tie-later", "v": 1}),
                json!({"id": 5, "name": "c", "v": 1}),
            ],
        );
        let p = env.pipeline("c", "in/*.jsonl", "cursor = \"v\"\nbatch_size = 2");
        let r = env.run(&p, &[]).code(0).report();
        assert_eq!(r.read, 9);
        assert_eq!(r.inserted, 5, "{}", r.raw);
        assert_eq!(r.duplicates, 4, "{}", r.raw);
        assert_rows(
            &env.rows("c"),
            &[
                json!({"id": 1, "name": "v9", "v": 9}),
                json!({"id": 2, "name": "b", "v": 2}),
                json!({"id": 3, "name": "c-tie-later", "v": 1}),
                json!({"id": 4, "name": "b", "v": 1}),
                json!({"id": 5, "name": "c", "v": 1}),
            ],
        );
        assert_eq!(env.backend.checkpoint("c"), Some(json!(9)));

        // Loading the same files again, as one `load` with several files: no
        // row is added and the table ends the same. (Key 3's tie spans two
        // batches, so the earlier version is applied and then superseded again
        // within the run: a streaming run cannot see a later batch.)
        let table = env.rows("c");
        let again = env
            .load(
                "c",
                &["in/a.jsonl", "in/b.jsonl", "in/c.jsonl"],
                &["--cursor", "v", "--batch-size", "2", "--name", "c"],
            )
            .code(0)
            .report();
        assert_eq!(again.inserted, 0, "{}", again.raw);
        assert_rows(&env.rows("c"), &table);
    }
);

idemtest!(without_cursor_the_last_loaded_version_wins, |env| {
    env.write_jsonl(
        "a.jsonl",
        &[json!({"id": 1, "name": "a"}), json!({"id": 2, "name": "a"})],
    );
    env.write_jsonl(
        "b.jsonl",
        &[
            json!({"id": 1, "name": "b"}),
            json!({"id": 1, "name": "b2"}),
        ],
    );
    let r = env
        .load("c", &["a.jsonl", "b.jsonl"], &["--batch-size", "1"])
        .code(0)
        .report();
    assert_eq!((r.read, r.inserted, r.duplicates), (4, 2, 2), "{}", r.raw);
    assert_rows(
        &env.rows("c"),
        &[
            json!({"id": 1, "name": "b2"}),
            json!({"id": 2, "name": "a"}),
        ],
    );
});
