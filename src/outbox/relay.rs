//! The relay loop: claim a batch, publish it, settle it, repeat.
//!
//! A claim takes up to `batch_size` rows; each batch is published concurrently and settled in a
//! few batched statements (mark published, record failures, release). Up to
//! `max_in_flight_batches` batches are with the broker while the next claim runs
//! ([`Relay::run`]). The loop drains without waiting while batches come back full; otherwise it
//! polls adaptively: soon after a claim that found rows (more are likely arriving), then at
//! doubling intervals while claims come back empty, up to `poll_interval` when idle. A
//! wake-up (NOTIFY) claims at once. Shutdown stops claiming; batches in flight get
//! `shutdown_timeout` to finish.
//!
//! The loop is written against its collaborators' contracts, [`Store`] and [`Producer`],
//! which it is given; what a batch's outcomes mean is decided by [`settlement`], and the loop's
//! state between iterations is one [`LoopState`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::config::{RelayConfig, RetryPolicy};
use super::dead_letter::dead_letter_copy;
use super::settlement::{self, Note, Settlement};
use super::store::{Claimed, Store};
use super::{Batch, Lease, OutboxRow};
use crate::broker::{ErrorClass, Outcome, ProbeError, Producer};
use crate::database::DatabaseError;
use crate::health::Health;
use crate::runtime::backoff;
use crate::runtime::outage::Outage;
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

/// The outbox relay: the loop over one store and one producer.
#[derive(Debug)]
pub(crate) struct Relay<S, P> {
    /// The outbox table's statements.
    store: S,
    /// Where events go.
    producer: P,
    /// Wake-ups (NOTIFY, from the listener): a hint; the poll interval is the fallback.
    wakeup: Arc<Notify>,
    /// Held shared by every batch while it publishes and settles, and exclusively by a batch
    /// holding a crash suspect, which so runs alone: if it takes the relay down, no other
    /// row loses an attempt.
    quarantine: tokio::sync::RwLock<()>,
    /// `[relay]`.
    settings: RelayConfig,
    /// `[retry]`: what failed rows do.
    retry: RetryPolicy,
    /// Counters since the last summary line.
    stats: Stats,
    /// Outage bookkeeping so an outage is logged once when it starts and once when it ends.
    database: Outage,
    broker: Outage,
    /// Readiness state, served on `/readyz` when the HTTP listener is on.
    health: Arc<Health>,
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

/// How often the backlog gauges are refreshed and, when idle, the broker is probed.
const BACKLOG_INTERVAL: Duration = Duration::from_secs(10);
/// How soon to claim again after a claim that found rows but not a full batch (rows are
/// arriving: the next ones are likely committed within milliseconds), or that found rows held
/// back by the commit-order guard (the transactions it waits for are usually the
/// application's short inserts). Doubles, up to `relay.poll_interval`, while claims come
/// back empty ([`LoopState::claimed_nothing`]).
const ACTIVE_POLL: Duration = Duration::from_millis(5);
/// How long an idle-time broker probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct Stats {
    published: AtomicU64,
    failed: AtomicU64,
    dead_lettered: AtomicU64,
}

/// Work the relay task polls, and what it came back with.
enum Done {
    /// A claim finished.
    Claimed(Result<Claimed, DatabaseError>),
    /// The idle-time broker probe finished.
    Probed(Result<(), ProbeError>),
    /// The summary line or the backlog gauges were written.
    Reported,
    /// Ended leases that a database crash may have brought back were deleted again.
    Forgotten,
    /// A batch was published and settled (or its settling given up).
    Settled {
        lease: Lease,
        /// The broker took nothing of the batch and failed transiently or fatally: pause.
        outage: Option<(ErrorClass, String)>,
    },
}

/// The work in flight, polled together by the relay task.
type Work<'a> = FuturesUnordered<Pin<Box<dyn Future<Output = Done> + Send + 'a>>>;

/// The loop's state between two turns: what is in flight, and what the loop waits for.
#[derive(Debug)]
struct LoopState {
    /// When the claim in flight began; `None`: no claim in flight. Also for liveness
    /// (`/healthz`).
    claim_started: Option<Instant>,
    /// The batches with the broker or being settled: the lease of each (released if shutdown
    /// times out) and when it began (liveness).
    in_flight: Vec<(Lease, Instant)>,
    /// `relay.max_in_flight_batches`.
    max_in_flight: usize,
    /// Claim as soon as there is room: after a full batch, a settled batch, a wake-up or a
    /// poll tick; not after a claim came back short.
    want_claim: bool,
    /// Set while the broker or the database is failing: no claims until then.
    paused_until: Option<Instant>,
    /// When to claim next unless something else (a settled batch, a wake-up) wants a claim
    /// sooner; set whenever a claim comes back short. `None` while a claim is running.
    next_poll: Option<Instant>,
    /// The wait before the next poll: [`ACTIVE_POLL`] after a claim that found rows, doubling
    /// while claims find none, up to `poll_interval` (adaptive polling; `relay.poll_interval` is
    /// at least 10 ms, never below [`ACTIVE_POLL`]).
    poll_delay: Duration,
    /// `relay.poll_interval`: the longest wait between claims, that of an idle relay.
    poll_interval: Duration,
    /// The last claim saw rows the commit-order guard held back.
    held_back: bool,
    /// The lease of a batch holding a crash suspect: no claims while it is in flight, so a
    /// crash it causes costs no other row an attempt (see `Relay::isolate_abandoned`).
    solo: Option<Lease>,
    /// Set once shutdown is requested: the in-flight work must end by then.
    deadline: Option<Instant>,
    /// An idle-time broker probe is running.
    probing: bool,
    /// A summary or backlog query is running (one at a time).
    reporting: bool,
}

impl LoopState {
    fn new(max_in_flight: usize, poll_interval: Duration) -> Self {
        Self {
            claim_started: None,
            in_flight: Vec::new(),
            max_in_flight,
            want_claim: true,
            paused_until: None,
            next_poll: None,
            poll_delay: ACTIVE_POLL,
            poll_interval,
            held_back: false,
            solo: None,
            deadline: None,
            probing: false,
            reporting: false,
        }
    }

    /// Whether to start a claim now: one is wanted, none is running, a batch slot is free,
    /// and the loop is neither stopping, pausing, nor running a crash suspect alone.
    fn can_claim(&self) -> bool {
        self.want_claim
            && self.claim_started.is_none()
            && self.in_flight.len() < self.max_in_flight
            && self.solo.is_none()
            && self.paused_until.is_none()
            && !self.stopping()
    }

    /// Shutdown was requested.
    fn stopping(&self) -> bool {
        self.deadline.is_some()
    }

    /// Whether to probe the broker: nothing is in flight that would show whether it answers,
    /// and the loop is not pausing or stopping.
    fn can_probe(&self) -> bool {
        self.in_flight.is_empty()
            && !self.probing
            && self.paused_until.is_none()
            && !self.stopping()
    }

    /// When the oldest claim or batch in flight began (for liveness).
    fn oldest_work(&self) -> Option<Instant> {
        self.claim_started
            .into_iter()
            .chain(self.in_flight.iter().map(|(_, started)| *started))
            .min()
    }

    /// A claim starts now.
    fn claim_started(&mut self, now: Instant) {
        self.claim_started = Some(now);
        self.want_claim = false;
        self.next_poll = None;
    }

    /// A claim came back with nothing: poll again after the current delay, then double it,
    /// up to the poll interval, so an idle relay settles at one claim per `poll_interval`.
    /// Rows newly held back by the commit-order guard (committed while a writer that may
    /// precede them is still open) start over at [`ACTIVE_POLL`]: the writers it waits for are
    /// usually short; while they stay open the delay doubles again (a long batch job writing
    /// to the outbox must not draw 200 claims a second).
    ///
    /// While batches are in flight an empty claim says nothing about the table: the due rows
    /// may all belong to aggregates those batches hold. The loop claims again when one
    /// settles ([`LoopState::settled`]), and the delay does not grow.
    fn claimed_nothing(&mut self, held_back: bool, now: Instant) {
        self.claim_started = None;
        if held_back && !self.held_back {
            self.poll_delay = ACTIVE_POLL;
        }
        self.held_back = held_back;
        self.next_poll = Some(now + self.poll_delay);
        if self.in_flight.is_empty() {
            self.poll_delay = (self.poll_delay * 2).min(self.poll_interval);
        }
    }

    /// A claim came back with a batch, now in flight. A full batch claims again at once; a
    /// short one polls again after [`ACTIVE_POLL`], since rows are arriving.
    fn claimed(&mut self, batch: &Batch, held_back: bool, now: Instant) {
        self.claim_started = None;
        self.held_back = held_back;
        self.want_claim = batch.full;
        self.poll_delay = ACTIVE_POLL;
        if !self.want_claim {
            self.next_poll = Some(now + self.poll_delay);
        }
        self.in_flight.push((batch.lease, now));
        if batch.rows.iter().any(|r| r.abandoned) {
            self.solo = Some(batch.lease);
        }
    }

    /// The batch of `lease` is settled: its aggregates are free, their next rows may be due.
    fn settled(&mut self, lease: Lease) {
        self.in_flight.retain(|(l, _)| *l != lease);
        self.solo = self.solo.filter(|l| *l != lease);
        self.want_claim = true;
    }

    /// Leases of the batches in flight.
    fn leases(&self) -> Vec<Lease> {
        self.in_flight.iter().map(|(lease, _)| *lease).collect()
    }
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

/// Sleeps until `at`, or forever when `None` (the select branch is disabled then anyway).
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Writes a settlement's note as its log line.
fn log_note(note: &Note) {
    match note {
        Note::DeadLettered {
            event_id,
            aggregate_id,
            attempt,
            error,
            later_rows,
        } => tracing::error!(
            event_id = %event_id,
            aggregate_id = %aggregate_id,
            attempt,
            error = %error,
            later_rows,
            "event dead-lettered"
        ),
        Note::WillRetry {
            event_id,
            attempt,
            retry_in,
            error,
        } => tracing::warn!(
            event_id = %event_id,
            attempt,
            retry_in_ms = retry_in.as_millis() as u64,
            error = %error,
            "publish failed, will retry"
        ),
        Note::FailedTransiently {
            event_id,
            attempt,
            error,
        } => {
            tracing::debug!(event_id = %event_id, attempt, error = %error, "publish failed transiently")
        }
        Note::Deferred {
            rows,
            event_id,
            deferrals,
            error,
        } => tracing::warn!(
            rows,
            event_id = %event_id,
            deferrals,
            error = %error,
            "destination in trouble: its rows back off without using an attempt; other destinations flow"
        ),
    }
}

impl<S: Store, P: Producer> Relay<S, P> {
    /// A relay over `store` and `producer`; `wakeup` is notified when rows may be waiting
    /// (NOTIFY), `health` is what `/readyz` and `/healthz` serve.
    pub(crate) fn new(
        store: S,
        producer: P,
        settings: RelayConfig,
        retry: RetryPolicy,
        health: Arc<Health>,
        wakeup: Arc<Notify>,
    ) -> Self {
        Self {
            store,
            producer,
            wakeup,
            quarantine: tokio::sync::RwLock::new(()),
            settings,
            retry,
            stats: Stats::default(),
            database: Outage::new("database"),
            broker: Outage::new("broker"),
            health,
            destination_labels: Mutex::new(HashSet::new()),
            ended_leases: Mutex::new(VecDeque::new()),
        }
    }

    /// Runs until `shutdown` is cancelled, then finishes the batches in flight (within
    /// `shutdown_timeout`) and flushes the producer.
    ///
    /// Up to `max_in_flight_batches` batches are published at once, and the next claim runs
    /// while they are with the broker. Batches in flight never share an aggregate (the claim
    /// skips aggregates with a leased row), so they can complete in any order without
    /// reordering an aggregate. All work is polled by this one task; nothing is cancelled
    /// mid-statement or mid-publish.
    pub(crate) async fn run(&self, shutdown: &CancellationToken) -> Stopped {
        let stopped = self.pipeline(shutdown).await;
        tracing::info!("flushing producer");
        self.producer.flush(self.settings.shutdown_timeout).await;
        self.summary(false).await;
        tracing::info!(clean = stopped == Stopped::Clean, "relay stopped");
        stopped
    }

    /// The main loop; see [`Relay::run`]. Each `select!` branch, in priority order, hands its
    /// event to one `handle_*` method; the state they share is one [`LoopState`].
    async fn pipeline(&self, shutdown: &CancellationToken) -> Stopped {
        let mut work: Work<'_> = FuturesUnordered::new();
        let mut state = LoopState::new(
            self.settings.max_in_flight_batches as usize,
            self.settings.poll_interval,
        );
        let mut summary = tokio::time::interval(self.settings.summary_interval);
        summary.reset();
        // Backlog gauges, and a broker probe while idle (so readiness notices a broker that
        // went away while no events flowed).
        let mut backlog = tokio::time::interval(BACKLOG_INTERVAL);

        loop {
            if state.can_claim() {
                state.claim_started(Instant::now());
                work.push(Box::pin(async {
                    Done::Claimed(
                        self.store
                            .claim(self.settings.batch_size, self.settings.lease_duration)
                            .await,
                    )
                }));
            }
            if state.stopping() && work.is_empty() {
                return Stopped::Clean;
            }
            self.health.oldest_work(state.oldest_work());
            tokio::select! {
                biased;
                // 1. Shutdown: stop claiming; in-flight work gets `shutdown_timeout`.
                () = shutdown.cancelled(), if !state.stopping() => self.handle_shutdown(&mut state),
                () = sleep_until_opt(state.deadline), if state.stopping() => {
                    drop(work);
                    return self.handle_deadline(&state).await;
                }
                // 2. Finished work.
                Some(done) = work.next(), if !work.is_empty() => match done {
                    Done::Claimed(Ok(claimed)) => self.handle_claimed(&mut state, &mut work, claimed),
                    Done::Claimed(Err(err)) => self.handle_claim_failed(&mut state, &err),
                    Done::Settled { lease, outage } => self.handle_settled(&mut state, lease, outage),
                    Done::Probed(outcome) => self.handle_probed(&mut state, outcome),
                    Done::Reported => state.reporting = false,
                    // Aggregates a crash had locked again may be free.
                    Done::Forgotten => state.want_claim = true,
                },
                // 3. End of a pause.
                () = sleep_until_opt(state.paused_until), if state.paused_until.is_some() => {
                    state.paused_until = None;
                    state.want_claim = true;
                }
                // 4. Wake-ups: NOTIFY, the adaptive poll; then the summary and backlog timers.
                () = self.wakeup.notified(), if !state.want_claim => state.want_claim = true,
                () = sleep_until_opt(state.next_poll), if !state.want_claim && state.next_poll.is_some() => {
                    state.next_poll = None;
                    state.want_claim = true;
                }
                _ = summary.tick(), if !state.reporting => self.handle_summary_tick(&mut state, &mut work),
                _ = backlog.tick() => self.handle_backlog_tick(&mut state, &mut work),
            }
        }
    }

    /// Shutdown requested: no more claims; the work in flight has `shutdown_timeout`.
    fn handle_shutdown(&self, state: &mut LoopState) {
        state.deadline = Some(Instant::now() + self.settings.shutdown_timeout);
    }

    /// The shutdown deadline passed with work in flight (already dropped): give the rows of
    /// the batches in flight back.
    async fn handle_deadline(&self, state: &LoopState) -> Stopped {
        self.abandon(&state.leases()).await;
        Stopped::Abandoned
    }

    /// A claim answered: the database is fine; publish the batch, if any.
    fn handle_claimed<'a>(&'a self, state: &mut LoopState, work: &mut Work<'a>, claimed: Claimed) {
        let Claimed { batch, held_back } = claimed;
        let now = Instant::now();
        if self.database_ok() {
            work.push(Box::pin(async {
                self.forget_ended_leases().await;
                Done::Forgotten
            }));
        }
        let Some(batch) = batch else {
            state.claimed_nothing(held_back, now);
            return;
        };
        state.claimed(&batch, held_back, now);
        metrics::gauge!(metric::BATCHES_IN_FLIGHT).set(state.in_flight.len() as f64);
        work.push(Box::pin(self.publish_and_settle(batch)));
    }

    /// A claim failed: a database outage; pause.
    fn handle_claim_failed(&self, state: &mut LoopState, err: &DatabaseError) {
        state.claim_started = None;
        state.paused_until = Some(Instant::now() + self.database_failed(err));
    }

    /// A batch is settled: its slot and aggregates are free; pause if the broker took nothing.
    fn handle_settled(
        &self,
        state: &mut LoopState,
        lease: Lease,
        outage: Option<(ErrorClass, String)>,
    ) {
        state.settled(lease);
        metrics::gauge!(metric::BATCHES_IN_FLIGHT).set(state.in_flight.len() as f64);
        if let Some((class, error)) = outage {
            state.paused_until = Some(Instant::now() + self.broker_failed(class, &error));
        }
    }

    /// The idle-time probe answered.
    fn handle_probed(&self, state: &mut LoopState, outcome: Result<(), ProbeError>) {
        state.probing = false;
        match outcome {
            Ok(()) => self.broker_ok(),
            Err(err) => {
                let error = ErrorChain(&err).to_string();
                let pause = self.broker_failed(ErrorClass::Transient, &error);
                state.paused_until = Some(Instant::now() + pause);
            }
        }
    }

    /// Time for the summary line. It queries the database, so it runs beside the claim as
    /// work of its own, never awaited here, where it would leave an open claim transaction
    /// unpolled (idle, holding the claim lock).
    fn handle_summary_tick<'a>(&'a self, state: &mut LoopState, work: &mut Work<'a>) {
        state.reporting = true;
        work.push(Box::pin(async {
            self.summary(true).await;
            Done::Reported
        }));
    }

    /// Time for the backlog gauges (as work of its own, like the summary), and for a broker
    /// probe when idle.
    fn handle_backlog_tick<'a>(&'a self, state: &mut LoopState, work: &mut Work<'a>) {
        if !state.reporting {
            state.reporting = true;
            work.push(Box::pin(async {
                self.refresh_backlog().await;
                Done::Reported
            }));
        }
        if state.can_probe() {
            state.probing = true;
            work.push(Box::pin(async {
                Done::Probed(self.producer.probe(PROBE_TIMEOUT).await)
            }));
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
        self.retry.backoff(streak)
    }

    fn database_failed(&self, err: &DatabaseError) -> Duration {
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
        self.retry.backoff(streak)
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
            .retrying("release", batch.lease, || {
                self.store.release(&ids, batch.lease, None)
            })
            .await;
    }

    /// Publishes copies of the batch's newly dead-lettered rows to
    /// `retry.dead_letter_destination`, if set. The table already records them; a copy that
    /// fails is logged (once per row) and not retried.
    async fn copy_dead_letters(&self, batch: &Batch, settlement: &Settlement) {
        let Some(destination) = &self.retry.dead_letter_destination else {
            return;
        };
        let copies: Vec<OutboxRow> = settlement
            .failures
            .iter()
            .filter(|f| f.dead)
            .filter_map(|f| {
                let row = batch.rows.iter().find(|r| r.id == f.id)?;
                Some(dead_letter_copy(row, &f.error))
            })
            .collect();
        let outcomes = self.producer.publish_to(&copies, destination).await;
        for (row, outcome) in copies.iter().zip(outcomes) {
            let target = destination.render(row);
            match outcome {
                Outcome::Acked => {
                    tracing::info!(event_id = %row.event_id, destination = %target, "dead letter copied")
                }
                Outcome::Failed(err) => tracing::error!(
                    event_id = %row.event_id,
                    destination = %target,
                    error = %ErrorChain(&err),
                    "dead letter not copied to the dead-letter destination; it stays in the table"
                ),
                Outcome::NotAttempted(why) => tracing::error!(
                    event_id = %row.event_id,
                    destination = %target,
                    ?why,
                    "dead letter not copied to the dead-letter destination; it stays in the table"
                ),
            }
        }
    }

    async fn publish_and_settle(&self, mut batch: Batch) -> Done {
        self.isolate_abandoned(&mut batch).await;
        let started = Instant::now();
        let outage = if batch.rows.iter().any(|r| r.abandoned) {
            let _alone = self.quarantine.write().await;
            self.publish_batch(&batch).await
        } else {
            let _shared = self.quarantine.read().await;
            self.publish_batch(&batch).await
        };
        let name = self.producer.name();
        metrics::histogram!(metric::BATCH_SIZE, "sink" => name).record(batch.rows.len() as f64);
        metrics::histogram!(metric::BATCH_DURATION, "sink" => name)
            .record(started.elapsed().as_secs_f64());
        Done::Settled {
            lease: batch.lease,
            outage,
        }
    }

    /// Publishes the batch and writes its settlement. Returns the broker outage it showed, if
    /// any (none when recording failed for longer than the lease allows: its rows are
    /// published again later, and the failure was a database outage).
    async fn publish_batch(&self, batch: &Batch) -> Option<(ErrorClass, String)> {
        let triage = settlement::triage(&batch.rows, &self.retry);
        let to_publish = triage.to_publish(&batch.rows);
        let outcomes = self.producer.publish(&to_publish).await;
        let settlement = settlement::settle(&to_publish, outcomes, triage, &self.retry);
        for note in &settlement.notes {
            log_note(note);
        }
        for class in &settlement.errors {
            metrics::counter!(metric::PUBLISH_ERRORS, "sink" => self.producer.name(), "class" => class.label()).increment(1);
        }
        if !settlement.acked.is_empty() {
            self.broker_ok();
        }
        self.record(batch, &settlement).await?;
        settlement.outage
    }

    /// Writes `settlement`: failures, then releases, then the mark, which ends the lease and
    /// so comes last. Every statement is fenced by the lease; `None` when one could not be
    /// run before the lease expires.
    async fn record(&self, batch: &Batch, settlement: &Settlement) -> Option<()> {
        let lease = batch.lease;
        let recorded = self
            .retrying("retry", lease, || {
                self.store.record_failures(&settlement.failures, lease)
            })
            .await?;
        let dead = settlement.dead() as u64;
        self.stats.dead_lettered.fetch_add(dead, Ordering::Relaxed);
        if dead > 0 {
            self.copy_dead_letters(batch, settlement).await;
        }
        self.stats
            .failed
            .fetch_add(settlement.retried() as u64, Ordering::Relaxed);
        // Transient failures keep their attempt; the batch's (first) error is kept on the rows
        // for operators to see.
        let outage_error = settlement.outage.as_ref().map(|(_, e)| e.as_str());
        let released = self
            .retrying("release", lease, || {
                self.store
                    .release(&settlement.released, lease, outage_error)
            })
            .await?
            + self
                .retrying("release", lease, || {
                    self.store.release(&settlement.held_back, lease, None)
                })
                .await?;
        let marked = self
            .retrying("mark", lease, || self.store.mark(&settlement.acked, lease))
            .await?;
        self.lease_ended(lease);
        self.stats.published.fetch_add(marked, Ordering::Relaxed);
        self.count_outcomes(batch, settlement);
        // Rows a statement did not touch were taken over by another instance after this one's
        // lease ran out (it was paused or too slow).
        let expected = settlement.rows();
        let settled = marked + recorded + released;
        if settled < expected as u64 {
            metrics::counter!(metric::LEASES_LOST).increment(1);
            tracing::warn!(
                rows = expected,
                settled,
                acked = settlement.acked.len(),
                marked,
                "lease lost: rows were taken over by another instance; the acknowledged ones were published twice"
            );
        }
        Some(())
    }

    /// Per-destination counters and the commit-to-ack latency of the acknowledged rows.
    fn count_outcomes(&self, batch: &Batch, settlement: &Settlement) {
        let name = self.producer.name();
        let now = Utc::now();
        let mut published: HashMap<String, u64> = HashMap::new();
        let mut failed: HashMap<(String, bool), u64> = HashMap::new();
        let latency = metrics::histogram!(metric::PUBLISH_LATENCY, "sink" => name);
        // Both lists are in id order, like the batch.
        let mut acked = settlement.acked.iter().peekable();
        let mut failures = settlement.failures.iter().peekable();
        for row in &batch.rows {
            if acked.next_if(|id| **id == row.id).is_some() {
                *published
                    .entry(self.destination_label(row, true))
                    .or_default() += 1;
                // A table without a creation column gives no latency to record.
                if let Some(created_at) = row.created_at {
                    latency.record(
                        (now - created_at).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6,
                    );
                }
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
            metrics::counter!(metric::EVENTS_PUBLISHED, "sink" => name, "destination" => destination).increment(n);
        }
        for ((destination, dead), n) in failed {
            let metric = if dead {
                metric::EVENTS_DEAD_LETTERED
            } else {
                metric::EVENTS_FAILED
            };
            metrics::counter!(metric, "sink" => name, "destination" => destination).increment(n);
        }
    }

    /// The `destination` label for `row`'s counters. Row data must not make label values
    /// unbounded: a destination becomes a label once the broker accepted a message for it
    /// (`published`), up to [`MAX_DESTINATION_LABELS`]; anything else, rejected destinations
    /// included, is counted as `other`.
    fn destination_label(&self, row: &OutboxRow, published: bool) -> String {
        let mut known = self.destination_labels.lock().expect("label lock poisoned");
        bounded_label(&mut known, self.producer.destination(row), published)
    }

    /// Runs a settling statement, retrying database errors until the lease is about to expire.
    async fn retrying<F, Fut>(&self, op: &'static str, lease: Lease, statement: F) -> Option<u64>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<u64, DatabaseError>>,
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
        ACTIVE_POLL, ASYNC_COMMIT_WINDOW, Batch, Lease, LoopState, MAX_DESTINATION_LABELS,
        MAX_ENDED_LEASES, OutboxRow, bounded_label, remember_ended,
    };
    use std::collections::{HashSet, VecDeque};
    use std::time::{Duration, Instant};

    fn lease(id: i64) -> Lease {
        Lease {
            id,
            until: chrono::DateTime::from_timestamp(1_800_000_000, 0).expect("a valid time"),
        }
    }

    fn batch(id: i64, full: bool, abandoned: bool) -> Batch {
        let row = OutboxRow {
            abandoned,
            ..OutboxRow::sample(id, "1")
        };
        Batch {
            rows: vec![row],
            lease: lease(id),
            full,
        }
    }

    #[test]
    fn a_claim_starts_only_when_wanted_and_nothing_stands_in_its_way() {
        let now = Instant::now();
        let mut state = LoopState::new(2, Duration::from_secs(1));
        assert!(state.can_claim(), "the first turn claims");
        state.claim_started(now);
        assert!(!state.can_claim(), "one claim at a time");
        state.claimed(&batch(1, true, false), false, now);
        assert!(
            state.can_claim(),
            "a full batch: claim again at once, beside it"
        );
        state.claimed(&batch(2, true, false), false, now);
        assert!(!state.can_claim(), "every batch slot is taken");
        state.settled(lease(1));
        assert!(
            state.can_claim(),
            "a settled batch frees a slot and wants a claim"
        );
        state.paused_until = Some(now);
        assert!(!state.can_claim(), "no claims during a pause");
        state.paused_until = None;
        state.deadline = Some(now);
        assert!(
            !state.can_claim() && state.stopping(),
            "no claims once stopping"
        );
    }

    #[test]
    fn a_short_batch_waits_for_a_wake_up_and_a_crash_suspect_runs_alone() {
        let now = Instant::now();
        let mut state = LoopState::new(4, Duration::from_secs(1));
        state.claim_started(now);
        state.claimed(&batch(1, false, false), false, now);
        assert!(
            !state.can_claim(),
            "a short batch: the table is drained for now"
        );
        state.want_claim = true;
        state.claim_started(now);
        state.claimed(&batch(2, true, true), false, now);
        assert!(
            !state.can_claim(),
            "no claims while a crash suspect is in flight"
        );
        assert_eq!(state.oldest_work(), Some(now));
        state.settled(lease(2));
        assert!(state.can_claim());
        assert_eq!(state.leases(), [lease(1)]);
    }

    #[test]
    fn polling_is_quick_while_rows_arrive_and_backs_off_to_the_poll_interval_when_idle() {
        let now = Instant::now();
        let poll = Duration::from_millis(40);
        let mut state = LoopState::new(2, poll);
        state.claim_started(now);
        state.claimed(&batch(1, false, false), false, now);
        assert_eq!(
            state.next_poll,
            Some(now + ACTIVE_POLL),
            "a short batch: rows are arriving, look again soon"
        );
        state.settled(lease(1));
        let mut waits = Vec::new();
        for _ in 0..6 {
            state.claim_started(now);
            assert_eq!(state.next_poll, None, "no poll while a claim runs");
            state.claimed_nothing(false, now);
            waits.push(state.next_poll.expect("a poll is due") - now);
        }
        let ms: Vec<u128> = waits.iter().map(Duration::as_millis).collect();
        assert_eq!(
            ms,
            [5, 10, 20, 40, 40, 40],
            "doubling, capped at the poll interval"
        );
        state.claimed(&batch(2, false, false), false, now);
        assert_eq!(
            state.next_poll,
            Some(now + ACTIVE_POLL),
            "rows again: quick again"
        );
        // WHILE that batch is in flight, empty claims keep the quick pace: its aggregates may
        // hold every due row
        for _ in 0..3 {
            state.claim_started(now);
            state.claimed_nothing(false, now);
            assert_eq!(state.next_poll, Some(now + ACTIVE_POLL));
        }
    }

    #[test]
    fn rows_held_back_by_the_guard_are_rechecked_soon_then_less_often() {
        let now = Instant::now();
        let poll = Duration::from_secs(1);
        let mut state = LoopState::new(2, poll);
        for _ in 0..10 {
            state.claimed_nothing(false, now);
        }
        assert_eq!(
            state.poll_delay, poll,
            "an idle relay polls at the interval"
        );
        // WHEN a claim sees rows held back behind an open writer
        state.claimed_nothing(true, now);
        // THEN it looks again soon, and less often while the writer stays open
        assert_eq!(state.next_poll, Some(now + ACTIVE_POLL));
        state.claimed_nothing(true, now);
        assert_eq!(state.next_poll, Some(now + ACTIVE_POLL * 2));
        for _ in 0..10 {
            state.claimed_nothing(true, now);
        }
        assert_eq!(
            state.next_poll,
            Some(now + poll),
            "capped at the poll interval"
        );
    }

    #[test]
    fn the_broker_is_probed_only_while_idle() {
        let now = Instant::now();
        let mut state = LoopState::new(2, Duration::from_secs(1));
        assert!(state.can_probe());
        state.claimed(&batch(1, false, false), false, now);
        assert!(
            !state.can_probe(),
            "a batch in flight shows whether the broker answers"
        );
        state.settled(lease(1));
        state.probing = true;
        assert!(!state.can_probe(), "one probe at a time");
    }

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

    /// The loop over an outbox and a broker in memory: the same seams as PostgreSQL and Kafka,
    /// with faults injected where a test wants them.
    mod in_memory {
        use std::collections::HashMap;
        use std::sync::{Arc, Mutex};
        use std::time::{Duration, Instant};

        use chrono::{DateTime, Utc};
        use tokio::sync::Notify;
        use tokio_util::sync::CancellationToken;

        use super::super::{Relay, Stopped};
        use crate::broker::template::Template;
        use crate::broker::{
            HoldBack, NotAttempted, Outcome, Outcomes, ProbeError, Producer, PublishError,
        };
        use crate::database::DatabaseError;
        use crate::health::Health;
        use crate::outbox::config::{OnDeadLetter, RelayConfig, RetryPolicy};
        use crate::outbox::store::{Claimed, Failure, Store};
        use crate::outbox::{Batch, Lease, OutboxRow};

        /// One row and what the store knows of it.
        #[derive(Debug, Clone)]
        struct Stored {
            row: OutboxRow,
            published: bool,
            dead: bool,
            lease: Option<i64>,
            due: Option<Instant>,
            /// Attempts charged so far.
            attempts: i32,
        }

        /// The outbox table in memory, keeping the [`Store`] contract (leases fence settling,
        /// a claim skips aggregates with a leased, waiting or dead row).
        #[derive(Debug, Clone, Default)]
        struct MemoryStore {
            rows: Arc<Mutex<Vec<Stored>>>,
            next_lease: Arc<Mutex<i64>>,
        }

        impl MemoryStore {
            fn with_rows(rows: Vec<OutboxRow>) -> Self {
                let rows = rows
                    .into_iter()
                    .map(|row| Stored {
                        row,
                        published: false,
                        dead: false,
                        lease: None,
                        due: None,
                        attempts: 0,
                    })
                    .collect();
                Self {
                    rows: Arc::new(Mutex::new(rows)),
                    next_lease: Arc::default(),
                }
            }

            fn snapshot(&self) -> Vec<Stored> {
                self.rows.lock().unwrap().clone()
            }

            /// Applies `change` to the rows of `ids` still in `lease`; returns how many.
            fn settle(&self, ids: &[i64], lease: Lease, change: impl Fn(&mut Stored)) -> u64 {
                let mut rows = self.rows.lock().unwrap();
                let mut changed = 0;
                for stored in rows.iter_mut() {
                    if ids.contains(&stored.row.id) && stored.lease == Some(lease.id) {
                        change(stored);
                        changed += 1;
                    }
                }
                changed
            }
        }

        impl Store for MemoryStore {
            async fn claim(
                &self,
                limit: u32,
                lease_duration: Duration,
            ) -> Result<Claimed, DatabaseError> {
                let mut rows = self.rows.lock().unwrap();
                let now = Instant::now();
                let blocked: Vec<String> = rows
                    .iter()
                    .filter(|s| {
                        !s.published
                            && (s.lease.is_some() || s.dead || s.due.is_some_and(|d| d > now))
                    })
                    .map(|s| s.row.aggregate_id.clone())
                    .collect();
                let lease = {
                    let mut next = self.next_lease.lock().unwrap();
                    *next += 1;
                    Lease {
                        id: *next,
                        until: Utc::now() + lease_duration,
                    }
                };
                let mut batch = Vec::new();
                for stored in rows.iter_mut() {
                    if batch.len() == limit as usize {
                        break;
                    }
                    if stored.published || blocked.contains(&stored.row.aggregate_id) {
                        continue;
                    }
                    stored.lease = Some(lease.id);
                    batch.push(OutboxRow {
                        attempts: stored.attempts + 1,
                        ..stored.row.clone()
                    });
                }
                let full = batch.len() == limit as usize;
                Ok(Claimed {
                    batch: (!batch.is_empty()).then_some(Batch {
                        rows: batch,
                        lease,
                        full,
                    }),
                    held_back: false,
                })
            }

            async fn mark(&self, ids: &[i64], lease: Lease) -> Result<u64, DatabaseError> {
                let marked = self.settle(ids, lease, |s| {
                    s.published = true;
                    s.attempts += 1;
                });
                // The mark ends the lease: its rows without an outcome are given back.
                let every: Vec<i64> = self.snapshot().iter().map(|s| s.row.id).collect();
                self.settle(&every, lease, |s| s.lease = None);
                Ok(marked)
            }

            async fn record_failures(
                &self,
                failures: &[Failure],
                lease: Lease,
            ) -> Result<u64, DatabaseError> {
                let mut changed = 0;
                for failure in failures {
                    changed += self.settle(&[failure.id], lease, |s| {
                        s.lease = None;
                        if !failure.deferred {
                            s.attempts += 1;
                        }
                        s.dead = failure.dead;
                        s.due = Some(Instant::now() + failure.retry_in);
                    });
                }
                Ok(changed)
            }

            async fn release(
                &self,
                ids: &[i64],
                lease: Lease,
                _error: Option<&str>,
            ) -> Result<u64, DatabaseError> {
                Ok(self.settle(ids, lease, |s| s.lease = None))
            }

            async fn release_lease(&self, lease: Lease) -> Result<u64, DatabaseError> {
                let every: Vec<i64> = self.snapshot().iter().map(|s| s.row.id).collect();
                Ok(self.settle(&every, lease, |s| s.lease = None))
            }

            async fn forget_leases(&self, _leases: &[Lease]) -> Result<u64, DatabaseError> {
                Ok(0)
            }

            async fn delete_older(
                &self,
                _dead: bool,
                _age: Duration,
                _limit: u32,
            ) -> Result<u64, DatabaseError> {
                Ok(0)
            }

            async fn pending(&self) -> Result<(i64, Option<DateTime<Utc>>), DatabaseError> {
                let rows = self.rows.lock().unwrap();
                let pending = rows.iter().filter(|s| !s.published && !s.dead).count();
                Ok((pending as i64, None))
            }
        }

        /// A broker in memory: down for the first `outage` publishes, refusing every row of
        /// aggregate `poison` before the wire (holding back its later rows, as the contract
        /// says), and acknowledging the rest, which it keeps in order.
        #[derive(Debug, Default)]
        struct MemoryBroker {
            outage: Mutex<u32>,
            received: Mutex<Vec<OutboxRow>>,
        }

        impl Producer for MemoryBroker {
            fn name(&self) -> &'static str {
                "memory"
            }

            async fn publish(&self, rows: &[OutboxRow]) -> Outcomes {
                {
                    let mut outage = self.outage.lock().unwrap();
                    if *outage > 0 {
                        *outage -= 1;
                        return rows
                            .iter()
                            .map(|_| Outcome::Failed(PublishError::ConfirmTimeout))
                            .collect();
                    }
                }
                // The contract's hold-back: a row refused before the wire stops its aggregate.
                let mut hold_back = HoldBack::default();
                rows.iter()
                    .map(|row| {
                        if hold_back.holds(row) {
                            Outcome::NotAttempted(NotAttempted::HeldBack)
                        } else if row.aggregate_id == "poison" {
                            hold_back.stop(row);
                            Outcome::Failed(PublishError::TooLarge { size: 2, limit: 1 })
                        } else {
                            self.received.lock().unwrap().push(row.clone());
                            Outcome::Acked
                        }
                    })
                    .collect()
            }

            async fn publish_to(&self, rows: &[OutboxRow], _destination: &Template) -> Outcomes {
                rows.iter().map(|_| Outcome::Acked).collect()
            }

            fn destination(&self, _row: &OutboxRow) -> String {
                "memory".to_owned()
            }

            async fn probe(&self, _timeout: Duration) -> Result<(), ProbeError> {
                Ok(())
            }

            async fn flush(&self, _timeout: Duration) {}
        }

        #[tokio::test]
        async fn the_loop_rides_out_an_outage_dead_letters_a_poison_row_and_keeps_each_aggregates_order()
         {
            // GIVEN 30 events of 3 aggregates plus 2 of a poison aggregate, a broker that is
            // down for its first 2 batches, small batches and quick retries
            let mut rows = Vec::new();
            for n in 0..32 {
                let aggregate = if n == 5 || n == 6 {
                    "poison".to_owned()
                } else {
                    format!("a{}", n % 3)
                };
                rows.push(OutboxRow::sample(n + 1, &aggregate));
            }
            let store = MemoryStore::with_rows(rows);
            let broker = MemoryBroker {
                outage: Mutex::new(2),
                ..MemoryBroker::default()
            };
            let settings = RelayConfig {
                batch_size: 4,
                poll_interval: Duration::from_millis(10),
                ..RelayConfig::default()
            };
            let retry = RetryPolicy {
                max_attempts: 2,
                initial_backoff: Duration::from_millis(1),
                max_backoff: Duration::from_millis(20),
                on_dead_letter: OnDeadLetter::Park,
                dead_letter_destination: None,
            };
            let health = Arc::new(Health::new(settings.poll_interval, Duration::from_secs(60)));
            let relay = Relay::new(
                store.clone(),
                broker,
                settings,
                retry,
                health,
                Arc::new(Notify::new()),
            );

            // WHEN the relay runs until every row is settled for good
            let shutdown = CancellationToken::new();
            let done = async {
                let deadline = Instant::now() + Duration::from_secs(10);
                // settled for good: published, dead, or parked behind a dead row
                let settled = |rows: &[Stored]| {
                    let parked = rows
                        .iter()
                        .any(|s| s.dead && s.row.aggregate_id == "poison");
                    rows.iter().all(|s| {
                        s.published || s.dead || (parked && s.row.aggregate_id == "poison")
                    })
                };
                while !settled(&store.snapshot()) {
                    assert!(
                        Instant::now() < deadline,
                        "not settled: {:?}",
                        store.snapshot()
                    );
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                shutdown.cancel();
            };
            let (stopped, ()) = tokio::join!(relay.run(&shutdown), done);

            // THEN the outage happened (both failing publishes were used up), the relay
            // stopped cleanly, and the outage cost no row an attempt
            assert_eq!(
                *relay.producer.outage.lock().unwrap(),
                0,
                "the outage fired"
            );
            assert_eq!(stopped, Stopped::Clean);
            let stored = store.snapshot();
            for s in stored.iter().filter(|s| s.row.aggregate_id != "poison") {
                assert!(s.published && s.attempts == 1, "{s:?}");
            }
            // AND the poison aggregate's first row was dead-lettered after its 2 attempts,
            // parking the second
            let poison: Vec<&Stored> = stored
                .iter()
                .filter(|s| s.row.aggregate_id == "poison")
                .collect();
            assert!(poison[0].dead && poison[0].attempts == 2, "{:?}", poison[0]);
            assert!(!poison[1].published && !poison[1].dead && poison[1].attempts == 0);
            // AND each aggregate arrived in id order, exactly once
            let received = relay.producer.received.lock().unwrap().clone();
            assert_eq!(received.len(), 30);
            let mut last: HashMap<&str, i64> = HashMap::new();
            for row in &received {
                let before = last.insert(row.aggregate_id.as_str(), row.id);
                assert!(
                    before.is_none_or(|b| b < row.id),
                    "order of {}",
                    row.aggregate_id
                );
            }
        }
    }
}
