//! PostgreSQL's `_idemload_requests`: the keys and stored responses of
//! `idemload serve` (see `crate::request`).
//!
//! A request's key is claimed inside the request's own transaction, not in
//! a transaction before it ([`admit`]): a transaction-scoped advisory lock
//! on the key lets one session at a time hold it, whatever the number of
//! serve processes (a key another session holds answers 409 at once, never
//! waits), and the key's row, read once the lock is held, says whether an
//! earlier attempt already committed it. The rows, then the key's row as
//! `done` with its response ([`finish_all`]), commit together; a process
//! killed mid-request leaves nothing behind, and its lock goes with its
//! connection. One transaction thus claims, writes and answers: no claim
//! row is written, locked and rewritten per request, and no claim commits
//! apart.
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, GenericClient, Row};

use super::ddl::advisory_key;
use super::statements::Statements;
use super::{pg_error, qualified};
use crate::destination::sql::quote;
use crate::error::{Error, Result};
use crate::request::{now_ms, Landed, RequestEntry, StoredRequest, DONE, REQUESTS_TABLE};

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
                "SELECT key, {STORED} FROM {} WHERE pipeline = $1 AND key = $2",
                qualified(schema, REQUESTS_TABLE)
            ),
            &[&pipeline, &key],
        )
        .await
        .map_err(pg_error("reading a request"))?;
    Ok(row.as_ref().map(stored_request))
}

/// The columns of a [`StoredRequest`], in the order [`stored_request`]
/// reads them after the key.
const STORED: &str = "digest, status, response, claim, host, pid, expires_at";

/// A row of `SELECT key, {STORED}` as a [`StoredRequest`].
fn stored_request(r: &Row) -> StoredRequest {
    StoredRequest {
        digest: r.get(1),
        status: r.get(2),
        response: r.get(3),
        claim: r.get(4),
        host: r.get(5),
        pid: r.get(6),
        expires_at: r.get(7),
    }
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

/// Inside a request transaction, before anything is written: takes each
/// request's key (a transaction-scoped advisory lock, tried, never waited
/// for) and reads the rows stored under the keys. `None` for a request to
/// write; `Busy` when another session holds its key; `Stored` when its row
/// settles it (`StoredRequest::settles`). A row that does not settle it (a
/// retention that ran out, a claim of an older serve whose holder died) is
/// overwritten by [`finish_all`].
///
/// The lock and the read are sent together but are two statements: the
/// read's snapshot is taken after the locks are held, so it sees every
/// commit of the key's previous holder.
pub(super) async fn admit(
    tx: &impl GenericClient,
    statements: &Statements,
    schema: &str,
    requests: &[&RequestEntry],
) -> Result<Vec<Option<Landed>>> {
    let Some(pipeline) = requests.first().map(|r| &r.pipeline) else {
        return Ok(Vec::new());
    };
    let locks: Vec<i64> = requests
        .iter()
        .map(|r| {
            advisory_key(
                schema,
                &format!("{REQUESTS_TABLE}\0{}\0{}", r.pipeline, r.key),
            )
        })
        .collect();
    let keys: Vec<&str> = requests.iter().map(|r| r.key.as_str()).collect();
    let lock = statements
        .prepare(
            tx,
            "SELECT pg_try_advisory_xact_lock(g.lock)
             FROM unnest($1::bigint[]) WITH ORDINALITY AS g(lock, i) ORDER BY g.i",
        )
        .await
        .map_err(pg_error("taking request keys"))?;
    let read = statements
        .prepare(
            tx,
            &format!(
                "SELECT key, {STORED} FROM {} WHERE pipeline = $1 AND key = ANY($2)",
                qualified(schema, REQUESTS_TABLE)
            ),
        )
        .await
        .map_err(pg_error("reading requests"))?;
    // Polled in this order, so the lock statement is sent first.
    let (lock_params, read_params): (&[&(dyn ToSql + Sync)], &[&(dyn ToSql + Sync)]) =
        (&[&locks], &[pipeline, &keys]);
    let (held, rows) =
        futures_util::try_join!(tx.query(&lock, lock_params), tx.query(&read, read_params))
            .map_err(pg_error("taking request keys"))?;
    let stored: std::collections::HashMap<String, StoredRequest> =
        rows.iter().map(|r| (r.get(0), stored_request(r))).collect();
    let now = now_ms();
    // A key twice in one group (an attempt queued behind one whose client
    // went away): the lock is this session's both times, so the second is
    // told the key is busy here.
    let mut seen = std::collections::HashSet::new();
    Ok(requests
        .iter()
        .zip(&held)
        .map(|(r, held)| {
            if !held.get::<_, bool>(0) || !seen.insert(r.key.as_str()) {
                return Some(Landed::Busy);
            }
            stored
                .get(&r.key)
                .filter(|s| s.settles(now))
                .cloned()
                .map(Landed::Stored)
        })
        .collect())
}

/// Inside a request transaction, after its rows: stores each request as
/// done with its response, in one statement. A row another writer stored
/// meanwhile as done (a serve of an older version, which claims apart) is
/// left alone and fails the transaction, naming its key.
pub(super) async fn finish_all(
    tx: &impl GenericClient,
    statements: &Statements,
    schema: &str,
    done: &[(&RequestEntry, String)],
) -> Result<()> {
    let Some(pipeline) = done.first().map(|(r, _)| &r.pipeline) else {
        return Ok(());
    };
    let now = now_ms();
    let column =
        |f: fn(&RequestEntry) -> &str| done.iter().map(|(r, _)| f(r)).collect::<Vec<&str>>();
    let (keys, digests, claims, hosts) = (
        column(|r| &r.key),
        column(|r| &r.digest),
        column(|r| &r.claim),
        column(|r| &r.host),
    );
    let pids: Vec<i64> = done.iter().map(|(r, _)| r.pid).collect();
    let responses: Vec<&str> = done.iter().map(|(_, a)| a.as_str()).collect();
    let expires: Vec<i64> = done.iter().map(|(r, _)| r.expires_at(now)).collect();
    let finished: Vec<String> = statements
        .query(
            tx,
            &format!(
                "INSERT INTO {table} AS r
                   (pipeline, key, digest, status, response, claim, host, pid, created_at, expires_at)
                 SELECT $1, g.key, g.digest, $2, g.response, g.claim, g.host, g.pid, now(), g.expires_at
                 FROM unnest($3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::bigint[], $9::bigint[])
                   AS g(key, digest, response, claim, host, pid, expires_at)
                 ON CONFLICT (pipeline, key) DO UPDATE SET
                   digest = excluded.digest, status = excluded.status, response = excluded.response,
                   claim = excluded.claim, host = excluded.host, pid = excluded.pid,
                   created_at = excluded.created_at, expires_at = excluded.expires_at
                 WHERE r.status <> $2 OR r.expires_at < $10
                 RETURNING r.key",
                table = qualified(schema, REQUESTS_TABLE)
            ),
            &[
                pipeline, &DONE, &keys, &digests, &responses, &claims, &hosts, &pids, &expires,
                &now,
            ],
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

    use super::super::parse_url;
    use super::super::testing::{server, TestSchema};
    use super::*;

    fn entry(key: &str, digest: &str) -> RequestEntry {
        RequestEntry {
            pipeline: "p".into(),
            key: key.into(),
            claim: format!("claim-{key}-{digest}"),
            digest: digest.into(),
            host: "h".into(),
            pid: 1,
            retention: Duration::from_secs(60),
            answered: Default::default(),
        }
    }

    fn landed(admitted: &[Option<Landed>]) -> Vec<String> {
        admitted
            .iter()
            .map(|a| match a {
                None => "write".to_string(),
                Some(Landed::Busy) => "busy".to_string(),
                Some(Landed::Stored(s)) => format!("stored {} {}", s.status, s.digest),
                Some(Landed::Written(_)) => "written".to_string(),
            })
            .collect()
    }

    /// A key is held by one transaction at a time (the other is told at
    /// once, without waiting); once committed, its row answers the next
    /// attempt; a row whose retention ran out is written over; a key
    /// another writer finished meanwhile fails the finish, named.
    #[tokio::test]
    async fn a_request_transaction_takes_its_key_and_reads_what_is_stored() {
        let Some(url) = server("a_request_transaction_takes_its_key_and_reads_what_is_stored")
        else {
            return;
        };
        let mut pg = TestSchema::new(&url, "admit").await;
        let schema = pg.name.clone();
        pg.client
            .batch_execute(&format!("CREATE SCHEMA {}", quote(&schema)))
            .await
            .unwrap();
        create_table(&pg.client, &schema).await.unwrap();
        let (mut other, _) = parse_url(&url).unwrap().config.connect().await.unwrap();
        let (first, second) = (Statements::default(), Statements::default());
        let (a, b) = (entry("a", "d1"), entry("b", "d1"));

        let tx = pg.client.transaction().await.unwrap();
        let admitted = admit(&tx, &first, &schema, &[&a]).await.unwrap();
        assert_eq!(landed(&admitted), ["write"]);
        {
            let tx2 = other.transaction().await.unwrap();
            let admitted = admit(&tx2, &second, &schema, &[&b, &a, &b]).await.unwrap();
            assert_eq!(
                landed(&admitted),
                ["write", "busy", "busy"],
                "held, or twice"
            );
        }
        finish_all(&tx, &first, &schema, &[(&a, "{\"ok\":1}".into())])
            .await
            .unwrap();
        tx.commit().await.unwrap();

        let tx2 = other.transaction().await.unwrap();
        let again = entry("a", "d2");
        let admitted = admit(&tx2, &second, &schema, &[&again]).await.unwrap();
        assert_eq!(landed(&admitted), ["stored done d1"]);
        tx2.rollback().await.unwrap();

        // A done row past its retention is no answer: written over.
        pg.client
            .execute(
                &format!(
                    "UPDATE {} SET expires_at = 0 WHERE key = 'a'",
                    qualified(&schema, REQUESTS_TABLE)
                ),
                &[],
            )
            .await
            .unwrap();
        let tx2 = other.transaction().await.unwrap();
        let admitted = admit(&tx2, &second, &schema, &[&again]).await.unwrap();
        assert_eq!(landed(&admitted), ["write"]);
        finish_all(&tx2, &second, &schema, &[(&again, "{}".into())])
            .await
            .unwrap();
        tx2.commit().await.unwrap();
        let stored = stored(&pg.client, &first, &schema, "p", "a")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (stored.digest.as_str(), stored.status.as_str()),
            ("d2", DONE)
        );

        // A key done meanwhile (by a writer that claims apart) is not
        // overwritten: the group fails, naming it.
        let tx = pg.client.transaction().await.unwrap();
        let (c, late) = (entry("c", "d1"), entry("a", "d2"));
        match finish_all(
            &tx,
            &first,
            &schema,
            &[(&c, "{}".into()), (&late, "{}".into())],
        )
        .await
        {
            Err(Error::RequestLost { key }) => assert_eq!(key, "a"),
            other => panic!("{other:?}"),
        }
        drop(tx);
        pg.drop().await;
    }
}
