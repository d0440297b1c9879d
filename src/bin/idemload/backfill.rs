//! `idemload backfill`: runs the library's backfill, draws where the range
//! stands, prints the report or the windows by status.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use idemload::backfill::{self, BackfillObserver, BackfillOptions, BackfillProgress};
use idemload::config::PipelineConfig;
use idemload::windows::{Span, WindowStatus};
use idemload::{Pipeline, RunStatus, StopToken};
use indicatif::{ProgressBar, ProgressStyle};

use crate::args::BackfillArgs;
use crate::{output, signals};

pub async fn backfill(args: BackfillArgs) -> anyhow::Result<u8> {
    let pipeline = Pipeline::new(PipelineConfig::from_file(&args.pipeline)?)?;
    let span = args.window.as_deref().map(Span::parse).transpose()?;
    if args.status {
        let range = match (&args.from, &args.to) {
            (Some(from), Some(to)) => Some((from.as_str(), to.as_str(), span)),
            _ => None,
        };
        return status(&pipeline, range, args.json).await;
    }
    let (Some(from), Some(to)) = (args.from.clone(), args.to.clone()) else {
        return Err(idemload::Error::config("give --from and --to (or --status)").into());
    };
    let options = BackfillOptions {
        from,
        to,
        window: span,
        workers: args.workers as usize,
        redo: args.redo,
        stop: StopToken::new(),
    };
    signals::listen(options.stop.clone())?;
    let view = View::new();
    let result = backfill::backfill(&pipeline, &options, &view).await;
    view.finish();
    let report = result.with_context(|| format!("pipeline {:?}", pipeline.name()))?;
    let code = match report.status {
        RunStatus::Succeeded => 0,
        RunStatus::SucceededWithRejects => 4,
        RunStatus::Interrupted => signals::received().map_or(130, signals::Caught::exit_code),
        _ => 1,
    };
    if args.json {
        output::json(&report);
    } else {
        let s = &report.stats;
        eprintln!(
            "idemload: backfill {}: {} of {} windows done ({} loaded here, {} already done or loaded by others, {} failed) in {:.1}s: read {}, inserted {}, updated {}, unchanged {}, deleted {}, skipped {}, rejected {}",
            report.pipeline,
            report.windows_done,
            report.windows,
            report.windows_loaded,
            report.windows_skipped,
            report.windows_failed,
            report.duration_ms as f64 / 1000.0,
            s.read,
            s.inserted,
            s.updated,
            s.unchanged,
            s.deleted + s.removed,
            s.skipped,
            s.rejected,
        );
        if let Some(error) = &report.error {
            eprintln!("idemload: first failure: {error}");
        }
        match report.status {
            RunStatus::Failed => eprintln!(
                "hint: see `idemload backfill {} --status` and `idemload history`; running the backfill again retries the failed windows and skips the done ones",
                args.pipeline.display()
            ),
            RunStatus::Interrupted => eprintln!(
                "idemload: stopped; done windows stay done, and running the backfill again loads the rest"
            ),
            RunStatus::SucceededWithRejects => eprintln!(
                "hint: inspect them with `idemload rejects {} --run RUN_ID` (run ids in `--status --json`)",
                args.pipeline.display()
            ),
            _ => {}
        }
    }
    Ok(code)
}

async fn status(
    pipeline: &Pipeline,
    range: Option<(&str, &str, Option<Span>)>,
    json: bool,
) -> anyhow::Result<u8> {
    let status = backfill::status(pipeline, range).await?;
    if json {
        output::json(&status);
    } else {
        for w in &status.windows {
            let detail = match w.status {
                WindowStatus::Done => w
                    .run_stats()
                    .map(|s| {
                        format!(
                            "read {} inserted {} updated {} rejected {}",
                            s.read, s.inserted, s.updated, s.rejected
                        )
                    })
                    .unwrap_or_default(),
                WindowStatus::Running => format!(
                    "run {} on {} (pid {}), lease until {}",
                    w.run_id.as_deref().unwrap_or("?"),
                    w.host.as_deref().unwrap_or("?"),
                    w.pid.unwrap_or_default(),
                    w.lease_expires_at().as_deref().unwrap_or("?")
                ),
                WindowStatus::Failed => w.error.clone().unwrap_or_default(),
                WindowStatus::Pending => String::new(),
            };
            output::stdout_line(&format!(
                "{:<25} {:<25} {:<8} {detail}",
                w.start,
                w.end,
                w.status.as_str()
            ));
        }
        eprintln!(
            "idemload: backfill {}: {} windows: {} done, {} running, {} pending, {} failed",
            status.pipeline,
            status.windows.len(),
            status.done,
            status.running,
            status.pending,
            status.failed
        );
    }
    Ok(status.exit_code() as u8)
}

/// Windows done/running/pending, rows/s and an ETA, on stderr when it is a
/// terminal.
struct View {
    bar: Mutex<Option<ProgressBar>>,
    started: Instant,
    enabled: bool,
}

impl View {
    fn new() -> View {
        View {
            bar: Mutex::new(None),
            started: Instant::now(),
            enabled: std::io::stderr().is_terminal(),
        }
    }

    fn finish(&self) {
        if let Ok(mut guard) = self.bar.lock() {
            if let Some(bar) = guard.take() {
                bar.finish_and_clear();
            }
        }
    }
}

impl BackfillObserver for View {
    fn update(&self, p: &BackfillProgress) {
        if !self.enabled {
            return;
        }
        let Ok(mut guard) = self.bar.lock() else {
            return;
        };
        let bar = guard.get_or_insert_with(|| {
            let bar = ProgressBar::new(p.windows as u64).with_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} windows {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        bar.set_position(p.done as u64);
        let seconds = self.started.elapsed().as_secs_f64();
        let rate = if seconds > 0.0 {
            (p.read as f64 / seconds).round()
        } else {
            0.0
        };
        // ETA from this process's pace over the windows it loaded.
        let left = p.windows.saturating_sub(p.done + p.failed);
        let eta = if p.loaded > 0 {
            let per_window = seconds / p.loaded as f64;
            format!(", eta {}s", (per_window * left as f64).round())
        } else {
            String::new()
        };
        bar.set_message(format!(
            "done, {} running, {} pending, {} failed; {rate} rows/s{eta}",
            p.running,
            left.saturating_sub(p.running),
            p.failed
        ));
    }
}
