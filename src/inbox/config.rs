//! `[inbox]`: the section as written, with `[inbox.kafka]` and `[inbox.rabbitmq]` (owned by the
//! brokers' consumers), and the settings it parses into.

use std::time::Duration;

use serde::Deserialize;

use super::Rules;
use crate::broker::kafka::consumer::{InboxKafkaConfig, KafkaConsumerSettings};
use crate::broker::rabbitmq::consumer::{InboxRabbitMqConfig, RabbitMqConsumerSettings};
use crate::constraint::{ConfigError, at_least, invalid};
use crate::database::postgres::Table;

/// `[inbox]`
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct InboxConfig {
    /// Inbox table, optionally schema-qualified; `<table>_rejected` beside it. Default `inbox`.
    #[serde(default = "default_table")]
    pub table: String,
    /// The consuming service's name: recorded in every row, part of the dedupe key, and the
    /// Kafka group id unless `inbox.kafka.group_id` is set. Required.
    pub consumer: String,
    /// The broker consumed from: `"kafka"` or `"rabbitmq"`. Required.
    pub from: From,
    /// A larger message (body, key and headers) is rejected. Default 16 MiB.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// A message without an event id: `"reject"` it (to `<table>_rejected`), or `"derive"` one
    /// from its Kafka position (`topic/partition/offset`). Default "reject".
    #[serde(default)]
    pub missing_event_id: MissingEventId,
    /// Most messages written in one transaction. Default 1000.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Most message bytes (body, key and headers) in one batch: it is written once it holds
    /// this many, so the memory a batch takes is bounded whatever the messages' sizes (a single
    /// larger message is a batch of its own). Default 8 MiB.
    #[serde(default = "default_max_batch_bytes")]
    pub max_batch_bytes: usize,
    /// How long a batch waits for more messages after its first before it is written.
    /// Default 5ms.
    #[cfg_attr(test, schemars(with = "String"))]
    #[serde(default = "default_batch_wait", with = "humantime_serde")]
    pub batch_wait: Duration,
    /// Rows the application marked `processed_at` are deleted this long after; `"0s"` keeps
    /// them forever. Deleting a row reopens its event id to a duplicate, so keep it longer
    /// than the broker can redeliver (topic retention, queue TTL). Default 7 days.
    #[cfg_attr(test, schemars(with = "String"))]
    #[serde(default = "default_keep_processed", with = "humantime_serde")]
    pub keep_processed: Duration,
    /// `[inbox.kafka]`, required with `from = "kafka"`.
    pub kafka: Option<InboxKafkaConfig>,
    /// `[inbox.rabbitmq]`, required with `from = "rabbitmq"`.
    pub rabbitmq: Option<InboxRabbitMqConfig>,
}

/// `inbox.from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum From {
    Kafka,
    Rabbitmq,
}

/// `inbox.missing_event_id`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum MissingEventId {
    #[default]
    Reject,
    Derive,
}

pub(crate) const DEFAULT_TABLE: &str = "inbox";

fn default_table() -> String {
    DEFAULT_TABLE.to_owned()
}
fn default_max_message_bytes() -> usize {
    16 * 1024 * 1024
}
fn default_batch_size() -> usize {
    1000
}
fn default_max_batch_bytes() -> usize {
    8 * 1024 * 1024
}
fn default_batch_wait() -> Duration {
    Duration::from_millis(5)
}
fn default_keep_processed() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

/// The broker the inbox consumes from, parsed.
#[derive(Debug)]
pub(crate) enum Source {
    Kafka(KafkaConsumerSettings),
    RabbitMq(RabbitMqConsumerSettings),
}

/// `[inbox]`, parsed.
#[derive(Debug)]
pub(crate) struct InboxSettings {
    pub(crate) table: Table,
    pub(crate) consumer: String,
    pub(crate) source: Source,
    pub(crate) rules: Rules,
    pub(crate) batch_size: usize,
    pub(crate) max_batch_bytes: usize,
    pub(crate) batch_wait: Duration,
    /// `None`: processed rows are kept forever.
    pub(crate) keep_processed: Option<Duration>,
}

impl InboxConfig {
    /// Checks the section and parses it; `outbox_table` is the outbox's, which the inbox must
    /// not share.
    pub(crate) fn validate(
        &self,
        outbox_table: Option<&Table>,
    ) -> Result<InboxSettings, ConfigError> {
        let table = Table::parse(&self.table).map_err(|c| invalid("inbox.table", c))?;
        if outbox_table == Some(&table) {
            return Err(invalid(
                "inbox.table",
                "must differ from database.table (the outbox)",
            ));
        }
        if self.consumer.trim().is_empty()
            || self.consumer.len() > 255
            || self.consumer.contains('\0')
        {
            return Err(invalid(
                "inbox.consumer",
                "is required: the consuming service's name, 1 to 255 bytes",
            ));
        }
        if !(1..=1024 * 1024 * 1024).contains(&self.max_message_bytes) {
            return Err(invalid(
                "inbox.max_message_bytes",
                "must be between 1 and 1073741824 (PostgreSQL's largest value)",
            ));
        }
        if !(1..=50_000).contains(&self.batch_size) {
            return Err(invalid("inbox.batch_size", "must be between 1 and 50000"));
        }
        if !(1024..=1024 * 1024 * 1024).contains(&self.max_batch_bytes) {
            return Err(invalid(
                "inbox.max_batch_bytes",
                "must be between 1024 and 1073741824",
            ));
        }
        if self.batch_wait > Duration::from_secs(10) {
            return Err(invalid("inbox.batch_wait", "must be at most 10s"));
        }
        let keep_processed = (!self.keep_processed.is_zero()).then_some(self.keep_processed);
        if let Some(keep) = keep_processed {
            at_least("inbox.keep_processed", keep, Duration::from_secs(60))?;
        }
        let source = match self.from {
            From::Kafka => {
                if self.rabbitmq.is_some() {
                    return Err(invalid(
                        "inbox.rabbitmq",
                        "is set but inbox.from = \"kafka\"",
                    ));
                }
                let kafka = self.kafka.as_ref().ok_or_else(|| {
                    invalid("inbox.kafka", "is required with inbox.from = \"kafka\"")
                })?;
                Source::Kafka(kafka.validate(&self.consumer)?)
            }
            From::Rabbitmq => {
                if self.kafka.is_some() {
                    return Err(invalid(
                        "inbox.kafka",
                        "is set but inbox.from = \"rabbitmq\"",
                    ));
                }
                let rabbit = self.rabbitmq.as_ref().ok_or_else(|| {
                    invalid(
                        "inbox.rabbitmq",
                        "is required with inbox.from = \"rabbitmq\"",
                    )
                })?;
                Source::RabbitMq(rabbit.validate(self.batch_size)?)
            }
        };
        // A batch never waits for deliveries the broker holds back until the batch before is
        // acknowledged: at most half the window, so the other half arrives while one is written.
        let batch_size = match &source {
            Source::RabbitMq(rabbit) => self.batch_size.min((rabbit.window() / 2).max(1)),
            Source::Kafka(_) => self.batch_size,
        };
        Ok(InboxSettings {
            table,
            consumer: self.consumer.clone(),
            source,
            rules: Rules {
                max_message_bytes: self.max_message_bytes,
                missing_event_id: self.missing_event_id,
            },
            batch_size,
            max_batch_bytes: self.max_batch_bytes,
            batch_wait: self.batch_wait,
            keep_processed,
        })
    }
}
