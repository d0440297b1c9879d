//! The progress bar: drawn only when stderr is a terminal.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

use idemload::source::SourceProgress;
use idemload::{Progress, RunStats};
use indicatif::{ProgressBar, ProgressStyle};

/// Draws a bar (bytes read of the total, when known) and the counts.
pub struct Bar {
    bar: Mutex<Option<ProgressBar>>,
    enabled: bool,
}

impl Bar {
    pub fn new() -> Bar {
        Bar {
            bar: Mutex::new(None),
            enabled: std::io::stderr().is_terminal(),
        }
    }

    pub fn finish(&self) {
        if let Ok(mut guard) = self.bar.lock() {
            if let Some(bar) = guard.take() {
                bar.finish_and_clear();
            }
        }
    }
}

impl Progress for Bar {
    fn batch_committed(&self, stats: &RunStats, source: SourceProgress) {
        if !self.enabled {
            return;
        }
        let Ok(mut guard) = self.bar.lock() else {
            return;
        };
        let bar = guard.get_or_insert_with(|| {
            let bar = match source.bytes_total {
                Some(total) => ProgressBar::new(total).with_style(
                    ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {msg}, eta {eta}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                ),
                // stdin: no total, so no ETA; the elapsed time instead.
                None => ProgressBar::new_spinner().with_style(
                    ProgressStyle::with_template("{spinner} {elapsed} {bytes} {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                ),
            };
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        bar.set_position(source.bytes_read);
        let seconds = bar.elapsed().as_secs_f64();
        let rate = if seconds > 0.0 {
            (stats.read as f64 / seconds).round()
        } else {
            0.0
        };
        bar.set_message(format!(
            "read {} ({rate} rows/s) inserted {} updated {} unchanged {} rejected {}",
            stats.read, stats.inserted, stats.updated, stats.unchanged, stats.rejected
        ));
    }
}
