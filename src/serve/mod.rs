//! `idemload serve`: an HTTP ingest endpoint that lands each request
//! exactly once, following the IETF `Idempotency-Key` header draft.
//!
//! `POST /v1/records` carries records (a JSON object, a JSON array or
//! NDJSON) and an `Idempotency-Key`. A key already in flight in this
//! process answers 409 (422 with another body) at once; otherwise a
//! request goes through three steps:
//!
//! 1. **Claim** the key. SQLite and MySQL/MariaDB claim in a short
//!    transaction of their own: insert its `_idemload_requests` row as
//!    `processing` with a lease (`claim_lease`). The primary key
//!    `(pipeline, key)` lets exactly one attempt win, in this process or
//!    any other sharing the database. The loser reads the row: done with
//!    the same body digest → the stored response again
//!    (`Idempotent-Replayed: true`, nothing written); another digest → 422;
//!    processing under a live lease → 409; processing under a lease that ran
//!    out, or held by a process of this host that no longer exists → taken
//!    over by an `UPDATE` naming the claim it saw (one taker wins).
//!    PostgreSQL claims in step 3 instead, inside the request's own
//!    transaction (`Destination::claims_in_transaction`; see
//!    `destination::postgres::requests`), with the same answers.
//! 2. **Plan** the records with the pipeline's planner (the same checks,
//!    keys and one-version-per-key as `run`).
//! 3. **Commit** through the one commit path (`destination::commit`) with
//!    the request in `Commit::request`: the transaction fences on the
//!    claim (or takes the key), writes the rows and rejects, and marks the
//!    request done with its response. Rows and response commit together or
//!    not at all, so a process killed mid-request leaves no row (and, where
//!    claims commit apart, a claim that expires). Where the destination
//!    commits several requests in one transaction (PostgreSQL), requests
//!    planned while the writers are busy are committed together (see
//!    [`group`]).
//!
//! **Why serve takes no run lock.** A run holds the pipeline's lock so that
//! one process at a time moves its checkpoint; several serve processes must
//! write the same pipeline at once, so their batches are fenced by the
//! request's claim instead, and they move no checkpoint (records arrive in
//! no cursor order; the cursor still keeps an older version from
//! overwriting a newer row). Concurrent requests writing the same record
//! key are made safe by the database: each backend's merge is correct
//! under concurrent writers, and a transaction that meets a unique
//! violation, a serialisation failure or a deadlock is rolled back and the
//! request's transaction run again (up to [`ATTEMPTS`] times), never
//! answered 500 on the first conflict. `replace` and `window` modes, which
//! swap a whole table per run, are refused. A `run` of the same pipeline
//! (one that also has a `[source]`) may write while serve does: both merge,
//! so rows stay right (a run's straight copy of keys new to an empty table
//! that meets a serve request's row is undone and merged instead).
//!
//! A claim's lease is not renewed: a request must commit within
//! `claim_lease`, or its key may be taken over and its own commit then
//! fails its fence (409), never writing twice. (A PostgreSQL key is held
//! as long as its transaction runs, and no longer.)
//!
//! Stopping (SIGTERM, SIGINT through the [`StopToken`]) stops accepting
//! connections, lets in-flight requests commit and answer, then returns.

mod answer;
mod body;
pub mod config;
mod group;
mod metrics;
mod pool;

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

pub use self::body::{idempotency_key, records};
pub use self::config::{parse_size, ServeConfig, ServeSettings, DEFAULT_MAX_BODY};
pub use self::metrics::Metrics;

use self::answer::{failed, mismatch, Answer};
use self::group::Written;
use self::pool::Pool;
use crate::batch::PlannedBatch;
use crate::connect::Backend;
use crate::error::{Error, ErrorKind, Result};
use crate::pipeline::plan::Planner;
use crate::pipeline::Pipeline;
use crate::request::{now_ms, Claim, Landed, RequestEntry, StoredRequest, DONE};
use crate::state::LockHolder;
use crate::stats::RunStats;
use crate::stop::StopToken;

/// Times a request's transaction is tried when it conflicts with another
/// writer's.
pub const ATTEMPTS: usize = 5;

/// Serves `pipeline` on `listener` until `stop` is asked for, then lets
/// the requests in flight finish and returns.
pub async fn serve(
    pipeline: Pipeline,
    listener: tokio::net::TcpListener,
    stop: StopToken,
) -> Result<()> {
    let settings = pipeline
        .config
        .serve
        .clone()
        .unwrap_or_default()
        .settings()?;
    if pipeline.settings.mode.is_staged() {
        return Err(Error::config(format!(
            "idemload serve loads with mode = \"merge\" or \"insert_new\"; mode = \"{}\" replaces the table at each run",
            pipeline.settings.mode.as_str()
        )));
    }
    let Some(database) = pipeline.config.destination.database() else {
        return Err(unsupported_destination());
    };
    let connections = match Backend::of_url(&database.url) {
        Ok(Backend::Sqlite) => 1,
        Ok(Backend::Postgres | Backend::Mysql) => settings.connections,
        _ => return Err(unsupported_destination()),
    };
    let planner = Planner::of(&pipeline.settings);
    let name = pipeline.name().to_string();
    let pool = Pool {
        pipeline: pipeline.clone(),
        idle: Mutex::new(Vec::new()),
        permits: Arc::new(Semaphore::new(connections)),
        claim_lease: settings.claim_lease,
    };
    // One connection now: a wrong URL or password fails at start, not at
    // the first request.
    let first = pool.open().await?;
    let max_group = first.max_group();
    let claims_apart = !first.claims_in_transaction();
    pool.idle
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(first);
    let shared = Arc::new(Shared {
        name: name.clone(),
        settings,
        planner,
        pool,
        metrics: Metrics::new(&name),
        this: LockHolder::this_process(""),
        in_flight: Mutex::new(HashMap::new()),
        claims_apart,
        queue: (max_group > 1).then(group::Queue::new),
    });
    let cleaner = tokio::spawn(clean_expired(shared.clone(), stop.clone()));
    let writers: Vec<_> = match shared.queue {
        Some(_) => (0..writers(connections))
            .map(|_| tokio::spawn(group::writer(shared.clone(), max_group)))
            .collect(),
        None => Vec::new(),
    };
    let app = Router::new()
        .route("/v1/records", post(ingest))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(shared.clone());
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::info!(pipeline = %name, %addr, connections, "Serving.");
    let signal = {
        let stop = stop.clone();
        async move { stop.stopped().await }
    };
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(signal)
        .await;
    cleaner.abort();
    // Every request was answered: no group is waiting.
    for writer in writers {
        writer.abort();
    }
    served.map_err(|e| Error::config(format!("serving on {addr}: {e}")))?;
    tracing::info!(pipeline = %name, "Stopped: every request in flight was answered.");
    Ok(())
}

/// Binds `addr` (a clear error when it is taken).
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::config(format!("cannot listen on {addr}: {e}")))
}

fn unsupported_destination() -> Error {
    Error::config(
        "idemload serve writes into SQLite (sqlite://), PostgreSQL (postgres://) and MySQL/MariaDB (mysql://) destinations",
    )
}

/// What every request shares.
struct Shared {
    name: String,
    settings: ServeSettings,
    planner: Planner,
    pool: Pool,
    metrics: Metrics,
    /// This process (host, pid), as claims record it.
    this: LockHolder,
    /// The keys of this process's requests in flight, with their body's
    /// digest.
    in_flight: Mutex<HashMap<String, String>>,
    /// Whether keys are claimed in a transaction of their own before the
    /// request's (false: inside it, see `Destination::claims_in_transaction`).
    claims_apart: bool,
    /// Where planned requests wait for a writer, when the destination
    /// commits several in one transaction (see `group`).
    queue: Option<group::Requests>,
}

/// The group writers for `connections` database connections: a quarter
/// of them. Few writers make large groups (each transaction's fixed cost,
/// its statements and its flush, shared by more requests); more than one
/// keeps a group being written while the next one gathers. The other
/// connections serve requests written alone (retries, the requests of a
/// failed group), replays of a bad body's key, and the cleaning of expired
/// keys.
fn writers(connections: usize) -> usize {
    (connections / 4).max(1)
}

async fn healthz() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        r#"{"status":"ok"}"#,
    )
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        shared.metrics.render(),
    )
}

async fn ingest(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Answer {
    let started = Instant::now();
    let key = headers
        .get("idempotency-key")
        .and_then(|v| body::idempotency_key(v.as_bytes()).ok());
    let (answer, stats) = shared.ingest(&headers, body).await;
    let seconds = started.elapsed().as_secs_f64();
    shared.metrics.answered(answer.status.as_u16(), seconds);
    if let Some(stats) = &stats {
        shared.metrics.committed(stats);
    }
    let status = answer.status.as_u16();
    let ms = (seconds * 1000.0).round() as u64;
    let key = key.as_deref().unwrap_or("-");
    match &stats {
        Some(stats) => {
            tracing::info!(pipeline = %shared.name, key, status, ms, %stats, "Request committed.")
        }
        None if answer.status.is_server_error() => {
            tracing::warn!(pipeline = %shared.name, key, status, ms, replayed = answer.replayed, "Request failed.")
        }
        None => {
            tracing::info!(pipeline = %shared.name, key, status, ms, replayed = answer.replayed, "Request answered.")
        }
    }
    answer
}

/// How a key's claim went.
enum Claimed {
    /// This attempt holds the key: process the request.
    Mine,
    /// Answer this without processing.
    Answer(Answer),
}

impl Shared {
    /// Answers one request; the stats when it committed.
    async fn ingest(&self, headers: &HeaderMap, body: Body) -> (Answer, Option<RunStats>) {
        if let Some(token) = &self.settings.token {
            if !authorized(headers, token) {
                let mut a = Answer::error(
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong Authorization: Bearer token",
                );
                a.challenge = true;
                return (a, None);
            }
        }
        let key = match headers.get("idempotency-key") {
            None => {
                return (
                    Answer::error(
                        StatusCode::BAD_REQUEST,
                        "the Idempotency-Key header is required (e.g. Idempotency-Key: \"8e03978e-40d5-43e8-bc93-6894a57f9324\")",
                    ),
                    None,
                )
            }
            Some(v) => match body::idempotency_key(v.as_bytes()) {
                Ok(k) => k,
                Err(e) => return (Answer::error(StatusCode::BAD_REQUEST, e), None),
            },
        };
        let max = self.settings.max_body;
        let too_large = || {
            Answer::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is larger than max_body = {max} bytes"),
            )
        };
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max as u64) {
            return (too_large(), None);
        }
        let mut bytes = Vec::with_capacity(declared.unwrap_or(0).min(max as u64) as usize);
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(chunk) => {
                    if bytes.len() + chunk.len() > max {
                        return (too_large(), None);
                    }
                    bytes.extend_from_slice(&chunk);
                }
                Err(e) => {
                    return (
                        Answer::error(
                            StatusCode::BAD_REQUEST,
                            format!("reading the body failed: {e}"),
                        ),
                        None,
                    )
                }
            }
        }
        let digest = hex::encode(Sha256::digest(&bytes));
        let claim = Claim {
            pipeline: self.name.clone(),
            key: key.clone(),
            claim: uuid::Uuid::now_v7().to_string(),
            digest,
            host: self.this.host.clone(),
            pid: i64::from(self.this.pid),
            lease_until: now_ms() + self.settings.claim_lease.as_millis() as i64,
        };
        let _in_flight = match InFlight::enter(&self.in_flight, &claim) {
            Ok(held) => held,
            Err(digest) if digest == claim.digest => return (busy(), None),
            Err(_) => return (mismatch(), None),
        };
        if self.claims_apart {
            match self.claim(&claim).await {
                Ok(Claimed::Mine) => {}
                Ok(Claimed::Answer(a)) => return (a, None),
                Err(e) => return (failed(&e), None),
            }
        }
        match self.process(&claim, bytes).await {
            Ok((answer, stats)) => (answer, stats),
            Err(e) => {
                if !matches!(e, Error::RequestLost { .. }) {
                    self.release(&claim).await;
                }
                (failed(&e), None)
            }
        }
    }

    /// Claims the key in a transaction of its own, or says how to answer
    /// without processing.
    async fn claim(&self, claim: &Claim) -> Result<Claimed> {
        let mut conn = self.pool.get().await?;
        // Each turn either claims, answers, or sees the row change under
        // it (claimed, finished or deleted by another process meanwhile).
        for _ in 0..10 {
            if conn.dest().insert_claim(claim).await? {
                return Ok(Claimed::Mine);
            }
            let Some(stored) = conn
                .dest()
                .stored_request(&claim.pipeline, &claim.key)
                .await?
            else {
                continue;
            };
            if stored.settles(now_ms()) {
                return Ok(Claimed::Answer(stored_answer(stored, &claim.digest)));
            }
            // A lease that ran out, a holder that died, or a key past its
            // retention: take it over, unless another process did first.
            if conn
                .dest()
                .take_over_claim(claim, &stored.claim, &stored.status)
                .await?
            {
                tracing::info!(pipeline = %self.name, key = %claim.key, from = %stored.claim, status = %stored.status, "Request key taken over.");
                return Ok(Claimed::Mine);
            }
        }
        Ok(Claimed::Answer(Answer::error(
            StatusCode::CONFLICT,
            "the Idempotency-Key is changing hands between other requests; retry later",
        )))
    }

    /// Plans and commits a claimed request; its answer and stats.
    async fn process(&self, claim: &Claim, bytes: Vec<u8>) -> Result<(Answer, Option<RunStats>)> {
        let key = claim.key.clone();
        let small = bytes.len() <= INLINE_BODY;
        let items = match off_runtime(small, "parsing the body", move || {
            body::records(&bytes, &key)
        })
        .await?
        {
            Ok(items) => items,
            Err(e) => {
                // Nothing to commit: free the key so a corrected body may
                // use it. Unclaimed, the key may be done with another body.
                self.release(claim).await;
                if let Some(answer) = self.answer_from_store(claim).await {
                    return Ok((answer, None));
                }
                return Ok((Answer::error(StatusCode::BAD_REQUEST, e), None));
            }
        };
        let mut last_error = None;
        for attempt in 1..=ATTEMPTS {
            let planner = self.planner.clone();
            let planned_items = items.clone();
            let batch = off_runtime(small, "planning the records", move || {
                planner.plan(planned_items)
            })
            .await?;
            let entry = RequestEntry {
                pipeline: claim.pipeline.clone(),
                key: claim.key.clone(),
                claim: claim.claim.clone(),
                digest: claim.digest.clone(),
                host: claim.host.clone(),
                pid: claim.pid,
                retention: self.settings.key_retention,
                answered: Default::default(),
            };
            // First in a group when the destination groups requests; a
            // retry, or a request whose group failed, alone.
            let written = match &self.queue {
                Some(queue) if attempt == 1 => queue
                    .ask((batch, entry.clone()))
                    .await
                    .unwrap_or(Written::Alone),
                _ => match self.write(vec![(batch, &entry)]).await {
                    Ok(mut landed) => match landed.pop() {
                        Some(landed) => Written::Done(landed),
                        None => Written::Failed(Error::config("a request was not written")),
                    },
                    Err(e) => Written::Failed(e),
                },
            };
            match written {
                Written::Done(Landed::Written(stats)) => {
                    let body = entry.answered.get().cloned().unwrap_or_default();
                    return Ok((Answer::json(StatusCode::OK, body), Some(stats)));
                }
                Written::Done(Landed::Busy) => return Ok((busy(), None)),
                Written::Done(Landed::Stored(stored)) => {
                    return Ok((stored_answer(stored, &claim.digest), None))
                }
                Written::Alone => {}
                Written::Failed(e @ Error::RequestLost { .. }) => return Err(e),
                Written::Failed(e) if attempt < ATTEMPTS && conflicts(&e) => {
                    tracing::info!(pipeline = %self.name, key = %claim.key, attempt, error = %e, "Request transaction conflicted; trying again.");
                    let pause = Duration::from_millis(10 * (1 << attempt) as u64);
                    tokio::time::sleep(pause).await;
                    last_error = Some(e);
                }
                Written::Failed(e) => return Err(e),
            }
        }
        Err(last_error.unwrap_or_else(|| Error::config("no attempt was made")))
    }

    /// Writes `work` (one request, or a group) in one transaction on a
    /// connection of the pool; a connection whose write failed is dropped.
    async fn write(&self, work: Vec<(PlannedBatch, &RequestEntry)>) -> Result<Vec<Landed>> {
        let mut conn = self.pool.get().await?;
        let written = conn.dest().write_requests(work).await;
        if written.is_err() {
            conn.discard();
        }
        written
    }

    /// Where keys are claimed inside the request's transaction, the answer
    /// the key's stored row gives a request that will not be written (its
    /// body is not records): a done key with another body answers 422.
    async fn answer_from_store(&self, claim: &Claim) -> Option<Answer> {
        if self.claims_apart {
            return None;
        }
        let stored = async {
            let mut conn = self.pool.get().await?;
            conn.dest()
                .stored_request(&claim.pipeline, &claim.key)
                .await
        };
        match stored.await {
            Ok(Some(stored)) if stored.settles(now_ms()) => {
                Some(stored_answer(stored, &claim.digest))
            }
            _ => None,
        }
    }

    /// Frees a claim whose request failed before committing (best effort:
    /// otherwise its lease frees it). Nothing to do where keys are claimed
    /// inside the request's transaction.
    async fn release(&self, claim: &Claim) {
        if !self.claims_apart {
            return;
        }
        let released = async {
            let mut conn = self.pool.get().await?;
            conn.dest()
                .release_claim(&claim.pipeline, &claim.key, &claim.claim)
                .await
        };
        if let Err(e) = released.await {
            tracing::warn!(pipeline = %self.name, key = %claim.key, error = %e, "Could not release the request's claim; it frees itself when its lease runs out.");
        }
    }
}

/// Bodies up to this size are parsed and planned on the runtime's thread
/// (tens of microseconds); larger ones on the blocking pool, which costs a
/// thread hand-off each way but keeps other requests moving.
const INLINE_BODY: usize = 64 << 10;

/// Runs `f` here when `small`, else on the blocking pool.
async fn off_runtime<T: Send + 'static>(
    small: bool,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    if small {
        return Ok(f());
    }
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::config(format!("{what} failed: {e}")))
}

/// Whether running the request's transaction again may succeed: another
/// writer's transaction conflicted with it (same keys, same new columns),
/// or the connection broke.
fn conflicts(e: &Error) -> bool {
    matches!(
        e.kind(),
        Some(
            ErrorKind::Conflict
                | ErrorKind::UniqueViolation
                | ErrorKind::SchemaMismatch
                | ErrorKind::Timeout
                | ErrorKind::ConnectionLost
                | ErrorKind::Other
        )
    )
}

/// The answer a stored row that settles a request gives it
/// (`StoredRequest::settles`): the stored response again, 422 for another
/// body, 409 while the key is claimed.
fn stored_answer(stored: StoredRequest, digest: &str) -> Answer {
    if stored.digest != digest {
        mismatch()
    } else if stored.status == DONE {
        Answer {
            status: StatusCode::OK,
            replayed: true,
            body: stored.response.unwrap_or_default(),
            challenge: false,
        }
    } else {
        busy()
    }
}

/// 409: another attempt at the key is being processed.
fn busy() -> Answer {
    Answer::error(
        StatusCode::CONFLICT,
        "a request with this Idempotency-Key is being processed; retry later",
    )
}

/// A key held in [`Shared::in_flight`] while its request is processed.
struct InFlight<'a> {
    keys: &'a Mutex<HashMap<String, String>>,
    key: String,
}

impl<'a> InFlight<'a> {
    /// Holds `claim`'s key; when a request of this process holds it
    /// already, that request's body digest.
    fn enter(
        keys: &'a Mutex<HashMap<String, String>>,
        claim: &Claim,
    ) -> std::result::Result<InFlight<'a>, String> {
        match lock(keys).entry(claim.key.clone()) {
            Entry::Occupied(held) => Err(held.get().clone()),
            Entry::Vacant(free) => {
                free.insert(claim.digest.clone());
                Ok(InFlight {
                    keys,
                    key: claim.key.clone(),
                })
            }
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        lock(self.keys).remove(&self.key);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// `Authorization: Bearer <token>`, compared in constant time.
fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let Some(sent) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
    else {
        return false;
    };
    let (a, b) = (sent.trim().as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Deletes expired keys every so often until the stop.
async fn clean_expired(shared: Arc<Shared>, stop: StopToken) {
    let every =
        (shared.settings.key_retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        if stop
            .unless_stopped(tokio::time::sleep(every))
            .await
            .is_none()
        {
            return;
        }
        let cleaned = async {
            let mut conn = shared.pool.get().await?;
            conn.dest().expire_requests(&shared.name, now_ms()).await
        };
        match cleaned.await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(pipeline = %shared.name, deleted = n, "Expired request keys deleted.")
            }
            Err(e) => {
                tracing::warn!(pipeline = %shared.name, error = %e, "Could not delete expired request keys.")
            }
        }
    }
}
