//! outbox-relay: publishes the rows of a transactional-outbox table in PostgreSQL to Kafka (or
//! RabbitMQ), at least once, in order per aggregate, and marks them `published_at`.
//!
//! An application writes its business rows and an event row into the outbox in one transaction;
//! the relay, running as a sidecar, claims committed rows in batches, publishes them, and marks
//! each row only after the broker acknowledged it. See the README for the guarantees.
//!
//! # Layout
//! One module per domain noun; each component owns its configuration section.
//! - [`cli`]: the `outbox-relay` command line (`run`, `migrate`, `check`, `status`, `requeue`)
//!   and exit codes; the composition root.
//! - [`config`]: the file as written, its loading and secret files, and the typed
//!   `Settings` it is parsed into once.
//! - `constraint`: the validation vocabulary every section uses (the error naming a key and
//!   the constraint, shared checks); a leaf, so sections owned by components import it
//!   without a cycle back to `config`.
//! - `database`: one module per database family. `database::postgres`: the outbox
//!   statements (claim with the commit-order guard, mark, retry, release, retention), the
//!   connection pool, `[database]`, the table name, `migrate` and the schema check, and the
//!   LISTEN wake-up task. `database::DatabaseError` is what every family's operations report.
//! - `broker`: the brokers. `broker::Producer` is the delivery contract when producing, with
//!   one `Outcome` per row and the hold-back of an aggregate's later rows written once;
//!   `broker::Broker` is the closed set dispatched at the edge. `broker::kafka` and
//!   `broker::rabbitmq` each hold the producer, the error classification and their
//!   configuration section (Kafka's property policy included); `broker::template` renders
//!   destinations. Consuming (the inbox) goes beside producing.
//! - `outbox`: the outbox direction. `outbox::store::Store` is what it needs from a database;
//!   `outbox::relay` the loop (claim → publish → settle, pipelined, its state in one struct);
//!   `outbox::settlement` the pure decisions about a published batch; `outbox::dead_letter`,
//!   `outbox::retention`, and `outbox::config` (`[relay]`, `[retry]`, `[retention]`).
//!   The inbox direction goes beside it.
//! - [`runtime`]: what both directions use: backoff, outage bookkeeping, and
//!   [`runtime::shutdown`] (SIGTERM/SIGINT to a cancellation token).
//! - [`health`]: the optional HTTP listener (`[http]`): `/healthz`, `/readyz`, `/metrics`.
//! - [`telemetry`]: logging (`[log]`), metric names and the Prometheus recorder, error-chain
//!   display.

pub(crate) mod broker;
pub mod cli;
pub mod config;
pub(crate) mod constraint;
pub(crate) mod database;
pub mod health;
pub(crate) mod outbox;
pub mod runtime;
pub mod telemetry;
