//! `[inbox.kafka]` and the inbox's Kafka consumer: a group member that never commits an
//! offset itself (no auto-commit, no auto offset store) and commits, after the inbox's
//! transaction, the offset after the last written message of each partition.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Deserialize;

use super::config::{check_passthrough, flat_properties};
use crate::broker::consumer::{ConsumeError, Consumer, Delivery, HeaderValue, Receipt};
use crate::constraint::{ConfigError, at_least, invalid};

/// `[inbox.kafka]`
#[derive(Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct InboxKafkaConfig {
    /// Bootstrap servers, comma-separated `host:port`.
    pub brokers: String,
    /// Topics to consume (they must exist: the inbox declares nothing).
    pub topics: Vec<String>,
    /// Consumer group. Default: `inbox.consumer`.
    pub group_id: Option<String>,
    /// Where a group without committed offsets starts: `"earliest"` or `"latest"`. Default "earliest".
    #[serde(default)]
    pub start: Start,
    /// How long the group waits for a member that stopped heartbeating (crashed) before its
    /// partitions move. Default 10s: a restarted inbox resumes within about that.
    #[cfg_attr(test, schemars(with = "String"))]
    #[serde(default = "default_session_timeout", with = "humantime_serde")]
    pub session_timeout: Duration,
    /// librdkafka properties passed through (network, TLS, SASL, fetch sizes, `client.rack`,
    /// `group.instance.id`...). The group, offsets and commit settings are the inbox's own.
    #[cfg_attr(test, schemars(with = "BTreeMap<String, String>"))]
    #[serde(default, deserialize_with = "flat_properties")]
    pub properties: BTreeMap<String, String>,
    /// Allows `security.protocol` plaintext or sasl_plaintext with brokers that are not
    /// loopback. Default false.
    #[serde(default)]
    pub allow_insecure_transport: bool,
}

impl fmt::Debug for InboxKafkaConfig {
    // Properties may hold secrets: only their names.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboxKafkaConfig")
            .field("brokers", &self.brokers)
            .field("topics", &self.topics)
            .field("group_id", &self.group_id)
            .field("start", &self.start)
            .field("properties", &self.properties.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// `inbox.kafka.start`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Start {
    #[default]
    Earliest,
    Latest,
}

fn default_session_timeout() -> Duration {
    Duration::from_secs(10)
}

/// Properties the inbox sets itself: the group, where it starts, and that nothing is
/// committed but by the inbox after its transaction.
const OWNED: &[&str] = &[
    "bootstrap.servers",
    "metadata.broker.list",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "session.timeout.ms",
    "isolation.level",
];

/// Passthrough allow-list for the consumer.
const ALLOWED: &[&str] = &[
    "client.id",
    "client.rack",
    "client.dns.lookup",
    "group.instance.id",
    "heartbeat.interval.ms",
    "max.poll.interval.ms",
    "partition.assignment.strategy",
    "fetch.*",
    "max.partition.fetch.bytes",
    "queued.*",
    "receive.message.max.bytes",
    "socket.*",
    "reconnect.*",
    "retry.*",
    "topic.metadata.*",
    "metadata.*",
    "api.version.*",
    "broker.*",
    "connections.max.idle.ms",
    "statistics.interval.ms",
    "log_level",
    "log.*",
    "debug",
    "security.protocol",
    "ssl.*",
    "ssl_key",
    "sasl.*",
    "enable.ssl.certificate.verification",
    "resolve.canonical.bootstrap.servers.only",
];

/// `[inbox.kafka]`, parsed and checked by librdkafka.
#[derive(Clone)]
pub(crate) struct KafkaConsumerSettings {
    pub(crate) client: ClientConfig,
    pub(crate) topics: Vec<String>,
    pub(crate) group_id: String,
}

impl fmt::Debug for KafkaConsumerSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConsumerSettings")
            .field("topics", &self.topics)
            .field("group_id", &self.group_id)
            .finish_non_exhaustive()
    }
}

impl InboxKafkaConfig {
    /// Checks the section (the group defaults to `consumer`) and parses it.
    pub(crate) fn validate(&self, consumer: &str) -> Result<KafkaConsumerSettings, ConfigError> {
        if self.brokers.split(',').all(|b| b.trim().is_empty()) {
            return Err(invalid(
                "inbox.kafka.brokers",
                "must name at least one host:port",
            ));
        }
        if self.topics.is_empty() || self.topics.iter().any(|t| t.trim().is_empty()) {
            return Err(invalid(
                "inbox.kafka.topics",
                "must name at least one topic, none empty",
            ));
        }
        check_passthrough(
            "inbox.kafka",
            &self.brokers,
            &self.properties,
            self.allow_insecure_transport,
            OWNED,
            ALLOWED,
        )?;
        at_least(
            "inbox.kafka.session_timeout",
            self.session_timeout,
            Duration::from_secs(1),
        )?;
        let group_id = self.group_id.clone().unwrap_or_else(|| consumer.to_owned());
        if group_id.is_empty() {
            return Err(invalid("inbox.kafka.group_id", "must not be empty"));
        }
        let mut client = ClientConfig::new();
        client
            .set("client.id", format!("outbox-relay inbox {consumer}"))
            // Prefetched messages held by the client: librdkafka's default, 64 MiB, made the
            // process's peak RSS 125 MiB in the benchmark; 8 MiB ingests as fast (55–59 MiB)...
            .set("queued.max.messages.kbytes", "8192")
            // ...provided a partition whose fetch was postponed because the queue was full is
            // fetched again soon: librdkafka's default, 1 s, left the queue empty for most of
            // it (20k instead of 34–40k messages/s with 8–16 MiB queues).
            .set("fetch.queue.backoff.ms", "10")
            // A third of the session timeout, as Kafka's own default ratio.
            .set(
                "heartbeat.interval.ms",
                (self.session_timeout.as_millis() / 3).max(100).to_string(),
            );
        for (key, value) in &self.properties {
            client.set(key, value);
        }
        client
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", &group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set(
                "auto.offset.reset",
                match self.start {
                    Start::Earliest => "earliest",
                    Start::Latest => "latest",
                },
            )
            .set(
                "session.timeout.ms",
                self.session_timeout.as_millis().to_string(),
            )
            // Messages of aborted transactions never reach the inbox.
            .set("isolation.level", "read_committed");
        client.create_native_config().map_err(|err| {
            invalid(
                "inbox.kafka.properties",
                format!("rejected by librdkafka: {err}"),
            )
        })?;
        Ok(KafkaConsumerSettings {
            client,
            topics: self.topics.clone(),
            group_id,
        })
    }
}

/// Logs group membership changes once each, and librdkafka's own lines at debug level.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GroupContext;

impl ClientContext for GroupContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        tracing::debug!(target: "librdkafka", ?level, facility = fac, "{log_message}");
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(target: "librdkafka", error = %error, "{reason}");
    }
}

impl ConsumerContext for GroupContext {
    fn post_rebalance(
        &self,
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        match rebalance {
            Rebalance::Assign(list) => {
                tracing::info!(partitions = %describe(list), "inbox: partitions assigned");
            }
            Rebalance::Revoke(list) => {
                tracing::info!(partitions = %describe(list), "inbox: partitions revoked");
            }
            Rebalance::Error(err) => tracing::warn!(error = %err, "inbox: rebalance failed"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        // A failed commit loses nothing: the rows are written, and a later commit (or, after a
        // rebalance, the redelivery the dedupe absorbs) covers them.
        if let Err(err) = result {
            tracing::debug!(error = %err, "inbox: offset commit failed");
        }
    }
}

fn describe(list: &TopicPartitionList) -> String {
    let parts: Vec<String> = list
        .elements()
        .iter()
        .map(|e| format!("{}/{}", e.topic(), e.partition()))
        .collect();
    parts.join(",")
}

/// The inbox's Kafka group member.
pub(crate) struct KafkaConsumer {
    consumer: StreamConsumer<GroupContext>,
}

impl fmt::Debug for KafkaConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConsumer").finish_non_exhaustive()
    }
}

impl KafkaConsumer {
    /// Creates the member and subscribes it (it joins the group on its first `next`).
    pub(crate) fn new(settings: &KafkaConsumerSettings) -> Result<Self, KafkaError> {
        let consumer: StreamConsumer<GroupContext> =
            settings.client.create_with_context(GroupContext)?;
        let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        Ok(Self { consumer })
    }

    /// For `check`: each topic's partition count, `None` for a topic the cluster lacks.
    pub(crate) async fn topics(
        settings: &KafkaConsumerSettings,
        timeout: Duration,
    ) -> Result<Vec<(String, Option<usize>)>, KafkaError> {
        let settings = settings.clone();
        tokio::task::spawn_blocking(move || {
            let client: rdkafka::consumer::BaseConsumer<GroupContext> =
                settings.client.create_with_context(GroupContext)?;
            let mut out = Vec::new();
            for topic in &settings.topics {
                let metadata = client.fetch_metadata(Some(topic), timeout)?;
                let count = metadata
                    .topics()
                    .first()
                    .filter(|t| t.error().is_none() && !t.partitions().is_empty())
                    .map(|t| t.partitions().len());
                out.push((topic.clone(), count));
            }
            Ok(out)
        })
        .await
        .unwrap_or(Err(KafkaError::Canceled))
    }
}

/// The next offset to commit per partition: one past the last of `receipts`.
pub(crate) fn offsets_to_commit(receipts: &[Receipt]) -> BTreeMap<(&str, i32), i64> {
    let mut next = BTreeMap::new();
    for receipt in receipts {
        if let Receipt::Kafka {
            topic,
            partition,
            offset,
        } = receipt
        {
            let entry = next
                .entry((topic.as_str(), *partition))
                .or_insert(offset + 1);
            *entry = (*entry).max(offset + 1);
        }
    }
    next
}

impl Consumer for KafkaConsumer {
    async fn next(&mut self, wait: Duration) -> Result<Option<Delivery>, ConsumeError> {
        let message = match tokio::time::timeout(wait, self.consumer.recv()).await {
            Err(_) => return Ok(None),
            Ok(Err(err)) => return Err(ConsumeError::Kafka(err)),
            Ok(Ok(message)) => message,
        };
        let headers = message.headers().map_or_else(Vec::new, |headers| {
            headers
                .iter()
                .map(|h| {
                    let value = h
                        .value
                        .map_or(HeaderValue::Null, |v| HeaderValue::Bytes(v.to_vec()));
                    (h.key.to_owned(), value)
                })
                .collect()
        });
        Ok(Some(Delivery {
            source: message.topic().to_owned(),
            position: Some((message.partition(), message.offset())),
            key: message.key().map(<[u8]>::to_vec),
            headers,
            message_id: None,
            kind: None,
            body: message.payload().map(<[u8]>::to_vec),
            receipt: Receipt::Kafka {
                topic: message.topic().to_owned(),
                partition: message.partition(),
                offset: message.offset(),
            },
        }))
    }

    async fn acknowledge(&mut self, receipts: &[Receipt]) -> Result<(), ConsumeError> {
        let next = offsets_to_commit(receipts);
        if next.is_empty() {
            return Ok(());
        }
        let mut list = TopicPartitionList::new();
        for ((topic, partition), offset) in next {
            list.add_partition_offset(topic, partition, Offset::Offset(offset))
                .map_err(ConsumeError::Kafka)?;
        }
        // Asynchronous: the commit goes out with the next poll and the inbox goes on; one lost
        // in a crash only means redeliveries, which the dedupe absorbs.
        self.consumer
            .commit(&list, CommitMode::Async)
            .map_err(ConsumeError::Kafka)
    }

    async fn reconnect(&mut self) -> Result<(), ConsumeError> {
        // librdkafka reconnects by itself and the member keeps its position: nothing handed
        // out was dropped (the inbox writes what it holds), so nothing is skipped.
        Ok(())
    }

    async fn close(&mut self) {
        // Leaving the group now moves the partitions at once (no session timeout to wait).
        self.consumer.unsubscribe();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(topic: &str, partition: i32, offset: i64) -> Receipt {
        Receipt::Kafka {
            topic: topic.to_owned(),
            partition,
            offset,
        }
    }

    #[test]
    fn the_offset_committed_is_one_past_the_last_written_message_of_each_partition() {
        let batch = [at("a", 0, 7), at("a", 1, 3), at("a", 0, 8), at("b", 0, 1)];
        let next = offsets_to_commit(&batch);
        assert_eq!(
            next.into_iter().collect::<Vec<_>>(),
            vec![(("a", 0), 9), (("a", 1), 4), (("b", 0), 2)]
        );
    }
}
