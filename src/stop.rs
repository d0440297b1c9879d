//! A request to stop a run (or a watch) early, cleanly.
//!
//! The binary turns SIGINT and SIGTERM into a stop request; a library user
//! keeps a clone of the [`StopToken`] given in `RunOptions` and calls
//! [`StopToken::stop`]. The run checks it between batches and while it reads
//! the source: it stops reading, lets the batch being written commit (or roll
//! back: a batch is one transaction, never half written), records the run
//! as `interrupted` and releases its lock. Nothing committed is lost and the
//! checkpoint stays with the data (guarantee 2), so running again resumes.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;

/// Shared by everyone who may ask for the stop and the run that obeys it;
/// clones see the same request.
#[derive(Debug, Clone)]
pub struct StopToken {
    requested: Arc<watch::Sender<bool>>,
}

impl Default for StopToken {
    fn default() -> StopToken {
        StopToken::new()
    }
}

impl StopToken {
    /// A token nobody has asked to stop yet.
    pub fn new() -> StopToken {
        StopToken {
            requested: Arc::new(watch::Sender::new(false)),
        }
    }

    /// Asks the run to stop after the batch it is writing.
    pub fn stop(&self) {
        self.requested.send_replace(true);
    }

    /// Has a stop been asked for?
    pub fn is_stopped(&self) -> bool {
        *self.requested.borrow()
    }

    /// Completes once a stop is asked for (at once if it already was).
    pub async fn stopped(&self) {
        let mut rx = self.requested.subscribe();
        // The sender lives as long as `self`, so this cannot fail.
        let _ = rx.wait_for(|stop| *stop).await;
    }

    /// Runs `work` unless a stop is asked for first: `None` when stopped
    /// (`work` is dropped where it stood, so use it only for work that may
    /// be abandoned: reading, waiting, never a commit).
    pub async fn unless_stopped<T>(&self, work: impl Future<Output = T>) -> Option<T> {
        tokio::select! {
            biased;
            _ = self.stopped() => None,
            out = work => Some(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stop_reaches_every_clone_and_cuts_waiting_work_short() {
        let token = StopToken::new();
        let other = token.clone();
        assert!(!other.is_stopped());
        assert_eq!(other.unless_stopped(async { 7 }).await, Some(7));
        let waiter = tokio::spawn(async move {
            other
                .unless_stopped(tokio::time::sleep(std::time::Duration::from_secs(60)))
                .await
        });
        tokio::task::yield_now().await;
        token.stop();
        assert_eq!(waiter.await.unwrap(), None);
        assert!(token.is_stopped());
        assert_eq!(token.unless_stopped(async { 7 }).await, None);
    }
}
