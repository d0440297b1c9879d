//! The `idemload` binary: parses, runs the library, prints, picks the exit code.

mod args;
mod maintenance;
mod output;
mod progress;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use idemload::config::{DestinationConfig, LoadConfig, PipelineConfig};
use idemload::key::parse_duration;
use idemload::source::{FileFormat, FileSourceConfig, SourceConfig};
use idemload::state::{parse_checkpoint_arg, LockHolder};
use idemload::{Error, Pipeline, RunOptions, RunStatus};
use serde_json::json;

use crate::args::{Cli, Command, LoadArgs, RunFlags};

/// Records are many small maps and strings, parsed on one thread and freed
/// on another: mimalloc serves that pattern far better than the system
/// allocator (a third of a load's CPU time went to malloc and free).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    // One thread runs the run and its connections' I/O: records are parsed
    // on rayon's threads and SQLite works on blocking threads, so more
    // runtime threads would only pass each server message between threads
    // (measured: 5-15% more CPU time and 10-20 MB more peak memory).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("idemload: error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let json_errors = wants_json(&cli.command);
    match runtime.block_on(execute(cli.command)) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            let code = exit_code(&err);
            if json_errors {
                output::json(&json!({"status": "failed", "error": format!("{err:#}")}));
            }
            eprintln!("idemload: error: {err:#}");
            if let Some(hint) = err.downcast_ref::<Error>().and_then(Error::hint) {
                eprintln!("hint: {hint}");
            }
            ExitCode::from(code)
        }
    }
}

/// The spec's exit code for an error (2 for usage and configuration).
fn exit_code(err: &anyhow::Error) -> u8 {
    match err.downcast_ref::<Error>() {
        Some(e) => e.exit_code() as u8,
        None => 1,
    }
}

fn wants_json(command: &Command) -> bool {
    match command {
        Command::Load(a) => a.run.json,
        Command::Run(a) => a.run.json,
        Command::History { json, .. }
        | Command::Rejects { json, .. }
        | Command::Verify { json, .. } => *json,
        Command::Audit(a) => a.json,
        Command::Watch { json, .. } => *json,
        Command::Dedupe(a) => a.target.json,
        _ => false,
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("IDEMLOAD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

async fn execute(command: Command) -> anyhow::Result<u8> {
    match command {
        Command::Load(args) => {
            let pipeline = Pipeline::new(load_config(&args)?)?;
            run(&pipeline, true, &args.run).await
        }
        Command::Run(args) => {
            let pipeline = Pipeline::new(PipelineConfig::from_file(&args.pipeline)?)?;
            run(&pipeline, args.full_refresh, &args.run).await
        }
        Command::Check { pipeline } => check(&pipeline).await,
        Command::Audit(args) => maintenance::audit(args).await,
        Command::Dedupe(args) => maintenance::dedupe(args).await,
        Command::Verify { pipeline, json } => maintenance::verify(&pipeline, json).await,
        Command::Watch {
            pipeline,
            once,
            json,
            wait,
        } => {
            let config = PipelineConfig::from_file(&pipeline)?;
            let options = idemload::trigger::WatchOptions {
                once,
                wait: wait.as_deref().map(parse_wait).transpose()?,
            };
            let mut on_poll = |r: &idemload::trigger::PollReport| {
                if json {
                    output::json(r);
                } else {
                    eprintln!(
                        "idemload: watch {}: poll {}: read {}, new {}, emitted {}, primed {}, parked {}, rejected {}",
                        r.pipeline, r.poll, r.read, r.new, r.emitted, r.primed, r.parked, r.rejected
                    );
                }
            };
            idemload::trigger::watch(&config, &options, &mut on_poll).await?;
            Ok(0)
        }
        Command::State(args) => {
            let pipeline = Pipeline::new(PipelineConfig::from_file(&args.pipeline)?)?;
            let mut dest = pipeline.destination().await?;
            if args.reset || args.set.is_some() {
                let value = args.set.as_deref().map(parse_checkpoint_arg);
                let me = LockHolder::this_process(&format!("state-{}", std::process::id()));
                let wait = args.wait.as_deref().map(parse_wait).transpose()?;
                take_lock(dest.as_mut(), pipeline.name(), &me, wait).await?;
                let result = dest.set_checkpoint(pipeline.name(), value).await;
                dest.unlock().await?;
                result?;
            }
            let checkpoint = dest.checkpoint(pipeline.name()).await?;
            output::stdout_line(&match checkpoint {
                None => "none".to_string(),
                Some(serde_json::Value::String(s)) => s,
                Some(v) => v.to_string(),
            });
            Ok(0)
        }
        Command::History {
            pipeline,
            limit,
            json,
        } => {
            let pipeline = Pipeline::new(PipelineConfig::from_file(&pipeline)?)?;
            let runs = pipeline
                .destination()
                .await?
                .history(pipeline.name(), limit)
                .await?;
            if json {
                output::json(&json!({"pipeline": pipeline.name(), "runs": runs}));
            } else {
                output::history_table(&runs);
            }
            Ok(0)
        }
        Command::Rejects {
            pipeline,
            run_id,
            limit,
            json,
        } => {
            let pipeline = Pipeline::new(PipelineConfig::from_file(&pipeline)?)?;
            let rejects = pipeline
                .destination()
                .await?
                .rejects(pipeline.name(), run_id.as_deref(), limit)
                .await?;
            if json {
                output::json(&json!({"pipeline": pipeline.name(), "rejects": rejects}));
            } else {
                output::rejects_list(&rejects);
            }
            Ok(0)
        }
    }
}

fn parse_wait(text: &str) -> anyhow::Result<Duration> {
    parse_duration(text).map_err(|e| Error::config(format!("--wait {text}: {e}")).into())
}

async fn take_lock(
    dest: &mut dyn idemload::Destination,
    pipeline: &str,
    me: &LockHolder,
    wait: Option<Duration>,
) -> anyhow::Result<()> {
    let deadline = wait.map(|w| std::time::Instant::now() + w);
    loop {
        match dest.lock(pipeline, me, Duration::from_secs(30)).await? {
            None => return Ok(()),
            Some(_) if deadline.is_some_and(|d| std::time::Instant::now() < d) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Some(holder) => {
                return Err(Error::Locked {
                    pipeline: pipeline.to_string(),
                    holder,
                }
                .into())
            }
        }
    }
}

/// Builds a pipeline from `load` flags.
fn load_config(args: &LoadArgs) -> anyhow::Result<PipelineConfig> {
    let format = match args.format.as_deref() {
        Some("jsonl") => Some(FileFormat::Jsonl),
        Some("csv") => Some(FileFormat::Csv),
        Some("json") => Some(FileFormat::Json),
        Some("parquet") => Some(FileFormat::Parquet),
        _ => None,
    };
    let load = LoadConfig {
        key: args.key.clone(),
        hash_key: args.hash_key.clone(),
        cursor: args.cursor.clone(),
        mode: args.mode.parse()?,
        batch_size: args.batch_size,
        window_field: args.window_field.clone(),
        delete_field: args.delete_field.clone(),
        ..LoadConfig::default()
    };
    load.settings()?;
    Ok(PipelineConfig {
        name: args.name.clone().unwrap_or_else(|| args.table.clone()),
        source: SourceConfig::File(FileSourceConfig {
            path: idemload::source::OneOrMany::Many(args.files.clone()),
            format,
            endpoint: args.endpoint.clone(),
        }),
        destination: DestinationConfig {
            url: args.into.clone(),
            table: args.table.clone(),
            ..Default::default()
        },
        load,
        trigger: None,
    })
}

async fn run(pipeline: &Pipeline, full_refresh: bool, flags: &RunFlags) -> anyhow::Result<u8> {
    let options = RunOptions {
        full_refresh,
        wait: flags.wait.as_deref().map(parse_wait).transpose()?,
    };
    let bar = progress::Bar::new();
    let result = pipeline.run(&options, &bar).await;
    bar.finish();
    let report = result.with_context(|| format!("pipeline {:?}", pipeline.name()))?;
    if flags.json {
        output::json(&report);
    } else {
        eprintln!("idemload: {}", output::summary(&report));
    }
    Ok(match report.status {
        RunStatus::SucceededWithRejects => 4,
        RunStatus::Failed => 1,
        _ => 0,
    })
}

/// `check`: each step `ok`, `warn` or `fail`.
async fn check(path: &std::path::Path) -> anyhow::Result<u8> {
    let step = |status: &str, what: &str, detail: String| {
        output::stdout_line(&format!("{status:<4} {what}: {detail}"));
    };
    let config = match PipelineConfig::from_file(path) {
        Ok(c) => c,
        Err(e) => {
            step("fail", "config", e.to_string());
            return Ok(2);
        }
    };
    let pipeline = match Pipeline::new(config) {
        Ok(p) => p,
        Err(e) => {
            step("fail", "config", e.to_string());
            return Ok(2);
        }
    };
    let s = &pipeline.settings;
    step(
        "ok",
        "config",
        format!(
            "pipeline {:?}, mode {}, key {:?}, cursor {}",
            pipeline.name(),
            s.mode.as_str(),
            s.key.columns(),
            s.cursor.as_deref().unwrap_or("none")
        ),
    );
    let mut failed = false;
    match &pipeline.config.source {
        SourceConfig::File(f) => match idemload::source::file::expand_paths(&f.path.to_vec()) {
            Ok(files) => {
                let bytes: u64 = files
                    .iter()
                    .filter_map(|p| std::fs::metadata(p).ok())
                    .map(|m| m.len())
                    .sum();
                step(
                    "ok",
                    "source",
                    format!("{} file(s), {} bytes", files.len(), bytes),
                );
            }
            Err(e) => {
                step("fail", "source", e.to_string());
                failed = true;
            }
        },
        SourceConfig::Http(h) => step(
            "ok",
            "source",
            format!(
                "http {}",
                idemload::config::redact(h.url.split('?').next().unwrap_or_default())
            ),
        ),
        SourceConfig::Sql(q) => step(
            "ok",
            "source",
            format!("sql {}", idemload::config::redact(&q.url)),
        ),
    }
    let url = idemload::config::redact(&pipeline.config.destination.url);
    match pipeline.destination().await {
        Ok(mut dest) => {
            step(
                "ok",
                "destination",
                format!(
                    "connected to {url}, table {:?}",
                    pipeline.config.destination.table
                ),
            );
            let checkpoint = dest.checkpoint(pipeline.name()).await?;
            let plan = match (&checkpoint, &s.cursor) {
                (_, None) => "every run reads all records and merges them".to_string(),
                (Some(c), Some(_)) => {
                    format!("checkpoint {c}; the next run reads cursor >= checkpoint - lookback")
                }
                (None, Some(_)) => match &s.initial {
                    Some(i) => format!("no checkpoint yet; the first run reads cursor >= {i}"),
                    None => "no checkpoint yet; the first run reads everything".to_string(),
                },
            };
            step("ok", "plan", plan);
        }
        Err(e) => {
            step("fail", "destination", e.to_string());
            failed = true;
        }
    }
    Ok(if failed { 1 } else { 0 })
}
