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

    /// An ingest request's claim was taken over while it was written (its
    /// lease ran out): its transaction was rolled back.
    #[error(
        "request {key:?} lost its claim (lease expired and was taken over); nothing was written"
    )]
    RequestLost { key: String },

    /// A backfill window's claim was taken over while it was written (its
    /// lease ran out): the batch was rolled back.
    #[error("window [{start}, {end}) of pipeline {pipeline:?} lost its claim (lease expired and was taken over); the batch was rolled back")]
    WindowLost {
        pipeline: String,
        start: String,
        end: String,
    },

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
    Destination {
        context: String,
        message: String,
        kind: ErrorKind,
    },

    /// More records were rejected than `max_rejects` allows (exit 1).
    #[error("{rejected} records rejected, more than max_rejects = {max}; committed batches stay committed, see `idemload rejects`")]
    TooManyRejects { rejected: u64, max: u64 },

    /// A stop was asked for (SIGINT, SIGTERM) before the run or the watch
    /// held its lock: nothing was written (the binary exits 130 or 143).
    #[error("pipeline {pipeline:?}: stopped while waiting for the lock; nothing was written")]
    Interrupted { pipeline: String },
}

impl Error {
    /// Builds a configuration error from anything printable.
    pub fn config(message: impl Into<String>) -> Error {
        Error::Config(message.into())
    }

    /// Builds a destination error with its context (`table "x", batch 3`),
    /// classified by its cause.
    pub fn destination(context: impl Into<String>, cause: impl Cause) -> Error {
        Error::Destination {
            context: context.into(),
            message: cause.message(),
            kind: cause.kind(),
        }
    }

    /// The kind of a destination error; `None` for other errors.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            Error::Destination { kind, .. } => Some(*kind),
            _ => None,
        }
    }

    /// True when running again, unchanged, can succeed: the connection
    /// was lost, a statement timed out, or transactions conflicted.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Destination { kind, .. } => kind.is_retryable(),
            Error::LockLost { .. } | Error::Locked { .. } | Error::WindowLost { .. } => true,
            _ => false,
        }
    }

    /// The process exit code the spec gives this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) => 2,
            Error::Locked { .. } => 3,
            // 128 + SIGINT, as a shell reports a process ended by Ctrl-C.
            Error::Interrupted { .. } => 130,
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
            Error::WindowLost { .. } => Some(
                "a batch took longer than the lease; raise `lock_lease` in [load]: another worker loads the window again, and committed batches are kept".into(),
            ),
            Error::RequestLost { .. } => Some(
                "the request took longer than [serve] claim_lease; raise it, and send the request again with the same Idempotency-Key".into(),
            ),
            Error::TooManyRejects { .. } => Some(
                "inspect them with `idemload rejects PIPELINE.toml`, fix the input or raise `max_rejects`, then run again".into(),
            ),
            Error::Destination { kind, .. } => Some(
                match kind {
                    ErrorKind::ConnectionRefused => "is the server running, and are the URL's host and port right? nothing was written",
                    ErrorKind::Authentication => "check the user and password in the URL (a password with special characters must be percent-encoded); nothing was written",
                    ErrorKind::UnknownDatabase => "create the database first, or fix its name in the URL; nothing was written",
                    ErrorKind::PermissionDenied => "grant the user the rights it needs on the database (create tables, write, read), or use another user",
                    ErrorKind::UniqueViolation => "another writer stored the same key meanwhile; run again: the run merges with what is stored, and committed batches stay",
                    ErrorKind::SchemaMismatch => "the table differs from what the records need; check `idemload audit` and the table's columns, then run again",
                    ErrorKind::ConnectionLost | ErrorKind::Timeout | ErrorKind::Conflict => "a passing failure: run again; committed batches are correct and stay, and the load completes exactly",
                    ErrorKind::Other => "committed batches are correct and stay; run again once the cause is fixed and the load completes exactly",
                }
                .into(),
            ),
            Error::Source { .. } | Error::Io { .. } => Some(
                "committed batches are correct and stay; run again once the cause is fixed and the load completes exactly".into(),
            ),
            Error::Config(_) | Error::Interrupted { .. } => None,
        }
    }
}

/// What kind of failure a destination error is: what the hint says, and
/// whether trying again can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Nothing listens at the address (server down, wrong host or port).
    ConnectionRefused,
    /// The connection broke while in use (server restarted, network cut).
    ConnectionLost,
    /// A statement or lock wait ran out of time, or the database was busy.
    Timeout,
    /// Two transactions deadlocked or could not be serialised.
    Conflict,
    /// The server refused the user or password.
    Authentication,
    /// The database named in the URL does not exist.
    UnknownDatabase,
    /// The user may not do what was asked.
    PermissionDenied,
    /// A row with the same key already exists.
    UniqueViolation,
    /// A table or column is not what the statement expects.
    SchemaMismatch,
    /// Anything else.
    Other,
}

impl ErrorKind {
    /// True when running again, unchanged, can succeed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::ConnectionLost | ErrorKind::Timeout | ErrorKind::Conflict
        )
    }

    /// The kind of a PostgreSQL SQLSTATE (or MySQL's, for the classes the
    /// two share).
    pub fn of_sqlstate(code: &str) -> ErrorKind {
        match code {
            "23505" => ErrorKind::UniqueViolation,
            "28000" | "28P01" => ErrorKind::Authentication,
            "3D000" => ErrorKind::UnknownDatabase,
            "42501" => ErrorKind::PermissionDenied,
            "40001" | "40P01" => ErrorKind::Conflict,
            "57014" | "55P03" => ErrorKind::Timeout,
            "57P01" | "57P02" | "57P03" => ErrorKind::ConnectionLost,
            c if c.starts_with("08") => ErrorKind::ConnectionLost,
            "42703" | "42P01" | "42804" | "42P16" | "22P02" => ErrorKind::SchemaMismatch,
            _ => ErrorKind::Other,
        }
    }

    /// The kind of a MySQL/MariaDB server error number.
    pub fn of_mysql_code(code: u16) -> ErrorKind {
        match code {
            1062 | 1586 => ErrorKind::UniqueViolation,
            1045 | 1698 => ErrorKind::Authentication,
            1049 => ErrorKind::UnknownDatabase,
            1044 | 1142 | 1143 | 1227 => ErrorKind::PermissionDenied,
            1205 | 3024 => ErrorKind::Timeout,
            1213 => ErrorKind::Conflict,
            1054 | 1146 | 1366 | 1406 => ErrorKind::SchemaMismatch,
            2002 | 2003 => ErrorKind::ConnectionRefused,
            2006 | 2013 | 1927 => ErrorKind::ConnectionLost,
            _ => ErrorKind::Other,
        }
    }

    /// The kind of an I/O error under a driver.
    pub fn of_io(e: &std::io::Error) -> ErrorKind {
        use std::io::ErrorKind as Io;
        match e.kind() {
            Io::ConnectionRefused | Io::NotFound | Io::AddrNotAvailable => {
                ErrorKind::ConnectionRefused
            }
            Io::TimedOut | Io::WouldBlock => ErrorKind::Timeout,
            Io::PermissionDenied => ErrorKind::PermissionDenied,
            _ => ErrorKind::ConnectionLost,
        }
    }
}

/// A cause of a destination error: its text and its kind. Implemented for
/// the drivers' errors (classified by their codes) and for plain messages.
pub trait Cause {
    fn kind(&self) -> ErrorKind;
    fn message(&self) -> String;
}

macro_rules! plain_cause {
    ($($t:ty),*) => {$(
        impl Cause for $t {
            fn kind(&self) -> ErrorKind {
                ErrorKind::Other
            }
            fn message(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
plain_cause!(
    &str,
    String,
    &String,
    serde_json::Error,
    tokio::task::JoinError
);

impl Cause for std::io::Error {
    fn kind(&self) -> ErrorKind {
        ErrorKind::of_io(self)
    }
    fn message(&self) -> String {
        self.to_string()
    }
}

impl Cause for rusqlite::Error {
    fn kind(&self) -> ErrorKind {
        use rusqlite::ErrorCode as C;
        match self.sqlite_error_code() {
            Some(C::DatabaseBusy | C::DatabaseLocked) => ErrorKind::Timeout,
            Some(C::ReadOnly | C::PermissionDenied | C::CannotOpen) => ErrorKind::PermissionDenied,
            Some(C::ConstraintViolation) => match self {
                rusqlite::Error::SqliteFailure(f, _)
                    if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                        || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE =>
                {
                    ErrorKind::UniqueViolation
                }
                _ => ErrorKind::Other,
            },
            _ => ErrorKind::Other,
        }
    }
    fn message(&self) -> String {
        self.to_string()
    }
}

impl Cause for redis::RedisError {
    fn kind(&self) -> ErrorKind {
        if self.is_connection_refusal() {
            ErrorKind::ConnectionRefused
        } else if self.is_timeout() {
            ErrorKind::Timeout
        } else if self.is_connection_dropped() || self.is_io_error() {
            ErrorKind::ConnectionLost
        } else {
            ErrorKind::Other
        }
    }
    fn message(&self) -> String {
        self.to_string()
    }
}

impl Cause for mysql_async::Error {
    fn kind(&self) -> ErrorKind {
        match self {
            mysql_async::Error::Server(e) => ErrorKind::of_mysql_code(e.code),
            mysql_async::Error::Io(mysql_async::IoError::Io(e)) => ErrorKind::of_io(e),
            mysql_async::Error::Driver(mysql_async::DriverError::ConnectionClosed) => {
                ErrorKind::ConnectionLost
            }
            _ => ErrorKind::Other,
        }
    }
    fn message(&self) -> String {
        self.to_string()
    }
}

impl Cause for tokio_postgres::Error {
    fn kind(&self) -> ErrorKind {
        if let Some(code) = self.code() {
            return ErrorKind::of_sqlstate(code.code());
        }
        if self.is_closed() {
            return ErrorKind::ConnectionLost;
        }
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            if let Some(io) = s.downcast_ref::<std::io::Error>() {
                return ErrorKind::of_io(io);
            }
            source = s.source();
        }
        ErrorKind::Other
    }
    fn message(&self) -> String {
        if let Some(db) = self.as_db_error() {
            let mut text = format!("{}: {}", db.severity(), db.message());
            if let Some(detail) = db.detail() {
                text.push_str(&format!(" ({detail})"));
            }
            if let Some(tokio_postgres::error::ErrorPosition::Original(at)) = db.position() {
                text.push_str(&format!(" at character {at} of the statement"));
            }
            if let Some(hint) = db.hint() {
                text.push_str(&format!("; hint: {hint}"));
            }
            text.push_str(&format!(" [SQLSTATE {}]", db.code().code()));
            return text;
        }
        if self.is_closed() {
            return "the server closed the connection (restarted, shut down, or ended the session)"
                .to_string();
        }
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            text.push_str(&format!(": {s}"));
            source = s.source();
        }
        text
    }
}

impl From<rusqlite::Error> for Error {
    fn from(err: rusqlite::Error) -> Self {
        Error::destination("sqlite", err)
    }
}
