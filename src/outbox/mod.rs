//! The outbox direction: rows written by the application are claimed, published to the broker
//! and settled. This module holds its domain types and [`run`], which puts it together for one
//! process; [`relay`] runs the loop, [`settlement`] decides what a published batch's outcomes
//! mean, [`dead_letter`] builds the copies sent to the dead-letter destination, [`retention`]
//! deletes old rows, [`store`] is what the direction needs from a database, and [`config`]
//! holds its sections (`[relay]`, `[retry]`, `[retention]`).

pub(crate) mod config;
pub(crate) mod dead_letter;
pub(crate) mod relay;
pub(crate) mod retention;
pub(crate) mod settlement;
pub(crate) mod store;

pub(crate) use store::Store;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::broker::Broker;
use crate::config::Settings;
use crate::database::postgres::{Connections, Postgres, listener};
use crate::health::Health;
use config::OnDeadLetter;
use relay::{Relay, Stopped};
use store::ClaimRules;

/// Runs the outbox direction until `shutdown`: the relay loop over the configured database
/// and `broker`, with the LISTEN wake-up task (when `relay.listen`) and retention beside it,
/// stopped when the loop ends. No connection is made before the loop's first claim.
pub(crate) async fn run(
    settings: &Settings,
    broker: Broker,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> Stopped {
    let database = &settings.database;
    let table = &database.table;
    let store = Postgres::new(
        Connections::new(database),
        database.statement_timeout,
        table,
        ClaimRules {
            park_dead: settings.retry.on_dead_letter == OnDeadLetter::Park,
            commit_order_guard: settings.relay.commit_order_guard,
            max_batch_bytes: settings.relay.max_batch_bytes,
        },
    );
    tracing::info!(
        table = %table,
        broker = %broker,
        batch_size = settings.relay.batch_size,
        max_in_flight_batches = settings.relay.max_in_flight_batches,
        "relay started"
    );
    if matches!(broker, Broker::Discard) {
        tracing::warn!(
            "broker.kind = \"discard\": rows are marked published without being sent anywhere"
        );
    }
    let wakeup = Arc::new(Notify::new());
    let tasks_stop = shutdown.child_token();
    // LISTEN has a one-connection pool of its own, so the claims never lose one to it.
    let listener = settings.relay.listen.then(|| {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(database.connect.clone());
        tokio::spawn(listener::run(
            pool,
            table.clone(),
            Arc::clone(&wakeup),
            tasks_stop.clone(),
        ))
    });
    let retention = tokio::spawn(retention::run(
        store.clone(),
        settings.retention.clone(),
        tasks_stop.clone(),
    ));

    let relay = Relay::new(
        store,
        broker,
        settings.relay.clone(),
        settings.retry.clone(),
        health,
        wakeup,
    );
    let stopped = relay.run(&shutdown).await;

    tasks_stop.cancel();
    if let Err(err) = retention.await {
        tracing::error!(error = %err, "retention task failed");
    }
    if let Some(listener) = listener {
        if let Err(err) = listener.await {
            tracing::error!(error = %err, "listener task failed");
        }
    }
    stopped
}

/// Readiness and liveness for the outbox direction, from its settings.
pub(crate) fn health(settings: &Settings) -> Arc<Health> {
    Arc::new(Health::new(
        settings.relay.poll_interval,
        Health::wedged_after(
            settings.relay.lease_duration,
            settings.database.statement_timeout,
        ),
    ))
}

/// The broker the outbox publishes to, named to the broker after `table`.
pub(crate) fn broker(settings: &Settings) -> Result<Broker, rdkafka::error::KafkaError> {
    Broker::new(
        &settings.broker,
        format!("outbox-relay {}", settings.database.table),
    )
}

/// One claimed outbox row, as the publishers see it.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    /// Position in the outbox; orders events of an aggregate.
    pub id: i64,
    /// Stable message id consumers deduplicate on.
    pub event_id: Uuid,
    /// Kind of aggregate (`order`); usually part of the destination.
    pub aggregate_type: String,
    /// Ordering key and Kafka message key.
    pub aggregate_id: String,
    /// Kind of event (`order_placed`).
    pub event_type: String,
    /// The event body, JSON text exactly as stored.
    pub payload: String,
    /// The row's extra headers, JSON text (an object of strings is expected).
    pub headers: String,
    /// When the application wrote the row.
    pub created_at: DateTime<Utc>,
    /// Columns the message needs that are NULL in this row (empty for any table `migrate`
    /// created, whose columns are NOT NULL): such a row fails permanently without being sent.
    pub null_columns: Vec<&'static str>,
    /// Delivery attempts, this one included (earlier ones that failed, or ended with no
    /// outcome recorded, plus this one).
    pub attempts: i32,
    /// Consecutive times this row's destination was in trouble (it backed off without using an
    /// attempt); sets the length of the next such back-off.
    pub deferrals: i32,
    /// The two attempts before this one ended with no outcome recorded (the relay crashed, was
    /// killed or lost its lease while publishing, twice): the row is suspected of crashing the
    /// relay and is published on its own. One crash is common (a deploy, an OOM kill) and costs
    /// nothing extra; a crash loop is narrowed down to the row that causes it.
    pub abandoned: bool,
}

#[cfg(test)]
impl OutboxRow {
    /// A row for unit tests: event `order`/`placed` of aggregate `aggregate_id`, first attempt,
    /// event id derived from `id`, empty payload and headers.
    pub(crate) fn sample(id: i64, aggregate_id: &str) -> Self {
        Self {
            id,
            event_id: Uuid::from_u128(id.unsigned_abs().into()),
            aggregate_type: "order".into(),
            aggregate_id: aggregate_id.into(),
            event_type: "placed".into(),
            payload: "{}".into(),
            headers: "{}".into(),
            created_at: Utc::now(),
            null_columns: Vec::new(),
            attempts: 1,
            deferrals: 0,
            abandoned: false,
        }
    }
}

/// The fencing token of one claim: the id of its row in the lease table (migration 0005), and
/// when it expires. Statements that settle rows only act while that lease row exists; once it
/// expired and another claim reaped it (the rows may have been claimed again), they change
/// nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lease {
    pub(crate) id: i64,
    pub(crate) until: DateTime<Utc>,
}

/// A claimed batch: rows in `id` order plus the lease that fences them.
#[derive(Debug)]
pub(crate) struct Batch {
    pub(crate) rows: Vec<OutboxRow>,
    pub(crate) lease: Lease,
    /// The claim returned as many rows as it asked for (some perhaps cut by
    /// `relay.max_batch_bytes`): more rows may be due now.
    pub(crate) full: bool,
}
