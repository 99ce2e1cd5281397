//! The command line: `outbox-relay [-c PATH] run | migrate | check | status [--json] | requeue |
//! partitions`.
//!
//! Exit codes: 0 success; 2 bad usage or invalid configuration (reported before any connection
//! is made); 1 runtime failure.
//!
//! This is the composition root: the only place that picks the concrete database and broker
//! from the settings and hands them to the outbox relay.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::broker::Inbound;
use crate::broker::config::BrokerSettings;
use crate::broker::kafka::consumer::KafkaConsumer;
use crate::broker::kafka::partitions::{self, Ledger};
use crate::broker::rabbitmq::consumer::RabbitMqConsumer;
use crate::broker::{Broker, Producer};
use crate::config::{Config, Settings};
use crate::database::postgres::inbox::{self as inbox_store, PgInbox};
use crate::database::postgres::{
    self as store, Connections, Postgres, TopicPartitions, listener, schema,
};
use crate::health::Health;
use crate::inbox::config::{InboxSettings, Source};
use crate::inbox::ingest::{self, Ingest, IngestSettings};
use crate::outbox::relay::{Relay, Stopped};
use crate::outbox::retention;
use crate::outbox::store::ClaimRules;
use crate::telemetry::{self, ErrorChain};

/// Transactional-outbox relay: publishes PostgreSQL outbox rows to Kafka or RabbitMQ.
#[derive(Debug, Parser)]
#[command(name = "outbox-relay", version, about)]
pub struct Cli {
    /// Configuration file (TOML). Keys can be overridden with OUTBOX_RELAY__SECTION__KEY.
    #[arg(
        short,
        long,
        global = true,
        env = "OUTBOX_RELAY_CONFIG",
        value_name = "PATH"
    )]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the relay until SIGTERM/SIGINT.
    Run,
    /// Create or update the outbox table, its indexes and NOTIFY trigger (idempotent).
    Migrate,
    /// Validate the configuration, connect to the database and the broker, verify the table.
    Check,
    /// Show the outbox's state: pending, in flight, retrying, parked and dead rows, and the
    /// oldest pending age.
    Status {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Put dead-lettered rows back in line (fresh attempts, original order).
    Requeue {
        /// Requeue these events.
        #[arg(long = "event-id", value_name = "EVENT_ID", conflicts_with_all = ["aggregate", "all"])]
        event_ids: Vec<String>,
        /// Requeue every dead row of this aggregate.
        #[arg(long, value_name = "AGGREGATE_ID", conflicts_with = "all")]
        aggregate: Option<String>,
        /// Requeue every dead row.
        #[arg(long)]
        all: bool,
    },
    /// Kafka: list the recorded partition count of each topic written to beside the cluster's,
    /// or accept a topic's new count (publishing to it resumes).
    Partitions {
        /// Record the cluster's current partition count for this topic.
        #[arg(long, value_name = "TOPIC")]
        accept: Vec<String>,
    },
}

const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 2;
/// How long `check` and `migrate` wait for a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the parsed command and maps its outcome to an exit code.
pub fn execute(cli: Cli) -> ExitCode {
    let Some(path) = cli.config else {
        eprintln!("error: no configuration file: pass -c/--config PATH or set OUTBOX_RELAY_CONFIG");
        return ExitCode::from(EXIT_CONFIG);
    };
    let mut config = match Config::load(&path) {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("error: {} ({})", ErrorChain(&err), path.display());
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(log) = config.log.take() {
        telemetry::init(log);
    }
    // One thread runs every task and polls the sockets: the relay's pipeline is one task, and
    // the brokers' clients run their own I/O threads. A second worker only added cross-thread
    // wake-ups (measured: Kafka drain 39-41k -> 49k events/s on 2 cores shared with
    // PostgreSQL and the broker), and so did one worker beside the thread blocked in
    // `block_on`: each database read woke the pipeline across threads (relay CPU per 100 000
    // events, median of paired runs: 0.76 -> 0.68 s to Kafka, 1.22 -> 1.13 s to RabbitMQ). The
    // blocking pool still serves blocking work.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let code = match cli.command {
        Command::Run => runtime.block_on(run(&config)),
        Command::Migrate => runtime.block_on(migrate(&config)),
        Command::Check => runtime.block_on(check(&config)),
        Command::Status { json } => runtime.block_on(status(&config, json)),
        Command::Partitions { accept } => runtime.block_on(partitions(&config, &accept)),
        Command::Requeue {
            event_ids,
            aggregate,
            all,
        } => {
            let which = match (event_ids.is_empty(), aggregate, all) {
                (false, None, false) => store::Requeue::EventIds(event_ids),
                (true, Some(aggregate), false) => store::Requeue::Aggregate(aggregate),
                (true, None, true) => store::Requeue::All,
                _ => {
                    eprintln!(
                        "error: requeue needs one of --event-id UUID..., --aggregate ID, --all"
                    );
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            runtime.block_on(requeue(&config, &which))
        }
    };
    // Do not wait for blocking tasks (e.g. a producer flush that already timed out).
    runtime.shutdown_timeout(Duration::from_secs(1));
    ExitCode::from(code)
}

/// The broker the outbox publishes to, named to the broker after the table; `None`
/// (reported) when the client cannot be created.
fn broker(config: &Settings, settings: &BrokerSettings) -> Option<Broker> {
    Broker::new(
        settings,
        config.database.layout,
        format!("outbox-relay {}", config.database.table),
    )
    .map_err(|err| {
        eprintln!(
            "error: cannot create the Kafka producer: {}",
            ErrorChain(&err)
        )
    })
    .ok()
}

/// The consumer the inbox takes messages from; `None` (reported) when the client cannot be
/// created.
fn inbound(inbox: &InboxSettings) -> Option<Inbound> {
    match &inbox.source {
        Source::Kafka(kafka) => match KafkaConsumer::new(kafka) {
            Ok(consumer) => Some(Inbound::Kafka(Box::new(consumer))),
            Err(err) => {
                eprintln!(
                    "error: cannot create the Kafka consumer: {}",
                    ErrorChain(&err)
                );
                None
            }
        },
        Source::RabbitMq(rabbit) => Some(Inbound::RabbitMq(Box::new(RabbitMqConsumer::new(
            rabbit.clone(),
            format!("outbox-relay inbox {}", inbox.consumer),
        )))),
    }
}

async fn run(config: &Settings) -> u8 {
    let broker = match &config.broker {
        Some(settings) => match broker(config, settings) {
            Some(broker) => Some(broker),
            None => return EXIT_RUNTIME,
        },
        None => None,
    };
    let inbound = match &config.inbox {
        Some(inbox) => match inbound(inbox) {
            Some(inbound) => Some(inbound),
            None => return EXIT_RUNTIME,
        },
        None => None,
    };
    let outbox_health = broker.as_ref().map(|_| outbox_health(config));
    let inbox_health = config.inbox.as_ref().map(|_| inbox_health(config));
    let mut directions = Vec::new();
    if let Some(health) = &outbox_health {
        directions.push(("outbox", Arc::clone(health)));
    }
    if let Some(health) = &inbox_health {
        directions.push(("inbox", Arc::clone(health)));
    }
    let shutdown = CancellationToken::new();
    let signals = match crate::runtime::shutdown::on_signal(shutdown.clone()) {
        Ok(task) => task,
        Err(err) => {
            tracing::error!(error = %err, "cannot install signal handlers");
            return EXIT_RUNTIME;
        }
    };
    // The HTTP listener stops after the relay, so /readyz and /metrics answer during shutdown.
    let http_stop = CancellationToken::new();
    let http = match config.http {
        None => None,
        Some(listen) => {
            let metrics = match crate::telemetry::install_metrics() {
                Ok(handle) => handle,
                Err(err) => {
                    tracing::error!(error = %err, "cannot install the metrics recorder");
                    return EXIT_RUNTIME;
                }
            };
            match crate::health::serve(listen, directions, metrics, http_stop.clone()).await {
                Ok(server) => Some(tokio::spawn(server)),
                Err(err) => {
                    tracing::error!(error = %err, listen = %listen, "cannot start the http listener");
                    return EXIT_RUNTIME;
                }
            }
        }
    };
    // One pool serves both directions.
    let connections = Connections::new(&config.database);
    let outbox = async {
        match (broker, outbox_health) {
            (Some(broker), Some(health)) => {
                run_outbox(
                    config,
                    broker,
                    connections.clone(),
                    health,
                    shutdown.clone(),
                )
                .await
            }
            _ => Stopped::Clean,
        }
    };
    let inbox = async {
        if let (Some(settings), Some(inbound), Some(health)) =
            (&config.inbox, inbound, inbox_health)
        {
            run_inbox(
                settings,
                inbound,
                connections.clone(),
                health,
                shutdown.clone(),
            )
            .await;
        }
    };
    let (stopped, ()) = tokio::join!(outbox, inbox);
    signals.abort();
    http_stop.cancel();
    if let Some(http) = http {
        match http.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::error!(error = %err, "http listener failed"),
            Err(err) => tracing::error!(error = %err, "http listener task failed"),
        }
    }
    match stopped {
        Stopped::Clean => 0,
        Stopped::Abandoned => EXIT_RUNTIME,
    }
}

/// Runs the inbox direction until `shutdown`: the ingest loop over the inbox table and
/// `inbound`, with its housekeeping task beside it.
async fn run_inbox(
    settings: &InboxSettings,
    inbound: Inbound,
    connections: Connections,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    let store = PgInbox::new(connections, &settings.table);
    tracing::info!(
        table = %settings.table,
        consumer = %settings.consumer,
        from = %inbound,
        batch_size = settings.batch_size,
        "inbox started"
    );
    let tasks_stop = shutdown.child_token();
    let housekeeping = tokio::spawn(ingest::housekeeping(
        store.clone(),
        settings.consumer.clone(),
        settings.keep_processed,
        Arc::clone(&health),
        tasks_stop.clone(),
    ));
    let ingest = Ingest::new(
        store,
        inbound,
        IngestSettings {
            consumer: settings.consumer.clone(),
            rules: settings.rules,
            batch_size: settings.batch_size,
            max_batch_bytes: settings.max_batch_bytes,
            batch_wait: settings.batch_wait,
        },
        health,
    );
    ingest.run(&shutdown).await;
    tasks_stop.cancel();
    if let Err(err) = housekeeping.await {
        tracing::error!(error = %err, "inbox housekeeping task failed");
    }
}

/// Runs the outbox direction until `shutdown`: the relay loop over the configured database
/// and `broker`, with the LISTEN wake-up task (when `relay.listen`) and retention beside it,
/// stopped when the loop ends. No connection is made before the loop's first claim.
async fn run_outbox(
    settings: &Settings,
    broker: Broker,
    connections: Connections,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> Stopped {
    let database = &settings.database;
    let table = &database.table;
    let store = Postgres::new(
        connections.clone(),
        table,
        &database.columns,
        ClaimRules {
            park_dead: settings.retry.parks(),
            commit_order_guard: settings.relay.commit_order_guard,
            max_batch_bytes: settings.relay.max_batch_bytes,
        },
    );
    tracing::info!(
        table = %table,
        broker = %broker,
        batch_size = settings.relay.batch_size,
        max_in_flight_batches = settings.relay.max_in_flight_batches,
        "relay started"
    );
    if matches!(broker, Broker::Discard) {
        tracing::warn!(
            "broker.kind = \"discard\": rows are marked published without being sent anywhere"
        );
    }
    let wakeup = Arc::new(Notify::new());
    let tasks_stop = shutdown.child_token();
    let listener = settings.relay.listen.then(|| {
        tokio::spawn(listener::run(
            listener::pool(database),
            table.clone(),
            Arc::clone(&wakeup),
            tasks_stop.clone(),
        ))
    });
    let retention = tokio::spawn(retention::run(
        store.clone(),
        settings.retention.clone(),
        tasks_stop.clone(),
    ));
    let partition_check = match &broker {
        Broker::Kafka(kafka) => Some(tokio::spawn(
            kafka.partition_check(TopicPartitions::new(connections, table), tasks_stop.clone()),
        )),
        _ => None,
    };

    let relay = Relay::new(
        store,
        broker,
        settings.relay.clone(),
        settings.retry.clone(),
        health,
        wakeup,
    );
    let stopped = relay.run(&shutdown).await;

    tasks_stop.cancel();
    if let Err(err) = retention.await {
        tracing::error!(error = %err, "retention task failed");
    }
    if let Some(listener) = listener {
        if let Err(err) = listener.await {
            tracing::error!(error = %err, "listener task failed");
        }
    }
    if let Some(check) = partition_check {
        if let Err(err) = check.await {
            tracing::error!(error = %err, "partition check task failed");
        }
    }
    stopped
}

/// Readiness and liveness for the inbox direction: its loop reports progress at least every
/// second; a batch's write is bounded like any statement.
fn inbox_health(settings: &Settings) -> Arc<Health> {
    Arc::new(Health::new(
        Duration::from_secs(1),
        Health::wedged_after(Duration::ZERO, settings.database.statement_timeout),
    ))
}

/// Readiness and liveness for the outbox direction, from its settings.
fn outbox_health(settings: &Settings) -> Arc<Health> {
    Arc::new(Health::new(
        settings.relay.poll_interval,
        Health::wedged_after(
            settings.relay.lease_duration,
            settings.database.statement_timeout,
        ),
    ))
}

async fn connect(config: &Settings) -> Result<sqlx::PgConnection, String> {
    let options = &config.database.connect;
    let target = describe_database(options);
    match tokio::time::timeout(CONNECT_TIMEOUT, schema::connect(options)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(err)) => Err(format!(
            "cannot connect to the database at {target}: {}",
            ErrorChain(&err)
        )),
        Err(_) => Err(format!(
            "cannot connect to the database at {target}: no answer within {}",
            humantime::format_duration(CONNECT_TIMEOUT)
        )),
    }
}

/// Connects, or prints why not (for the one-shot commands).
async fn connect_or_report(config: &Settings) -> Option<sqlx::PgConnection> {
    connect(config)
        .await
        .map_err(|message| eprintln!("error: {message}"))
        .ok()
}

/// `host:port/database as user`, never the password.
fn describe_database(options: &sqlx::postgres::PgConnectOptions) -> String {
    format!(
        "{}:{}/{} as {}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("(default)"),
        options.get_username()
    )
}

async fn migrate(config: &Settings) -> u8 {
    let Some(mut conn) = connect_or_report(config).await else {
        return EXIT_RUNTIME;
    };
    let mut code = 0;
    if config.broker.is_some() {
        code = migrate_outbox(config, &mut conn).await;
    }
    if let Some(inbox) = &config.inbox {
        let table = &inbox.table;
        match inbox_store::migrate(&mut conn, table).await {
            Ok(done) if done.applied.is_empty() => println!(
                "inbox table {table}: up to date (schema version {})",
                done.current
            ),
            Ok(done) => {
                let applied: Vec<String> = done.applied.iter().map(i32::to_string).collect();
                println!(
                    "inbox table {table}: applied migration(s) {} (schema version {}); {table}_rejected and {table}_stats beside it",
                    applied.join(", "),
                    done.current
                );
            }
            Err(err) => {
                eprintln!(
                    "error: migrating inbox table {table} failed: {}",
                    ErrorChain(&err)
                );
                code = EXIT_RUNTIME;
            }
        }
    }
    code
}

async fn migrate_outbox(config: &Settings, conn: &mut sqlx::PgConnection) -> u8 {
    let table = &config.database.table;
    let trigger = if config.database.notify_trigger {
        "installed"
    } else {
        "dropped"
    };
    match schema::migrate(
        conn,
        table,
        &config.database.columns,
        config.database.notify_trigger,
    )
    .await
    {
        Ok(done) if done.applied.is_empty() => {
            println!(
                "table {table}: up to date (schema version {}); notify trigger {trigger}",
                done.current
            );
            0
        }
        Ok(done) => {
            let applied: Vec<String> = done.applied.iter().map(i32::to_string).collect();
            println!(
                "table {table}: applied migration(s) {} (schema version {}); notify trigger {trigger}",
                applied.join(", "),
                done.current
            );
            0
        }
        Err(err) => {
            eprintln!(
                "error: migrating table {table} failed: {}",
                ErrorChain(&err)
            );
            EXIT_RUNTIME
        }
    }
}

async fn status(config: &Settings, json: bool) -> u8 {
    let Some(mut conn) = connect_or_report(config).await else {
        return EXIT_RUNTIME;
    };
    let mut out = serde_json::Map::new();
    let mut code = 0;
    if config.broker.is_some() {
        code = outbox_status(config, &mut conn, json, &mut out).await;
    }
    if let Some(inbox) = &config.inbox {
        let table = &inbox.table;
        match inbox_store::status(&mut conn, table, &inbox.consumer).await {
            Ok(status) if json => {
                out.insert(
                    "inbox".to_owned(),
                    serde_json::json!({
                        "table": table.to_string(),
                        "consumer": inbox.consumer,
                        "status": status,
                    }),
                );
            }
            Ok(s) => {
                println!("inbox table {table}, consumer {}", inbox.consumer);
                println!(
                    "  waiting    {:>10}  (not yet marked processed_at by the application)",
                    s.waiting
                );
                println!("  rejected   {:>10}  (in {table}_rejected)", s.rejected);
                println!(
                    "  duplicates {:>10}  (redeliveries skipped)",
                    s.duplicates_skipped
                );
                match s.oldest_waiting_age_s {
                    Some(age) => println!(
                        "  oldest waiting: {}",
                        humantime::format_duration(Duration::from_secs(age.max(0.0) as u64))
                    ),
                    None => println!("  oldest waiting: none"),
                }
            }
            Err(err) => {
                let hint =
                    if err.as_database_error().and_then(|e| e.code()).as_deref() == Some("42P01") {
                        " (run `outbox-relay migrate`)"
                    } else {
                        ""
                    };
                eprintln!(
                    "error: cannot read the inbox state: {}{hint}",
                    ErrorChain(&err)
                );
                code = EXIT_RUNTIME;
            }
        }
    }
    if json && code == 0 {
        println!("{}", serde_json::Value::Object(out));
    }
    code
}

/// The outbox part of `status`: printed, or (with `json`) added to `out` as `table` and
/// `status`.
async fn outbox_status(
    config: &Settings,
    conn: &mut sqlx::PgConnection,
    json: bool,
    out: &mut serde_json::Map<String, serde_json::Value>,
) -> u8 {
    let table = &config.database.table;
    match store::status(conn, table, &config.database.columns, config.retry.parks()).await {
        Ok(status) if json => {
            out.insert("table".to_owned(), table.to_string().into());
            out.insert(
                "status".to_owned(),
                serde_json::to_value(status).unwrap_or_default(),
            );
            0
        }
        Ok(s) => {
            println!("table {table}");
            println!("  pending    {:>10}", s.pending);
            println!("  in flight  {:>10}", s.in_flight);
            println!("  retrying   {:>10}", s.retrying);
            println!(
                "  parked     {:>10}  (held back behind a waiting or dead row of their aggregate)",
                s.parked
            );
            println!("  dead       {:>10}", s.dead);
            match s.oldest_pending_age_s {
                Some(age) => println!(
                    "  oldest pending: {}",
                    humantime::format_duration(Duration::from_secs_f64(age.max(0.0)))
                ),
                None => println!("  oldest pending: none"),
            }
            0
        }
        Err(err) => {
            let hint = if err.as_database_error().and_then(|e| e.code()).as_deref() == Some("42P01")
            {
                " (run `outbox-relay migrate`)"
            } else {
                ""
            };
            eprintln!(
                "error: cannot read the outbox state: {}{hint}",
                ErrorChain(&err)
            );
            EXIT_RUNTIME
        }
    }
}

/// `outbox-relay partitions [--accept TOPIC...]`.
async fn partitions(config: &Settings, accept: &[String]) -> u8 {
    let Some(BrokerSettings::Kafka { settings, .. }) = &config.broker else {
        eprintln!("error: partitions applies to broker.kind = \"kafka\"");
        return EXIT_CONFIG;
    };
    let ledger = TopicPartitions::new(Connections::new(&config.database), &config.database.table);
    let recorded = match ledger.recorded().await {
        Ok(recorded) => recorded,
        Err(err) => {
            eprintln!(
                "error: cannot read the recorded partition counts: {}{}",
                ErrorChain(&err),
                err.hint().map(|h| format!(" ({h})")).unwrap_or_default()
            );
            return EXIT_RUNTIME;
        }
    };
    let topics: Vec<String> = if accept.is_empty() {
        recorded.keys().cloned().collect()
    } else {
        accept.to_vec()
    };
    let current = match partitions::current_counts(&topics, &settings.client).await {
        Ok(current) => current,
        Err(err) => {
            eprintln!("error: cannot create a Kafka client: {}", ErrorChain(&err));
            return EXIT_RUNTIME;
        }
    };
    let mut code = 0;
    for (topic, current) in topics.iter().zip(current) {
        let count = recorded.get(topic).copied();
        let Some(current) = current else {
            eprintln!("error: topic {topic}: the cluster does not report its partitions");
            code = EXIT_RUNTIME;
            continue;
        };
        if !accept.is_empty() {
            match ledger.record(topic, current, true).await {
                Ok(()) => println!(
                    "topic {topic}: {current} partitions accepted (recorded before: {}); relays resume publishing to it at their next check",
                    count.map_or("none".to_owned(), |n| n.to_string())
                ),
                Err(err) => {
                    eprintln!(
                        "error: topic {topic}: cannot record the count: {}",
                        ErrorChain(&err)
                    );
                    code = EXIT_RUNTIME;
                }
            }
        } else if count == Some(current) {
            println!("topic {topic}: {current} partitions, as recorded");
        } else if let Some(count) = count {
            println!(
                "topic {topic}: {count} partitions recorded, {current} in the cluster: publishing to it is paused unless broker.kafka.on_partition_change = \"continue\" (accept with --accept {topic})"
            );
        }
    }
    code
}

async fn requeue(config: &Settings, which: &store::Requeue) -> u8 {
    let table = &config.database.table;
    if config.broker.is_none() {
        eprintln!("error: requeue applies to the outbox, and this configuration has no [broker]");
        return EXIT_CONFIG;
    }
    let Some(mut conn) = connect_or_report(config).await else {
        return EXIT_RUNTIME;
    };
    match store::requeue(&mut conn, table, &config.database.columns, which).await {
        Ok(rows) => {
            println!("table {table}: requeued {rows} dead-lettered row(s)");
            0
        }
        Err(err) => {
            eprintln!("error: cannot requeue: {}", ErrorChain(&err));
            EXIT_RUNTIME
        }
    }
}

async fn check(config: &Settings) -> u8 {
    let mut healthy = true;
    let broker = match &config.broker {
        Some(settings) => match broker(config, settings) {
            Some(broker) => Some(broker),
            None => return EXIT_RUNTIME,
        },
        None => None,
    };
    match &broker {
        Some(broker) => println!(
            "config: ok (table {}, broker {})",
            config.database.table,
            broker.name()
        ),
        None => println!("config: ok (no [broker]: the outbox relay does not run)"),
    }
    if let Some(inbox) = &config.inbox {
        println!(
            "config: inbox table {}, consumer {}",
            inbox.table, inbox.consumer
        );
    }

    match connect(config).await {
        Ok(mut conn) => {
            println!(
                "database: connected to {}",
                describe_database(&config.database.connect)
            );
            if broker.is_some() {
                healthy &= check_outbox_table(config, &mut conn).await;
            }
            if let Some(inbox) = &config.inbox {
                match inbox_store::status(&mut conn, &inbox.table, &inbox.consumer).await {
                    Ok(_) => println!("inbox table {}: ok", inbox.table),
                    Err(err) => {
                        eprintln!(
                            "error: inbox table {} cannot be used: {} (run `outbox-relay migrate`)",
                            inbox.table,
                            ErrorChain(&err)
                        );
                        healthy = false;
                    }
                }
            }
        }
        Err(message) => {
            eprintln!("error: {message}");
            healthy = false;
        }
    }

    match &broker {
        Some(Broker::Kafka(kafka)) => match kafka.probe(CONNECT_TIMEOUT).await {
            Ok(brokers) => println!(
                "kafka: reachable, {} broker(s): {}",
                brokers.len(),
                brokers.join(", ")
            ),
            Err(err) => {
                eprintln!("error: kafka brokers not reachable: {}", ErrorChain(&err));
                healthy = false;
            }
        },
        Some(Broker::Discard) => {
            println!("broker: discard (nothing is sent; rows are only marked)");
        }
        Some(Broker::RabbitMq(rabbit)) => match rabbit.probe(CONNECT_TIMEOUT).await {
            Ok(()) => println!("rabbitmq: reachable, confirm channel open"),
            Err(err) => {
                eprintln!("error: rabbitmq not reachable: {}", ErrorChain(&err));
                healthy = false;
            }
        },
        None => {}
    }
    if let Some(inbox) = &config.inbox {
        healthy &= check_inbox_source(inbox).await;
    }
    if healthy { 0 } else { EXIT_RUNTIME }
}

/// `check` for the outbox table; whether it is usable.
async fn check_outbox_table(config: &Settings, conn: &mut sqlx::PgConnection) -> bool {
    match schema::inspect(conn, &config.database.table, &config.database.columns).await {
        Ok(found) => {
            println!("{found}");
            if !found.is_usable() {
                eprintln!("error: the outbox table cannot be used by the relay (see above)");
                return false;
            }
            if config.relay.listen && !found.has_notify_trigger {
                println!(
                    "warning: relay.listen = true but the NOTIFY trigger is absent; the relay will rely on polling (run `outbox-relay migrate`)"
                );
            }
            true
        }
        Err(err) => {
            eprintln!("error: {}", ErrorChain(&err));
            false
        }
    }
}

/// `check` for the inbox's topics or queues: each must exist (the inbox declares none).
async fn check_inbox_source(inbox: &InboxSettings) -> bool {
    match &inbox.source {
        Source::Kafka(kafka) => match KafkaConsumer::topics(kafka, CONNECT_TIMEOUT).await {
            Ok(topics) => {
                let mut ok = true;
                for (topic, partitions) in topics {
                    match partitions {
                        Some(n) => println!("inbox kafka topic {topic}: {n} partition(s)"),
                        None => {
                            eprintln!(
                                "error: inbox kafka topic {topic} does not exist (the inbox consumes existing topics and creates none)"
                            );
                            ok = false;
                        }
                    }
                }
                ok
            }
            Err(err) => {
                eprintln!(
                    "error: inbox kafka brokers not reachable: {}",
                    ErrorChain(&err)
                );
                false
            }
        },
        Source::RabbitMq(rabbit) => match RabbitMqConsumer::queues(rabbit.clone()).await {
            Ok(queues) => {
                let mut ok = true;
                for (queue, found) in queues {
                    if found {
                        println!("inbox rabbitmq queue {queue}: exists");
                    } else {
                        eprintln!(
                            "error: inbox rabbitmq queue {queue} does not exist (the inbox consumes existing queues and declares none)"
                        );
                        ok = false;
                    }
                }
                ok
            }
            Err(err) => {
                eprintln!("error: inbox rabbitmq not reachable: {}", ErrorChain(&err));
                false
            }
        },
    }
}
