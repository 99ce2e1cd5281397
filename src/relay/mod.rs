//! The relay loop: claim a batch, publish it, record the outcome, repeat.
//!
//! A claim takes up to `batch_size` rows; each batch is published concurrently and settled in a
//! few batched statements (mark published, record failures, release). Up to
//! `max_in_flight_batches` batches are with the broker while the next claim runs
//! ([`Relay::run`]). The loop drains without waiting while batches come back full and otherwise
//! waits for a NOTIFY wake-up or the poll interval. Shutdown stops claiming; batches in flight
//! get `shutdown_timeout` to finish.

pub(crate) mod backoff;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};

use chrono::Utc;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, OnDeadLetter, RetentionConfig, RetryConfig, SinkKind};
use crate::health::Health;
use crate::outbox::store::{self, Claimed, Failure, Store, StoreError};
use crate::outbox::{Batch, Lease, OutboxRow, Table, listener};
use crate::publisher::kafka::KafkaPublisher;
use crate::publisher::rabbitmq::RabbitMqPublisher;
use crate::publisher::template::Template;
use crate::publisher::{Allowed, ErrorClass, Publisher, Sink, dead_letter_copy};
use crate::telemetry::{ErrorChain, metric};

/// How the relay run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Stopped {
    /// Shutdown was requested and the batches in flight were settled.
    Clean,
    /// Batches in flight did not finish within `shutdown_timeout`; their unsettled rows were
    /// released (or will be re-claimed when their lease expires) and may be published twice.
    Abandoned,
}

/// A configured relay, ready to run.
#[derive(Debug)]
pub struct Relay {
    /// The outbox statements, over a lazily connected pool.
    store: Store,
    /// Separate one-connection pool for LISTEN, so the claim pool never loses a connection to it.
    listen_pool: Option<sqlx::PgPool>,
    /// The table, for the listener to resolve its NOTIFY channel.
    table: Table,
    /// Where events go.
    sink: Sink,
    /// Wake-ups from NOTIFY (a hint; the poll interval is the fallback).
    wakeup: Arc<Notify>,
    /// Held shared by every batch while it publishes and settles, and exclusively by a batch
    /// holding a crash suspect, which so runs alone: if it takes the relay down, no other
    /// row loses an attempt.
    quarantine: tokio::sync::RwLock<()>,
    batch_size: u32,
    /// Batches published at once (the next claim overlaps them).
    max_in_flight: usize,
    poll_interval: Duration,
    lease_duration: Duration,
    shutdown_timeout: Duration,
    summary_interval: Duration,
    retry: RetryConfig,
    /// `retry.dead_letter_destination`, parsed.
    dead_letter_destination: Option<Template>,
    /// Counters since the last summary line.
    stats: Stats,
    /// Outage bookkeeping so an outage is logged once when it starts and once when it ends.
    database: Outage,
    broker: Outage,
    /// Readiness state, served on `/readyz` when the HTTP listener is on.
    health: Arc<Health>,
    retention: RetentionConfig,
    /// Destinations used as metric label values so far (see `destination_label`).
    destination_labels: Mutex<HashSet<String>>,
    /// Leases this instance ended (by its mark) within the last [`ASYNC_COMMIT_WINDOW`]. The
    /// relay's sessions commit asynchronously, so a database crash can undo those deletes:
    /// the leases come back and hold their aggregates until they expire (`lease_duration`,
    /// two minutes by default). After a database outage they are deleted again
    /// (`Relay::forget_ended_leases`).
    ended_leases: Mutex<VecDeque<(Lease, Instant)>>,
}

/// How long an ended lease is remembered: far beyond the commits an asynchronous-commit crash
/// can lose (about three `wal_writer_delay`s, 600 ms by default).
const ASYNC_COMMIT_WINDOW: Duration = Duration::from_secs(10);

/// Most ended leases remembered (100 batches a second for the whole window).
const MAX_ENDED_LEASES: usize = 1000;

/// Most distinct `destination` label values; further destinations are counted as `other`.
const MAX_DESTINATION_LABELS: usize = 100;

#[derive(Debug, Default)]
struct Stats {
    published: AtomicU64,
    failed: AtomicU64,
    dead_lettered: AtomicU64,
}

#[derive(Debug)]
struct Outage {
    what: &'static str,
    /// Start of the current outage and how many consecutive failures it has seen.
    state: Mutex<Option<(Instant, u32)>>,
}

impl Outage {
    fn new(what: &'static str) -> Self {
        Self {
            what,
            state: Mutex::new(None),
        }
    }

    /// Records a failure; returns the number of consecutive failures and whether it is the first.
    fn failed(&self) -> (u32, bool) {
        let mut state = self.state.lock().expect("outage lock poisoned");
        let (_, streak) = state.get_or_insert((Instant::now(), 0));
        *streak += 1;
        (*streak, *streak == 1)
    }

    /// Ends the outage, if there was one; returns whether there was.
    fn recovered(&self) -> bool {
        let ended = self.state.lock().expect("outage lock poisoned").take();
        let Some((since, failures)) = ended else {
            return false;
        };
        metrics::counter!(metric::RECONNECTS, "dependency" => self.what).increment(1);
        tracing::info!(
            outage_ms = since.elapsed().as_millis() as u64,
            failures,
            "{} available again",
            self.what
        );
        true
    }
}

/// How often the backlog gauges are refreshed and, when idle, the broker is probed.
const BACKLOG_INTERVAL: Duration = Duration::from_secs(10);
/// How soon to claim again when the commit-order guard held rows back: the transactions it
/// waits for are usually the application's short inserts. Doubles, up to the poll interval,
/// while nothing can be claimed.
const HELD_BACK_RECHECK: Duration = Duration::from_millis(5);
/// How long an idle-time broker probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Work the relay task polls: a claim, or a batch being published and settled.
enum Done {
    Claimed(Result<Claimed, StoreError>),
    /// The idle-time broker probe's outcome.
    Probed(Result<(), String>),
    /// The summary line or the backlog gauges were written.
    Reported,
    /// Ended leases that a database crash may have brought back were deleted again.
    Forgotten,
    Settled {
        lease: Lease,
        /// The first transient or fatal broker error of the batch: pause.
        broker_error: Option<(ErrorClass, String)>,
    },
}

/// The label value for `rendered` given the values `known` so far (see
/// `Relay::destination_label`): known ones as they are; a new one only for an accepted
/// message (`published`) and while fewer than [`MAX_DESTINATION_LABELS`] are known; else
/// `other`.
fn bounded_label(known: &mut HashSet<String>, rendered: String, published: bool) -> String {
    if known.contains(&rendered) {
        return rendered;
    }
    if published && known.len() < MAX_DESTINATION_LABELS {
        known.insert(rendered.clone());
        return rendered;
    }
    "other".to_owned()
}

/// Adds `lease`, ended at `now`, to `ended`, dropping leases ended more than
/// [`ASYNC_COMMIT_WINDOW`] ago and the oldest beyond [`MAX_ENDED_LEASES`].
fn remember_ended(ended: &mut VecDeque<(Lease, Instant)>, lease: Lease, now: Instant) {
    while ended
        .front()
        .is_some_and(|(_, at)| now.duration_since(*at) > ASYNC_COMMIT_WINDOW)
        || ended.len() >= MAX_ENDED_LEASES
    {
        ended.pop_front();
    }
    ended.push_back((lease, now));
}

/// What transient failures in a batch mean.
#[derive(Debug, PartialEq, Eq)]
enum Transient {
    /// The broker took nothing: pause the relay; the rows keep their attempts.
    Outage,
    /// The broker acknowledged other rows (or there was no transient failure): the failing
    /// rows back off on their own.
    Defer,
}

/// Decides what a batch's transient failures mean (see [`Transient`]).
fn transient_outcome(nothing_acked: bool, transient_failures: usize) -> Transient {
    if nothing_acked && transient_failures > 0 {
        Transient::Outage
    } else {
        Transient::Defer
    }
}

/// Sleeps until `at`, or forever when `None` (the select branch is disabled then anyway).
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// What happened to a published batch.
#[derive(Debug, Default)]
struct Settled {
    /// The first transient or fatal broker error of the batch, if any.
    broker_error: Option<(ErrorClass, String)>,
    acked: usize,
}

impl Relay {
    /// Builds the relay from a validated configuration. Creating the producer checks the broker
    /// client's properties, so an error here is a configuration error. No connection is made.
    pub fn new(config: &Config) -> Result<Self, ConfigError> {
        let invalid = |key: &str, constraint: String| ConfigError::Invalid {
            key: key.to_owned(),
            constraint,
        };
        let pool = store::Connections::new(&config.database)
            .map_err(|_| invalid("database.url", "is not a valid PostgreSQL URL".to_owned()))?;
        let listen_pool = config.relay.listen.then(|| {
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(5))
                .connect_lazy_with(store::connect_options(&config.database).expect("parsed above"))
        });
        let table = config.table();
        let allowed = Allowed::new(&config.sink.allowed_destinations);
        let sink = match config.sink.kind {
            SinkKind::Kafka => {
                let kafka = config.sink.kafka.as_ref().expect("validated");
                Sink::Kafka(KafkaPublisher::new(kafka, allowed.clone()).map_err(|err| {
                    invalid(
                        "sink.kafka.properties",
                        format!("rejected by librdkafka: {err}"),
                    )
                })?)
            }
            SinkKind::Discard => Sink::Discard,
            SinkKind::Rabbitmq => {
                let rabbit = config.sink.rabbitmq.as_ref().expect("validated");
                Sink::RabbitMq(Box::new(RabbitMqPublisher::new(
                    rabbit,
                    format!("outbox-relay {table}"),
                    allowed.clone(),
                )?))
            }
        };
        Ok(Self {
            store: Store::new(
                pool,
                config.database.statement_timeout,
                &table,
                config.retry.on_dead_letter == OnDeadLetter::Park,
                config.relay.commit_order_guard,
                config.relay.max_batch_bytes,
            ),
            listen_pool,
            table,
            sink,
            wakeup: Arc::new(Notify::new()),
            quarantine: tokio::sync::RwLock::new(()),
            batch_size: config.relay.batch_size,
            max_in_flight: config.relay.max_in_flight_batches as usize,
            poll_interval: config.relay.poll_interval,
            lease_duration: config.relay.lease_duration,
            shutdown_timeout: config.relay.shutdown_timeout,
            summary_interval: config.relay.summary_interval,
            retry: config.retry.clone(),
            dead_letter_destination: config
                .retry
                .dead_letter_destination
                .as_deref()
                .map(|d| Template::parse(d).expect("validated in Config::validate")),
            stats: Stats::default(),
            database: Outage::new("database"),
            broker: Outage::new("broker"),
            health: Arc::new(Health::new(
                config.relay.poll_interval,
                Health::wedged_after(
                    config.relay.lease_duration,
                    config.database.statement_timeout,
                ),
            )),
            retention: config.retention.clone(),
            destination_labels: Mutex::new(HashSet::new()),
            ended_leases: Mutex::new(VecDeque::new()),
        })
    }

    /// Readiness state for the HTTP listener.
    pub fn health(&self) -> Arc<Health> {
        Arc::clone(&self.health)
    }

    /// The configured sink (for `check`).
    pub(crate) fn sink(&self) -> &Sink {
        &self.sink
    }

    /// Runs until `shutdown` is cancelled, then finishes the batches in flight (within
    /// `shutdown_timeout`), stops the listener and flushes the producer.
    ///
    /// Up to `max_in_flight_batches` batches are published at once, and the next claim runs
    /// while they are with the broker. Batches in flight never share an aggregate (the claim
    /// skips aggregates with a leased row), so they can complete in any order without
    /// reordering an aggregate. All work is polled by this one task; nothing is cancelled
    /// mid-statement or mid-publish.
    pub async fn run(self, shutdown: CancellationToken) -> Stopped {
        tracing::info!(
            table = %self.table,
            sink = %self.sink,
            batch_size = self.batch_size,
            max_in_flight_batches = self.max_in_flight,
            "relay started"
        );
        if matches!(self.sink, Sink::Discard) {
            tracing::warn!(
                "sink.kind = \"discard\": rows are marked published without being sent anywhere"
            );
        }
        let tasks_stop = shutdown.child_token();
        let listener = self.listen_pool.clone().map(|pool| {
            tokio::spawn(listener::run(
                pool,
                self.table.clone(),
                Arc::clone(&self.wakeup),
                tasks_stop.clone(),
            ))
        });

        let retention = tokio::spawn(crate::retention::run(
            self.store.clone(),
            self.retention.clone(),
            tasks_stop.clone(),
        ));

        let stopped = self.pipeline(&shutdown).await;

        tasks_stop.cancel();
        if let Err(err) = retention.await {
            tracing::error!(error = %err, "retention task failed");
        }
        if let Some(listener) = listener {
            if let Err(err) = listener.await {
                tracing::error!(error = %err, "listener task failed");
            }
        }
        tracing::info!("flushing producer");
        self.sink.flush(self.shutdown_timeout).await;
        self.summary(false).await;
        tracing::info!(clean = stopped == Stopped::Clean, "relay stopped");
        stopped
    }

    /// The main loop; see [`Relay::run`].
    async fn pipeline(&self, shutdown: &CancellationToken) -> Stopped {
        // Claims and batches in flight, polled together by this task.
        let mut work: FuturesUnordered<Pin<Box<dyn Future<Output = Done> + Send + '_>>> =
            FuturesUnordered::new();
        let mut claiming = false;
        // Leases of the batches in flight (released if shutdown times out).
        let mut leases: Vec<Lease> = Vec::new();
        // When the claim in flight and each batch in flight began, for liveness (`/healthz`).
        let mut claim_started: Option<Instant> = None;
        let mut batch_started: Vec<Instant> = Vec::new();
        // Whether to claim as soon as there is room: after a full batch, a settled batch, a
        // wake-up or a poll tick; not after a claim came back short.
        let mut want_claim = true;
        // Set while the broker or the database is failing: no claims until then.
        let mut paused_until: Option<Instant> = None;
        // Set when the commit-order guard held rows back: claim again then.
        let mut recheck_at: Option<Instant> = None;
        let mut recheck_delay = HELD_BACK_RECHECK;
        // The lease of a batch holding a crash suspect: no claims while it is in flight, so a
        // crash it causes costs no other row an attempt (see `isolate_abandoned`).
        let mut solo: Option<Lease> = None;
        // Set once shutdown is requested: the in-flight work must end by then.
        let mut deadline: Option<Instant> = None;
        let mut poll = tokio::time::interval(self.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut summary = tokio::time::interval(self.summary_interval);
        summary.reset();
        // Backlog gauges, and a broker probe while idle (so readiness notices a broker that
        // went away while no events flowed).
        let mut backlog = tokio::time::interval(BACKLOG_INTERVAL);
        let mut probing = false;
        // A summary or backlog query is running (one at a time).
        let mut reporting = false;

        loop {
            if deadline.is_none()
                && paused_until.is_none()
                && want_claim
                && !claiming
                && solo.is_none()
                && leases.len() < self.max_in_flight
            {
                claiming = true;
                claim_started = Some(Instant::now());
                want_claim = false;
                work.push(Box::pin(async {
                    Done::Claimed(self.store.claim(self.batch_size, self.lease_duration).await)
                }));
            }
            if deadline.is_some() && work.is_empty() {
                return Stopped::Clean;
            }
            self.health.oldest_work(
                claim_started
                    .into_iter()
                    .chain(batch_started.iter().copied())
                    .min(),
            );
            tokio::select! {
                biased;
                // 1. Shutdown: stop claiming; in-flight work gets `shutdown_timeout`.
                () = shutdown.cancelled(), if deadline.is_none() => {
                    deadline = Some(Instant::now() + self.shutdown_timeout);
                }
                () = sleep_until_opt(deadline), if deadline.is_some() => {
                    drop(work);
                    self.abandon(&leases).await;
                    return Stopped::Abandoned;
                }
                // 2. Finished work.
                Some(done) = work.next(), if !work.is_empty() => match done {
                    Done::Claimed(Ok(Claimed { batch, held_back })) => {
                        claiming = false;
                        claim_started = None;
                        if self.database_ok() {
                            work.push(Box::pin(async { self.forget_ended_leases().await; Done::Forgotten }));
                        }
                        let Some(batch) = batch else {
                            if held_back {
                                // Nothing claimable while rows wait for an open transaction:
                                // look again soon, then less often while it stays open (a long
                                // batch job writing to the outbox must not draw 200 claims a
                                // second).
                                recheck_at = Some(Instant::now() + recheck_delay);
                                recheck_delay = (recheck_delay * 2).min(self.poll_interval);
                            }
                            continue;
                        };
                        want_claim = batch.full;
                        recheck_delay = HELD_BACK_RECHECK;
                        if held_back && !want_claim {
                            recheck_at = Some(Instant::now() + recheck_delay);
                        }
                        leases.push(batch.lease);
                        batch_started.push(Instant::now());
                        if batch.rows.iter().any(|r| r.abandoned) {
                            solo = Some(batch.lease);
                        }
                        metrics::gauge!(metric::BATCHES_IN_FLIGHT).set(leases.len() as f64);
                        work.push(Box::pin(self.publish_and_settle(batch)));
                    }
                    Done::Reported => reporting = false,
                    // Aggregates a crash had locked again may be free.
                    Done::Forgotten => want_claim = true,
                    Done::Probed(outcome) => {
                        probing = false;
                        match outcome {
                            Ok(()) => self.broker_ok(),
                            Err(error) => {
                                paused_until = Some(Instant::now() + self.broker_failed(ErrorClass::Transient, &error));
                            }
                        }
                    }
                    Done::Claimed(Err(err)) => {
                        claiming = false;
                        claim_started = None;
                        paused_until = Some(Instant::now() + self.database_failed(&err));
                    }
                    Done::Settled { lease, broker_error } => {
                        if let Some(at) = leases.iter().position(|l| *l == lease) {
                            leases.remove(at);
                            batch_started.remove(at);
                        }
                        solo = solo.filter(|l| *l != lease);
                        metrics::gauge!(metric::BATCHES_IN_FLIGHT).set(leases.len() as f64);
                        // Settling frees the batch's aggregates: their next rows may be due.
                        want_claim = true;
                        if let Some((class, error)) = broker_error {
                            paused_until = Some(Instant::now() + self.broker_failed(class, &error));
                        }
                    }
                },
                // 3. End of a pause; rows held back by the commit-order guard due for a look.
                () = sleep_until_opt(paused_until), if paused_until.is_some() => {
                    paused_until = None;
                    want_claim = true;
                }
                () = sleep_until_opt(recheck_at), if recheck_at.is_some() => {
                    recheck_at = None;
                    want_claim = true;
                }
                // 4. Wake-ups: NOTIFY, the poll timer, the summary timer.
                () = self.wakeup.notified(), if !want_claim => want_claim = true,
                _ = poll.tick(), if !want_claim => want_claim = true,
                // The summary and the backlog gauges query the database: they run beside the
                // claim as work of their own, never awaited here, where they would leave an
                // open claim transaction unpolled (idle, holding the claim lock).
                _ = summary.tick(), if !reporting => {
                    reporting = true;
                    work.push(Box::pin(async { self.summary(true).await; Done::Reported }));
                }
                _ = backlog.tick() => {
                    if !reporting {
                        reporting = true;
                        work.push(Box::pin(async { self.refresh_backlog().await; Done::Reported }));
                    }
                    if leases.is_empty() && !probing && deadline.is_none() && paused_until.is_none() {
                        probing = true;
                        work.push(Box::pin(async { Done::Probed(self.sink.probe(PROBE_TIMEOUT).await) }));
                    }
                }
            }
        }
    }

    /// Returns whether this ended a database outage.
    fn database_ok(&self) -> bool {
        let recovered = self.database.recovered();
        self.health.database(true);
        self.update_ready();
        recovered
    }

    /// Deletes again the leases this instance ended shortly before a database outage (see
    /// `ended_leases`): when the outage was a crash that lost those commits, their rows are
    /// free at once instead of after `lease_duration` (they are published again: duplicates).
    async fn forget_ended_leases(&self) {
        let leases: Vec<Lease> = {
            let mut ended = self.ended_leases.lock().expect("lease list poisoned");
            ended.drain(..).map(|(lease, _)| lease).collect()
        };
        if leases.is_empty() {
            return;
        }
        match self.store.forget_leases(&leases).await {
            Ok(0) => {}
            Ok(back) => tracing::warn!(
                leases = back,
                "leases this instance had ended came back with a database crash (asynchronous commit); deleted again, their rows will be published again"
            ),
            Err(err) => tracing::warn!(
                error = %ErrorChain(&err),
                "cannot check for leases a database crash brought back; any such lease holds its rows until it expires"
            ),
        }
    }

    /// Remembers a lease this instance ended (see `ended_leases`).
    fn lease_ended(&self, lease: Lease) {
        let mut ended = self.ended_leases.lock().expect("lease list poisoned");
        remember_ended(&mut ended, lease, Instant::now());
    }

    fn broker_ok(&self) {
        let _ = self.broker.recovered();
        self.health.broker(None);
        self.update_ready();
    }

    fn update_ready(&self) {
        let ready = self.health.readiness().is_ok();
        metrics::gauge!(metric::READY).set(if ready { 1.0 } else { 0.0 });
    }

    /// Queries the pending rows and oldest pending age, sets the gauges, and returns them
    /// (`None` while the database is unavailable).
    async fn refresh_backlog(&self) -> Option<(i64, f64)> {
        let backlog = self.store.pending().await.ok().map(|(pending, oldest)| {
            let age = oldest.map_or(0.0, |t| {
                (Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0
            });
            metrics::gauge!(metric::PENDING_ROWS).set(pending as f64);
            metrics::gauge!(metric::OLDEST_PENDING_AGE).set(age);
            (pending, age)
        });
        self.update_ready();
        backlog
    }

    /// Records a batch's broker failure; returns how long to pause.
    fn broker_failed(&self, class: ErrorClass, error: &str) -> Duration {
        self.health.broker(Some(error));
        self.update_ready();
        let (streak, first) = self.broker.failed();
        if first {
            metrics::counter!(metric::OUTAGES, "dependency" => "broker").increment(1);
            if class == ErrorClass::Fatal {
                tracing::error!(error = %error, "broker producer failed, pausing publishing");
            } else {
                tracing::warn!(error = %error, "broker unavailable, pausing publishing");
            }
        }
        backoff::delay(streak, self.retry.initial_backoff, self.retry.max_backoff)
    }

    /// Moves the rows that are not to be sent into `failures`, and the later rows of their
    /// aggregates into `held_back`; returns whether there were any:
    /// - a row past its attempt budget (every earlier attempt ended without an outcome: it
    ///   crashed the relay each time) is dead-lettered without another try;
    /// - a row with a NULL where the message needs a value fails permanently (retried, then
    ///   dead-lettered), as the broker's rejection would.
    ///
    /// Later rows of such an aggregate wait while it may still be retried, or is parked.
    fn unpublishable(
        &self,
        batch: &Batch,
        failures: &mut Vec<Failure>,
        held_back: &mut Vec<i64>,
    ) -> bool {
        let budget = i64::from(self.retry.max_attempts);
        if batch
            .rows
            .iter()
            .all(|r| i64::from(r.attempts) <= budget && r.null_columns.is_empty())
        {
            return false;
        }
        let park = self.retry.on_dead_letter == OnDeadLetter::Park;
        let mut stopped: HashSet<&str> = HashSet::new();
        for row in &batch.rows {
            if stopped.contains(row.aggregate_id.as_str()) {
                held_back.push(row.id);
                continue;
            }
            let attempt = u32::try_from(row.attempts).unwrap_or(u32::MAX);
            let (error, dead) = if i64::from(row.attempts) > budget {
                let error = format!(
                    "attempt {} exceeds retry.max_attempts = {budget}: every earlier attempt ended without an outcome (the relay crashed, was killed or lost its lease while publishing this row)",
                    row.attempts
                );
                (error, true)
            } else if !row.null_columns.is_empty() {
                let error = format!(
                    "column {} is NULL; the message needs a value (add NOT NULL constraints, see `outbox-relay check`)",
                    row.null_columns.join(", ")
                );
                (error, attempt >= self.retry.max_attempts)
            } else {
                continue;
            };
            if dead {
                tracing::error!(
                    event_id = %row.event_id,
                    aggregate_id = %row.aggregate_id,
                    attempt = row.attempts,
                    error = %error,
                    "event dead-lettered"
                );
            } else {
                tracing::warn!(event_id = %row.event_id, attempt, error = %error, "publish failed, will retry");
            }
            if park || !dead {
                stopped.insert(&row.aggregate_id);
            }
            failures.push(Failure {
                id: row.id,
                error,
                retry_in: backoff::delay(
                    attempt,
                    self.retry.initial_backoff,
                    self.retry.max_backoff,
                ),
                dead,
                deferred: false,
            });
        }
        true
    }

    /// A batch holding a row whose last two attempts ended without an outcome publishes only
    /// that row (and any earlier rows of its aggregate): if the row is what crashes the relay,
    /// only it uses up further attempts, and its batch-mates, given back here without losing
    /// one, flow on. The row is dead-lettered once its attempts exceed `retry.max_attempts`.
    async fn isolate_abandoned(&self, batch: &mut Batch) {
        let Some(suspect) = batch.rows.iter().find(|r| r.abandoned) else {
            return;
        };
        if batch.rows.len() == 1 {
            return;
        }
        let (aggregate, last) = (suspect.aggregate_id.clone(), suspect.id);
        tracing::warn!(
            event_id = %suspect.event_id,
            aggregate_id = %suspect.aggregate_id,
            attempt = suspect.attempts,
            "publishing alone: its last two attempts ended without an outcome (crash, kill or lost lease)"
        );
        let (keep, others): (Vec<OutboxRow>, Vec<OutboxRow>) = std::mem::take(&mut batch.rows)
            .into_iter()
            .partition(|r| r.aggregate_id == aggregate && r.id <= last);
        batch.rows = keep;
        let ids: Vec<i64> = others.iter().map(|r| r.id).collect();
        // They leave the lease now, so a crash while the suspect publishes charges them nothing;
        // they are due again when the lease ends. On failure the lease runs out and they come
        // back then.
        let _ = self
            .settle("release", batch.lease, || {
                self.store.release(&ids, batch.lease, None)
            })
            .await;
    }

    /// Publishes copies of the batch's newly dead-lettered rows to
    /// `retry.dead_letter_destination`, if set. The table already records them; a copy that
    /// fails is logged (once per row) and not retried.
    async fn copy_dead_letters(&self, batch: &Batch, failures: &[Failure]) {
        let Some(destination) = &self.dead_letter_destination else {
            return;
        };
        let copies: Vec<OutboxRow> = failures
            .iter()
            .filter(|f| f.dead)
            .filter_map(|f| {
                let row = batch.rows.iter().find(|r| r.id == f.id)?;
                Some(dead_letter_copy(row, &f.error))
            })
            .collect();
        let outcomes = self.sink.publish_to(&copies, destination).await;
        for (row, outcome) in copies.iter().zip(outcomes) {
            let target = destination.render(row);
            match outcome {
                Ok(()) => {
                    tracing::info!(event_id = %row.event_id, destination = %target, "dead letter copied")
                }
                Err(err) => tracing::error!(
                    event_id = %row.event_id,
                    destination = %target,
                    error = %ErrorChain(&err),
                    "dead letter not copied to the dead-letter destination; it stays in the table"
                ),
            }
        }
    }

    async fn publish_and_settle(&self, mut batch: Batch) -> Done {
        self.isolate_abandoned(&mut batch).await;
        let started = Instant::now();
        let settled = if batch.rows.iter().any(|r| r.abandoned) {
            let _alone = self.quarantine.write().await;
            self.settle_batch(&batch).await
        } else {
            let _shared = self.quarantine.read().await;
            self.settle_batch(&batch).await
        };
        let sink = self.sink.to_string();
        metrics::histogram!(metric::BATCH_SIZE, "sink" => sink.clone())
            .record(batch.rows.len() as f64);
        metrics::histogram!(metric::BATCH_DURATION, "sink" => sink)
            .record(started.elapsed().as_secs_f64());
        tracing::debug!(
            rows = batch.rows.len(),
            acked = settled.as_ref().map_or(0, |s| s.acked),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "batch settled"
        );
        Done::Settled {
            lease: batch.lease,
            broker_error: settled.and_then(|s| s.broker_error),
        }
    }

    /// Publishes and records. `None` when recording failed for longer than the lease allows
    /// (the rows are published again later).
    async fn settle_batch(&self, batch: &Batch) -> Option<Settled> {
        let mut acked = Vec::new();
        let mut failures = Vec::new();
        let mut released = Vec::new();
        let mut held_back = Vec::new();
        // Rows whose destination is in trouble, and transient failures (decided below).
        let mut deferred: Vec<(&OutboxRow, String)> = Vec::new();
        let mut transient: Vec<(&OutboxRow, ErrorClass, String)> = Vec::new();
        let mut settled = Settled::default();
        // A row claimed more often than `max_attempts` had attempts that ended with no outcome
        // recorded: the relay died (or lost its lease) while publishing it, every time. It is
        // dead-lettered without another try, so a row that crashes the relay cannot keep it in
        // a crash loop; in park mode its aggregate's later rows in this batch wait with it.
        let unpublishable = self.unpublishable(batch, &mut failures, &mut held_back);
        let to_publish: Cow<'_, [OutboxRow]> = if unpublishable {
            let skip: HashSet<i64> = failures
                .iter()
                .map(|f| f.id)
                .chain(held_back.iter().copied())
                .collect();
            Cow::Owned(
                batch
                    .rows
                    .iter()
                    .filter(|r| !skip.contains(&r.id))
                    .cloned()
                    .collect(),
            )
        } else {
            Cow::Borrowed(&batch.rows)
        };
        let outcomes = self.sink.publish(&to_publish).await;
        for (row, outcome) in to_publish.iter().zip(outcomes) {
            let err = match outcome {
                Ok(()) => {
                    acked.push(row.id);
                    continue;
                }
                Err(err) => err,
            };
            let attempt = u32::try_from(row.attempts).unwrap_or(0);
            let class = err.class();
            if !err.is_collateral() {
                metrics::counter!(metric::PUBLISH_ERRORS, "sink" => self.sink.to_string(), "class" => class.label()).increment(1);
            }
            let error = ErrorChain(&err).to_string();
            match (class, &err) {
                (_, err) if err.is_collateral() => held_back.push(row.id),
                (ErrorClass::Destination, _) => {
                    tracing::debug!(event_id = %row.event_id, deferrals = row.deferrals, error = %error, "destination in trouble");
                    deferred.push((row, error));
                }
                (ErrorClass::Permanent, _) => {
                    let dead = attempt >= self.retry.max_attempts;
                    let retry_in =
                        backoff::delay(attempt, self.retry.initial_backoff, self.retry.max_backoff);
                    if dead {
                        let later_rows = match self.retry.on_dead_letter {
                            OnDeadLetter::Park => "parked until `outbox-relay requeue`",
                            OnDeadLetter::Skip => "published without it (order broken)",
                        };
                        tracing::error!(
                            event_id = %row.event_id,
                            aggregate_id = %row.aggregate_id,
                            attempt,
                            error = %error,
                            later_rows,
                            "event dead-lettered"
                        );
                    } else {
                        tracing::warn!(
                            event_id = %row.event_id,
                            attempt,
                            retry_in_ms = retry_in.as_millis() as u64,
                            error = %error,
                            "publish failed, will retry"
                        );
                    }
                    failures.push(Failure {
                        id: row.id,
                        error,
                        retry_in,
                        dead,
                        deferred: false,
                    });
                }
                (ErrorClass::Transient | ErrorClass::Fatal, _) => {
                    tracing::debug!(event_id = %row.event_id, attempt, error = %error, "publish failed transiently");
                    transient.push((row, class, error));
                }
            }
        }
        if !acked.is_empty() {
            self.broker_ok();
        }
        // Transient failures beside acknowledgements in one batch are not an outage: the broker
        // took other messages, so the trouble is these rows' destinations (a partition without
        // a leader or enough in-sync replicas times out while the others are acknowledged).
        // They back off on their own instead of pausing the relay; without any acknowledgement
        // it is an outage, and the rows are given back for when the broker returns.
        match transient_outcome(acked.is_empty(), transient.len()) {
            Transient::Outage => {
                for (row, class, error) in transient {
                    settled.broker_error.get_or_insert((class, error));
                    released.push(row.id);
                }
            }
            Transient::Defer => {
                deferred.extend(transient.into_iter().map(|(row, _, error)| (row, error)));
            }
        }
        if let Some((first, error)) = deferred.first() {
            tracing::warn!(
                rows = deferred.len(),
                event_id = %first.event_id,
                deferrals = first.deferrals + 1,
                error = %error,
                "destination in trouble: its rows back off without using an attempt; other destinations flow"
            );
        }
        for (row, error) in deferred {
            let deferrals = u32::try_from(row.deferrals).unwrap_or(0).saturating_add(1);
            failures.push(Failure {
                id: row.id,
                error,
                retry_in: backoff::delay(
                    deferrals,
                    self.retry.initial_backoff,
                    self.retry.max_backoff,
                ),
                dead: false,
                deferred: true,
            });
        }
        settled.acked = acked.len();
        failures.sort_unstable_by_key(|f| f.id);

        // The mark comes last: it also ends the lease, which frees the batch's aggregates.
        let recorded = self
            .settle("retry", batch.lease, || {
                self.store.record_failures(&failures, batch.lease)
            })
            .await?;
        let dead = failures.iter().filter(|f| f.dead).count() as u64;
        let charged = failures.iter().filter(|f| !f.deferred).count() as u64;
        self.stats.dead_lettered.fetch_add(dead, Ordering::Relaxed);
        if dead > 0 {
            self.copy_dead_letters(batch, &failures).await;
        }
        self.stats
            .failed
            .fetch_add(charged - dead, Ordering::Relaxed);
        // Transient failures keep their attempt; the batch's (first) error is kept on the rows
        // for operators to see.
        let outage_error = settled.broker_error.as_ref().map(|(_, e)| e.as_str());
        let released_rows = self
            .settle("release", batch.lease, || {
                self.store.release(&released, batch.lease, outage_error)
            })
            .await?
            + self
                .settle("release", batch.lease, || {
                    self.store.release(&held_back, batch.lease, None)
                })
                .await?;
        let marked = self
            .settle("mark", batch.lease, || {
                self.store.finish(&acked, batch.lease)
            })
            .await?;
        self.lease_ended(batch.lease);
        self.stats.published.fetch_add(marked, Ordering::Relaxed);
        self.count_outcomes(batch, &acked, &failures);
        // Every statement above is fenced by the lease: rows it did not touch were taken over
        // by another instance after this one's lease ran out (it was paused or too slow).
        let expected = acked.len() + failures.len() + released.len() + held_back.len();
        let settled_rows = marked + recorded + released_rows;
        if settled_rows < expected as u64 {
            metrics::counter!(metric::LEASES_LOST).increment(1);
            tracing::warn!(
                rows = expected,
                settled = settled_rows,
                acked = acked.len(),
                marked,
                "lease lost: rows were taken over by another instance; the acknowledged ones were published twice"
            );
        }
        Some(settled)
    }

    /// Per-destination counters and the commit-to-ack latency of the acknowledged rows.
    fn count_outcomes(&self, batch: &Batch, acked: &[i64], failures: &[Failure]) {
        let sink = self.sink.to_string();
        let now = Utc::now();
        let mut published: HashMap<String, u64> = HashMap::new();
        let mut failed: HashMap<(String, bool), u64> = HashMap::new();
        let latency = metrics::histogram!(metric::PUBLISH_LATENCY, "sink" => sink.clone());
        let mut acked = acked.iter().peekable();
        let mut failures = failures.iter().peekable();
        for row in &batch.rows {
            if acked.next_if(|id| **id == row.id).is_some() {
                *published
                    .entry(self.destination_label(row, true))
                    .or_default() += 1;
                latency.record(
                    (now - row.created_at)
                        .num_microseconds()
                        .unwrap_or(0)
                        .max(0) as f64
                        / 1e6,
                );
            } else if let Some(failure) = failures.next_if(|f| f.id == row.id) {
                if failure.deferred {
                    continue;
                }
                *failed
                    .entry((self.destination_label(row, false), failure.dead))
                    .or_default() += 1;
            }
        }
        for (destination, n) in published {
            metrics::counter!(metric::EVENTS_PUBLISHED, "sink" => sink.clone(), "destination" => destination).increment(n);
        }
        for ((destination, dead), n) in failed {
            let name = if dead {
                metric::EVENTS_DEAD_LETTERED
            } else {
                metric::EVENTS_FAILED
            };
            metrics::counter!(name, "sink" => sink.clone(), "destination" => destination)
                .increment(n);
        }
    }

    /// The `destination` label for `row`'s counters. Row data must not make label values
    /// unbounded: a destination becomes a label once the broker accepted a message for it
    /// (`published`), up to [`MAX_DESTINATION_LABELS`]; anything else, rejected destinations
    /// included, is counted as `other`.
    fn destination_label(&self, row: &OutboxRow, published: bool) -> String {
        let mut known = self.destination_labels.lock().expect("label lock poisoned");
        bounded_label(&mut known, self.sink.destination(row), published)
    }

    /// Runs a settling statement, retrying database errors until the lease is about to expire.
    async fn settle<'a, F, Fut>(&self, op: &'static str, lease: Lease, statement: F) -> Option<u64>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<u64, StoreError>> + 'a,
    {
        let mut attempt = 0;
        loop {
            match statement().await {
                Ok(rows) => {
                    // The database is back (also when no claim has run since it failed:
                    // with every batch slot taken by a settling batch, none does).
                    if attempt > 0 && self.database_ok() {
                        self.forget_ended_leases().await;
                    }
                    return Some(rows);
                }
                Err(err) => {
                    attempt += 1;
                    // An outage like any other: logged once, `/readyz` and the metrics say so.
                    let _ = self.database_failed(&err);
                    let delay =
                        backoff::delay(attempt, Duration::from_millis(100), Duration::from_secs(5));
                    let expires_in = (lease.until - Utc::now()).to_std().unwrap_or_default();
                    if delay >= expires_in {
                        tracing::error!(
                            op,
                            error = %ErrorChain(&err),
                            "cannot record the batch outcome before the lease expires; its rows will be published again"
                        );
                        return None;
                    }
                    if attempt == 1 {
                        // The error itself was logged with the outage, just above.
                        tracing::debug!(op, error = %ErrorChain(&err), "cannot record the batch outcome, retrying");
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Shutdown deadline passed with batches in flight: give their rows back so the next owner
    /// need not wait for the lease. Rows already marked are untouched (fenced by the lease).
    async fn abandon(&self, leases: &[Lease]) {
        for lease in leases {
            let released =
                tokio::time::timeout(Duration::from_secs(2), self.store.release_lease(*lease))
                    .await;
            match released {
                Ok(Ok(rows)) => tracing::warn!(
                    released = rows,
                    "shutdown timeout reached with a batch in flight; its unacknowledged rows were released and may be published twice"
                ),
                Ok(Err(err)) => {
                    tracing::error!(error = %ErrorChain(&err), "shutdown timeout reached; could not release the in-flight rows, they wait for their lease to expire")
                }
                Err(_) => tracing::error!(
                    "shutdown timeout reached; releasing the in-flight rows timed out, they wait for their lease to expire"
                ),
            }
        }
    }

    fn database_failed(&self, err: &StoreError) -> Duration {
        self.health.database(false);
        self.update_ready();
        let (streak, first) = self.database.failed();
        if first {
            metrics::counter!(metric::OUTAGES, "dependency" => "database").increment(1);
            match err.hint() {
                Some(hint) => {
                    tracing::error!(error = %ErrorChain(err), hint, "database unavailable, retrying")
                }
                None => tracing::warn!(error = %ErrorChain(err), "database unavailable, retrying"),
            }
        }
        backoff::delay(streak, self.retry.initial_backoff, self.retry.max_backoff)
    }

    /// The periodic info line: what happened since the last one, and (with `backlog`) the
    /// pending count and oldest pending age.
    async fn summary(&self, backlog: bool) {
        let published = self.stats.published.swap(0, Ordering::Relaxed);
        let failed = self.stats.failed.swap(0, Ordering::Relaxed);
        let dead_lettered = self.stats.dead_lettered.swap(0, Ordering::Relaxed);
        if !backlog {
            tracing::info!(published, failed, dead_lettered, "relay summary");
            return;
        }
        match self.refresh_backlog().await {
            Some((pending, oldest_pending_age_s)) => {
                tracing::info!(
                    published,
                    failed,
                    dead_lettered,
                    pending,
                    oldest_pending_age_s,
                    "relay summary"
                );
            }
            None => tracing::info!(
                published,
                failed,
                dead_lettered,
                "relay summary (backlog unknown)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        ASYNC_COMMIT_WINDOW, Lease, MAX_DESTINATION_LABELS, MAX_ENDED_LEASES, Transient,
        bounded_label, remember_ended, transient_outcome,
    };
    use std::collections::{HashSet, VecDeque};
    use std::time::{Duration, Instant};

    #[test]
    fn destination_labels_stay_bounded_and_never_come_from_rejected_rows() {
        let mut known = HashSet::new();
        assert_eq!(
            bounded_label(&mut known, "rejected.topic".into(), false),
            "other",
            "a destination the broker never accepted is not a label"
        );
        assert_eq!(bounded_label(&mut known, "orders".into(), true), "orders");
        assert_eq!(
            bounded_label(&mut known, "orders".into(), false),
            "orders",
            "failures of a known destination keep its label"
        );
        for n in 1..MAX_DESTINATION_LABELS {
            bounded_label(&mut known, format!("t{n}"), true);
        }
        assert_eq!(known.len(), MAX_DESTINATION_LABELS);
        assert_eq!(bounded_label(&mut known, "one.more".into(), true), "other");
        assert_eq!(known.len(), MAX_DESTINATION_LABELS);
    }

    #[test]
    fn ended_leases_are_remembered_for_the_window_and_up_to_the_bound() {
        let lease = |id| Lease {
            id,
            until: chrono::Utc::now(),
        };
        let start = Instant::now();
        let mut ended = VecDeque::new();
        remember_ended(&mut ended, lease(1), start);
        remember_ended(&mut ended, lease(2), start + Duration::from_secs(5));
        // past the window of the first one only
        remember_ended(
            &mut ended,
            lease(3),
            start + ASYNC_COMMIT_WINDOW + Duration::from_secs(1),
        );
        let ids: Vec<i64> = ended.iter().map(|(l, _)| l.id).collect();
        assert_eq!(ids, [2, 3]);
        let later = start + ASYNC_COMMIT_WINDOW * 2;
        for id in 0..(MAX_ENDED_LEASES as i64 + 10) {
            remember_ended(&mut ended, lease(id), later);
        }
        assert_eq!(ended.len(), MAX_ENDED_LEASES);
        assert_eq!(
            ended.back().map(|(l, _)| l.id),
            Some(MAX_ENDED_LEASES as i64 + 9)
        );
    }

    #[test]
    fn transient_failures_are_an_outage_only_when_the_broker_took_nothing() {
        assert_eq!(transient_outcome(true, 3), Transient::Outage);
        assert_eq!(
            transient_outcome(false, 3),
            Transient::Defer,
            "other rows were acknowledged: their destinations are fine, these rows' are not"
        );
        assert_eq!(transient_outcome(true, 0), Transient::Defer);
    }
}
