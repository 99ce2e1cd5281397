//! outbox-relay: publishes the rows of a transactional-outbox table in PostgreSQL to Kafka (or
//! RabbitMQ), at least once, in order per aggregate, and marks them `published_at`.
//!
//! An application writes its business rows and an event row into the outbox in one transaction;
//! the relay, running as a sidecar, claims committed rows in batches, publishes them, and marks
//! each row only after the broker acknowledged it. See the README for the guarantees.
//!
//! # Layout
//! - [`cli`]: the `outbox-relay` command line (`run`, `migrate`, `check`, `status`, `requeue`)
//!   and exit codes.
//! - [`config`]: the TOML + environment configuration, its defaults and validation.
//! - [`health`]: the optional HTTP listener: `/healthz`, `/readyz`, `/metrics`.
//! - `outbox`: the outbox table: its validated name, rows, every SQL statement (claim with the
//!   commit-order guard, mark, retry, release, retention), `migrate`, the schema check, and the
//!   LISTEN wake-up task.
//! - `publisher`: the delivery contract (`publisher::Publisher`) and the sinks (Kafka,
//!   RabbitMQ, discard), including copies to the dead-letter destination.
//! - [`relay`]: the main loop: claim → publish → settle, pipelined; backoff, outage handling,
//!   crash suspects, dead letters.
//! - `retention`: bounded deletion of old published (and dead) rows, one instance at a time.
//! - [`shutdown`]: SIGTERM/SIGINT to a cancellation token.
//! - [`telemetry`]: logging, metric names and the Prometheus recorder, error-chain display.

pub mod cli;
pub mod config;
pub mod health;
pub(crate) mod outbox;
pub(crate) mod publisher;
pub mod relay;
pub(crate) mod retention;
pub mod shutdown;
pub mod telemetry;
