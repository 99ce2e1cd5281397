//! `[broker]` (formerly `[sink]`, still accepted under that name): which broker the outbox is
//! published to, and the settings of each.

use std::time::Duration;

use serde::Deserialize;

use super::Allowed;
use super::cloudevents::{CloudEvents, CloudEventsConfig};
use super::kafka::config::{KafkaConfig, KafkaSettings};
use super::rabbitmq::config::{RabbitMqConfig, RabbitMqSettings};
use crate::constraint::{ConfigError, invalid};

/// `[broker]`: `kind` selects one of the sections below; the other may stay configured, so
/// switching brokers is one environment variable (`OUTBOX_RELAY__BROKER__KIND`).
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// `kafka`, `rabbitmq`, or `discard` (benchmarks and dry runs: marks rows without sending).
    pub kind: BrokerKind,
    /// `[broker.kafka]`, required when `kind = "kafka"`.
    pub kafka: Option<KafkaConfig>,
    /// `[broker.rabbitmq]`, required when `kind = "rabbitmq"`.
    pub rabbitmq: Option<RabbitMqConfig>,
    /// Destinations (Kafka topics, AMQP exchanges) rows may render to: exact names or
    /// `prefix*` patterns. Empty: any valid name. A row rendering another destination fails
    /// permanently (and is dead-lettered), so an application bug cannot route events anywhere.
    #[serde(default)]
    pub allowed_destinations: Vec<String>,
    /// `[broker.cloudevents]`: messages in CloudEvents binary mode (see [`CloudEventsConfig`]).
    pub cloudevents: Option<CloudEventsConfig>,
}

/// The brokers the relay can publish to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    /// Apache Kafka (or any Kafka-protocol broker).
    Kafka,
    /// RabbitMQ (AMQP 0-9-1).
    Rabbitmq,
    /// Sends nothing and counts every row as published: the database-side floor for
    /// benchmarks, and a dry run. Never use it where events matter.
    Discard,
}

/// `[broker]`, parsed: the chosen broker's settings.
#[derive(Debug)]
pub(crate) enum BrokerSettings {
    Kafka {
        settings: KafkaSettings,
        allowed: Allowed,
        cloudevents: Option<CloudEvents>,
    },
    RabbitMq {
        settings: Box<RabbitMqSettings>,
        allowed: Allowed,
        cloudevents: Option<CloudEvents>,
    },
    Discard,
}

impl BrokerSettings {
    /// `[broker.cloudevents]`, when messages are CloudEvents.
    pub(crate) fn cloudevents(&self) -> Option<&CloudEvents> {
        match self {
            Self::Kafka { cloudevents, .. } | Self::RabbitMq { cloudevents, .. } => {
                cloudevents.as_ref()
            }
            Self::Discard => None,
        }
    }
}

impl BrokerConfig {
    /// Checks the section and the chosen broker's, and parses them; `lease` is
    /// `relay.lease_duration`, which must cover the broker's own timeouts.
    pub(crate) fn validate(&self, lease: Duration) -> Result<BrokerSettings, ConfigError> {
        for (i, pattern) in self.allowed_destinations.iter().enumerate() {
            let literal = pattern.strip_suffix('*').unwrap_or(pattern);
            if literal.is_empty() && pattern != "*" || literal.contains('*') {
                return Err(invalid(
                    format!("broker.allowed_destinations[{i}]"),
                    "must be a name or a prefix followed by a single trailing *",
                ));
            }
        }
        let allowed = Allowed::new(&self.allowed_destinations);
        let cloudevents = self
            .cloudevents
            .as_ref()
            .map(CloudEventsConfig::validate)
            .transpose()?;
        Ok(match self.kind {
            BrokerKind::Kafka => {
                let kafka = self.kafka.as_ref().ok_or_else(|| {
                    invalid("broker.kafka", "is required when broker.kind = \"kafka\"")
                })?;
                BrokerSettings::Kafka {
                    settings: kafka.validate(lease)?,
                    allowed,
                    cloudevents,
                }
            }
            BrokerKind::Rabbitmq => {
                let rabbit = self.rabbitmq.as_ref().ok_or_else(|| {
                    invalid(
                        "broker.rabbitmq",
                        "is required when broker.kind = \"rabbitmq\"",
                    )
                })?;
                BrokerSettings::RabbitMq {
                    settings: Box::new(rabbit.validate(lease)?),
                    allowed,
                    cloudevents,
                }
            }
            BrokerKind::Discard => BrokerSettings::Discard,
        })
    }
}
