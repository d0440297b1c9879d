//! Command-line arguments: the doc comments are the `--help`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Idempotent data loading: run a load once, twice, after a crash or twice at
/// the same moment, and the destination is the same: no duplicate rows, no
/// lost rows, and a checkpoint never ahead of the data.
#[derive(Debug, Parser)]
#[command(
    name = "idemload",
    version,
    propagate_version = true,
    arg_required_else_help = true
)]
#[command(
    after_help = "Reference of every command, flag, pipeline key and --json field: docs/reference.md\n\nExamples:\n  idemload load exports/*.jsonl --into sqlite://warehouse.db --table contacts\n  idemload run pipelines/usage.toml\n  idemload history pipelines/usage.toml\n\nExit codes: 0 success, 1 run failed, 2 usage or configuration error,\n3 pipeline locked by another run, 4 finished with rejected records,\n130/143 stopped by SIGINT/SIGTERM (committed batches stay; running again resumes)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Log more to stderr (-v: runs and batches, -vv: statements).
    /// IDEMLOAD_LOG (a tracing filter such as `debug` or
    /// `idemload=trace,warn`) overrides it.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Log lines as text for people, or one JSON object per event for log
    /// collectors.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load files into a table, without a pipeline file.
    ///
    /// Reads JSONL/NDJSON, CSV and JSON array files (by extension; `-` reads
    /// stdin as JSONL unless --format says otherwise) and merges them into
    /// the table, which is created if missing. Loading the same files again
    /// changes nothing. Every record of the files is read: incremental
    /// filtering by checkpoint belongs to pipelines (`idemload run`).
    ///
    /// Example:
    ///   idemload load exports/usage-*.jsonl --into sqlite://warehouse.db \
    ///       --table daily_usage --key service_line_id,usage_date --cursor updated_at
    #[command(verbatim_doc_comment)]
    Load(Box<LoadArgs>),

    /// Run a pipeline file.
    ///
    /// Takes the pipeline's lock, reads from its checkpoint (minus lookback),
    /// commits batch by batch and moves the checkpoint with the data.
    ///
    /// A pipeline file has four tables: [source] (type = "file" | "http" |
    /// "sql"), [destination] (url, table), [load] (key, hash_key, cursor,
    /// mode, lookback, initial, batch_size, max_rejects, window_field,
    /// delete_field, lock_lease, max_value_bytes) and [trigger] for `watch`.
    /// Every key, with its type, default and an example, is in
    /// docs/reference.md; `${VAR}` and `${VAR:-default}` read the environment.
    ///
    /// Example:
    ///   idemload run examples/usage.toml --json
    #[command(verbatim_doc_comment)]
    Run(RunArgs),

    /// Load a cursor range in windows, shared by any number of workers.
    ///
    /// Cuts [--from, --to) into windows of --window and loads each one as
    /// a run of its own: the source is asked for exactly the window's range
    /// (SQL: pushed into WHERE; HTTP: the placeholders {window_start} and
    /// {window_end} in [source] params; files: filtered while read), and
    /// the window is marked done in `_idemload_windows` in the transaction
    /// of its last batch. In mode = "window", stored rows of the window's
    /// range that the load no longer holds are deleted.
    ///
    /// Start the same command on as many processes and machines as you
    /// like: they share the windows through the destination database
    /// (SQLite: one claimer at a time). A killed worker's window is loaded
    /// again once its lease (`lock_lease`) runs out; the reload is
    /// harmless. Running the backfill again skips done windows (--redo
    /// loads them again). The pipeline's checkpoint is never moved.
    ///
    /// Exit codes: 0 every window done, 1 a window failed (the others are
    /// loaded; run again to retry it), 2 usage or configuration, 4 done
    /// with rejected records, 130/143 stopped by a signal (the window being
    /// loaded is released; running again resumes).
    ///
    /// Examples:
    ///   idemload backfill examples/usage.toml --from 2024-01-01 --to 2025-01-01 --window 1d
    ///   idemload backfill examples/usage.toml --from 2024-01-01 --to 2025-01-01 --workers 4
    ///   idemload backfill examples/usage.toml --status
    #[command(verbatim_doc_comment)]
    Backfill(BackfillArgs),

    /// Validate a pipeline, connect to its destination and print the plan.
    ///
    /// Prints one `ok` or `fail` line per part; exits 2 when one fails.
    ///
    /// Example:
    ///   idemload check examples/usage.toml
    #[command(verbatim_doc_comment)]
    Check {
        /// The pipeline file.
        pipeline: PathBuf,
    },

    /// Show, reset or set a pipeline's checkpoint.
    ///
    /// Example:
    ///   idemload state examples/usage.toml --set 2025-01-01T00:00:00Z
    ///   idemload state --url sqlite://warehouse.db --table contacts --json
    #[command(verbatim_doc_comment)]
    State(StateArgs),

    /// List a pipeline's latest runs.
    ///
    /// Example:
    ///   idemload history examples/usage.toml --limit 5
    ///   idemload history --url sqlite://warehouse.db --table contacts
    #[command(verbatim_doc_comment)]
    History {
        #[command(flatten)]
        books: BooksArgs,
        /// How many runs, newest first.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print one JSON object ({"runs": [...]}) on stdout.
        #[arg(long)]
        json: bool,
    },

    /// Find duplicate keys, NULL key parts, a missing unique constraint, and
    /// runs after which the table grew by more than they inserted.
    ///
    /// Exits 1 when anything is found, 0 when the table is clean.
    ///
    /// Examples:
    ///   idemload audit examples/usage.toml
    ///   idemload audit --url sqlite://legacy.db --table usage --key line_id,day --json
    #[command(verbatim_doc_comment)]
    Audit(AuditArgs),

    /// Collapse each group of rows sharing a key to one row, then add the
    /// unique constraint that keeps it so.
    ///
    /// A dry run unless --apply. With --apply, removed rows are moved whole
    /// into _idemload_quarantine, in one transaction with the delete and the
    /// new constraint; `--restore RUN_ID` puts them back.
    ///
    /// Examples:
    ///   idemload dedupe examples/usage.toml --keep newest --order-by updated_at
    ///   idemload dedupe examples/usage.toml --apply
    #[command(verbatim_doc_comment)]
    Dedupe(DedupeArgs),

    /// Prove a pipeline idempotent: run it twice into a scratch destination
    /// and compare row counts and a content digest. Prints PASS, or FAIL
    /// with the keys that differ and a likely cause (exit 1).
    ///
    /// Example:
    ///   idemload verify examples/usage.toml
    #[command(verbatim_doc_comment)]
    Verify {
        /// The pipeline file.
        pipeline: PathBuf,
        /// Print one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },

    /// Receive records over HTTP and load each request exactly once.
    ///
    /// Listens for `POST /v1/records` with a JSON object, a JSON array or
    /// NDJSON and an `Idempotency-Key` header, and loads the records with
    /// the pipeline's [load] rules (key, mode, cursor) into its destination
    /// (SQLite or PostgreSQL). The records, the key, a digest of the body
    /// and the response commit in one transaction (`_idemload_requests`):
    ///
    ///   200  the run statistics, and each rejected record's index and reason
    ///   200  + `Idempotent-Replayed: true`: the same key and body again; the
    ///        stored response, nothing written
    ///   400  no Idempotency-Key, or a body with nothing to read
    ///   401  [serve] token is set and `Authorization: Bearer` does not match
    ///   409  the same key is being processed right now (by any process)
    ///   413  body larger than [serve] max_body (default 10 MiB)
    ///   422  the same key was used with a different body
    ///   503  the database is unreachable (nothing written): retry later
    ///
    /// Several serve processes may share one PostgreSQL database. `GET
    /// /healthz` answers ok; `GET /metrics` is Prometheus text. SIGTERM or
    /// SIGINT stops accepting, lets in-flight requests commit and answer,
    /// and exits 0. Request logs go to stderr (--log-format json for JSON).
    ///
    /// Example:
    ///   export INGEST_TOKEN=change-me
    ///   idemload serve examples/ingest.toml --listen 127.0.0.1:8080
    ///   curl http://127.0.0.1:8080/v1/records \
    ///        -H "Authorization: Bearer $INGEST_TOKEN" \
    ///        -H 'Idempotency-Key: "checkout-7731"' \
    ///        -d '{"event_id": "e-1", "order_id": 7731, "amount": 42.5}'
    #[command(verbatim_doc_comment)]
    Serve {
        /// The pipeline file ([destination], [load], optional [serve]).
        pipeline: PathBuf,
        /// Address and port to listen on (port 0 picks a free one, printed
        /// in the log).
        #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
    },

    /// A polling trigger: fire each new item of the source once.
    ///
    /// Polls the pipeline's source every `[trigger] interval`, fires the
    /// items whose key the seen store does not know yet (oldest first) to
    /// stdout, a webhook or a command, and marks each key seen only once its
    /// emission is confirmed. The first poll only records what exists
    /// (`prime = true`). Events go to stdout for the stdout emitter; a poll
    /// summary goes to stderr (or, with --json, a JSON line with "poll" to
    /// stdout).
    ///
    /// Example:
    ///   idemload watch examples/contacts_watch.toml --once
    #[command(verbatim_doc_comment)]
    Watch {
        /// The pipeline file (with a [trigger] section).
        pipeline: PathBuf,
        /// Poll once and exit.
        #[arg(long)]
        once: bool,
        /// Print each poll's summary as a JSON line on stdout.
        #[arg(long)]
        json: bool,
        /// Wait up to this long for another watcher's lock (e.g. 1m).
        #[arg(long, value_name = "DURATION")]
        wait: Option<String>,
        /// Forget the trigger's seen keys, primed mark and dead letters; the
        /// next poll starts afresh (priming again when prime = true).
        #[arg(long, conflicts_with_all = ["once", "dead_letters", "redrive"])]
        reset: bool,
        /// List the parked items (dead letters), oldest first.
        #[arg(long, conflicts_with_all = ["once", "redrive"])]
        dead_letters: bool,
        /// Emit every parked item once more; those that succeed leave the
        /// dead letters (exit 1 when some failed again).
        #[arg(long, conflicts_with = "once")]
        redrive: bool,
    },

    /// Show the records a run rejected, with their reference and reason.
    ///
    /// Without --run, shows the latest run that had rejects.
    ///
    /// Example:
    ///   idemload rejects examples/usage.toml --json
    ///   idemload rejects --url sqlite://warehouse.db --table contacts
    #[command(verbatim_doc_comment)]
    Rejects {
        #[command(flatten)]
        books: BooksArgs,
        /// The run whose rejects to show.
        #[arg(long = "run")]
        run_id: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print one JSON object ({"rejects": [...]}) on stdout.
        #[arg(long)]
        json: bool,
    },

    /// Print a shell completion script on stdout.
    ///
    /// Example:
    ///   idemload completions bash > /etc/bash_completion.d/idemload
    #[command(verbatim_doc_comment)]
    Completions {
        /// bash, zsh, fish, powershell or elvish.
        shell: clap_complete::Shell,
    },

    /// Print the man page (roff) on stdout.
    ///
    /// Example:
    ///   idemload man > /usr/local/share/man/man1/idemload.1
    #[command(verbatim_doc_comment)]
    Man,
}

/// A pipeline's bookkeeping: by its file, or by what `idemload load` was given.
#[derive(Debug, Args)]
pub struct BooksArgs {
    /// The pipeline file (or give --url and --table, as to `idemload load`).
    #[arg(required_unless_present = "url")]
    pub pipeline: Option<PathBuf>,
    /// Destination URL, as given to `load --into`.
    #[arg(
        long,
        value_name = "URL",
        requires = "table",
        conflicts_with = "pipeline"
    )]
    pub url: Option<String>,
    /// The table given to `load --table`.
    #[arg(long, requires = "url")]
    pub table: Option<String>,
    /// The pipeline name given to `load --name` (default: the table).
    #[arg(long, requires = "url")]
    pub name: Option<String>,
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// The pipeline file (or give --url, --table and --key).
    #[arg(required_unless_present_all = ["url", "table", "key"])]
    pub pipeline: Option<PathBuf>,
    /// Database URL of a table idemload may never have seen.
    #[arg(long, requires_all = ["table", "key"], conflicts_with = "pipeline")]
    pub url: Option<String>,
    /// The table to audit.
    #[arg(long)]
    pub table: Option<String>,
    /// Key columns, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub key: Option<Vec<String>>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DedupeArgs {
    #[command(flatten)]
    pub target: AuditArgs,
    /// Which row of each group to keep.
    #[arg(long, default_value = "newest", value_parser = ["newest", "oldest"])]
    pub keep: String,
    /// Column that orders a group (default: the pipeline's cursor; ties and
    /// NULLs go by row identity, the row stored last being the newest).
    #[arg(long, value_name = "COL")]
    pub order_by: Option<String>,
    /// Remove the surplus rows (into _idemload_quarantine) and add the
    /// unique constraint, in one transaction. Without it: a dry run.
    #[arg(long)]
    pub apply: bool,
    /// Put back the rows a dedupe run quarantined.
    #[arg(long, value_name = "RUN_ID", conflicts_with = "apply")]
    pub restore: Option<String>,
}

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Files or globs to load (local, s3://, gs://, az://); `-` is stdin.
    #[arg(required = true)]
    pub files: Vec<String>,
    /// Destination URL: sqlite://PATH, postgres://USER@HOST/DB[?schema=S]
    /// or mysql://USER@HOST/DB.
    #[arg(long, value_name = "URL")]
    pub into: String,
    /// Target table (created if missing).
    #[arg(long)]
    pub table: String,
    /// Key fields, comma separated (default: id).
    #[arg(long, value_delimiter = ',', conflicts_with = "hash_key")]
    pub key: Option<Vec<String>>,
    /// Derive the key from a SHA-256 of these fields ('*' for all).
    #[arg(long, value_delimiter = ',')]
    pub hash_key: Option<Vec<String>>,
    /// Field that orders versions of a record: the greatest wins.
    #[arg(long)]
    pub cursor: Option<String>,
    /// merge (default), insert_new, replace or window.
    #[arg(long, default_value = "merge")]
    pub mode: String,
    /// window mode: the field whose loaded range is reloaded.
    #[arg(long)]
    pub window_field: Option<String>,
    /// Field whose `true` deletes the row with the record's key.
    #[arg(long)]
    pub delete_field: Option<String>,
    /// Format of stdin (or of files with another extension).
    #[arg(long, value_parser = ["jsonl", "csv", "json", "parquet"])]
    pub format: Option<String>,
    /// Endpoint of an S3-compatible store (or Azure emulator) for s3:// and
    /// az:// paths, e.g. http://127.0.0.1:9000 (default: AWS_ENDPOINT_URL).
    #[arg(long, value_name = "URL")]
    pub endpoint: Option<String>,
    /// Records per transaction.
    #[arg(long, default_value_t = 10_000)]
    pub batch_size: usize,
    /// Pipeline name for the lock, history and checkpoint (default: the table).
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub run: RunFlags,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The pipeline file.
    pub pipeline: PathBuf,
    /// Ignore the checkpoint for this run and read everything.
    #[arg(long)]
    pub full_refresh: bool,
    #[command(flatten)]
    pub run: RunFlags,
}

#[derive(Debug, Args)]
pub struct BackfillArgs {
    /// The pipeline file ([load] needs a cursor).
    pub pipeline: PathBuf,
    /// Start of the range, included: an RFC 3339 timestamp, a date
    /// (2024-01-01, midnight UTC) or an integer.
    #[arg(long, value_name = "CURSOR", required_unless_present = "status")]
    pub from: Option<String>,
    /// End of the range, excluded.
    #[arg(long, value_name = "CURSOR", required_unless_present = "status")]
    pub to: Option<String>,
    /// Width of a window: a duration (1d, 6h) for timestamp cursors, a
    /// number for integer cursors. Default: `window` in [load].
    #[arg(long, value_name = "SPAN")]
    pub window: Option<String>,
    /// Windows loaded at once by this process.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub workers: u16,
    /// Load again the windows that were already done.
    #[arg(long, conflicts_with = "status")]
    pub redo: bool,
    /// Print the windows by status (of --from/--to when given) and exit:
    /// 0 all done, 4 all done with rejected records, 1 otherwise.
    #[arg(long)]
    pub status: bool,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RunFlags {
    /// Wait up to this long for a lock held by another run (e.g. 10m),
    /// instead of exiting with code 3.
    #[arg(long, value_name = "DURATION")]
    pub wait: Option<String>,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Audit the table once the run has committed (with the pipeline's
    /// [audit] monitors); exit 1 when the run succeeded but the audit found
    /// something.
    #[arg(long)]
    pub audit: bool,
}

#[derive(Debug, Args)]
pub struct StateArgs {
    #[command(flatten)]
    pub books: BooksArgs,
    /// Forget the checkpoint: the next run starts from `initial`.
    #[arg(long, conflicts_with = "set")]
    pub reset: bool,
    /// Set the checkpoint: an integer for integer cursors, an RFC 3339
    /// timestamp (2025-01-01T00:00:00Z) for timestamp cursors.
    #[arg(long, value_name = "VALUE")]
    pub set: Option<String>,
    /// Print one JSON object ({"pipeline", "cursor", "checkpoint"}) on stdout.
    #[arg(long)]
    pub json: bool,
    /// Wait up to this long for a running run's lock.
    #[arg(long, value_name = "DURATION")]
    pub wait: Option<String>,
}
