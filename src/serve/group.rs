//! Group commit: requests planned while the writers are busy share one
//! transaction.
//!
//! A planned request waits in a queue; each writer takes the oldest one and
//! every other one waiting (up to the destination's `max_group`), writes
//! them with `Destination::write_requests` in one transaction, and answers
//! each. Nothing waits on purpose: a request that finds a writer idle is
//! written at once, alone; under load the queue fills while the writers
//! work, and one transaction (one statement taking every key, one read of
//! their rows, one finish, one flush to disk) then carries many requests.
//! A request the transaction answers without writing (a replay, another
//! body under the key, a key another process holds) leaves the group
//! unharmed. The requests of a group are written in the order they were
//! queued, each seeing the ones before it, so every answer is the one it
//! would get committed alone in that order. When a group of several fails,
//! each of its requests is written again alone.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Mutex};

use super::Shared;
use crate::batch::PlannedBatch;
use crate::error::Error;
use crate::request::{Landed, RequestEntry};

/// How a queued request was written.
pub(super) enum Written {
    /// Its transaction (alone or a group's) committed.
    Done(Landed),
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
            Ok(Ok(landed)) => {
                shared.metrics.grouped(n);
                for (reply, landed) in replies.into_iter().zip(landed) {
                    let _ = reply.send(Written::Done(landed));
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
