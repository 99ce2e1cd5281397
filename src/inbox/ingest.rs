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
use crate::broker::consumer::{ConsumeError, Consumer, Delivery, Receipt};
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

    /// Runs until `shutdown`: the batches taken when it fires are still written and
    /// acknowledged (unless the database is down: then nothing more is acknowledged and the
    /// broker redelivers them), and the consumer leaves cleanly.
    ///
    /// While a batch is written, the next one is taken (at most two batches in memory): the
    /// database's commit and the broker's delivery overlap instead of taking turns.
    pub(crate) async fn run(mut self, shutdown: &CancellationToken) {
        // Messages taken and not yet written: taken while the batch before was written.
        let mut batch = Batch::default();
        // The consumer's error, once one came: nothing more is taken, what was taken is
        // written, then the consumer reconnects.
        let mut broken: Option<ConsumeError> = None;
        loop {
            if broken.is_none() {
                if let Err(err) = self.fill(&mut batch, shutdown).await {
                    broken = Some(err);
                }
            }
            let mut ahead = Batch::default();
            if !batch.receipts.is_empty() {
                let written = self
                    .write_taking_ahead(&batch, &mut ahead, &mut broken, shutdown)
                    .await;
                let Some(written) = written else {
                    break;
                };
                self.report(&batch, &written);
                if let Err(err) = self.consumer.acknowledge(&batch.receipts).await {
                    broken.get_or_insert(err);
                }
            }
            batch = ahead;
            if !batch.receipts.is_empty() {
                // Written (and acknowledged) before reconnecting or stopping.
                continue;
            }
            if let Some(err) = broken.take() {
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

    /// Completes `batch`: when it is empty, waits up to [`IDLE_WAIT`] for a first message;
    /// then up to `batch_wait` for more, taking what is already buffered until the batch is
    /// full. An error ends the batch (what was taken is still written).
    async fn fill(
        &mut self,
        batch: &mut Batch,
        shutdown: &CancellationToken,
    ) -> Result<(), ConsumeError> {
        if batch.receipts.is_empty() {
            let first = tokio::select! {
                biased;
                () = shutdown.cancelled() => return Ok(()),
                next = self.consumer.next(IDLE_WAIT) => next?,
            };
            if self.broker.recovered() {
                self.health.broker(None);
                ready_gauge(&self.settings.consumer, &self.health);
            }
            let Some(first) = first else {
                self.health.progress();
                return Ok(());
            };
            push(batch, first, &self.settings.rules);
        }
        let deadline = Instant::now() + self.settings.batch_wait;
        while !batch.is_full(&self.settings) {
            // With no time left this still takes what the client has buffered.
            let left = deadline.saturating_duration_since(Instant::now());
            match self.consumer.next(left).await? {
                Some(delivery) => push(batch, delivery, &self.settings.rules),
                None => break,
            }
        }
        Ok(())
    }

    /// Writes `batch` until it is durable and, meanwhile, takes messages into `ahead` (until
    /// it is full, shutdown, or the consumer's error, kept in `broken`). `None` when shutdown
    /// came while the database was down (nothing of the batch is acknowledged then).
    async fn write_taking_ahead(
        &mut self,
        batch: &Batch,
        ahead: &mut Batch,
        broken: &mut Option<ConsumeError>,
        shutdown: &CancellationToken,
    ) -> Option<Written> {
        let Self {
            store,
            consumer,
            settings,
            health,
            database,
            ..
        } = self;
        let write = write(store, settings, health, database, batch, shutdown);
        tokio::pin!(write);
        loop {
            let taking = broken.is_none() && !shutdown.is_cancelled() && !ahead.is_full(settings);
            tokio::select! {
                biased;
                written = &mut write => return written,
                // Wakes the loop so that it stops taking.
                () = shutdown.cancelled(), if taking => {}
                // Dropped, when the write finishes first: `next` is cancel-safe.
                next = consumer.next(IDLE_WAIT), if taking => match next {
                    Ok(Some(delivery)) => push(ahead, delivery, &settings.rules),
                    Ok(None) => {}
                    Err(err) => *broken = Some(err),
                },
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
                ready_gauge(&self.settings.consumer, &self.health);
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

/// Sets `outbox_relay_inbox_ready` from `health` (after each batch written, when an outage
/// starts or ends, and every housekeeping interval).
fn ready_gauge(consumer: &str, health: &Health) {
    let ready = health.readiness().is_ok();
    metrics::gauge!(metric::INBOX_READY, "consumer" => consumer.to_owned()).set(if ready {
        1.0
    } else {
        0.0
    });
}

/// Adds `delivery` to `batch`, decided into its entry.
fn push(batch: &mut Batch, delivery: Delivery, rules: &Rules) {
    let size = size(&delivery);
    batch.receipts.push(delivery.receipt.clone());
    batch.bytes += size;
    batch.entries.push(entry(delivery, size, rules));
}

/// Writes `batch` until it is durable; `None` when shutdown came while the database was down
/// (nothing of the batch is acknowledged then). `database` logs the outage once.
async fn write<S: InboxStore>(
    store: &S,
    settings: &IngestSettings,
    health: &Health,
    database: &mut Outage,
    batch: &Batch,
    shutdown: &CancellationToken,
) -> Option<Written> {
    let started = Instant::now();
    loop {
        // Each attempt is bounded; an outage between attempts is not a wedged loop.
        health.oldest_work(Some(Instant::now()));
        let attempt = store.write(&settings.consumer, &batch.entries).await;
        health.oldest_work(None);
        match attempt {
            Ok(written) => {
                health.database(true);
                database.recovered();
                ready_gauge(&settings.consumer, health);
                metrics::histogram!(metric::INBOX_WRITE_DURATION, "consumer" => settings.consumer.clone())
                    .record(started.elapsed().as_secs_f64());
                return Some(written);
            }
            Err(err) => {
                health.database(false);
                let (failures, first) = database.failed();
                if first {
                    ready_gauge(&settings.consumer, health);
                    metrics::counter!(metric::OUTAGES, "dependency" => "database").increment(1);
                    tracing::error!(
                        consumer = %settings.consumer,
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
        let status = store.status(&consumer).await;
        health.database(status.is_ok());
        ready_gauge(&consumer, &health);
        match status {
            Ok(status) => {
                let label = || consumer.clone();
                metrics::gauge!(metric::INBOX_WAITING_ROWS, "consumer" => label())
                    .set(status.waiting as f64);
                metrics::gauge!(metric::INBOX_OLDEST_WAITING_AGE, "consumer" => label())
                    .set(status.oldest_waiting_age_s.unwrap_or(0.0));
            }
            Err(err) => {
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
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::broker::consumer::HeaderValue;
    use crate::database::DatabaseError;
    use crate::inbox::config::MissingEventId;
    use crate::inbox::store::InboxStatus;

    /// What the loop did, in order.
    #[derive(Debug, PartialEq, Eq)]
    enum Step {
        /// The consumer handed out the message at this offset.
        Took(i64),
        /// A batch of this many messages was durable.
        Wrote(usize),
        /// These offsets were acknowledged.
        Acked(Vec<i64>),
    }

    type Steps = Arc<Mutex<Vec<Step>>>;

    /// Records each write; with `hold_first`, the first write finishes only once the consumer
    /// has handed out every message (as a slow commit would).
    #[derive(Clone)]
    struct MemoryStore {
        steps: Steps,
        hold_first: bool,
        drained: Arc<AtomicBool>,
    }

    impl InboxStore for MemoryStore {
        async fn write(&self, _: &str, entries: &[Entry]) -> Result<Written, DatabaseError> {
            let first = !self
                .steps
                .lock()
                .unwrap()
                .iter()
                .any(|s| matches!(s, Step::Wrote(_)));
            if self.hold_first && first {
                tokio::time::timeout(Duration::from_secs(5), async {
                    while !self.drained.load(Ordering::SeqCst) {
                        tokio::task::yield_now().await;
                    }
                })
                .await
                .expect("the consumer was drained while the first batch was written");
            }
            self.steps.lock().unwrap().push(Step::Wrote(entries.len()));
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
        steps: Steps,
        drained: Arc<AtomicBool>,
        done: CancellationToken,
    }

    impl Consumer for MemoryConsumer {
        async fn next(&mut self, _: Duration) -> Result<Option<Delivery>, ConsumeError> {
            let next = self.messages.pop_front();
            match &next {
                Some(delivery) => {
                    let (_, offset) = delivery.position.expect("kafka messages");
                    self.steps.lock().unwrap().push(Step::Took(offset));
                }
                None => self.done.cancel(),
            }
            self.drained
                .store(self.messages.is_empty(), Ordering::SeqCst);
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

    /// Runs the loop over `count` messages of about 400 bytes, batches of at most 100
    /// messages or 1 KiB, until the consumer has no more; what it did, in order.
    async fn ingest(count: i64, hold_first: bool) -> Vec<Step> {
        let steps = Steps::default();
        let drained = Arc::new(AtomicBool::new(false));
        let shutdown = CancellationToken::new();
        let consumer = MemoryConsumer {
            messages: (0..count).map(|offset| message(offset, 400)).collect(),
            steps: Arc::clone(&steps),
            drained: Arc::clone(&drained),
            done: shutdown.clone(),
        };
        let store = MemoryStore {
            steps: Arc::clone(&steps),
            hold_first,
            drained,
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
        Ingest::new(store, consumer, settings, health)
            .run(&shutdown)
            .await;
        std::mem::take(&mut *steps.lock().unwrap())
    }

    #[tokio::test]
    async fn a_batch_is_written_once_it_holds_max_batch_bytes_and_acknowledged_after_its_write() {
        // GIVEN seven messages of about 400 bytes and a database that commits at once
        // WHEN the loop runs until the messages are gone
        let steps = ingest(7, false).await;
        // THEN each batch closed at its third message (3 × ~410 bytes ≥ 1 KiB), and each was
        // acknowledged only after its write, with exactly its own receipts
        use Step::{Acked, Took, Wrote};
        assert_eq!(
            steps,
            vec![
                Took(0),
                Took(1),
                Took(2),
                Wrote(3),
                Acked(vec![0, 1, 2]),
                Took(3),
                Took(4),
                Took(5),
                Wrote(3),
                Acked(vec![3, 4, 5]),
                Took(6),
                Wrote(1),
                Acked(vec![6]),
            ]
        );
    }

    #[tokio::test]
    async fn the_next_batch_is_taken_while_one_is_written_and_acknowledged_only_after_its_own_write()
     {
        // GIVEN five messages and a first write that lasts until every message was handed out
        // WHEN the loop runs until the messages are gone
        let steps = ingest(5, true).await;
        // THEN the second batch was taken during the first write, the first batch was
        // acknowledged without the second's receipts, and the second only after its write
        use Step::{Acked, Took, Wrote};
        assert_eq!(
            steps,
            vec![
                Took(0),
                Took(1),
                Took(2),
                Took(3),
                Took(4),
                Wrote(3),
                Acked(vec![0, 1, 2]),
                Wrote(2),
                Acked(vec![3, 4]),
            ]
        );
    }
}
