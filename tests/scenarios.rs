//! End-to-end scenarios shared by every sink: each runs against Kafka (`relay_kafka`) and
//! RabbitMQ (`relay_rabbitmq`) with the same expectations.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::json;

use crate::support::{Broker, Outbox, metric, wait_until};

const WAIT: Duration = Duration::from_secs(60);

pub async fn committed_events_arrive_as_contracted_and_rolled_back_ones_never(broker: Broker) {
    // GIVEN an outbox, a subscription, and events written in application transactions,
    // some rolled back
    let outbox = Outbox::for_broker(broker).await;
    let mut reader = outbox.reader("order", 1).await;
    let mut committed = BTreeMap::new();
    for i in 0..20 {
        let mut tx = outbox.pool.begin().await.unwrap();
        let event_id: uuid::Uuid = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "insert into {} (aggregate_type, aggregate_id, event_type, payload, headers)
             values ('order', $1, 'order_placed', $2, $3) returning event_id",
            outbox.table
        )))
        .bind(format!("order-{}", i % 4))
        .bind(serde_json::json!({"seq": i, "total": {"amount": 1999, "currency": "EUR"}, "note": "ünïcode ✓"}))
        .bind(serde_json::json!({"traceparent": format!("00-{i:032x}-01"), "attempt": 3}))
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        if i % 5 == 4 {
            tx.rollback().await.unwrap();
        } else {
            tx.commit().await.unwrap();
            committed.insert(event_id.to_string(), i);
        }
    }

    // WHEN the relay runs
    let mut relay = outbox.start();

    // THEN every committed event arrives once, with key, value and headers as contracted
    outbox.wait_all_published(WAIT).await;
    reader.read_at_least(committed.len(), WAIT).await;
    let received = reader.read_for(Duration::from_millis(500)).await;
    assert_eq!(
        received.len(),
        committed.len(),
        "no duplicates, no rolled-back events"
    );
    let created: BTreeMap<String, i64> =
        sqlx::query_as::<_, (String, i64)>(sqlx::AssertSqlSafe(format!(
            "select event_id::text, floor(extract(epoch from created_at))::bigint from {}",
            outbox.table
        )))
        .fetch_all(&outbox.pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    for message in &received {
        let seq = committed[message.header("event_id")];
        match broker {
            Broker::Kafka => assert_eq!(message.topic, outbox.topic("order")),
            Broker::RabbitMq => {
                assert_eq!(message.topic, "order.order_placed", "routing key");
                let p = &message.properties;
                assert_eq!(p["message_id"], message.header("event_id"));
                assert_eq!(p["type"], "order_placed");
                assert_eq!(p["content_type"], "application/json");
                assert_eq!(p["delivery_mode"], "2", "persistent");
                assert_eq!(
                    p["timestamp"],
                    created[message.header("event_id")].to_string()
                );
            }
        }
        assert_eq!(message.key, format!("order-{}", seq % 4));
        assert_eq!(message.payload["seq"], seq);
        assert_eq!(message.payload["total"]["currency"], "EUR");
        assert_eq!(message.payload["note"], "ünïcode ✓");
        assert_eq!(message.header("event_type"), "order_placed");
        assert_eq!(message.header("aggregate_type"), "order");
        assert_eq!(message.header("aggregate_id"), message.key);
        assert_eq!(message.header("traceparent"), format!("00-{seq:032x}-01"));
        assert_eq!(
            message.header("attempt"),
            "3",
            "non-string header values as JSON text"
        );
    }
    // AND the rows are marked published, with one attempt each
    let unmarked: i64 = outbox.scalar("select count(*) from {table} where published_at is null or attempts <> 1 or next_attempt_at is not null").await;
    assert_eq!(unmarked, 0);

    // AND SIGTERM stops the relay with exit code 0
    relay.signal(Signal::SIGTERM);
    assert!(relay.wait_exit(Duration::from_secs(15)).await.success());
}

pub async fn events_of_an_aggregate_arrive_in_id_order(broker: Broker) {
    // GIVEN 20 aggregates × 40 events, interleaved, on a 3-partition topic, and small batches
    let mut outbox = Outbox::for_broker(broker).await;
    outbox.relay.insert("batch_size", "37".to_owned());
    let mut reader = outbox.reader("account", 3).await;
    for round in 0..4 {
        for aggregate in 0..20 {
            outbox
                .insert(
                    "account",
                    &format!("acc-{aggregate}"),
                    round * 10..round * 10 + 10,
                )
                .await;
        }
    }
    // WHEN the relay drains them
    let _relay = outbox.start();
    outbox.wait_all_published(WAIT).await;
    let received = reader.read_at_least(800, WAIT).await;

    // THEN per aggregate, the first delivery of event n precedes that of n+1
    let mut next: BTreeMap<String, i64> = BTreeMap::new();
    for message in &received {
        let expected = next.entry(message.key.clone()).or_insert(0);
        let seq = message.seq();
        if seq >= *expected {
            assert_eq!(seq, *expected, "aggregate {} skipped ahead", message.key);
            *expected += 1;
        }
    }
    assert!(next.values().all(|n| *n == 40), "{next:?}");
    if broker == Broker::Kafka {
        let partitions: HashSet<i32> = received.iter().map(|m| m.partition).collect();
        assert!(partitions.len() > 1, "keys spread over partitions");
    }
}

pub async fn listen_wakes_the_relay_without_waiting_for_the_poll(broker: Broker) {
    // GIVEN a relay that polls only once an hour but listens for NOTIFY, and beside it a twin
    // without LISTEN or trigger (the control: it shows when polling alone would have come)
    let mut outbox = Outbox::for_broker(broker).await;
    outbox.relay.insert("poll_interval", "\"1h\"".to_owned());
    let mut twin = Outbox::for_broker(broker).await;
    twin.relay.insert("poll_interval", "\"1h\"".to_owned());
    twin.relay.insert("listen", "false".to_owned());
    twin.exec("drop trigger \"{table}_relay_notify\" on {table}")
        .await;
    let mut reader = outbox.reader("cart", 1).await;
    // (a destination for the twin's events too: RabbitMQ returns unroutable ones)
    let _twin_reader = twin.reader("cart", 1).await;
    let relay = outbox.start();
    let _twin_relay = twin.start();
    relay.wait_for_log("relay started", WAIT).await;
    // Make sure the first (startup) claim has come and gone, and let both sit idle long enough
    // for their adaptive polls to back off: 5 ms after the last claim that found rows, doubling,
    // polls come at 5.1 s and 10.2 s, so after 6 s idle the next one is 4 s away and only
    // NOTIFY can wake the first relay sooner.
    for o in [&outbox, &twin] {
        o.insert("cart", "c-0", 0..1).await;
        o.wait_all_published(Duration::from_secs(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(6)).await;

    // WHEN an application commits an event into both tables
    let started = std::time::Instant::now();
    outbox.insert("cart", "c-1", 0..1).await;
    twin.insert("cart", "c-1", 0..1).await;

    // THEN it is published promptly (far sooner than the poll interval)
    outbox.wait_all_published(Duration::from_secs(20)).await;
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(reader.read_at_least(2, WAIT).await.len(), 2);
    // AND sooner than polling alone would have: the twin has not published it yet
    let woken_after = started.elapsed();
    assert!(
        woken_after < Duration::from_secs(3),
        "woken after {woken_after:?}"
    );
    assert_eq!(
        twin.counts().await,
        (1, 2),
        "the twin polled within {woken_after:?}"
    );
}

pub async fn polling_alone_publishes_without_listen(broker: Broker) {
    // GIVEN a relay with LISTEN off and a table without the NOTIFY trigger
    let mut outbox = Outbox::for_broker(broker).await;
    outbox.relay.insert("listen", "false".to_owned());
    outbox
        .exec("drop trigger \"{table}_relay_notify\" on {table}")
        .await;
    let mut reader = outbox.reader("cart", 1).await;
    let _relay = outbox.start();
    // WHEN events are committed
    outbox.insert("cart", "c-1", 0..5).await;
    // THEN polling publishes them
    outbox.wait_all_published(WAIT).await;
    assert_eq!(reader.read_at_least(5, WAIT).await.len(), 5);
}

pub async fn runs_against_a_table_the_application_created(broker: Broker) {
    // GIVEN a table and lease table created by the application, with its own extra columns (no
    // migrate, no trigger)
    let mut outbox = Outbox::unmigrated().await;
    outbox.set_broker(broker).await;
    outbox.relay.insert("listen", "false".to_owned());
    outbox
        .exec(&format!(
            "create table {{table}} (
                id bigserial primary key, tenant text not null default 'acme',
                event_id uuid not null unique default gen_random_uuid(),
                aggregate_type varchar(64) not null, aggregate_id text not null, event_type text not null,
                payload jsonb not null, headers jsonb not null default '{{}}',
                created_at timestamptz not null default now(), {relay_columns});",
            relay_columns = crate::support::RELAY_COLUMNS_SQL
        ))
        .await;
    // the lease table as the README gives it for teams running their own migrations
    outbox.exec(crate::support::LEASE_TABLE_SQL).await;
    let mut reader = outbox.reader("invoice", 1).await;
    let _relay = outbox.start();
    outbox.insert("invoice", "inv-1", 0..3).await;
    outbox.wait_all_published(WAIT).await;
    let received = reader.read_at_least(3, WAIT).await;
    assert_eq!(
        received.iter().map(|m| m.seq()).collect::<Vec<_>>(),
        [0, 1, 2]
    );
}

pub async fn sigkill_mid_drain_then_restart_loses_nothing(broker: Broker) {
    // GIVEN 20 000 events and a relay with small batches and a short lease
    let mut outbox = Outbox::for_broker(broker).await;
    outbox.relay.insert("batch_size", "100".to_owned());
    outbox.relay.insert("lease_duration", "\"3s\"".to_owned());
    outbox
        .kafka_properties
        .insert("message.timeout.ms", "\"1000\"".to_owned());
    // (the lease must outlast two confirm timeouts: connect, then confirms)
    outbox
        .rabbitmq
        .insert("confirm_timeout", "\"1s\"".to_owned());
    let mut reader = outbox.reader("stock", 2).await;
    for aggregate in 0..50 {
        outbox
            .insert("stock", &format!("sku-{aggregate}"), 0..400)
            .await;
    }
    let total = 20_000;

    // WHEN the relay is SIGKILLed mid-drain and started again
    let mut relay = outbox.start();
    wait_until(WAIT, "part of the backlog published", || async {
        outbox.counts().await.0 >= 2_000
    })
    .await;
    relay.signal(Signal::SIGKILL);
    relay.wait_exit(Duration::from_secs(10)).await;
    let (published_at_kill, _) = outbox.counts().await;
    assert!(published_at_kill < total, "killed mid-drain");
    let _relay = outbox.start();

    // THEN every event is published and delivered, and order per aggregate holds
    outbox.wait_all_published(Duration::from_secs(120)).await;
    let received = reader.read_distinct(total as usize, WAIT).await;
    let distinct: HashSet<&str> = received.iter().map(|m| m.header("event_id")).collect();
    assert_eq!(distinct.len(), total as usize, "lost events");
    let duplicates = received.len() - distinct.len();
    assert!(
        duplicates <= 100 * 4,
        "duplicates bounded by the in-flight batch, got {duplicates}"
    );
    let mut next: BTreeMap<String, i64> = BTreeMap::new();
    for message in &received {
        let expected = next.entry(message.key.clone()).or_insert(0);
        if message.seq() >= *expected {
            assert_eq!(message.seq(), *expected, "order of {}", message.key);
            *expected += 1;
        }
    }
}

pub async fn sigterm_settles_the_in_flight_batch_and_exits_zero(broker: Broker) {
    // GIVEN a relay draining a backlog
    let mut outbox = Outbox::for_broker(broker).await;
    outbox.relay.insert("batch_size", "200".to_owned());
    outbox.relay.insert("lease_duration", "\"1h\"".to_owned());
    let mut reader = outbox.reader("ship", 1).await;
    for aggregate in 0..20 {
        outbox
            .insert("ship", &format!("s-{aggregate}"), 0..500)
            .await;
    }
    let mut relay = outbox.start();
    wait_until(WAIT, "part of the backlog published", || async {
        outbox.counts().await.0 >= 1_000
    })
    .await;

    // WHEN it receives SIGTERM
    relay.signal(Signal::SIGTERM);

    // THEN it exits 0 within the shutdown timeout
    let status = relay.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "exit status {status:?}: {}", relay.logs());
    // AND no row is left claimed (a lease of 1h would otherwise delay it)
    assert_eq!(outbox.leased().await, 0, "in-flight batch was settled");
    // AND every row marked published is in the broker
    let (published, _) = outbox.counts().await;
    let received = reader.read_distinct(published as usize, WAIT).await;
    assert!(received.len() as i64 >= published);
}

pub async fn a_broker_outage_does_not_use_up_attempts(broker: Broker) {
    // GIVEN a relay whose broker is unreachable and a short delivery timeout
    let mut outbox = Outbox::for_broker(broker).await;
    outbox.unreachable_broker();
    outbox
        .kafka_properties
        .insert("message.timeout.ms", "\"300\"".to_owned());
    outbox.retry.insert("max_attempts", "2".to_owned());
    outbox.insert("order", "o-1", 0..3).await;

    // WHEN it has tried to publish several times
    let (relay, metrics) = outbox.start_observed();
    relay.wait_for_log("broker unavailable", WAIT).await;
    wait_until(WAIT, "a few delivery attempts", || async {
        let failed = metric(
            metrics,
            "outbox_relay_publish_errors_total",
            &[("class", "transient")],
        )
        .await;
        failed.is_some_and(|n| n >= 9.0)
    })
    .await;

    // THEN no row used up an attempt or was dead-lettered, the error is recorded,
    // and the outage was logged once
    let rows: Vec<(i32, Option<String>, bool)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select attempts, last_error, dead_lettered_at is not null from {} order by id",
        outbox.table
    )))
    .fetch_all(&outbox.pool)
    .await
    .unwrap();
    let cause = match broker {
        Broker::Kafka => "timed out",
        Broker::RabbitMq => "refused",
    };
    for (attempts, last_error, dead) in rows {
        assert!(attempts <= 1, "attempts burnt: {attempts}");
        assert!(!dead);
        let last_error = last_error.expect("the outage is recorded on the row");
        assert!(last_error.contains(cause), "{last_error}");
    }
    let logs = relay.logs();
    assert_eq!(logs.matches("broker unavailable").count(), 1, "{logs}");
    assert!(
        !logs.contains("librdkafka"),
        "client library noise reaches the log: {logs}"
    );
}

pub async fn two_instances_publish_each_event_once_in_order(broker: Broker) {
    // GIVEN two relays on one table (sidecars of a scaled-out service) and small batches
    let mut outbox = Outbox::for_broker(broker).await;
    outbox.relay.insert("batch_size", "50".to_owned());
    let mut reader = outbox.reader("acct", 2).await;
    for aggregate in 0..30 {
        outbox
            .insert("acct", &format!("a-{aggregate}"), 0..100)
            .await;
    }
    let total = 3_000;

    // WHEN both drain the backlog, with more events arriving meanwhile
    let (first, first_metrics) = outbox.start_observed();
    let (second, second_metrics) = outbox.start_observed();
    for aggregate in 0..30 {
        outbox
            .insert("acct", &format!("a-{aggregate}"), 100..110)
            .await;
    }
    let total = total + 300;
    outbox.wait_all_published(WAIT).await;

    // THEN every event was published exactly once (no double publishing in normal operation)
    reader.read_distinct(total, WAIT).await;
    let received = reader.read_for(Duration::from_millis(500)).await;
    assert_eq!(received.len(), total, "no duplicates with two instances");
    // AND each aggregate's events arrived in order
    let mut next: BTreeMap<String, i64> = BTreeMap::new();
    for message in &received {
        let expected = next.entry(message.key.clone()).or_insert(0);
        assert_eq!(message.seq(), *expected, "order of {}", message.key);
        *expected += 1;
    }
    // AND both instances did part of the work
    for (relay, metrics) in [(&first, first_metrics), (&second, second_metrics)] {
        let published = metric(metrics, "outbox_relay_events_published_total", &[]).await;
        assert!(
            published.is_some_and(|n| n > 0.0),
            "an instance published nothing ({published:?}): {}",
            relay.logs()
        );
    }
}

/// How a hostile row must end on one broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ends {
    Published,
    DeadLettered,
}

pub async fn hostile_rows_end_published_or_dead_lettered_while_the_others_flow(broker: Broker) {
    // GIVEN ordinary rows, and rows holding values the table's columns accept but a broker may
    // not: lengths past AMQP's 255-byte short strings, control characters, any Unicode, every
    // JSON shape, empty strings, large values, headers that are not an object, a destination
    // that cannot exist. Two attempts, short back-off; the AMQP routing key leaves out the
    // event type, so a long event type reaches the message's `type` property.
    let mut outbox = Outbox::for_broker(broker).await;
    outbox.retry.insert("max_attempts", "2".to_owned());
    outbox
        .retry
        .insert("initial_backoff", "\"50ms\"".to_owned());
    outbox
        .rabbitmq
        .insert("routing_key", "\"{aggregate_type}\"".to_owned());
    let mut reader = outbox.reader("order", 1).await;
    outbox.insert("order", "ok-1", 0..10).await;
    let long = |c: &str, n: usize| c.repeat(n);
    use Ends::{DeadLettered as Dead, Published as Pub};
    // (aggregate_id, aggregate_type, event_type, payload, headers, Kafka, RabbitMQ)
    let hostile: Vec<(
        String,
        &str,
        String,
        serde_json::Value,
        serde_json::Value,
        Ends,
        Ends,
    )> = vec![
        (
            "long-event-type".into(),
            "order",
            long("x", 300),
            json!({}),
            json!({}),
            Pub,
            Dead,
        ),
        (
            "long-header-name".into(),
            "order",
            "e".into(),
            json!({}),
            json!({ long("h", 300): "v" }),
            Pub,
            Dead,
        ),
        (
            "control-chars".into(),
            "order",
            "a\u{1}b\tc\u{1b}[31m".into(),
            json!({"s": "\u{7}\u{1f}"}),
            json!({"k\u{1}": "v\u{1b}"}),
            Pub,
            Pub,
        ),
        (
            String::new(),
            "order",
            String::new(),
            json!({}),
            json!({"": ""}),
            Pub,
            Pub,
        ),
        (
            "ключ-🚀".into(),
            "order",
            "créé".into(),
            json!({"名前": "値"}),
            json!({"emoji🚀": "値"}),
            Pub,
            Pub,
        ),
        (
            "json-shapes".into(),
            "order",
            "e".into(),
            json!([1, "two", null, {"a": []}]),
            json!({"n": 1, "o": {"x": [1, 2]}, "z": null, "b": true}),
            Pub,
            Pub,
        ),
        (
            "scalar-payload".into(),
            "order",
            "e".into(),
            json!("just text"),
            json!({}),
            Pub,
            Pub,
        ),
        (
            "headers-not-an-object".into(),
            "order",
            "e".into(),
            json!({}),
            json!([1, 2]),
            Dead,
            Dead,
        ),
        (
            "large".into(),
            "order",
            "e".into(),
            json!({"blob": long("z", 512 * 1024)}),
            json!({"v": long("y", 64 * 1024)}),
            Pub,
            Pub,
        ),
        (
            "long-aggregate-id-".to_owned() + &long("k", 10_000),
            "order",
            "e".into(),
            json!({}),
            json!({}),
            Pub,
            Pub,
        ),
        (
            "impossible-destination".into(),
            "or der\u{1}",
            "e".into(),
            json!({}),
            json!({}),
            Dead,
            Dead,
        ),
    ];
    for (aggregate_id, aggregate_type, event_type, payload, headers, _, _) in &hostile {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "insert into {} (aggregate_type, aggregate_id, event_type, payload, headers)
             values ($1, $2, $3, $4, $5)",
            outbox.table
        )))
        .bind(aggregate_type)
        .bind(aggregate_id)
        .bind(event_type)
        .bind(payload)
        .bind(headers)
        .execute(&outbox.pool)
        .await
        .unwrap();
    }

    // WHEN the relay runs
    let mut relay = outbox.start();

    // THEN every row ends published or dead-lettered with its reason, and nothing else
    outbox.wait_all_settled(WAIT).await;
    for (aggregate_id, _, _, _, _, kafka, rabbitmq) in &hostile {
        let expected = match broker {
            Broker::Kafka => *kafka,
            Broker::RabbitMq => *rabbitmq,
        };
        let (published, dead, last_error): (bool, bool, Option<String>) =
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "select published_at is not null, dead_lettered_at is not null, last_error
                 from {} where aggregate_id = $1",
                outbox.table
            )))
            .bind(aggregate_id)
            .fetch_one(&outbox.pool)
            .await
            .unwrap();
        let label: String = aggregate_id.chars().take(30).collect();
        match expected {
            Ends::Published => assert!(published, "{label:?} published"),
            Ends::DeadLettered => {
                assert!(dead, "{label:?} dead-lettered");
                assert!(
                    last_error.is_some_and(|e| !e.is_empty()),
                    "{label:?} has its reason"
                );
            }
        }
    }
    // AND the ordinary rows arrived in order, and so did the hostile ones that were published
    let published: i64 = outbox
        .scalar("select count(*) from {table} where published_at is not null")
        .await;
    let received = reader.read_distinct(published as usize, WAIT).await;
    let ordinary: Vec<i64> = received
        .iter()
        .filter(|m| m.key == "ok-1")
        .map(|m| m.seq())
        .collect();
    assert_eq!(ordinary, (0..10).collect::<Vec<_>>());
    if broker == Broker::RabbitMq {
        let dead_reason: String = outbox
            .scalar("select last_error from {table} where aggregate_id = 'long-event-type'")
            .await;
        assert!(dead_reason.contains("AMQP short string"), "{dead_reason}");
    }
    // AND the relay never went down: it stops cleanly on SIGTERM
    relay.signal(Signal::SIGTERM);
    assert!(relay.wait_exit(Duration::from_secs(15)).await.success());
    assert!(!relay.logs().contains("panicked"), "{}", relay.logs());
}
