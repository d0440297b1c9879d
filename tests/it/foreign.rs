//! Tables idemload did not create: a load needs a unique index on the key,
//! leaves the columns the records do not carry to the table's defaults, and
//! stops on a NOT NULL column nobody fills.

use serde_json::json;

use crate::common::{BackendKind, Env};

/// `DDL` in the backend's dialect: (SQLite, PostgreSQL, MySQL).
fn ddl(env: &Env, sqlite: &str, postgres: &str, mysql: &str) {
    env.backend.execute(match env.backend.kind {
        BackendKind::Sqlite => sqlite,
        BackendKind::Postgres => postgres,
        BackendKind::Mysql => mysql,
    });
}

idemtest!(a_table_without_a_unique_key_is_never_loaded, |env| {
    env.backend
        .execute("CREATE TABLE legacy (id BIGINT, name VARCHAR(100))");
    env.backend
        .execute("INSERT INTO legacy (id, name) VALUES (1, 'a'), (1, 'a again'), (2, 'b')");
    env.write_jsonl(
        "in.jsonl",
        &[
            json!({"id": 1, "name": "new"}),
            json!({"id": 3, "name": "c"}),
        ],
    );
    let out = env.load("legacy", &["in.jsonl"], &["--key", "id"]);
    out.code(2);
    assert!(
        out.stderr.contains("idemload audit") && out.stderr.contains("dedupe --apply"),
        "the error names audit and dedupe --apply:\n{}",
        out.stderr
    );
    assert!(out.stderr.contains("legacy"), "{}", out.stderr);
    assert_eq!(env.backend.count("legacy"), 3, "nothing was written");
    assert_eq!(
        env.backend
            .scalar_i64("SELECT count(*) FROM legacy WHERE id = 3"),
        Some(0)
    );

    // Two pipelines into an empty table without a key: neither doubles it.
    env.backend
        .execute("CREATE TABLE empty_legacy (id BIGINT, name VARCHAR(100))");
    for name in ["first", "second"] {
        env.load(
            "empty_legacy",
            &["in.jsonl"],
            &["--key", "id", "--name", name],
        )
        .code(2);
    }
    assert_eq!(env.backend.count("empty_legacy"), 0);

    // With the unique index `dedupe --apply` would add, the load goes on.
    env.backend
        .execute("DELETE FROM legacy WHERE name = 'a again'");
    env.backend
        .execute("CREATE UNIQUE INDEX legacy_id ON legacy (id)");
    let r = env
        .load("legacy", &["in.jsonl"], &["--key", "id"])
        .code(0)
        .report();
    assert_eq!((r.inserted, r.updated), (1, 1));
    assert_eq!(env.backend.count("legacy"), 3);
});

idemtest!(columns_the_records_lack_take_the_tables_defaults, |env| {
    ddl(
        env,
        "CREATE TABLE hist (history_id INTEGER PRIMARY KEY, id INTEGER NOT NULL UNIQUE, name TEXT,
             created_at TEXT DEFAULT CURRENT_TIMESTAMP, note TEXT NOT NULL DEFAULT 'none')",
        "CREATE TABLE hist (history_id serial PRIMARY KEY, id bigint NOT NULL UNIQUE, name text,
             created_at timestamptz DEFAULT now(), note text NOT NULL DEFAULT 'none',
             id_twice bigint GENERATED ALWAYS AS (id * 2) STORED)",
        "CREATE TABLE hist (history_id bigint AUTO_INCREMENT PRIMARY KEY, id bigint NOT NULL UNIQUE,
             name varchar(100), created_at timestamp(6) NULL DEFAULT CURRENT_TIMESTAMP(6),
             note varchar(20) NOT NULL DEFAULT 'none',
             id_twice bigint GENERATED ALWAYS AS (id * 2) STORED)",
    );
    let records: Vec<_> = (1..=5)
        .map(|i| json!({"id": i, "name": format!("n{i}")}))
        .collect();
    env.write_jsonl("a.jsonl", &records);
    let r = env
        .load("hist", &["a.jsonl"], &["--key", "id"])
        .code(0)
        .report();
    assert_eq!(r.inserted, 5);
    let filled = "SELECT count(*) FROM hist WHERE history_id IS NOT NULL
                  AND created_at IS NOT NULL AND note = 'none'";
    assert_eq!(
        env.backend.scalar_i64(filled),
        Some(5),
        "{:?}",
        env.rows("hist")
    );
    assert_eq!(
        env.backend
            .scalar_i64("SELECT count(DISTINCT history_id) FROM hist"),
        Some(5)
    );
    let own = |env: &Env| {
        (
            env.backend
                .scalar_text("SELECT CAST(history_id AS CHAR(20)) FROM hist WHERE id = 2"),
            env.backend
                .scalar_text("SELECT CAST(created_at AS CHAR(40)) FROM hist WHERE id = 2"),
        )
    };
    let before = own(env);
    assert!(before.0.is_some() && before.1.is_some());

    // Again: nothing changes; an update leaves the table's own columns be.
    let r = env
        .load("hist", &["a.jsonl"], &["--key", "id"])
        .code(0)
        .report();
    assert_eq!((r.inserted, r.updated, r.unchanged), (0, 0, 5));
    env.write_jsonl("b.jsonl", &[json!({"id": 2, "name": "renamed"})]);
    let r = env
        .load("hist", &["b.jsonl"], &["--key", "id"])
        .code(0)
        .report();
    assert_eq!(r.updated, 1);
    assert_eq!(
        before,
        own(env),
        "history_id and created_at survive an update"
    );
    assert_eq!(
        env.backend
            .scalar_i64("SELECT count(*) FROM hist WHERE name = 'renamed' AND note = 'none'"),
        Some(1)
    );

    // A record that carries a default column writes it.
    env.write_jsonl(
        "c.jsonl",
        &[json!({"id": 9, "name": "n9", "note": "given"})],
    );
    env.load("hist", &["c.jsonl"], &["--key", "id"]).code(0);
    assert_eq!(
        env.backend
            .scalar_i64("SELECT count(*) FROM hist WHERE id = 9 AND note = 'given'"),
        Some(1)
    );
    assert_eq!(env.backend.count("hist"), 6);
});

idemtest!(a_not_null_column_no_record_fills_stops_the_run, |env| {
    env.backend.execute(
        "CREATE TABLE owned (id BIGINT PRIMARY KEY, name VARCHAR(100), owner VARCHAR(100) NOT NULL)",
    );
    env.write_jsonl(
        "a.jsonl",
        &[json!({"id": 1, "name": "a"}), json!({"id": 2, "name": "b"})],
    );
    let out = env.load("owned", &["a.jsonl"], &["--key", "id"]);
    out.code(2);
    assert!(
        out.stderr.contains("\"owner\""),
        "names the column:\n{}",
        out.stderr
    );
    assert!(out.stderr.contains("NOT NULL"), "{}", out.stderr);
    assert_eq!(env.backend.count("owned"), 0);

    // Records that carry it load; one that lacks it is a reject.
    env.write_jsonl(
        "b.jsonl",
        &[
            json!({"id": 1, "name": "a", "owner": "ann"}),
            json!({"id": 2, "name": "b"}),
            json!({"id": 3, "name": "c", "owner": "cy"}),
        ],
    );
    let r = env
        .load("owned", &["b.jsonl"], &["--key", "id"])
        .code(4)
        .report();
    assert_eq!((r.inserted, r.rejected), (2, 1));
    assert_eq!(env.backend.count("owned"), 2);
    let rejects = env.idemload(&["rejects", "--url", &env.url(), "--table", "owned", "--json"]);
    rejects.code(0);
    assert!(
        rejects.stdout.contains("owner") && rejects.stdout.contains("b.jsonl:2"),
        "{}",
        rejects.stdout
    );
});

// Killed at random moments, loads into a table with a serial key and a
// defaulted column resume to the table of one uninterrupted load: one row
// per key, every row numbered once, the defaults set.
idemtest!(
    killed_loads_into_a_table_with_defaults_resume_exactly,
    |env| {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        use rand::{Rng, SeedableRng};
        use std::process::Stdio;
        use std::time::Duration;

        const ROWS: u64 = 40_000;
        for table in ["serial_t", "serial_calibration"] {
            ddl(
                env,
                &format!("CREATE TABLE {table} (n INTEGER PRIMARY KEY, id INTEGER NOT NULL UNIQUE, v INTEGER,
                 note TEXT NOT NULL DEFAULT 'none')"),
                &format!("CREATE TABLE {table} (n bigserial PRIMARY KEY, id bigint NOT NULL UNIQUE, v bigint,
                 note text NOT NULL DEFAULT 'none')"),
                &format!("CREATE TABLE {table} (n bigint AUTO_INCREMENT PRIMARY KEY, id bigint NOT NULL UNIQUE,
                 v bigint, note varchar(20) NOT NULL DEFAULT 'none')"),
            );
        }
        // Version `r` of the input: every round changes every row, so each
        // run has work to be stopped in.
        let version = |r: u64| {
            let lines: String = (0..ROWS)
                .map(|i| format!("{{\"id\":{i},\"v\":{}}}\n", (i * 7 + r) % 1000))
                .collect();
            env.write("in.jsonl", lines);
        };
        version(0);
        let url = env.url();
        let args_for = |table: &'static str| {
            [
                "load".to_string(),
                "in.jsonl".into(),
                "--into".into(),
                url.clone(),
                "--table".into(),
                table.into(),
                "--key".into(),
                "id".into(),
                "--batch-size".into(),
                "2000".into(),
            ]
        };
        let owned = args_for("serial_t");
        let args: Vec<&str> = owned.iter().map(String::as_str).collect();
        // One uninterrupted load into a twin table: how long a load takes.
        let calibration = args_for("serial_calibration");
        let started = std::time::Instant::now();
        let status = env
            .command(&calibration.iter().map(String::as_str).collect::<Vec<_>>())
            .stdout(Stdio::null())
            .status()
            .expect("run");
        assert!(status.success());
        // Signals fall anywhere in 1.5 load times: before the table is
        // touched, mid-batch, at commits, and after the load ended.
        let range = (started.elapsed() * 3 / 2).max(Duration::from_millis(100));
        let mut rng = rand::rngs::StdRng::seed_from_u64(crate::common::seed(
            "killed_loads_into_a_table_with_defaults_resume_exactly",
        ));
        // 20 rounds of kill -9 and 20 of SIGTERM, interleaved.
        let mut stopped = 0;
        for round in 0..40u64 {
            let signal = if round % 2 == 0 {
                Signal::SIGKILL
            } else {
                Signal::SIGTERM
            };
            version(round);
            let delay = Duration::from_micros(rng.gen_range(0..range.as_micros() as u64));
            let mut child = env
                .command(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn");
            std::thread::sleep(delay);
            let _ = kill(Pid::from_raw(child.id() as i32), signal);
            let status = child.wait().expect("wait");
            assert_eq!(
                env.backend.doubled("serial_t", &["id"]),
                0,
                "round {round} ({signal} after {delay:?})"
            );
            if signal == Signal::SIGTERM {
                // Stopped cleanly (143), finished first (0), or signalled
                // before it had set up its handler (no exit code).
                assert!(
                    matches!(status.code(), Some(143) | Some(0) | None),
                    "round {round}: SIGTERM after {delay:?} gave {status}"
                );
                if status.code() == Some(143) {
                    stopped += 1;
                    assert_eq!(
                        env.backend.count("_idemload_locks"),
                        0,
                        "round {round}: a stopped load releases its lock"
                    );
                }
            }
        }
        eprintln!("{stopped} of 20 SIGTERMs stopped a running load (range {range:?})");
        assert!(stopped > 0, "no SIGTERM found a load running");
        env.command(&args)
            .stdout(Stdio::null())
            .status()
            .expect("run");
        let r = env
            .load("serial_t", &["in.jsonl"], &["--key", "id"])
            .code(0)
            .report();
        assert_eq!(
            (r.inserted, r.updated, r.unchanged),
            (0, 0, ROWS),
            "{}",
            r.raw
        );
        assert_eq!(env.backend.count("serial_t"), ROWS);
        assert_eq!(env.backend.doubled("serial_t", &["n"]), 0);
        assert_eq!(
        env.backend
            .scalar_i64("SELECT count(*) FROM serial_t WHERE n IS NOT NULL AND note = 'none' AND v = (id * 7 + 39) % 1000"),
        Some(ROWS as i64),
        "every row holds the last version, with the table's defaults"
    );
    }
);

// Issue 14: three loads of overlapping input into one table idemload did
// not create (an identity key, a unique business key, defaulted columns),
// all at once, as three pipelines: each business key ends in the table
// once, numbered once, with the table's defaults. A load that meets the
// others' rows mid-batch may exit 1 saying to run again (nothing of its
// batch is written); running it again completes it.
idemtest!(
    three_loads_at_once_into_a_foreign_table_keep_each_key_once,
    |env| {
        use std::process::Stdio;

        const EACH: u64 = 30_000;
        const STEP: u64 = 10_000;
        ddl(
            env,
            "CREATE TABLE accounts (n INTEGER PRIMARY KEY, code TEXT NOT NULL UNIQUE, v INTEGER,
             note TEXT NOT NULL DEFAULT 'none', created_at TEXT DEFAULT CURRENT_TIMESTAMP)",
            "CREATE TABLE accounts (n bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             code text NOT NULL UNIQUE, v bigint, note text NOT NULL DEFAULT 'none',
             created_at timestamptz DEFAULT now())",
            "CREATE TABLE accounts (n bigint AUTO_INCREMENT PRIMARY KEY, code varchar(40) NOT NULL UNIQUE,
             v bigint, note varchar(20) NOT NULL DEFAULT 'none',
             created_at timestamp(6) NULL DEFAULT CURRENT_TIMESTAMP(6))",
        );
        let names = ["first", "second", "third"];
        for (i, name) in names.iter().enumerate() {
            let from = i as u64 * STEP;
            let text: String = (from..from + EACH)
                .map(|id| format!("{{\"code\":\"AC-{id}\",\"v\":{}}}\n", id * 7 % 1000))
                .collect();
            env.write(&format!("{name}.jsonl"), text);
        }
        let url = env.url();
        let args = |name: &'static str| {
            vec![
                "load".to_string(),
                format!("{name}.jsonl"),
                "--into".into(),
                url.clone(),
                "--table".into(),
                "accounts".into(),
                "--key".into(),
                "code".into(),
                "--name".into(),
                name.into(),
                "--batch-size".into(),
                "2000".into(),
                "--json".into(),
            ]
        };
        let children: Vec<_> = names
            .iter()
            .map(|name| {
                let args = args(name);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                env.command(&args)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("spawn idemload")
            })
            .collect();
        let mut exits = Vec::new();
        for (child, name) in children.into_iter().zip(names) {
            let out = child.wait_with_output().expect("wait");
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            let code = out.status.code().unwrap_or(-1);
            exits.push((name, code));
            if code == 0 {
                let stdout = String::from_utf8_lossy(&out.stdout);
                let r = crate::common::Report::parse(&stdout, &stderr);
                assert_eq!(
                    (r.read, r.duplicates, r.rejected),
                    (EACH, 0, 0),
                    "{}",
                    r.raw
                );
                assert_eq!(r.inserted + r.unchanged, EACH, "{name}: {}", r.raw);
                continue;
            }
            assert_eq!(code, 1, "{name}: {stderr}");
            assert!(stderr.contains("run again"), "{name}: {stderr}");
            let again = args(name);
            let again: Vec<&str> = again.iter().map(String::as_str).collect();
            let r = env.idemload(&again).code(0).report();
            assert_eq!(
                (r.read, r.duplicates, r.rejected),
                (EACH, 0, 0),
                "{}",
                r.raw
            );
        }
        eprintln!("exits of the three loads at once: {exits:?}");
        let all = 2 * STEP + EACH;
        assert_eq!(env.backend.count("accounts"), all);
        assert_eq!(env.backend.doubled("accounts", &["code"]), 0);
        assert_eq!(env.backend.doubled("accounts", &["n"]), 0);
        assert_eq!(
            env.backend.scalar_i64(
                "SELECT count(*) FROM accounts WHERE n IS NOT NULL AND note = 'none'
                 AND created_at IS NOT NULL AND v IS NOT NULL"
            ),
            Some(all as i64)
        );
        assert_eq!(
            env.backend
                .scalar_i64("SELECT v FROM accounts WHERE code = 'AC-12345'"),
            Some(12345 * 7 % 1000)
        );

        // Once more, all three one after another: nothing left to change.
        for name in names {
            let again = args(name);
            let again: Vec<&str> = again.iter().map(String::as_str).collect();
            let r = env.idemload(&again).code(0).report();
            assert_eq!(
                (r.inserted, r.updated, r.unchanged),
                (0, 0, EACH),
                "{}",
                r.raw
            );
        }
        assert_eq!(env.backend.count("accounts"), all);
    }
);

// A `replace` or `window` load swaps its stage into a table idemload did
// not create: the serial key and defaulted columns the records lack are the
// table's own (new rows get them, kept rows keep theirs), a plain column
// the snapshot lacks becomes NULL, and a NOT NULL column nobody fills stops
// the run before anything is written.
idemtest!(
    replace_into_a_table_with_a_serial_key_keeps_its_defaults,
    |env| {
        ddl(
            env,
            "CREATE TABLE snap (n INTEGER PRIMARY KEY, id INTEGER NOT NULL UNIQUE, v INTEGER,
         day TEXT, note TEXT NOT NULL DEFAULT 'none')",
            "CREATE TABLE snap (n bigserial PRIMARY KEY, id bigint NOT NULL UNIQUE, v bigint,
         day text, note text NOT NULL DEFAULT 'none',
         v_twice bigint GENERATED ALWAYS AS (v * 2) STORED)",
            "CREATE TABLE snap (n bigint AUTO_INCREMENT PRIMARY KEY, id bigint NOT NULL UNIQUE,
         v bigint, day varchar(10), note varchar(20) NOT NULL DEFAULT 'none')",
        );
        let rows = |records: &[serde_json::Value]| {
            env.write_jsonl("in.jsonl", records);
        };
        rows(&[
            json!({"id": 1, "v": 10, "day": "d1"}),
            json!({"id": 2, "v": 20, "day": "d1"}),
        ]);
        let first = env
            .load("snap", &["in.jsonl"], &["--key", "id", "--mode", "replace"])
            .code(0)
            .report();
        assert_eq!(first.inserted, 2, "{}", first.raw);
        let n_of_1 = env.backend.scalar_i64("SELECT n FROM snap WHERE id = 1");
        assert!(n_of_1.is_some());

        // The next snapshot changes 1, drops 2, adds 3, and has no `day`.
        rows(&[json!({"id": 1, "v": 11}), json!({"id": 3, "v": 30})]);
        let second = env
            .load("snap", &["in.jsonl"], &["--key", "id", "--mode", "replace"])
            .code(0)
            .report();
        assert_eq!(
            (second.inserted, second.updated, second.removed),
            (1, 1, 1),
            "{}",
            second.raw
        );
        assert_eq!(
            env.backend.scalar_i64("SELECT n FROM snap WHERE id = 1"),
            n_of_1,
            "a kept row keeps its serial number"
        );
        assert_eq!(
            env.backend.scalar_i64(
                "SELECT count(*) FROM snap WHERE n IS NOT NULL AND note = 'none' AND day IS NULL"
            ),
            Some(2),
            "{:?}",
            env.backend.rows("snap")
        );
        assert_eq!(env.backend.doubled("snap", &["n"]), 0);
        if env.backend.kind == BackendKind::Postgres {
            assert_eq!(
                env.backend
                    .scalar_i64("SELECT CAST(sum(v_twice) AS bigint) FROM snap"),
                Some(82),
                "the generated column is the database's"
            );
        }

        // A NOT NULL column without a default that the snapshot lacks.
        env.backend
        .execute("CREATE TABLE strict_snap (id BIGINT NOT NULL PRIMARY KEY, v BIGINT, owner VARCHAR(20) NOT NULL)");
        let out = env.load(
            "strict_snap",
            &["in.jsonl"],
            &["--key", "id", "--mode", "replace"],
        );
        out.code(2);
        assert!(
            out.stderr.contains("owner") && out.stderr.contains("NOT NULL"),
            "{}",
            out.stderr
        );
        assert_eq!(env.backend.count("strict_snap"), 0);
    }
);
