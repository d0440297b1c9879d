//! Write modes: how a batch's rows land on the stored ones.

use serde::Deserialize;

use crate::error::{Error, Result};

/// Write modes of the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Insert new keys, update changed rows, leave equal rows untouched.
    #[default]
    Merge,
    /// Insert new keys, never touch existing rows.
    InsertNew,
    /// Load a full snapshot; rows absent from it are removed, in one transaction.
    Replace,
    /// Reload the rows whose `window_field` falls in the loaded range.
    Window,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Merge => "merge",
            Mode::InsertNew => "insert_new",
            Mode::Replace => "replace",
            Mode::Window => "window",
        }
    }

    /// Replace and window stage the whole run and apply it at the end.
    pub fn is_staged(self) -> bool {
        matches!(self, Mode::Replace | Mode::Window)
    }
}

impl std::str::FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Mode> {
        match s {
            "merge" => Ok(Mode::Merge),
            "insert_new" => Ok(Mode::InsertNew),
            "replace" => Ok(Mode::Replace),
            "window" => Ok(Mode::Window),
            other => Err(Error::config(format!(
                "unknown mode {other:?}: use merge, insert_new, replace or window"
            ))),
        }
    }
}
