//! What the inbox direction needs from a database: the [`InboxStore`] trait. PostgreSQL
//! implements it (`database::postgres::inbox`); an in-memory store in a unit test fits the same
//! seam.

use std::future::Future;
use std::time::Duration;

use super::Entry;
use crate::database::DatabaseError;

/// What one batch's transaction did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Written {
    /// New rows in the inbox.
    pub(crate) inserted: u64,
    /// Rows whose (`consumer`, `event_id`) was already there: redeliveries, skipped.
    pub(crate) duplicates: u64,
    /// Entries the database refused as values (index in the batch, its error's message); they
    /// were recorded as rejected instead.
    pub(crate) refused: Vec<(usize, String)>,
}

/// What `outbox-relay status` reports about one consumer's inbox.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct InboxStatus {
    /// Rows the application has not marked `processed_at` yet.
    pub(crate) waiting: i64,
    /// Age of the oldest of them, in seconds.
    pub(crate) oldest_waiting_age_s: Option<f64>,
    /// Messages in `<table>_rejected`.
    pub(crate) rejected: i64,
    /// Redelivered messages skipped as duplicates, since the table was created.
    pub(crate) duplicates_skipped: i64,
}

/// The inbox tables' statements.
///
/// # Contract
/// - **One transaction per batch.** `write` records every entry of the batch — rows with
///   `ON CONFLICT (consumer, event_id) DO NOTHING`, rejections in `<table>_rejected` — and
///   commits once; when it returns `Ok`, all of it is durable, when it returns `Err`, none of
///   it is (the caller writes the same batch again).
/// - **A row's value never fails the batch.** A row the database refuses as a value (a data
///   exception) is recorded as rejected with the database's message, in the same
///   transaction, and reported in [`Written::refused`].
/// - **Arrival order.** Rows get their `id` in the order given.
/// - **Errors are outages.** Every error is retried by the caller after a pause.
pub(crate) trait InboxStore: Clone + Send + Sync + 'static {
    /// Writes one batch (see the contract).
    fn write(
        &self,
        consumer: &str,
        entries: &[Entry],
    ) -> impl Future<Output = Result<Written, DatabaseError>> + Send;

    /// The consumer's backlog and counts (for `status` and the gauges).
    fn status(
        &self,
        consumer: &str,
    ) -> impl Future<Output = Result<InboxStatus, DatabaseError>> + Send;

    /// Deletes up to `limit` rows of `consumer` processed more than `older_than` ago.
    fn delete_processed(
        &self,
        consumer: &str,
        older_than: Duration,
        limit: u32,
    ) -> impl Future<Output = Result<u64, DatabaseError>> + Send;
}
