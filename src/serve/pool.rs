//! The destination connections of `serve`, each prepared for requests
//! (`Destination::serve`), at most `connections` in use at once.

use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::destination::Destination;
use crate::error::{Error, Result};
use crate::pipeline::Pipeline;

/// Destination connections prepared for requests, at most `permits` in
/// use at once.
pub(super) struct Pool {
    pub(super) pipeline: Pipeline,
    pub(super) idle: Mutex<Vec<Box<dyn Destination>>>,
    pub(super) permits: Arc<Semaphore>,
    /// How long a request may hold its key (`claim_lease`).
    pub(super) claim_lease: std::time::Duration,
}

/// A connection taken from the pool; back to it when dropped, unless it
/// failed (then a new one is opened next time).
pub(super) struct Conn<'a> {
    dest: Option<Box<dyn Destination>>,
    pool: &'a Pool,
    _permit: OwnedSemaphorePermit,
}

impl Pool {
    pub(super) async fn open(&self) -> Result<Box<dyn Destination>> {
        let mut dest = self.pipeline.destination().await?;
        dest.serve(
            self.pipeline.name(),
            &self.pipeline.target(),
            self.claim_lease,
        )
        .await?;
        Ok(dest)
    }

    pub(super) async fn get(&self) -> Result<Conn<'_>> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::config("the connection pool is closed"))?;
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let dest = match idle {
            Some(d) => d,
            None => self.open().await?,
        };
        Ok(Conn {
            dest: Some(dest),
            pool: self,
            _permit: permit,
        })
    }
}

impl Conn<'_> {
    pub(super) fn dest(&mut self) -> &mut dyn Destination {
        self.dest
            .as_deref_mut()
            .expect("a connection until dropped")
    }

    /// Drops the connection instead of returning it to the pool.
    pub(super) fn discard(mut self) {
        self.dest = None;
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        if let Some(dest) = self.dest.take() {
            self.pool
                .idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(dest);
        }
    }
}
