//! SIGTERM / SIGINT → a [`CancellationToken`] the relay observes between batches.

use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Listens for SIGTERM and SIGINT and cancels `token` on the first one. The caller owns the
/// returned task and aborts it when the relay has stopped.
pub fn on_signal(token: CancellationToken) -> std::io::Result<JoinHandle<()>> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(tokio::spawn(async move {
        let name = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        tracing::info!(
            signal = name,
            "shutdown requested: finishing the batches in flight"
        );
        token.cancel();
    }))
}
