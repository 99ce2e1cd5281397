//! Retention: deletes old published (and, if configured, dead-lettered) rows in bounded
//! batches, so the outbox does not grow forever.
//!
//! Each delete is one short statement of at most `retention.batch_size` rows; a transaction
//! advisory lock lets one instance delete at a time (the others skip the round), and a short
//! pause between batches leaves room for the relay and the application.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Store;
use super::config::RetentionConfig;
use crate::telemetry::{ErrorChain, metric};

/// Pause between two delete batches of one round.
const BETWEEN_BATCHES: Duration = Duration::from_millis(20);

/// Runs until `shutdown`; does nothing when both retention periods are off.
pub(crate) async fn run<S: Store>(store: S, config: RetentionConfig, shutdown: CancellationToken) {
    let targets: Vec<(&'static str, bool, Duration)> = [
        ("published", false, config.published),
        ("dead", true, config.dead),
    ]
    .into_iter()
    .filter_map(|(what, dead, age)| age.map(|age| (what, dead, age)))
    .collect();
    if targets.is_empty() {
        return;
    }
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        for (what, dead, age) in &targets {
            let mut deleted = 0u64;
            loop {
                if shutdown.is_cancelled() {
                    return;
                }
                match store.delete_older(*dead, *age, config.batch_size).await {
                    Ok(rows) => {
                        deleted += rows;
                        if rows < u64::from(config.batch_size) {
                            break;
                        }
                    }
                    Err(err) => {
                        // Logged at debug: the relay loop reports database outages once.
                        tracing::debug!(error = %ErrorChain(&err), "retention delete failed");
                        break;
                    }
                }
                tokio::time::sleep(BETWEEN_BATCHES).await;
            }
            if deleted > 0 {
                metrics::counter!(metric::RETENTION_DELETED, "rows" => *what).increment(deleted);
                tracing::info!(rows = deleted, kind = what, "retention deleted old rows");
            }
        }
    }
}
