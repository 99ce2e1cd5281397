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

use std::sync::Arc;

use chrono::{DateTime, Utc};

/// One claimed outbox row, as the publishers see it.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    /// Position in the outbox; orders events of an aggregate.
    pub id: i64,
    /// Stable message id consumers deduplicate on, as text (a UUID's lowercase hyphenated form
    /// for a `uuid` column).
    pub event_id: String,
    /// Kind of aggregate (`order`); usually part of the destination.
    pub aggregate_type: String,
    /// Ordering key and Kafka message key.
    pub aggregate_id: String,
    /// Kind of event (`order_placed`).
    pub event_type: String,
    /// The event body, as stored.
    pub payload: Payload,
    /// The row's extra headers, JSON text (an object of strings is expected); `{}` when the
    /// table has no headers column.
    pub headers: String,
    /// Headers from columns of their own (`[database.columns.headers]`): header name and the
    /// column's value as text; a NULL column sends no header.
    pub column_headers: Vec<(Arc<str>, String)>,
    /// When the application wrote the row; `None` when the table maps no creation column (the
    /// message then carries the time it was sent).
    pub created_at: Option<DateTime<Utc>>,
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
            event_id: uuid::Uuid::from_u128(id.unsigned_abs().into()).to_string(),
            aggregate_type: "order".into(),
            aggregate_id: aggregate_id.into(),
            event_type: "placed".into(),
            payload: Payload::Json("{}".into()),
            headers: "{}".into(),
            column_headers: Vec::new(),
            created_at: Some(Utc::now()),
            null_columns: Vec::new(),
            attempts: 1,
            deferrals: 0,
            abandoned: false,
        }
    }
}

/// An event's body as the table stores it, sent unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// A `jsonb` column: PostgreSQL's text of it. A `json` column: its text as written.
    Json(String),
    /// A text column, as stored.
    Text(String),
    /// A `bytea` column, the bytes as stored.
    Bytes(Vec<u8>),
    /// NULL: the message has no value (a Kafka tombstone; an empty AMQP body).
    Absent,
}

impl Payload {
    /// The message value; `None` for a tombstone.
    pub fn bytes(&self) -> Option<&[u8]> {
        match self {
            Self::Json(text) | Self::Text(text) => Some(text.as_bytes()),
            Self::Bytes(bytes) => Some(bytes),
            Self::Absent => None,
        }
    }

    /// Size of the message value in bytes.
    pub fn len(&self) -> usize {
        self.bytes().map_or(0, <[u8]>::len)
    }

    /// Whether the value is empty (or absent).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The media type the message declares: JSON columns only.
    pub fn content_type(&self) -> Option<&'static str> {
        matches!(self, Self::Json(_)).then_some("application/json")
    }
}

/// The shape of the messages, and the table layout a mapping starts from
/// (`database.layout`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// This relay's own: headers `event_id`, `event_type`, `aggregate_type`, `aggregate_id`.
    #[default]
    Relay,
    /// Debezium's Outbox Event Router defaults: one header, `id` = the event id.
    Debezium,
}

impl Layout {
    /// The headers every message carries, named and filled from `row`; a row's own headers
    /// cannot replace them.
    pub fn standard_headers(self, row: &OutboxRow) -> Vec<(&'static str, String)> {
        match self {
            Self::Relay => vec![
                ("event_id", row.event_id.clone()),
                ("event_type", row.event_type.clone()),
                ("aggregate_type", row.aggregate_type.clone()),
                ("aggregate_id", row.aggregate_id.clone()),
            ],
            Self::Debezium => vec![("id", row.event_id.clone())],
        }
    }

    /// The names [`Layout::standard_headers`] uses.
    pub fn standard_names(self) -> &'static [&'static str] {
        match self {
            Self::Relay => &["event_id", "event_type", "aggregate_type", "aggregate_id"],
            Self::Debezium => &["id"],
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
