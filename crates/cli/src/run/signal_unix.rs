//! Waiting for SIGINT or SIGTERM (Unix).

use tokio::signal::unix::{signal, SignalKind};

/// A signal that asks vmcp to stop.
#[derive(Debug, Clone, Copy)]
pub struct Termination {
    /// Name for messages.
    pub name: &'static str,
    /// Signal number (exit status is 128 + this).
    pub number: u8,
}

/// Resolves at the first SIGINT or SIGTERM; never resolves if they cannot be watched.
pub async fn termination() -> Termination {
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        tracing::warn!("cannot watch SIGINT/SIGTERM");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => Termination { name: "SIGINT", number: 2 },
        _ = term.recv() => Termination { name: "SIGTERM", number: 15 },
    }
}
