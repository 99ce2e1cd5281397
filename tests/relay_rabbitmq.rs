//! The RabbitMQ sink end to end: the shared scenarios against the real RabbitMQ, plus
//! RabbitMQ's own failure cases (no binding, broker restart, forced close, oversized message).

use std::collections::HashSet;
use std::time::Duration;

use crate::scenarios;
use crate::support::rabbit::{self, QueueReader};
use crate::support::{Broker, Outbox, Reader, wait_until};

#[tokio::test(flavor = "multi_thread")]
async fn committed_events_arrive_as_contracted_and_rolled_back_ones_never() {
    scenarios::committed_events_arrive_as_contracted_and_rolled_back_ones_never(Broker::RabbitMq)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn events_of_an_aggregate_arrive_in_id_order() {
    scenarios::events_of_an_aggregate_arrive_in_id_order(Broker::RabbitMq).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn listen_wakes_the_relay_without_waiting_for_the_poll() {
    scenarios::listen_wakes_the_relay_without_waiting_for_the_poll(Broker::RabbitMq).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn polling_alone_publishes_without_listen() {
    scenarios::polling_alone_publishes_without_listen(Broker::RabbitMq).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn runs_against_a_table_the_application_created() {
    scenarios::runs_against_a_table_the_application_created(Broker::RabbitMq).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_drain_then_restart_loses_nothing() {
    scenarios::sigkill_mid_drain_then_restart_loses_nothing(Broker::RabbitMq).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_settles_the_in_flight_batch_and_exits_zero() {
    scenarios::sigterm_settles_the_in_flight_batch_and_exits_zero(Broker::RabbitMq).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_instances_publish_each_event_once_in_order() {
    scenarios::two_instances_publish_each_event_once_in_order(Broker::RabbitMq).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_outage_does_not_use_up_attempts() {
    scenarios::a_broker_outage_does_not_use_up_attempts(Broker::RabbitMq).await;
}

const WAIT: Duration = Duration::from_secs(60);

/// Row state by aggregate and sequence number: (attempts, last_error, dead, published).
async fn row_state(
    outbox: &Outbox,
    aggregate: &str,
    seq: i64,
) -> (i32, Option<String>, bool, bool) {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select attempts, last_error, dead_lettered_at is not null, published_at is not null
         from {} where aggregate_id = $1 and (payload->>'seq')::bigint = $2",
        outbox.table
    )))
    .bind(aggregate)
    .bind(seq)
    .fetch_one(&outbox.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn unroutable_rows_are_dead_lettered_park_their_aggregate_and_requeue_in_order() {
    // GIVEN a queue bound for `order.#` only, three attempts, and events of an aggregate type
    // that no binding routes
    let mut outbox = Outbox::for_broker(Broker::RabbitMq).await;
    outbox.retry.insert("max_attempts", "3".to_owned());
    let mut reader = outbox.reader("order", 1).await;
    outbox.insert("lost", "l-1", 0..1).await;
    outbox.insert("order", "o-1", 0..10).await;

    // WHEN the relay runs
    let relay = outbox.start();

    // THEN routable events flow
    reader.read_at_least(10, WAIT).await;
    // AND the unroutable head is not marked, is retried, then dead-lettered with the reason
    wait_until(WAIT, "unroutable row dead-lettered", || async {
        row_state(&outbox, "l-1", 0).await.2
    })
    .await;
    let (attempts, last_error, _, published) = row_state(&outbox, "l-1", 0).await;
    assert_eq!(attempts, 3);
    assert!(
        !published,
        "an unroutable message is never marked published"
    );
    let last_error = last_error.unwrap();
    assert!(last_error.contains("NO_ROUTE"), "{last_error}");
    relay
        .wait_for_log("event dead-lettered", Duration::from_secs(5))
        .await;

    // AND a successor written afterwards stays parked (the default): order is kept
    outbox.insert("lost", "l-1", 1..2).await;
    outbox.insert("order", "o-1", 10..12).await;
    reader.read_at_least(12, WAIT).await;
    assert!(
        !row_state(&outbox, "l-1", 1).await.3,
        "parked behind the dead letter"
    );
    let status = outbox.command(&["status", "--json"]).success();
    let status: serde_json::Value = serde_json::from_str(status.stdout.trim()).unwrap();
    assert_eq!(status["status"]["dead"], 1, "{status}");
    assert_eq!(status["status"]["parked"], 1, "{status}");

    // WHEN the operator binds a queue for them and requeues the aggregate
    let mut lost = outbox.reader("lost", 1).await;
    let out = outbox.command(&["requeue", "--aggregate", "l-1"]).success();
    assert!(
        out.stdout.contains("requeued 1 dead-lettered row"),
        "{out:?}"
    );

    // THEN both are published, in order
    let received = lost.read_at_least(2, WAIT).await;
    assert_eq!(received.iter().map(|m| m.seq()).collect::<Vec<_>>(), [0, 1]);
    outbox.wait_all_published(WAIT).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_restart_mid_drain_loses_nothing_and_marks_only_confirmed_rows() {
    // GIVEN exclusive use of RabbitMQ, a durable bound queue and 20 000 events
    let mut outbox = Outbox::unmigrated().await;
    outbox.exclusive_rabbitmq().await;
    outbox.migrate().success();
    outbox.relay.insert("batch_size", "200".to_owned());
    let queue = outbox.bind_queue("stock").await;
    for aggregate in 0..40 {
        outbox
            .insert("stock", &format!("sku-{aggregate}"), 0..500)
            .await;
    }
    let total = 20_000;

    // WHEN RabbitMQ restarts (stop_app / start_app) in the middle of the drain
    let relay = outbox.start();
    wait_until(WAIT, "part of the backlog published", || async {
        outbox.counts().await.0 >= 1_000
    })
    .await;
    rabbit::restart_app().await;
    let (published_at_restart, _) = outbox.counts().await;
    assert!(published_at_restart < total, "restarted mid-drain");

    // THEN the relay recovers and publishes everything
    outbox.wait_all_published(Duration::from_secs(120)).await;
    relay
        .wait_for_log("broker available again", Duration::from_secs(5))
        .await;
    assert_eq!(
        relay.logs().matches("broker unavailable").count(),
        1,
        "outage logged once"
    );
    // AND every row (all marked) is in the durable queue: nothing marked went unconfirmed
    let mut reader = Reader::RabbitMq(Box::new(QueueReader::new(&queue).await));
    let received = reader.read_distinct(total as usize, WAIT).await;
    let distinct: HashSet<&str> = received.iter().map(|m| m.header("event_id")).collect();
    assert_eq!(distinct.len(), total as usize, "lost events");
}

#[tokio::test(flavor = "multi_thread")]
async fn forced_connection_close_is_recovered_from() {
    // GIVEN a relay draining a backlog
    let mut outbox = Outbox::for_broker(Broker::RabbitMq).await;
    outbox.relay.insert("batch_size", "100".to_owned());
    let mut reader = outbox.reader("cart", 1).await;
    for aggregate in 0..20 {
        outbox
            .insert("cart", &format!("c-{aggregate}"), 0..500)
            .await;
    }
    let relay = outbox.start();
    wait_until(WAIT, "part of the backlog published", || async {
        outbox.counts().await.0 >= 500
    })
    .await;

    // WHEN the broker closes the relay's connection (`rabbitmqctl close_connection`)
    let name = format!("outbox-relay {}", outbox.table);
    let closed = tokio::task::block_in_place(|| rabbit::close_connections_named(&name));
    assert_eq!(
        closed, 1,
        "the relay's connection, named after its table, was closed"
    );
    // AND more events arrive afterwards
    outbox.insert("cart", "after-close", 0..10).await;

    // THEN the relay reconnects and everything is published and delivered
    outbox.wait_all_published(WAIT).await;
    let received = reader.read_distinct(10_010, WAIT).await;
    let distinct: HashSet<&str> = received.iter().map(|m| m.header("event_id")).collect();
    assert_eq!(distinct.len(), 10_010);
    assert!(relay.logs().contains("relay started"));
}

/// Restores RabbitMQ's default message size limit when the test ends, even on failure.
struct MaxMessageSize;

impl Drop for MaxMessageSize {
    fn drop(&mut self) {
        rabbit::set_max_message_size(134_217_728);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_row_is_dead_lettered_while_its_neighbours_flow() {
    // GIVEN exclusive use of RabbitMQ with max_message_size = 1 MiB, and a 2 MiB event
    let mut outbox = Outbox::unmigrated().await;
    outbox.exclusive_rabbitmq().await;
    outbox.migrate().success();
    rabbit::set_max_message_size(1_048_576);
    let _restore = MaxMessageSize;
    a_bad_row_is_dead_lettered_while_its_neighbours_flow(
        outbox,
        "payload, headers) values ('doc', 'big', 'uploaded',
             jsonb_build_object('seq', 0, 'blob', repeat('x', 2097152)), '{}')",
        "max_message_size of 1048576",
        "xxxxxxxxxx",
    )
    .await;
}

/// GIVEN two attempts and a batch holding a bad row (aggregate `big`, seq 0: `values` ends the
/// statement `insert into t (aggregate_type, aggregate_id, event_type, `), its successor and
/// ordinary events around them, WHEN the relay runs, THEN the neighbours are delivered, the bad
/// row is dead-lettered with `reason` in its error, its successor follows, and nothing of the
/// row (`never_logged`) reaches the log.
async fn a_bad_row_is_dead_lettered_while_its_neighbours_flow(
    mut outbox: Outbox,
    values: &str,
    reason: &str,
    never_logged: &str,
) {
    outbox.retry.insert("max_attempts", "2".to_owned());
    outbox.retry.insert("on_dead_letter", "\"skip\"".to_owned());
    let mut reader = outbox.reader("doc", 1).await;
    outbox.insert("doc", "before", 0..20).await;
    outbox
        .exec(&format!(
            "insert into {{table}} (aggregate_type, aggregate_id, event_type, {values};
             insert into {{table}} (aggregate_type, aggregate_id, event_type, payload)
             values ('doc', 'big', 'renamed', '{{\"seq\": 1}}')"
        ))
        .await;
    outbox.insert("doc", "after", 0..20).await;

    let relay = outbox.start();

    // on a fresh channel or connection where needed
    let received = reader.read_distinct(40, WAIT).await;
    assert!(received.iter().all(|m| m.key != "big" || m.seq() == 1));
    wait_until(WAIT, "bad row dead-lettered", || async {
        row_state(&outbox, "big", 0).await.2
    })
    .await;
    let (attempts, last_error, _, published) = row_state(&outbox, "big", 0).await;
    assert_eq!(attempts, 2);
    assert!(!published);
    let last_error = last_error.unwrap();
    assert!(last_error.contains(reason), "{last_error}");
    wait_until(WAIT, "successor published", || async {
        row_state(&outbox, "big", 1).await.3
    })
    .await;
    assert!(
        !relay.logs().contains(never_logged),
        "row contents are never logged"
    );
}

/// Clears RabbitMQ's memory alarm when the test ends, even on failure.
struct MemoryAlarm;

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        rabbit::rabbitmqctl(&["set_vm_memory_high_watermark", "0.4"]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resource_alarm_ends_in_a_confirm_timeout_not_a_hang() {
    // GIVEN exclusive use of RabbitMQ and a relay with a 2 s confirm timeout
    let mut outbox = Outbox::unmigrated().await;
    outbox.exclusive_rabbitmq().await;
    outbox.migrate().success();
    outbox
        .rabbitmq
        .insert("confirm_timeout", "\"2s\"".to_owned());
    let queue = outbox.bind_queue("order").await;

    // WHEN the broker raises a memory alarm (publishers blocked) and events arrive
    rabbit::rabbitmqctl(&["set_vm_memory_high_watermark", "0.0000001"]);
    let alarm = MemoryAlarm;
    let relay = outbox.start();
    outbox.insert("order", "o-1", 0..5).await;

    // THEN the relay reports the stall as an outage instead of hanging, and marks nothing
    relay
        .wait_for_log("no publisher confirm within the confirm timeout", WAIT)
        .await;
    assert_eq!(outbox.counts().await.0, 0, "nothing marked while blocked");

    // AND once the alarm clears, every event is published
    drop(alarm);
    outbox.wait_all_published(WAIT).await;
    let mut reader = Reader::RabbitMq(Box::new(QueueReader::new(&queue).await));
    reader.read_distinct(5, WAIT).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unroutable_dead_letters_are_copied_to_the_dead_letter_exchange() {
    // GIVEN a queue bound for `order.#` only, a dead-letter exchange with a catch-all queue,
    // and an event no binding of the main exchange routes
    let mut outbox = Outbox::for_broker(Broker::RabbitMq).await;
    outbox.retry.insert("max_attempts", "1".to_owned());
    let dead_exchange = format!("{}-dead", outbox.exchange());
    outbox
        .retry
        .insert("dead_letter_destination", format!("\"{dead_exchange}\""));
    let dead_queue = rabbit::bind_queue(&dead_exchange, "#").await;
    let mut dead = QueueReader::new(&dead_queue).await;
    outbox.insert("lost", "l-1", 0..1).await;

    // WHEN the relay runs
    let _relay = outbox.start();

    // THEN the copy arrives on the dead-letter exchange with the reason, and the row stays
    // dead-lettered in the table
    let copy = dead.read_distinct(1, WAIT).await[0].clone();
    assert_eq!(copy.topic, "lost.happened", "same routing key");
    assert!(
        copy.header("dead_letter_error").contains("unroutable"),
        "{copy:?}"
    );
    assert!(
        row_state(&outbox, "l-1", 0).await.2,
        "dead-lettered in the table"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_rows_end_published_or_dead_lettered_while_the_others_flow() {
    scenarios::hostile_rows_end_published_or_dead_lettered_while_the_others_flow(Broker::RabbitMq)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_login_is_an_outage_that_costs_no_attempt() {
    // GIVEN a broker user, a relay configured with a wrong password for it (a credential
    // rotation gone wrong), and a backlog of 300 events
    let mut outbox = Outbox::for_broker(Broker::RabbitMq).await;
    let user = crate::support::unique("relay_user");
    rabbit::rabbitmqctl(&["add_user", &user, "old-password"]);
    rabbit::rabbitmqctl(&["set_permissions", "-p", "/", &user, ".*", ".*", ".*"]);
    outbox.rabbitmq.insert(
        "url",
        format!("\"amqp://{user}:new-password@127.0.0.1:5672/%2f\""),
    );
    outbox.retry.insert("max_attempts", "2".to_owned());
    let addr = crate::support::free_address();
    outbox.http = Some(addr);
    let mut reader = outbox.reader("order", 1).await;
    for a in 0..30 {
        outbox.insert("order", &format!("o-{a}"), 0..10).await;
    }

    // WHEN the relay runs while the broker refuses its login
    let mut relay = outbox.start();
    // (the fault fired: the broker said ACCESS_REFUSED, readiness says why, and the relay has
    // tried again several times)
    relay
        .wait_for_log("ACCESS_REFUSED", Duration::from_secs(30))
        .await;
    wait_until(WAIT, "/readyz names the refused login", || async {
        crate::support::http_get(addr, "/readyz")
            .await
            .is_some_and(|(code, body)| code == 503 && body.contains("ACCESS_REFUSED"))
    })
    .await;
    wait_until(WAIT, "three refused sessions", || async {
        let Some((200, body)) = crate::support::http_get(addr, "/metrics").await else {
            return false;
        };
        crate::support::metric_value(
            &body,
            "outbox_relay_publish_errors_total",
            &[("class", "transient")],
        )
        .is_some_and(|n| n >= 3.0 * 300.0)
    })
    .await;

    // THEN nothing was charged an attempt, dead-lettered or published, and the outage was
    // logged once
    let charged: i64 = outbox
        .scalar("select count(*) from {table} where attempts > 0 or dead_lettered_at is not null or published_at is not null")
        .await;
    assert_eq!(charged, 0, "a refused login is not the rows' fault");
    assert_eq!(
        relay.logs().matches("broker unavailable").count(),
        1,
        "{}",
        relay.logs()
    );

    // WHEN the password is put right on the broker
    rabbit::rabbitmqctl(&["change_password", &user, "new-password"]);

    // THEN the whole backlog is delivered, each event once
    outbox.wait_all_published(WAIT).await;
    let received = reader.read_distinct(300, WAIT).await;
    assert_eq!(received.len(), 300, "each event once");
    relay.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(relay.wait_exit(Duration::from_secs(15)).await.success());
    rabbit::rabbitmqctl(&["delete_user", &user]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_channel_close_that_names_no_message_is_pinned_on_the_culprit_alone() {
    // GIVEN rows routed by aggregate type to two exchanges the relay does not declare: an
    // ordinary one, and an internal one (RabbitMQ answers a publish to it by closing the
    // channel, ACCESS_REFUSED, without saying which message), whose one row sits in the middle
    // of the relay's first batch
    let mut outbox = Outbox::for_broker(Broker::RabbitMq).await;
    let ordinary = outbox.exchange();
    let internal = format!("{ordinary}.internal");
    let queue = rabbit::bind_queue(&ordinary, "#").await;
    rabbit::declare_internal_exchange(&internal).await;
    let mut reader = QueueReader::new(&queue).await;
    outbox
        .rabbitmq
        .insert("exchange", "\"{aggregate_type}\"".to_owned());
    outbox
        .rabbitmq
        .insert("declare_exchange", "false".to_owned());
    outbox.insert(&ordinary, "a", 0..50).await;
    outbox.insert(&internal, "x", 0..1).await;
    outbox.insert(&ordinary, "b", 0..50).await;

    // WHEN the relay runs
    let relay = outbox.start();

    // THEN the fault fired: a batch's channel closed, and the relay went one message at a time
    relay
        .wait_for_log("publishing one message at a time", WAIT)
        .await;
    // AND every ordinary row is delivered, in order per aggregate
    let received = reader.read_distinct(100, WAIT).await;
    for key in ["a", "b"] {
        // at least once: judged on each event's first delivery
        let mut seen = HashSet::new();
        let first_deliveries: Vec<i64> = received
            .iter()
            .filter(|m| m.key == key && seen.insert(m.seq()))
            .map(|m| m.seq())
            .collect();
        assert!(first_deliveries.is_sorted(), "{key}: {first_deliveries:?}");
    }
    wait_until(WAIT, "ordinary rows marked", || async {
        let open: i64 = outbox
            .scalar(
                "select count(*) from {table} where aggregate_id <> 'x' and published_at is null",
            )
            .await;
        open == 0
    })
    .await;
    // AND only the culprit carries the broker's verdict: a destination in trouble, backing off
    // without using an attempt; no ordinary row was charged for it
    wait_until(WAIT, "culprit's error recorded", || async {
        row_state(&outbox, "x", 0)
            .await
            .1
            .is_some_and(|e| e.contains("ACCESS_REFUSED"))
    })
    .await;
    let (attempts, _, dead, published) = row_state(&outbox, "x", 0).await;
    assert_eq!((attempts, dead, published), (0, false, false));
    let charged: i64 = outbox
        .scalar("select count(*) from {table} where aggregate_id <> 'x' and (attempts <> 1 or last_error is not null)")
        .await;
    assert_eq!(charged, 0, "ordinary rows were charged for the culprit");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_whose_headers_exceed_frame_max_is_dead_lettered_while_its_neighbours_flow() {
    // GIVEN a row whose headers (200 KB) make an AMQP content-header frame over the broker's
    // frame_max (128 KiB): sent, the broker would close the connection without naming it
    let outbox = Outbox::for_broker(Broker::RabbitMq).await;
    a_bad_row_is_dead_lettered_while_its_neighbours_flow(
        outbox,
        "payload, headers) values ('doc', 'big', 'tagged', '{\"seq\": 0}',
             jsonb_build_object('note', repeat('n', 200000)))",
        "frame_max of 131072",
        "nnnnnnnnnn",
    )
    .await;
}
