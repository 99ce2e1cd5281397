//! The outbox direction: rows written by the application are claimed, published to the broker
//! and settled. This module holds its domain types (it depends on nothing else in the crate:
//! the database and broker layers build on them); [`relay`] runs the loop, [`settlement`] decides what a published batch's outcomes
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

use chrono::{DateTime, Utc};
use uuid::Uuid;

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
