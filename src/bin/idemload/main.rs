//! The `idemload` binary: parses, runs the library, prints, picks the exit code.

mod args;
mod backfill;
mod books;
mod check;
mod maintenance;
mod output;
mod progress;
mod signals;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use idemload::config::{DestinationConfig, LoadConfig, PipelineConfig, TableDestination};
use idemload::key::parse_duration;
use idemload::source::{FileFormat, FileSourceConfig, SourceConfig};
use idemload::{Error, Pipeline, RunOptions, RunStatus, StopToken};
use serde_json::json;

use crate::args::{Cli, Command, LoadArgs, LogFormat, RunFlags};

/// Records are many small maps and strings, parsed on one thread and freed
/// on another: mimalloc serves that pattern far better than the system
/// allocator (a third of a load's CPU time went to malloc and free).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A server's request log is its output: info unless asked otherwise.
    let verbose = match cli.command {
        Command::Serve { .. } => cli.verbose.max(1),
        _ => cli.verbose,
    };
    init_logging(verbose, cli.log_format);
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
    let run_pipeline = match &cli.command {
        Command::Load(a) => Some(a.name.clone().unwrap_or_else(|| a.table.clone())),
        Command::Run(a) => Some(
            a.pipeline
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        ),
        _ => None,
    };
    match runtime.block_on(execute(cli.command)) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            let code = exit_code(&err);
            if json_errors {
                match &run_pipeline {
                    // `load` and `run` keep the shape of their report.
                    Some(name) => {
                        let mut report = output::failed_run(name, &format!("{err:#}"));
                        if is_interrupted(&err) {
                            report["status"] = json!("interrupted");
                        }
                        output::json(&report)
                    }
                    None => output::json(&json!({"status": "failed", "error": format!("{err:#}")})),
                }
            }
            eprintln!("idemload: error: {err:#}");
            if let Some(hint) = err.downcast_ref::<Error>().and_then(Error::hint) {
                eprintln!("hint: {hint}");
            }
            ExitCode::from(code)
        }
    }
}

/// The spec's exit code for an error (2 for usage and configuration; a
/// stop asked for by a signal, 128 + the signal's number).
fn exit_code(err: &anyhow::Error) -> u8 {
    match err.downcast_ref::<Error>() {
        Some(Error::Interrupted { .. }) => {
            signals::received().map_or(130, signals::Caught::exit_code)
        }
        Some(e) => e.exit_code() as u8,
        None => 1,
    }
}

fn is_interrupted(err: &anyhow::Error) -> bool {
    matches!(err.downcast_ref::<Error>(), Some(Error::Interrupted { .. }))
}

fn wants_json(command: &Command) -> bool {
    match command {
        Command::Load(a) => a.run.json,
        Command::Run(a) => a.run.json,
        Command::State(a) => a.json,
        Command::History { json, .. }
        | Command::Rejects { json, .. }
        | Command::Verify { json, .. } => *json,
        Command::Audit(a) => a.json,
        Command::Watch { json, .. } => *json,
        Command::Dedupe(a) => a.target.json,
        Command::Backfill(a) => a.json,
        _ => false,
    }
}

/// Logs go to stderr, coloured only when it is a terminal (never into a
/// pipe or a file); `--log-format json` writes one JSON object per event.
fn init_logging(verbose: u8, format: LogFormat) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("IDEMLOAD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

async fn execute(command: Command) -> anyhow::Result<u8> {
    match command {
        Command::Load(args) => {
            let pipeline = Pipeline::new(load_config(&args)?)?;
            let mut rejects = format!(
                "idemload rejects --url {} --table {}",
                idemload::config::redact(&args.into),
                args.table
            );
            if let Some(name) = &args.name {
                rejects.push_str(&format!(" --name {name}"));
            }
            run(&pipeline, true, &args.run, &rejects).await
        }
        Command::Run(args) => {
            let pipeline = Pipeline::new(PipelineConfig::from_file(&args.pipeline)?)?;
            let rejects = format!("idemload rejects {}", args.pipeline.display());
            run(&pipeline, args.full_refresh, &args.run, &rejects).await
        }
        Command::Backfill(args) => backfill::backfill(args).await,
        Command::Check { pipeline } => check::check(&pipeline).await,
        Command::Audit(args) => maintenance::audit(args).await,
        Command::Dedupe(args) => maintenance::dedupe(args).await,
        Command::Verify { pipeline, json } => maintenance::verify(&pipeline, json).await,
        Command::Serve { pipeline, listen } => {
            let config = PipelineConfig::from_file(&pipeline)?;
            let pipeline = idemload::Pipeline::new(config)?;
            let listener = idemload::serve::bind(listen).await?;
            if let Ok(addr) = listener.local_addr() {
                eprintln!(
                    "idemload: serving pipeline {:?} on http://{addr}/v1/records",
                    pipeline.name()
                );
            }
            let stop = StopToken::new();
            signals::listen(stop.clone())?;
            idemload::serve::serve(pipeline, listener, stop).await?;
            // A stop asked for by SIGTERM or SIGINT is how a server ends.
            Ok(0)
        }
        Command::Watch {
            pipeline,
            once,
            json,
            wait,
            reset,
            dead_letters,
            redrive,
        } => {
            let config = PipelineConfig::from_file(&pipeline)?;
            let mut options = idemload::trigger::WatchOptions {
                once,
                wait: wait.as_deref().map(parse_wait).transpose()?,
                ..Default::default()
            };
            if reset || dead_letters || redrive {
                return watch_maintenance(&config, &options, json, reset, dead_letters).await;
            }
            options.stop = StopToken::new();
            signals::listen(options.stop.clone())?;
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
            match signals::received() {
                Some(caught) => {
                    eprintln!(
                        "idemload: watch {}: interrupted; every item emitted is marked seen, and watching again goes on from there",
                        config.name
                    );
                    Ok(caught.exit_code())
                }
                None => Ok(0),
            }
        }
        Command::State(args) => books::state(&args).await,
        Command::History { books, limit, json } => books::history(&books, limit, json).await,
        Command::Rejects {
            books,
            run_id,
            limit,
            json,
        } => books::rejects(&books, run_id.as_deref(), limit, json).await,
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut command, "idemload", &mut out);
            output::stdout_bytes(&out);
            Ok(0)
        }
        Command::Man => {
            let command = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_mangen::Man::new(command).render(&mut out)?;
            output::stdout_bytes(&out);
            Ok(0)
        }
    }
}

pub(crate) fn parse_wait(text: &str) -> anyhow::Result<Duration> {
    parse_duration(text).map_err(|e| Error::config(format!("--wait {text}: {e}")).into())
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
        destination: DestinationConfig::Table(TableDestination::new(&args.into, &args.table)),
        load,
        trigger: None,
        audit: None,
        serve: None,
    })
}

/// Runs a pipeline; `rejects` is the command that lists its rejects.
async fn run(
    pipeline: &Pipeline,
    full_refresh: bool,
    flags: &RunFlags,
    rejects: &str,
) -> anyhow::Result<u8> {
    let options = RunOptions {
        full_refresh,
        wait: flags.wait.as_deref().map(parse_wait).transpose()?,
        stop: StopToken::new(),
    };
    signals::listen(options.stop.clone())?;
    let bar = progress::Bar::new();
    let result = pipeline.run(&options, &bar).await;
    bar.finish();
    let report = result.with_context(|| format!("pipeline {:?}", pipeline.name()))?;
    let code = match report.status {
        RunStatus::SucceededWithRejects => 4,
        RunStatus::Failed => 1,
        RunStatus::Interrupted => signals::received().map_or(130, signals::Caught::exit_code),
        _ => 0,
    };
    // `--audit`: after the run committed; the run's own code wins.
    let audit = match (flags.audit, code) {
        (true, 0 | 4) => Some(maintenance::audit_after_run(pipeline).await?),
        _ => None,
    };
    if flags.json {
        match &audit {
            Some(a) => {
                let mut value = output::run_json(&report);
                value["audit"] = serde_json::to_value(a)?;
                output::json(&value);
            }
            None => output::json(&output::run_json(&report)),
        }
    } else {
        eprintln!("idemload: {}", output::summary(&report, rejects));
        if let Some(a) = &audit {
            maintenance::print_audit_report(a);
        }
    }
    Ok(match audit {
        Some(a) if code == 0 && !a.clean => 1,
        _ => code,
    })
}
/// `watch --reset`, `--dead-letters` and `--redrive`.
async fn watch_maintenance(
    config: &PipelineConfig,
    options: &idemload::trigger::WatchOptions,
    json: bool,
    reset: bool,
    dead_letters: bool,
) -> anyhow::Result<u8> {
    use idemload::trigger;
    if reset {
        let forgotten = trigger::reset(config, options).await?;
        if json {
            output::json(&serde_json::json!({
                "pipeline": config.name, "reset": true, "forgotten": forgotten
            }));
        } else {
            eprintln!(
                "idemload: watch {}: reset: {forgotten} seen keys and the dead letters forgotten",
                config.name
            );
        }
        return Ok(0);
    }
    if dead_letters {
        for letter in trigger::dead_letters(config).await? {
            if json {
                output::json(&letter);
            } else {
                println!(
                    "{}  attempts {}  {}  {}",
                    letter.parked_at, letter.attempts, letter.error, letter.item
                );
            }
        }
        return Ok(0);
    }
    let report = trigger::redrive(config, options).await?;
    if json {
        output::json(&report);
    } else {
        eprintln!(
            "idemload: watch {}: redrive: {} emitted, {} still parked",
            report.pipeline, report.redriven, report.failed
        );
    }
    Ok(if report.failed > 0 { 1 } else { 0 })
}
