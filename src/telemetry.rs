//! Logging setup (tracing, JSON or text, `RUST_LOG` over `log.level`) and error display helpers.

use std::error::Error;
use std::fmt;
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. Logs go to stderr; command output (`check`, `migrate`) goes
/// to stdout.
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| {
            // sqlx reports server notices ("already exists, skipping") at info: keep them quiet
            // unless the user asks for sqlx explicitly.
            // lapin logs channel closes itself at error; the relay logs them once, with context.
            let mut level = config.level.clone();
            if !level.contains("sqlx") {
                level.push_str(",sqlx=warn");
            }
            if !level.contains("lapin") {
                level.push_str(",lapin=off");
            }
            EnvFilter::try_new(level)
        })
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    // A second init (tests) keeps the first subscriber.
    let _ = match config.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Displays an error with its chain of sources: `database claim failed: pool timed out`.
/// For log fields and for the `last_error` column; the error itself is passed on as a value.
#[derive(Debug)]
pub struct ErrorChain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(err) = source {
            write!(f, ": {err}")?;
            source = err.source();
        }
        Ok(())
    }
}

/// Metric names, all exported on `/metrics` when `[http] listen` is set.
pub mod metric {
    /// Counter, labels `sink`, `destination`: rows marked published.
    pub const EVENTS_PUBLISHED: &str = "outbox_relay_events_published_total";
    /// Counter, labels `sink`, `destination`: failed attempts that count against a row's budget.
    pub const EVENTS_FAILED: &str = "outbox_relay_events_failed_total";
    /// Counter, labels `sink`, `destination`: rows dead-lettered.
    pub const EVENTS_DEAD_LETTERED: &str = "outbox_relay_events_dead_lettered_total";
    /// Counter, labels `sink`, `class` (`transient`, `permanent`, `fatal`): publish errors.
    pub const PUBLISH_ERRORS: &str = "outbox_relay_publish_errors_total";
    /// Counter, label `dependency` (`database`, `broker`): outages begun (each one is followed
    /// by a reconnect).
    pub const OUTAGES: &str = "outbox_relay_outages_total";
    /// Counter, label `dependency` (`database`, `broker`, `listen`): connections re-established
    /// after a loss (an outage's end; for `listen`, the NOTIFY connection coming back).
    pub const RECONNECTS: &str = "outbox_relay_reconnects_total";
    /// Gauge: unpublished, not dead-lettered rows (refreshed every 10 s).
    pub const PENDING_ROWS: &str = "outbox_relay_pending_rows";
    /// Gauge: age of the oldest pending row in seconds (refreshed every 10 s).
    pub const OLDEST_PENDING_AGE: &str = "outbox_relay_oldest_pending_age_seconds";
    /// Histogram, label `sink`: from the row's `created_at` to the broker's acknowledgement.
    pub const PUBLISH_LATENCY: &str = "outbox_relay_publish_latency_seconds";
    /// Histogram, label `sink`: rows per claimed batch.
    pub const BATCH_SIZE: &str = "outbox_relay_batch_size";
    /// Histogram, label `sink`: publish + settle time of a batch.
    pub const BATCH_DURATION: &str = "outbox_relay_batch_duration_seconds";
    /// Counter: batches whose lease ran out before their outcome was recorded (this instance
    /// was paused or too slow; another took the rows over, and its own writes were fenced).
    pub const LEASES_LOST: &str = "outbox_relay_leases_lost_total";
    /// Gauge: batches this instance holds leases for (its share of the table's work).
    pub const BATCHES_IN_FLIGHT: &str = "outbox_relay_batches_in_flight";
    /// Counter, label `rows` (`published`, `dead`): rows deleted by retention.
    pub const RETENTION_DELETED: &str = "outbox_relay_retention_deleted_total";
    /// Gauge: 1 while `/readyz` would answer ready.
    pub const READY: &str = "outbox_relay_ready";
}

/// Installs the global Prometheus recorder; metrics macros are no-ops without it.
pub fn install_metrics()
-> Result<metrics_exporter_prometheus::PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let seconds = [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        300.0,
    ];
    let rows = [
        1.0, 5.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
    ];
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), &seconds)?
        .set_buckets_for_metric(Matcher::Full(metric::BATCH_SIZE.to_owned()), &rows)?
        .install_recorder()
}
