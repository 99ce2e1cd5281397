//! Publishing claimed rows to a broker, and the delivery contract every sink keeps.
//!
//! The set of sinks is closed, so [`Sink`] is an enum; the [`Publisher`] trait states the contract
//! and each sink implements it.

pub(crate) mod kafka;
pub(crate) mod rabbitmq;
pub(crate) mod template;

use template::Template;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use crate::outbox::OutboxRow;

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
    /// An earlier row of the same aggregate in this batch was not published, so this one was
    /// held back to keep the aggregate's order.
    #[error("held back behind an earlier event of the same aggregate")]
    HeldBack,
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
    /// The exchange does not exist (and is not declared by the relay).
    #[error("exchange {exchange:?} does not exist")]
    ExchangeNotFound { exchange: String },
    /// Not sent, or sent but unconfirmed, because the channel failed on another message of the
    /// batch; sent again on a fresh channel.
    #[error("not confirmed: the channel closed because of another message")]
    NotSent,
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
            // overflow), not an outage.
            Self::Nacked => ErrorClass::Destination,
            Self::HeldBack | Self::NotSent | Self::ProducerClosed | Self::ConfirmTimeout => {
                ErrorClass::Transient
            }
            Self::Kafka { class, .. } | Self::Amqp { class, .. } => *class,
        }
    }

    /// The row did not fail itself: it was held back or caught up in another row's failure.
    /// It is given back without an attempt and without pausing the relay.
    pub(crate) fn is_collateral(&self) -> bool {
        matches!(self, Self::HeldBack | Self::NotSent)
    }
}

/// The outcome of publishing one batch: one entry per row, in the order of the rows given.
pub(crate) type Outcomes = Vec<Result<(), PublishError>>;

/// A broker the relay publishes to.
///
/// # Delivery contract
/// - **Published means acknowledged.** `publish` resolves `Ok(())` for a row only after the broker
///   acknowledged that message durably: for Kafka, a successful delivery report from an
///   idempotent producer with `acks=all` (all in-sync replicas have it); for RabbitMQ, a positive
///   publisher confirm for a persistent, mandatory message that was not returned as unroutable.
///   Never on enqueue, on socket write, or on a timeout. The relay marks `published_at` only for
///   rows that got `Ok(())`.
/// - **At least once.** An `Err` (or a crash before the outcome is known) leaves the row
///   unpublished and it is sent again later. The message may nevertheless have reached the broker
///   (e.g. a timeout after the broker stored it), so consumers deduplicate on `event_id`, which
///   every message carries.
/// - **Order.** Rows are given in `id` order; a sink puts the messages of one aggregate on the
///   wire in that order (one Kafka partition via the key, one AMQP channel), and once a row of an
///   aggregate fails before it reached the wire, the later rows of that aggregate in the batch are
///   not sent ([`PublishError::HeldBack`]). A row the broker rejects *after* a later row of the
///   same aggregate was already accepted (possible only for broker-side rejections within one
///   batch) is the one ordering exception; see the README.
/// - **Concurrency.** A batch is published as a whole (all messages in flight, outcomes awaited
///   together), never one awaited message at a time.
/// - **Cancellation.** The relay does not cancel `publish`; shutdown waits for it up to
///   `relay.shutdown_timeout`, then abandons it and leaves the rows to be published again.
pub(crate) trait Publisher {
    /// Publishes `rows` and reports one outcome per row, in the same order.
    fn publish(&self, rows: &[OutboxRow]) -> impl Future<Output = Outcomes> + Send;

    /// Waits up to `timeout` for messages still queued in the client to be delivered.
    fn flush(&self, timeout: Duration) -> impl Future<Output = ()> + Send;
}

/// The configured sink.
#[derive(Debug)]
pub(crate) enum Sink {
    Kafka(kafka::KafkaPublisher),
    // Boxed: the AMQP session state is large and the enum lives for the whole run.
    RabbitMq(Box<rabbitmq::RabbitMqPublisher>),
    /// Acknowledges every row without sending it (benchmarks, dry runs).
    Discard,
}

impl Publisher for Sink {
    async fn publish(&self, rows: &[OutboxRow]) -> Outcomes {
        match self {
            Self::Kafka(kafka) => kafka.publish(rows).await,
            Self::RabbitMq(rabbit) => rabbit.publish(rows).await,
            Self::Discard => rows.iter().map(|_| Ok(())).collect(),
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

impl Sink {
    /// Publishes `rows` to what `destination` renders instead of the configured topic or
    /// exchange (the dead-letter destination), with the same delivery contract.
    pub(crate) async fn publish_to(&self, rows: &[OutboxRow], destination: &Template) -> Outcomes {
        match self {
            Self::Kafka(kafka) => kafka.publish_to(rows, destination).await,
            Self::RabbitMq(rabbit) => rabbit.publish_to(rows, destination).await,
            Self::Discard => rows.iter().map(|_| Ok(())).collect(),
        }
    }

    /// Where `row` goes (topic or exchange), for metrics labels.
    pub(crate) fn destination(&self, row: &OutboxRow) -> String {
        match self {
            Self::Kafka(kafka) => kafka.topic(row),
            Self::RabbitMq(rabbit) => rabbit.exchange(row),
            Self::Discard => "discard".to_owned(),
        }
    }

    /// Checks that the broker answers (for readiness while no events flow).
    pub(crate) async fn probe(&self, timeout: Duration) -> Result<(), String> {
        match self {
            Self::Kafka(kafka) => kafka
                .probe(timeout)
                .await
                .map(|_| ())
                .map_err(|err| crate::telemetry::ErrorChain(&err).to_string()),
            Self::RabbitMq(rabbit) => rabbit
                .probe(timeout)
                .await
                .map_err(|err| crate::telemetry::ErrorChain(&err).to_string()),
            Self::Discard => Ok(()),
        }
    }
}

impl fmt::Display for Sink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Kafka(_) => f.write_str("kafka"),
            Self::RabbitMq(_) => f.write_str("rabbitmq"),
            Self::Discard => f.write_str("discard"),
        }
    }
}

/// The copy of a dead-lettered row sent to the dead-letter destination: the same event, with
/// headers `dead_letter_error` (why) and `dead_letter_attempts` added. Headers that are not a
/// JSON object (one way to be dead-lettered) are replaced by those two.
pub(crate) fn dead_letter_copy(row: &OutboxRow, error: &str) -> OutboxRow {
    let mut headers: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&row.headers).unwrap_or_default();
    headers.insert("dead_letter_error".to_owned(), error.into());
    headers.insert(
        "dead_letter_attempts".to_owned(),
        row.attempts.to_string().into(),
    );
    OutboxRow {
        headers: serde_json::Value::Object(headers).to_string(),
        ..row.clone()
    }
}

/// The standard headers every message carries, then the row's own `headers` (an object; string
/// values are used as they are, other JSON values as their JSON text). Row headers that reuse a
/// standard name are skipped: the standard ones are what consumers deduplicate and route on.
pub(crate) fn headers(row: &OutboxRow) -> Result<Vec<(String, String)>, PublishError> {
    let extra: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(&row.headers).map_err(|_| PublishError::InvalidHeaders)?;
    let mut out = Vec::with_capacity(STANDARD_HEADERS.len() + extra.len());
    out.push(("event_id".to_owned(), row.event_id.to_string()));
    out.push(("event_type".to_owned(), row.event_type.clone()));
    out.push(("aggregate_type".to_owned(), row.aggregate_type.clone()));
    out.push(("aggregate_id".to_owned(), row.aggregate_id.clone()));
    for (name, value) in extra {
        if STANDARD_HEADERS.contains(&name.as_str()) {
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

/// `sink.allowed_destinations`: exact names or `prefix*` patterns; empty allows every name.
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
                constraint: "not in sink.allowed_destinations",
            })
        }
    }
}

/// Header names the relay always sets.
pub(crate) const STANDARD_HEADERS: [&str; 4] =
    ["event_id", "event_type", "aggregate_type", "aggregate_id"];

/// Generated rows for property tests: any Unicode, lengths around protocol limits, any JSON.
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
                event_id: uuid::Uuid::nil(),
                aggregate_type,
                aggregate_id,
                event_type,
                payload: payload.to_string(),
                headers: headers.to_string(),
                created_at: chrono::DateTime::from_timestamp(seconds % 10_000_000_000, 0)
                    .unwrap_or_default(),
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
            id: 1,
            event_id: uuid::Uuid::nil(),
            aggregate_type: "order".into(),
            aggregate_id: "42".into(),
            event_type: "placed".into(),
            payload: "{}".into(),
            headers: headers.into(),
            created_at: chrono::Utc::now(),
            attempts: 1,
            deferrals: 0,
            null_columns: Vec::new(),
            abandoned: false,
        }
    }

    #[test]
    fn standard_headers_come_first_and_cannot_be_overridden() {
        let h = headers(&row(r#"{"trace": "abc", "n": 3, "event_id": "forged"}"#)).unwrap();
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
        assert_eq!(h[0].1, uuid::Uuid::nil().to_string());
        assert_eq!(h[4].1, "3");
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
        let err = headers(&row("[1,2]")).unwrap_err();
        assert_eq!(err.class(), ErrorClass::Permanent);
    }
}
