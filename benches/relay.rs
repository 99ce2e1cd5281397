//! Relay benchmark: drain throughput per sink against measured floors, commit-to-ack latency,
//! resources, and scale-out. Run with `scripts/bench.sh` (it starts the services first).
//!
//! Every figure is measured in this run, on this machine, with PostgreSQL, the broker and the
//! relay (the release binary, as a child process) sharing its cores. Options:
//! `--rows N` (default 200000), `--aggregates N` (5000), `--payload BYTES` (1000),
//! `--batch N` (2000, the relay default), `--only floors,drain,scale,notify,latency,inbox`
//! (default: all),
//! `--sinks discard,kafka,rabbitmq` (the drain's sinks; default: all).
//!
//! `OUTBOX_RELAY_BENCH_BIN=path` measures another build of the relay instead of this one, so
//! two builds can be compared in alternating runs on the same machine state.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::future::join_all;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Row};

const SERVER: &str = "postgres://postgres@127.0.0.1:5432";
const DATABASE: &str = "outbox_relay_bench";
const BROKERS: &str = "127.0.0.1:9092";
const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

#[derive(Debug, Clone)]
struct Args {
    rows: i64,
    aggregates: i64,
    payload: usize,
    batch: u32,
    /// Published rows kept in the table for the `retained` part.
    retained: i64,
    only: Vec<String>,
    /// Sinks the drain runs (default: all three).
    sinks: Vec<String>,
}

impl Args {
    /// A workload of rows the measurement inserts itself (none in the table beforehand).
    fn inserts_only(aggregates: i64, payload: usize, batch: u32) -> Self {
        Self {
            rows: 0,
            aggregates,
            payload,
            batch,
            retained: 0,
            only: vec![],
            sinks: vec![],
        }
    }

    fn parse() -> Self {
        let mut args = Self {
            rows: 200_000,
            aggregates: 5_000,
            payload: 1_000,
            batch: 2_000,
            retained: 10_000_000,
            only: vec![],
            sinks: vec![],
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
            match flag.as_str() {
                "--rows" => args.rows = value().parse().expect("--rows N"),
                "--aggregates" => args.aggregates = value().parse().expect("--aggregates N"),
                "--payload" => args.payload = value().parse().expect("--payload BYTES"),
                "--batch" => args.batch = value().parse().expect("--batch N"),
                "--retained" => args.retained = value().parse().expect("--retained N"),
                "--only" => args.only = value().split(',').map(str::to_owned).collect(),
                "--sinks" => args.sinks = value().split(',').map(str::to_owned).collect(),
                "--bench" => {}
                other => panic!("unknown option {other}"),
            }
        }
        args
    }

    fn wants(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == part)
    }
}

fn main() {
    // `cargo test --all-targets` also runs this binary (without `--bench`): do nothing then,
    // so the test command stays fast; `cargo bench` passes `--bench`.
    if !std::env::args().any(|a| a == "--bench") {
        println!("relay benchmark: run it with `scripts/bench.sh` (cargo bench --bench relay)");
        return;
    }
    let args = Args::parse();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(run(args));
}

async fn run(args: Args) {
    let pool = database().await;
    print_facts(&pool, &args).await;
    let mut floors = Floors::default();
    if args.wants("floors") || args.wants("drain") {
        println!("\n## Floors (same rows, same settings, no relay)\n");
        println!("| floor | what | rows | seconds | per second |");
        println!("|---|---|---:|---:|---:|");
        floors.database = floor_database(&pool, &args).await;
        floors.kafka = floor_kafka(&args).await;
        floors.rabbitmq = floor_rabbitmq(&args).await;
    }
    if args.wants("drain") {
        println!("\n## Drain: {} rows already in the table\n", args.rows);
        println!(
            "| sink | events/s | ratio to min(db floor, broker floor) | peak RSS MiB | CPU s per 100k events |"
        );
        println!("|---|---:|---:|---:|---:|");
        let mut rates: Vec<(&str, f64)> = Vec::new();
        for (sink, broker_floor) in [
            ("discard", None),
            ("kafka", Some(floors.kafka)),
            ("rabbitmq", Some(floors.rabbitmq)),
        ] {
            if !args.sinks.is_empty() && !args.sinks.iter().any(|s| s == sink) {
                continue;
            }
            let drained = drain(&pool, &args, sink, 1).await;
            let floor = broker_floor.map_or(floors.database, |b: f64| b.min(floors.database));
            println!(
                "| {sink} | {:.0} | {:.2} (floor {:.0}/s) | {:.1} | {:.2} |",
                drained.rate,
                drained.rate / floor,
                floor,
                drained.peak_rss_mib,
                drained.cpu_seconds / args.rows as f64 * 100_000.0
            );
            rates.push((sink, drained.rate));
        }
        // The machine's pace drifts (BENCHMARKS.md): the floors again, after the drains, and
        // the ratios to the mean of both measurements, which bracket the drains in time.
        if !rates.is_empty() {
            println!(
                "
## Floors again, after the drains
"
            );
            println!("| floor | what | rows | seconds | per second |");
            println!("|---|---|---:|---:|---:|");
            let drained = |sink: &str| rates.iter().any(|(s, _)| *s == sink);
            let database = (floors.database + floor_database(&pool, &args).await) / 2.0;
            let kafka = if drained("kafka") {
                (floors.kafka + floor_kafka(&args).await) / 2.0
            } else {
                floors.kafka
            };
            let rabbitmq = if drained("rabbitmq") {
                (floors.rabbitmq + floor_rabbitmq(&args).await) / 2.0
            } else {
                floors.rabbitmq
            };
            println!(
                "
## Drain ratios to the mean of the floors before and after
"
            );
            println!("| sink | events/s | ratio to min(db floor, broker floor) |");
            println!("|---|---:|---:|");
            for (sink, rate) in &rates {
                let floor = match *sink {
                    "kafka" => kafka.min(database),
                    "rabbitmq" => rabbitmq.min(database),
                    _ => database,
                };
                println!(
                    "| {sink} | {rate:.0} | {:.2} (floor {floor:.0}/s) |",
                    rate / floor
                );
            }
        }
    }
    if args.wants("scale") {
        println!("\n## Scale-out: Kafka sink, instances on one table\n");
        println!("| instances | events/s | peak RSS MiB (largest) |");
        println!("|---:|---:|---:|");
        for instances in [1, 2, 4] {
            let drained = drain(&pool, &args, "kafka", instances).await;
            println!(
                "| {instances} | {:.0} | {:.1} |",
                drained.rate, drained.peak_rss_mib
            );
        }
    }
    if args.wants("retained") {
        retained(&pool, &args).await;
    }
    if args.wants("notify") {
        println!(
            "\n## What the relay costs the application: insert rate, 8 writers, single-row commits, 10 s\n"
        );
        println!("| relay | trigger | commits/s | of the rate without a relay |");
        println!("|---|---|---:|---:|");
        let alone = notify_cost(&pool, Wakeup::NoRelay, None).await;
        for wakeup in [Wakeup::Polling, Wakeup::Listen] {
            notify_cost(&pool, wakeup, Some(alone)).await;
        }
        println!("\n## An idle relay's cost (empty table, 10 s, default poll_interval 1 s)\n");
        println!("| wake-up | outbox table scans/s | relay CPU ms/s |");
        println!("|---|---:|---:|");
        for wakeup in [Wakeup::Polling, Wakeup::Listen] {
            idle_cost(&pool, wakeup).await;
        }
    }
    if args.wants("inbox") {
        inbox(&pool, &args).await;
    }
    if args.wants("latency") {
        println!("\n## Latency: commit → broker ack (Kafka sink), steady insert rate, 10 s\n");
        println!(
            "| rate/s | reached/s | wake-up | events | p50 ms | p99 ms | max ms | p99 after the first second | max after it |"
        );
        println!("|---:|---:|---|---:|---:|---:|---:|---:|---:|");
        for rate in [1_000u32, 5_000] {
            for listen in [true, false] {
                latency(&pool, rate, listen).await;
            }
        }
    }
}

#[derive(Debug, Default)]
struct Floors {
    database: f64,
    kafka: f64,
    rabbitmq: f64,
}

async fn database() -> PgPool {
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!("{SERVER}/postgres"))
        .await
        .expect("PostgreSQL on 127.0.0.1:5432 (scripts/services.sh starts it)");
    let exists: bool =
        sqlx::query_scalar("select exists (select 1 from pg_database where datname = $1)")
            .bind(DATABASE)
            .fetch_one(&admin)
            .await
            .unwrap();
    if !exists {
        sqlx::query(AssertSqlSafe(format!("create database {DATABASE}")))
            .execute(&admin)
            .await
            .unwrap();
    }
    PgPoolOptions::new()
        .max_connections(8)
        .connect(&format!("{SERVER}/{DATABASE}"))
        .await
        .unwrap()
}

async fn print_facts(pool: &PgPool, args: &Args) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_owned();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .nth(1)
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024 / 1024);
    let pg: String = sqlx::query_scalar("select version()")
        .fetch_one(pool)
        .await
        .unwrap();
    println!("# outbox-relay benchmark\n");
    println!(
        "- machine: {} cores ({cpu}), {mem} GiB",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("- database: {}", pg.split(" on ").next().unwrap_or(&pg));
    println!(
        "- kafka: tansu at {BROKERS} (memory storage); rabbitmq at 127.0.0.1:5672, durable lazy queue"
    );
    println!(
        "- workload: {} rows, {} aggregates, {} B JSON payloads, relay batch_size {}",
        args.rows, args.aggregates, args.payload, args.batch
    );
    println!(
        "- relay: release build, acks=all + idempotence (Kafka), persistent + mandatory + confirms (RabbitMQ)"
    );
}

/// A fresh outbox table filled with `rows` events.
/// A new, migrated table of `rows` rows; `trigger` says whether `migrate` installs the NOTIFY
/// trigger (`database.notify_trigger`).
async fn fresh_table(pool: &PgPool, args: &Args, name: &str, rows: i64, trigger: bool) -> String {
    sqlx::query(AssertSqlSafe(format!("drop table if exists {name}")))
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("delete from outbox_relay_migrations where table_name = $1")
        .bind(name)
        .execute(pool)
        .await
        .ok();
    let config = config_file(name, "discard", args.batch, trigger, Duration::from_secs(1));
    let out = Command::new(relay_binary())
        .args(["-c", config.to_str().unwrap(), "migrate"])
        .output()
        .unwrap();
    assert!(out.status.success(), "migrate: {out:?}");
    if rows > 0 {
        sqlx::query(AssertSqlSafe(format!(
            "insert into {name} (aggregate_type, aggregate_id, event_type, payload)
             select 'bench', (i % $2)::text, 'happened',
                    jsonb_build_object('seq', i, 'data', repeat('x', $3))
             from generate_series(1, $1) i"
        )))
        .bind(rows)
        .bind(args.aggregates)
        .bind((args.payload as i32 - 30).max(0))
        .execute(pool)
        .await
        .unwrap();
        sqlx::query(AssertSqlSafe(format!("vacuum analyze {name}")))
            .execute(pool)
            .await
            .unwrap();
        // Every measurement starts with the fill's dirty pages written: a checkpoint due
        // to the fill would otherwise land on whichever run comes next.
        sqlx::query("checkpoint").execute(pool).await.unwrap();
    }
    name.to_owned()
}

fn config_file(
    table: &str,
    sink: &str,
    batch: u32,
    listen: bool,
    poll: Duration,
) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join("outbox-relay-bench");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{table}-{sink}-{listen}.toml"));
    let text = format!(
        r#"[database]
url = "{SERVER}/{DATABASE}"
table = "{table}"
notify_trigger = {listen}
[relay]
batch_size = {batch}
listen = {listen}
poll_interval = "{}ms"
[sink]
kind = "{sink}"
[sink.kafka]
brokers = "{BROKERS}"
topic = "bench.{{aggregate_type}}"
[sink.rabbitmq]
url = "{AMQP}"
exchange = "bench"
[log]
format = "text"
level = "warn"
"#,
        poll.as_millis()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// (a) The database work alone: read a batch of due rows in id order and mark it, in a loop,
/// with the relay's session settings, and nothing else (no lease, no ordering checks).
async fn floor_database(pool: &PgPool, args: &Args) -> f64 {
    let table = fresh_table(pool, args, "bench_floor", args.rows, true).await;
    let relay_pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!(
            "{SERVER}/{DATABASE}?options=-c%20synchronous_commit%3Doff"
        ))
        .await
        .unwrap();
    let claim = format!(
        "select id, event_id, aggregate_type, aggregate_id, event_type, payload::text, headers::text, created_at
         from {table} where published_at is null and dead_lettered_at is null
           and (next_attempt_at is null or next_attempt_at <= now())
         order by id limit $1"
    );
    let mark = format!(
        "update {table} o set published_at = now(), next_attempt_at = null, attempts = o.attempts + 1
         from unnest($1::bigint[]) as b(id) where o.id = b.id and o.published_at is null"
    );
    let started = Instant::now();
    let mut done = 0;
    loop {
        let rows = sqlx::query(AssertSqlSafe(claim.clone()))
            .bind(i64::from(args.batch))
            .fetch_all(&relay_pool)
            .await
            .unwrap();
        if rows.is_empty() {
            break;
        }
        let ids: Vec<i64> = rows.iter().map(|r| r.get::<i64, _>(0)).collect();
        sqlx::query(AssertSqlSafe(mark.clone()))
            .bind(&ids)
            .execute(&relay_pool)
            .await
            .unwrap();
        done += ids.len();
    }
    let seconds = started.elapsed().as_secs_f64();
    let rate = done as f64 / seconds;
    println!(
        "| (a) database | read + mark SQL, batch {} | {done} | {seconds:.2} | {rate:.0} |",
        args.batch
    );
    rate
}

/// (b) Kafka alone: the same messages through an idempotent acks=all producer, a batch enqueued
/// at a time and its delivery reports awaited together.
async fn floor_kafka(args: &Args) -> f64 {
    let started = Instant::now();
    let sent = produce_bench("bench.floor", args).await;
    let seconds = started.elapsed().as_secs_f64();
    let rate = sent as f64 / seconds;
    println!(
        "| (b) kafka | rdkafka produce, acks=all, idempotent, the relay's key and headers | {sent} | {seconds:.2} | {rate:.0} |"
    );
    rate
}

async fn rabbit_queue() -> (Connection, lapin::Channel) {
    let connection = Connection::connect(AMQP, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .exchange_declare(
            "bench".into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-mode".into(), AMQPValue::LongString("lazy".into()));
    channel
        .queue_declare(
            "bench".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            "bench".into(),
            "bench".into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_purge("bench".into(), QueuePurgeOptions::default())
        .await
        .unwrap();
    (connection, channel)
}

/// The headers the relay puts on every message (`publisher::headers`): the event's identity.
fn event_headers(aggregate_id: &str) -> [(&'static str, String); 4] {
    [
        ("event_id", uuid::Uuid::new_v4().to_string()),
        ("event_type", "happened".to_owned()),
        ("aggregate_type", "bench".to_owned()),
        ("aggregate_id", aggregate_id.to_owned()),
    ]
}

/// The AMQP properties the relay sets (`publisher::rabbitmq::properties`).
fn amqp_properties(aggregate_id: &str) -> BasicProperties {
    let headers = event_headers(aggregate_id);
    let message_id = headers[0].1.clone();
    let mut table = FieldTable::default();
    for (name, value) in headers {
        table.insert(name.into(), AMQPValue::LongString(value.into()));
    }
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(message_id.into())
        .with_type("happened".into())
        .with_timestamp(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        )
        .with_headers(table)
}

/// (b) RabbitMQ alone: the same messages (the relay's properties and headers), persistent and
/// mandatory, on a confirm channel with a window of one batch; like the relay, a batch's
/// publishes are queued on the connection before their writes and confirms are awaited.
async fn floor_rabbitmq(args: &Args) -> f64 {
    let (_connection, channel) = rabbit_queue().await;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let payload = bench_payload(args);
    let started = Instant::now();
    let mut sent = 0i64;
    while sent < args.rows {
        let n = (args.rows - sent).min(i64::from(args.batch));
        let mut writes = Vec::with_capacity(n as usize);
        for i in 0..n {
            let key = ((sent + i) % args.aggregates).to_string();
            let mut write = Box::pin(futures::future::maybe_done(channel.basic_publish(
                "bench".into(),
                "bench.happened".into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                payload.as_bytes(),
                amqp_properties(&key),
            )));
            // Queue the frames now, in order; await the write below.
            let _ = futures::poll!(write.as_mut());
            writes.push(write);
        }
        let mut confirms = Vec::with_capacity(n as usize);
        for mut write in writes {
            write.as_mut().await;
            confirms.push(write.as_mut().take_output().unwrap().unwrap());
        }
        for confirm in confirms {
            assert!(confirm.await.unwrap().is_ack());
        }
        sent += n;
    }
    let seconds = started.elapsed().as_secs_f64();
    let rate = sent as f64 / seconds;
    println!(
        "| (b) rabbitmq | lapin publish, persistent + mandatory, the relay's properties, confirm window {} | {sent} | {seconds:.2} | {rate:.0} |",
        args.batch
    );
    channel
        .queue_purge("bench".into(), QueuePurgeOptions::default())
        .await
        .unwrap();
    rate
}

struct Drained {
    rate: f64,
    peak_rss_mib: f64,
    cpu_seconds: f64,
}

/// The relay binary measured: this build's, or `OUTBOX_RELAY_BENCH_BIN`.
fn relay_binary() -> std::ffi::OsString {
    std::env::var_os("OUTBOX_RELAY_BENCH_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_outbox-relay").into())
}

fn spawn_relay(config: &std::path::Path) -> Child {
    Command::new(relay_binary())
        .args(["-c", config.to_str().unwrap(), "run"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Stops a relay with SIGTERM (a clean shutdown) and waits for it to exit.
fn stop_relay(relay: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &relay.id().to_string()])
        .status();
    let _ = relay.wait();
}

/// Peak RSS (MiB) and CPU seconds of a running process, from /proc.
fn resources(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm_kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields
        .get(11)
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
    (hwm_kb / 1024.0, ticks / 100.0)
}

/// Tracks whether rows are still pending, without loading the database it measures: each poll
/// asks for the lowest pending id at or above the last answer. Rows below it are published (or
/// dead) for good, and their entries, which stay in the pending index until vacuum, are not
/// read again; `exists (select 1 ... where published_at is null)` walked them all and cost
/// ~11 ms a poll during a 200 000-row drain (PostgreSQL's statement log): a tenth of a core at
/// ten polls a second, taken from the drain it timed.
struct Frontier {
    table: String,
    lowest: i64,
}

impl Frontier {
    fn new(table: &str) -> Self {
        Self {
            table: table.to_owned(),
            lowest: 0,
        }
    }

    /// Whether any row is still pending.
    async fn pending(&mut self, pool: &PgPool) -> bool {
        let lowest: Option<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
            "select min(id) from {} where published_at is null and dead_lettered_at is null
                 and id >= $1",
            self.table
        )))
        .bind(self.lowest)
        .fetch_one(pool)
        .await
        .unwrap();
        match lowest {
            Some(id) => {
                self.lowest = id;
                true
            }
            None => false,
        }
    }
}

async fn drain(pool: &PgPool, args: &Args, sink: &str, instances: usize) -> Drained {
    let table = fresh_table(
        pool,
        args,
        &format!("bench_{sink}_{instances}"),
        args.rows,
        true,
    )
    .await;
    drain_table(pool, args, &table, sink, instances).await
}

/// Runs `instances` relays on `table` (its `args.rows` pending rows already inserted) until
/// nothing is pending.
async fn drain_table(
    pool: &PgPool,
    args: &Args,
    table: &str,
    sink: &str,
    instances: usize,
) -> Drained {
    let table = table.to_owned();
    if sink == "rabbitmq" {
        let _ = rabbit_queue().await;
    }
    let config = config_file(&table, sink, args.batch, true, Duration::from_secs(1));
    let started = Instant::now();
    let mut relays: Vec<Child> = (0..instances).map(|_| spawn_relay(&config)).collect();
    let mut peak = 0.0f64;
    let mut frontier = Frontier::new(&table);
    loop {
        for relay in &relays {
            peak = peak.max(resources(relay.id()).0);
        }
        if !frontier.pending(pool).await {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "drain took over 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut cpu = 0.0;
    for relay in &relays {
        let (rss, seconds) = resources(relay.id());
        peak = peak.max(rss);
        cpu += seconds;
    }
    for relay in &mut relays {
        stop_relay(relay);
    }
    if sink == "rabbitmq" {
        let (_c, channel) = rabbit_queue().await;
        drop(channel);
    }
    Drained {
        rate: args.rows as f64 / seconds,
        peak_rss_mib: peak,
        cpu_seconds: cpu,
    }
}

/// The relay as the table grows: the discard drain of `args.rows` pending rows in an empty
/// table, and behind `args.retained` published rows kept (no retention).
async fn retained(pool: &PgPool, args: &Args) {
    println!(
        "\n## Table growth: discard drain of {} pending rows, with published rows retained\n",
        args.rows
    );
    println!("| published rows retained | events/s | ratio to the empty table |");
    println!("|---:|---:|---:|");
    let empty = drain(pool, args, "discard", 1).await.rate;
    println!("| 0 | {empty:.0} | 1.00 |");
    let table = fresh_table(pool, args, "bench_retained", 0, true).await;
    let started = Instant::now();
    sqlx::query(AssertSqlSafe(format!(
        "insert into {table} (aggregate_type, aggregate_id, event_type, payload, published_at)
         select 'bench', (i % $2)::text, 'happened', jsonb_build_object('seq', i), now()
         from generate_series(1, $1) i"
    )))
    .bind(args.retained)
    .bind(args.aggregates)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "insert into {table} (aggregate_type, aggregate_id, event_type, payload)
         select 'bench', (i % $2)::text, 'happened', jsonb_build_object('seq', i, 'data', repeat('x', $3))
         from generate_series(1, $1) i"
    )))
    .bind(args.rows)
    .bind(args.aggregates)
    .bind((args.payload as i32 - 30).max(0))
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(AssertSqlSafe(format!("vacuum analyze {table}")))
        .execute(pool)
        .await
        .unwrap();
    eprintln!(
        "retained: {} rows written in {:.0} s",
        args.retained + args.rows,
        started.elapsed().as_secs_f64()
    );
    let big = drain_table(pool, args, &table, "discard", 1).await.rate;
    println!("| {} | {big:.0} | {:.2} |", args.retained, big / empty);
    sqlx::query(AssertSqlSafe(format!("drop table {table}")))
        .execute(pool)
        .await
        .unwrap();
}

/// How the relay learns of new rows in the cost measurements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wakeup {
    /// No relay runs at all: the application's rate on its own.
    NoRelay,
    /// The default: no NOTIFY trigger, adaptive polling (`poll_interval` 1 s when idle).
    Polling,
    /// The NOTIFY trigger and LISTEN, with the same polling as fallback.
    Listen,
}

impl Wakeup {
    fn label(self) -> &'static str {
        match self {
            Self::NoRelay => "none",
            Self::Polling => "adaptive polling (poll_interval 1 s)",
            Self::Listen => "LISTEN/NOTIFY + adaptive polling",
        }
    }
}

/// The application's own insert rate (8 writers, single-row commits) with no relay, with the
/// relay polling, and with it listening to the NOTIFY trigger; `alone` is the first's rate.
async fn notify_cost(pool: &PgPool, wakeup: Wakeup, alone: Option<f64>) -> f64 {
    let trigger = wakeup == Wakeup::Listen;
    let args = Args::inserts_only(500, 200, 1000);
    let name = format!("bench_notify_{}", format!("{wakeup:?}").to_lowercase());
    let table = fresh_table(pool, &args, &name, 0, trigger).await;
    let config = config_file(&table, "kafka", 1000, trigger, Duration::from_secs(1));
    let mut relay = (wakeup != Wakeup::NoRelay).then(|| spawn_relay(&config));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let duration = Duration::from_secs(10);
    let tasks: Vec<_> = (0..8)
        .map(|w| {
            let pool = pool.clone();
            let table = table.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let mut n = 0u64;
                while started.elapsed() < duration {
                    sqlx::query(AssertSqlSafe(format!(
                        "insert into {table} (aggregate_type, aggregate_id, event_type, payload)
                         values ('bench', $1, 'happened', '{{\"n\": 1}}')"
                    )))
                    .bind(format!("{w}-{}", n % 50))
                    .execute(&pool)
                    .await
                    .unwrap();
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    if let Some(relay) = &mut relay {
        stop_relay(relay);
    }
    let rate = total as f64 / duration.as_secs_f64();
    println!(
        "| {} | {} | {rate:.0} | {} |",
        wakeup.label(),
        if trigger { "installed" } else { "none" },
        alone.map_or("1.00".to_owned(), |alone| format!("{:.2}", rate / alone))
    );
    rate
}

/// An idle relay's load: the scans of its outbox table per second (claims, backlog queries;
/// from `pg_stat_user_tables`) and its own CPU.
async fn idle_cost(pool: &PgPool, wakeup: Wakeup) {
    let args = Args::inserts_only(1, 10, 1000);
    let trigger = wakeup == Wakeup::Listen;
    let name = format!("bench_idle_{}", format!("{wakeup:?}").to_lowercase());
    let table = fresh_table(pool, &args, &name, 0, trigger).await;
    let config = config_file(&table, "kafka", 1000, trigger, Duration::from_secs(1));
    let mut relay = spawn_relay(&config);
    // past the start and the first claims' quick polls
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Index and sequential scans of the (empty) outbox table: the claims' work, nobody
    // else's (the cumulative statistics lag by up to a second; 10 s dwarf that).
    let scans = || async {
        let _ = sqlx::query("select pg_stat_clear_snapshot()")
            .execute(pool)
            .await;
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "select (coalesce(seq_scan, 0) + coalesce(idx_scan, 0))::bigint
             from pg_stat_user_tables where relid = '{table}'::regclass"
        )))
        .fetch_one(pool)
        .await
        .unwrap();
        n
    };
    let before = (scans().await, resources(relay.id()).1);
    let period = Duration::from_secs(10);
    tokio::time::sleep(period).await;
    let after = (scans().await, resources(relay.id()).1);
    stop_relay(&mut relay);
    let per_second = (after.0 - before.0) as f64 / period.as_secs_f64();
    println!(
        "| {} | {per_second:.1} | {:.1} |",
        wakeup.label(),
        (after.1 - before.1) * 1000.0 / period.as_secs_f64()
    );
}

/// Inserts single-row transactions at `rate`/s for 10 s (one connection per 250/s, 4 to 20),
/// records each commit time, and compares it with `published_at` once everything is
/// published. Polling runs drop the NOTIFY trigger first.
async fn latency(pool: &PgPool, rate: u32, listen: bool) {
    let args = Args::inserts_only(500, 1000, 1000);
    // Polling only: no NOTIFY trigger (`database.notify_trigger = false`), so the application's
    // commits do not pay for wake-ups nobody listens to.
    let table = fresh_table(
        pool,
        &args,
        &format!("bench_latency_{rate}_{listen}"),
        0,
        listen,
    )
    .await;
    // The default poll interval: the relay polls quickly by itself while rows arrive.
    let poll = Duration::from_secs(1);
    let config = config_file(&table, "kafka", 1000, listen, poll);
    let mut relay = spawn_relay(&config);
    tokio::time::sleep(Duration::from_secs(2)).await; // let it connect and start listening
    // Single-row commits take about a millisecond here: one writer per 250 events/s, each
    // on its own connection, so the rate is reached when the database allows it.
    let writers = (rate / 250).clamp(4, 20);
    let per_writer = rate / writers;
    let writer_pool = PgPoolOptions::new()
        .max_connections(writers)
        .connect(&format!("{SERVER}/{DATABASE}"))
        .await
        .unwrap();
    let duration = Duration::from_secs(10);
    let commits = Arc::new(std::sync::Mutex::new(HashMap::new()));
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let pool = writer_pool.clone();
            let table = table.clone();
            let commits = Arc::clone(&commits);
            tokio::spawn(async move {
                let interval = Duration::from_secs_f64(1.0 / f64::from(per_writer));
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let started = Instant::now();
                let mut n = 0u64;
                let payload = serde_json::json!({"data": "x".repeat(970)});
                while started.elapsed() < duration {
                    tick.tick().await;
                    let id: uuid::Uuid = sqlx::query_scalar(AssertSqlSafe(format!(
                        "insert into {table} (aggregate_type, aggregate_id, event_type, payload)
                         values ('bench', $1, 'happened', $2) returning event_id"
                    )))
                    .bind(format!("{w}-{}", n % 100))
                    .bind(&payload)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                    commits.lock().unwrap().insert(id, SystemTime::now());
                    n += 1;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut frontier = Frontier::new(&table);
    while frontier.pending(pool).await && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_relay(&mut relay);
    let published: Vec<(uuid::Uuid, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as(AssertSqlSafe(format!(
            "select event_id, published_at from {table} where published_at is not null"
        )))
        .fetch_all(pool)
        .await
        .unwrap();
    let commits = commits.lock().unwrap();
    // Each event's commit time and latency. The first second is reported apart: the relay has
    // been idle before it (its polls backed off to `poll_interval`), so the stream's first
    // events wait for the next poll; after it the relay keeps pace with the stream.
    let first_commit = commits
        .values()
        .min()
        .copied()
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let warm = first_commit + Duration::from_secs(1);
    let mut all: Vec<f64> = Vec::new();
    let mut steady: Vec<f64> = Vec::new();
    for (id, at) in &published {
        let Some(committed) = commits.get(id) else {
            continue;
        };
        let at_commit: chrono::DateTime<chrono::Utc> = (*committed).into();
        let Some(micros) = (*at - at_commit).num_microseconds() else {
            continue;
        };
        let ms = micros as f64 / 1000.0;
        all.push(ms);
        if *committed >= warm {
            steady.push(ms);
        }
    }
    all.sort_by(f64::total_cmp);
    steady.sort_by(f64::total_cmp);
    let pct = |v: &[f64], p: f64| {
        v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    println!(
        "| {rate} | {:.0} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
        all.len() as f64 / duration.as_secs_f64(),
        if listen {
            "LISTEN/NOTIFY"
        } else {
            "adaptive polling (poll_interval 1 s), no trigger"
        },
        all.len(),
        pct(&all, 0.5),
        pct(&all, 0.99),
        all.last().copied().unwrap_or(0.0),
        pct(&steady, 0.99),
        steady.last().copied().unwrap_or(0.0)
    );
}

/// The inbox part: messages already on the broker, ingested into a fresh inbox table, against
/// two floors measured in the same run: the batched insert alone (the inbox's statement, same
/// rows, same transaction size, no broker) and the broker's consumer alone (no database).
async fn inbox(pool: &PgPool, args: &Args) {
    let rows = args.rows;
    println!("\n## Inbox: {rows} messages already on the broker, into a fresh inbox table\n");
    println!("| part | what | messages | seconds | per second |");
    println!("|---|---|---:|---:|---:|");
    let insert_floor = floor_inbox_insert(pool, args).await;
    let topic = format!("bench.inbox.{}", std::process::id());
    create_bench_topic(&topic, 3).await;
    produce_bench(&topic, args).await;
    let kafka_floor = floor_kafka_consumer(&topic, rows).await;
    let kafka = ingest(pool, args, "kafka", &topic).await;
    let queue = format!("bench.inbox.{}", std::process::id());
    publish_bench(&queue, args).await;
    let rabbit_floor = floor_rabbitmq_consumer(&queue, rows).await;
    publish_bench(&queue, args).await;
    let rabbit = ingest(pool, args, "rabbitmq", &queue).await;
    println!(
        "\n| from | inbox messages/s | ratio to min(insert floor, consumer floor) | peak RSS MiB | CPU s per 100k messages |"
    );
    println!("|---|---:|---:|---:|---:|");
    for (from, drained, consumer_floor) in [
        ("kafka", kafka, kafka_floor),
        ("rabbitmq", rabbit, rabbit_floor),
    ] {
        let floor = insert_floor.min(consumer_floor);
        println!(
            "| {from} | {:.0} | {:.2} (floor {floor:.0}/s) | {:.1} | {:.2} |",
            drained.rate,
            drained.rate / floor,
            drained.peak_rss_mib,
            drained.cpu_seconds / rows as f64 * 100_000.0
        );
    }
}

/// The inbox table's DDL, as `migrate` creates it (the bench creates its floor table itself).
fn inbox_table_sql(table: &str) -> String {
    format!(
        "drop table if exists {table}; drop table if exists {table}_rejected;
         drop table if exists {table}_stats;
         delete from outbox_relay_migrations where table_name = '{table}';
         create table {table} (
             id bigint generated always as identity primary key,
             consumer text not null, event_id text not null, source text not null,
             \"partition\" integer, \"offset\" bigint, message_key text, event_type text,
             aggregate_type text, aggregate_id text, headers jsonb not null default '{{}}',
             payload jsonb, body bytea, received_at timestamptz not null default now(),
             processed_at timestamptz,
             unique (consumer, event_id), check ((payload is null) <> (body is null)));
         create index on {table} (consumer, id) where processed_at is null;
         create index on {table} (processed_at) where processed_at is not null;"
    )
}

/// (c1) The inbox's insert alone: the same statement (unnest, ON CONFLICT DO NOTHING), 1000
/// rows per transaction with synchronous commit, rows built as the inbox builds them.
async fn floor_inbox_insert(pool: &PgPool, args: &Args) -> f64 {
    let table = "bench_inbox_floor";
    let _ = sqlx::query("create table if not exists outbox_relay_migrations (table_name text not null, version integer not null, name text not null, applied_at timestamptz not null default now(), primary key (table_name, version))")
        .execute(pool)
        .await;
    sqlx::raw_sql(AssertSqlSafe(inbox_table_sql(table)))
        .execute(pool)
        .await
        .unwrap();
    let payload = bench_payload(args);
    let statement = format!(
        "insert into {table} (consumer, event_id, source, \"partition\", \"offset\", message_key,
                              event_type, aggregate_type, aggregate_id, headers, payload, body)
         select $1, event_id, source, part, off, message_key, event_type, aggregate_type,
                aggregate_id, headers::jsonb, payload::jsonb, body
         from unnest($2::text[], $3::text[], $4::int4[], $5::int8[], $6::text[], $7::text[],
                     $8::text[], $9::text[], $10::text[], $11::text[], $12::bytea[])
              with ordinality
              as m(event_id, source, part, off, message_key, event_type, aggregate_type,
                   aggregate_id, headers, payload, body, n)
         order by n
         on conflict (consumer, event_id) do nothing"
    );
    let started = Instant::now();
    let mut written = 0i64;
    while written < args.rows {
        let n = (args.rows - written).min(1000);
        let mut ids = Vec::new();
        let mut keys = Vec::new();
        let mut headers = Vec::new();
        let mut offsets = Vec::new();
        for i in written..written + n {
            let key = (i % args.aggregates).to_string();
            let h = event_headers(&key);
            ids.push(h[0].1.clone());
            headers.push(
                serde_json::Value::Object(
                    h.iter()
                        .map(|(k, v)| ((*k).to_owned(), serde_json::Value::String(v.clone())))
                        .collect(),
                )
                .to_string(),
            );
            keys.push(key);
            offsets.push(Some(i));
        }
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("set local synchronous_commit = on")
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::query(AssertSqlSafe(statement.clone()))
            .bind("bench")
            .bind(&ids)
            .bind(vec!["bench.inbox"; n as usize])
            .bind(vec![Some(0i32); n as usize])
            .bind(&offsets)
            .bind(&keys)
            .bind(vec!["happened"; n as usize])
            .bind(vec!["bench"; n as usize])
            .bind(&keys)
            .bind(&headers)
            .bind(vec![Some(payload.as_str()); n as usize])
            .bind(vec![None::<Vec<u8>>; n as usize])
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        written += n;
    }
    let seconds = started.elapsed().as_secs_f64();
    let rate = written as f64 / seconds;
    println!(
        "| (c1) insert floor | the inbox's statement alone, 1000 rows per synchronous commit | {written} | {seconds:.2} | {rate:.0} |"
    );
    rate
}

async fn create_bench_topic(topic: &str, partitions: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .create()
        .unwrap();
    admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
}

/// A JSON payload of about `args.payload` bytes.
fn bench_payload(args: &Args) -> String {
    format!(
        "{{\"seq\": 0, \"data\": \"{}\"}}",
        "x".repeat(args.payload.saturating_sub(30))
    )
}

/// Produces `args.rows` messages as the relay sends them (key, headers, JSON payload) to
/// `topic`, idempotent with `acks=all`, `args.batch` in flight at a time; returns how many.
async fn produce_bench(topic: &str, args: &Args) -> i64 {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let payload = bench_payload(args);
    let keys: Vec<String> = (0..args.aggregates).map(|k| k.to_string()).collect();
    let mut sent = 0i64;
    while sent < args.rows {
        let n = (args.rows - sent).min(i64::from(args.batch));
        let mut futures = Vec::with_capacity(n as usize);
        for i in 0..n {
            let key = &keys[((sent + i) % args.aggregates) as usize];
            let mut headers = OwnedHeaders::new();
            for (name, value) in event_headers(key) {
                headers = headers.insert(Header {
                    key: name,
                    value: Some(value.as_bytes()),
                });
            }
            let record = FutureRecord::to(topic)
                .key(key)
                .payload(&payload)
                .headers(headers);
            futures.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
        }
        for result in join_all(futures).await {
            result.unwrap().map_err(|(e, _)| e).unwrap();
        }
        sent += n;
    }
    sent
}

/// (c2) rdkafka's consumer alone, reading `rows` messages of `topic` (no database).
async fn floor_kafka_consumer(topic: &str, rows: i64) -> f64 {
    use rdkafka::Message;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .set("group.id", format!("bench-floor-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    // Timed from the first message: joining the group is not consuming.
    let first = consumer.recv().await.unwrap();
    let mut bytes = first.payload().map_or(0, <[u8]>::len);
    let started = Instant::now();
    let mut read = 1i64;
    while read < rows {
        let message = consumer.recv().await.unwrap();
        bytes += message.payload().map_or(0, <[u8]>::len);
        read += 1;
    }
    let seconds = started.elapsed().as_secs_f64();
    let rate = (read - 1) as f64 / seconds;
    println!(
        "| (c2) kafka consumer floor | rdkafka StreamConsumer alone ({} MiB) | {read} | {seconds:.2} | {rate:.0} |",
        bytes / (1024 * 1024)
    );
    rate
}

/// `args.rows` persistent messages with the relay's headers into durable queue `queue`.
async fn publish_bench(queue: &str, args: &Args) {
    let connection = Connection::connect(AMQP, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let payload = bench_payload(args);
    let mut sent = 0i64;
    while sent < args.rows {
        let n = (args.rows - sent).min(i64::from(args.batch));
        let mut confirms = Vec::with_capacity(n as usize);
        for i in 0..n {
            let key = ((sent + i) % args.aggregates).to_string();
            confirms.push(
                channel
                    .basic_publish(
                        "".into(),
                        queue.into(),
                        BasicPublishOptions::default(),
                        payload.as_bytes(),
                        amqp_properties(&key),
                    )
                    .await
                    .unwrap(),
            );
        }
        for confirm in join_all(confirms).await {
            confirm.unwrap();
        }
        sent += n;
    }
    let _ = connection.close(200, "published".into()).await;
}

/// (c3) lapin's consumer alone: `rows` messages of `queue`, prefetch 1000, acknowledged
/// cumulatively every 1000 (no database).
async fn floor_rabbitmq_consumer(queue: &str, rows: i64) -> f64 {
    use futures::StreamExt;
    use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
    let connection = Connection::connect(AMQP, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .basic_qos(8000, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "bench-floor".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let started = Instant::now();
    let mut read = 0i64;
    while read < rows {
        let delivery = consumer.next().await.unwrap().unwrap();
        read += 1;
        if read % 1000 == 0 || read == rows {
            channel
                .basic_ack(delivery.delivery_tag, BasicAckOptions { multiple: true })
                .await
                .unwrap();
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let rate = read as f64 / seconds;
    println!(
        "| (c3) rabbitmq consumer floor | lapin consumer alone, prefetch 8000 (the inbox default), ack every 1000 | {read} | {seconds:.2} | {rate:.0} |"
    );
    let _ = connection.close(200, "done".into()).await;
    rate
}

/// The inbox (release binary) ingesting `args.rows` messages of `source` into a fresh table;
/// timed from its first row to its last (joining a Kafka group is not ingesting).
async fn ingest(pool: &PgPool, args: &Args, from: &str, source: &str) -> Drained {
    let table = format!("bench_inbox_{from}");
    sqlx::raw_sql(AssertSqlSafe(format!(
        "drop table if exists {table}; drop table if exists {table}_rejected;
         drop table if exists {table}_stats;
         delete from outbox_relay_migrations where table_name = '{table}';"
    )))
    .execute(pool)
    .await
    .unwrap();
    let source_section = match from {
        "kafka" => format!("[inbox.kafka]\nbrokers = \"{BROKERS}\"\ntopics = [\"{source}\"]\n"),
        _ => format!("[inbox.rabbitmq]\nurl = \"{AMQP}\"\nqueues = [\"{source}\"]\n"),
    };
    let config = std::env::temp_dir().join(format!("bench-inbox-{from}.toml"));
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = \"{SERVER}/{DATABASE}\"\n[inbox]\ntable = \"{table}\"\nconsumer = \"bench-{}\"\nfrom = \"{from}\"\n{source_section}[log]\nlevel = \"warn\"\n",
            std::process::id()
        ),
    )
    .unwrap();
    let migrated = Command::new(relay_binary())
        .args(["-c", config.to_str().unwrap(), "migrate"])
        .output()
        .unwrap();
    assert!(migrated.status.success(), "{migrated:?}");
    let mut process = spawn_relay(&config);
    let last = || async {
        sqlx::query_scalar::<_, Option<i64>>(AssertSqlSafe(format!("select max(id) from {table}")))
            .fetch_one(pool)
            .await
            .unwrap()
            .unwrap_or(0)
    };
    let mut first = last().await;
    while first == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        first = last().await;
    }
    let started = Instant::now();
    loop {
        if last().await >= args.rows {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let (peak_rss_mib, cpu_seconds) = resources(process.id());
    stop_relay(&mut process);
    let rate = (args.rows - first) as f64 / seconds;
    println!(
        "| inbox from {from} | the release binary, defaults | {} | {seconds:.2} | {rate:.0} |",
        args.rows - first
    );
    Drained {
        rate,
        peak_rss_mib,
        cpu_seconds,
    }
}
