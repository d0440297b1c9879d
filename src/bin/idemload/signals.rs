//! SIGINT and SIGTERM during `run`, `load` and `watch`: the first asks the
//! library to stop cleanly (the batch being written commits, the run is
//! recorded as `interrupted`, the lock is released), a second one ends the
//! process at once and leaves the lock to its lease. Either way the exit
//! code is the shell's for the first signal: 130 for SIGINT, 143 for SIGTERM.

use std::sync::atomic::{AtomicU8, Ordering};

use idemload::StopToken;

/// The exit code of the first signal received, 0 before any.
static RECEIVED: AtomicU8 = AtomicU8::new(0);

/// A signal that stops a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caught {
    Interrupt,
    #[cfg_attr(not(unix), allow(dead_code))]
    Terminate,
}

impl Caught {
    /// 128 + the signal number, as a shell reports a process it ended.
    pub fn exit_code(self) -> u8 {
        match self {
            Caught::Interrupt => 130,
            Caught::Terminate => 143,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Caught::Interrupt => "SIGINT",
            Caught::Terminate => "SIGTERM",
        }
    }
}

/// The first signal received, if any.
pub fn received() -> Option<Caught> {
    match RECEIVED.load(Ordering::SeqCst) {
        130 => Some(Caught::Interrupt),
        143 => Some(Caught::Terminate),
        _ => None,
    }
}

/// Turns SIGINT and SIGTERM into a stop request on `stop` from now on.
/// Must be called inside the runtime.
#[cfg(unix)]
pub fn listen(stop: StopToken) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        loop {
            let caught = tokio::select! {
                _ = interrupt.recv() => Caught::Interrupt,
                _ = terminate.recv() => Caught::Terminate,
            };
            caught_one(caught, &stop);
        }
    });
    Ok(())
}

/// Elsewhere, Ctrl-C only.
#[cfg(not(unix))]
pub fn listen(stop: StopToken) -> std::io::Result<()> {
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            caught_one(Caught::Interrupt, &stop);
        }
    });
    Ok(())
}

/// The first signal asks for the stop; a second ends the process.
fn caught_one(caught: Caught, stop: &StopToken) {
    let first =
        RECEIVED.compare_exchange(0, caught.exit_code(), Ordering::SeqCst, Ordering::SeqCst);
    match first {
        Ok(_) => {
            eprintln!(
                "idemload: {}: stopping once the batch being written commits (a second signal aborts at once)",
                caught.name()
            );
            stop.stop();
        }
        Err(code) => {
            eprintln!(
                "idemload: {}: aborting; a batch not yet committed is rolled back, and the run lock frees itself when its lease runs out",
                caught.name()
            );
            std::process::exit(i32::from(code));
        }
    }
}
