//! Kafka: an idempotent rdkafka producer with `acks=all`; its configuration section and
//! property policy are in [`config`].

pub(crate) mod config;
pub(crate) mod consumer;
pub(crate) mod partitions;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tokio_util::sync::CancellationToken;

use super::cloudevents::Binding;
use super::template::Template;
use super::{Allowed, ErrorClass, HoldBack, NotAttempted, Outcome, Outcomes, PublishError, Shape};
use crate::outbox::OutboxRow;
use config::KafkaSettings;
use partitions::{Ledger, Partitions};

/// Routes librdkafka's own log lines and global errors to debug level: a broker that is down
/// would otherwise log several error lines per second, while the relay reports the outage once
/// (when it starts and when it ends) from the delivery reports.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QuietContext;

impl ClientContext for QuietContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        tracing::debug!(target: "librdkafka", ?level, facility = fac, "{log_message}");
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(target: "librdkafka", error = %error, "{reason}");
    }
}

/// Publishes rows as Kafka messages: key `aggregate_id`, value the payload, headers the event's
/// identity plus the row's own headers.
pub(crate) struct KafkaProducer {
    /// Shared handle; rdkafka runs its own polling thread that resolves delivery futures.
    /// Replaced after a fatal error (see [`KafkaProducer::recover_from_fatal`]).
    producer: std::sync::RwLock<FutureProducer<QuietContext>>,
    /// The settings the producer was created with, to create it again.
    client: ClientConfig,
    /// Topic template rendered per row.
    topic: Template,
    /// Topics rows may render to.
    allowed: Allowed,
    /// What messages carry besides their value.
    shape: Shape,
    /// The topics' partition-count state (and how the check runs): a paused topic's rows
    /// are refused.
    partitions: Arc<Partitions>,
}

impl fmt::Debug for KafkaProducer {
    // ClientConfig's Debug shows most properties, and some may be secrets: show none.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaProducer")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl KafkaProducer {
    /// Creates the producer from settings librdkafka already checked (no connection is made
    /// yet); an error here means the client could not be created (e.g. no thread).
    pub(crate) fn new(
        settings: &KafkaSettings,
        allowed: Allowed,
        shape: Shape,
    ) -> Result<Self, KafkaError> {
        let client = settings.client.clone();
        let topic = settings.topic.clone();
        let producer = client.create_with_context(QuietContext)?;
        Ok(Self {
            partitions: Arc::new(Partitions::new(
                settings.partition_check_interval,
                settings.on_partition_change,
            )),
            producer: std::sync::RwLock::new(producer),
            client,
            topic,
            allowed,
            shape,
        })
    }

    fn producer(&self) -> FutureProducer<QuietContext> {
        self.producer
            .read()
            .expect("producer lock poisoned")
            .clone()
    }

    /// An idempotent producer that hit a fatal error (e.g. the broker lost its producer state
    /// in a way an epoch bump cannot repair) fails every later message. The relay then makes
    /// a new producer, with a new producer id; the batch's rows were left unpublished and go
    /// out again on it (the old producer's unacknowledged messages may be duplicates).
    ///
    /// The same goes for a producer the broker keeps refusing as fenced or with a stale epoch
    /// (`ProducerFenced`, `InvalidProducerEpoch`) without librdkafka raising a fatal error:
    /// seen with tansu after a connection stopped answering mid-batch, every later batch was
    /// refused. Any fatal-class outcome therefore replaces the producer.
    fn recover_from_fatal(&self, producer: &FutureProducer<QuietContext>) {
        let (code, reason) = producer.client().fatal_error().unwrap_or((
            RDKafkaErrorCode::ProducerFenced,
            "the broker refused the producer's id or epoch".to_owned(),
        ));
        match self.client.create_with_context(QuietContext) {
            Ok(fresh) => {
                tracing::error!(error = %code, reason = %reason, "kafka producer hit a fatal error; replaced it with a new producer");
                *self.producer.write().expect("producer lock poisoned") = fresh;
            }
            Err(err) => {
                tracing::error!(error = %err, reason = %reason, "kafka producer hit a fatal error and could not be recreated; retrying later");
            }
        }
    }

    /// The check of the topics' partition counts against `ledger` ([`partitions::watch`]),
    /// until `shutdown`: run it beside the relay. Until its first round has ended, nothing is
    /// sent (for at most 15 s).
    pub(crate) fn partition_check<L: Ledger>(
        &self,
        ledger: L,
        shutdown: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        partitions::watch(
            Arc::clone(&self.partitions),
            ledger,
            self.client.clone(),
            shutdown,
        )
    }

    /// The topic `row` goes to.
    pub(crate) fn topic(&self, row: &OutboxRow) -> String {
        self.topic.render(row)
    }

    /// Asks the cluster for its metadata: proves the brokers are reachable.
    pub(crate) async fn probe(&self, timeout: Duration) -> Result<Vec<String>, KafkaError> {
        let producer = self.producer();
        tokio::task::spawn_blocking(move || {
            producer.client().fetch_metadata(None, timeout).map(|m| {
                m.brokers()
                    .iter()
                    .map(|b| format!("{}:{}", b.host(), b.port()))
                    .collect()
            })
        })
        .await
        .map_err(|_| KafkaError::Canceled)?
    }
}

impl KafkaProducer {
    /// [`super::Producer::publish`].
    pub(crate) async fn publish(&self, rows: &[OutboxRow]) -> Outcomes {
        self.publish_to(rows, &self.topic).await
    }

    /// [`super::Producer::flush`].
    pub(crate) async fn flush(&self, timeout: Duration) {
        let producer = self.producer();
        let flushed = tokio::task::spawn_blocking(move || producer.flush(timeout)).await;
        if let Ok(Err(err)) = flushed {
            tracing::warn!(error = %err, "kafka producer flush did not complete");
        }
    }
}

impl KafkaProducer {
    /// [`super::Producer::publish_to`]: to the topics `topic` renders (the configured
    /// template, or the dead-letter destination).
    pub(crate) async fn publish_to(&self, rows: &[OutboxRow], topic: &Template) -> Outcomes {
        self.partitions.first_check().await;
        let producer = self.producer();
        let mut outcomes: Vec<Option<Outcome>> = rows.iter().map(|_| None).collect();
        let mut in_flight: Vec<(usize, DeliveryFuture)> = Vec::with_capacity(rows.len());
        let mut awaited = 0;
        let mut hold_back = HoldBack::default();

        for (index, row) in rows.iter().enumerate() {
            if hold_back.holds(row) {
                outcomes[index] = Some(Outcome::NotAttempted(NotAttempted::HeldBack));
                continue;
            }
            match self
                .enqueue(
                    &producer,
                    row,
                    topic,
                    &mut in_flight,
                    &mut awaited,
                    &mut outcomes,
                )
                .await
            {
                Ok(delivery) => in_flight.push((index, delivery)),
                Err(err) => {
                    hold_back.stop(row);
                    outcomes[index] = Some(Outcome::Failed(err));
                }
            }
        }
        for (index, delivery) in in_flight.drain(awaited..) {
            outcomes[index] = Some(delivery_outcome(delivery.await));
        }
        let outcomes: Outcomes = outcomes
            .into_iter()
            .map(|o| o.expect("every row has an outcome"))
            .collect();
        if outcomes
            .iter()
            .any(|o| matches!(o, Outcome::Failed(e) if e.class() == ErrorClass::Fatal))
        {
            self.recover_from_fatal(&producer);
        }
        outcomes
    }

    /// Hands one message to librdkafka. When its queue is full, waits for the oldest delivery
    /// still in flight (recording its outcome) and tries again.
    async fn enqueue(
        &self,
        producer: &FutureProducer<QuietContext>,
        row: &OutboxRow,
        topic: &Template,
        in_flight: &mut [(usize, DeliveryFuture)],
        awaited: &mut usize,
        outcomes: &mut [Option<Outcome>],
    ) -> Result<DeliveryFuture, PublishError> {
        let topic = topic.render(row);
        validate_topic(&topic)?;
        self.allowed.check(&topic)?;
        self.partitions.admit(&topic)?;
        let mut kafka_headers = OwnedHeaders::new();
        for (name, value) in self.shape.headers(row, Binding::Kafka)? {
            kafka_headers = kafka_headers.insert(Header {
                key: &name,
                value: Some(value.as_bytes()),
            });
        }
        let mut record = record(&topic, row, kafka_headers);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned))
                    if *awaited < in_flight.len() =>
                {
                    record = returned;
                    let (index, delivery) = &mut in_flight[*awaited];
                    outcomes[*index] = Some(delivery_outcome(delivery.await));
                    *awaited += 1;
                }
                Err((source, _)) => {
                    return Err(PublishError::Kafka {
                        class: classify(&source),
                        source,
                    });
                }
            }
        }
    }
}

/// The Kafka record for `row`: key `aggregate_id`, value the payload as stored (none for a
/// NULL payload: a tombstone), timestamp the creation time when the table maps one (else
/// librdkafka stamps the send time).
fn record<'a>(
    topic: &'a str,
    row: &'a OutboxRow,
    headers: OwnedHeaders,
) -> FutureRecord<'a, [u8], [u8]> {
    let mut record = FutureRecord::to(topic)
        .key(row.aggregate_id.as_bytes())
        .headers(headers);
    if let Some(value) = row.payload.bytes() {
        record = record.payload(value);
    }
    if let Some(created_at) = row.created_at {
        record = record.timestamp(created_at.timestamp_millis());
    }
    record
}

fn delivery_outcome(
    report: Result<
        rdkafka::producer::future_producer::OwnedDeliveryResult,
        futures::channel::oneshot::Canceled,
    >,
) -> Outcome {
    match report {
        Ok(Ok(_)) => Outcome::Acked,
        Ok(Err((source, _message))) => Outcome::Failed(PublishError::Kafka {
            class: classify(&source),
            source,
        }),
        Err(_) => Outcome::Failed(PublishError::ProducerClosed),
    }
}

/// Kafka topic names: 1 to 249 characters of `[A-Za-z0-9._-]`.
fn validate_topic(topic: &str) -> Result<(), PublishError> {
    let valid = (1..=249).contains(&topic.len())
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(PublishError::InvalidDestination {
            destination: topic.to_owned(),
            constraint: "a Kafka topic is 1 to 249 characters of [A-Za-z0-9._-]",
        })
    }
}

/// The one place Kafka errors are classified.
fn classify(err: &KafkaError) -> ErrorClass {
    use RDKafkaErrorCode as C;
    match err.rdkafka_error_code() {
        Some(
            C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::InvalidMessage
            | C::InvalidRecord
            | C::UnknownTopic
            | C::UnknownTopicOrPartition
            | C::UnknownPartition
            | C::InvalidTopic
            | C::PolicyViolation,
        ) => ErrorClass::Permanent,
        // A missing ACL for one topic is the destination's state: its rows back off without
        // using attempts, the rest flow. (A failed SASL login, `Authentication`, falls through
        // to transient: an outage, whatever the rows.)
        Some(C::TopicAuthorizationFailed) => ErrorClass::Destination,
        Some(
            C::Fatal
            | C::ClusterAuthorizationFailed
            | C::ProducerFenced
            | C::InvalidProducerEpoch
            | C::InvalidRequiredAcks,
        ) => ErrorClass::Fatal,
        _ => ErrorClass::Transient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    mod any_row {
        //! Property: whatever a row holds, its Kafka message is built (topic, key, headers)
        //! or the row fails permanently; nothing panics.
        use super::super::*;
        use crate::broker::arbitrary::row;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn builds_a_record_or_fails_permanently(row in row()) {
                let topic = Template::parse("outbox.{aggregate_type}.{event_type}").unwrap().render(&row);
                let built = validate_topic(&topic).and_then(|()| Shape::default().headers(&row, Binding::Kafka));
                match built {
                    Ok(pairs) => {
                        let mut kafka_headers = OwnedHeaders::new();
                        for (name, value) in &pairs {
                            kafka_headers = kafka_headers.insert(Header {
                                key: name,
                                value: Some(value.as_bytes()),
                            });
                        }
                        prop_assert_eq!(rdkafka::message::Headers::count(&kafka_headers), pairs.len());
                        let record = record(&topic, &row, kafka_headers);
                        prop_assert_eq!(record.key, Some(row.aggregate_id.as_bytes()));
                    }
                    Err(err) => prop_assert_eq!(err.class(), ErrorClass::Permanent),
                }
            }
        }
    }

    #[test]
    fn topic_names_are_checked() {
        assert!(validate_topic("outbox.event.order-v1_x").is_ok());
        for bad in ["", "a b", "a/b", "ünï", &"x".repeat(250)] {
            let err = validate_topic(bad).unwrap_err();
            assert_eq!(err.class(), ErrorClass::Permanent);
        }
    }

    #[test]
    fn errors_are_classified_once() {
        let too_large = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert_eq!(classify(&too_large), ErrorClass::Permanent);
        let timed_out = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert_eq!(classify(&timed_out), ErrorClass::Transient);
        let fatal = KafkaError::MessageProduction(RDKafkaErrorCode::Fatal);
        assert_eq!(classify(&fatal), ErrorClass::Fatal);
        let login = KafkaError::MessageProduction(RDKafkaErrorCode::Authentication);
        assert_eq!(
            classify(&login),
            ErrorClass::Transient,
            "a refused login is an outage"
        );
        let acl = KafkaError::MessageProduction(RDKafkaErrorCode::TopicAuthorizationFailed);
        assert_eq!(classify(&acl), ErrorClass::Destination);
    }

    #[test]
    fn the_bundled_librdkafka_supports_tls_and_sasl_plain_and_scram() {
        // Creating the producer makes librdkafka check the mechanisms against what it was
        // built with (OpenSSL, SASL); nothing connects.
        for mechanism in ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] {
            let config = config::KafkaConfig {
                brokers: "kafka.internal:9093".to_owned(),
                topic: "outbox.{aggregate_type}".to_owned(),
                properties: [
                    ("security.protocol", "sasl_ssl"),
                    ("sasl.mechanism", mechanism),
                    ("sasl.username", "relay"),
                    ("sasl.password", "secret"),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
                allow_unsafe: false,
                allow_insecure_transport: false,
                on_partition_change: partitions::OnPartitionChange::Pause,
                partition_check_interval: Duration::from_secs(30),
            };
            let settings = config
                .validate(Duration::from_secs(120))
                .unwrap_or_else(|err| panic!("{mechanism}: {err}"));
            KafkaProducer::new(&settings, Allowed::new(&[]), Shape::default())
                .unwrap_or_else(|err| panic!("{mechanism}: {err}"));
        }
    }
}
