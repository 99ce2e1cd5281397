//! The fault-injection suite: each scenario drives the release binary through one fault,
//! checks that the fault really happened, and lets the oracle (`support::oracle`) judge the
//! outcome: nothing lost, nothing unexpected, order per aggregate kept, nothing marked that the
//! broker does not have, duplicates only where at-least-once allows them and bounded.
//! `scripts/faults.sh` runs it with `FAULTS_REPORT` set and prints the table kept in
//! RELIABILITY.md.

use std::time::{Duration, Instant};

use crate::support::oracle::Verdict;
use crate::support::{Broker, Outbox, WAIT};

/// Inserts event `seq` of `aggregate_id` inside an open transaction.
async fn insert_in(tx: &mut sqlx::PgConnection, outbox: &Outbox, aggregate_id: &str, seq: i64) {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "insert into {} (aggregate_type, aggregate_id, event_type, payload, headers)
         values ('order', $1, 'happened', jsonb_build_object('seq', $2::bigint), '{{}}')",
        outbox.table
    )))
    .bind(aggregate_id)
    .bind(seq)
    .execute(tx)
    .await
    .expect("insert");
}

async fn out_of_order_commit_keeps_the_aggregate_in_id_order(broker: Broker) {
    // GIVEN a running relay
    let outbox = Outbox::for_broker(broker).await;
    let mut reader = outbox.reader("order", 1).await;
    let _relay = outbox.start();

    // WHEN transaction A takes the lower id for aggregate o-1 and stays open, while B inserts
    // the next event of o-1 (and one of o-2) and commits
    let mut a = outbox.pool.begin().await.unwrap();
    insert_in(&mut a, &outbox, "o-1", 0).await;
    let mut b = outbox.pool.begin().await.unwrap();
    insert_in(&mut b, &outbox, "o-1", 1).await;
    insert_in(&mut b, &outbox, "o-2", 0).await;
    b.commit().await.unwrap();
    let visible: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select count(*) from {} where aggregate_id = 'o-1'",
        outbox.table
    )))
    .fetch_one(&outbox.pool)
    .await
    .unwrap();
    assert_eq!(
        visible, 1,
        "the fault: o-1's later event is visible, its earlier is not"
    );

    // THEN nothing behind A's open transaction is published while it is open (10 polls)
    let early = reader.read_for(Duration::from_secs(1)).await;
    assert!(early.is_empty(), "published while A was open: {early:?}");

    // AND once A commits, o-1 arrives in id order, then the oracle finds nothing wrong
    let committed = Instant::now();
    a.commit().await.unwrap();
    outbox.wait_all_published(WAIT).await;
    let recovery = committed.elapsed();
    let received = reader.read_distinct(3, WAIT).await;
    let o1: Vec<i64> = received
        .iter()
        .filter(|r| r.key == "o-1")
        .map(|r| r.seq())
        .collect();
    assert_eq!(o1, vec![0, 1]);
    Verdict::judge("out-of-order commit, one aggregate", &outbox, &received)
        .await
        .recovered_in(recovery)
        .assert_holds(0);
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_order_commit_keeps_the_aggregate_in_id_order_kafka() {
    out_of_order_commit_keeps_the_aggregate_in_id_order(Broker::Kafka).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_order_commit_keeps_the_aggregate_in_id_order_rabbitmq() {
    out_of_order_commit_keeps_the_aggregate_in_id_order(Broker::RabbitMq).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_commit_order_guard_a_late_commit_is_overtaken() {
    // GIVEN a relay with relay.commit_order_guard = false (what the guard protects against)
    let mut outbox = Outbox::for_broker(Broker::Kafka).await;
    outbox
        .relay
        .insert("commit_order_guard", "false".to_owned());
    let mut reader = outbox.reader("order", 1).await;
    let _relay = outbox.start();

    // WHEN A holds o-1's lower id open while B commits o-1's next event
    let mut a = outbox.pool.begin().await.unwrap();
    insert_in(&mut a, &outbox, "o-1", 0).await;
    outbox.insert("order", "o-1", 1..2).await;

    // THEN B's event is published first, and the oracle sees the order violation
    let first = reader.read_distinct(1, WAIT).await;
    assert_eq!(first[0].seq(), 1);
    a.commit().await.unwrap();
    let received = reader.read_distinct(2, WAIT).await;
    let verdict = Verdict::judge("(guard off) out-of-order commit", &outbox, &received).await;
    assert_eq!(verdict.order_violations, 1, "{verdict:#?}");
}
