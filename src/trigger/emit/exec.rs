//! The exec emitter: a command with the item on stdin; exit 0 confirms.

use std::process::Stdio;

use async_trait::async_trait;
use tokio::io::AsyncWriteExt;

use super::{EmitError, Emitter, Event};

pub struct Exec {
    pub command: String,
}

#[async_trait]
impl Emitter for Exec {
    async fn emit(&mut self, event: &Event) -> Result<(), EmitError> {
        let fail = |message: String| EmitError {
            message,
            retryable: true,
        };
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&self.command)
            .env("IDEMLOAD_IDEMPOTENCY_KEY", &event.idempotency_key)
            .env("IDEMLOAD_KEY", event.key.to_string())
            .env("IDEMLOAD_PIPELINE", &event.pipeline)
            .stdin(Stdio::piped())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| fail(format!("cannot start `{}`: {e}", self.command)))?;
        if let Some(mut stdin) = child.stdin.take() {
            let mut line = serde_json::to_vec(&event.item).unwrap_or_default();
            line.push(b'\n');
            // A command that does not read its stdin is fine.
            let _ = stdin.write_all(&line).await;
        }
        let status = child
            .wait()
            .await
            .map_err(|e| fail(format!("`{}`: {e}", self.command)))?;
        if status.success() {
            Ok(())
        } else {
            Err(fail(format!("`{}` exited with {status}", self.command)))
        }
    }
}
