//! LISTEN on the outbox table's NOTIFY channel and turn notifications into wake-ups.
//!
//! A notification is only a hint that rows may be waiting: the relay polls anyway. When the
//! LISTEN connection drops, notifications sent meanwhile are lost, so every reconnect also wakes
//! the relay once (a forced poll).

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};

use super::Table;
use super::config::DatabaseSettings;
use crate::telemetry::metric;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The LISTEN session's pool: one connection of its own, lazily connected, so the claims never
/// lose one of theirs to it.
pub(crate) fn pool(settings: &DatabaseSettings) -> PgPool {
    PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(settings.connect.clone())
}

/// Runs until `shutdown` fires; never returns an error (it logs the outage once and retries).
pub(crate) async fn run(
    pool: PgPool,
    table: Table,
    wakeup: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut delay = Duration::from_millis(100);
    let mut failing = false;
    loop {
        let outcome = tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            outcome = listen(&pool, &table, &wakeup, &mut failing) => outcome,
        };
        // `listen` only returns on an error; the connection is gone, wake the relay to poll.
        wakeup.notify_one();
        if let Err(err) = outcome {
            if !failing {
                tracing::warn!(error = %err, table = %table, "listen connection lost, relying on polling until it is back");
                failing = true;
                // The first failure after a working connection starts the backoff afresh.
                delay = Duration::from_millis(100);
            }
        }
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

async fn listen(
    pool: &PgPool,
    table: &Table,
    wakeup: &Notify,
    failing: &mut bool,
) -> Result<(), sqlx::Error> {
    // The trigger names the channel after the table as PostgreSQL resolved it (schema included).
    let channel: String = sqlx::query_scalar(
        "select 'outbox_relay:' || n.nspname || '.' || c.relname from pg_class c
         join pg_namespace n on n.oid = c.relnamespace where c.oid = to_regclass($1)",
    )
    .bind(table.quoted())
    .fetch_one(pool)
    .await?;
    let channel = channel.as_str();
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(channel).await?;
    if *failing {
        metrics::counter!(metric::RECONNECTS, "dependency" => "listen").increment(1);
        tracing::info!(channel = %channel, "listen connection restored");
        *failing = false;
    }
    // Anything inserted before LISTEN took effect would otherwise wait for the next poll.
    wakeup.notify_one();
    loop {
        match listener.try_recv().await? {
            Some(_) => wakeup.notify_one(),
            None => {
                // Connection lost and re-established by sqlx; notifications in between are gone.
                metrics::counter!(metric::RECONNECTS, "dependency" => "listen").increment(1);
                tracing::debug!(channel = %channel, "listen connection re-established");
                wakeup.notify_one();
            }
        }
    }
}
