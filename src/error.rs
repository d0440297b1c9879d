//! Typed errors of the library.
//!
//! One variant per thing the user must do: fix the configuration, wait for a
//! lock, look at the source or the destination. The binary maps them to exit
//! codes in one place (`Error::exit_code`). `Display` is a lowercase fragment
//! with the location first; secrets never reach it (URLs are redacted before
//! they are put into an error).

use std::path::PathBuf;

use crate::state::LockHolder;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can stop a command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pipeline file, a flag or a record template is wrong: fix it and
    /// run again (exit 2).
    #[error("{0}")]
    Config(String),

    /// Another run holds the pipeline's lock (exit 3).
    #[error("pipeline {pipeline:?} is locked by {holder}")]
    Locked {
        pipeline: String,
        holder: LockHolder,
    },

    /// The lock was taken over while this run was writing (its lease ran out):
    /// the batch was rolled back (exit 1).
    #[error("pipeline {pipeline:?} lost its run lock (lease expired and was taken over); the batch was rolled back")]
    LockLost { pipeline: String },

    /// Reading the source failed (exit 1).
    #[error("{location}: {message}")]
    Source { location: String, message: String },

    /// A file could not be opened or read (exit 1).
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The destination refused or lost a statement (exit 1).
    #[error("{context}: {message}")]
    Destination { context: String, message: String },

    /// More records were rejected than `max_rejects` allows (exit 1).
    #[error("{rejected} records rejected, more than max_rejects = {max}; committed batches stay committed, see `idemload rejects`")]
    TooManyRejects { rejected: u64, max: u64 },
}

impl Error {
    /// Builds a configuration error from anything printable.
    pub fn config(message: impl Into<String>) -> Error {
        Error::Config(message.into())
    }

    /// Builds a destination error with its context (`table "x", batch 3`).
    pub fn destination(context: impl Into<String>, message: impl std::fmt::Display) -> Error {
        Error::Destination {
            context: context.into(),
            message: message.to_string(),
        }
    }

    /// The process exit code the spec gives this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) => 2,
            Error::Locked { .. } => 3,
            _ => 1,
        }
    }

    /// A next step to print under the error, when there is one.
    pub fn hint(&self) -> Option<String> {
        match self {
            Error::Locked { .. } => Some(
                "wait for it to finish, or pass --wait 10m to queue behind it; a dead holder's lock frees itself when its lease runs out".into(),
            ),
            Error::LockLost { .. } => Some(
                "a batch took longer than the lock lease; raise `lock_lease` in [load] and run again: committed batches are kept".into(),
            ),
            Error::TooManyRejects { .. } => Some(
                "inspect them with `idemload rejects PIPELINE.toml`, fix the input or raise `max_rejects`, then run again".into(),
            ),
            Error::Source { .. } | Error::Io { .. } | Error::Destination { .. } => Some(
                "committed batches are correct and stay; run again once the cause is fixed and the load completes exactly".into(),
            ),
            Error::Config(_) => None,
        }
    }
}

impl From<rusqlite::Error> for Error {
    fn from(err: rusqlite::Error) -> Self {
        Error::destination("sqlite", err)
    }
}
