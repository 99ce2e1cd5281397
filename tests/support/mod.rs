//! Test support: a per-test outbox table, the relay binary as a child process, a Kafka consumer,
//! and waits on conditions (never fixed sleeps).
//!
//! Service addresses come from the environment with loopback defaults:
//! `TEST_DATABASE_URL` (a server URL; each test gets its own table in database
//! `outbox_relay_test`), `TEST_KAFKA_BROKERS`.

#![allow(dead_code)]

pub mod inbox;
pub mod kafka;
pub mod oracle;
pub mod postgres;
pub mod proxy;
pub mod rabbit;
pub mod tls;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio::sync::OnceCell;

pub const TEST_DATABASE: &str = "outbox_relay_test";

/// Upper bound of a wait on a condition that should hold within seconds.
pub const WAIT: Duration = Duration::from_secs(60);

pub fn server_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

pub fn database_url() -> String {
    format!("{}/{TEST_DATABASE}", server_url())
}

pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

pub fn kafka_brokers() -> String {
    std::env::var("TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// A short random name part, so tests running in parallel never share a table or topic.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

static DATABASE: OnceCell<()> = OnceCell::const_new();

/// A pool on the shared test database (created on first use).
pub async fn pool() -> PgPool {
    DATABASE
        .get_or_init(|| async {
            let admin = PgPoolOptions::new()
                .max_connections(1)
                .connect(&format!("{}/postgres", server_url()))
                .await
                .expect("PostgreSQL must be running (scripts/services.sh starts it)");
            let created = sqlx::query(sqlx::AssertSqlSafe(format!(
                "create database {TEST_DATABASE}"
            )))
            .execute(&admin)
            .await;
            if let Err(err) = created {
                let code = err
                    .as_database_error()
                    .and_then(|e| e.code())
                    .unwrap_or_default();
                // 42P04: exists; 23505: a concurrent test binary created it at the same moment.
                assert!(
                    code == "42P04" || code == "23505",
                    "cannot create test database: {err}"
                );
            }
        })
        .await;
    PgPoolOptions::new()
        .max_connections(4)
        .connect(&database_url())
        .await
        .expect("connect to the test database")
}

/// Polls `condition` every 50 ms until it holds or `timeout` passes; panics naming `what` then.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The broker a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broker {
    Kafka,
    RabbitMq,
}

/// One test's outbox table and the configuration of the relay that serves it.
pub struct Outbox {
    pub broker: Broker,
    /// The relay's `database.url`.
    pub database_url: String,
    pub pool: PgPool,
    pub table: String,
    /// Topic prefix; the relay publishes to `{prefix}.{aggregate_type}`.
    pub topic_prefix: String,
    /// Keys per config section, as TOML values, written into the generated config (`database`:
    /// beside `url` and `table`).
    pub database: BTreeMap<&'static str, String>,
    pub relay: BTreeMap<&'static str, String>,
    pub retry: BTreeMap<&'static str, String>,
    pub kafka: BTreeMap<&'static str, String>,
    pub kafka_properties: BTreeMap<&'static str, String>,
    pub rabbitmq: BTreeMap<&'static str, String>,
    /// `[broker.rabbitmq.tls]` keys; the section is written only when some are set.
    pub rabbitmq_tls: BTreeMap<&'static str, String>,
    /// `[http] listen` address, when set.
    pub http: Option<std::net::SocketAddr>,
    pub retention: BTreeMap<&'static str, String>,
    /// Extra `[broker]` keys.
    pub broker_keys: BTreeMap<&'static str, String>,
    /// Further sections (`database.columns`, ...): name → keys as TOML values.
    pub sections: BTreeMap<&'static str, BTreeMap<String, String>>,
    pub dir: tempfile::TempDir,
    /// Held for the test's duration: shared for ordinary RabbitMQ tests, exclusive for tests
    /// that restart or reconfigure the broker.
    _rabbit_guard: Option<rabbit::Guard>,
}

impl Outbox {
    /// A fresh outbox table, created by `outbox-relay migrate`, publishing to Kafka.
    pub async fn new() -> Self {
        Self::for_broker(Broker::Kafka).await
    }

    /// A fresh, migrated outbox table publishing to `broker`.
    pub async fn for_broker(broker: Broker) -> Self {
        let mut outbox = Self::unmigrated().await;
        outbox.set_broker(broker).await;
        outbox.migrate().success();
        outbox
    }

    /// Switches the broker; RabbitMQ tests share the broker unless `exclusive_rabbitmq` is called.
    pub async fn set_broker(&mut self, broker: Broker) {
        self.broker = broker;
        if broker == Broker::RabbitMq && self._rabbit_guard.is_none() {
            self._rabbit_guard = Some(rabbit::Guard::shared().await);
        }
    }

    /// For tests that restart or reconfigure RabbitMQ: waits until no other RabbitMQ test runs.
    pub async fn exclusive_rabbitmq(&mut self) {
        self.broker = Broker::RabbitMq;
        self._rabbit_guard = None;
        self._rabbit_guard = Some(rabbit::Guard::exclusive().await);
    }

    /// The AMQP exchange this test's events go to.
    pub fn exchange(&self) -> String {
        self.topic_prefix.clone()
    }

    /// Points the relay at a port where no broker listens.
    pub fn unreachable_broker(&mut self) {
        match self.broker {
            Broker::Kafka => {
                self.kafka.insert("brokers", "\"127.0.0.1:1\"".to_owned());
            }
            Broker::RabbitMq => {
                self.rabbitmq
                    .insert("url", "\"amqp://guest:guest@127.0.0.1:1/%2f\"".to_owned());
            }
        }
    }

    /// Subscribes to what the relay publishes for `aggregate_type`: a Kafka topic with
    /// `partitions` partitions, or a durable queue bound to the test's exchange.
    pub async fn reader(&self, aggregate_type: &str, partitions: i32) -> Reader {
        match self.broker {
            Broker::Kafka => Reader::Kafka(
                kafka::TopicReader::create(&self.topic(aggregate_type), partitions).await,
            ),
            Broker::RabbitMq => {
                let queue =
                    rabbit::bind_queue(&self.exchange(), &format!("{aggregate_type}.#")).await;
                Reader::RabbitMq(Box::new(rabbit::QueueReader::new(&queue).await))
            }
        }
    }

    /// A durable queue bound to the test's exchange for `aggregate_type` (RabbitMQ only),
    /// for tests that read it later, e.g. after restarting the broker.
    pub async fn bind_queue(&self, aggregate_type: &str) -> String {
        rabbit::bind_queue(&self.exchange(), &format!("{aggregate_type}.#")).await
    }

    /// A fresh table name with no table behind it yet.
    pub async fn unmigrated() -> Self {
        Self::unmigrated_at(database_url(), pool().await)
    }

    /// A fresh table name on another server (`url`, reached by the test through `pool`).
    pub fn unmigrated_at(url: String, pool: PgPool) -> Self {
        let table = unique("outbox");
        let mut relay = BTreeMap::new();
        relay.insert("poll_interval", "\"100ms\"".to_owned());
        relay.insert("lease_duration", "\"10s\"".to_owned());
        relay.insert("summary_interval", "\"5s\"".to_owned());
        let mut retry = BTreeMap::new();
        retry.insert("initial_backoff", "\"100ms\"".to_owned());
        retry.insert("max_backoff", "\"1s\"".to_owned());
        let mut kafka_properties = BTreeMap::new();
        kafka_properties.insert("message.timeout.ms", "\"5000\"".to_owned());
        let mut rabbitmq = BTreeMap::new();
        rabbitmq.insert("confirm_timeout", "\"5s\"".to_owned());
        Self {
            broker: Broker::Kafka,
            rabbitmq,
            rabbitmq_tls: BTreeMap::new(),
            http: None,
            retention: BTreeMap::new(),
            broker_keys: BTreeMap::new(),
            sections: BTreeMap::new(),
            _rabbit_guard: None,
            database_url: url,
            pool,
            topic_prefix: table.replace('_', "-"),
            table,
            database: BTreeMap::new(),
            relay,
            retry,
            kafka: BTreeMap::new(),
            kafka_properties,
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// The Kafka topic events of `aggregate_type` go to.
    pub fn topic(&self, aggregate_type: &str) -> String {
        format!("{}.{aggregate_type}", self.topic_prefix)
    }

    /// Writes the relay's config file and returns its path.
    pub fn config_file(&self) -> PathBuf {
        self.config_file_named("relay.toml", self.http)
    }

    /// The config file `name`, with the HTTP listener on `http` (if any) instead of `self.http`.
    fn config_file_named(&self, name: &str, http: Option<std::net::SocketAddr>) -> PathBuf {
        let section = |name: &str, entries: &BTreeMap<&'static str, String>| {
            let mut text = format!("[{name}]\n");
            for (key, value) in entries {
                text.push_str(&format!("\"{key}\" = {value}\n"));
            }
            text
        };
        let mut kafka = self.kafka.clone();
        kafka
            .entry("brokers")
            .or_insert_with(|| format!("\"{}\"", kafka_brokers()));
        kafka
            .entry("topic")
            .or_insert_with(|| format!("\"{}.{{aggregate_type}}\"", self.topic_prefix));
        let mut rabbitmq = self.rabbitmq.clone();
        rabbitmq
            .entry("url")
            .or_insert_with(|| format!("\"{}\"", amqp_url()));
        rabbitmq
            .entry("exchange")
            .or_insert_with(|| format!("\"{}\"", self.exchange()));
        let kind = match self.broker {
            Broker::Kafka => "kafka",
            Broker::RabbitMq => "rabbitmq",
        };
        let text = [
            format!(
                "[database]\nurl = \"{}\"\ntable = \"{}\"\n{}",
                self.database_url,
                self.table,
                section("database", &self.database).trim_start_matches("[database]\n")
            ),
            section("relay", &self.relay),
            section("retry", &self.retry),
            format!(
                "{}\"kind\" = \"{kind}\"\n",
                section("broker", &self.broker_keys)
            ),
            section("broker.kafka", &kafka),
            section("broker.kafka.properties", &self.kafka_properties),
            section("broker.rabbitmq", &rabbitmq),
            if self.rabbitmq_tls.is_empty() {
                String::new()
            } else {
                section("broker.rabbitmq.tls", &self.rabbitmq_tls)
            },
            section("retention", &self.retention),
            "[log]\nformat = \"text\"\nlevel = \"info,outbox_relay=debug\"\n".to_owned(),
            http.map(|addr| format!("[http]\nlisten = \"{addr}\"\n"))
                .unwrap_or_default(),
        ]
        .join("\n");
        let mut text = text;
        for (name, entries) in &self.sections {
            text.push_str(&format!("\n[{name}]\n"));
            for (key, value) in entries {
                text.push_str(&format!("\"{key}\" = {value}\n"));
            }
        }
        // Written aside and renamed, so concurrent commands never read a half-written file.
        let path = self.dir.path().join(name);
        let partial = self.dir.path().join(unique("relay.toml.partial"));
        std::fs::write(&partial, text).expect("write config");
        std::fs::rename(&partial, &path).expect("move config into place");
        path
    }

    /// Runs `outbox-relay <args>` with this outbox's config to completion.
    pub fn command(&self, args: &[&str]) -> Output {
        run_binary(&self.config_file(), args, &[])
    }

    pub fn migrate(&self) -> Output {
        self.command(&["migrate"])
    }

    /// Starts `outbox-relay run` in the background.
    pub fn start(&self) -> RelayProcess {
        RelayProcess::start(
            self.config_file(),
            self.dir.path().join(unique("relay-log")),
        )
    }

    /// Starts `outbox-relay run` in the background with an HTTP listener of its own, so a test
    /// can ask this instance for its metrics ([`metric`]); returns the listener's address.
    pub fn start_observed(&self) -> (RelayProcess, std::net::SocketAddr) {
        let addr = free_address();
        let config = self.config_file_named(&unique("relay-observed.toml"), Some(addr));
        let relay = RelayProcess::start(config, self.dir.path().join(unique("relay-log")));
        (relay, addr)
    }

    /// Inserts events `seqs` for one aggregate in one committed transaction; payload and header
    /// `seq` carry the sequence number.
    pub async fn insert(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        seqs: std::ops::Range<i64>,
    ) {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "insert into {} (aggregate_type, aggregate_id, event_type, payload, headers)
             select $1, $2, 'happened', jsonb_build_object('seq', s), jsonb_build_object('seq', s::text)
             from generate_series($3::bigint, $4::bigint - 1) s",
            self.table
        )))
        .bind(aggregate_type)
        .bind(aggregate_id)
        .bind(seqs.start)
        .bind(seqs.end)
        .execute(&self.pool)
        .await
        .expect("insert events");
    }

    /// `(published, total)` row counts.
    pub async fn counts(&self) -> (i64, i64) {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "select count(published_at), count(*) from {}",
            self.table
        )))
        .fetch_one(&self.pool)
        .await
        .expect("count rows")
    }

    /// Rows in a batch some instance is publishing (named by a lease, migration 0005).
    pub async fn leased(&self) -> i64 {
        self.scalar("select coalesce(sum(cardinality(ids)), 0)::bigint from {leases}")
            .await
    }

    /// Waits until no row is left unpublished and not dead-lettered.
    pub async fn wait_all_settled(&self, timeout: Duration) {
        wait_until(timeout, "every row published or dead-lettered", || async {
            let open: i64 = self
                .scalar("select count(*) from {table} where published_at is null and dead_lettered_at is null")
                .await;
            open == 0
        })
        .await;
    }

    pub async fn wait_all_published(&self, timeout: Duration) {
        wait_until(timeout, "every outbox row published", || async {
            let (published, total) = self.counts().await;
            published == total
        })
        .await;
    }

    /// `sql` with `{table}` and `{leases}` replaced by this test's table and its lease table.
    fn render(&self, sql: &str) -> String {
        sql.replace("{leases}", &format!("{}_leases", self.table))
            .replace("{table}", &self.table)
    }

    /// The one value `sql` (see [`Outbox::render`]) selects.
    pub async fn scalar<T>(&self, sql: &str) -> T
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
    {
        sqlx::query_scalar(sqlx::AssertSqlSafe(self.render(sql)))
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// The values of the one column `sql` (see [`Outbox::render`]) selects, row by row.
    pub async fn column<T>(&self, sql: &str) -> Vec<T>
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
    {
        sqlx::query_scalar(sqlx::AssertSqlSafe(self.render(sql)))
            .fetch_all(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Runs SQL (see [`Outbox::render`]).
    pub async fn exec(&self, sql: &str) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(self.render(sql)))
            .execute(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

/// The columns the relay owns in the outbox table (through migration 0007), for tests that
/// create their table as an application would: append after the application's columns.
pub const RELAY_COLUMNS_SQL: &str = "published_at timestamptz,
    attempts integer not null default 0, next_attempt_at timestamptz,
    last_error text, dead_lettered_at timestamptz,
    unsettled_attempts integer not null default 0,
    deferrals integer not null default 0";

/// The lease table (migration 0005) as the README gives it to teams that run their own
/// migrations; `{leases}` as in [`Outbox::exec`].
pub const LEASE_TABLE_SQL: &str = "create table {leases} (
    id bigint generated always as identity primary key,
    claimed_at timestamptz not null, until timestamptz not null,
    ids bigint[] not null, aggregates text[] not null);";

/// A finished command.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(self) -> Self {
        assert!(self.status.success(), "command failed: {self:?}");
        self
    }

    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_outbox-relay")
}

pub fn run_binary(config: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(binary());
    command
        .arg("-c")
        .arg(config)
        .args(args)
        .env_remove("RUST_LOG");
    for (key, value) in env {
        command.env(key, value);
    }
    let out = command.output().expect("run outbox-relay");
    Output {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `outbox-relay run` as a child process; killed on drop.
pub struct RelayProcess {
    child: Child,
    log: PathBuf,
}

impl RelayProcess {
    pub fn start(config: PathBuf, log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(binary())
            .arg("-c")
            .arg(&config)
            .arg("run")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start outbox-relay");
        Self { child, log }
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), signal).expect("send signal");
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for a log line containing `needle`; on timeout, panics with the log's last lines.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.logs().contains(needle) {
            if Instant::now() >= deadline {
                let logs = self.logs();
                let lines: Vec<&str> = logs.lines().collect();
                let tail = lines[lines.len().saturating_sub(30)..].join("\n");
                panic!(
                    "timed out after {timeout:?} waiting for a relay log line containing {needle:?}; its last lines:\n{tail}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "relay did not exit within {timeout:?}; logs:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One consumed message, from either broker.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub partition: i32,
    pub key: String,
    /// The value as JSON (`Null` when it is not JSON, or absent).
    pub payload: serde_json::Value,
    /// The value's bytes; `None` for a Kafka tombstone.
    pub value: Option<Vec<u8>>,
    /// Kafka: the message timestamp; AMQP: the `timestamp` property (whole seconds), in ms.
    pub timestamp: Option<i64>,
    pub headers: BTreeMap<String, String>,
    /// AMQP message properties (`message_id`, `type`, `content_type`, `delivery_mode`,
    /// `timestamp`); empty for Kafka.
    pub properties: BTreeMap<&'static str, String>,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }

    /// The event id: header `event_id`, or `id` (the Debezium layout's only header).
    pub fn event_id(&self) -> &str {
        self.headers
            .get("event_id")
            .or_else(|| self.headers.get("id"))
            .map_or("", String::as_str)
    }

    pub fn seq(&self) -> i64 {
        self.payload["seq"].as_i64().expect("payload has seq")
    }
}

/// What a test reads the relay's output with.
pub enum Reader {
    Kafka(kafka::TopicReader),
    RabbitMq(Box<rabbit::QueueReader>),
}

impl Reader {
    /// Everything received so far.
    pub fn received(&self) -> &[Received] {
        match self {
            Self::Kafka(r) => &r.received,
            Self::RabbitMq(r) => &r.received,
        }
    }

    /// Reads until at least `count` messages arrived in total; panics after `timeout`.
    pub async fn read_at_least(&mut self, count: usize, timeout: Duration) -> Vec<Received> {
        match self {
            Self::Kafka(r) => {
                tokio::task::block_in_place(|| r.read_at_least(count, timeout).to_vec())
            }
            Self::RabbitMq(r) => r.read_at_least(count, timeout).await.to_vec(),
        }
    }

    /// Reads until `count` distinct events (by `event_id`) arrived; duplicates do not count.
    pub async fn read_distinct(&mut self, count: usize, timeout: Duration) -> Vec<Received> {
        match self {
            Self::Kafka(r) => {
                tokio::task::block_in_place(|| r.read_distinct(count, timeout).to_vec())
            }
            Self::RabbitMq(r) => r.read_distinct(count, timeout).await.to_vec(),
        }
    }

    /// Keeps reading for `period` (to show nothing more arrives); returns everything received.
    pub async fn read_for(&mut self, period: Duration) -> Vec<Received> {
        match self {
            Self::Kafka(r) => tokio::task::block_in_place(|| r.read_for(period).to_vec()),
            Self::RabbitMq(r) => r.read_for(period).await.to_vec(),
        }
    }
}

/// A loopback address with a port nobody listens on (the OS picked it and it was released).
/// Waits until something accepts TCP connections on `127.0.0.1:port`.
pub async fn wait_listening(port: u16, what: &str) {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    wait_until(WAIT, &format!("{what} listening on {addr}"), || async {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await;
}

pub fn free_address() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address")
}

/// `GET path` over HTTP/1.1 (no client library needed); returns the status code and body, or
/// `None` when nothing answers.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Some((status, body))
}

/// Asks the relay listening on `addr` for `name`: the sum of its samples whose labels contain
/// every `label=value` given; `None` while it does not answer or has no such sample.
pub async fn metric(
    addr: std::net::SocketAddr,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    let (200, body) = http_get(addr, "/metrics").await? else {
        return None;
    };
    let samples: Vec<f64> = samples(&body, name, labels).collect();
    (!samples.is_empty()).then(|| samples.iter().sum())
}

/// The value of the first sample of `metric` whose labels contain every `label=value` given.
pub fn metric_value(exposition: &str, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples(exposition, metric, labels).next()
}

/// The values of `metric`'s samples whose labels contain every `label=value` given.
fn samples<'a>(
    exposition: &'a str,
    metric: &'a str,
    labels: &'a [(&'a str, &'a str)],
) -> impl Iterator<Item = f64> + 'a {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(move |l| l.starts_with(metric) && l[metric.len()..].starts_with(['{', ' ']))
        .filter(move |l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Reads Kafka messages back with the CloudEvents Python SDK's Kafka binding
/// (`cloudevents.kafka.from_binary`, installed by `scripts/services.sh` into `.tools/python`):
/// one object per message with the event's attributes and `data`.
pub fn cloudevents_from_kafka(messages: &[Received]) -> Vec<serde_json::Value> {
    use std::io::Write;
    const SCRIPT: &str = r#"
import json, sys
from cloudevents.kafka import from_binary, KafkaMessage
out = []
for m in json.load(sys.stdin):
    headers = {k: v.encode() for k, v in m["headers"].items()}
    event = from_binary(KafkaMessage(headers=headers, key=m["key"].encode(), value=m["value"].encode()))
    attributes = {k: (v.decode() if isinstance(v, bytes) else str(v)) for k, v in event.get_attributes().items()}
    attributes["data"] = event.get_data()
    out.append(attributes)
json.dump(out, sys.stdout)
"#;
    let input: Vec<serde_json::Value> = messages
        .iter()
        .map(|m| {
            serde_json::json!({
                "headers": m.headers,
                "key": m.key,
                "value": String::from_utf8(m.value.clone().unwrap_or_default()).expect("UTF-8 value"),
            })
        })
        .collect();
    let tools = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/python");
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .env("PYTHONPATH", &tools)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (scripts/services.sh installs the CloudEvents SDK)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(serde_json::to_string(&input).expect("JSON").as_bytes())
        .expect("write to python");
    let out = child.wait_with_output().expect("python ran");
    assert!(
        out.status.success(),
        "the CloudEvents SDK refused the messages: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the SDK's answer")
}
