//! Reading a Kafka topic from the beginning, every partition.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::{Received, kafka_brokers, unique};

fn admin() -> AdminClient<DefaultClientContext> {
    admin_on(&kafka_brokers())
}

fn admin_on(brokers: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client")
}

/// Creates `topic` with `partitions` partitions (before the relay would auto-create it).
pub async fn create_topic(topic: &str, partitions: i32) {
    create_topic_on(&kafka_brokers(), topic, partitions).await;
}

/// [`create_topic`] on the broker at `brokers`.
pub async fn create_topic_on(brokers: &str, topic: &str, partitions: i32) {
    let results = admin_on(brokers)
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create topic");
    for result in results {
        result.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
    }
}

/// Deletes `topic` and creates it again with `partitions` partitions: what the relay's metadata
/// sees is a topic whose partition count changed (tansu has no CreatePartitions).
pub async fn recreate_topic(topic: &str, partitions: i32) {
    let results = admin()
        .delete_topics(
            &[topic],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("delete topic");
    for result in results {
        result.unwrap_or_else(|(t, e)| panic!("delete topic {t}: {e}"));
    }
    create_topic(topic, partitions).await;
}

/// The partition count the cluster's metadata gives for `topic`.
pub fn partition_count(topic: &str) -> usize {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .create()
        .expect("consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    metadata.topics()[0].partitions().len()
}

/// Reads every partition of a topic from the beginning.
pub struct TopicReader {
    consumer: BaseConsumer,
    pub received: Vec<Received>,
    /// Distinct event ids received.
    seen: std::collections::HashSet<String>,
}

impl TopicReader {
    /// Creates the topic with `partitions` partitions and subscribes to all of them.
    pub async fn create(topic: &str, partitions: i32) -> Self {
        create_topic(topic, partitions).await;
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || Self::new(&topic))
            .await
            .expect("reader")
    }

    /// Reads `topic`, which must exist, from the beginning (blocks for the metadata).
    pub fn existing(topic: &str) -> Self {
        Self::new(topic)
    }

    fn new(topic: &str) -> Self {
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", kafka_brokers());
        Self::with_client(topic, client)
    }

    /// Reads `topic` (which must exist) with a client configured by the caller: another broker,
    /// TLS settings.
    pub fn with_client(topic: &str, mut client: ClientConfig) -> Self {
        let consumer: BaseConsumer = client
            .set("group.id", unique("test"))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("topic metadata");
        let partitions = metadata.topics()[0].partitions().len() as i32;
        assert!(partitions > 0, "topic {topic} has no partitions");
        let mut assignment = TopicPartitionList::new();
        for p in 0..partitions {
            assignment
                .add_partition_offset(topic, p, Offset::Beginning)
                .expect("assign");
        }
        consumer.assign(&assignment).expect("assign");
        Self {
            consumer,
            received: Vec::new(),
            seen: std::collections::HashSet::new(),
        }
    }

    /// Polls until `count` distinct events (by `event_id`) arrived, or panics after `timeout`.
    pub fn read_distinct(&mut self, count: usize, timeout: Duration) -> &[Received] {
        let deadline = Instant::now() + timeout;
        while self.seen.len() < count && Instant::now() < deadline {
            self.poll_once(Duration::from_millis(100));
        }
        assert!(
            self.seen.len() >= count,
            "{} distinct of {count} events ({} messages) within {timeout:?}",
            self.seen.len(),
            self.received.len()
        );
        &self.received
    }

    /// Polls until at least `count` messages were received in total, or panics after `timeout`.
    pub fn read_at_least(&mut self, count: usize, timeout: Duration) -> &[Received] {
        let deadline = Instant::now() + timeout;
        while self.received.len() < count && Instant::now() < deadline {
            self.poll_once(Duration::from_millis(100));
        }
        assert!(
            self.received.len() >= count,
            "received {} of {count} messages within {timeout:?}",
            self.received.len()
        );
        &self.received
    }

    /// Keeps polling for `period` (to show that nothing more arrives).
    pub fn read_for(&mut self, period: Duration) -> &[Received] {
        let deadline = Instant::now() + period;
        while Instant::now() < deadline {
            self.poll_once(Duration::from_millis(100));
        }
        &self.received
    }

    fn poll_once(&mut self, timeout: Duration) {
        let Some(message) = self.consumer.poll(timeout) else {
            return;
        };
        let message = message.expect("consume");
        let mut headers = BTreeMap::new();
        if let Some(h) = message.headers() {
            for header in h.iter() {
                headers.insert(
                    header.key.to_owned(),
                    String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                );
            }
        }
        let received = Received {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            key: String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned(),
            payload: serde_json::from_slice(message.payload().unwrap_or_default())
                .unwrap_or_default(),
            value: message.payload().map(<[u8]>::to_vec),
            timestamp: message.timestamp().to_millis(),
            headers,
            properties: BTreeMap::new(),
        };
        self.seen.insert(received.event_id().to_owned());
        self.received.push(received);
    }
}
