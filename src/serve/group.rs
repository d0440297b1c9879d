//! Group commit: requests planned while the writers are busy share one
//! transaction.
//!
//! A planned request waits in a queue; each writer takes the oldest one and
//! every other one waiting (up to the destination's `max_group`), writes
//! them with `Destination::write_requests` in one transaction, and answers
//! each. Nothing waits on purpose: a request that finds a writer idle is
//! written at once, alone; under load the queue fills while the writers
//! work, and one transaction (one fence, one finish, one flush to disk)
//! then carries many requests. The requests of a group are written in the
//! order they were queued, each seeing the ones before it, so every answer
//! is the one it would get committed alone in that order. When a group of
//! several fails, each of its requests is written again alone.
//!
//! Claims are grouped the same way: the claims waiting are inserted by one
//! statement, and each learns whether it won its key.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Mutex};

use super::Shared;
use crate::batch::PlannedBatch;
use crate::error::Error;
use crate::request::{Claim, RequestEntry};
use crate::stats::RunStats;

/// How a queued request was written.
pub(super) enum Written {
    /// Committed (alone or in a group).
    Done(RunStats),
    /// It was alone and its transaction failed with this.
    Failed(Error),
    /// Its group failed: write it again alone.
    Alone,
}

/// A queue whose items are taken in groups, each item answered with an `A`.
pub(super) struct Queue<T, A> {
    send: mpsc::UnboundedSender<(T, oneshot::Sender<A>)>,
    receive: Mutex<mpsc::UnboundedReceiver<(T, oneshot::Sender<A>)>>,
}

impl<T, A> Queue<T, A> {
    pub(super) fn new() -> Queue<T, A> {
        let (send, receive) = mpsc::unbounded_channel();
        Queue {
            send,
            receive: Mutex::new(receive),
        }
    }

    /// Queues `item` and waits for its answer; `None` when the group it
    /// joined was dropped unanswered.
    pub(super) async fn ask(&self, item: T) -> Option<A> {
        let (reply, answer) = oneshot::channel();
        self.send.send((item, reply)).ok()?;
        answer.await.ok()
    }

    /// The next group: the oldest item waiting, and those queued behind
    /// it, at most `max` in all. `None` once the queue is closed.
    async fn next(&self, max: usize) -> Option<Vec<(T, oneshot::Sender<A>)>> {
        let mut receive = self.receive.lock().await;
        let first = receive.recv().await?;
        let mut group = vec![first];
        while group.len() < max {
            match receive.try_recv() {
                Ok(queued) => group.push(queued),
                Err(_) => break,
            }
        }
        Some(group)
    }
}

/// Planned requests waiting for a writer.
pub(super) type Requests = Queue<(PlannedBatch, RequestEntry), Written>;

/// Claims waiting to be inserted; each answered whether it won its key
/// (`None`: the batch failed, claim alone).
pub(super) type Claims = Queue<Claim, Option<bool>>;

/// Claims inserted by one statement at most.
const MAX_CLAIMS: usize = 64;

/// One claimer: inserts the claims waiting in one statement (in a
/// transaction of its own) and answers each whether it won its key.
pub(super) async fn claimer(shared: Arc<Shared>) {
    let Some(queue) = &shared.claims else {
        return;
    };
    while let Some(batch) = queue.next(MAX_CLAIMS).await {
        let (claims, replies): (Vec<Claim>, Vec<_>) = batch.into_iter().unzip();
        let inserted = async {
            let mut conn = shared.pool.get().await?;
            conn.dest().insert_claims(&claims).await
        }
        .await;
        match inserted {
            Ok(won) => {
                for (reply, won) in replies.into_iter().zip(won) {
                    let _ = reply.send(Some(won));
                }
            }
            Err(e) => {
                tracing::info!(pipeline = %shared.name, claims = claims.len(), error = %e, "Claiming keys together failed; claiming each alone.");
                for reply in replies {
                    let _ = reply.send(None);
                }
            }
        }
    }
}

/// One writer: takes groups from the queue until it closes (serve aborts
/// the writers once every request was answered).
pub(super) async fn writer(shared: Arc<Shared>, max: usize) {
    let Some(queue) = &shared.queue else {
        return;
    };
    while let Some(group) = queue.next(max).await {
        let n = group.len();
        let mut batches = Vec::with_capacity(n);
        let mut entries = Vec::with_capacity(n);
        let mut replies = Vec::with_capacity(n);
        for ((batch, entry), reply) in group {
            batches.push(batch);
            entries.push(entry);
            replies.push(reply);
        }
        // On a task of its own: a panic while writing fails this group
        // (each request is then written alone, in its own task), not the
        // writer.
        let written = tokio::spawn({
            let shared = shared.clone();
            async move {
                shared
                    .write(batches.into_iter().zip(entries.iter()).collect())
                    .await
            }
        })
        .await;
        match written {
            Ok(Ok(stats)) => {
                shared.metrics.grouped(n);
                for (reply, stats) in replies.into_iter().zip(stats) {
                    let _ = reply.send(Written::Done(stats));
                }
            }
            Ok(Err(e)) if n == 1 => {
                if let Some(reply) = replies.pop() {
                    let _ = reply.send(Written::Failed(e));
                }
            }
            Ok(Err(e)) => {
                tracing::info!(pipeline = %shared.name, requests = n, error = %e, "A group of requests failed; writing each alone.");
                for reply in replies {
                    let _ = reply.send(Written::Alone);
                }
            }
            Err(e) => {
                tracing::error!(pipeline = %shared.name, requests = n, error = %e, "Writing a group of requests failed unexpectedly; writing each alone.");
                for reply in replies {
                    let _ = reply.send(Written::Alone);
                }
            }
        }
    }
}
