//! PostgreSQL's `_idemload_requests`: the claims and stored responses of
//! `idemload serve` (see `crate::request`).
//!
//! A claim is one `INSERT … ON CONFLICT DO NOTHING` in a transaction of its
//! own: the primary key `(pipeline, key)` lets exactly one session win,
//! whatever the number of serve processes. A takeover is an `UPDATE` that
//! names the claim and status it saw, so of two processes taking over the
//! same dead claim one changes the row and the other changes nothing. The
//! request's batch transaction fences on its claim with `SELECT … FOR
//! UPDATE` (a takeover waits for the batch to commit, then finds the
//! request done) and marks it done in the same transaction as its rows.

use tokio_postgres::{Client, GenericClient};

use super::ddl::advisory_key;
use super::statements::Statements;
use super::{pg_error, qualified};
use crate::destination::sql::quote;
use crate::error::{Error, Result};
use crate::request::{
    now_ms, Claim, RequestEntry, StoredRequest, DONE, PROCESSING, REQUESTS_TABLE,
};

/// Creates `_idemload_requests` when missing (serialised by an advisory
/// lock, as concurrent `CREATE … IF NOT EXISTS` can collide).
pub(super) async fn create_table(client: &Client, schema: &str) -> Result<()> {
    let table = qualified(schema, REQUESTS_TABLE);
    // Looked up first: `CREATE INDEX IF NOT EXISTS` locks the table before
    // it finds the index, and would wait for every request in flight.
    let exists: bool = client
        .query_one("SELECT to_regclass($1::text) IS NOT NULL", &[&table])
        .await
        .map_err(pg_error("reading _idemload_requests"))?
        .get(0);
    if exists {
        return Ok(());
    }
    client
        .batch_execute(&format!(
            "BEGIN;
             SELECT pg_advisory_xact_lock({lock});
             CREATE TABLE IF NOT EXISTS {table} (
                 pipeline text NOT NULL, key text NOT NULL, digest text NOT NULL,
                 status text NOT NULL, response text, claim text NOT NULL,
                 host text NOT NULL, pid bigint NOT NULL,
                 created_at timestamptz NOT NULL, expires_at bigint NOT NULL,
                 PRIMARY KEY (pipeline, key));
             CREATE INDEX IF NOT EXISTS {index} ON {table} (pipeline, expires_at);
             COMMIT;",
            lock = advisory_key("", "_idemload_bookkeeping"),
            index = quote("_idemload_requests_expires"),
        ))
        .await
        .map_err(pg_error("creating _idemload_requests"))?;
    Ok(())
}

pub(super) async fn stored(
    client: &Client,
    statements: &Statements,
    schema: &str,
    pipeline: &str,
    key: &str,
) -> Result<Option<StoredRequest>> {
    let row = statements
        .query_opt(
            client,
            &format!(
                "SELECT digest, status, response, claim, host, pid, expires_at
                 FROM {} WHERE pipeline = $1 AND key = $2",
                qualified(schema, REQUESTS_TABLE)
            ),
            &[&pipeline, &key],
        )
        .await
        .map_err(pg_error("reading a request"))?;
    Ok(row.map(|r| StoredRequest {
        digest: r.get(0),
        status: r.get(1),
        response: r.get(2),
        claim: r.get(3),
        host: r.get(4),
        pid: r.get(5),
        expires_at: r.get(6),
    }))
}

pub(super) async fn insert_claim(
    client: &Client,
    statements: &Statements,
    schema: &str,
    c: &Claim,
) -> Result<bool> {
    let n = statements
        .execute(
            client,
            &format!(
                "INSERT INTO {} (pipeline, key, digest, status, claim, host, pid, created_at, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, now(), $8)
                 ON CONFLICT (pipeline, key) DO NOTHING",
                qualified(schema, REQUESTS_TABLE)
            ),
            &[
                &c.pipeline,
                &c.key,
                &c.digest,
                &PROCESSING,
                &c.claim,
                &c.host,
                &c.pid,
                &c.lease_until,
            ],
        )
        .await
        .map_err(pg_error("claiming a request"))?;
    Ok(n == 1)
}

/// [`insert_claim`] for several claims in one statement: whether each
/// won its key. Of two claims of one key in the same statement, one wins.
pub(super) async fn insert_claims(
    client: &Client,
    statements: &Statements,
    schema: &str,
    claims: &[Claim],
) -> Result<Vec<bool>> {
    if let [claim] = claims {
        return Ok(vec![insert_claim(client, statements, schema, claim).await?]);
    }
    let column = |f: fn(&Claim) -> &str| claims.iter().map(f).collect::<Vec<&str>>();
    let (pipelines, keys, digests, tokens, hosts) = (
        column(|c| &c.pipeline),
        column(|c| &c.key),
        column(|c| &c.digest),
        column(|c| &c.claim),
        column(|c| &c.host),
    );
    let pids: Vec<i64> = claims.iter().map(|c| c.pid).collect();
    let leases: Vec<i64> = claims.iter().map(|c| c.lease_until).collect();
    let won: std::collections::HashSet<String> = statements
        .query(
            client,
            &format!(
                "INSERT INTO {} (pipeline, key, digest, status, claim, host, pid, created_at, expires_at)
                 SELECT g.pipeline, g.key, g.digest, $1, g.claim, g.host, g.pid, now(), g.expires_at
                 FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[], $8::bigint[])
                   AS g(pipeline, key, digest, claim, host, pid, expires_at)
                 ON CONFLICT (pipeline, key) DO NOTHING
                 RETURNING claim",
                qualified(schema, REQUESTS_TABLE)
            ),
            &[
                &PROCESSING,
                &pipelines,
                &keys,
                &digests,
                &tokens,
                &hosts,
                &pids,
                &leases,
            ],
        )
        .await
        .map_err(pg_error("claiming requests"))?
        .iter()
        .map(|row| row.get(0))
        .collect();
    Ok(claims.iter().map(|c| won.contains(&c.claim)).collect())
}

pub(super) async fn take_over(
    client: &Client,
    statements: &Statements,
    schema: &str,
    c: &Claim,
    from: &str,
    status: &str,
) -> Result<bool> {
    let n = statements
        .execute(
            client,
            &format!(
                "UPDATE {} SET digest = $3, status = $4, response = NULL, claim = $5, host = $6,
                     pid = $7, created_at = now(), expires_at = $8
                 WHERE pipeline = $1 AND key = $2 AND claim = $9 AND status = $10",
                qualified(schema, REQUESTS_TABLE)
            ),
            &[
                &c.pipeline,
                &c.key,
                &c.digest,
                &PROCESSING,
                &c.claim,
                &c.host,
                &c.pid,
                &c.lease_until,
                &from,
                &status,
            ],
        )
        .await
        .map_err(pg_error("taking over a request"))?;
    Ok(n == 1)
}

pub(super) async fn release(
    client: &Client,
    statements: &Statements,
    schema: &str,
    pipeline: &str,
    key: &str,
    claim: &str,
) -> Result<()> {
    statements
        .execute(
            client,
            &format!(
                "DELETE FROM {} WHERE pipeline = $1 AND key = $2 AND claim = $3 AND status = $4",
                qualified(schema, REQUESTS_TABLE)
            ),
            &[&pipeline, &key, &claim, &PROCESSING],
        )
        .await
        .map_err(pg_error("releasing a request"))?;
    Ok(())
}

pub(super) async fn expire(client: &Client, schema: &str, pipeline: &str, now: i64) -> Result<u64> {
    client
        .execute(
            &format!(
                "DELETE FROM {} WHERE pipeline = $1 AND expires_at < $2",
                qualified(schema, REQUESTS_TABLE)
            ),
            &[&pipeline, &now],
        )
        .await
        .map_err(pg_error("expiring requests"))
}

/// Inside the batch transaction: the claim is still this attempt's. The
/// row is locked, not written: a takeover waits for this transaction, while
/// a claim of the same key by another request (`INSERT … ON CONFLICT`)
/// still sees the row at once and answers 409 rather than wait behind it.
///
/// The fence is a request transaction's first statement, and it also turns
/// the transaction's synchronous commit back on ([`SYNC`]): serve's
/// connections commit claims without waiting for the disk, the rows and the
/// stored answer wait.
pub(super) async fn fence(
    tx: &impl GenericClient,
    statements: &Statements,
    schema: &str,
    r: &RequestEntry,
) -> Result<()> {
    let n = statements
        .query(
            tx,
            &format!(
                "SELECT {SYNC} FROM {}
                 WHERE pipeline = $1 AND key = $2 AND claim = $3 AND status = $4
                 FOR UPDATE",
                qualified(schema, REQUESTS_TABLE)
            ),
            &[&r.pipeline, &r.key, &r.claim, &PROCESSING],
        )
        .await
        .map_err(pg_error("fencing a request"))?
        .len();
    if n == 1 {
        Ok(())
    } else {
        Err(Error::RequestLost { key: r.key.clone() })
    }
}

/// Inside the batch transaction: the request is done, with its response.
pub(super) async fn finish(
    tx: &impl GenericClient,
    statements: &Statements,
    schema: &str,
    r: &RequestEntry,
    response: &str,
) -> Result<()> {
    let n = statements
        .execute(
            tx,
            &format!(
                "UPDATE {} SET status = $4, response = $5, expires_at = $6
                 WHERE pipeline = $1 AND key = $2 AND claim = $3",
                qualified(schema, REQUESTS_TABLE)
            ),
            &[
                &r.pipeline,
                &r.key,
                &r.claim,
                &DONE,
                &response,
                &r.expires_at(now_ms()),
            ],
        )
        .await
        .map_err(pg_error("finishing a request"))?;
    if n == 1 {
        Ok(())
    } else {
        Err(Error::RequestLost { key: r.key.clone() })
    }
}

/// `SET LOCAL synchronous_commit = on` as an expression, so the fence
/// carries it without a round trip of its own; it runs for each row the
/// fence returns, and a fence that returns none fails the transaction.
const SYNC: &str = "set_config('synchronous_commit', 'on', true)";

/// [`fence`] for a group of requests, in one statement: fails with the
/// first request whose claim is no longer its own.
pub(super) async fn fence_all(
    tx: &impl GenericClient,
    statements: &Statements,
    schema: &str,
    requests: &[&RequestEntry],
) -> Result<()> {
    if let [request] = requests {
        return fence(tx, statements, schema, request).await;
    }
    let Some(pipeline) = requests.first().map(|r| &r.pipeline) else {
        return Ok(());
    };
    let keys: Vec<&str> = requests.iter().map(|r| r.key.as_str()).collect();
    let claims: Vec<&str> = requests.iter().map(|r| r.claim.as_str()).collect();
    let held: Vec<String> = statements
        .query(
            tx,
            &format!(
                "SELECT r.key, {SYNC} FROM {} r
                 JOIN unnest($2::text[], $3::text[]) AS g(key, claim)
                   ON r.key = g.key AND r.claim = g.claim
                 WHERE r.pipeline = $1 AND r.status = $4
                 FOR UPDATE OF r",
                qualified(schema, REQUESTS_TABLE)
            ),
            &[pipeline, &keys, &claims, &PROCESSING],
        )
        .await
        .map_err(pg_error("fencing requests"))?
        .iter()
        .map(|row| row.get(0))
        .collect();
    lost(requests.iter().copied(), &held)
}

/// [`finish`] for a group of requests, in one statement.
pub(super) async fn finish_all(
    tx: &impl GenericClient,
    statements: &Statements,
    schema: &str,
    done: &[(&RequestEntry, String)],
) -> Result<()> {
    if let [(request, response)] = done {
        return finish(tx, statements, schema, request, response).await;
    }
    let Some(pipeline) = done.first().map(|(r, _)| &r.pipeline) else {
        return Ok(());
    };
    let now = now_ms();
    let keys: Vec<&str> = done.iter().map(|(r, _)| r.key.as_str()).collect();
    let claims: Vec<&str> = done.iter().map(|(r, _)| r.claim.as_str()).collect();
    let responses: Vec<&str> = done.iter().map(|(_, a)| a.as_str()).collect();
    let expires: Vec<i64> = done.iter().map(|(r, _)| r.expires_at(now)).collect();
    let finished: Vec<String> = statements
        .query(
            tx,
            &format!(
                "UPDATE {} r SET status = $2, response = g.response, expires_at = g.expires_at
                 FROM unnest($3::text[], $4::text[], $5::text[], $6::bigint[])
                   AS g(key, claim, response, expires_at)
                 WHERE r.pipeline = $1 AND r.key = g.key AND r.claim = g.claim
                 RETURNING r.key",
                qualified(schema, REQUESTS_TABLE)
            ),
            &[pipeline, &DONE, &keys, &claims, &responses, &expires],
        )
        .await
        .map_err(pg_error("finishing requests"))?
        .iter()
        .map(|row| row.get(0))
        .collect();
    lost(done.iter().map(|(r, _)| *r), &finished)
}

/// Fails with the first of `requests` whose key is not in `held`.
fn lost<'a>(mut requests: impl Iterator<Item = &'a RequestEntry>, held: &[String]) -> Result<()> {
    match requests.find(|r| !held.contains(&r.key)) {
        None => Ok(()),
        Some(lost) => Err(Error::RequestLost {
            key: lost.key.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::testing::{server, TestSchema};
    use super::*;

    async fn show(tx: &tokio_postgres::Transaction<'_>) -> String {
        tx.query_one("SHOW synchronous_commit", &[])
            .await
            .unwrap()
            .get(0)
    }

    /// On a connection whose commits do not wait for the disk (serve's),
    /// the fence of one request and of a group turns a request
    /// transaction's synchronous commit back on.
    #[tokio::test]
    async fn a_fenced_request_transaction_waits_for_the_disk() {
        let Some(url) = server("a_fenced_request_transaction_waits_for_the_disk") else {
            return;
        };
        let mut pg = TestSchema::new(&url, "fence_sync").await;
        let schema = pg.name.clone();
        pg.client
            .batch_execute(&format!("CREATE SCHEMA {}", quote(&schema)))
            .await
            .unwrap();
        create_table(&pg.client, &schema).await.unwrap();
        pg.client
            .batch_execute("SET synchronous_commit = off")
            .await
            .unwrap();
        let statements = Statements::default();
        let entry = |key: &str| RequestEntry {
            pipeline: "p".into(),
            key: key.into(),
            claim: format!("claim-{key}"),
            retention: Duration::from_secs(60),
            answered: Default::default(),
        };
        let entries = [entry("a"), entry("b")];
        for e in &entries {
            let claim = Claim {
                pipeline: e.pipeline.clone(),
                key: e.key.clone(),
                claim: e.claim.clone(),
                digest: "d".into(),
                host: "h".into(),
                pid: 1,
                lease_until: now_ms() + 60_000,
            };
            assert!(insert_claim(&pg.client, &statements, &schema, &claim)
                .await
                .unwrap());
        }
        {
            let tx = pg.client.transaction().await.unwrap();
            assert_eq!(show(&tx).await, "off");
            fence(&tx, &statements, &schema, &entries[0]).await.unwrap();
            assert_eq!(show(&tx).await, "on");
        }
        {
            let tx = pg.client.transaction().await.unwrap();
            let refs: Vec<&RequestEntry> = entries.iter().collect();
            fence_all(&tx, &statements, &schema, &refs).await.unwrap();
            assert_eq!(show(&tx).await, "on");
        }
        {
            // A group whose second claim is no longer its own names that key.
            let tx = pg.client.transaction().await.unwrap();
            let taken = RequestEntry {
                claim: "another".into(),
                ..entry("b")
            };
            let done = [(&entries[0], "{}".to_string()), (&taken, "{}".to_string())];
            match finish_all(&tx, &statements, &schema, &done).await {
                Err(Error::RequestLost { key }) => assert_eq!(key, "b"),
                other => panic!("{other:?}"),
            }
        }
        let off: String = pg
            .client
            .query_one("SHOW synchronous_commit", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(off, "off", "only the transaction's own setting changes");
        pg.drop().await;
    }
}
