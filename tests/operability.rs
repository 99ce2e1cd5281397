//! Operating the relay: health and metrics endpoints, as a sidecar's probes and Prometheus see
//! them.

use std::time::Duration;

use crate::support::rabbit;
use crate::support::{Broker, Outbox, free_address, http_get, metric_value, wait_until};

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread")]
async fn metrics_and_health_follow_the_events() {
    // GIVEN a relay with the HTTP listener on
    let mut outbox = Outbox::for_broker(Broker::Kafka).await;
    let addr = free_address();
    outbox.http = Some(addr);
    let _reader = outbox.reader("order", 1).await;
    let _relay = outbox.start();

    // THEN it is alive and, once it has reached the database, ready
    wait_until(WAIT, "/healthz answers 200", || async {
        http_get(addr, "/healthz").await.map(|r| r.0) == Some(200)
    })
    .await;
    wait_until(WAIT, "/readyz answers 200", || async {
        http_get(addr, "/readyz").await.map(|r| r.0) == Some(200)
    })
    .await;

    // WHEN events flow
    outbox.insert("order", "o-1", 0..12).await;
    outbox.wait_all_published(WAIT).await;

    // THEN the counters, the latency histogram and the backlog gauges move
    let topic = outbox.topic("order");
    wait_until(WAIT, "published counter reaches 12", || async {
        let Some((200, body)) = http_get(addr, "/metrics").await else {
            return false;
        };
        metric_value(
            &body,
            "outbox_relay_events_published_total",
            &[("sink", "kafka"), ("destination", &topic)],
        ) == Some(12.0)
    })
    .await;
    let (_, body) = http_get(addr, "/metrics").await.unwrap();
    assert_eq!(
        metric_value(
            &body,
            "outbox_relay_publish_latency_seconds_count",
            &[("sink", "kafka")]
        ),
        Some(12.0),
        "{body}"
    );
    assert!(metric_value(&body, "outbox_relay_batch_size_count", &[]).unwrap() >= 1.0);
    assert_eq!(metric_value(&body, "outbox_relay_ready", &[]), Some(1.0));
    wait_until(Duration::from_secs(30), "pending gauge at 0", || async {
        let (_, body) = http_get(addr, "/metrics").await.unwrap_or_default();
        metric_value(&body, "outbox_relay_pending_rows", &[]) == Some(0.0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_turns_false_while_the_broker_is_down_and_true_after() {
    // GIVEN exclusive use of RabbitMQ and a ready relay with the HTTP listener on
    let mut outbox = Outbox::unmigrated().await;
    outbox.exclusive_rabbitmq().await;
    outbox.migrate().success();
    let addr = free_address();
    outbox.http = Some(addr);
    let queue = outbox.bind_queue("order").await;
    let relay = outbox.start();
    wait_until(WAIT, "ready", || async {
        http_get(addr, "/readyz").await.map(|r| r.0) == Some(200)
    })
    .await;

    // WHEN RabbitMQ stops
    tokio::task::block_in_place(|| rabbit::rabbitmqctl(&["stop_app"]));
    let restart = RestartOnDrop;

    // THEN readiness turns false (liveness stays true), with the reason
    wait_until(WAIT, "/readyz answers 503", || async {
        http_get(addr, "/readyz").await.map(|r| r.0) == Some(503)
    })
    .await;
    let (_, reason) = http_get(addr, "/readyz").await.unwrap();
    assert!(reason.contains("broker unavailable"), "{reason}");
    assert_eq!(http_get(addr, "/healthz").await.map(|r| r.0), Some(200));

    // AND once RabbitMQ is back, the relay is ready again and delivers what was written meanwhile
    outbox.insert("order", "o-1", 0..3).await;
    drop(restart);
    wait_until(WAIT, "/readyz answers 200 again", || async {
        http_get(addr, "/readyz").await.map(|r| r.0) == Some(200)
    })
    .await;
    outbox.wait_all_published(WAIT).await;
    let mut reader =
        crate::support::Reader::RabbitMq(Box::new(rabbit::QueueReader::new(&queue).await));
    reader.read_distinct(3, WAIT).await;
    assert!(relay.logs().contains("broker available again"));
    let (_, body) = http_get(addr, "/metrics").await.unwrap();
    let labels = [("dependency", "broker")];
    assert_eq!(
        metric_value(&body, "outbox_relay_outages_total", &labels),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&body, "outbox_relay_reconnects_total", &labels),
        Some(1.0)
    );
}

/// Starts RabbitMQ again when the test ends, even on failure.
struct RestartOnDrop;

impl Drop for RestartOnDrop {
    fn drop(&mut self) {
        rabbit::rabbitmqctl(&["start_app"]);
        rabbit::rabbitmqctl(&["await_startup"]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_deletes_only_old_published_and_old_dead_rows_while_the_relay_runs() {
    // GIVEN rows published 8 days ago (more than one delete batch), rows published just now,
    // old pending rows, and rows dead-lettered 8 days and 1 hour ago
    let mut outbox = Outbox::for_broker(Broker::Kafka).await;
    outbox.retention.insert("published", "\"7d\"".to_owned());
    outbox.retention.insert("dead", "\"1d\"".to_owned());
    outbox.retention.insert("interval", "\"200ms\"".to_owned());
    outbox.retention.insert("batch_size", "500".to_owned());
    let _reader = outbox.reader("order", 1).await;
    outbox.insert("order", "old", 0..1_200).await;
    outbox.insert("order", "recent", 0..5).await;
    outbox.insert("order", "pending", 0..3).await;
    outbox.insert("order", "dead-old", 0..2).await;
    outbox.insert("order", "dead-recent", 0..2).await;
    outbox
        .exec(
            "update {table} set published_at = now() - interval '8 days' where aggregate_id = 'old';
             update {table} set published_at = now() where aggregate_id = 'recent';
             update {table} set created_at = now() - interval '30 days' where aggregate_id = 'pending';
             update {table} set dead_lettered_at = now() - interval '8 days' where aggregate_id = 'dead-old';
             update {table} set dead_lettered_at = now() - interval '1 hour' where aggregate_id = 'dead-recent';",
        )
        .await;

    // WHEN the relay runs with retention (published 7d, dead 1d)
    let relay = outbox.start();
    let count = |aggregate: &'static str| {
        let outbox = &outbox;
        async move {
            sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!(
                "select count(*) from {} where aggregate_id = $1",
                outbox.table
            )))
            .bind(aggregate)
            .fetch_one(&outbox.pool)
            .await
            .unwrap()
        }
    };
    wait_until(WAIT, "old published rows deleted", || async {
        count("old").await == 0 && count("dead-old").await == 0
    })
    .await;

    // THEN only those were deleted; the pending rows were published meanwhile and kept
    assert_eq!(count("recent").await, 5);
    assert_eq!(count("dead-recent").await, 2);
    wait_until(WAIT, "pending rows published", || async {
        outbox
            .scalar::<i64>("select count(published_at) from {table} where aggregate_id = 'pending'")
            .await
            == 3
    })
    .await;
    assert_eq!(count("pending").await, 3);
    relay
        .wait_for_log(
            "retention deleted old rows rows=1200 kind=\"published\"",
            WAIT,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_relay_runs_with_only_the_documented_grants() {
    // GIVEN a table migrated by its owner, and a role with exactly the README's grants
    let mut outbox = Outbox::for_broker(Broker::Kafka).await;
    let role = crate::support::unique("relay_role");
    outbox
        .exec(&format!(
            "create role {role} login;
             grant connect on database {db} to {role};
             grant usage on schema public to {role};
             grant select (id, event_id, aggregate_type, aggregate_id, event_type, payload, headers,
                           created_at, published_at, attempts, next_attempt_at, last_error,
                           dead_lettered_at, unsettled_attempts, deferrals)
                 on {{table}} to {role};
             grant update (published_at, attempts, next_attempt_at, last_error, dead_lettered_at,
                           unsettled_attempts, deferrals)
                 on {{table}} to {role};
             grant delete on {{table}} to {role};
             grant select, insert, update, delete on {{leases}} to {role};
             grant select, insert, update on {{table}}_topic_partitions to {role};
             grant select, insert, update, delete on {{table}}_awake to {role};",
            db = crate::support::TEST_DATABASE,
        ))
        .await;
    outbox.retention.insert("published", "\"1s\"".to_owned());
    outbox.retention.insert("interval", "\"200ms\"".to_owned());
    let mut reader = outbox.reader("order", 1).await;
    let config = std::fs::read_to_string(outbox.config_file())
        .unwrap()
        .replace("postgres://postgres@", &format!("postgres://{role}@"));
    let path = outbox.dir.path().join("least-privilege.toml");
    std::fs::write(&path, config).unwrap();

    // WHEN that role checks the table and relays events (with retention on)
    let check = crate::support::run_binary(&path, &["check"], &[]);
    assert_eq!(check.code(), Some(0), "{check:?}");
    let status = crate::support::run_binary(&path, &["status"], &[]);
    assert_eq!(status.code(), Some(0), "{status:?}");
    let relay = crate::support::RelayProcess::start(path, outbox.dir.path().join("lp.log"));
    outbox.insert("order", "o-1", 0..20).await;

    // THEN everything is published, and later deleted by retention, without a privilege error
    reader.read_distinct(20, WAIT).await;
    wait_until(WAIT, "published rows deleted by retention", || async {
        outbox.counts().await == (0, 0)
    })
    .await;
    let logs = relay.logs();
    assert!(!logs.contains("permission denied"), "{logs}");
    drop(relay);
    outbox
        .exec(&format!("drop owned by {role}; drop role {role};"))
        .await;
}
