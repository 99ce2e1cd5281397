//! End to end: outbox rows → `outbox-relay run` → a real Kafka-protocol broker.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::support::{Outbox, TopicReader, wait_until};

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread")]
async fn committed_events_arrive_as_contracted_and_rolled_back_ones_never() {
    // GIVEN an outbox, a topic, and events written in application transactions, some rolled back
    let outbox = Outbox::new().await;
    let mut reader = TopicReader::create(&outbox.topic("order"), 1).await;
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
    reader.read_at_least(committed.len(), WAIT);
    reader.read_for(Duration::from_millis(500));
    let received = reader.received.clone();
    assert_eq!(
        received.len(),
        committed.len(),
        "no duplicates, no rolled-back events"
    );
    for message in &received {
        let seq = committed[message.header("event_id")];
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
    let unmarked: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select count(*) from {} where published_at is null or attempts <> 1 or next_attempt_at is not null",
        outbox.table
    )))
    .fetch_one(&outbox.pool)
    .await
    .unwrap();
    assert_eq!(unmarked, 0);

    // AND SIGTERM stops the relay with exit code 0
    relay.signal(Signal::SIGTERM);
    assert!(relay.wait_exit(Duration::from_secs(15)).await.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn events_of_an_aggregate_arrive_in_id_order() {
    // GIVEN 20 aggregates × 40 events, interleaved, on a 3-partition topic, and small batches
    let mut outbox = Outbox::new().await;
    outbox.relay.insert("batch_size", "37".to_owned());
    let mut reader = TopicReader::create(&outbox.topic("account"), 3).await;
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
    let received = reader.read_at_least(800, WAIT).to_vec();

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
    let partitions: HashSet<i32> = received.iter().map(|m| m.partition).collect();
    assert!(partitions.len() > 1, "keys spread over partitions");
}

#[tokio::test(flavor = "multi_thread")]
async fn listen_wakes_the_relay_without_waiting_for_the_poll() {
    // GIVEN a relay that polls only once an hour but listens for NOTIFY
    let mut outbox = Outbox::new().await;
    outbox.relay.insert("poll_interval", "\"1h\"".to_owned());
    let mut reader = TopicReader::create(&outbox.topic("cart"), 1).await;
    let relay = outbox.start();
    relay.wait_for_log("relay started", WAIT).await;
    // Make sure the first (startup) claim has come and gone, so only NOTIFY can wake it.
    outbox.insert("cart", "c-0", 0..1).await;
    outbox.wait_all_published(Duration::from_secs(20)).await;

    // WHEN an application commits an event
    let started = std::time::Instant::now();
    outbox.insert("cart", "c-1", 0..1).await;

    // THEN it is published promptly (far sooner than the poll interval)
    outbox.wait_all_published(Duration::from_secs(20)).await;
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(reader.read_at_least(2, WAIT).len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn polling_alone_publishes_without_listen() {
    // GIVEN a relay with LISTEN off and a table without the NOTIFY trigger
    let mut outbox = Outbox::new().await;
    outbox.relay.insert("listen", "false".to_owned());
    outbox
        .exec("drop trigger \"{table}_relay_notify\" on {table}")
        .await;
    let mut reader = TopicReader::create(&outbox.topic("cart"), 1).await;
    let _relay = outbox.start();
    // WHEN events are committed
    outbox.insert("cart", "c-1", 0..5).await;
    // THEN polling publishes them
    outbox.wait_all_published(WAIT).await;
    assert_eq!(reader.read_at_least(5, WAIT).len(), 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn runs_against_a_table_the_application_created() {
    // GIVEN a table created by the application with its own extra columns (no migrate, no trigger)
    let mut outbox = Outbox::unmigrated().await;
    outbox.relay.insert("listen", "false".to_owned());
    outbox
        .exec(
            "create table {table} (
                id bigserial primary key, tenant text not null default 'acme',
                event_id uuid not null unique default gen_random_uuid(),
                aggregate_type varchar(64) not null, aggregate_id text not null, event_type text not null,
                payload jsonb not null, headers jsonb not null default '{}',
                created_at timestamptz not null default now(), published_at timestamptz,
                attempts integer not null default 0, next_attempt_at timestamptz,
                last_error text, dead_lettered_at timestamptz)",
        )
        .await;
    let mut reader = TopicReader::create(&outbox.topic("invoice"), 1).await;
    let _relay = outbox.start();
    outbox.insert("invoice", "inv-1", 0..3).await;
    outbox.wait_all_published(WAIT).await;
    let received = reader.read_at_least(3, WAIT);
    assert_eq!(
        received.iter().map(|m| m.seq()).collect::<Vec<_>>(),
        [0, 1, 2]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_drain_then_restart_loses_nothing() {
    // GIVEN 20 000 events and a relay with small batches and a short lease
    let mut outbox = Outbox::new().await;
    outbox.relay.insert("batch_size", "100".to_owned());
    outbox.relay.insert("lease_duration", "\"3s\"".to_owned());
    outbox
        .kafka_properties
        .insert("message.timeout.ms", "\"1000\"".to_owned());
    let mut reader = TopicReader::create(&outbox.topic("stock"), 2).await;
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
    let received = reader.read_at_least(total as usize, WAIT).to_vec();
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

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_settles_the_in_flight_batch_and_exits_zero() {
    // GIVEN a relay draining a backlog
    let mut outbox = Outbox::new().await;
    outbox.relay.insert("batch_size", "200".to_owned());
    outbox.relay.insert("lease_duration", "\"1h\"".to_owned());
    let mut reader = TopicReader::create(&outbox.topic("ship"), 1).await;
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
    let leased: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select count(*) from {} where published_at is null and next_attempt_at > now()",
        outbox.table
    )))
    .fetch_one(&outbox.pool)
    .await
    .unwrap();
    assert_eq!(leased, 0, "in-flight batch was settled");
    // AND every row marked published is in the broker
    let (published, _) = outbox.counts().await;
    let received = reader.read_at_least(published as usize, WAIT);
    assert!(received.len() as i64 >= published);
}

#[tokio::test(flavor = "multi_thread")]
async fn rejected_rows_are_retried_with_backoff_then_dead_lettered_while_others_flow() {
    // GIVEN a producer limit of 20 000 bytes per message, 5 attempts, and in the outbox:
    // an oversized event and a successor of the same aggregate, an event whose topic is
    // invalid, and ordinary events of other aggregates
    let mut outbox = Outbox::new().await;
    outbox.retry.insert("max_attempts", "5".to_owned());
    outbox
        .retry
        .insert("initial_backoff", "\"400ms\"".to_owned());
    outbox.retry.insert("max_backoff", "\"10s\"".to_owned());
    outbox
        .kafka_properties
        .insert("message.max.bytes", "\"20000\"".to_owned());
    let mut reader = TopicReader::create(&outbox.topic("doc"), 1).await;
    outbox
        .exec(
            "insert into {table} (aggregate_type, aggregate_id, event_type, payload)
             values ('doc', 'big', 'uploaded', jsonb_build_object('seq', 0, 'blob', repeat('x', 50000))),
                    ('doc', 'big', 'renamed', '{\"seq\": 1}'),
                    ('bad type', 'weird', 'created', '{\"seq\": 0}')",
        )
        .await;
    for aggregate in 0..5 {
        outbox
            .insert("doc", &format!("ok-{aggregate}"), 0..10)
            .await;
    }

    // WHEN the relay runs
    let relay = outbox.start();

    // THEN the ordinary events flow at once, and the big aggregate's successor is held back
    let received = reader.read_at_least(50, WAIT).to_vec();
    assert!(received.iter().all(|m| m.key.starts_with("ok-")));
    let state = |aggregate: &'static str, seq: i64| {
        let pool = outbox.pool.clone();
        let table = outbox.table.clone();
        async move {
            sqlx::query_as::<
                _,
                (
                    i32,
                    Option<chrono::DateTime<chrono::Utc>>,
                    Option<String>,
                    bool,
                    bool,
                ),
            >(sqlx::AssertSqlSafe(format!(
                "select attempts, next_attempt_at, last_error, dead_lettered_at is not null,
                            published_at is not null
                     from {table} where aggregate_id = $1 and (payload->>'seq')::int = $2"
            )))
            .bind(aggregate)
            .bind(seq as i32)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };

    // AND the oversized row is retried with growing delays, then dead-lettered with its reason
    // Last observed `next_attempt_at` per attempt count: after the claim it holds the lease,
    // after the failure the retry time, which is what stays until the next claim.
    let mut schedule = BTreeMap::new();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (attempts, next_at, _, dead, _) = state("big", 0).await;
        if let Some(next_at) = next_at {
            schedule.insert(attempts, next_at);
        }
        // the successor must not overtake while its predecessor waits
        let (_, _, _, _, successor_published) = state("big", 1).await;
        assert!(
            dead || !successor_published,
            "successor overtook its predecessor"
        );
        if dead {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "oversized row not dead-lettered: {schedule:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (attempts, _, last_error, dead, published) = state("big", 0).await;
    assert!(dead && !published);
    assert_eq!(attempts, 5);
    let last_error = last_error.unwrap();
    assert!(last_error.contains("size"), "{last_error}");
    // The retry times grow further apart: the gap before the 4th retry is at least twice the
    // base delay of the 2nd (equal jitter: delay n lies in [base n / 2, base n]).
    let gap = |n: i32| schedule[&n] - schedule[&(n - 1)];
    assert!(gap(4) > gap(2), "backoff grows: {schedule:?}");

    // AND the invalid-topic row is dead-lettered too, naming the constraint
    wait_until(WAIT, "invalid-topic row dead-lettered", || async {
        state("weird", 0).await.3
    })
    .await;
    assert!(
        state("weird", 0)
            .await
            .2
            .unwrap()
            .contains("invalid destination")
    );

    // AND after the dead letter, the held-back successor is published
    wait_until(WAIT, "successor published", || async {
        state("big", 1).await.4
    })
    .await;
    let received = reader.read_at_least(51, WAIT);
    assert!(received.iter().any(|m| m.key == "big" && m.seq() == 1));

    // AND each dead letter was logged as an error with its event id
    let event_id: uuid::Uuid = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select event_id from {} where aggregate_id = 'big' and (payload->>'seq')::int = 0",
        outbox.table
    )))
    .fetch_one(&outbox.pool)
    .await
    .unwrap();
    relay
        .wait_for_log(&format!("event dead-lettered event_id={event_id}"), WAIT)
        .await;
    assert!(
        !relay.logs().contains("xxxxxxxxxx"),
        "payloads are never logged"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_outage_does_not_use_up_attempts() {
    // GIVEN a relay whose broker is unreachable and a short delivery timeout
    let mut outbox = Outbox::new().await;
    outbox.kafka.insert("brokers", "\"127.0.0.1:1\"".to_owned());
    outbox
        .kafka_properties
        .insert("message.timeout.ms", "\"300\"".to_owned());
    outbox.retry.insert("max_attempts", "2".to_owned());
    outbox.insert("order", "o-1", 0..3).await;

    // WHEN it has tried to publish several times
    let relay = outbox.start();
    relay.wait_for_log("broker unavailable", WAIT).await;
    wait_until(WAIT, "a few delivery attempts", || async {
        relay.logs().matches("publish failed transiently").count() >= 9
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
    for (attempts, last_error, dead) in rows {
        assert!(attempts <= 1, "attempts burnt: {attempts}");
        assert!(!dead);
        assert!(last_error.unwrap().contains("timed out"));
    }
    assert_eq!(relay.logs().matches("broker unavailable").count(), 1);
}
