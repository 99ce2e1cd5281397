//! outbox-relay: publishes the rows of a transactional-outbox table in PostgreSQL to Kafka (or
//! RabbitMQ), at least once, in order per aggregate, and marks them `published_at`.
//!
//! An application writes its business rows and an event row into the outbox in one transaction;
//! the relay, running as a sidecar, claims committed rows in batches, publishes them, and marks
//! each row only after the broker acknowledged it. See the README for the guarantees.
//!
//! The other direction, inbox mode: messages from Kafka or RabbitMQ into a consuming service's
//! inbox table, deduplicated on (`consumer`, `event_id`), acknowledged only after the commit.
//!
//! # Layout
//! One module per domain noun; each component owns its configuration section. Dependencies
//! between source files point one way (a unit test checks it): `outbox`'s row types at the
//! bottom, the `database` and `broker` layers on them, the outbox loop on their seams, and
//! `cli` on top, where the concrete store and broker are chosen and handed to the loop.
//! - [`cli`]: the `outbox-relay` command line (`run`, `migrate`, `check`, `status`, `requeue`,
//!   `partitions`) and exit codes; the composition root (builds the store, the broker, the
//!   LISTEN, retention and partition-check tasks, and runs the relay over them; and the
//!   inbox's store and consumer, when `[inbox]` is set).
//! - [`config`]: the file as written, its loading and secret files, and the typed
//!   `Settings` it is parsed into once.
//! - `constraint`: the validation vocabulary every section uses (the error naming a key and
//!   the constraint, shared checks); a leaf, so sections owned by components import it
//!   without a cycle back to `config`.
//! - `database`: one module per database family. `database::postgres`: the outbox
//!   statements (claim with the commit-order guard, mark, retry, release, retention), the
//!   connection pool, `[database]`, the table name, `migrate` and the schema check, and the
//!   LISTEN wake-up task, the recorded Kafka partition counts. `database::columns` maps a
//!   table's own column names (`database.layout`, `[database.columns]`) for every family.
//!   `database::DatabaseError` is what every family's operations report.
//! - `broker`: the brokers. `broker::Producer` is the delivery contract when producing, with
//!   one `Outcome` per row and the hold-back of an aggregate's later rows written once;
//!   `broker::Broker` is the closed set dispatched at the edge. `broker::kafka` and
//!   `broker::rabbitmq` each hold the producer, the error classification and their
//!   configuration section (Kafka's property policy included), and `broker::kafka::partitions`
//!   the check of the topics' partition counts; `broker::Shape` is what a message carries
//!   besides its value (the layout's headers, `broker::cloudevents` attributes, the row's);
//!   `broker::template` renders destinations. `broker::consumer` is the consuming contract
//!   (`Consumer`, `Delivery`), with `broker::kafka::consumer` and `broker::rabbitmq::consumer`
//!   (and their `[inbox.kafka]`, `[inbox.rabbitmq]`); `broker::Inbound` is its closed set.
//! - `outbox`: the outbox direction; its row types (`OutboxRow`, `Payload`, `Layout`).
//!   `outbox::store::Store` is what it needs from a database;
//!   `outbox::relay` the loop (claim → publish → settle, pipelined, its state in one struct);
//!   `outbox::settlement` the pure decisions about a published batch; `outbox::dead_letter`,
//!   `outbox::retention`, and `outbox::config` (`[relay]`, `[retry]`, `[retention]`).
//! - `inbox`: the inbox direction: the pure decision of how a delivery is recorded (a row or a
//!   rejection), `inbox::store::InboxStore` (what it needs from a database; PostgreSQL's is
//!   `database::postgres::inbox`), `inbox::ingest` the loop (batch → one transaction →
//!   acknowledge) and its housekeeping, `inbox::config` (`[inbox]`).
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
pub(crate) mod inbox;
pub(crate) mod outbox;
pub mod runtime;
pub mod telemetry;

/// The layout's rule, checked: dependencies between the source files point one way (no file
/// reaches, through `crate::` or `super::` paths, a file that reaches it back), so each layer
/// can be read, and replaced, on its own.
#[cfg(test)]
mod architecture {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// Module path (`outbox::relay`) → source text, test modules cut off.
    fn sources() -> BTreeMap<String, String> {
        fn walk(dir: &Path, out: &mut BTreeMap<String, String>) {
            for entry in std::fs::read_dir(dir).expect("src is readable") {
                let path = entry.expect("a directory entry").path();
                if path.is_dir() {
                    walk(&path, out);
                    continue;
                }
                let relative = path.strip_prefix(concat!(env!("CARGO_MANIFEST_DIR"), "/src"));
                let relative = relative.expect("under src").to_string_lossy().into_owned();
                let Some(module) = relative.strip_suffix(".rs") else {
                    continue;
                };
                let module = module.trim_end_matches("/mod").trim_end_matches("mod");
                let module = module.replace('/', "::");
                let module = if module == "lib" {
                    String::new()
                } else {
                    module
                };
                let text = std::fs::read_to_string(&path).expect("a source file");
                let code = text.split("#[cfg(test)]\nmod ").next().unwrap_or("");
                out.insert(module, code.to_owned());
            }
        }
        let mut out = BTreeMap::new();
        walk(
            Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src")),
            &mut out,
        );
        out
    }

    /// The modules each module's `crate::…` and `super::…` paths name.
    fn edges(sources: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
        let resolve = |path: &str| -> Option<String> {
            let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
            (1..=parts.len())
                .rev()
                .map(|n| parts[..n].join("::"))
                .find(|m| sources.contains_key(m))
        };
        let mut edges = BTreeMap::new();
        for (module, code) in sources {
            let parent = module.rsplit_once("::").map_or("", |(p, _)| p);
            let mut targets = BTreeSet::new();
            for (prefix, base) in [("crate::", String::new()), ("super::", parent.to_owned())] {
                for (at, _) in code.match_indices(prefix) {
                    let tail: String = code[at + prefix.len()..]
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                        .collect();
                    let path = if base.is_empty() {
                        tail
                    } else {
                        format!("{base}::{tail}")
                    };
                    if let Some(target) = resolve(&path).filter(|t| t != module) {
                        targets.insert(target);
                    }
                }
            }
            edges.insert(module.clone(), targets);
        }
        edges
    }

    #[test]
    fn source_files_depend_on_each_other_one_way() {
        let sources = sources();
        assert!(
            sources.contains_key("outbox::relay"),
            "{:?}",
            sources.keys()
        );
        let edges = edges(&sources);
        assert!(
            edges["database::postgres"].contains("outbox"),
            "the scan sees paths"
        );
        // A cycle exists iff some module reaches itself.
        for start in edges.keys() {
            let mut seen = BTreeSet::new();
            let mut todo: Vec<&String> = edges[start].iter().collect();
            while let Some(next) = todo.pop() {
                assert!(next != start, "{start} reaches itself: {edges:#?}");
                if seen.insert(next) {
                    todo.extend(edges[next].iter());
                }
            }
        }
    }
}
