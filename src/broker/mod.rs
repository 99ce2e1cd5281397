//! The brokers: producing the outbox's rows as messages now, consuming into an inbox next.
//!
//! The set of brokers is closed, so [`Broker`] is an enum dispatched here, at the edge; the
//! [`Producer`] trait states the delivery contract every broker keeps when producing, and is
//! the seam the outbox relay is written against. Each broker's module owns its configuration
//! section and its error classification.

pub(crate) mod cloudevents;
pub(crate) mod config;
pub(crate) mod consumer;
pub(crate) mod kafka;
pub(crate) mod rabbitmq;
pub(crate) mod template;

use cloudevents::{Binding, CloudEvents};
use config::BrokerSettings;
use template::Template;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::future::Future;
use std::time::Duration;

use crate::outbox::{Layout, OutboxRow};

/// How the relay treats a failed publish; decided once, where the broker's error is converted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorClass {
    /// Not the row's fault (broker down, timeout, leader change, connection loss): the relay
    /// pauses with backoff and the row keeps its attempts.
    Transient,
    /// The row cannot be published as it is (too large, invalid or unknown destination, denied):
    /// it uses up an attempt and, after `retry.max_attempts`, is dead-lettered.
    Permanent,
    /// The producer itself is unusable (e.g. fatal idempotence error): handled like a transient
    /// error for the rows, and logged as an error.
    Fatal,
    /// The row's destination is in trouble, not the broker and not the row (a queue full with
    /// `x-overflow = reject-publish`, no authorization for that topic or exchange): the row
    /// backs off without using up an attempt, the relay does not pause, and rows for other
    /// destinations keep flowing.
    Destination,
}

impl ErrorClass {
    /// The `class` label of `outbox_relay_publish_errors_total`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Transient => "transient",
            Self::Permanent => "permanent",
            Self::Fatal => "fatal",
            Self::Destination => "destination",
        }
    }
}

/// Why one row was not published.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PublishError {
    /// The destination rendered from the row is not a valid topic / exchange / routing key.
    #[error("invalid destination {destination:?}: {constraint}")]
    InvalidDestination {
        destination: String,
        constraint: &'static str,
    },
    /// A value the row renders into an AMQP short string (a header name, the `type` property)
    /// is over the protocol's 255 bytes.
    #[error("{what} of {len} bytes does not fit an AMQP short string (at most 255 bytes)")]
    TooLongForAmqp { what: &'static str, len: usize },
    /// The message's properties (its headers, mostly) make a content-header frame over the
    /// frame size negotiated with the broker; AMQP cannot split that frame.
    #[error(
        "AMQP properties of {size} bytes (the headers, mostly) exceed the broker's frame_max of {frame_max} bytes"
    )]
    HeaderFrameTooLarge { size: usize, frame_max: usize },
    /// The row's `headers` column is not a JSON object.
    #[error("headers column is not a JSON object")]
    InvalidHeaders,
    /// The Kafka producer reported an error for this message.
    #[error("kafka delivery failed")]
    Kafka {
        class: ErrorClass,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// The producer went away before reporting (only during shutdown).
    #[error("producer closed before the delivery report")]
    ProducerClosed,
    /// An AMQP connection or channel error.
    #[error("amqp error")]
    Amqp {
        class: ErrorClass,
        #[source]
        source: lapin::Error,
    },
    /// The broker returned the mandatory message: no queue is bound for its routing key.
    #[error("unroutable: the broker returned the message ({reply_code} {reply_text})")]
    Unroutable { reply_code: u16, reply_text: String },
    /// The broker negatively acknowledged the message (e.g. a full queue with reject-publish).
    #[error("the broker nacked the message")]
    Nacked,
    /// No confirm within `confirm_timeout` (broker blocked by a resource alarm, or stalled).
    #[error("no publisher confirm within the confirm timeout")]
    ConfirmTimeout,
    /// The message is larger than the broker accepts.
    #[error("message of {size} bytes exceeds the broker's max_message_size of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    /// The topic's partition count is not the one recorded: publishing to it is paused until
    /// an operator accepts the new count (`broker::kafka::partitions`).
    #[error(
        "topic {topic}'s partition count changed from {recorded} to {current}: paused until `outbox-relay partitions --accept {topic}`"
    )]
    PartitionsChanged {
        topic: String,
        recorded: i32,
        current: i32,
    },
    /// The exchange does not exist (and is not declared by the relay).
    #[error("exchange {exchange:?} does not exist")]
    ExchangeNotFound { exchange: String },
}

impl PublishError {
    /// The classification the relay acts on.
    pub(crate) fn class(&self) -> ErrorClass {
        match self {
            Self::InvalidDestination { .. }
            | Self::InvalidHeaders
            | Self::TooLongForAmqp { .. }
            | Self::HeaderFrameTooLarge { .. }
            | Self::Unroutable { .. }
            | Self::TooLarge { .. }
            | Self::ExchangeNotFound { .. } => ErrorClass::Permanent,
            // A nack is the broker's answer for this message's queue (reject-publish
            // overflow), not an outage; a topic paused for its partition count waits for an
            // operator, and the other topics flow.
            Self::Nacked | Self::PartitionsChanged { .. } => ErrorClass::Destination,
            Self::ProducerClosed | Self::ConfirmTimeout => ErrorClass::Transient,
            Self::Kafka { class, .. } | Self::Amqp { class, .. } => *class,
        }
    }
}

/// What became of one row given to [`Producer::publish`].
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The broker durably took the message (see the delivery contract).
    Acked,
    /// The message failed; the error's class says what the relay does about it.
    Failed(PublishError),
    /// Not attempted, or sent with its fate unknown, because of another row: given back
    /// without using an attempt and without pausing the relay.
    NotAttempted(NotAttempted),
}

/// Why a row was not attempted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotAttempted {
    /// An earlier row of its aggregate in this batch failed before reaching the wire: sending
    /// this one would let it overtake that row ([`HoldBack`]).
    HeldBack,
    /// The channel it was (or would have been) sent on was closed by another message's
    /// failure; it goes out again on a fresh channel.
    ChannelLost,
}

/// The outcome of publishing one batch: one entry per row, in the order of the rows given.
pub(crate) type Outcomes = Vec<Outcome>;

impl From<Result<(), PublishError>> for Outcome {
    fn from(result: Result<(), PublishError>) -> Self {
        match result {
            Ok(()) => Self::Acked,
            Err(err) => Self::Failed(err),
        }
    }
}

/// Keeps an aggregate's order within a batch, for every broker: once a row failed before it
/// reached the wire, the later rows of its aggregate are not sent.
#[derive(Debug, Default)]
pub(crate) struct HoldBack<'r> {
    /// Aggregates with a row that failed before reaching the wire.
    stopped: HashSet<&'r str>,
}

impl<'r> HoldBack<'r> {
    /// Whether `row` must wait behind an earlier row of its aggregate.
    pub(crate) fn holds(&self, row: &OutboxRow) -> bool {
        self.stopped.contains(row.aggregate_id.as_str())
    }

    /// Records that `row` did not reach the wire: its aggregate's later rows wait.
    pub(crate) fn stop(&mut self, row: &'r OutboxRow) {
        self.stopped.insert(&row.aggregate_id);
    }
}

/// A broker the relay produces to.
///
/// # Delivery contract
/// - **Published means acknowledged.** `publish` reports [`Outcome::Acked`] for a row only after the broker
///   acknowledged that message durably: for Kafka, a successful delivery report from an
///   idempotent producer with `acks=all` (all in-sync replicas have it); for RabbitMQ, a positive
///   publisher confirm for a persistent, mandatory message that was not returned as unroutable.
///   Never on enqueue, on socket write, or on a timeout. The relay marks `published_at` only for
///   rows that got `Acked`.
/// - **At least once.** Any other outcome (or a crash before the outcome is known) leaves the row
///   unpublished and it is sent again later. The message may nevertheless have reached the broker
///   (e.g. a timeout after the broker stored it), so consumers deduplicate on `event_id`, which
///   every message carries.
/// - **Order.** Rows are given in `id` order; a producer puts the messages of one aggregate on the
///   wire in that order (one Kafka partition via the key, one AMQP channel), and once a row of an
///   aggregate fails before it reached the wire, the later rows of that aggregate in the batch are
///   not sent ([`NotAttempted::HeldBack`], kept by [`HoldBack`]). A row the broker rejects *after* a later row of the
///   same aggregate was already accepted (possible only for broker-side rejections within one
///   batch) is the one ordering exception; see the README.
/// - **Concurrency.** A batch is published as a whole (all messages in flight, outcomes awaited
///   together), never one awaited message at a time.
/// - **Cancellation.** The relay does not cancel `publish`; shutdown waits for it up to
///   `relay.shutdown_timeout`, then abandons it and leaves the rows to be published again.
pub(crate) trait Producer: Send + Sync {
    /// The broker's name, for logs and the `sink` metric label.
    fn name(&self) -> &'static str;

    /// Publishes `rows` to their configured destinations and reports one outcome per row, in
    /// the same order.
    fn publish(&self, rows: &[OutboxRow]) -> impl Future<Output = Outcomes> + Send;

    /// Publishes `rows` to what `destination` renders instead (the dead-letter destination),
    /// with the same contract.
    fn publish_to(
        &self,
        rows: &[OutboxRow],
        destination: &Template,
    ) -> impl Future<Output = Outcomes> + Send;

    /// Where `row` goes (topic or exchange), for metric labels.
    fn destination(&self, row: &OutboxRow) -> String;

    /// Checks that the broker answers (for readiness while no events flow).
    fn probe(&self, timeout: Duration) -> impl Future<Output = Result<(), ProbeError>> + Send;

    /// Waits up to `timeout` for messages still queued in the client to be delivered.
    fn flush(&self, timeout: Duration) -> impl Future<Output = ()> + Send;
}

/// The broker did not answer a probe.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProbeError {
    #[error("kafka metadata request failed")]
    Kafka(#[source] rdkafka::error::KafkaError),
    #[error("amqp session could not be opened")]
    Amqp(#[source] PublishError),
}

/// The configured broker.
#[derive(Debug)]
pub(crate) enum Broker {
    Kafka(kafka::KafkaProducer),
    // Boxed: the AMQP session state is large and the enum lives for the whole run.
    RabbitMq(Box<rabbitmq::RabbitMqProducer>),
    /// Acknowledges every row without sending it (benchmarks, dry runs).
    Discard,
}

impl Broker {
    /// The producer `settings` describe, sending messages in `layout`'s shape;
    /// `connection_name` identifies the relay to the broker where it shows one (RabbitMQ's
    /// management UI). Nothing connects yet.
    pub(crate) fn new(
        settings: &BrokerSettings,
        layout: Layout,
        connection_name: String,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let shape = Shape {
            layout,
            cloudevents: settings.cloudevents().cloned(),
        };
        Ok(match settings {
            BrokerSettings::Kafka {
                settings, allowed, ..
            } => Self::Kafka(kafka::KafkaProducer::new(settings, allowed.clone(), shape)?),
            BrokerSettings::RabbitMq {
                settings, allowed, ..
            } => Self::RabbitMq(Box::new(rabbitmq::RabbitMqProducer::new(
                settings,
                connection_name,
                allowed.clone(),
                shape,
            ))),
            BrokerSettings::Discard => Self::Discard,
        })
    }
}

impl Producer for Broker {
    fn name(&self) -> &'static str {
        match self {
            Self::Kafka(_) => "kafka",
            Self::RabbitMq(_) => "rabbitmq",
            Self::Discard => "discard",
        }
    }

    async fn publish(&self, rows: &[OutboxRow]) -> Outcomes {
        match self {
            Self::Kafka(kafka) => kafka.publish(rows).await,
            Self::RabbitMq(rabbit) => rabbit.publish(rows).await,
            Self::Discard => rows.iter().map(|_| Outcome::Acked).collect(),
        }
    }

    async fn publish_to(&self, rows: &[OutboxRow], destination: &Template) -> Outcomes {
        match self {
            Self::Kafka(kafka) => kafka.publish_to(rows, destination).await,
            Self::RabbitMq(rabbit) => rabbit.publish_to(rows, destination).await,
            Self::Discard => rows.iter().map(|_| Outcome::Acked).collect(),
        }
    }

    fn destination(&self, row: &OutboxRow) -> String {
        match self {
            Self::Kafka(kafka) => kafka.topic(row),
            Self::RabbitMq(rabbit) => rabbit.exchange(row),
            Self::Discard => "discard".to_owned(),
        }
    }

    async fn probe(&self, timeout: Duration) -> Result<(), ProbeError> {
        match self {
            Self::Kafka(kafka) => kafka
                .probe(timeout)
                .await
                .map(|_| ())
                .map_err(ProbeError::Kafka),
            Self::RabbitMq(rabbit) => rabbit.probe(timeout).await.map_err(ProbeError::Amqp),
            Self::Discard => Ok(()),
        }
    }

    async fn flush(&self, timeout: Duration) {
        match self {
            Self::Kafka(kafka) => kafka.flush(timeout).await,
            Self::RabbitMq(rabbit) => rabbit.flush(timeout).await,
            Self::Discard => {}
        }
    }
}

impl fmt::Display for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a message carries besides its value: the layout's standard headers
/// ([`Layout::standard_headers`]), the CloudEvents attributes when configured, the headers
/// from columns of their own, then the row's `headers` column.
#[derive(Debug, Clone, Default)]
pub(crate) struct Shape {
    /// `database.layout`.
    pub(crate) layout: Layout,
    /// `[broker.cloudevents]`.
    pub(crate) cloudevents: Option<CloudEvents>,
}

impl Shape {
    /// The headers of `row`'s message on `binding`. The row's `headers` column is an object;
    /// string values are used as they are, other JSON values as their JSON text. Column and row
    /// headers that reuse a standard or CloudEvents name are skipped: those are what consumers
    /// deduplicate and route on.
    pub(crate) fn headers(
        &self,
        row: &OutboxRow,
        binding: Binding,
    ) -> Result<Vec<(String, String)>, PublishError> {
        let extra: BTreeMap<String, serde_json::Value> =
            serde_json::from_str(&row.headers).map_err(|_| PublishError::InvalidHeaders)?;
        let standard = self.layout.standard_names();
        let owned = |name: &str| {
            standard.contains(&name)
                || self
                    .cloudevents
                    .as_ref()
                    .is_some_and(|ce| ce.owns(name, binding))
        };
        let mut out = Vec::with_capacity(standard.len() + row.column_headers.len() + extra.len());
        for (name, value) in self.layout.standard_headers(row) {
            out.push((name.to_owned(), value));
        }
        if let Some(cloudevents) = &self.cloudevents {
            out.extend(cloudevents.headers(row, binding));
        }
        for (name, value) in &row.column_headers {
            if !owned(name) {
                out.push((name.to_string(), value.clone()));
            }
        }
        for (name, value) in extra {
            if owned(&name) {
                continue;
            }
            let value = match value {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            out.push((name, value));
        }
        Ok(out)
    }
}

/// `broker.allowed_destinations`: exact names or `prefix*` patterns; empty allows every name.
#[derive(Debug, Clone, Default)]
pub(crate) struct Allowed(Vec<String>);

impl Allowed {
    pub(crate) fn new(patterns: &[String]) -> Self {
        Self(patterns.to_vec())
    }

    /// `Err` when `destination` matches no pattern.
    pub(crate) fn check(&self, destination: &str) -> Result<(), PublishError> {
        let allowed = self.0.is_empty()
            || self.0.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => destination.starts_with(prefix),
                None => destination == p,
            });
        if allowed {
            Ok(())
        } else {
            Err(PublishError::InvalidDestination {
                destination: destination.to_owned(),
                constraint: "not in broker.allowed_destinations",
            })
        }
    }
}

/// Generated rows for property tests: any Unicode, lengths around protocol limits, any JSON.
/// The configured broker the inbox consumes from.
#[derive(Debug)]
pub(crate) enum Inbound {
    Kafka(Box<kafka::consumer::KafkaConsumer>),
    RabbitMq(Box<rabbitmq::consumer::RabbitMqConsumer>),
}

impl Inbound {
    /// `kafka` or `rabbitmq`, for logs and the `from` metric label.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Kafka(_) => "kafka",
            Self::RabbitMq(_) => "rabbitmq",
        }
    }
}

impl fmt::Display for Inbound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl consumer::Consumer for Inbound {
    async fn next(
        &mut self,
        wait: Duration,
    ) -> Result<Option<consumer::Delivery>, consumer::ConsumeError> {
        match self {
            Self::Kafka(kafka) => kafka.next(wait).await,
            Self::RabbitMq(rabbit) => rabbit.next(wait).await,
        }
    }

    async fn acknowledge(
        &mut self,
        receipts: &[consumer::Receipt],
    ) -> Result<(), consumer::ConsumeError> {
        match self {
            Self::Kafka(kafka) => kafka.acknowledge(receipts).await,
            Self::RabbitMq(rabbit) => rabbit.acknowledge(receipts).await,
        }
    }

    async fn reconnect(&mut self) -> Result<(), consumer::ConsumeError> {
        match self {
            Self::Kafka(kafka) => kafka.reconnect().await,
            Self::RabbitMq(rabbit) => rabbit.reconnect().await,
        }
    }

    async fn close(&mut self) {
        match self {
            Self::Kafka(kafka) => kafka.close().await,
            Self::RabbitMq(rabbit) => rabbit.close().await,
        }
    }
}

#[cfg(test)]
pub(crate) mod arbitrary {
    use crate::outbox::OutboxRow;
    use proptest::collection::{btree_map, vec};
    use proptest::prelude::*;
    use serde_json::Value;

    /// Any Unicode (control characters included), and lengths around the 255-byte limit.
    pub(crate) fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            vec(any::<char>(), 0..40).prop_map(String::from_iter),
            (250usize..=260).prop_map(|n| "x".repeat(n)),
            (120usize..=130).prop_map(|n| "é".repeat(n)),
            vec(any::<char>(), 200..400).prop_map(String::from_iter),
        ]
    }

    pub(crate) fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            text().prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 5, |inner| {
            prop_oneof![
                vec(inner.clone(), 0..4).prop_map(Value::Array),
                btree_map(text(), inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    pub(crate) fn row() -> impl Strategy<Value = OutboxRow> {
        (text(), text(), text(), json(), json(), any::<i64>()).prop_map(
            |(aggregate_type, aggregate_id, event_type, payload, headers, seconds)| OutboxRow {
                id: 1,
                event_id: uuid::Uuid::nil().to_string(),
                aggregate_type,
                aggregate_id,
                event_type,
                payload: crate::outbox::Payload::Json(payload.to_string()),
                headers: headers.to_string(),
                column_headers: Vec::new(),
                created_at: chrono::DateTime::from_timestamp(seconds % 10_000_000_000, 0),
                null_columns: Vec::new(),
                attempts: 1,
                deferrals: 0,
                abandoned: false,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(headers: &str) -> OutboxRow {
        OutboxRow {
            headers: headers.into(),
            ..OutboxRow::sample(1, "42")
        }
    }

    #[test]
    fn standard_headers_come_first_and_cannot_be_overridden() {
        let h = Shape::default()
            .headers(
                &row(r#"{"trace": "abc", "n": 3, "event_id": "forged"}"#),
                Binding::Kafka,
            )
            .unwrap();
        let names: Vec<&str> = h.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "event_id",
                "event_type",
                "aggregate_type",
                "aggregate_id",
                "n",
                "trace"
            ]
        );
        assert_eq!(h[0].1, uuid::Uuid::from_u128(1).to_string());
        assert_eq!(h[4].1, "3");
    }

    #[test]
    fn the_debezium_layout_sends_one_standard_header_then_column_headers() {
        let mut row = row(r#"{"id": "forged", "trace": "abc"}"#);
        row.column_headers = vec![("eventType".into(), "placed".to_owned())];
        let shape = Shape {
            layout: Layout::Debezium,
            cloudevents: None,
        };
        let h = shape.headers(&row, Binding::Kafka).unwrap();
        assert_eq!(
            h,
            [
                ("id".to_owned(), uuid::Uuid::from_u128(1).to_string()),
                ("eventType".to_owned(), "placed".to_owned()),
                ("trace".to_owned(), "abc".to_owned()),
            ]
        );
    }

    #[test]
    fn destinations_outside_the_allow_list_fail_permanently() {
        let allowed = Allowed::new(&["outbox.event.*".to_owned(), "audit".to_owned()]);
        assert!(allowed.check("outbox.event.order").is_ok());
        assert!(allowed.check("audit").is_ok());
        let err = allowed.check("__consumer_offsets").unwrap_err();
        assert_eq!(err.class(), ErrorClass::Permanent);
        assert!(allowed.check("auditx").is_err());
        assert!(Allowed::default().check("anything").is_ok());
    }

    #[test]
    fn non_object_headers_are_a_permanent_error() {
        let err = Shape::default()
            .headers(&row("[1,2]"), Binding::Amqp)
            .unwrap_err();
        assert_eq!(err.class(), ErrorClass::Permanent);
    }
}
