//! The one way async code uses a blocking rusqlite connection: the state
//! that owns it moves onto the blocking pool for each call and comes back
//! with the answer, so no statement runs on the async runtime and no
//! transaction spans an `.await`. The destination, its inspector and the
//! trigger's seen store each keep their connection in a [`Worker`].

use crate::error::{Error, Result};

/// A connection (with whatever travels with it) that lives on the blocking
/// pool between calls.
pub(crate) struct Worker<S> {
    /// What errors name: the database file, or the store.
    name: String,
    /// `None` once a call panicked: the connection went with it.
    state: Option<S>,
}

impl<S: Send + 'static> Worker<S> {
    /// Runs `open` on the blocking pool and keeps what it makes.
    pub async fn open(
        name: impl Into<String>,
        open: impl FnOnce() -> Result<S> + Send + 'static,
    ) -> Result<Worker<S>> {
        Ok(Worker::new(name, blocking(open).await?))
    }

    /// Keeps `state`, opened already.
    pub fn new(name: impl Into<String>, state: S) -> Worker<S> {
        Worker {
            name: name.into(),
            state: Some(state),
        }
    }

    /// Runs `f` with the state on the blocking pool.
    pub async fn run<T, F>(&mut self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut S) -> Result<T> + Send + 'static,
    {
        let mut state = self.state.take().ok_or_else(|| {
            Error::destination(&self.name, "connection lost after an earlier failure")
        })?;
        let (state, result) = blocking(move || {
            let result = f(&mut state);
            Ok((state, result))
        })
        .await?;
        self.state = Some(state);
        result
    }

    /// The state between calls (`None` after a failed call).
    pub fn state(&self) -> Option<&S> {
        self.state.as_ref()
    }
}

/// Runs `f` on the blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::destination("sqlite", format!("worker thread failed: {e}")))?
}
