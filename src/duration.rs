//! Durations in configuration and flags: `500ms`, `30s`, `15m`, `2d`.

use std::time::Duration;

/// Parses `500ms`, `30s`, `15m`, `2d`, `1h 30m`.
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("not a duration ({e}); use e.g. \"30s\", \"15m\", \"2d\""))
}
