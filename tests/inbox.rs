//! The inbox (the consumer half): messages from Kafka or RabbitMQ into the inbox table, once
//! each per consumer, acknowledged only after the commit, poison messages set aside.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::support::inbox::{Inbox, Message, declare_queue, produce, publish, queue_depth};
use crate::support::kafka::create_topic;
use crate::support::{Broker, WAIT, metric, unique, wait_until};

/// The offsets the group committed on `topic`'s partitions `0..partitions`.
fn committed(group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", crate::support::kafka_brokers())
        .set("group.id", group)
        .create()
        .expect("consumer");
    let mut list = TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(list, Duration::from_secs(10))
        .expect("committed offsets");
    (0..partitions)
        .map(
            |p| match committed.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => -1,
            },
        )
        .collect()
}

fn without_id(body: &[u8]) -> Message {
    Message {
        key: "poison".to_owned(),
        headers: vec![("note".to_owned(), "no id".to_owned())],
        message_id: None,
        body: body.to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_messages_land_once_each_in_partition_order_and_poison_is_set_aside() {
    // GIVEN a topic of 3 partitions holding 300 events of 10 aggregates, 30 of them sent
    // twice (a producer's retry), a message without an event id and one over the size limit
    let topic = unique("inbox-orders");
    create_topic(&topic, 3).await;
    let events = Message::stream(10, 0..30);
    produce(&topic, &events[..150]).await;
    produce(&topic, &events[120..150]).await;
    produce(&topic, &[without_id(b"{\"no\":\"id\"}")]).await;
    let mut big = Message::event("big", 0);
    big.body = vec![b'x'; 5000];
    produce(&topic, &[big]).await;
    produce(&topic, &events[150..]).await;
    let mut inbox = Inbox::new(Broker::Kafka, vec![topic.clone()]).await;
    inbox.keys.insert("max_message_bytes", "4096".to_owned());

    // WHEN the inbox runs
    let (process, http) = inbox.start_observed();
    inbox.wait_rows(300, WAIT).await;
    wait_until(WAIT, "both poison messages recorded", || async {
        inbox.rejected().await == 2
    })
    .await;

    // THEN every event is there once, each aggregate in its order, the repeats were skipped,
    // the poison messages are recorded with their reason, and the group's offsets reached
    // the end of every partition
    inbox.assert_exactly(&events).await;
    assert_eq!(inbox.duplicates().await, 30);
    let reasons: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select reason from {}_rejected order by id",
        inbox.table
    )))
    .fetch_all(&inbox.pool)
    .await
    .unwrap();
    assert!(
        reasons.iter().any(|r| r.starts_with("no event id")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("exceeds inbox.max_message_bytes")),
        "{reasons:?}"
    );
    let body_kept = inbox
        .scalar(
            "select count(*) from {t}_rejected where body = convert_to('{\"no\":\"id\"}', 'UTF8')",
        )
        .await;
    assert_eq!(body_kept, 1, "the rejected message's body is kept verbatim");
    let typed: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select count(*) from {} where payload->>'seq' = headers->>'seq'
         and event_type = 'happened' and aggregate_type = 'order' and body is null
         and source = $1 and \"offset\" is not null and \"partition\" is not null",
        inbox.table
    )))
    .bind(&topic)
    .fetch_one(&inbox.pool)
    .await
    .unwrap();
    assert_eq!(typed, 300, "payload, headers and identity columns as sent");
    // (tansu's watermarks are not reliable; the offsets written are)
    let mut written: Vec<i64> = Vec::new();
    for p in 0..3 {
        let last = inbox
            .scalar(&format!(
                "select coalesce(max(o), -1) from (select \"offset\" o from {{t}} where \"partition\" = {p}
                 union all select \"offset\" from {{t}}_rejected where \"partition\" = {p}) x"
            ))
            .await;
        written.push(last + 1);
    }
    assert_eq!(
        written.iter().sum::<i64>(),
        332,
        "every message of the topic recorded"
    );
    wait_until(
        WAIT,
        "offsets committed one past the last message written",
        || async { committed(&inbox.consumer, &topic, 3) == written },
    )
    .await;
    let duplicate = metric(
        http,
        "outbox_relay_inbox_messages_total",
        &[("result", "duplicate")],
    )
    .await;
    assert_eq!(duplicate, Some(30.0), "the repeats are counted");

    // AND status reports the inbox
    let status = inbox.command(&["status", "--json"]).success();
    let json: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(json["inbox"]["status"]["waiting"], 300, "{json}");
    assert_eq!(json["inbox"]["status"]["rejected"], 2, "{json}");
    assert_eq!(json["inbox"]["status"]["duplicates_skipped"], 30, "{json}");
    assert!(json.get("table").is_none(), "no outbox configured: {json}");
    drop(process);
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_messages_land_once_each_in_queue_order_and_are_acknowledged() {
    // GIVEN a queue holding 200 events, 20 of them twice, one identified only by its AMQP
    // message_id, and one without any id
    let _guard = crate::support::rabbit::Guard::shared().await;
    let queue = declare_queue().await;
    let events = Message::stream(5, 0..40);
    publish(&queue, &events[..100]).await;
    publish(&queue, &events[80..100]).await;
    let mut by_property = Message::event("amqp", 0);
    by_property.headers.retain(|(n, _)| n != "event_id");
    by_property.message_id = Some("amqp-message-1".to_owned());
    publish(&queue, &[by_property, without_id(b"not json")]).await;
    publish(&queue, &events[100..]).await;
    let inbox = Inbox::new(Broker::RabbitMq, vec![queue.clone()]).await;

    // WHEN the inbox runs
    let _process = inbox.start();
    inbox.wait_rows(201, WAIT).await;
    wait_until(
        WAIT,
        "the queue emptied and every delivery acknowledged",
        || async { queue_depth(&queue) == (0, 0) },
    )
    .await;

    // THEN each event is there once in queue order, the message_id one too, the one without
    // an id is rejected with its body, and the repeats were skipped
    let mut expected = events.clone();
    let mut amqp = Message::event("amqp", 0);
    amqp.headers[0].1 = "amqp-message-1".to_owned();
    expected.push(amqp);
    inbox.assert_exactly(&expected).await;
    assert_eq!(inbox.rejected().await, 1);
    assert_eq!(inbox.duplicates().await, 20);
    let verbatim = inbox
        .scalar("select count(*) from {t}_rejected where body = 'not json'::bytea")
        .await;
    assert_eq!(verbatim, 1);
}

/// SIGKILLs the process three times while `expected` keeps arriving, restarting it each
/// time; returns how long each restart took to write its first new row.
async fn killed_three_times(inbox: &Inbox, expected: &[Message]) -> Vec<Duration> {
    let total = expected.len() as i64;
    let mut process = inbox.start();
    let mut resumed = Vec::new();
    for cut in [total / 5, total / 2, total * 4 / 5] {
        inbox.wait_rows(cut, WAIT).await;
        process.signal(Signal::SIGKILL);
        process.kill();
        let before = inbox.rows().await;
        assert!(
            before < total,
            "the fault: killed mid-stream ({before} of {total})"
        );
        let restarted = Instant::now();
        process = inbox.start();
        wait_until(WAIT, "the restarted inbox writing", || async {
            inbox.rows().await > before
        })
        .await;
        resumed.push(restarted.elapsed());
    }
    inbox.wait_rows(total, WAIT).await;
    drop(process);
    resumed
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_inbox_sigkilled_three_times_mid_stream_holds_every_event_once() {
    // GIVEN 4 000 events arriving over time on a topic of 3 partitions, and an inbox with the
    // default session timeout (the restart-within-30-s promise)
    let topic = unique("inbox-killed");
    create_topic(&topic, 3).await;
    let events = Message::stream(20, 0..200);
    let mut inbox = Inbox::new(Broker::Kafka, vec![topic.clone()]).await;
    inbox.source_keys.remove("session_timeout");
    inbox.keys.insert("batch_size", "100".to_owned());
    let producer = {
        let (topic, events) = (topic.clone(), events.clone());
        tokio::spawn(async move {
            for chunk in events.chunks(100) {
                produce(&topic, chunk).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // WHEN the inbox is SIGKILLed three times mid-stream and restarted each time
    let resumed = killed_three_times(&inbox, &events).await;
    producer.await.unwrap();
    inbox.wait_rows(events.len() as i64, WAIT).await;

    // THEN every event is there exactly once, in order per aggregate, and each restart
    // resumed within 30 s
    inbox.assert_exactly(&events).await;
    for took in &resumed {
        assert!(*took < Duration::from_secs(30), "resumed after {took:?}");
    }
    eprintln!(
        "kafka inbox killed 3 times: resumed after {resumed:?}, {} duplicates skipped",
        inbox.duplicates().await
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_inbox_sigkilled_three_times_mid_stream_holds_every_event_once() {
    // GIVEN 3 000 events arriving over time on one queue
    let _guard = crate::support::rabbit::Guard::shared().await;
    let queue = declare_queue().await;
    let events = Message::stream(10, 0..300);
    let mut inbox = Inbox::new(Broker::RabbitMq, vec![queue.clone()]).await;
    inbox.keys.insert("batch_size", "100".to_owned());
    let producer = {
        let (queue, events) = (queue.clone(), events.clone());
        tokio::spawn(async move {
            for chunk in events.chunks(100) {
                publish(&queue, chunk).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // WHEN the inbox is SIGKILLed three times mid-stream and restarted each time
    let resumed = killed_three_times(&inbox, &events).await;
    producer.await.unwrap();
    inbox.wait_rows(events.len() as i64, WAIT).await;

    // THEN every event is there exactly once, in queue order per aggregate, and nothing is
    // left unacknowledged
    inbox.assert_exactly(&events).await;
    wait_until(WAIT, "every delivery acknowledged", || async {
        queue_depth(&queue) == (0, 0)
    })
    .await;
    eprintln!(
        "rabbitmq inbox killed 3 times: resumed after {resumed:?}, {} duplicates skipped",
        inbox.duplicates().await
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_with_only_an_inbox_creates_only_the_inbox_tables_and_check_finds_a_missing_topic()
{
    // GIVEN a configuration with only [inbox], on a topic that does not exist
    let missing = unique("inbox-missing");
    let inbox = Inbox::unmigrated(Broker::Kafka, vec![missing.clone()]).await;

    // WHEN it is migrated
    let out = inbox.command(&["migrate"]).success();

    // THEN the inbox tables exist and no outbox table was made
    assert!(out.stdout.contains("inbox table"), "{}", out.stdout);
    for (table, exists) in [
        (inbox.table.clone(), true),
        (format!("{}_rejected", inbox.table), true),
        ("outbox".to_owned(), false),
    ] {
        let found: bool = sqlx::query_scalar("select to_regclass($1) is not null")
            .bind(&table)
            .fetch_one(&inbox.pool)
            .await
            .unwrap();
        if table == "outbox" {
            // Another test may have created the default table in the shared database; what
            // matters is that this migrate did not report one.
            assert!(!out.stdout.contains("table outbox"), "{}", out.stdout);
        } else {
            assert_eq!(found, exists, "{table}");
        }
    }
    // AND a second migrate finds nothing to do
    let again = inbox.command(&["migrate"]).success();
    assert!(again.stdout.contains("up to date"), "{}", again.stdout);

    // AND check names the missing topic
    let check = inbox.command(&["check"]);
    assert_eq!(check.code(), Some(1), "{}", check.stdout);
    assert!(
        check
            .stderr
            .contains(&format!("topic {missing} does not exist")),
        "{}",
        check.stderr
    );
}
