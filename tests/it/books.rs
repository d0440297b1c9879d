//! `state`, `history` and `rejects` for users of `idemload load`: found by
//! the destination URL and table, as `load` was given them (issue 16).

use serde_json::json;

idemtest!(load_users_reach_state_history_and_rejects_by_url, |env| {
    env.write(
        "in.jsonl",
        "{\"id\": 1, \"n\": 3}\n{\"id\": 2, \"n\": 7}\nnot json\n",
    );
    let url = env.url();
    let out = env.idemload(&[
        "load", "in.jsonl", "--into", &url, "--table", "items", "--cursor", "n",
    ]);
    out.code(4);
    // The summary names the command that finds these rejects.
    assert!(
        out.stderr.contains("(see `idemload rejects --url ")
            && out.stderr.contains(" --table items`)"),
        "{}",
        out.stderr
    );
    let by_url = ["--url", url.as_str(), "--table", "items"];

    let mut args = vec!["history"];
    args.extend_from_slice(&by_url);
    args.push("--json");
    let runs = env.idemload(&args).code(0).json();
    assert_eq!(runs["runs"].as_array().map(Vec::len), Some(1), "{runs}");

    let mut args = vec!["rejects"];
    args.extend_from_slice(&by_url);
    args.push("--json");
    let rejects = env.idemload(&args).code(0).json();
    assert_eq!(
        rejects["rejects"].as_array().map(Vec::len),
        Some(1),
        "{rejects}"
    );
    assert!(
        rejects["rejects"][0]["source_ref"]
            .as_str()
            .unwrap_or_default()
            .ends_with(":3"),
        "{rejects}"
    );

    let mut args = vec!["state"];
    args.extend_from_slice(&by_url);
    args.push("--json");
    let state = env.idemload(&args).code(0).json();
    assert_eq!(state["pipeline"], json!("items"));
    assert_eq!(state["checkpoint"], json!(7), "{state}");

    // An integer cursor takes an integer, never `yesterday`.
    let mut args = vec!["state"];
    args.extend_from_slice(&by_url);
    args.extend_from_slice(&["--set", "yesterday"]);
    let out = env.idemload(&args);
    out.code(2);
    assert!(out.stderr.contains("--set \"yesterday\""), "{}", out.stderr);
    assert!(out.stderr.contains("--set 1700000000"), "{}", out.stderr);

    let mut args = vec!["state"];
    args.extend_from_slice(&by_url);
    args.extend_from_slice(&["--set", "5", "--json"]);
    let state = env.idemload(&args).code(0).json();
    assert_eq!(state["checkpoint"], json!(5), "{state}");
});

idemtest!(
    state_set_refuses_a_value_a_timestamp_cursor_cannot_hold,
    |env| {
        env.write_jsonl(
            "in.jsonl",
            &[json!({"id": 1, "updated_at": "2024-01-02T00:00:00Z"})],
        );
        let p = env.pipeline(
            "events",
            "in.jsonl",
            "key = [\"id\"]\ncursor = \"updated_at\"\n",
        );
        env.run(&p, &[]).code(0);
        let out = env.idemload(&["state", &p, "--set", "yesterday"]);
        out.code(2);
        assert!(out.stderr.contains("RFC 3339"), "{}", out.stderr);
        assert!(
            out.stderr.contains("--set 2025-01-01T00:00:00Z"),
            "{}",
            out.stderr
        );
        let out = env.idemload(&["state", &p, "--json"]);
        assert_eq!(
            out.code(0).json()["checkpoint"],
            json!("2024-01-02T00:00:00Z")
        );
    }
);
