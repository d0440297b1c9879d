//! MySQL's `_idemload_requests`: the claims and stored responses of
//! `idemload serve` (see `crate::request`), as on the other backends.
//!
//! A claim is one `INSERT IGNORE` (autocommitted): the primary key
//! `(pipeline, key)` lets exactly one session win. A takeover is an
//! `UPDATE` naming the claim and status it saw, so of two processes taking
//! over the same dead claim one changes the row and the other nothing. The
//! request's batch transaction fences on its claim with `SELECT … FOR
//! UPDATE` and marks it done in the same transaction as its rows.

use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use super::{db, Server};
use crate::destination::sql::quote_mysql as q;
use crate::error::{Error, Result};
use crate::request::{
    now_ms, Claim, RequestEntry, StoredRequest, DONE, PROCESSING, REQUESTS_TABLE,
};

/// Creates `_idemload_requests` when missing.
pub(super) async fn create_table(conn: &mut Conn, server: &Server) -> Result<()> {
    conn.query_drop(format!(
        "CREATE TABLE IF NOT EXISTS {} (
             pipeline VARCHAR(255) NOT NULL, `key` VARCHAR(255) NOT NULL,
             digest VARCHAR(64) NOT NULL, status VARCHAR(16) NOT NULL, response LONGTEXT,
             claim VARCHAR(64) NOT NULL, host VARCHAR(255) NOT NULL, pid BIGINT NOT NULL,
             created_at VARCHAR(40) NOT NULL, expires_at BIGINT NOT NULL,
             PRIMARY KEY (pipeline, `key`),
             KEY `_idemload_requests_expires` (pipeline, expires_at))
         ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = {}",
        q(REQUESTS_TABLE),
        server.collation
    ))
    .await
    .map_err(db("creating _idemload_requests"))
}

pub(super) async fn stored(
    conn: &mut Conn,
    pipeline: &str,
    key: &str,
) -> Result<Option<StoredRequest>> {
    type Row = (String, String, Option<String>, String, String, i64, i64);
    let row: Option<Row> = conn
        .exec_first(
            format!(
                "SELECT digest, status, response, claim, host, pid, expires_at
                 FROM {} WHERE pipeline = ? AND `key` = ?",
                q(REQUESTS_TABLE)
            ),
            (pipeline, key),
        )
        .await
        .map_err(db("reading a request"))?;
    Ok(row.map(
        |(digest, status, response, claim, host, pid, expires_at)| StoredRequest {
            digest,
            status,
            response,
            claim,
            host,
            pid,
            expires_at,
        },
    ))
}

pub(super) async fn insert_claim(conn: &mut Conn, c: &Claim) -> Result<bool> {
    conn.exec_drop(
        format!(
            "INSERT IGNORE INTO {} (pipeline, `key`, digest, status, claim, host, pid, created_at, expires_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            q(REQUESTS_TABLE)
        ),
        (
            &c.pipeline,
            &c.key,
            &c.digest,
            PROCESSING,
            &c.claim,
            &c.host,
            c.pid,
            chrono::Utc::now().to_rfc3339(),
            c.lease_until,
        ),
    )
    .await
    .map_err(db("claiming a request"))?;
    Ok(conn.affected_rows() == 1)
}

pub(super) async fn take_over(
    conn: &mut Conn,
    c: &Claim,
    from: &str,
    status: &str,
) -> Result<bool> {
    conn.exec_drop(
        format!(
            "UPDATE {} SET digest = ?, status = ?, response = NULL, claim = ?, host = ?,
                 pid = ?, created_at = ?, expires_at = ?
             WHERE pipeline = ? AND `key` = ? AND claim = ? AND status = ?",
            q(REQUESTS_TABLE)
        ),
        vec![
            mysql_async::Value::from(&c.digest),
            PROCESSING.into(),
            (&c.claim).into(),
            (&c.host).into(),
            c.pid.into(),
            chrono::Utc::now().to_rfc3339().into(),
            c.lease_until.into(),
            (&c.pipeline).into(),
            (&c.key).into(),
            from.into(),
            status.into(),
        ],
    )
    .await
    .map_err(db("taking over a request"))?;
    Ok(conn.affected_rows() == 1)
}

pub(super) async fn release(conn: &mut Conn, pipeline: &str, key: &str, claim: &str) -> Result<()> {
    conn.exec_drop(
        format!(
            "DELETE FROM {} WHERE pipeline = ? AND `key` = ? AND claim = ? AND status = ?",
            q(REQUESTS_TABLE)
        ),
        (pipeline, key, claim, PROCESSING),
    )
    .await
    .map_err(db("releasing a request"))
}

pub(super) async fn expire(conn: &mut Conn, pipeline: &str, now: i64) -> Result<u64> {
    conn.exec_drop(
        format!(
            "DELETE FROM {} WHERE pipeline = ? AND expires_at < ?",
            q(REQUESTS_TABLE)
        ),
        (pipeline, now),
    )
    .await
    .map_err(db("expiring requests"))?;
    Ok(conn.affected_rows())
}

/// Inside the batch transaction: the claim is still this attempt's (its
/// row locked until the commit, so a takeover waits and then finds it done).
pub(super) async fn fence(conn: &mut Conn, r: &RequestEntry) -> Result<()> {
    let held: Option<i64> = conn
        .exec_first(
            format!(
                "SELECT 1 FROM {}
                 WHERE pipeline = ? AND `key` = ? AND claim = ? AND status = ?
                 FOR UPDATE",
                q(REQUESTS_TABLE)
            ),
            (&r.pipeline, &r.key, &r.claim, PROCESSING),
        )
        .await
        .map_err(db("fencing a request"))?;
    match held {
        Some(_) => Ok(()),
        None => Err(Error::RequestLost { key: r.key.clone() }),
    }
}

/// Inside the batch transaction: the request is done, with its response.
pub(super) async fn finish(conn: &mut Conn, r: &RequestEntry, response: &str) -> Result<()> {
    conn.exec_drop(
        format!(
            "UPDATE {} SET status = ?, response = ?, expires_at = ?
             WHERE pipeline = ? AND `key` = ? AND claim = ?",
            q(REQUESTS_TABLE)
        ),
        (
            DONE,
            response,
            r.expires_at(now_ms()),
            &r.pipeline,
            &r.key,
            &r.claim,
        ),
    )
    .await
    .map_err(db("finishing a request"))?;
    if conn.affected_rows() == 1 {
        Ok(())
    } else {
        Err(Error::RequestLost { key: r.key.clone() })
    }
}
