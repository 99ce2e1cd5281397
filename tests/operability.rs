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
}

/// Starts RabbitMQ again when the test ends, even on failure.
struct RestartOnDrop;

impl Drop for RestartOnDrop {
    fn drop(&mut self) {
        rabbit::rabbitmqctl(&["start_app"]);
        rabbit::rabbitmqctl(&["await_startup"]);
    }
}
