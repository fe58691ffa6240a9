//! One shutdown signal per command, installed once at start.
//!
//! SIGINT (Ctrl-C) or SIGTERM cancels one [`CancellationToken`] that every
//! loop and every wait that may block (connects, webhook POSTs, backoff
//! sleeps) selects on. A token stays cancelled, so a signal that arrives
//! while a command is busy elsewhere is seen at its next wait instead of
//! being lost. A second signal exits at once, as the engine does.

use tokio::signal::unix::{SignalKind, signal};
pub use tokio_util::sync::CancellationToken;

/// The exit status of a process stopped by a second signal (128 + SIGINT).
const EXIT_AT_ONCE: i32 = 130;

/// Registers the SIGINT and SIGTERM handlers now (signals from here on are
/// recorded even before anything waits on them) and returns the token
/// they cancel. Must run inside the runtime.
pub fn install() -> std::io::Result<CancellationToken> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        cancel.cancel();
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        eprintln!("strait: second signal, exiting now");
        std::process::exit(EXIT_AT_ONCE);
    });
    Ok(token)
}

/// A command stopped by the signal before it could finish its one job
/// (`strait tunnels` waiting on a silent engine); it exits 130, quietly.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// Runs `work` unless the signal comes first.
pub async fn or_interrupted<T>(
    shutdown: &CancellationToken,
    work: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    shutdown.run_until_cancelled(work).await.unwrap_or_else(|| Err(Interrupted.into()))
}
