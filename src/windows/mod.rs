//! Windows of a backfill: the cursor range `[from, to)` cut into spans, each
//! bound written the way the data and the sources read it; and how a window
//! is kept in `_idemload_windows` (see [`books`]).
//!
//! A range given as dates (`2024-01-01`) with whole-day windows keeps its
//! bounds as dates, which compare right against date fields stored as text
//! and against timestamps (`2024-01-01T10:00:00Z` sorts after
//! `2024-01-01`); any other time range has RFC 3339 UTC bounds; an integer
//! cursor has integer bounds.

mod books;

pub use self::books::{WindowClaim, WindowEntry, WindowRow, WindowStatus, WINDOWS_TABLE};

use std::cmp::Ordering;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};

use crate::error::{Error, Result};
use crate::key::{parse_duration, parse_instant, Cursor};

/// One window: records with `start <= cursor < end`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub start: Cursor,
    pub end: Cursor,
    /// Orders the windows (the start's seconds, or the integer itself).
    pub position: i64,
}

impl Window {
    /// The bound as stored and shown.
    pub fn start_text(&self) -> String {
        self.start.to_string()
    }

    pub fn end_text(&self) -> String {
        self.end.to_string()
    }

    /// Whether a record's cursor lies in the window. A date-only value
    /// compares as its midnight (UTC) against timestamp bounds.
    pub fn holds(&self, cursor: &Cursor) -> bool {
        compare(cursor, &self.start) != Ordering::Less
            && compare(cursor, &self.end) == Ordering::Less
    }
}

/// Compares a record's cursor with a bound: as instants when both are
/// times (a date counts as its midnight UTC), else as cursors.
pub fn compare(value: &Cursor, bound: &Cursor) -> Ordering {
    match (value.as_instant(), bound.as_instant()) {
        (Some(a), Some(b)) => a.cmp(&b),
        _ => value.cmp(bound),
    }
}

/// The span of one window: a duration for time cursors, a number for
/// integer cursors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    Time(Duration),
    Number(i64),
}

impl Span {
    /// `"1d"`, `"6h"`, or a positive number.
    pub fn parse(text: &str) -> Result<Span> {
        let text = text.trim();
        if let Ok(n) = text.parse::<i64>() {
            return if n > 0 {
                Ok(Span::Number(n))
            } else {
                Err(Error::config(format!("window {text}: must be positive")))
            };
        }
        let d = parse_duration(text).map_err(|e| Error::config(format!("window {text:?}: {e}")))?;
        if d.is_zero() {
            return Err(Error::config(format!("window {text:?}: must be positive")));
        }
        Ok(Span::Time(d))
    }

    /// From `[load] window`.
    pub fn from_toml(value: &toml::Value) -> Result<Span> {
        match value {
            toml::Value::Integer(n) => Span::parse(&n.to_string()),
            toml::Value::String(s) => Span::parse(s),
            other => Err(Error::config(format!(
                "window = {other}: expected a duration such as \"1d\" or a positive number"
            ))),
        }
    }
}

impl std::fmt::Display for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Span::Number(n) => write!(f, "{n}"),
            Span::Time(d) => {
                let secs = d.as_secs();
                match secs {
                    _ if d.subsec_nanos() != 0 => write!(f, "{}ms", d.as_millis()),
                    s if s % 86_400 == 0 => write!(f, "{}d", s / 86_400),
                    s if s % 3_600 == 0 => write!(f, "{}h", s / 3_600),
                    s if s % 60 == 0 => write!(f, "{}m", s / 60),
                    s => write!(f, "{s}s"),
                }
            }
        }
    }
}

/// A bound given on the command line.
enum Bound {
    Int(i64),
    Date(NaiveDate),
    Instant(DateTime<Utc>),
}

fn parse_bound(flag: &str, text: &str) -> Result<Bound> {
    let text = text.trim();
    if let Ok(i) = text.parse::<i64>() {
        return Ok(Bound::Int(i));
    }
    if let Ok(d) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(Bound::Date(d));
    }
    if let Some(n) = parse_instant(text) {
        let secs = n.div_euclid(1_000_000_000) as i64;
        let sub = n.rem_euclid(1_000_000_000) as u32;
        if let Some(t) = DateTime::<Utc>::from_timestamp(secs, sub) {
            return Ok(Bound::Instant(t));
        }
    }
    Err(Error::config(format!(
        "{flag} {text:?}: give an RFC 3339 timestamp (2024-01-01T00:00:00Z), a date (2024-01-01) or an integer"
    )))
}

/// Cuts `[from, to)` into windows of `span`; the last one ends at `to`.
pub fn windows(from: &str, to: &str, span: Span) -> Result<Vec<Window>> {
    const MAX_WINDOWS: usize = 1_000_000;
    let (from_b, to_b) = (parse_bound("--from", from)?, parse_bound("--to", to)?);
    let too_many = || {
        Error::config(format!(
            "--from {from} --to {to} with window {span} makes more than {MAX_WINDOWS} windows: give a larger --window"
        ))
    };
    match (from_b, to_b, span) {
        (Bound::Int(a), Bound::Int(b), Span::Number(n)) => {
            if a >= b {
                return Err(empty_range(from, to));
            }
            if ((b - a) / n) as usize >= MAX_WINDOWS {
                return Err(too_many());
            }
            let mut out = Vec::new();
            let mut s = a;
            while s < b {
                let e = s.saturating_add(n).min(b);
                out.push(Window {
                    start: Cursor::Int(s),
                    end: Cursor::Int(e),
                    position: s,
                });
                s = e;
            }
            Ok(out)
        }
        (Bound::Int(_), Bound::Int(_), Span::Time(_)) => Err(Error::config(format!(
            "window {span} is a duration but --from/--to are integers: give a number, e.g. --window 1000"
        ))),
        (Bound::Int(_), _, _) | (_, Bound::Int(_), _) => Err(Error::config(
            "--from and --to must both be integers or both be times",
        )),
        (_, _, Span::Number(_)) => Err(Error::config(format!(
            "window {span} is a number but --from/--to are times: give a duration, e.g. --window 1d"
        ))),
        (a, b, Span::Time(d)) => {
            let days = d.as_secs() % 86_400 == 0 && d.subsec_nanos() == 0;
            let as_dates = matches!(a, Bound::Date(_)) && days;
            let instant = |b: Bound| match b {
                Bound::Date(day) => day.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc(),
                Bound::Instant(t) => t,
                Bound::Int(_) => unreachable!("integers handled above"),
            };
            let (a, b) = (instant(a), instant(b));
            if a >= b {
                return Err(empty_range(from, to));
            }
            let step = chrono::Duration::from_std(d).map_err(|_| too_many())?;
            let count = (b - a).num_seconds() / step.num_seconds().max(1);
            if count as usize >= MAX_WINDOWS {
                return Err(too_many());
            }
            let bound = |t: DateTime<Utc>| {
                if as_dates && t.time() == chrono::NaiveTime::MIN {
                    Cursor::Text(t.format("%Y-%m-%d").to_string())
                } else {
                    let text = t.to_rfc3339_opts(SecondsFormat::AutoSi, true);
                    Cursor::from_text(&text)
                }
            };
            let mut out = Vec::new();
            let mut s = a;
            while s < b {
                let e = (s + step).min(b);
                out.push(Window {
                    start: bound(s),
                    end: bound(e),
                    position: s.timestamp(),
                });
                s = e;
            }
            Ok(out)
        }
    }
}

fn empty_range(from: &str, to: &str) -> Error {
    Error::config(format!(
        "--from {from} is not before --to {to}: a backfill loads [from, to)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_from_dates_stay_dates_and_the_last_window_ends_at_to() {
        let w = windows("2024-01-30", "2024-02-02", Span::parse("1d").unwrap()).unwrap();
        let bounds: Vec<(String, String)> =
            w.iter().map(|w| (w.start_text(), w.end_text())).collect();
        assert_eq!(
            bounds,
            [
                ("2024-01-30".to_string(), "2024-01-31".to_string()),
                ("2024-01-31".into(), "2024-02-01".into()),
                ("2024-02-01".into(), "2024-02-02".into()),
            ]
        );
        let hours = windows(
            "2024-01-01",
            "2024-01-01T10:00:00Z",
            Span::parse("4h").unwrap(),
        )
        .unwrap();
        let ends: Vec<String> = hours.iter().map(Window::end_text).collect();
        assert_eq!(
            ends,
            [
                "2024-01-01T04:00:00Z",
                "2024-01-01T08:00:00Z",
                "2024-01-01T10:00:00Z"
            ]
        );
    }

    #[test]
    fn integer_windows_and_mistakes() {
        let w = windows("0", "25", Span::parse("10").unwrap()).unwrap();
        assert_eq!(w.len(), 3);
        assert_eq!(w[2].start, Cursor::Int(20));
        assert_eq!(w[2].end, Cursor::Int(25));
        assert!(windows("5", "5", Span::Number(1)).is_err());
        assert!(windows("0", "10", Span::parse("1d").unwrap()).is_err());
        assert!(windows("2024-01-01", "2024-01-02", Span::Number(3)).is_err());
        assert!(windows("yesterday", "2024-01-02", Span::parse("1d").unwrap()).is_err());
    }

    #[test]
    fn a_window_holds_dates_and_instants_alike() {
        let w = &windows("2024-01-15", "2024-01-16", Span::parse("1d").unwrap()).unwrap()[0];
        assert!(w.holds(&Cursor::from_text("2024-01-15")));
        assert!(w.holds(&Cursor::from_text("2024-01-15T23:59:59Z")));
        assert!(w.holds(&Cursor::from_text("2024-01-16T01:00:00+02:00")));
        assert!(!w.holds(&Cursor::from_text("2024-01-16")));
        assert!(!w.holds(&Cursor::from_text("2024-01-14T23:59:59Z")));
        let t = &windows(
            "2024-01-15T00:00:00Z",
            "2024-01-16T00:00:00Z",
            Span::parse("1d").unwrap(),
        )
        .unwrap()[0];
        assert!(t.holds(&Cursor::from_text("2024-01-15")));
        assert!(!t.holds(&Cursor::from_text("2024-01-16")));
    }
}
