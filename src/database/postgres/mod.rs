//! PostgreSQL: the outbox's statements (claim, mark, retry, release, retention), the
//! commit-order guard, the connection pool; beside them its section of the configuration
//! ([`config`]), the table name ([`table`]), `migrate` and the schema check ([`schema`]) and
//! the LISTEN wake-up task ([`listener`]).
//!
//! # Claim protocol
//! A claim is one short transaction: it takes a transaction-scoped advisory lock (so concurrent
//! claimers on the same table are serialised and cannot reorder an aggregate between them),
//! reaps expired leases, picks up to `batch_size` due rows in `id` order whose aggregate has no
//! row waiting (in a lease, or backing off after a failure), and records one lease row for the
//! batch in the lease table (migration 0005): its expiry, its row ids and their aggregates. The
//! claimed rows themselves are only read: a claim that wrote every row (as before 0005) cost
//! more than half of the database's work per event. No transaction or row lock is held while
//! the broker works.
//!
//! The lease row's id is the fencing token. Each batch is settled by statements that act only
//! while its lease row exists: failures and releases share-lock it, and the mark, the last
//! statement, deletes it. A lease that outlived `until` (its instance died, stalled or lost the
//! database) is deleted by the next claim of any instance, which so takes the rows over; a
//! settling statement that comes later finds no lease and changes nothing. The row lock makes
//! the two exclusive: a settlement in progress finishes before the reaper deletes its lease.
//!
//! Attempts are charged when they end: a mark or a recorded failure adds one, and reaping an
//! expired lease adds one to each of its rows left without an outcome — so a row that crashes
//! the relay still uses up its attempts. Attempts that failed for a reason that is not the
//! row's (broker down, shutdown) are not charged ([`Store::release`]). A claimed row carries
//! the number of the attempt it is about to make.
//!
//! # Commit-order guard
//! Ids come from a sequence when a row is inserted, but transactions commit in any order: a
//! transaction can hold id 10 uncommitted while id 11 of the same aggregate is already visible.
//! Publishing 11 then would let it overtake 10. So a claim only takes rows up to a *horizon*: an
//! id below which no row can still appear. It is found with a fence: at time t0 the claim notes
//! the highest visible id H and the transactions then writing to the table (holding its
//! `RowExclusiveLock`, seen in `pg_locks`; the relay's own sessions excluded). Every id at most
//! H was taken before t0, so its transaction had committed (visible), aborted, or was among
//! those writers; once they have all ended, no row at or below H can appear, and H becomes the
//! horizon. When nobody is writing at t0, H is the horizon at once; otherwise a later claim
//! (the relay re-claims within milliseconds while rows are held back) finds the fence passed.
//! A long transaction writing to the outbox holds back only rows committed after it began, and
//! only until it ends. Assumption: ids are taken by the insert itself (identity or serial
//! default, sequence cache 1), not fetched earlier by the application.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Row, SqlSafeStr, SqlStr};

pub(crate) mod config;
pub(crate) mod inbox;
pub(crate) mod listener;
pub(crate) mod schema;
pub(crate) mod table;

pub(crate) use table::Table;

use crate::database::DatabaseError;
use crate::database::columns::Columns;
use crate::outbox::store::{ClaimRules, Claimed, Failure, Store};
use crate::outbox::{Batch, Lease, OutboxRow, Payload};
#[cfg(doc)]
use config::DatabaseConfig;
use config::DatabaseSettings;

/// `application_name` of every relay session, so operators (and tests) can find them in
/// `pg_stat_activity`.
pub(crate) const APPLICATION_NAME: &str = "outbox-relay";

/// How long PostgreSQL lets a relay session sit idle inside a transaction (see
/// [`DatabaseConfig::validate`]).
pub(crate) const IDLE_IN_TRANSACTION_TIMEOUT: &str = "5s";

/// The relay's connection pool, lazily connected (the relay starts even when the database is
/// down and keeps retrying), and replaced whole when an operation on it got no answer: its
/// connections most likely share the broken path (a host that vanished, a failover that moved
/// the address), and each would otherwise cost a wait of its own before it is found dead.
#[derive(Debug, Clone)]
pub(crate) struct Connections {
    /// The pool in use and its generation (bumped by each replacement).
    current: Arc<Mutex<(u64, PgPool)>>,
    options: PgConnectOptions,
    max_connections: u32,
    /// Client-side bound on each operation (`database.statement_timeout` + 5 s): the server's
    /// statement timeout cannot end a statement whose connection stopped answering.
    client_timeout: Duration,
}

impl Connections {
    /// A lazily connected pool for `settings`; nothing connects yet.
    pub(crate) fn new(settings: &DatabaseSettings) -> Self {
        let options = settings.connect.clone();
        let pool = Self::lazy(&options, settings.max_connections);
        Self {
            current: Arc::new(Mutex::new((0, pool))),
            options,
            max_connections: settings.max_connections,
            client_timeout: settings.statement_timeout + CLIENT_TIMEOUT_MARGIN,
        }
    }

    fn lazy(options: &PgConnectOptions, max_connections: u32) -> PgPool {
        PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(options.clone())
    }

    /// Runs `work` on the pool within the client-side bound (`Connections::client_timeout`). On
    /// expiry `work` is dropped, and with it its connection (the pool is replaced).
    async fn bounded<T, Fut>(
        &self,
        op: &'static str,
        work: impl FnOnce(PgPool) -> Fut,
    ) -> Result<T, DatabaseError>
    where
        Fut: Future<Output = Result<T, DatabaseError>>,
    {
        let (generation, pool) = self.get();
        match tokio::time::timeout(self.client_timeout, work(pool)).await {
            // No connection within the acquire timeout: with a handful of connections and
            // statements of milliseconds, they are all stuck (the pool tests an idle one with
            // a ping before handing it out, and on a connection that stopped answering that
            // ping waits). Replaced like an unanswered statement's.
            Ok(Err(DatabaseError::Sql {
                op,
                source: sqlx::Error::PoolTimedOut,
            })) => {
                self.replace(generation);
                Err(DatabaseError::NoAnswer {
                    op,
                    limit: ACQUIRE_TIMEOUT,
                })
            }
            Ok(done) => done,
            Err(_) => {
                self.replace(generation);
                Err(DatabaseError::NoAnswer {
                    op,
                    limit: self.client_timeout,
                })
            }
        }
    }

    /// The pool in use, with its generation.
    fn get(&self) -> (u64, PgPool) {
        let current = self.current.lock().expect("pool lock poisoned");
        (current.0, current.1.clone())
    }

    /// Replaces the pool of `generation` (unless another operation already did) with a new,
    /// lazily connected one; the old one is closed in the background.
    fn replace(&self, generation: u64) {
        let mut current = self.current.lock().expect("pool lock poisoned");
        if current.0 != generation {
            return;
        }
        let old = std::mem::replace(
            &mut current.1,
            Self::lazy(&self.options, self.max_connections),
        );
        current.0 += 1;
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), old.close()).await;
        });
    }
}

/// The relay's statements against one outbox table in PostgreSQL.
#[derive(Debug, Clone)]
pub(crate) struct Postgres {
    connections: Connections,
    /// Name of the claim advisory lock, hashed by PostgreSQL; one per table.
    lock_name: String,
    /// Whether a dead-lettered row holds back its aggregate (`retry.on_dead_letter = park`).
    park_dead: bool,
    /// The table's columns: which of them the fetched rows' extra values are.
    columns: Columns,
    /// `relay.max_batch_bytes`, as the claim binds it.
    max_batch_bytes: i64,
    /// Most rows the next claim asks for while events are large: about what the last claim
    /// cut by `max_batch_bytes` kept, so a claim does not read and convert many rows past the
    /// bound only to leave them; doubles after each full claim ([`next_row_budget`]).
    row_budget: Arc<AtomicU32>,
    /// Name of the retention advisory lock (one deleting instance per table).
    retention_lock: String,
    lock: SqlStr,
    claim: SqlStr,
    fetch: SqlStr,
    lease: SqlStr,
    mark: SqlStr,
    retry: SqlStr,
    release: SqlStr,
    release_lease: SqlStr,
    forget_leases: SqlStr,
    reap: SqlStr,
    pending: SqlStr,
    delete_published: SqlStr,
    delete_dead: SqlStr,
    fence_probe: SqlStr,
    /// This process's row in the awake table (migration 0009): while claims find rows it is
    /// renewed, and the NOTIFY trigger stays silent.
    instance: uuid::Uuid,
    keep_awake: SqlStr,
    /// When the awake row was last renewed.
    awake_renewed: Arc<Mutex<Option<std::time::Instant>>>,
    /// Commit-order guard state; `None` when `relay.commit_order_guard` is off.
    guard: Option<Arc<Mutex<Guard>>>,
}

/// The commit-order guard's state (see the module docs). Claims of one relay are serialised, so
/// the lock is never contended.
#[derive(Debug, Default)]
struct Guard {
    /// Rows up to this id can no longer be overtaken by a late commit.
    horizon: i64,
    /// Fences waiting for their writers to end, oldest first: (highest visible id, the virtual
    /// xids then writing). One is taken at every claim that sees writers, so the horizon trails
    /// the writers by about the length of one of their transactions, not by whole fence cycles.
    pending: std::collections::VecDeque<(i64, Vec<String>)>,
}

/// The most rows the claim after this one asks for (see `Store::row_budget`): when the byte
/// bound cut this claim (`kept` of the `returned` rows), about as many as it kept, plus a
/// quarter; after a full claim, twice this `limit`; otherwise `limit` again.
fn next_row_budget(limit: u32, returned: usize, kept: usize) -> u32 {
    if kept < returned {
        u32::try_from(kept + kept / 4 + 1).unwrap_or(u32::MAX)
    } else if returned == limit as usize {
        limit.saturating_mul(2)
    } else {
        limit
    }
}

/// How far ahead an awake row reaches: about as long as adaptive polling stays within tens of
/// milliseconds after the last claim that found rows.
const AWAKE_FOR: Duration = Duration::from_millis(250);

/// Renewals of the awake row at most this often (one statement per 100 ms of a busy relay).
const AWAKE_RENEWAL: Duration = Duration::from_millis(100);

/// How long an operation waits for a pool connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the client-side bound adds to `database.statement_timeout`: time for the server to
/// report its own timeout, and for the network.
const CLIENT_TIMEOUT_MARGIN: Duration = Duration::from_secs(5);

/// Fences kept at once; more would only add precision under thousands of claims per second.
const MAX_FENCES: usize = 64;

fn sql(text: String) -> SqlStr {
    AssertSqlSafe(text).into_sql_str()
}

impl Postgres {
    /// The statements for `table` with `rules`, over `connections`; nothing connects yet.
    pub(crate) fn new(
        connections: Connections,
        table: &Table,
        columns: &Columns,
        rules: ClaimRules,
    ) -> Self {
        let ClaimRules {
            park_dead,
            commit_order_guard,
            max_batch_bytes,
        } = rules;
        let t = table.quoted();
        // The quoted name inside a string literal (validated names hold no quote; escaped anyway).
        let t_literal = t.replace('\'', "''");
        let leases = table.companion("leases");
        let c = Quoted::new(columns);
        let (c_id, c_agg, c_payload) = (&c.id, &c.aggregate_id, &c.payload);
        // Chooses the batch: no row is written or locked (claims are serialised by the advisory
        // lock, and the lease row written next keeps other claims off its aggregates). Only
        // what the choice and the lease need comes back — ids, aggregates, attempt counters —
        // so the transaction that holds the claim lock never streams payloads (a relay paused
        // while reading them would hold the lock); `fetch` reads them after the commit.
        // `$4` bounds the batch's payload bytes: rows past it (in `id` order) come back marked
        // not kept and are not claimed (`row_budget` keeps such rows few). A payload is
        // measured by its stored size, which costs nothing to read; converting each jsonb to
        // text to measure it (then again in `fetch`) took a third of the claim's time. Only
        // a compressed payload (rows over ~2 KB) is measured as text, its stored size being
        // a fraction of what the relay will hold.
        // Its columns are decoded by position (`Picked::decode`): keep their order.
        let claim = format!(
            "select c.id, c.kept, coalesce(c.aggregate_id, '') as aggregate_id, c.attempts,
                    c.deferrals, c.abandoned
             from (
               -- the byte bound counts each payload's uncompressed size (see above); the
               -- first row is always kept, however large
               select r.*,
                      coalesce(sum(r.size) over (order by r.id) - r.size, 0) < $4 as kept
               from (
                 select o.{c_id} as id, o.{c_agg}::text as aggregate_id,
                        case when pg_column_compression(o.{c_payload}) is null
                             then pg_column_size(o.{c_payload})
                             else octet_length(o.{c_payload}::text) end as size,
                        o.attempts + 1 as attempts, o.deferrals,
                        -- the two attempts before this one left no outcome (migration 0007)
                        o.unsettled_attempts >= 2 as abandoned
                 from {t} o
                 where o.published_at is null and o.dead_lettered_at is null
                   and (o.next_attempt_at is null or o.next_attempt_at <= now())
                   -- the commit-order horizon (module docs); null when the guard is off
                   and o.{c_id} <= coalesce($3, o.{c_id})
                   -- skip aggregates with a waiting row: backing off (a hashed subplan over
                   -- the small waiting index, migration 0002), parked behind a dead letter
                   -- (retry.on_dead_letter = park, migration 0003), or in a lease
                   -- (a NULL aggregate_id counts as '', so it neither hides every row from
                   -- `not in` nor escapes it)
                   and coalesce(o.{c_agg}::text, '') not in (
                       select coalesce(w.{c_agg}::text, '') from {t} w
                       where w.published_at is null and w.next_attempt_at > now()
                       union all
                       select coalesce(d.{c_agg}::text, '') from {t} d
                       where $2 and d.published_at is null and d.dead_lettered_at is not null
                       union all
                       select unnest(l.aggregates) from {leases} l)
                 order by o.{c_id}
                 limit $1
               ) r
             ) c
             order by c.id"
        );
        // The claimed rows' contents, read after the claim committed (the lease keeps them
        // this batch's), in the claim's (`id`) order. One index scan over the sorted ids
        // (a join with `unnest` probed the index once per id: ~1 ms more per 1 000 rows).
        // Decoded by position (`decode_row`): keep the column order. The payload and the
        // creation time come as stored and are decoded by their type (`decode_payload`).
        let fetch = format!(
            "select o.{c_id}, o.{event_id}, o.{aggregate_type}::text, o.{c_agg}::text,
                    o.{event_type}::text, o.{c_payload}, {headers}, {created_at}{header_columns}
             from {t} o
             where o.{c_id} = any($1::bigint[])
             order by o.{c_id}",
            event_id = c.event_id,
            aggregate_type = c.aggregate_type,
            event_type = c.event_type,
            headers = c
                .headers
                .as_ref()
                .map_or("null::text".to_owned(), |h| format!("o.{h}::text")),
            // `timestamp` columns are read as UTC (the sessions are in UTC: `DatabaseConfig::validate`)
            created_at = c
                .created_at
                .as_ref()
                .map_or("null::timestamptz".to_owned(), |h| format!(
                    "o.{h}::timestamptz"
                )),
            header_columns = c
                .header_columns
                .iter()
                .map(|column| format!(", o.{column}::text"))
                .collect::<String>(),
        );
        // The batch's lease, in the claim's transaction. Ids and distinct aggregates come from
        // the relay: building them in SQL (a materialised CTE of the rows, a sort for the
        // distinct aggregates) cost 3 ms of a 1 000-row claim.
        let lease = format!(
            "insert into {leases} (claimed_at, until, ids, aggregates)
             values (now(), clock_timestamp() + $1 * interval '1 millisecond', $2, $3)
             returning id, until"
        );
        // The claim lock, and whether a lease has expired: reaping is a statement of its own,
        // needed only then (claims skip the aggregates of every lease row, expired or not).
        // Keyed on the table's identity (its OID), not on how the configuration spells it:
        // instances configured as `outbox` and `public.outbox` exclude each other.
        let lock = format!(
            "select exists (select 1 from {leases} where until <= now())
             from (select pg_advisory_xact_lock(
                       hashtextextended($1 || '{t_literal}'::regclass::oid::text, 0))) as claim_lock"
        );
        // Leases that outlived their expiry: their instance died or stalled. Each of their rows
        // still without an outcome (not published, not dead, no retry time set since the claim)
        // is charged the attempt, then the rows are free to be claimed again.
        let reap = format!(
            "with expired as (
                 delete from {leases} where until <= now() returning ids, claimed_at
             )
             update {t} o set attempts = o.attempts + 1,
                              unsettled_attempts = o.unsettled_attempts + 1
             from expired e, unnest(e.ids) as b(id)
             where o.{c_id} = b.id and o.published_at is null and o.dead_lettered_at is null
               and (o.next_attempt_at is null or o.next_attempt_at <= e.claimed_at)"
        );
        // The last statement of a settlement: marks the acknowledged rows and ends the lease, in
        // one statement, only if the lease was still there. Rows are joined as a set: a
        // `id = any($1)` filter compared every row with the whole array, quadratic in the batch
        // size (seen in a profile at batch 1 000: ExecEvalScalarArrayOp + int8eq, ~4 % of the
        // database's CPU).
        let mark = format!(
            "with lease as (delete from {leases} where id = $2 returning id)
             update {t} o set published_at = now(), next_attempt_at = null,
                              attempts = o.attempts + 1
             from lease, unnest($1::bigint[]) as b(id)
             where o.{c_id} = b.id and o.published_at is null"
        );
        let retry = format!(
            "with lease as (select id from {leases} where id = $5 for share)
             update {t} o
             set attempts = o.attempts + case when f.deferred then 0 else 1 end,
                 deferrals = case when f.deferred then o.deferrals + 1 else 0 end,
                 unsettled_attempts = 0,
                 last_error = f.error,
                 next_attempt_at = case when f.dead then null
                                        else clock_timestamp() + f.delay_ms * interval '1 millisecond' end,
                 dead_lettered_at = case when f.dead then now() end
             from lease, unnest($1::bigint[], $2::text[], $3::bigint[], $4::bool[], $6::bool[])
                  as f(id, error, delay_ms, dead, deferred)
             where o.{c_id} = f.id and o.published_at is null"
        );
        // Released rows leave the lease's ids, so reaping the lease (should the relay die
        // before the batch is settled) charges them nothing; their aggregates stay held until
        // the lease ends, when the rows are due again. With an error, it is kept on the rows
        // for operators. Returns how many of the rows the lease still held.
        let release = format!(
            "with lease as (
                 update {leases} l
                 set ids = array(select unnest(old.ids) except select unnest($1::bigint[]))
                 from (select id, ids from {leases} where id = $2 for update) old
                 where l.id = old.id
                 returning cardinality(old.ids) - cardinality(l.ids) as released
             ),
             noted as (
                 update {t} o set last_error = $3, unsettled_attempts = 0
                 from lease, unnest($1::bigint[]) as b(id)
                 where $3::text is not null and o.{c_id} = b.id and o.published_at is null
             )
             select coalesce((select released from lease), 0)::bigint"
        );
        let release_lease =
            format!("delete from {leases} where id = $1 returning cardinality(ids)::bigint");
        let forget_leases = format!(
            "delete from {leases} l
             using unnest($1::bigint[], $2::timestamptz[]) as f(id, until)
             where l.id = f.id and l.until = f.until"
        );
        // Oldest first along the index of published rows (migration 0004) and the small index
        // of dead ones (0003): each statement reads about as many rows as it deletes, however
        // large the table. The try-lock makes one instance delete at a time; the others skip
        // the round.
        let delete_published = format!(
            "delete from {t} where {c_id} in (
                 select {c_id} from {t}
                 where published_at < now() - $1 * interval '1 millisecond'
                   and pg_try_advisory_xact_lock(
                           hashtextextended($3 || '{t_literal}'::regclass::oid::text, 0))
                 order by published_at limit $2)"
        );
        let delete_dead = format!(
            "delete from {t} where {c_id} in (
                 select {c_id} from {t}
                 where published_at is null
                   and dead_lettered_at < now() - $1 * interval '1 millisecond'
                   and pg_try_advisory_xact_lock(
                           hashtextextended($3 || '{t_literal}'::regclass::oid::text, 0))
                 order by {c_id} limit $2)"
        );
        // Renews this process's awake row (and drops rows of relays gone for a minute).
        let awake = table.companion("awake");
        let keep_awake = format!(
            "with gone as (delete from {awake} where until < now() - interval '1 minute')
             insert into {awake} (instance, until)
             values ($1, clock_timestamp() + $2 * interval '1 millisecond')
             on conflict (instance) do update set until = excluded.until"
        );
        let pending = format!(
            "select count(*), min({created_at})::timestamptz from {t}
             where published_at is null and dead_lettered_at is null",
            created_at = c.created_at.as_deref().unwrap_or("null::timestamptz"),
        );
        // The highest visible id (read from this statement's snapshot, i.e. before the lock
        // table), the virtual xids now writing to the table, and which of the pending fences'
        // writers are still alive. Relay sessions never insert and are left out.
        let fence_probe = format!(
            "select (select max({c_id}) from {t}) as high,
                    array(select distinct l.virtualtransaction from pg_locks l
                          where l.locktype = 'relation' and l.mode = 'RowExclusiveLock'
                            -- the table, or any partition of it (an insert straight into a
                            -- partition locks only the partition)
                            and (l.relation = '{t_literal}'::regclass
                                 or l.relation in (select p.relid
                                                   from pg_partition_tree('{t_literal}'::regclass) p))
                            and l.pid is distinct from pg_backend_pid()
                            -- a prepared transaction's locks have no pid: it is a writer
                            and (l.pid is null
                                 or l.pid not in (select a.pid from pg_stat_activity a
                                                  where a.application_name = '{APPLICATION_NAME}')))
                        as writers,
                    -- a writer is alive while it holds any lock (a prepared transaction has no
                    -- virtualxid lock of its own, but keeps its table locks until it ends)
                    array(select distinct v.virtualtransaction from pg_locks v
                          where v.virtualtransaction = any($1))
                        as alive",
                    );
        Self {
            connections,
            lock_name: "outbox-relay:claim:".to_owned(),
            park_dead,
            columns: columns.clone(),
            max_batch_bytes: i64::try_from(max_batch_bytes).unwrap_or(i64::MAX),
            row_budget: Arc::new(AtomicU32::new(u32::MAX)),
            retention_lock: "outbox-relay:retention:".to_owned(),
            lock: sql(lock),
            claim: sql(claim),
            fetch: sql(fetch),
            lease: sql(lease),
            mark: sql(mark),
            retry: sql(retry),
            release: sql(release),
            release_lease: sql(release_lease),
            forget_leases: sql(forget_leases),
            reap: sql(reap),
            pending: sql(pending),
            delete_published: sql(delete_published),
            delete_dead: sql(delete_dead),
            fence_probe: sql(fence_probe),
            instance: uuid::Uuid::new_v4(),
            keep_awake: sql(keep_awake),
            awake_renewed: Arc::new(Mutex::new(None)),
            guard: commit_order_guard.then(|| Arc::new(Mutex::new(Guard::default()))),
        }
    }

    /// After a claim that found rows: renews this process's awake row unless that was done
    /// less than [`AWAKE_RENEWAL`] ago, so the NOTIFY trigger stays silent while the relay polls
    /// quickly anyway. Best effort: without the table (a schema before 0009) or the privilege,
    /// the trigger simply notifies as before.
    async fn stay_awake(&self, pool: &PgPool) {
        {
            let mut renewed = self.awake_renewed.lock().expect("awake lock poisoned");
            if renewed.is_some_and(|at| at.elapsed() < AWAKE_RENEWAL) {
                return;
            }
            *renewed = Some(std::time::Instant::now());
        }
        let awake_ms = i64::try_from(AWAKE_FOR.as_millis()).unwrap_or(i64::MAX);
        if let Err(err) = sqlx::query(self.keep_awake.clone())
            .bind(self.instance)
            .bind(awake_ms)
            .execute(pool)
            .await
        {
            tracing::debug!(error = %err, "cannot renew the awake row (migration 0009); the NOTIFY trigger keeps notifying");
        }
    }

    /// Advances the commit-order guard inside the claim transaction; returns the horizon and
    /// whether visible rows lie beyond it. `None` horizon: the guard is off.
    async fn horizon(
        &self,
        tx: &mut sqlx::PgConnection,
    ) -> Result<(Option<i64>, bool), sqlx::Error> {
        let Some(guard) = &self.guard else {
            return Ok((None, false));
        };
        let pending_writers: Vec<String> = guard
            .lock()
            .expect("guard lock poisoned")
            .pending
            .iter()
            .flat_map(|(_, writers)| writers.iter().cloned())
            .collect();
        let (high, writers, alive): (Option<i64>, Vec<String>, Vec<String>) =
            sqlx::query_as(self.fence_probe.clone())
                .bind(&pending_writers)
                .fetch_one(&mut *tx)
                .await?;
        let high = high.unwrap_or(0);
        let mut guard = guard.lock().expect("guard lock poisoned");
        // A fence whose writers have all ended makes its id final.
        let done = guard
            .pending
            .iter()
            .filter(|(_, fence)| fence.iter().all(|w| !alive.contains(w)))
            .map(|(fence_high, _)| *fence_high)
            .max();
        if let Some(done) = done {
            guard.horizon = guard.horizon.max(done);
        }
        if writers.is_empty() {
            // Nobody can commit below `high` any more.
            guard.horizon = guard.horizon.max(high);
        } else if guard.pending.back().is_none_or(|(last, _)| *last < high)
            && guard.pending.len() < MAX_FENCES
        {
            guard.pending.push_back((high, writers));
        }
        let horizon = guard.horizon;
        guard
            .pending
            .retain(|(fence_high, _)| *fence_high > horizon);
        Ok((Some(guard.horizon), high > guard.horizon))
    }
}

impl Store for Postgres {
    /// Claims up to `limit` due rows for `lease_duration`; see the module docs for the protocol.
    async fn claim(&self, limit: u32, lease_duration: Duration) -> Result<Claimed, DatabaseError> {
        self.connections
            .bounded("claim", |pool| async move {
                let limit = limit.min(self.row_budget.load(Ordering::Relaxed)).max(1);
                let err = DatabaseError::new("claim");
                let mut tx = pool.begin().await.map_err(err)?;
                let expired: bool = sqlx::query_scalar(self.lock.clone())
                    .bind(&self.lock_name)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(DatabaseError::new("claim"))?;
                if expired {
                    sqlx::query(self.reap.clone())
                        .execute(&mut *tx)
                        .await
                        .map_err(DatabaseError::new("claim"))?;
                }
                let (horizon, held_back) = self
                    .horizon(&mut tx)
                    .await
                    .map_err(DatabaseError::new("claim"))?;
                let rows = sqlx::query(self.claim.clone())
                    .bind(i64::from(limit))
                    .bind(self.park_dead)
                    .bind(horizon)
                    .bind(self.max_batch_bytes)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(DatabaseError::new("claim"))?;
                // As many rows as asked for: more may be due at once (also when the byte bound cut
                // the batch short).
                let full = rows.len() == limit as usize;
                if rows.is_empty() {
                    tx.commit().await.map_err(DatabaseError::new("claim"))?;
                    return Ok(Claimed {
                        batch: None,
                        held_back,
                    });
                }
                let returned = rows.len();
                let picked = rows
                    .iter()
                    .map_while(|row| Picked::decode(row).transpose())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(DatabaseError::new("claim"))?;
                tracing::debug!(asked = limit, returned, kept = picked.len(), "rows claimed");
                self.row_budget.store(
                    next_row_budget(limit, returned, picked.len()),
                    Ordering::Relaxed,
                );
                let ids: Vec<i64> = picked.iter().map(|r| r.id).collect();
                let aggregates: Vec<&str> = picked
                    .iter()
                    .map(|r| r.aggregate_id.as_str())
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect();
                let lease_ms = i64::try_from(lease_duration.as_millis()).unwrap_or(i64::MAX);
                let (id, until) = sqlx::query_as(self.lease.clone())
                    .bind(lease_ms)
                    .bind(&ids)
                    .bind(&aggregates)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(DatabaseError::new("claim"))?;
                tx.commit().await.map_err(DatabaseError::new("claim"))?;
                let lease = Lease { id, until };
                // The claim lock is free again; the contents are read under the lease alone,
                // beside the renewal of the awake row (on another connection).
                let (fetched, ()) = tokio::join!(
                    sqlx::query(self.fetch.clone()).bind(&ids).fetch_all(&pool),
                    self.stay_awake(&pool)
                );
                let fetched = fetched.map_err(DatabaseError::new("claim"));
                let fetched = match fetched {
                    Ok(fetched) => fetched,
                    Err(err) => {
                        // Give the rows back now rather than when the lease runs out; nothing
                        // was attempted, so nothing is charged.
                        let _ = sqlx::query_scalar::<_, i64>(self.release_lease.clone())
                            .bind(lease.id)
                            .fetch_optional(&pool)
                            .await;
                        return Err(err);
                    }
                };
                let rows = join_picked(picked, &fetched, &self.columns)
                    .map_err(DatabaseError::new("claim"))?;
                Ok(Claimed {
                    batch: Some(Batch { rows, lease, full }),
                    held_back,
                })
            })
            .await
    }

    /// Marks the acknowledged rows published and ends the lease, in one statement: the last
    /// statement of every settlement, run even when no row was acknowledged. Returns how many
    /// rows it marked; fewer than `ids.len()` means the lease had expired and another claim
    /// took the rows over (fenced).
    async fn mark(&self, ids: &[i64], lease: Lease) -> Result<u64, DatabaseError> {
        self.connections
            .bounded("mark", |pool| async move {
                let done = sqlx::query(self.mark.clone())
                    .bind(ids)
                    .bind(lease.id)
                    .execute(&pool)
                    .await
                    .map_err(DatabaseError::new("mark"))?;
                Ok(done.rows_affected())
            })
            .await
    }

    /// Records failed attempts: each row gets its error and either a retry time or, when
    /// `dead`, `dead_lettered_at`.
    async fn record_failures(
        &self,
        failures: &[Failure],
        lease: Lease,
    ) -> Result<u64, DatabaseError> {
        self.connections
            .bounded("retry", |pool| async move {
                if failures.is_empty() {
                    return Ok(0);
                }
                let ids: Vec<i64> = failures.iter().map(|f| f.id).collect();
                let errors: Vec<&str> = failures.iter().map(|f| f.error.as_str()).collect();
                let delays: Vec<i64> = failures
                    .iter()
                    .map(|f| i64::try_from(f.retry_in.as_millis()).unwrap_or(i64::MAX))
                    .collect();
                let dead: Vec<bool> = failures.iter().map(|f| f.dead).collect();
                let deferred: Vec<bool> = failures.iter().map(|f| f.deferred).collect();
                let done = sqlx::query(self.retry.clone())
                    .bind(&ids)
                    .bind(&errors)
                    .bind(&delays)
                    .bind(&dead)
                    .bind(lease.id)
                    .bind(&deferred)
                    .execute(&pool)
                    .await
                    .map_err(DatabaseError::new("retry"))?;
                Ok(done.rows_affected())
            })
            .await
    }

    /// Gives rows back without using up an attempt: they leave the lease and are due again
    /// once it ends ([`Store::mark`]; the relay itself pauses when the broker is down).
    /// `error`, when given, is kept as `last_error`. Returns how many rows the lease still held.
    async fn release(
        &self,
        ids: &[i64],
        lease: Lease,
        error: Option<&str>,
    ) -> Result<u64, DatabaseError> {
        self.connections
            .bounded("release", |pool| async move {
                if ids.is_empty() {
                    return Ok(0);
                }
                let rows: i64 = sqlx::query_scalar(self.release.clone())
                    .bind(ids)
                    .bind(lease.id)
                    .bind(error)
                    .fetch_one(&pool)
                    .await
                    .map_err(DatabaseError::new("release"))?;
                Ok(u64::try_from(rows).unwrap_or(0))
            })
            .await
    }

    /// Ends `lease` without an outcome for its rows (shutdown with a batch in flight): they are
    /// due again at once and no attempt is charged. Returns how many rows the lease held.
    async fn release_lease(&self, lease: Lease) -> Result<u64, DatabaseError> {
        self.connections
            .bounded("release", |pool| async move {
                let rows: Option<i64> = sqlx::query_scalar(self.release_lease.clone())
                    .bind(lease.id)
                    .fetch_optional(&pool)
                    .await
                    .map_err(DatabaseError::new("release"))?;
                Ok(rows.map_or(0, |n| u64::try_from(n).unwrap_or(0)))
            })
            .await
    }

    /// Deletes these leases if they exist: leases this instance already ended, brought back by a
    /// database crash that lost the asynchronous commit of their end (`connect_options`).
    /// Matched on id and expiry, so a lease that took a reused id is left alone. Returns how
    /// many came back.
    async fn forget_leases(&self, leases: &[Lease]) -> Result<u64, DatabaseError> {
        self.connections
            .bounded("forget", |pool| async move {
                let ids: Vec<i64> = leases.iter().map(|l| l.id).collect();
                let until: Vec<DateTime<Utc>> = leases.iter().map(|l| l.until).collect();
                let done = sqlx::query(self.forget_leases.clone())
                    .bind(&ids)
                    .bind(&until)
                    .execute(&pool)
                    .await
                    .map_err(DatabaseError::new("forget"))?;
                Ok(done.rows_affected())
            })
            .await
    }

    /// Deletes up to `limit` rows published (or, with `dead`, dead-lettered) more than `age`
    /// ago, in one short statement. Returns the rows deleted; 0 also when another instance
    /// holds the retention lock.
    async fn delete_older(
        &self,
        dead: bool,
        age: Duration,
        limit: u32,
    ) -> Result<u64, DatabaseError> {
        self.connections
            .bounded("retention delete", |pool| async move {
                let statement = if dead {
                    &self.delete_dead
                } else {
                    &self.delete_published
                };
                let age_ms = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
                let done = sqlx::query(statement.clone())
                    .bind(age_ms)
                    .bind(i64::from(limit))
                    .bind(&self.retention_lock)
                    .execute(&pool)
                    .await
                    .map_err(DatabaseError::new("retention delete"))?;
                Ok(done.rows_affected())
            })
            .await
    }

    /// Rows waiting to be published (not dead) and the creation time of the oldest.
    async fn pending(&self) -> Result<(i64, Option<DateTime<Utc>>), DatabaseError> {
        self.connections
            .bounded("pending count", |pool| async move {
                let row = sqlx::query(self.pending.clone())
                    .fetch_one(&pool)
                    .await
                    .map_err(DatabaseError::new("pending count"))?;
                let count: i64 = row
                    .try_get(0)
                    .map_err(DatabaseError::new("pending count"))?;
                let oldest: Option<DateTime<Utc>> = row
                    .try_get(1)
                    .map_err(DatabaseError::new("pending count"))?;
                Ok((count, oldest))
            })
            .await
    }
}

/// The recorded partition counts of the Kafka topics the relay writes to (migration 0008), in
/// the outbox table's database.
#[derive(Debug, Clone)]
pub(crate) struct TopicPartitions {
    connections: Connections,
    recorded: SqlStr,
    record: SqlStr,
}

impl TopicPartitions {
    pub(crate) fn new(connections: Connections, table: &Table) -> Self {
        let ledger = table.companion("topic_partitions");
        Self {
            connections,
            recorded: sql(format!("select topic, partitions from {ledger}")),
            record: sql(format!(
                "insert into {ledger} (topic, partitions) values ($1, $2)
                 on conflict (topic) do update
                     set partitions = excluded.partitions, recorded_at = now()
                     where $3"
            )),
        }
    }
}

impl crate::broker::kafka::partitions::Ledger for TopicPartitions {
    type Error = DatabaseError;

    async fn recorded(&self) -> Result<std::collections::BTreeMap<String, i32>, DatabaseError> {
        self.connections
            .bounded("partitions", |pool| async move {
                let rows: Vec<(String, i32)> = sqlx::query_as(self.recorded.clone())
                    .fetch_all(&pool)
                    .await
                    .map_err(DatabaseError::new("partitions"))?;
                Ok(rows.into_iter().collect())
            })
            .await
    }

    async fn record(
        &self,
        topic: &str,
        partitions: i32,
        replace: bool,
    ) -> Result<(), DatabaseError> {
        self.connections
            .bounded("partitions", |pool| async move {
                sqlx::query(self.record.clone())
                    .bind(topic)
                    .bind(partitions)
                    .bind(replace)
                    .execute(&pool)
                    .await
                    .map_err(DatabaseError::new("partitions"))?;
                Ok(())
            })
            .await
    }
}

/// What `outbox-relay status` reports.
#[derive(Debug, serde::Serialize)]
pub(crate) struct Status {
    /// Unpublished, not dead-lettered rows.
    pub(crate) pending: i64,
    /// Pending rows in a batch an instance is publishing right now (in a lease).
    pub(crate) in_flight: i64,
    /// Pending rows that failed and wait for their next attempt.
    pub(crate) retrying: i64,
    /// Due rows held back behind a waiting (or, in park mode, dead) row of their aggregate.
    pub(crate) parked: i64,
    /// Dead-lettered rows (not published).
    pub(crate) dead: i64,
    /// Age of the oldest pending row, in seconds.
    pub(crate) oldest_pending_age_s: Option<f64>,
}

/// Counts rows by state (scans the unpublished part of the table; meant for humans and scripts,
/// not for a hot loop).
pub(crate) async fn status(
    conn: &mut sqlx::PgConnection,
    table: &Table,
    columns: &Columns,
    park_dead: bool,
) -> Result<Status, sqlx::Error> {
    let t = table.quoted();
    let leases = table.companion("leases");
    let c = Quoted::new(columns);
    let (c_id, c_agg) = (&c.id, &c.aggregate_id);
    let created_at = c.created_at.as_deref().unwrap_or("null::timestamptz");
    let row = sqlx::query(AssertSqlSafe(format!(
        "with leased as (select unnest(ids) as id from {leases}),
         unpublished as (
             select {c_id} as id, {c_agg}::text as aggregate_id,
                    {created_at}::timestamptz as created_at, next_attempt_at, dead_lettered_at,
                    {c_id} in (select id from leased) as in_flight
             from {t} where published_at is null
         ),
         waiting as (
             select aggregate_id from unpublished
             where in_flight
                or (dead_lettered_at is null and next_attempt_at > now())
                or ($1 and dead_lettered_at is not null)
         )
         select
             count(*) filter (where dead_lettered_at is null),
             count(*) filter (where dead_lettered_at is null and in_flight),
             count(*) filter (where dead_lettered_at is null and not in_flight and next_attempt_at > now()),
             count(*) filter (where dead_lettered_at is null and not in_flight
                                and (next_attempt_at is null or next_attempt_at <= now())
                                and aggregate_id in (select aggregate_id from waiting)),
             count(*) filter (where dead_lettered_at is not null),
             extract(epoch from now() - min(created_at) filter (where dead_lettered_at is null))::float8
         from unpublished"
    )))
    .bind(park_dead)
    .fetch_one(&mut *conn)
    .await?;
    Ok(Status {
        pending: row.try_get(0)?,
        in_flight: row.try_get(1)?,
        retrying: row.try_get(2)?,
        parked: row.try_get(3)?,
        dead: row.try_get(4)?,
        oldest_pending_age_s: row.try_get(5)?,
    })
}

/// Which dead-lettered rows `requeue` puts back.
#[derive(Debug)]
pub(crate) enum Requeue {
    EventIds(Vec<String>),
    Aggregate(String),
    All,
}

/// Puts dead-lettered rows back in line: they become due with a fresh attempt budget, and in
/// `id` order ahead of the rows their aggregate parked. `last_error` is kept for the record.
pub(crate) async fn requeue(
    conn: &mut sqlx::PgConnection,
    table: &Table,
    columns: &Columns,
    which: &Requeue,
) -> Result<u64, sqlx::Error> {
    let t = table.quoted();
    let c = Quoted::new(columns);
    let base = format!(
        "update {t} set dead_lettered_at = null, attempts = 0, next_attempt_at = null
         where published_at is null and dead_lettered_at is not null"
    );
    let done = match which {
        Requeue::EventIds(ids) => {
            sqlx::query(AssertSqlSafe(format!(
                "{base} and {}::text = any($1)",
                c.event_id
            )))
            .bind(ids)
            .execute(&mut *conn)
            .await?
        }
        Requeue::Aggregate(aggregate) => {
            sqlx::query(AssertSqlSafe(format!(
                "{base} and {}::text = $1",
                c.aggregate_id
            )))
            .bind(aggregate)
            .execute(&mut *conn)
            .await?
        }
        Requeue::All => sqlx::query(AssertSqlSafe(base)).execute(&mut *conn).await?,
    };
    Ok(done.rows_affected())
}

/// What the claim transaction returns for one row: enough to choose it and lease it.
#[derive(Debug)]
struct Picked {
    id: i64,
    /// '' for a NULL (the claim coalesces it, so it also groups such rows).
    aggregate_id: String,
    attempts: i32,
    deferrals: i32,
    abandoned: bool,
}

impl Picked {
    /// `None` for a row past the batch's byte bound (not claimed).
    fn decode(row: &PgRow) -> Result<Option<Self>, sqlx::Error> {
        // By position, in the claim's select order (a lookup by name hashes the name: a
        // visible share of the relay's CPU at 2 000 rows a claim).
        if !row.try_get::<bool, _>(1)? {
            return Ok(None);
        }
        Ok(Some(Self {
            id: row.try_get(0)?,
            aggregate_id: row.try_get(2)?,
            attempts: row.try_get(3)?,
            deferrals: row.try_get(4)?,
            abandoned: row.try_get(5)?,
        }))
    }
}

/// The batch: each picked row with its contents, in the claim's order. A row missing from
/// `fetched` (deleted by the application since the claim) is left out.
fn join_picked(
    picked: Vec<Picked>,
    fetched: &[PgRow],
    columns: &Columns,
) -> Result<Vec<OutboxRow>, sqlx::Error> {
    let mut contents = fetched.iter().peekable();
    let mut rows = Vec::with_capacity(picked.len());
    for meta in picked {
        let Some(row) = contents.next_if(|r| r.try_get::<i64, _>(0).ok() == Some(meta.id)) else {
            continue;
        };
        rows.push(decode_row(row, meta, columns)?);
    }
    Ok(rows)
}

/// One claimed row with its contents.
///
/// A NULL in a column the message needs (possible in a table adopted without the NOT NULL
/// constraints `migrate` creates) does not fail the claim: the row comes back with the column's
/// name in `null_columns` and fails on its own. A NULL payload is a message without a value (a
/// tombstone); a NULL `headers` means no extra headers, a NULL header column no such header.
fn decode_row(row: &PgRow, meta: Picked, columns: &Columns) -> Result<OutboxRow, sqlx::Error> {
    let mut null_columns = Vec::new();
    let mut required = |name: &'static str, value: Option<String>| {
        value.unwrap_or_else(|| {
            null_columns.push(name);
            String::new()
        })
    };
    // By position, in `fetch`'s select order.
    let event_id = required("event_id", decode_event_id(row, 1)?);
    let aggregate_type = required("aggregate_type", row.try_get(2)?);
    // The claim's coalesced value is used, so the lease and the batch agree on it.
    required("aggregate_id", row.try_get(3)?);
    let event_type = required("event_type", row.try_get(4)?);
    let payload = decode_payload(row, 5)?;
    let created_at: Option<DateTime<Utc>> = row.try_get(7)?;
    if created_at.is_none() && columns.created_at.is_some() {
        null_columns.push("created_at");
    }
    let mut column_headers = Vec::with_capacity(columns.header_columns.len());
    for (index, (_, header)) in columns.header_columns.iter().enumerate() {
        if let Some(value) = row.try_get::<Option<String>, _>(8 + index)? {
            column_headers.push((Arc::clone(header), value));
        }
    }
    Ok(OutboxRow {
        id: meta.id,
        event_id,
        aggregate_type,
        aggregate_id: meta.aggregate_id,
        event_type,
        payload,
        headers: row
            .try_get::<Option<String>, _>(6)?
            .unwrap_or_else(|| "{}".to_owned()),
        column_headers,
        created_at,
        null_columns,
        attempts: meta.attempts,
        deferrals: meta.deferrals,
        abandoned: meta.abandoned,
    })
}

/// The event id as text: a `uuid` column comes in its 16 bytes and is formatted here (its
/// lowercase hyphenated form, as PostgreSQL prints it), rather than converted by the server
/// for every row; a text column as it is.
fn decode_event_id(row: &PgRow, index: usize) -> Result<Option<String>, sqlx::Error> {
    use sqlx::{TypeInfo, ValueRef};
    let raw = row.try_get_raw(index)?;
    if raw.is_null() {
        return Ok(None);
    }
    if raw.type_info().name() == "UUID" {
        let id: uuid::Uuid = row.try_get(index)?;
        return Ok(Some(id.hyphenated().to_string()));
    }
    row.try_get(index)
}

/// The payload column as stored, whatever its type: `jsonb` as PostgreSQL's text of it (its
/// binary form is a version byte and that text), `json` and text types as their text, `bytea`
/// as its bytes. Read without a cast in SQL, so the statement does not depend on the type.
fn decode_payload(row: &PgRow, index: usize) -> Result<Payload, sqlx::Error> {
    use sqlx::postgres::PgValueFormat;
    use sqlx::{TypeInfo, ValueRef};
    let raw = row.try_get_raw(index)?;
    if raw.is_null() {
        return Ok(Payload::Absent);
    }
    let info = raw.type_info();
    let decode = |source| sqlx::Error::ColumnDecode {
        index: "payload".to_owned(),
        source,
    };
    let bytes = raw.as_bytes().map_err(decode)?;
    let text =
        |bytes: &[u8]| String::from_utf8(bytes.to_vec()).map_err(|err| decode(Box::new(err)));
    Ok(match (info.name(), raw.format()) {
        // The fetch is a prepared statement: its values come in binary form.
        ("BYTEA", _) => Payload::Bytes(bytes.to_vec()),
        ("JSONB", PgValueFormat::Binary) => {
            Payload::Json(text(bytes.get(1..).unwrap_or_default())?)
        }
        ("JSONB" | "JSON", _) => Payload::Json(text(bytes)?),
        _ => Payload::Text(text(bytes)?),
    })
}

/// The mapped column names, quoted for PostgreSQL (validated names hold no double quote).
struct Quoted {
    id: String,
    event_id: String,
    aggregate_type: String,
    aggregate_id: String,
    event_type: String,
    payload: String,
    headers: Option<String>,
    header_columns: Vec<String>,
    created_at: Option<String>,
}

impl Quoted {
    fn new(columns: &Columns) -> Self {
        let q = |name: &str| format!("\"{name}\"");
        Self {
            id: q(&columns.id),
            event_id: q(&columns.event_id),
            aggregate_type: q(&columns.aggregate_type),
            aggregate_id: q(&columns.aggregate_id),
            event_type: q(&columns.event_type),
            payload: q(&columns.payload),
            headers: columns.headers.as_deref().map(q),
            header_columns: columns.header_columns.iter().map(|(c, _)| q(c)).collect(),
            created_at: columns.created_at.as_deref().map(q),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The claim against the real PostgreSQL (`TEST_DATABASE_URL`, a server URL; default the
    //! local one), each test in a schema of its own in the `postgres` database, dropped after.

    use super::*;
    use crate::database::postgres::config::DatabaseConfig;

    #[test]
    fn the_row_budget_follows_what_the_byte_bound_kept() {
        assert_eq!(next_row_budget(2000, 4, 3), 4, "cut: about as many as kept");
        assert_eq!(next_row_budget(2000, 2000, 2000), 4000, "full: twice");
        assert_eq!(
            next_row_budget(2000, 10, 10),
            2000,
            "short: the limit again"
        );
        assert_eq!(next_row_budget(u32::MAX, 1, 1), u32::MAX);
    }

    /// A migrated table of its own, and the relay's statements on it under `max_batch_bytes`.
    async fn store(max_batch_bytes: u64) -> (Postgres, sqlx::PgConnection, Table) {
        let server = std::env::var("TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned());
        let name = format!("claim_{}.outbox", uuid::Uuid::new_v4().simple());
        let config: DatabaseConfig = serde_json::from_value(serde_json::json!({
            "url": format!("{server}/postgres"),
            "table": name,
        }))
        .expect("a database section");
        let settings = config.validate().expect("valid");
        let mut conn = schema::connect(&settings.connect).await.expect("connect");
        schema::migrate(&mut conn, &settings.table, &settings.columns, false)
            .await
            .expect("migrate");
        let store = Postgres::new(
            Connections::new(&settings),
            &settings.table,
            &settings.columns,
            ClaimRules {
                park_dead: true,
                commit_order_guard: true,
                max_batch_bytes,
            },
        );
        (store, conn, settings.table)
    }

    #[tokio::test]
    async fn a_claim_stops_at_the_byte_bound_and_the_next_asks_for_about_as_many_rows() {
        // GIVEN 12 events of ~1.5 KB of JSON text each (stored as is, under the 2 KB TOAST
        // threshold) and a bound of 4 KiB, which 3 of them reach
        let (store, mut conn, table) = store(4096).await;
        sqlx::query(sql(format!(
            "insert into {} (aggregate_type, aggregate_id, event_type, payload)
             select 'order', 'big', 'happened', jsonb_build_object('seq', g, 'data', repeat('x', 1500))
             from generate_series(0, 11) g",
            table.quoted()
        )))
        .execute(&mut conn)
        .await
        .expect("insert");

        // WHEN the rows are claimed and marked, batch after batch
        let mut sizes = Vec::new();
        let mut budgets = Vec::new();
        while let Some(batch) = store
            .claim(2000, Duration::from_secs(60))
            .await
            .expect("claim")
            .batch
        {
            sizes.push(batch.rows.len());
            budgets.push(store.row_budget.load(Ordering::Relaxed));
            let ids: Vec<i64> = batch.rows.iter().map(|r| r.id).collect();
            assert_eq!(
                store.mark(&ids, batch.lease).await.expect("mark"),
                ids.len() as u64
            );
        }

        // THEN no batch held more than 3, all 12 were claimed, in order of the claims
        assert!(
            sizes.iter().all(|n| (1..=3).contains(n)),
            "batch sizes {sizes:?}"
        );
        assert_eq!(sizes.iter().sum::<usize>(), 12, "batch sizes {sizes:?}");
        // AND once a claim was cut, the next ones asked for about as many rows as it kept (3,
        // plus a quarter, plus one), not for a whole batch of rows to read and leave
        assert!(budgets.iter().all(|n| *n <= 4), "row budgets {budgets:?}");
        let schema = table.schema().expect("a schema of its own");
        let drop = format!("drop schema \"{schema}\" cascade");
        sqlx::raw_sql(sql(drop))
            .execute(&mut conn)
            .await
            .expect("drop");
    }
}
