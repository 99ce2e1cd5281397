//! What the outbox direction needs from a database: the [`Store`] trait, and the values that
//! cross it. PostgreSQL implements it today (`database::postgres`); a second family, or an
//! in-memory store in a unit test, fits the same seam.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{Batch, Lease};
use crate::database::DatabaseError;

/// The outbox table's statements, as the relay loop and retention use them.
///
/// # Contract
/// - **Claims are exclusive and ordered.** `claim` leases up to `limit` due rows in `id` order,
///   none of whose aggregates has a row in another live lease, waiting for a retry, or (with
///   [`ClaimRules::park_dead`]) dead-lettered. No transaction or row lock outlives the call.
/// - **Settling is fenced by the lease.** `mark`, `record_failures` and `release` change a row
///   only while the batch's lease exists; each returns the rows it changed, so fewer than asked
///   means the lease expired and another instance took them over. `mark` also ends the lease,
///   so it comes last.
/// - **Attempts are charged when they end**: by `mark` and by a recorded failure that is not
///   deferred, and by the reaping of an expired lease for its rows left without an outcome;
///   `release` charges nothing.
/// - **Errors are outages.** Every error is retried by the caller after a pause; none is the
///   rows' fault.
pub(crate) trait Store: Clone + Send + Sync + 'static {
    /// Leases the next batch (see the contract).
    fn claim(
        &self,
        limit: u32,
        lease_duration: Duration,
    ) -> impl Future<Output = Result<Claimed, DatabaseError>> + Send;

    /// Marks `ids` published and ends the lease.
    fn mark(
        &self,
        ids: &[i64],
        lease: Lease,
    ) -> impl Future<Output = Result<u64, DatabaseError>> + Send;

    /// Records failed attempts: next attempt time, last error, dead letters.
    fn record_failures(
        &self,
        failures: &[Failure],
        lease: Lease,
    ) -> impl Future<Output = Result<u64, DatabaseError>> + Send;

    /// Gives `ids` back without charging an attempt; `error`, if any, is kept as their last
    /// error for operators.
    fn release(
        &self,
        ids: &[i64],
        lease: Lease,
        error: Option<&str>,
    ) -> impl Future<Output = Result<u64, DatabaseError>> + Send;

    /// Ends `lease`, giving back its rows that have no outcome yet.
    fn release_lease(
        &self,
        lease: Lease,
    ) -> impl Future<Output = Result<u64, DatabaseError>> + Send;

    /// Deletes `leases` again if they still exist with the same expiry (a database crash
    /// brought back leases this instance had ended); returns how many were back.
    fn forget_leases(
        &self,
        leases: &[Lease],
    ) -> impl Future<Output = Result<u64, DatabaseError>> + Send;

    /// Deletes up to `limit` rows published (or, with `dead`, dead-lettered) more than `age`
    /// ago, unless another instance is deleting.
    fn delete_older(
        &self,
        dead: bool,
        age: Duration,
        limit: u32,
    ) -> impl Future<Output = Result<u64, DatabaseError>> + Send;

    /// Rows waiting to be published (not dead) and the creation time of the oldest.
    fn pending(
        &self,
    ) -> impl Future<Output = Result<(i64, Option<DateTime<Utc>>), DatabaseError>> + Send;
}

/// The outbox rules a claim applies, from the configuration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClaimRules {
    /// A dead-lettered row holds back its aggregate (`retry.on_dead_letter = park`).
    pub(crate) park_dead: bool,
    /// Rows are claimed only below the commit-order horizon (`relay.commit_order_guard`).
    pub(crate) commit_order_guard: bool,
    /// Most payload bytes in one batch (`relay.max_batch_bytes`); the first row always goes.
    pub(crate) max_batch_bytes: u64,
}

/// What a claim found.
#[derive(Debug)]
pub(crate) struct Claimed {
    /// The leased rows, if any were due.
    pub(crate) batch: Option<Batch>,
    /// Rows are visible beyond the commit-order horizon: claim again shortly, once the
    /// transactions that may still commit below them have ended.
    pub(crate) held_back: bool,
}

/// One failed attempt to record.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) id: i64,
    /// Kept in `last_error`.
    pub(crate) error: String,
    /// Until `next_attempt_at` (ignored when `dead`).
    pub(crate) retry_in: Duration,
    /// Dead-lettered now.
    pub(crate) dead: bool,
    /// The destination was in trouble, not the row: no attempt is charged and `deferrals`
    /// grows instead (migration 0007).
    pub(crate) deferred: bool,
}
