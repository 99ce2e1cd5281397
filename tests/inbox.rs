//! The inbox (the consumer half): messages from Kafka or RabbitMQ into the inbox table, once
//! each per consumer, acknowledged only after the commit, poison messages set aside.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::support::inbox::{
    Inbox, Message, consumer_prefetch, declare_queue, produce, publish, queue_depth,
};
use crate::support::kafka::create_topic;
use crate::support::{Broker, WAIT, metric, unique, wait_until};

/// The offsets the group committed on `topic`'s partitions `0..partitions` (shared broker).
fn committed(group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    committed_on(&crate::support::kafka_brokers(), group, topic, partitions)
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
    assert_eq!(
        consumer_prefetch(&queue),
        vec![8 * 1000],
        "one consumer, with the default prefetch of eight batches"
    );
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

/// SIGKILLs the process three times while `expected` keeps arriving (sent with `send`, in
/// chunks of 100, a tenth of the stream at a time), each time while it is writing a batch (its
/// insert is held by a lock, so the kill comes mid-write however fast the build is), and
/// restarts it; returns how long each restart took to write its first new row.
async fn killed_three_times(
    inbox: &Inbox,
    expected: &[Message],
    send: impl AsyncFn(&[Message]),
) -> Vec<Duration> {
    let total = expected.len();
    let ahead = total / 10;
    let mut sent = 0;
    let send_up_to = async |sent: &mut usize, up_to: usize| {
        let up_to = up_to.min(total);
        for chunk in expected[*sent..up_to].chunks(100) {
            send(chunk).await;
        }
        *sent = (*sent).max(up_to);
    };
    let mut process = inbox.start();
    let mut resumed = Vec::new();
    for cut in [total / 5, total / 2, total * 4 / 5] {
        send_up_to(&mut sent, cut).await;
        inbox.wait_rows(cut as i64, WAIT).await;
        let holder = inbox.block_inserts().await;
        let more = sent + ahead;
        send_up_to(&mut sent, more).await;
        wait_until(WAIT, "the fault: a batch being written", || async {
            inbox.insert_blocked().await
        })
        .await;
        process.signal(Signal::SIGKILL);
        process.kill();
        drop(holder);
        let before = inbox.rows().await;
        assert!(
            before < sent as i64,
            "the fault: killed mid-stream ({before} of {sent} sent)"
        );
        let restarted = Instant::now();
        process = inbox.start();
        // More arrives while it restarts.
        let more = sent + ahead;
        send_up_to(&mut sent, more).await;
        wait_until(WAIT, "the restarted inbox writing", || async {
            inbox.rows().await > before
        })
        .await;
        resumed.push(restarted.elapsed());
    }
    send_up_to(&mut sent, total).await;
    inbox.wait_rows(total as i64, WAIT).await;
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

    // WHEN the inbox is SIGKILLed three times mid-stream and restarted each time
    let resumed =
        killed_three_times(&inbox, &events, async |chunk| produce(&topic, chunk).await).await;

    // THEN every event is there exactly once, in order per aggregate, and each restart
    // resumed within 30 s
    inbox.assert_exactly(&events).await;
    let longest = resumed.iter().max().copied();
    inbox
        .report("inbox SIGKILLed 3 times mid-stream", events.len(), longest)
        .await;
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

    // WHEN the inbox is SIGKILLed three times mid-stream and restarted each time
    let resumed =
        killed_three_times(&inbox, &events, async |chunk| publish(&queue, chunk).await).await;

    // THEN every event is there exactly once, in queue order per aggregate, and nothing is
    // left unacknowledged
    inbox.assert_exactly(&events).await;
    let longest = resumed.iter().max().copied();
    inbox
        .report("inbox SIGKILLed 3 times mid-stream", events.len(), longest)
        .await;
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

#[tokio::test(flavor = "multi_thread")]
async fn kafka_crash_after_the_commit_before_the_offset_commit_redelivers_and_skips_the_batch() {
    // GIVEN a private Kafka-protocol broker reached only through a proxy, a topic holding
    // 400 events, and an inbox whose inserts wait on a lock the test holds
    let plain = crate::support::free_address();
    let proxy = crate::support::proxy::Proxy::start(plain).await;
    let advertised = format!("127.0.0.1:{}", proxy.port);
    let _tansu = TansuGuard(crate::support::tls::private_tansu(plain.port(), &advertised).await);
    let topic = unique("inbox-unacked");
    crate::support::kafka::create_topic_on(&advertised, &topic, 2).await;
    let events = Message::stream(8, 0..50);
    crate::support::inbox::produce_to(&advertised, &topic, &events).await;
    let mut inbox = Inbox::new(Broker::Kafka, vec![topic.clone()]).await;
    inbox.brokers = advertised.clone();
    let holder = inbox.block_inserts().await;
    let mut process = inbox.start();

    // WHEN its first batch is written while the broker cannot hear from it (the offset
    // commit lost), and the process is then SIGKILLed
    wait_until(WAIT, "a batch waiting to be written", || async {
        inbox.insert_blocked().await
    })
    .await;
    assert!(
        proxy.blackhole() > 0,
        "the fault: the broker connections cut"
    );
    drop(holder);
    inbox.wait_rows(1, WAIT).await;
    let written = inbox.rows().await;
    process.signal(Signal::SIGKILL);
    process.kill();
    assert_eq!(
        committed_on(&advertised, &inbox.consumer, &topic, 2),
        vec![-1, -1],
        "the fault: rows committed, offsets not"
    );

    // THEN a restarted inbox gets those messages again, skips them as duplicates, and the
    // inbox holds every event once, in order
    let (_process, http) = inbox.start_observed();
    inbox.wait_rows(events.len() as i64, WAIT).await;
    inbox.assert_exactly(&events).await;
    let metric_duplicates = async || {
        metric(
            http,
            "outbox_relay_inbox_messages_total",
            &[("result", "duplicate")],
        )
        .await
        .unwrap_or(0.0) as i64
    };
    wait_until(
        WAIT,
        "the redelivered batch counted as duplicates, in the table and the metric",
        || async { inbox.duplicates().await >= written && metric_duplicates().await >= written },
    )
    .await;
    inbox
        .report(
            "crash after the commit, before the offset commit",
            events.len(),
            None,
        )
        .await;
}

/// Kills the private broker on drop.
struct TansuGuard(std::process::Child);

impl Drop for TansuGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// [`committed`] on the broker at `brokers`.
fn committed_on(brokers: &str, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
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

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_connection_lost_after_the_commit_before_the_ack_redelivers_and_skips_the_batch() {
    // GIVEN a queue holding 300 events, and an inbox that reaches RabbitMQ through a proxy
    // and whose inserts wait on a lock the test holds
    let _guard = crate::support::rabbit::Guard::shared().await;
    let queue = declare_queue().await;
    let events = Message::stream(6, 0..50);
    publish(&queue, &events).await;
    let proxy = crate::support::proxy::Proxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let mut inbox = Inbox::new(Broker::RabbitMq, vec![queue.clone()]).await;
    inbox.amqp_url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port);
    let holder = inbox.block_inserts().await;
    let (_process, http) = inbox.start_observed();

    // WHEN the connection is reset while a batch waits to be written, and the write then
    // commits (its acknowledgement has no channel left to go on)
    wait_until(WAIT, "a batch waiting to be written", || async {
        inbox.insert_blocked().await
    })
    .await;
    assert!(proxy.reset() > 0, "the fault: the connection reset");
    drop(holder);
    inbox.wait_rows(1, WAIT).await;

    // THEN the broker delivers that batch again (it was never acknowledged), the inbox
    // skips it as duplicates and acknowledges it, and holds every event once, in order
    inbox.wait_rows(events.len() as i64, WAIT).await;
    wait_until(
        WAIT,
        "the redelivered batch counted as duplicates, in the table and the metric",
        || async {
            let counted = metric(
                http,
                "outbox_relay_inbox_messages_total",
                &[("result", "duplicate")],
            )
            .await;
            let skipped = inbox.duplicates().await;
            skipped > 0 && counted == Some(skipped as f64)
        },
    )
    .await;
    inbox.assert_exactly(&events).await;
    inbox
        .report(
            "connection reset after the commit, before the ack",
            events.len(),
            None,
        )
        .await;
    wait_until(WAIT, "every delivery acknowledged", || async {
        queue_depth(&queue) == (0, 0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_inbox_processes_in_one_kafka_group_share_the_partitions_and_hold_every_event_once() {
    // GIVEN 3 200 events arriving over time on a topic of 4 partitions, and one inbox
    let topic = unique("inbox-group");
    create_topic(&topic, 4).await;
    let events = Message::stream(16, 0..200);
    let mut inbox = Inbox::new(Broker::Kafka, vec![topic.clone()]).await;
    inbox.keys.insert("batch_size", "50".to_owned());
    let producer = {
        let (topic, events) = (topic.clone(), events.clone());
        tokio::spawn(async move {
            for chunk in events.chunks(80) {
                produce(&topic, chunk).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let (mut first, first_http) = inbox.start_observed();
    inbox.wait_rows(400, WAIT).await;

    // WHEN a second process joins the group (a rebalance), writes, and the first then leaves
    let (_second, second_http) = inbox.start_observed();
    wait_until(WAIT, "the second member writing", || async {
        metric(
            second_http,
            "outbox_relay_inbox_messages_total",
            &[("result", "inserted")],
        )
        .await
        .is_some_and(|n| n > 0.0)
    })
    .await;
    let by_first = metric(
        first_http,
        "outbox_relay_inbox_messages_total",
        &[("result", "inserted")],
    )
    .await
    .unwrap_or(0.0);
    assert!(by_first > 0.0, "the fault: both members wrote");
    first.signal(Signal::SIGTERM);
    first.wait_exit(WAIT).await;
    producer.await.unwrap();

    // THEN every event is there once, in order per aggregate
    inbox.wait_rows(events.len() as i64, WAIT).await;
    inbox.assert_exactly(&events).await;
    inbox
        .report(
            "second group member joins, first leaves (rebalances)",
            events.len(),
            None,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_crash_mid_stream_pauses_consumption_and_loses_nothing() {
    // GIVEN an inbox on its own PostgreSQL server, taking 4 000 events from Kafka
    let mut server = crate::support::postgres::PrivatePostgres::start(None).await;
    let topic = unique("inbox-pgcrash");
    create_topic(&topic, 3).await;
    let events = Message::stream(20, 0..200);
    let mut inbox = Inbox::unmigrated(Broker::Kafka, vec![topic.clone()]).await;
    inbox.database_url = server.url();
    inbox.pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_lazy(&server.url())
        .unwrap();
    inbox.keys.insert("batch_size", "100".to_owned());
    inbox.command(&["migrate"]).success();
    let (first_half, second_half) = events.split_at(events.len() / 2);
    for chunk in first_half.chunks(200) {
        produce(&topic, chunk).await;
    }
    let (process, http) = inbox.start_observed();
    inbox.wait_rows(500, WAIT).await;

    // WHEN PostgreSQL stops immediately (crash recovery at start) while the rest arrives (the
    // inbox fails to write it and says so, in its log and its readiness), and comes back
    server.stop(Signal::SIGQUIT).await;
    for chunk in second_half.chunks(200) {
        produce(&topic, chunk).await;
    }
    process
        .wait_for_log("inbox: database unavailable", WAIT)
        .await;
    let ready = async || metric(http, "outbox_relay_inbox_ready", &[]).await;
    wait_until(WAIT, "the inbox reported not ready", || async {
        ready().await == Some(0.0)
    })
    .await;
    server.start_server().await;

    // THEN consumption resumes by itself and every event is there once, in order: nothing
    // acknowledged was lost in the crash
    inbox.wait_rows(events.len() as i64, WAIT).await;
    process.wait_for_log("database available again", WAIT).await;
    inbox.assert_exactly(&events).await;
    wait_until(WAIT, "the inbox reported ready again", || async {
        ready().await == Some(1.0)
    })
    .await;
    inbox
        .report(
            "PostgreSQL crash (immediate stop) and restart",
            events.len(),
            None,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rabbitmq_restart_mid_stream_is_survived_with_every_event_once() {
    // GIVEN 3 000 persistent events in a durable queue and an inbox taking them
    let _guard = crate::support::rabbit::Guard::exclusive().await;
    let queue = declare_queue().await;
    let events = Message::stream(10, 0..300);
    publish(&queue, &events).await;
    let mut inbox = Inbox::new(Broker::RabbitMq, vec![queue.clone()]).await;
    inbox.keys.insert("batch_size", "100".to_owned());
    inbox.keys.insert("batch_wait", "\"20ms\"".to_owned());
    let process = inbox.start();
    inbox.wait_rows(300, WAIT).await;

    // WHEN the broker restarts mid-stream (while a batch is being written)
    let holder = inbox.block_inserts().await;
    wait_until(WAIT, "a batch waiting to be written", || async {
        inbox.insert_blocked().await
    })
    .await;
    crate::support::rabbit::restart_app().await;
    drop(holder);
    process
        .wait_for_log("inbox: broker unavailable", WAIT)
        .await;
    assert!(
        inbox.rows().await < events.len() as i64,
        "the fault: the stream was cut"
    );

    // THEN the inbox reconnects and holds every event once, in queue order, all acknowledged
    inbox.wait_rows(events.len() as i64, WAIT).await;
    inbox.assert_exactly(&events).await;
    inbox
        .report("RabbitMQ restart mid-write", events.len(), None)
        .await;
    wait_until(WAIT, "every delivery acknowledged", || async {
        queue_depth(&queue) == (0, 0)
    })
    .await;
}

/// Service A commits `aggregates` × `per_aggregate` events into `table`, a few per aggregate
/// at a time, in separate transactions, while the test does other things.
fn service_a_writes(
    pool: sqlx::PgPool,
    table: String,
    aggregates: usize,
    per_aggregate: i64,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for start in (0..per_aggregate).step_by(5) {
            for a in 0..aggregates {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "insert into {table} (aggregate_type, aggregate_id, event_type, payload, headers)
                     select 'order', $1, 'happened', jsonb_build_object('seq', s),
                            jsonb_build_object('seq', s::text)
                     from generate_series($2::bigint, $3::bigint - 1) s"
                )))
                .bind(format!("a{a}"))
                .bind(start)
                .bind((start + 5).min(per_aggregate))
                .execute(&pool)
                .await
                .expect("service A's insert");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn effective_once_from_one_services_outbox_to_anothers_inbox_with_both_processes_killed() {
    // GIVEN service A's outbox with its relay publishing to Kafka, and service B's inbox
    // consuming that topic, while A commits 2 000 events of 20 aggregates over time
    let outbox = crate::support::Outbox::for_broker(Broker::Kafka).await;
    let topic = outbox.topic("order");
    create_topic(&topic, 3).await;
    let inbox = Inbox::new(Broker::Kafka, vec![topic.clone()]).await;
    let writer = service_a_writes(outbox.pool.clone(), outbox.table.clone(), 20, 100);
    let mut relay = outbox.start();
    let mut consumer = inbox.start();

    // WHEN the relay and the inbox are each SIGKILLed twice mid-stream and restarted
    for cut in [300, 1000] {
        inbox.wait_rows(cut, WAIT).await;
        relay.signal(Signal::SIGKILL);
        relay.kill();
        relay = outbox.start();
        inbox.wait_rows(cut + 200, WAIT).await;
        consumer.signal(Signal::SIGKILL);
        consumer.kill();
        assert!(inbox.rows().await < 2000, "the fault: killed mid-stream");
        consumer = inbox.start();
    }
    writer.await.unwrap();

    // THEN B's inbox holds exactly the events A committed, once each, in order per aggregate
    inbox.wait_rows(2000, WAIT).await;
    let committed: std::collections::BTreeSet<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(
        format!("select event_id::text from {}", outbox.table),
    ))
    .fetch_all(&outbox.pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    assert_eq!(committed.len(), 2000);
    inbox.assert_exactly_ids(&committed).await;
    inbox
        .report(
            "A's outbox -> relay -> Kafka -> B's inbox, each SIGKILLed twice",
            committed.len(),
            None,
        )
        .await;
    drop((relay, consumer));
}

#[tokio::test(flavor = "multi_thread")]
async fn one_process_runs_the_outbox_and_the_inbox_side_by_side() {
    // GIVEN one configuration with [broker] (the outbox's relay) and [inbox] on the topic the
    // relay writes to, in one database
    let mut outbox = crate::support::Outbox::for_broker(Broker::Kafka).await;
    let topic = outbox.topic("order");
    create_topic(&topic, 2).await;
    let inbox = Inbox::unmigrated(Broker::Kafka, vec![topic.clone()]).await;
    let mut section = std::collections::BTreeMap::new();
    section.insert("table".to_owned(), format!("\"{}\"", inbox.table));
    section.insert("consumer".to_owned(), format!("\"{}\"", inbox.consumer));
    section.insert("from".to_owned(), "\"kafka\"".to_owned());
    outbox.sections.insert("inbox", section);
    let mut kafka = std::collections::BTreeMap::new();
    kafka.insert(
        "brokers".to_owned(),
        format!("\"{}\"", crate::support::kafka_brokers()),
    );
    kafka.insert("topics".to_owned(), format!("[\"{topic}\"]"));
    kafka.insert("session_timeout".to_owned(), "\"3s\"".to_owned());
    outbox.sections.insert("inbox.kafka", kafka);
    let migrated = outbox.migrate().success();
    assert!(
        migrated.stdout.contains("inbox table"),
        "{}",
        migrated.stdout
    );

    // WHEN it runs and the outbox gets 100 events
    let (mut process, http) = outbox.start_observed();
    for a in 0..4 {
        outbox.insert("order", &format!("a{a}"), 0..25).await;
    }

    // THEN they are published and land in the inbox once each, /readyz answers for both
    // directions, and SIGTERM stops both cleanly
    inbox.wait_rows(100, WAIT).await;
    outbox.wait_all_published(WAIT).await;
    let ids: std::collections::BTreeSet<String> = outbox
        .column::<String>(&format!("select event_id::text from {}", outbox.table))
        .await
        .into_iter()
        .collect();
    inbox.assert_exactly_ids(&ids).await;
    wait_until(WAIT, "ready", || async {
        crate::support::http_get(http, "/readyz")
            .await
            .is_some_and(|(code, _)| code == 200)
    })
    .await;
    process.signal(Signal::SIGTERM);
    assert!(process.wait_exit(WAIT).await.success());
    process.wait_for_log("inbox stopped", WAIT).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_inbox_runs_with_only_the_documented_grants_and_deletes_rows_processed_long_ago() {
    // GIVEN an inbox migrated by its owner, a role with exactly the README's inbox grants,
    // and 60 events on a topic, one of them without an id
    let topic = unique("inbox-grants");
    create_topic(&topic, 1).await;
    let events = Message::stream(3, 0..20);
    produce(&topic, &events).await;
    produce(&topic, &[without_id(b"x")]).await;
    let mut inbox = Inbox::new(Broker::Kafka, vec![topic.clone()]).await;
    let role = unique("inbox_role");
    let t = &inbox.table;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "create role {role} login;
         grant connect on database {db} to {role};
         grant usage on schema public to {role};
         grant select, insert, delete on {t} to {role};
         grant select, insert on {t}_rejected to {role};
         grant select, insert, update on {t}_stats to {role};",
        db = crate::support::TEST_DATABASE,
    )))
    .execute(&inbox.pool)
    .await
    .unwrap();
    inbox.database_url = inbox
        .database_url
        .replace("postgres://postgres@", &format!("postgres://{role}@"));

    // WHEN that role checks, runs the inbox, reports its status, and the application marks
    // some rows processed eight days ago
    let check = inbox.command(&["check"]);
    assert_eq!(check.code(), Some(0), "{check:?}");
    let process = inbox.start();
    inbox.wait_rows(60, WAIT).await;
    wait_until(WAIT, "the poison message recorded", || async {
        inbox.rejected().await == 1
    })
    .await;
    let status = inbox.command(&["status"]);
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(status.stdout.contains("waiting"), "{}", status.stdout);
    inbox
        .scalar(
            "with done as (update {t} set processed_at = now() - interval '8 days'
                           where aggregate_id = 'a0' returning 1)
             select count(*) from done",
        )
        .await;

    // THEN retention (default: 7 days) deletes exactly those, and nothing was denied
    wait_until(WAIT, "rows processed 8 days ago deleted", || async {
        inbox.rows().await == 40
    })
    .await;
    let left = inbox
        .scalar("select count(*) from {t} where aggregate_id = 'a0'")
        .await;
    assert_eq!(left, 0);
    let logs = process.logs();
    assert!(!logs.contains("permission denied"), "{logs}");
    drop(process);
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "drop owned by {role}; drop role {role};"
    )))
    .execute(&inbox.pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn check_reports_a_missing_rabbitmq_queue_and_passes_once_it_exists() {
    // GIVEN a migrated inbox on two queues, one of which does not exist
    let _guard = crate::support::rabbit::Guard::shared().await;
    let present = declare_queue().await;
    let missing = unique("inbox-q-missing");
    let inbox = Inbox::new(Broker::RabbitMq, vec![present.clone(), missing.clone()]).await;

    // WHEN check runs
    let check = inbox.command(&["check"]);

    // THEN it fails naming the missing queue and confirms the other
    assert_eq!(check.code(), Some(1), "{check:?}");
    assert!(
        check
            .stderr
            .contains(&format!("queue {missing} does not exist")),
        "{}",
        check.stderr
    );
    assert!(
        check.stdout.contains(&format!("queue {present}: exists")),
        "{}",
        check.stdout
    );
    assert!(
        check
            .stdout
            .contains(&format!("inbox table {}: ok", inbox.table))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_holds_at_most_max_batch_bytes_of_messages() {
    // GIVEN 300 events waiting in a queue, and an inbox whose batches may hold 1 KiB
    let _guard = crate::support::rabbit::Guard::shared().await;
    let queue = declare_queue().await;
    let events = Message::stream(3, 0..100);
    publish(&queue, &events).await;
    let mut inbox = Inbox::new(Broker::RabbitMq, vec![queue.clone()]).await;
    inbox.keys.insert("max_batch_bytes", "1024".to_owned());

    // WHEN the inbox takes them
    let (_process, http) = inbox.start_observed();
    inbox.wait_rows(events.len() as i64, WAIT).await;

    // THEN no batch held more messages than fit in 1 KiB (each message is at least its body
    // and its headers), and every event is there once, in order
    let smallest = events
        .iter()
        .map(|m| {
            m.body.len()
                + m.headers
                    .iter()
                    .map(|(n, v)| n.len() + v.len())
                    .sum::<usize>()
        })
        .min()
        .unwrap();
    let most_per_batch = 1024_usize.div_ceil(smallest);
    let batches = async || {
        metric(http, "outbox_relay_inbox_batch_size_count", &[])
            .await
            .unwrap_or(0.0)
    };
    let at_least = events.len().div_ceil(most_per_batch) as f64;
    wait_until(WAIT, "every batch counted", || async {
        metric(http, "outbox_relay_inbox_batch_size_sum", &[]).await == Some(events.len() as f64)
    })
    .await;
    assert!(
        batches().await >= at_least,
        "{} batches for {} messages of at least {smallest} bytes",
        batches().await,
        events.len()
    );
    inbox.assert_exactly(&events).await;
}
