//! CloudEvents binary mode (`[broker.cloudevents]`): every attribute checked against the row,
//! on Kafka as a real CloudEvents SDK reads it, on RabbitMQ as the AMQP binding places it.

use crate::support::{Broker, Outbox, WAIT, cloudevents_from_kafka};

/// (event id, event type, aggregate id, created_at in µs since the epoch) per row, by id.
async fn rows(outbox: &Outbox) -> Vec<(String, String, String, i64)> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select event_id::text, event_type, aggregate_id,
                (extract(epoch from created_at) * 1000000)::bigint
         from {} order by id",
        outbox.table
    )))
    .fetch_all(&outbox.pool)
    .await
    .expect("rows")
}

/// An outbox publishing CloudEvents with source `/billing` to `broker`, holding three events of
/// `o-1` and one of `o-2` whose own headers try to forge the event's id.
async fn cloudevents_outbox(broker: Broker) -> Outbox {
    let mut outbox = Outbox::for_broker(broker).await;
    outbox
        .sections
        .entry("broker.cloudevents")
        .or_default()
        .insert("source".into(), "\"/billing\"".into());
    outbox.insert("order", "o-1", 0..3).await;
    outbox
        .exec(
            "insert into {table} (aggregate_type, aggregate_id, event_type, payload, headers)
             values ('order', 'o-2', 'paid', '{\"seq\": 9}',
                     '{\"ce_id\": \"forged\", \"cloudEvents:id\": \"forged\", \"trace\": \"t-1\"}')",
        )
        .await;
    outbox
}

fn micros(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .unwrap_or_else(|e| panic!("time {rfc3339:?}: {e}"))
        .timestamp_micros()
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_messages_are_cloudevents_the_sdk_reads_back_attribute_by_attribute() {
    // GIVEN a relay in CloudEvents binary mode, and four events in the outbox
    let outbox = cloudevents_outbox(Broker::Kafka).await;
    let mut reader = outbox.reader("order", 1).await;

    // WHEN the relay publishes them and the CloudEvents SDK's Kafka binding reads each message
    let _relay = outbox.start();
    let received = reader.read_distinct(4, WAIT).await;
    let events = cloudevents_from_kafka(&received);

    // THEN each is the row's event: every attribute taken from the row
    let rows = rows(&outbox).await;
    assert_eq!(events.len(), rows.len(), "{events:?}");
    for ((event, message), (event_id, event_type, aggregate_id, created)) in
        events.iter().zip(&received).zip(&rows)
    {
        assert_eq!(event["specversion"], "1.0");
        assert_eq!(event["id"], event_id.as_str(), "{event}");
        assert_eq!(event["source"], "/billing");
        assert_eq!(event["type"], event_type.as_str());
        assert_eq!(event["subject"], aggregate_id.as_str());
        assert_eq!(event["datacontenttype"], "application/json");
        // AND the time is the row's creation time, to the microsecond
        assert_eq!(micros(event["time"].as_str().expect("time")), *created);
        // AND the data is the payload
        assert_eq!(event["data"], message.payload);
        // AND the relay's own headers stay beside the attributes
        assert_eq!(message.header("event_id"), event_id);
    }
    // AND a row's own header cannot forge an attribute; its other headers still travel
    assert_eq!(received[3].header("ce_id"), rows[3].0);
    assert_eq!(received[3].header("trace"), "t-1");
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_messages_carry_the_attributes_as_prefixed_headers() {
    // GIVEN a relay in CloudEvents binary mode publishing to RabbitMQ, and four events
    let outbox = cloudevents_outbox(Broker::RabbitMq).await;
    let mut reader = outbox.reader("order", 1).await;

    // WHEN the relay publishes them
    let _relay = outbox.start();
    let received = reader.read_distinct(4, WAIT).await;

    // THEN each carries the attributes as `cloudEvents:`-prefixed application properties, and
    // the media type as the content_type property (AMQP binding, binary mode)
    let rows = rows(&outbox).await;
    for (message, (event_id, event_type, aggregate_id, created)) in received.iter().zip(&rows) {
        assert_eq!(message.header("cloudEvents:specversion"), "1.0");
        assert_eq!(message.header("cloudEvents:id"), event_id, "{message:?}");
        assert_eq!(message.header("cloudEvents:source"), "/billing");
        assert_eq!(message.header("cloudEvents:type"), event_type);
        assert_eq!(message.header("cloudEvents:subject"), aggregate_id);
        assert_eq!(micros(message.header("cloudEvents:time")), *created);
        assert_eq!(message.properties["content_type"], "application/json");
        assert_eq!(message.properties["message_id"], *event_id);
    }
    assert_eq!(received[3].header("trace"), "t-1");
}
