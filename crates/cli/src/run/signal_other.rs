//! Waiting for Ctrl-C (non-Unix).

/// A signal that asks vmcp to stop.
#[derive(Debug, Clone, Copy)]
pub struct Termination {
    /// Name for messages.
    pub name: &'static str,
    /// Exit status is 128 + this.
    pub number: u8,
}

/// Resolves at the first Ctrl-C; never resolves if it cannot be watched.
pub async fn termination() -> Termination {
    if tokio::signal::ctrl_c().await.is_err() {
        tracing::warn!("cannot watch Ctrl-C");
        return std::future::pending().await;
    }
    Termination {
        name: "Ctrl-C",
        number: 2,
    }
}
