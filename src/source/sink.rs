//! What a format reader (CSV, Parquet) hands its items to: the file
//! source's reader thread ([`super::file`]), which batches them, counts
//! them and sends them to the run. The readers see only this, so they sit
//! below the file source instead of importing it back.

use std::io;

use crate::record::Item;

/// The receiver went away (the run stopped): stop reading.
pub(super) struct Stopped;

/// Why a format reader stopped early.
pub(super) enum ReadError {
    Stopped,
    Io(io::Error),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

impl From<Stopped> for ReadError {
    fn from(_: Stopped) -> Self {
        ReadError::Stopped
    }
}

/// Where a format reader puts what it read.
pub(super) trait Sink {
    /// Takes one item; `Err(Stopped)` when the run stopped.
    fn push(&mut self, item: Item) -> Result<(), Stopped>;

    /// Items sent at a time.
    fn chunk_size(&self) -> usize;

    /// Values larger than this are rejected while reading, before the
    /// value is built (see [`super::oversize`]).
    fn max_value_bytes(&self) -> Option<usize>;
}
