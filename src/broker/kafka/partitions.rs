//! Partition-count changes of the topics the relay writes to.
//!
//! Keyed messages are placed by `murmur2(key) % partitions`: when a topic gains partitions,
//! most keys move, and a consumer can read an aggregate's new events (on the new partition)
//! before its older ones (still waiting on the old one). So the relay records each topic's
//! partition count in the database (the table `<outbox>_topic_partitions`, migration 0008:
//! shared by every instance and kept across restarts), compares the cluster's metadata with it
//! every `broker.kafka.partition_check_interval`, and when they differ logs an error naming the
//! topic and both counts, counts it, and — with `on_partition_change = "pause"`, the default —
//! stops publishing to that topic (its rows back off without using attempts; other topics
//! flow) until an operator runs `outbox-relay partitions --accept TOPIC`, which records the new
//! count. `"continue"` records the new count at once and carries on.
//!
//! The check uses a client of its own: the producer's client learns of new partitions only at
//! its own metadata refresh (`topic.metadata.refresh.interval.ms`, 5 minutes by default), so
//! the pause normally comes before any message could go to a new partition.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer as _};
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::broker::PublishError;
use crate::telemetry::{ErrorChain, metric};

/// `broker.kafka.on_partition_change`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum OnPartitionChange {
    /// Stop publishing to the topic until `outbox-relay partitions --accept TOPIC`.
    #[default]
    Pause,
    /// Log, count, record the new count and carry on.
    Continue,
}

/// What the check concludes for one topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// First sight: record this count.
    Record(i32),
    /// As recorded.
    Unchanged,
    /// The cluster has another count than the one recorded.
    Changed { recorded: i32, current: i32 },
}

/// The check's decision for a topic whose cluster metadata shows `current` partitions.
pub(crate) fn judge(recorded: Option<i32>, current: i32) -> Verdict {
    match recorded {
        None => Verdict::Record(current),
        Some(recorded) if recorded == current => Verdict::Unchanged,
        Some(recorded) => Verdict::Changed { recorded, current },
    }
}

/// What the check needs from the database: the partition counts recorded per topic.
pub(crate) trait Ledger: Send + Sync + 'static {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Every recorded topic and its count.
    fn recorded(&self) -> impl Future<Output = Result<BTreeMap<String, i32>, Self::Error>> + Send;

    /// Records `partitions` for `topic`: only if none is recorded yet, or (`replace`) in any
    /// case.
    fn record(
        &self,
        topic: &str,
        partitions: i32,
        replace: bool,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// The topics' state, shared by the producer (which asks before sending) and the check (which
/// tells).
#[derive(Debug)]
pub(crate) struct Partitions {
    /// One lock for both, taken once per message by [`Partitions::admit`].
    topics: Mutex<Topics>,
    /// False until the check's first round ended (or gave up): sending waits for it, so a
    /// change made while the relay was down is caught before the first message.
    checked: watch::Sender<bool>,
    /// `broker.kafka.partition_check_interval`.
    interval: Duration,
    /// `broker.kafka.on_partition_change`.
    policy: OnPartitionChange,
}

#[derive(Debug, Default)]
struct Topics {
    /// Topics the producer has sent to, or the ledger knows: the ones the check looks at.
    seen: BTreeSet<String>,
    /// Paused topics: (recorded, current) partition counts.
    paused: BTreeMap<String, (i32, i32)>,
}

/// How long sending waits for the first check (a database or cluster that does not answer
/// would stop the relay's own work anyway).
const FIRST_CHECK_WAIT: Duration = Duration::from_secs(15);

impl Partitions {
    /// No topic known yet; the check runs every `interval` and acts on a change by `policy`.
    pub(crate) fn new(interval: Duration, policy: OnPartitionChange) -> Self {
        Self {
            topics: Mutex::new(Topics::default()),
            checked: watch::Sender::new(false),
            interval,
            policy,
        }
    }

    fn topics(&self) -> std::sync::MutexGuard<'_, Topics> {
        self.topics.lock().expect("partitions lock poisoned")
    }

    /// Waits (bounded) until the first check has run; after one wait that ran out, sending
    /// goes on without it.
    pub(crate) async fn first_check(&self) {
        if *self.checked.borrow() {
            return;
        }
        let mut checked = self.checked.subscribe();
        if tokio::time::timeout(FIRST_CHECK_WAIT, checked.wait_for(|done| *done))
            .await
            .is_err()
        {
            tracing::warn!("the partition counts could not be checked yet; publishing anyway");
            self.checked.send_replace(true);
        }
    }

    /// Before sending to `topic`: notes it for the check, and refuses while it is paused.
    pub(crate) fn admit(&self, topic: &str) -> Result<(), PublishError> {
        let mut topics = self.topics();
        if let Some((recorded, current)) = topics.paused.get(topic) {
            return Err(PublishError::PartitionsChanged {
                topic: topic.to_owned(),
                recorded: *recorded,
                current: *current,
            });
        }
        if !topics.seen.contains(topic) {
            topics.seen.insert(topic.to_owned());
        }
        Ok(())
    }

    /// Every topic seen, and those given (the ledger's).
    fn seen_with(&self, recorded: impl IntoIterator<Item = String>) -> Vec<String> {
        let mut topics = self.topics();
        topics.seen.extend(recorded);
        topics.seen.iter().cloned().collect()
    }

    /// Pauses `topic`; true when it was not paused already.
    fn pause(&self, topic: &str, recorded: i32, current: i32) -> bool {
        self.topics()
            .paused
            .insert(topic.to_owned(), (recorded, current))
            .is_none()
    }

    /// Resumes `topic`; true when it was paused.
    fn resume(&self, topic: &str) -> bool {
        self.topics().paused.remove(topic).is_some()
    }

    fn paused_count(&self) -> usize {
        self.topics().paused.len()
    }
}

/// The topic's partition count in the cluster's metadata; `None` when the cluster does not
/// answer or does not know the topic (nothing to compare).
fn partition_count(client: &BaseProducer, topic: &str, timeout: Duration) -> Option<i32> {
    let metadata = client.client().fetch_metadata(Some(topic), timeout).ok()?;
    let found = metadata.topics().iter().find(|t| t.name() == topic)?;
    if found.error().is_some() || found.partitions().is_empty() {
        return None;
    }
    i32::try_from(found.partitions().len()).ok()
}

/// The check, every `partition_check_interval` until `shutdown` (see the module docs). `client` is the
/// producer's configuration: the check opens a client of its own with it.
pub(crate) async fn watch<L: Ledger>(
    partitions: Arc<Partitions>,
    ledger: L,
    client: ClientConfig,
    shutdown: CancellationToken,
) {
    let (interval, policy) = (partitions.interval, partitions.policy);
    let client: BaseProducer = match client.create() {
        Ok(client) => client,
        Err(err) => {
            tracing::error!(error = %err, "cannot create the client that checks partition counts; not checking");
            partitions.checked.send_replace(true);
            return;
        }
    };
    let client = Arc::new(client);
    loop {
        check(&partitions, &ledger, &client, policy).await;
        partitions.checked.send_replace(true);
        metrics::gauge!(metric::TOPICS_PAUSED).set(partitions.paused_count() as f64);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

/// One round of the check over every topic seen or recorded.
async fn check<L: Ledger>(
    partitions: &Partitions,
    ledger: &L,
    client: &Arc<BaseProducer>,
    policy: OnPartitionChange,
) {
    let recorded = match ledger.recorded().await {
        Ok(recorded) => recorded,
        Err(err) => {
            // Debug: a database outage is reported by the relay loop, a missing table too.
            tracing::debug!(error = %ErrorChain(&err), "cannot read the recorded partition counts (migration 0008; the relay's role needs select, insert, update on <table>_topic_partitions); checking later");
            return;
        }
    };
    for topic in partitions.seen_with(recorded.keys().cloned()) {
        let Some(current) = current_count(client, &topic).await else {
            continue;
        };
        match judge(recorded.get(&topic).copied(), current) {
            Verdict::Record(count) => {
                if let Err(err) = ledger.record(&topic, count, false).await {
                    tracing::warn!(topic = %topic, error = %ErrorChain(&err), "cannot record the partition count; trying again later");
                }
            }
            Verdict::Unchanged => {
                if partitions.resume(&topic) {
                    tracing::info!(topic = %topic, partitions = current, "new partition count accepted; publishing to the topic resumes");
                }
            }
            Verdict::Changed { recorded, current } => match policy {
                OnPartitionChange::Pause => {
                    if partitions.pause(&topic, recorded, current) {
                        report_change(
                            &topic,
                            recorded,
                            current,
                            "publishing to it is paused until `outbox-relay partitions --accept TOPIC`",
                        );
                    }
                }
                OnPartitionChange::Continue => {
                    report_change(
                        &topic,
                        recorded,
                        current,
                        "carrying on (broker.kafka.on_partition_change = \"continue\")",
                    );
                    if let Err(err) = ledger.record(&topic, current, true).await {
                        tracing::debug!(topic = %topic, error = %ErrorChain(&err), "cannot record the partition count; trying again later");
                    }
                }
            },
        }
    }
}

/// Logs and counts a detected change, saying what the relay does about it (`then`).
fn report_change(topic: &str, recorded: i32, current: i32, then: &str) {
    tracing::error!(
        topic = %topic,
        recorded,
        current,
        "topic's partition count changed: keys move to other partitions and per-aggregate order breaks for consumers; {then}"
    );
    metrics::counter!(metric::PARTITION_CHANGES, "topic" => topic.to_owned()).increment(1);
}

/// `topic`'s partition count in the cluster, asked on a blocking thread.
async fn current_count(client: &Arc<BaseProducer>, topic: &str) -> Option<i32> {
    let client = Arc::clone(client);
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || partition_count(&client, &topic, Duration::from_secs(10)))
        .await
        .ok()
        .flatten()
}

/// `outbox-relay partitions`: the cluster's current partition count of each of `topics`
/// (`None`: not reported).
pub(crate) async fn current_counts(
    topics: &[String],
    client: &ClientConfig,
) -> Result<Vec<Option<i32>>, rdkafka::error::KafkaError> {
    let client: Arc<BaseProducer> = Arc::new(client.create()?);
    let mut out = Vec::with_capacity(topics.len());
    for topic in topics {
        out.push(current_count(&client, topic).await);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::ErrorClass;

    #[test]
    fn a_topic_is_recorded_at_first_sight_and_judged_against_that_after() {
        assert_eq!(judge(None, 6), Verdict::Record(6));
        assert_eq!(judge(Some(6), 6), Verdict::Unchanged);
        assert_eq!(
            judge(Some(6), 12),
            Verdict::Changed {
                recorded: 6,
                current: 12
            }
        );
        assert_eq!(
            judge(Some(6), 3),
            Verdict::Changed {
                recorded: 6,
                current: 3
            },
            "fewer partitions (a topic recreated) move keys too"
        );
    }

    #[test]
    fn a_paused_topic_refuses_its_rows_as_a_destination_in_trouble_until_resumed() {
        let partitions = Partitions::new(Duration::from_secs(30), OnPartitionChange::Pause);
        assert!(partitions.admit("orders").is_ok());
        assert_eq!(partitions.seen_with([]), ["orders"]);
        assert!(partitions.pause("orders", 2, 4));
        assert!(!partitions.pause("orders", 2, 4), "paused once");
        let err = partitions.admit("orders").unwrap_err();
        assert_eq!(err.class(), ErrorClass::Destination);
        assert!(err.to_string().contains("2 to 4"), "{err}");
        assert!(partitions.admit("payments").is_ok(), "other topics flow");
        assert!(partitions.resume("orders"));
        assert!(partitions.admit("orders").is_ok());
    }
}
