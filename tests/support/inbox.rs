//! The inbox side of the tests: a per-test inbox table and consumer name, the configuration of
//! the process that fills it, messages produced straight to Kafka or RabbitMQ (with the
//! headers a test chooses), and reads of the table.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::PgPool;

use super::{
    Broker, Output, RelayProcess, amqp_url, database_url, free_address, kafka_brokers, pool,
    run_binary, unique, wait_until,
};

/// One message as a test produces it.
#[derive(Debug, Clone)]
pub struct Message {
    /// Kafka key (the aggregate).
    pub key: String,
    /// Headers (Kafka) or AMQP headers (long strings).
    pub headers: Vec<(String, String)>,
    /// AMQP `message_id`.
    pub message_id: Option<String>,
    pub body: Vec<u8>,
}

impl Message {
    /// An event as this relay sends it: `event_id`, `aggregate_id`, `seq` headers, JSON body.
    pub fn event(aggregate: &str, seq: i64) -> Self {
        Self {
            key: aggregate.to_owned(),
            headers: vec![
                ("event_id".to_owned(), format!("{aggregate}:{seq}")),
                ("event_type".to_owned(), "happened".to_owned()),
                ("aggregate_type".to_owned(), "order".to_owned()),
                ("aggregate_id".to_owned(), aggregate.to_owned()),
                ("seq".to_owned(), seq.to_string()),
            ],
            message_id: None,
            body: serde_json::json!({ "seq": seq }).to_string().into_bytes(),
        }
    }

    /// `aggregates` × `events`, interleaved round-robin (each aggregate's in seq order).
    pub fn stream(aggregates: usize, seqs: std::ops::Range<i64>) -> Vec<Self> {
        let mut out = Vec::new();
        for seq in seqs {
            for a in 0..aggregates {
                out.push(Self::event(&format!("a{a}"), seq));
            }
        }
        out
    }
}

/// Produces `messages` to `topic` on `brokers`, in order, each acknowledged.
pub async fn produce_to(brokers: &str, topic: &str, messages: &[Message]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "2")
        .set("partitioner", "murmur2_random")
        .create()
        .expect("producer");
    // All enqueued at once (join_all polls them in order, so each partition keeps it), then
    // every delivery report awaited.
    let sends = messages.iter().map(|m| {
        let mut headers = OwnedHeaders::new();
        for (name, value) in &m.headers {
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_bytes()),
            });
        }
        producer.send(
            FutureRecord::to(topic)
                .key(&m.key)
                .payload(&m.body)
                .headers(headers),
            Duration::from_secs(30),
        )
    });
    for report in futures::future::join_all(sends).await {
        report.expect("delivered");
    }
}

/// Produces to the shared test broker.
pub async fn produce(topic: &str, messages: &[Message]) {
    produce_to(&kafka_brokers(), topic, messages).await;
}

/// Declares a durable queue for a test.
pub async fn declare_queue() -> String {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("RabbitMQ must be running");
    let channel = connection.create_channel().await.expect("channel");
    let queue = unique("inbox-q");
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare queue");
    queue
}

/// Publishes `messages` persistently to `queue` (default exchange), confirmed.
pub async fn publish(queue: &str, messages: &[Message]) {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("RabbitMQ must be running");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut confirms = Vec::new();
    for m in messages {
        let mut headers = BTreeMap::new();
        for (name, value) in &m.headers {
            headers.insert(
                ShortString::from(name.as_str()),
                AMQPValue::LongString(value.as_str().into()),
            );
        }
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(FieldTable::from(headers));
        if let Some(id) = &m.message_id {
            properties = properties.with_message_id(id.as_str().into());
        }
        confirms.push(
            channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    &m.body,
                    properties,
                )
                .await
                .expect("publish"),
        );
    }
    for confirm in confirms {
        confirm.await.expect("confirm");
    }
}

/// Messages ready plus unacknowledged in `queue` (a passive declare reports both together as
/// its count of messages not yet acknowledged is not exposed: `rabbitmqctl` is).
pub fn queue_depth(queue: &str) -> (u64, u64) {
    let listing = super::rabbit::rabbitmqctl(&[
        "list_queues",
        "-q",
        "--no-table-headers",
        "name",
        "messages_ready",
        "messages_unacknowledged",
    ]);
    for line in listing.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        if parts.first() == Some(&queue) {
            return (parts[1].parse().unwrap(), parts[2].parse().unwrap());
        }
    }
    panic!("queue {queue} not listed: {listing}");
}

/// The prefetch counts of the consumers on `queue`, as the broker lists them.
pub fn consumer_prefetch(queue: &str) -> Vec<u64> {
    let listing = super::rabbit::rabbitmqctl(&[
        "list_consumers",
        "-q",
        "--no-table-headers",
        "queue_name",
        "prefetch_count",
    ]);
    listing
        .lines()
        .filter_map(|line| {
            let parts: Vec<&str> = line.split_whitespace().collect();
            (parts.first() == Some(&queue)).then(|| parts[1].parse().unwrap())
        })
        .collect()
}

/// One test's inbox table and the configuration of the process that fills it.
pub struct Inbox {
    pub from: Broker,
    pub database_url: String,
    pub pool: PgPool,
    pub table: String,
    pub consumer: String,
    /// Topics or queues.
    pub sources: Vec<String>,
    /// Kafka bootstrap servers (the shared broker unless a test sets its own).
    pub brokers: String,
    /// Keys of `[inbox]` beyond table, consumer and from, as TOML values.
    pub keys: BTreeMap<&'static str, String>,
    /// Keys of `[inbox.kafka]` / `[inbox.rabbitmq]` beyond the required ones.
    pub source_keys: BTreeMap<&'static str, String>,
    /// Extra TOML appended (e.g. an outbox's `[broker]`), verbatim.
    pub extra: String,
    /// The AMQP URL (a proxy's, in some tests).
    pub amqp_url: String,
    dir: tempfile::TempDir,
}

impl Inbox {
    /// A fresh inbox table (not migrated) consuming `sources` from `from`.
    pub async fn unmigrated(from: Broker, sources: Vec<String>) -> Self {
        let table = unique("inbox");
        let mut source_keys = BTreeMap::new();
        if from == Broker::Kafka {
            source_keys.insert("session_timeout", "\"3s\"".to_owned());
        }
        Self {
            from,
            database_url: database_url(),
            pool: pool().await,
            consumer: table.replace("inbox_", "svc-"),
            table,
            sources,
            brokers: kafka_brokers(),
            keys: BTreeMap::new(),
            source_keys,
            extra: String::new(),
            amqp_url: amqp_url(),
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// A fresh, migrated inbox consuming `sources` from `from`.
    pub async fn new(from: Broker, sources: Vec<String>) -> Self {
        let inbox = Self::unmigrated(from, sources).await;
        inbox.command(&["migrate"]).success();
        inbox
    }

    fn config_text(&self, http: Option<std::net::SocketAddr>) -> String {
        let mut text = format!(
            "[database]\nurl = \"{}\"\n\n[inbox]\ntable = \"{}\"\nconsumer = \"{}\"\nfrom = \"{}\"\n",
            self.database_url,
            self.table,
            self.consumer,
            match self.from {
                Broker::Kafka => "kafka",
                Broker::RabbitMq => "rabbitmq",
            }
        );
        for (key, value) in &self.keys {
            text.push_str(&format!("{key} = {value}\n"));
        }
        let sources: Vec<String> = self.sources.iter().map(|s| format!("\"{s}\"")).collect();
        match self.from {
            Broker::Kafka => text.push_str(&format!(
                "\n[inbox.kafka]\nbrokers = \"{}\"\ntopics = [{}]\n",
                self.brokers,
                sources.join(", ")
            )),
            Broker::RabbitMq => text.push_str(&format!(
                "\n[inbox.rabbitmq]\nurl = \"{}\"\nqueues = [{}]\n",
                self.amqp_url,
                sources.join(", ")
            )),
        }
        for (key, value) in &self.source_keys {
            text.push_str(&format!("{key} = {value}\n"));
        }
        text.push_str("\n[log]\nformat = \"text\"\nlevel = \"info,outbox_relay=debug\"\n");
        if let Some(addr) = http {
            text.push_str(&format!("\n[http]\nlisten = \"{addr}\"\n"));
        }
        text.push_str(&self.extra);
        text
    }

    fn write_config(&self, http: Option<std::net::SocketAddr>) -> PathBuf {
        let path = self.dir.path().join(unique("inbox.toml"));
        std::fs::write(&path, self.config_text(http)).expect("write config");
        path
    }

    pub fn config_file(&self) -> PathBuf {
        self.write_config(None)
    }

    pub fn command(&self, args: &[&str]) -> Output {
        run_binary(&self.config_file(), args, &[])
    }

    /// Starts `outbox-relay run` with this inbox's configuration.
    pub fn start(&self) -> RelayProcess {
        RelayProcess::start(
            self.config_file(),
            self.dir.path().join(unique("inbox-log")),
        )
    }

    /// Starts it with an HTTP listener, for its metrics.
    pub fn start_observed(&self) -> (RelayProcess, std::net::SocketAddr) {
        let addr = free_address();
        let config = self.write_config(Some(addr));
        let process = RelayProcess::start(config, self.dir.path().join(unique("inbox-log")));
        (process, addr)
    }

    pub async fn scalar(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.replace("{t}", &self.table)))
            .fetch_one(&self.pool)
            .await
            .expect("query")
    }

    /// Blocks the inbox's inserts: a trigger takes an advisory lock the returned connection
    /// holds, until it is closed (dropped). May be called again once the connection is gone.
    pub async fn block_inserts(&self) -> sqlx::PgConnection {
        use sqlx::Connection;
        let t = &self.table;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "create or replace function {t}_block() returns trigger language plpgsql as $$
             begin perform pg_advisory_xact_lock(hashtext('{t}')); return null; end $$;
             create or replace trigger {t}_block before insert on {t}
                 for each statement execute function {t}_block();"
        )))
        .execute(&self.pool)
        .await
        .expect("install the blocker");
        let mut holder = sqlx::PgConnection::connect(&self.database_url)
            .await
            .unwrap();
        sqlx::query("select pg_advisory_lock(hashtext($1))")
            .bind(t)
            .execute(&mut holder)
            .await
            .unwrap();
        holder
    }

    /// Whether an insert of the inbox waits on the blocker.
    pub async fn insert_blocked(&self) -> bool {
        sqlx::query_scalar::<_, bool>(
            "select exists (select 1 from pg_locks l join pg_stat_activity a using (pid)
                            where l.locktype = 'advisory' and not l.granted
                              and a.application_name = 'outbox-relay' and a.query like $1)",
        )
        .bind(format!("%{}%", self.table))
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    /// Records a fault case's outcome (called after [`Inbox::assert_exactly`] held: nothing
    /// missing, nothing twice, order kept) in `FAULTS_REPORT`, for `scripts/faults.sh`.
    pub async fn report(&self, scenario: &str, events: usize, recovery: Option<Duration>) {
        let Ok(path) = std::env::var("FAULTS_REPORT") else {
            return;
        };
        let line = serde_json::json!({
            "kind": "inbox",
            "scenario": scenario,
            "from": match self.from { Broker::Kafka => "Kafka", Broker::RabbitMq => "RabbitMq" },
            "events": events,
            "rows": self.rows().await,
            "redeliveries_skipped": self.duplicates().await,
            "rejected": self.rejected().await,
            "recovery_ms": recovery.map(|r| r.as_millis() as u64),
        });
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("open FAULTS_REPORT");
        writeln!(file, "{line}").expect("write FAULTS_REPORT");
    }

    /// Rows in the inbox.
    pub async fn rows(&self) -> i64 {
        self.scalar("select count(*) from {t}").await
    }

    /// Messages in the rejected table.
    pub async fn rejected(&self) -> i64 {
        self.scalar("select count(*) from {t}_rejected").await
    }

    /// Duplicates skipped, as `status` reports them.
    pub async fn duplicates(&self) -> i64 {
        self.scalar("select coalesce(sum(duplicates), 0)::int8 from {t}_stats")
            .await
    }

    pub async fn wait_rows(&self, count: i64, timeout: Duration) {
        wait_until(
            timeout,
            &format!("{count} rows in {}", self.table),
            || async { self.rows().await >= count },
        )
        .await;
    }

    /// Every row as (aggregate id, seq header, event id), in `id` order.
    pub async fn contents(&self) -> Vec<(String, i64, String)> {
        sqlx::query_as::<_, (String, String, String)>(sqlx::AssertSqlSafe(format!(
            "select coalesce(aggregate_id, ''), coalesce(headers->>'seq', '-1'), event_id
             from {} order by id",
            self.table
        )))
        .fetch_all(&self.pool)
        .await
        .expect("read inbox")
        .into_iter()
        .map(|(a, seq, id)| (a, seq.parse().unwrap_or(-1), id))
        .collect()
    }

    /// Asserts the inbox holds exactly `expected` (event ids), once each, and that each
    /// aggregate's rows are in seq order by `id`.
    pub async fn assert_exactly(&self, expected: &[Message]) {
        let wanted: std::collections::BTreeSet<String> = expected
            .iter()
            .map(|m| {
                m.headers
                    .iter()
                    .find(|(n, _)| n == "event_id")
                    .map(|(_, v)| v.clone())
                    .expect("an event id")
            })
            .collect();
        self.assert_exactly_ids(&wanted).await;
    }

    /// Asserts the inbox holds exactly the events `wanted`, once each, and that each
    /// aggregate's rows are in seq order by `id`.
    pub async fn assert_exactly_ids(&self, wanted: &std::collections::BTreeSet<String>) {
        let contents = self.contents().await;
        let mut seen = std::collections::BTreeMap::new();
        for (_, _, id) in &contents {
            *seen.entry(id.clone()).or_insert(0) += 1;
        }
        let doubled: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            doubled.is_empty(),
            "event ids in the inbox twice: {doubled:?}"
        );
        let got: std::collections::BTreeSet<String> = seen.into_keys().collect();
        let missing: Vec<_> = wanted.difference(&got).take(10).collect();
        let unexpected: Vec<_> = got.difference(wanted).take(10).collect();
        assert!(
            missing.is_empty() && unexpected.is_empty(),
            "missing {missing:?} (of {}), unexpected {unexpected:?}",
            wanted.len()
        );
        let mut last: BTreeMap<String, i64> = BTreeMap::new();
        for (aggregate, seq, id) in contents {
            if let Some(before) = last.insert(aggregate.clone(), seq) {
                assert!(
                    seq > before,
                    "aggregate {aggregate}: seq {seq} ({id}) after {before}"
                );
            }
        }
    }
}
