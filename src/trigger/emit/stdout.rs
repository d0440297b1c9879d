//! The stdout emitter: one JSON line per item.

use std::io::Write;

use async_trait::async_trait;

use super::{EmitError, Emitter, Event};

pub struct Stdout;

#[async_trait]
impl Emitter for Stdout {
    async fn emit(&mut self, event: &Event) -> Result<(), EmitError> {
        let line = serde_json::to_string(event).unwrap_or_default();
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")
            .and_then(|_| out.flush())
            .map_err(|e| EmitError {
                message: format!("stdout: {e}"),
                retryable: false,
            })
    }
}
