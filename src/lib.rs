//! idemload: idempotent data loading.
//!
//! A run reads records from a [`Source`] (files, APIs, SQL), checks each one
//! and keeps one version per [`Key`] (the greatest [`Cursor`] wins), and
//! commits them batch by batch into a [`Destination`] (SQLite, PostgreSQL,
//! MySQL) together with its bookkeeping: the rejects of the batch and the
//! checkpoint it reaches, in the same transaction. A run locked against
//! others, a merge that writes only what changed, and a checkpoint never
//! ahead of the data make a load that is run once, run again, retried after
//! a crash or started twice at once leave the same destination.

pub mod audit;
pub mod backfill;
pub mod batch;
pub mod config;
pub mod connect;
pub mod dedupe;
pub mod destination;
pub mod duration;
pub mod error;
mod fields;
pub mod files;
pub mod key;
pub mod mode;
pub mod number;
pub mod pipeline;
pub mod record;
pub mod redact;
pub mod request;
pub mod serve;
pub mod source;
pub mod state;
pub mod stats;
pub mod stop;
pub mod trigger;
pub mod verify;
pub mod windows;

pub use config::PipelineConfig;
pub use destination::{Books, Destination};
pub use error::{Error, Result};
pub use key::{Cursor, Key, KeySpec};
pub use mode::Mode;
pub use pipeline::{NoProgress, Pipeline, Progress, RunOptions, RunReport};
pub use record::{Item, Record, Reject, SourceRef};
pub use source::{Source, SourceQuery};
pub use stats::{RunStats, RunStatus};
pub use stop::StopToken;
