//! Test support: a per-test outbox table, the relay binary as a child process, a Kafka consumer,
//! and waits on conditions (never fixed sleeps).
//!
//! Service addresses come from the environment with loopback defaults:
//! `TEST_DATABASE_URL` (a server URL; each test gets its own table in database
//! `outbox_relay_test`), `TEST_KAFKA_BROKERS`.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio::sync::OnceCell;

pub const TEST_DATABASE: &str = "outbox_relay_test";

pub fn server_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

pub fn database_url() -> String {
    format!("{}/{TEST_DATABASE}", server_url())
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

/// One test's outbox table and the configuration of the relay that serves it.
pub struct Outbox {
    pub pool: PgPool,
    pub table: String,
    /// Topic prefix; the relay publishes to `{prefix}.{aggregate_type}`.
    pub topic_prefix: String,
    /// Keys per config section, as TOML values, written into the generated config.
    pub relay: BTreeMap<&'static str, String>,
    pub retry: BTreeMap<&'static str, String>,
    pub kafka: BTreeMap<&'static str, String>,
    pub kafka_properties: BTreeMap<&'static str, String>,
    pub dir: tempfile::TempDir,
}

impl Outbox {
    /// A fresh outbox table, created by `outbox-relay migrate`.
    pub async fn new() -> Self {
        let outbox = Self::unmigrated().await;
        outbox.migrate().success();
        outbox
    }

    /// A fresh table name with no table behind it yet.
    pub async fn unmigrated() -> Self {
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
        Self {
            pool: pool().await,
            topic_prefix: table.replace('_', "-"),
            table,
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
        let text = [
            format!(
                "[database]\nurl = \"{}\"\ntable = \"{}\"\n",
                database_url(),
                self.table
            ),
            section("relay", &self.relay),
            section("retry", &self.retry),
            "[sink]\nkind = \"kafka\"\n".to_owned(),
            section("sink.kafka", &kafka),
            section("sink.kafka.properties", &self.kafka_properties),
            "[log]\nformat = \"text\"\nlevel = \"info,outbox_relay=debug\"\n".to_owned(),
        ]
        .join("\n");
        let path = self.dir.path().join("relay.toml");
        std::fs::write(&path, text).expect("write config");
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

    pub async fn wait_all_published(&self, timeout: Duration) {
        wait_until(timeout, "every outbox row published", || async {
            let (published, total) = self.counts().await;
            published == total
        })
        .await;
    }

    /// Runs SQL with `{table}` replaced by this test's table.
    pub async fn exec(&self, sql: &str) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.replace("{table}", &self.table)))
            .execute(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

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

    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) {
        wait_until(
            timeout,
            &format!("relay log line containing {needle:?}"),
            || async { self.logs().contains(needle) },
        )
        .await;
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

/// One consumed Kafka message.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub partition: i32,
    pub key: String,
    pub payload: serde_json::Value,
    pub headers: BTreeMap<String, String>,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }

    pub fn seq(&self) -> i64 {
        self.payload["seq"].as_i64().expect("payload has seq")
    }
}

/// Creates `topic` with `partitions` partitions (before the relay would auto-create it).
pub async fn create_topic(topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .create()
        .expect("admin client");
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create topic");
    for result in results {
        result.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
    }
}

/// Reads every partition of a topic from the beginning.
pub struct TopicReader {
    consumer: BaseConsumer,
    pub received: Vec<Received>,
}

impl TopicReader {
    /// Creates the topic with `partitions` partitions and subscribes to all of them.
    pub async fn create(topic: &str, partitions: i32) -> Self {
        create_topic(topic, partitions).await;
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || Self::new(&topic))
            .await
            .expect("reader")
    }

    fn new(topic: &str) -> Self {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", kafka_brokers())
            .set("group.id", unique("test"))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("topic metadata");
        let partitions = metadata.topics()[0].partitions().len() as i32;
        assert!(partitions > 0, "topic {topic} has no partitions");
        let mut assignment = TopicPartitionList::new();
        for p in 0..partitions {
            assignment
                .add_partition_offset(topic, p, Offset::Beginning)
                .expect("assign");
        }
        consumer.assign(&assignment).expect("assign");
        Self {
            consumer,
            received: Vec::new(),
        }
    }

    /// Polls until at least `count` messages were received in total, or panics after `timeout`.
    pub fn read_at_least(&mut self, count: usize, timeout: Duration) -> &[Received] {
        let deadline = Instant::now() + timeout;
        while self.received.len() < count && Instant::now() < deadline {
            self.poll_once(Duration::from_millis(100));
        }
        assert!(
            self.received.len() >= count,
            "received {} of {count} messages within {timeout:?}",
            self.received.len()
        );
        &self.received
    }

    /// Keeps polling for `period` (to show that nothing more arrives).
    pub fn read_for(&mut self, period: Duration) -> &[Received] {
        let deadline = Instant::now() + period;
        while Instant::now() < deadline {
            self.poll_once(Duration::from_millis(100));
        }
        &self.received
    }

    fn poll_once(&mut self, timeout: Duration) {
        let Some(message) = self.consumer.poll(timeout) else {
            return;
        };
        let message = message.expect("consume");
        let mut headers = BTreeMap::new();
        if let Some(h) = message.headers() {
            for header in h.iter() {
                headers.insert(
                    header.key.to_owned(),
                    String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                );
            }
        }
        self.received.push(Received {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            key: String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned(),
            payload: serde_json::from_slice(message.payload().unwrap_or_default())
                .expect("JSON payload"),
            headers,
        });
    }
}
