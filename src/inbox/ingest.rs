//! The inbox loop: take a batch from the broker, write it in one transaction, acknowledge it;
//! and the housekeeping task beside it (gauges, retention of processed rows).
//!
//! Delivery: a message is acknowledged only after the transaction holding its row (or its
//! rejection) committed, and every message handed out is written before anything later of
//! its partition or channel is acknowledged, so a crash anywhere makes the broker redeliver
//! what was not yet durable, and the unique (`consumer`, `event_id`) skips what was.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::store::{InboxStore, Written};
use super::{Entry, Rules, entry, size};
use crate::broker::consumer::{ConsumeError, Consumer, Receipt};
use crate::health::Health;
use crate::runtime::backoff;
use crate::runtime::outage::Outage;
use crate::telemetry::{ErrorChain, metric};

/// How long the loop waits for a first message before it reports itself idle (and alive).
const IDLE_WAIT: Duration = Duration::from_secs(1);
/// Backoff between attempts to write a batch, or to reconnect.
const BACKOFF_INITIAL: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often the gauges are refreshed and retention runs.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(10);
/// Rows deleted per retention statement.
const RETENTION_BATCH: u32 = 10_000;

/// The loop's settings, from `[inbox]`.
#[derive(Debug, Clone)]
pub(crate) struct IngestSettings {
    /// `inbox.consumer`: recorded in every row, and the `consumer` metric label.
    pub(crate) consumer: String,
    pub(crate) rules: Rules,
    pub(crate) batch_size: usize,
    /// `inbox.max_batch_bytes`: the batch is written once its messages hold this many bytes.
    pub(crate) max_batch_bytes: usize,
    pub(crate) batch_wait: Duration,
}

/// One batch: what acknowledges each message, and how each is recorded (same order).
#[derive(Debug, Default)]
struct Batch {
    receipts: Vec<Receipt>,
    entries: Vec<Entry>,
    /// The messages' sizes (body, key and headers), summed.
    bytes: usize,
}

impl Batch {
    /// Whether the batch takes no more messages.
    fn is_full(&self, settings: &IngestSettings) -> bool {
        self.receipts.len() >= settings.batch_size || self.bytes >= settings.max_batch_bytes
    }
}

/// The inbox loop over a store and a consumer.
#[derive(Debug)]
pub(crate) struct Ingest<S, C> {
    store: S,
    consumer: C,
    settings: IngestSettings,
    /// What `/readyz` and `/healthz` report for the inbox.
    health: Arc<Health>,
    /// The database's outage, logged once when it starts and once when it ends.
    database: Outage,
    /// The broker's.
    broker: Outage,
}

impl<S: InboxStore, C: Consumer> Ingest<S, C> {
    pub(crate) fn new(
        store: S,
        consumer: C,
        settings: IngestSettings,
        health: Arc<Health>,
    ) -> Self {
        Self {
            store,
            consumer,
            settings,
            health,
            database: Outage::new("database"),
            broker: Outage::new("broker"),
        }
    }

    /// Runs until `shutdown`: the batch taken when it fires is still written and acknowledged
    /// (unless the database is down: then nothing is acknowledged and the broker redelivers
    /// it), and the consumer leaves cleanly.
    pub(crate) async fn run(mut self, shutdown: &CancellationToken) {
        loop {
            let mut batch = Batch::default();
            let broken = self.fill(&mut batch, shutdown).await;
            let mut broken = broken.err();
            if !batch.receipts.is_empty() {
                let written = self.write(&batch, shutdown).await;
                let Some(written) = written else {
                    break;
                };
                self.report(&batch, &written);
                match self.consumer.acknowledge(&batch.receipts).await {
                    Ok(()) => {}
                    Err(err) => broken = Some(err),
                }
            }
            if let Some(err) = broken {
                if !self.reconnect(err, shutdown).await {
                    break;
                }
            }
            if shutdown.is_cancelled() {
                break;
            }
        }
        self.consumer.close().await;
        tracing::info!(consumer = %self.settings.consumer, "inbox stopped");
    }

    /// Takes the next batch: waits up to [`IDLE_WAIT`] for a first message, then up to
    /// `batch_wait` for more, and takes what is already buffered up to `batch_size`. An error
    /// ends the batch (what was taken is still written).
    async fn fill(
        &mut self,
        batch: &mut Batch,
        shutdown: &CancellationToken,
    ) -> Result<(), ConsumeError> {
        let first = tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(()),
            next = self.consumer.next(IDLE_WAIT) => next?,
        };
        if self.broker.recovered() {
            self.health.broker(None);
        }
        let Some(first) = first else {
            self.health.progress();
            return Ok(());
        };
        self.push(batch, first);
        let deadline = Instant::now() + self.settings.batch_wait;
        while !batch.is_full(&self.settings) {
            // With no time left this still takes what the client has buffered.
            let left = deadline.saturating_duration_since(Instant::now());
            match self.consumer.next(left).await? {
                Some(delivery) => self.push(batch, delivery),
                None => break,
            }
        }
        Ok(())
    }

    fn push(&self, batch: &mut Batch, delivery: crate::broker::consumer::Delivery) {
        batch.receipts.push(delivery.receipt.clone());
        batch.bytes += size(&delivery);
        batch.entries.push(entry(delivery, &self.settings.rules));
    }

    /// Writes `batch` until it is durable; `None` when shutdown came while the database was
    /// down (nothing of the batch is acknowledged then).
    async fn write(&mut self, batch: &Batch, shutdown: &CancellationToken) -> Option<Written> {
        let started = Instant::now();
        loop {
            // Each attempt is bounded; an outage between attempts is not a wedged loop.
            self.health.oldest_work(Some(Instant::now()));
            let attempt = self
                .store
                .write(&self.settings.consumer, &batch.entries)
                .await;
            self.health.oldest_work(None);
            match attempt {
                Ok(written) => {
                    self.health.database(true);
                    self.database.recovered();
                    metrics::histogram!(metric::INBOX_WRITE_DURATION, "consumer" => self.settings.consumer.clone())
                        .record(started.elapsed().as_secs_f64());
                    return Some(written);
                }
                Err(err) => {
                    self.health.database(false);
                    let (failures, first) = self.database.failed();
                    if first {
                        metrics::counter!(metric::OUTAGES, "dependency" => "database").increment(1);
                        tracing::error!(
                            consumer = %self.settings.consumer,
                            messages = batch.entries.len(),
                            error = %ErrorChain(&err),
                            hint = err.hint(),
                            "inbox: database unavailable; consumption paused, nothing acknowledged"
                        );
                    }
                    let pause = backoff::delay(failures, BACKOFF_INITIAL, BACKOFF_MAX);
                    tokio::select! {
                        biased;
                        () = shutdown.cancelled() => return None,
                        () = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
    }

    /// Counts and logs what the batch's transaction did.
    fn report(&self, batch: &Batch, written: &Written) {
        let consumer = &self.settings.consumer;
        let count = |result: &'static str, n: u64| {
            if n > 0 {
                metrics::counter!(metric::INBOX_MESSAGES, "consumer" => consumer.clone(), "result" => result)
                    .increment(n);
            }
        };
        count("inserted", written.inserted);
        count("duplicate", written.duplicates);
        metrics::histogram!(metric::INBOX_BATCH_SIZE, "consumer" => consumer.clone())
            .record(batch.entries.len() as f64);
        let refused = |index: usize| written.refused.iter().find(|(i, _)| *i == index);
        for (index, entry) in batch.entries.iter().enumerate() {
            let (origin, reason) = match (entry, refused(index)) {
                (Entry::Rejected(r), _) => (&r.origin, r.reason.to_string()),
                (Entry::Row(row), Some((_, error))) => (
                    &row.origin,
                    super::Reason::Refused(error.clone()).to_string(),
                ),
                (Entry::Row(_), None) => continue,
            };
            let label = match entry {
                Entry::Rejected(r) => r.reason.label(),
                Entry::Row(_) => "refused_by_database",
            };
            count("rejected", 1);
            metrics::counter!(metric::INBOX_REJECTED, "consumer" => consumer.clone(), "reason" => label)
                .increment(1);
            tracing::warn!(
                consumer = %consumer,
                source = %origin.source,
                partition = origin.partition,
                offset = origin.offset,
                reason = %reason,
                "inbox: message rejected (recorded in the rejected table, acknowledged)"
            );
        }
    }

    /// Reconnects after `err`, with backoff, until it works; `false` when shutdown came first.
    async fn reconnect(&mut self, err: ConsumeError, shutdown: &CancellationToken) -> bool {
        let mut err = err;
        loop {
            let (failures, first) = self.broker.failed();
            let message = ErrorChain(&err).to_string();
            self.health.broker(Some(&message));
            if first {
                metrics::counter!(metric::OUTAGES, "dependency" => "broker").increment(1);
                tracing::error!(consumer = %self.settings.consumer, error = %message, "inbox: broker unavailable; reconnecting");
            }
            let pause = backoff::delay(failures, BACKOFF_INITIAL, BACKOFF_MAX);
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return false,
                () = tokio::time::sleep(pause) => {}
            }
            match self.consumer.reconnect().await {
                Ok(()) => return true,
                Err(next) => err = next,
            }
        }
    }
}

/// Beside the loop until `shutdown`: refreshes the inbox gauges (and the database's readiness
/// while no messages come) and deletes processed rows older than `keep_processed`.
pub(crate) async fn housekeeping<S: InboxStore>(
    store: S,
    consumer: String,
    keep_processed: Option<Duration>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(HOUSEKEEPING_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match store.status(&consumer).await {
            Ok(status) => {
                health.database(true);
                let label = || consumer.clone();
                metrics::gauge!(metric::INBOX_WAITING_ROWS, "consumer" => label())
                    .set(status.waiting as f64);
                metrics::gauge!(metric::INBOX_OLDEST_WAITING_AGE, "consumer" => label())
                    .set(status.oldest_waiting_age_s.unwrap_or(0.0));
            }
            Err(err) => {
                health.database(false);
                tracing::debug!(error = %ErrorChain(&err), "inbox: gauges not refreshed");
            }
        }
        let Some(keep) = keep_processed else {
            continue;
        };
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            match store
                .delete_processed(&consumer, keep, RETENTION_BATCH)
                .await
            {
                Ok(rows) => {
                    if rows > 0 {
                        metrics::counter!(metric::RETENTION_DELETED, "rows" => "inbox_processed")
                            .increment(rows);
                    }
                    if rows < u64::from(RETENTION_BATCH) {
                        break;
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %ErrorChain(&err), "inbox retention failed; retried at the next interval");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use super::*;
    use crate::broker::consumer::{Delivery, HeaderValue};
    use crate::database::DatabaseError;
    use crate::inbox::config::MissingEventId;
    use crate::inbox::store::InboxStatus;

    /// What the loop did, in order: a batch written (its size), receipts acknowledged.
    #[derive(Debug, PartialEq, Eq)]
    enum Step {
        Wrote(usize),
        Acked(Vec<i64>),
    }

    #[derive(Clone, Default)]
    struct MemoryStore(Arc<Mutex<Vec<Step>>>);

    impl InboxStore for MemoryStore {
        async fn write(&self, _: &str, entries: &[Entry]) -> Result<Written, DatabaseError> {
            self.0.lock().unwrap().push(Step::Wrote(entries.len()));
            Ok(Written {
                inserted: entries.len() as u64,
                ..Written::default()
            })
        }
        async fn status(&self, _: &str) -> Result<InboxStatus, DatabaseError> {
            unreachable!("the loop does not ask for status")
        }
        async fn delete_processed(
            &self,
            _: &str,
            _: Duration,
            _: u32,
        ) -> Result<u64, DatabaseError> {
            unreachable!("the loop does not delete")
        }
    }

    /// Hands out its messages, then cancels `done` (the test's shutdown) and has no more.
    struct MemoryConsumer {
        messages: VecDeque<Delivery>,
        steps: Arc<Mutex<Vec<Step>>>,
        done: CancellationToken,
    }

    impl Consumer for MemoryConsumer {
        async fn next(&mut self, _: Duration) -> Result<Option<Delivery>, ConsumeError> {
            let next = self.messages.pop_front();
            if next.is_none() {
                self.done.cancel();
            }
            Ok(next)
        }
        async fn acknowledge(&mut self, receipts: &[Receipt]) -> Result<(), ConsumeError> {
            let offsets = receipts
                .iter()
                .map(|r| match r {
                    Receipt::Kafka { offset, .. } => *offset,
                    Receipt::Amqp { .. } => unreachable!("kafka receipts only"),
                })
                .collect();
            self.steps.lock().unwrap().push(Step::Acked(offsets));
            Ok(())
        }
        async fn reconnect(&mut self) -> Result<(), ConsumeError> {
            unreachable!("the consumer never fails")
        }
        async fn close(&mut self) {}
    }

    fn message(offset: i64, body_bytes: usize) -> Delivery {
        Delivery {
            source: "orders".into(),
            position: Some((0, offset)),
            key: None,
            headers: vec![(
                "event_id".into(),
                HeaderValue::Bytes(format!("e{offset}").into()),
            )],
            message_id: None,
            kind: None,
            body: Some(vec![b'x'; body_bytes]),
            receipt: Receipt::Kafka {
                topic: "orders".into(),
                partition: 0,
                offset,
            },
        }
    }

    #[tokio::test]
    async fn a_batch_is_written_once_it_holds_max_batch_bytes_and_acknowledged_after_its_write() {
        // GIVEN ten messages of about 400 bytes, batches of at most 100 messages or 1 KiB
        let steps = Arc::new(Mutex::new(Vec::new()));
        let shutdown = CancellationToken::new();
        let consumer = MemoryConsumer {
            messages: (0..10).map(|offset| message(offset, 400)).collect(),
            steps: Arc::clone(&steps),
            done: shutdown.clone(),
        };
        let settings = IngestSettings {
            consumer: "billing".into(),
            rules: Rules {
                max_message_bytes: 1 << 20,
                missing_event_id: MissingEventId::Reject,
            },
            batch_size: 100,
            max_batch_bytes: 1024,
            batch_wait: Duration::from_millis(5),
        };
        let health = Arc::new(Health::new(Duration::from_secs(1), Duration::from_secs(60)));
        // WHEN the loop runs until the messages are gone
        Ingest::new(MemoryStore(Arc::clone(&steps)), consumer, settings, health)
            .run(&shutdown)
            .await;
        // THEN each batch closed at the third message (3 × ~410 bytes ≥ 1 KiB), and each was
        // acknowledged only after its write, with exactly its own receipts
        let steps = steps.lock().unwrap();
        assert_eq!(
            *steps,
            vec![
                Step::Wrote(3),
                Step::Acked(vec![0, 1, 2]),
                Step::Wrote(3),
                Step::Acked(vec![3, 4, 5]),
                Step::Wrote(3),
                Step::Acked(vec![6, 7, 8]),
                Step::Wrote(1),
                Step::Acked(vec![9]),
            ]
        );
    }
}
