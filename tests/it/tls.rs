//! Connections and TLS (spec: "Connections and TLS"; issue 14): the URL's
//! TLS parameters do what libpq and the mysql client say, proved by the
//! server's own view of the connection (`pg_stat_ssl`, `Ssl_cipher`), and
//! a mode that cannot be satisfied stops with exit 2.
//!
//! Servers: `IDEMLOAD_TEST_POSTGRES` (with `ssl = on` and a certificate for
//! `localhost` signed by `IDEMLOAD_TEST_TLS_CA`), `IDEMLOAD_TEST_MYSQL_TLS`
//! (a MariaDB with TLS, same certificate), `IDEMLOAD_TEST_MYSQL` (one
//! without), `IDEMLOAD_TEST_REDIS_TLS` (`rediss://`); `.ci/run` sets them up.

use std::path::Path;

use serde_json::Value;

use crate::common::{idemload_in, with_backend, BackendKind, Env};

// ---- helpers ----------------------------------------------------------------

/// A service URL, or `None` (skip) when its variable is unset.
fn service(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => Some(v),
        _ => {
            if std::env::var("IDEMLOAD_REQUIRE_SERVICES").as_deref() == Ok("1") {
                panic!("{var} is not set, and IDEMLOAD_REQUIRE_SERVICES=1 requires it");
            }
            eprintln!("SKIPPED (set {var})");
            None
        }
    }
}

/// `url` with `param` added to its query.
fn with_param(url: &str, param: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{param}")
}

/// `url` with its host replaced (`postgres://u@127.0.0.1:5432/db`).
fn with_host(url: &str, host: &str) -> String {
    let start = url.find("://").unwrap() + 3;
    let start = match url[start..].find('@') {
        Some(at) if url[start..start + at].find('/').is_none() => start + at + 1,
        _ => start,
    };
    let end = start
        + url[start..]
            .find([':', '/', '?'])
            .unwrap_or(url.len() - start);
    format!("{}{host}{}", &url[..start], &url[end..])
}

/// Runs a pipeline whose SQL source is `query` on `url`, into SQLite, and
/// returns the loaded rows.
fn load_query(url: &str, query: &str) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("w.db");
    std::fs::write(
        dir.path().join("p.toml"),
        format!(
            "name = \"tls\"\n[source]\ntype = \"sql\"\nurl = {url:?}\nquery = {query:?}\n[destination]\nurl = \"sqlite://{}\"\ntable = \"seen\"\n",
            db.display()
        ),
    )
    .unwrap();
    let out = idemload_in(dir.path(), &["run", "p.toml", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "run failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    sqlite_rows(&db, "SELECT * FROM seen")
}

fn sqlite_rows(db: &Path, sql: &str) -> Vec<Value> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn.prepare(sql).unwrap();
    let names: Vec<String> = stmt.column_names().iter().map(|s| s.to_string()).collect();
    let mut rows = stmt.query([]).unwrap();
    let mut out = Vec::new();
    while let Some(row) = rows.next().unwrap() {
        let mut obj = serde_json::Map::new();
        for (i, name) in names.iter().enumerate() {
            let v = match row.get_ref(i).unwrap() {
                rusqlite::types::ValueRef::Null => Value::Null,
                rusqlite::types::ValueRef::Integer(v) => v.into(),
                rusqlite::types::ValueRef::Real(v) => v.into(),
                rusqlite::types::ValueRef::Text(t) => String::from_utf8_lossy(t).into(),
                rusqlite::types::ValueRef::Blob(_) => "BLOB".into(),
            };
            obj.insert(name.clone(), v);
        }
        out.push(Value::Object(obj));
    }
    out
}

/// What PostgreSQL says about the source's own connection: `ssl` of
/// `pg_stat_ssl` for its backend pid.
fn pg_source_ssl(url: &str) -> bool {
    let rows = load_query(
        url,
        "SELECT 1 AS id, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    );
    assert_eq!(rows.len(), 1, "{rows:?}");
    match &rows[0]["ssl"] {
        Value::Number(n) => n.as_i64() == Some(1),
        Value::String(s) => s == "true",
        other => panic!("ssl = {other:?}"),
    }
}

/// What MariaDB says about the source's own connection: its `Ssl_cipher`.
fn mysql_source_cipher(url: &str) -> String {
    let rows = load_query(
        url,
        "SELECT 1 AS id, VARIABLE_VALUE AS cipher FROM information_schema.SESSION_STATUS WHERE VARIABLE_NAME = 'Ssl_cipher'",
    );
    assert_eq!(rows.len(), 1, "{rows:?}");
    rows[0]["cipher"].as_str().unwrap_or_default().to_string()
}

fn tls_ca() -> Option<String> {
    service("IDEMLOAD_TEST_TLS_CA")
}

/// A database of its own on the TLS MariaDB, as a URL.
fn mysql_tls_db(test: &str) -> Option<String> {
    let base = service("IDEMLOAD_TEST_MYSQL_TLS")?;
    let (server, _) = base.rsplit_once('/').unwrap();
    let db = format!("it_tls_{test}_{}", std::process::id());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use mysql_async::prelude::Queryable;
        let mut conn = mysql_async::Conn::from_url(format!("{server}/")).await?;
        conn.query_drop(format!("DROP DATABASE IF EXISTS `{db}`"))
            .await?;
        conn.query_drop(format!("CREATE DATABASE `{db}`")).await?;
        conn.disconnect().await
    })
    .unwrap_or_else(|e| panic!("create database {db}: {e}"));
    Some(format!("{server}/{db}"))
}

/// `idemload load` of two records into `url`, table `t`.
fn load_into(env_dir: &Path, url: &str) -> std::process::Output {
    std::fs::write(
        env_dir.join("in.jsonl"),
        "{\"id\":1,\"v\":\"a\"}\n{\"id\":2,\"v\":\"b\"}\n",
    )
    .unwrap();
    idemload_in(
        env_dir,
        &["load", "in.jsonl", "--into", url, "--table", "t", "--json"],
    )
}

#[track_caller]
fn assert_exit(out: &std::process::Output, code: i32, stderr_has: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "expected exit {code}\nstderr:\n{stderr}"
    );
    assert!(
        stderr.contains(stderr_has),
        "stderr lacks {stderr_has:?}:\n{stderr}"
    );
}

// ---- PostgreSQL -------------------------------------------------------------

#[test]
fn pg_sslmode_require_encrypts() {
    let Some(url) = service("IDEMLOAD_TEST_POSTGRES") else {
        return;
    };
    assert!(pg_source_ssl(&with_param(&url, "sslmode=require")));
}

#[test]
fn pg_default_prefer_encrypts_when_the_server_offers_tls() {
    let Some(url) = service("IDEMLOAD_TEST_POSTGRES") else {
        return;
    };
    assert!(pg_source_ssl(&url));
}

#[test]
fn pg_sslmode_disable_does_not_encrypt() {
    let Some(url) = service("IDEMLOAD_TEST_POSTGRES") else {
        return;
    };
    assert!(!pg_source_ssl(&with_param(&url, "sslmode=disable")));
}

/// Every PostgreSQL connection goes through `connect`: the encryption it
/// reports is what the server sees, in each mode.
#[test]
fn pg_connect_reports_what_the_server_sees() {
    let Some(url) = service("IDEMLOAD_TEST_POSTGRES") else {
        return;
    };
    let Some(ca) = tls_ca() else { return };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    use idemload::connect::Encrypted;
    for (url, want) in [
        (with_param(&url, "sslmode=disable"), Encrypted::No),
        (url.clone(), Encrypted::Unverified),
        (with_param(&url, "sslmode=require"), Encrypted::Unverified),
        (
            with_param(&url, &format!("sslmode=verify-ca&sslrootcert={ca}")),
            Encrypted::CaVerified,
        ),
        (
            with_host(
                &with_param(&url, &format!("sslmode=verify-full&sslrootcert={ca}")),
                "localhost",
            ),
            Encrypted::Verified,
        ),
    ] {
        let (client, encrypted) = rt
            .block_on(idemload::connect::postgres::connect(&url))
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(encrypted, want, "{url}");
        let ssl: bool = rt
            .block_on(client.query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            ))
            .unwrap()
            .get(0);
        assert_eq!(ssl, encrypted.is_encrypted(), "{url}");
    }
}

fn pg_load_into(env: &Env, params: &str, host: Option<&str>) -> std::process::Output {
    let mut url = with_param(&env.backend.url(), params);
    if let Some(host) = host {
        url = with_host(&url, host);
    }
    load_into(env.dir.path(), &url)
}

#[test]
fn pg_load_with_sslmode_require_writes_the_rows() {
    with_backend("pg_load_require", BackendKind::Postgres, |env| {
        let out = pg_load_into(env, "sslmode=require", None);
        assert_exit(&out, 0, "");
        assert_eq!(env.backend.count("t"), 2);
    });
}

/// The certificate names `localhost`: connecting by 127.0.0.1 is a wrong
/// host name, which `verify-full` refuses before anything is written.
#[test]
fn pg_verify_full_rejects_a_wrong_host_name() {
    if tls_ca().is_none() {
        return;
    }
    with_backend("pg_verify_full_wrong", BackendKind::Postgres, |env| {
        let ca = tls_ca().unwrap();
        let url = env.backend.url();
        assert!(url.contains("127.0.0.1"), "the test connects by IP: {url}");
        let out = pg_load_into(env, &format!("sslmode=verify-full&sslrootcert={ca}"), None);
        assert_exit(&out, 2, "not issued for \"127.0.0.1\"");
        assert!(!env.backend.tables().contains(&"t".to_string()));
    });
}

#[test]
fn pg_verify_full_passes_with_the_right_ca_and_name() {
    if tls_ca().is_none() {
        return;
    }
    with_backend("pg_verify_full_right", BackendKind::Postgres, |env| {
        let ca = tls_ca().unwrap();
        let params = format!("sslmode=verify-full&sslrootcert={ca}");
        let out = pg_load_into(env, &params, Some("localhost"));
        assert_exit(&out, 0, "");
        assert_eq!(env.backend.count("t"), 2);
    });
}

#[test]
fn pg_verify_ca_without_the_ca_fails_with_exit_2() {
    with_backend("pg_verify_ca_no_root", BackendKind::Postgres, |env| {
        let out = pg_load_into(env, "sslmode=verify-ca", None);
        assert_exit(&out, 2, "sslrootcert=PATH");
    });
}

#[test]
fn pg_unknown_sslmode_is_a_config_error() {
    with_backend("pg_bad_sslmode", BackendKind::Postgres, |env| {
        let out = pg_load_into(env, "sslmode=always", None);
        assert_exit(&out, 2, "verify-full");
    });
}

// ---- MySQL / MariaDB --------------------------------------------------------

#[test]
fn mysql_required_encrypts() {
    let Some(url) = service("IDEMLOAD_TEST_MYSQL_TLS") else {
        return;
    };
    let cipher = mysql_source_cipher(&with_param(&url, "ssl-mode=REQUIRED"));
    assert!(!cipher.is_empty(), "no Ssl_cipher under ssl-mode=REQUIRED");
}

#[test]
fn mysql_default_preferred_encrypts_when_the_server_offers_tls() {
    let Some(url) = service("IDEMLOAD_TEST_MYSQL_TLS") else {
        return;
    };
    assert!(!mysql_source_cipher(&url).is_empty());
}

#[test]
fn mysql_disabled_does_not_encrypt() {
    let Some(url) = service("IDEMLOAD_TEST_MYSQL_TLS") else {
        return;
    };
    assert_eq!(
        mysql_source_cipher(&with_param(&url, "ssl-mode=DISABLED")),
        ""
    );
}

#[test]
fn mysql_load_with_ssl_mode_required_writes_the_rows() {
    let Some(url) = mysql_tls_db("required") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = load_into(dir.path(), &with_param(&url, "ssl-mode=REQUIRED"));
    assert_exit(&out, 0, "");
}

#[test]
fn mysql_verify_identity_rejects_a_wrong_host_name() {
    let Some(ca) = tls_ca() else { return };
    let Some(url) = mysql_tls_db("verify_wrong") else {
        return;
    };
    assert!(url.contains("127.0.0.1"), "the test connects by IP: {url}");
    let dir = tempfile::tempdir().unwrap();
    let url = with_param(&url, &format!("ssl-mode=VERIFY_IDENTITY&ssl-ca={ca}"));
    let out = load_into(dir.path(), &url);
    assert_exit(&out, 2, "not issued for \"127.0.0.1\"");
    // VERIFY_CA checks the same chain and skips the name.
    let url = url.replace("VERIFY_IDENTITY", "VERIFY_CA");
    assert_exit(&load_into(dir.path(), &url), 0, "");
}

#[test]
fn mysql_verify_identity_passes_with_the_right_ca_and_name() {
    let Some(ca) = tls_ca() else { return };
    let Some(url) = mysql_tls_db("verify_right") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let url = with_host(
        &with_param(&url, &format!("ssl-mode=VERIFY_IDENTITY&ssl-ca={ca}")),
        "localhost",
    );
    assert_exit(&load_into(dir.path(), &url), 0, "");
}

/// Regression (issue 14): `require_ssl=true` against a server offering TLS
/// panicked (exit 101). It keeps the driver's meaning, a verified
/// connection: without the CA that is exit 2, with it the load runs.
#[test]
fn mysql_require_ssl_true_does_not_panic() {
    let Some(ca) = tls_ca() else { return };
    let Some(url) = mysql_tls_db("require_ssl") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = load_into(dir.path(), &with_param(&url, "require_ssl=true"));
    assert_exit(&out, 2, "ssl-ca=PATH");
    let url = with_host(
        &with_param(&url, &format!("require_ssl=true&ssl-ca={ca}")),
        "localhost",
    );
    assert_exit(&load_into(dir.path(), &url), 0, "");
}

/// A server without TLS cannot satisfy REQUIRED: exit 2, not plaintext.
#[test]
fn mysql_required_against_a_server_without_tls_fails_with_exit_2() {
    let Some(url) = service("IDEMLOAD_TEST_MYSQL") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // Whether this server offers TLS, as PREFERRED finds out.
    if !mysql_source_cipher(&url).is_empty() {
        eprintln!("SKIPPED (IDEMLOAD_TEST_MYSQL offers TLS)");
        return;
    }
    let out = load_into(dir.path(), &with_param(&url, "ssl-mode=REQUIRED"));
    assert_exit(&out, 2, "does not offer TLS");
}

// ---- Redis ------------------------------------------------------------------

/// `rediss://` verifies the certificate against the roots (here
/// `SSL_CERT_FILE`) and the host name.
#[test]
fn rediss_connects_verified_and_refuses_a_wrong_host_name() {
    let Some(url) = service("IDEMLOAD_TEST_REDIS_TLS") else {
        return;
    };
    let Some(ca) = tls_ca() else { return };
    // Each test runs in a process of its own (nextest).
    std::env::set_var("SSL_CERT_FILE", &ca);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (mut conn, encrypted) = rt
        .block_on(idemload::connect::redis::connect(&url))
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    assert_eq!(encrypted, idemload::connect::Encrypted::Verified);
    let pong: String = rt
        .block_on(redis::cmd("PING").query_async(&mut conn))
        .unwrap();
    assert_eq!(pong, "PONG");
    let wrong = with_host(&url, "127.0.0.1");
    let err = rt
        .block_on(idemload::connect::redis::connect(&wrong))
        .map(|_| ())
        .unwrap_err();
    assert_eq!(err.exit_code(), 2, "{err}");
    assert!(err.to_string().contains("not valid for name"), "{err}");
}

#[test]
fn url_host_is_replaced() {
    assert_eq!(
        with_host("postgres://root@127.0.0.1:5432/test?x=1", "localhost"),
        "postgres://root@localhost:5432/test?x=1"
    );
    assert_eq!(
        with_host("rediss://localhost:6380", "127.0.0.1"),
        "rediss://127.0.0.1:6380"
    );
    assert_eq!(
        with_host("mysql://root@127.0.0.1:3307/db", "localhost"),
        "mysql://root@localhost:3307/db"
    );
}

// ---- check ------------------------------------------------------------------

#[test]
fn check_says_whether_the_connections_are_encrypted() {
    with_backend("check_tls", BackendKind::Postgres, |env| {
        let dir = env.dir.path();
        std::fs::write(dir.join("in.jsonl"), "{\"id\":1}\n").unwrap();
        for (params, says) in [
            (
                "sslmode=require",
                "encrypted (TLS, certificate not checked)",
            ),
            ("sslmode=disable", "not encrypted"),
        ] {
            let url = with_param(&env.backend.url(), params);
            std::fs::write(
                dir.join("p.toml"),
                format!(
                    "name = \"c\"\n[source]\ntype = \"sql\"\nurl = {url:?}\nquery = \"SELECT 1 AS id\"\n[destination]\nurl = {url:?}\ntable = \"t\"\n"
                ),
            )
            .unwrap();
            let out = idemload_in(dir, &["check", "p.toml"]);
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert_eq!(out.status.code(), Some(0), "{stdout}");
            for step in ["ok   source:", "ok   destination:"] {
                let line = stdout
                    .lines()
                    .find(|l| l.starts_with(step))
                    .unwrap_or_else(|| panic!("no {step:?} line:\n{stdout}"));
                assert!(line.contains(says), "{params}: {line:?} lacks {says:?}");
            }
        }
    });
}
