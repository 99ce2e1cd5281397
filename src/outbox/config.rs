//! The outbox direction's sections: `[relay]`, `[retry]` and `[retention]`, and what they
//! parse into.

use std::time::Duration;

use serde::Deserialize;

use crate::broker::template::Template;
use crate::constraint::{ConfigError, at_least, invalid, yes};
use crate::runtime::backoff;

/// `[relay]`
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Most rows claimed and published as one batch. Default 2000 (BENCHMARKS.md: 33k / 37–41k
    /// / 41–44k ev/s to Kafka at 500 / 1000 / 2000); `max_batch_bytes` bounds the memory.
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    /// Most payload bytes in one batch (each payload's uncompressed stored size, about its
    /// JSON text, whatever PostgreSQL compressed it to on disk; summed in `id` order); a batch
    /// always takes at least one row. Bounds the
    /// relay's memory for large events: about `max_in_flight_batches` × this, plus the broker
    /// client's copies. Default 8388608 (8 MiB).
    #[serde(default = "default_max_batch_bytes")]
    pub max_batch_bytes: u64,
    /// Batches published at once; the next claim and the marking of earlier batches overlap
    /// the broker's work. Batches in flight never share an aggregate. Default 2.
    #[serde(default = "default_max_in_flight_batches")]
    pub max_in_flight_batches: u32,
    /// Claim only rows no uncommitted transaction can still precede (see README, "Guarantees", 4: late commits):
    /// a row committed after a later-id row of its aggregate is published first. Costs one
    /// `pg_locks` lookup per claim. Default true.
    #[serde(default = "yes")]
    pub commit_order_guard: bool,
    /// Longest wait between claims, that of an idle relay: polling is adaptive (5 ms after a
    /// claim that found rows, doubling while claims find none, up to this); always on, even
    /// with `listen`. Default 1s.
    #[cfg_attr(test, schemars(with = "String"))]
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Wake up on the table's NOTIFY trigger (a hint; polling stays the source of truth). Default true.
    #[serde(default = "yes")]
    pub listen: bool,
    /// Time a claimed batch belongs to this instance before another one may take it over.
    /// Must exceed the broker's own delivery timeout. Default 2m.
    #[cfg_attr(test, schemars(with = "String"))]
    #[serde(default = "default_lease_duration", with = "humantime_serde")]
    pub lease_duration: Duration,
    /// Time allowed on SIGTERM/SIGINT to finish the batches in flight and flush the producer. Default 10s.
    #[cfg_attr(test, schemars(with = "String"))]
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Period of the info-level summary line (published, failed, pending, oldest pending age). Default 1m.
    #[cfg_attr(test, schemars(with = "String"))]
    #[serde(default = "default_summary_interval", with = "humantime_serde")]
    pub summary_interval: Duration,
}

pub(crate) const DEFAULT_BATCH_SIZE: u32 = 2000;
pub(crate) const MAX_BATCH_SIZE: u32 = 10_000;

fn default_batch_size() -> u32 {
    DEFAULT_BATCH_SIZE
}
fn default_max_batch_bytes() -> u64 {
    8 * 1024 * 1024
}
fn default_max_in_flight_batches() -> u32 {
    2
}
fn default_poll_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_lease_duration() -> Duration {
    Duration::from_secs(120)
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_summary_interval() -> Duration {
    Duration::from_secs(60)
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: default_batch_size(),
            max_batch_bytes: default_max_batch_bytes(),
            max_in_flight_batches: default_max_in_flight_batches(),
            commit_order_guard: true,
            poll_interval: default_poll_interval(),
            listen: true,
            lease_duration: default_lease_duration(),
            shutdown_timeout: default_shutdown_timeout(),
            summary_interval: default_summary_interval(),
        }
    }
}

impl RelayConfig {
    /// Checks the section; its values are typed already, so the settings are the section.
    pub(crate) fn validate(&self) -> Result<RelayConfig, ConfigError> {
        if !(1..=MAX_BATCH_SIZE).contains(&self.batch_size) {
            return Err(invalid(
                "relay.batch_size",
                format!("must be between 1 and {MAX_BATCH_SIZE}"),
            ));
        }
        if !(1024..=1024 * 1024 * 1024).contains(&self.max_batch_bytes) {
            return Err(invalid(
                "relay.max_batch_bytes",
                "must be between 1024 (1 KiB) and 1073741824 (1 GiB)".to_owned(),
            ));
        }
        at_least(
            "relay.poll_interval",
            self.poll_interval,
            Duration::from_millis(10),
        )?;
        at_least(
            "relay.lease_duration",
            self.lease_duration,
            Duration::from_secs(1),
        )?;
        at_least(
            "relay.shutdown_timeout",
            self.shutdown_timeout,
            Duration::from_millis(1),
        )?;
        at_least(
            "relay.summary_interval",
            self.summary_interval,
            Duration::from_secs(1),
        )?;
        Ok(self.clone())
    }
}

/// `[retry]`
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Publish attempts of a row before it is dead-lettered. Default 10.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Delay before the first retry; doubles per attempt, with equal jitter (a random point in the upper half). Default 1s.
    #[cfg_attr(test, schemars(with = "String"))]
    #[serde(default = "default_initial_backoff", with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Cap of the retry delay, also of the pause after a broker or database outage. Default 5m.
    #[cfg_attr(test, schemars(with = "String"))]
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
    /// What a dead-lettered row does to the later rows of its aggregate: `park` holds them
    /// back until it is requeued (order kept), `skip` lets them pass (order explicitly broken).
    /// Default `park`.
    #[serde(default)]
    pub on_dead_letter: OnDeadLetter,
    /// Also publish a copy of every dead-lettered row to this destination (Kafka topic or AMQP
    /// exchange template, e.g. `outbox.dead.{aggregate_type}`), with headers
    /// `dead_letter_error` and `dead_letter_attempts`. The row stays dead-lettered in the table
    /// either way (the table is the record; a failed copy is logged). Default: none.
    #[serde(default)]
    pub dead_letter_destination: Option<String>,
}

fn default_max_attempts() -> u32 {
    10
}
fn default_initial_backoff() -> Duration {
    Duration::from_secs(1)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(300)
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
            on_dead_letter: OnDeadLetter::default(),
            dead_letter_destination: None,
        }
    }
}

/// `retry.on_dead_letter`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum OnDeadLetter {
    /// Later rows of the aggregate wait until the dead row is requeued.
    #[default]
    Park,
    /// Later rows of the aggregate are published; the aggregate's order is broken there.
    Skip,
}

/// `[retry]`, parsed: the policy settlement applies to failed rows.
#[derive(Debug, Clone)]
pub(crate) struct RetryPolicy {
    /// Attempts before a row is dead-lettered (at least 1).
    pub(crate) max_attempts: u32,
    pub(crate) initial_backoff: Duration,
    /// At least `initial_backoff`.
    pub(crate) max_backoff: Duration,
    pub(crate) on_dead_letter: OnDeadLetter,
    /// Where copies of dead-lettered rows go, if anywhere.
    pub(crate) dead_letter_destination: Option<Template>,
}

impl RetryPolicy {
    /// How long to wait after the `attempt`th consecutive failure (jittered).
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        backoff::delay(attempt, self.initial_backoff, self.max_backoff)
    }

    /// Whether a dead-lettered row holds back its aggregate's later rows.
    pub(crate) fn parks(&self) -> bool {
        self.on_dead_letter == OnDeadLetter::Park
    }
}

impl RetryConfig {
    /// Checks the section and parses it.
    pub(crate) fn validate(&self) -> Result<RetryPolicy, ConfigError> {
        if self.max_attempts == 0 {
            return Err(invalid("retry.max_attempts", "must be at least 1"));
        }
        at_least(
            "retry.initial_backoff",
            self.initial_backoff,
            Duration::from_millis(1),
        )?;
        if self.max_backoff < self.initial_backoff {
            return Err(invalid(
                "retry.max_backoff",
                "must be at least retry.initial_backoff",
            ));
        }
        let dead_letter_destination = self
            .dead_letter_destination
            .as_deref()
            .map(Template::parse)
            .transpose()
            .map_err(|c| invalid("retry.dead_letter_destination", c))?;
        Ok(RetryPolicy {
            max_attempts: self.max_attempts,
            initial_backoff: self.initial_backoff,
            max_backoff: self.max_backoff,
            on_dead_letter: self.on_dead_letter,
            dead_letter_destination,
        })
    }
}

/// `[retention]`
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Delete rows published longer ago than this; `"off"` keeps them. Default `7d`.
    #[cfg_attr(test, schemars(with = "String"))]
    #[serde(
        default = "default_retention_published",
        deserialize_with = "duration_or_off"
    )]
    pub published: Option<Duration>,
    /// Delete rows dead-lettered longer ago than this; `"off"` keeps them. Default `off`.
    #[cfg_attr(test, schemars(with = "String"))]
    #[serde(default, deserialize_with = "duration_or_off")]
    pub dead: Option<Duration>,
    /// How often to look for rows to delete. Default 1m.
    #[cfg_attr(test, schemars(with = "String"))]
    #[serde(default = "default_retention_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Rows per delete statement (each its own short transaction). Default 1000.
    #[serde(default = "default_retention_batch_size")]
    pub batch_size: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            published: default_retention_published(),
            dead: None,
            interval: default_retention_interval(),
            batch_size: default_retention_batch_size(),
        }
    }
}

fn default_retention_published() -> Option<Duration> {
    Some(Duration::from_secs(7 * 24 * 3600))
}
fn default_retention_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_retention_batch_size() -> u32 {
    1000
}

/// A humantime duration, or `"off"`.
fn duration_or_off<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    if text.trim().eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    humantime::parse_duration(text.trim())
        .map(Some)
        .map_err(|err| {
            serde::de::Error::custom(format!("expected a duration like \"7d\" or \"off\": {err}"))
        })
}

impl RetentionConfig {
    /// Checks the section; its values are typed already, so the settings are the section.
    pub(crate) fn validate(&self) -> Result<RetentionConfig, ConfigError> {
        at_least(
            "retention.interval",
            self.interval,
            Duration::from_millis(100),
        )?;
        if !(1..=100_000).contains(&self.batch_size) {
            return Err(invalid(
                "retention.batch_size",
                "must be between 1 and 100000",
            ));
        }
        if let Some(published) = self.published {
            at_least("retention.published", published, Duration::from_secs(1))?;
        }
        if let Some(dead) = self.dead {
            at_least("retention.dead", dead, Duration::from_secs(1))?;
        }
        Ok(self.clone())
    }
}
