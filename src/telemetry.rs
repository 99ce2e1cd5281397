//! Logging setup (tracing, JSON or text, `RUST_LOG` over `log.level`) and error display helpers.

use std::error::Error;
use std::fmt;
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use serde::Deserialize;

use crate::constraint::{ConfigError, invalid};

/// `[log]`
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `json` or `text`. Default `json`.
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter (`info`, `outbox_relay=debug`); `RUST_LOG` overrides it. Default `info`.
    #[serde(default = "default_level")]
    pub level: String,
}

fn default_level() -> String {
    "info".to_owned()
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::default(),
            level: default_level(),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line (for log shippers).
    #[default]
    Json,
    /// Human-readable lines.
    Text,
}

/// `[log]`, parsed.
#[derive(Debug)]
pub struct LogSettings {
    pub(crate) format: LogFormat,
    /// `log.level` with the relay's quieting of sqlx and lapin added.
    pub(crate) filter: EnvFilter,
}

impl LogConfig {
    /// Checks the section and parses the filter.
    pub(crate) fn validate(&self) -> Result<LogSettings, ConfigError> {
        if self.level.trim().is_empty() {
            return Err(invalid("log.level", "must not be empty"));
        }
        // sqlx reports server notices ("already exists, skipping") at info: keep them quiet
        // unless the user asks for sqlx explicitly.
        // lapin logs channel closes itself at error; the relay logs them once, with context.
        let mut level = self.level.clone();
        if !level.contains("sqlx") {
            level.push_str(",sqlx=warn");
        }
        if !level.contains("lapin") {
            level.push_str(",lapin=off");
        }
        let filter = EnvFilter::try_new(level).map_err(|_| {
            invalid(
                "log.level",
                "must be a tracing filter such as \"info\" or \"outbox_relay=debug,warn\"",
            )
        })?;
        Ok(LogSettings {
            format: self.format,
            filter,
        })
    }
}

/// Installs the global subscriber, filtered by `RUST_LOG` when set, else by `log.level`. Logs
/// go to stderr; command output (`check`, `migrate`) goes to stdout.
pub fn init(settings: LogSettings) {
    let filter = EnvFilter::try_from_default_env().unwrap_or(settings.filter);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    // A second init (tests) keeps the first subscriber.
    let _ = match settings.format {
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

/// Metric names, all exported on `/metrics` when `[http] listen` is set. The `sink` label is the
/// broker (`kafka`, `rabbitmq`, `discard`); it keeps the name it had before `[sink]` became
/// `[broker]`, so dashboards and alerts written against it go on working.
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
    /// Counter, label `topic`: partition-count changes detected on a topic the relay writes to.
    pub const PARTITION_CHANGES: &str = "outbox_relay_topic_partition_changes_total";
    /// Gauge: topics paused until their new partition count is accepted.
    pub const TOPICS_PAUSED: &str = "outbox_relay_topics_paused";
    /// Gauge: 1 while `/readyz` would answer ready.
    pub const READY: &str = "outbox_relay_ready";
    /// Counter, labels `consumer`, `result` (`inserted`, `duplicate`, `rejected`): messages the
    /// inbox wrote.
    pub const INBOX_MESSAGES: &str = "outbox_relay_inbox_messages_total";
    /// Counter, labels `consumer`, `reason` (`no_event_id`, `bad_event_id`, `too_large`,
    /// `refused_by_database`): messages recorded in the rejected table.
    pub const INBOX_REJECTED: &str = "outbox_relay_inbox_rejected_total";
    /// Histogram, label `consumer`: messages per inbox transaction.
    pub const INBOX_BATCH_SIZE: &str = "outbox_relay_inbox_batch_size";
    /// Histogram, label `consumer`: time to write a batch durably (retries included).
    pub const INBOX_WRITE_DURATION: &str = "outbox_relay_inbox_write_duration_seconds";
    /// Gauge, label `consumer`: rows the application has not marked processed (every 10 s).
    pub const INBOX_WAITING_ROWS: &str = "outbox_relay_inbox_waiting_rows";
    /// Gauge, label `consumer`: age of the oldest of them.
    pub const INBOX_OLDEST_WAITING_AGE: &str = "outbox_relay_inbox_oldest_waiting_age_seconds";
    /// Gauge, label `consumer`: 1 while the inbox's part of `/readyz` is ready (its database
    /// and broker reachable).
    pub const INBOX_READY: &str = "outbox_relay_inbox_ready";
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
