//! Tables that already exist: Debezium's outbox layout and tables with their own column names
//! (`database.layout`, `[database.columns]`), end to end against the real brokers. The
//! Debezium cases follow those of Debezium's `EventRouterTest` that apply to a polling relay:
//! the router's defaults, routing by another column, a custom key column, and additional
//! columns placed as headers.

use std::collections::BTreeMap;

use crate::support::{Broker, Outbox, Received, WAIT};

/// Debezium's outbox table as its documentation has the application create it.
const DEBEZIUM_TABLE: &str = "create table {table} (
    id uuid primary key,
    aggregatetype varchar(255) not null,
    aggregateid varchar(255) not null,
    type varchar(255) not null,
    payload jsonb)";

/// The application's insert, unchanged from its Debezium days.
async fn insert_debezium(outbox: &Outbox, aggregate_type: &str, aggregate_id: &str, seq: i64) {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "insert into {} (id, aggregatetype, aggregateid, type, payload)
         values (gen_random_uuid(), $1, $2, 'OrderCreated',
                 jsonb_build_object('seq', $3::bigint, 'note', 'a  b'))",
        outbox.table
    )))
    .bind(aggregate_type)
    .bind(aggregate_id)
    .bind(seq)
    .execute(&outbox.pool)
    .await
    .expect("insert as the application does");
}

/// `(id, payload as PostgreSQL prints it)` of every row, by id.
async fn stored(outbox: &Outbox) -> BTreeMap<String, String> {
    let rows: Vec<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select id::text, payload::text from {}",
        outbox.table
    )))
    .fetch_all(&outbox.pool)
    .await
    .expect("read rows");
    rows.into_iter().collect()
}

fn header_names(message: &Received) -> Vec<&str> {
    message.headers.keys().map(String::as_str).collect()
}

async fn a_debezium_table_is_adopted_and_its_consumers_see_the_routers_messages(broker: Broker) {
    // GIVEN Debezium's outbox table, created by the application, with an event already in it
    let mut outbox = Outbox::unmigrated().await;
    outbox.set_broker(broker).await;
    outbox.database.insert("layout", "\"debezium\"".to_owned());
    outbox.exec(DEBEZIUM_TABLE).await;
    insert_debezium(&outbox, "Order", "o-1", 0).await;

    // WHEN `migrate` adopts it, the application keeps inserting as it did, and the relay runs
    let migrated = outbox.migrate().success();
    assert!(migrated.stdout.contains("applied"), "{migrated:?}");
    for seq in 1..4 {
        insert_debezium(&outbox, "Order", "o-1", seq).await;
        insert_debezium(&outbox, "Order", "o-2", seq).await;
    }
    let check = outbox.command(&["check"]).success();
    assert!(
        check
            .stdout
            .contains("columns mapped: id = relay_seq, event_id = id, aggregate_type = aggregatetype, aggregate_id = aggregateid, event_type = type, payload = payload"),
        "{check:?}"
    );
    let mut reader = outbox.reader("Order", 3).await;
    let _relay = outbox.start();
    let received = reader.read_distinct(7, WAIT).await;

    // THEN every event arrives once: the one written before the adoption too
    let rows = stored(&outbox).await;
    assert_eq!(received.len(), 7, "{received:?}");
    for message in &received {
        // AND it carries exactly one header, `id` = the event id
        assert_eq!(header_names(message), ["id"], "{message:?}");
        // AND its value is the payload as stored (PostgreSQL's text of the jsonb)
        let payload = rows.get(message.event_id()).expect("a row of the table");
        assert_eq!(message.value.as_deref(), Some(payload.as_bytes()));
        match broker {
            // AND it goes to outbox.event.<aggregatetype> (here under the test's prefix), case
            // kept, keyed by aggregateid
            Broker::Kafka => {
                assert_eq!(message.topic, outbox.topic("Order"));
                assert!(
                    ["o-1", "o-2"].contains(&message.key.as_str()),
                    "{message:?}"
                );
            }
            // AND (RabbitMQ) its message_id is the event id
            Broker::RabbitMq => {
                assert_eq!(message.properties["message_id"], message.event_id());
                assert_eq!(message.topic, "Order.OrderCreated");
            }
        }
    }
    // AND each aggregate's events arrive in the order they were written
    let mut order: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for message in &received {
        let aggregate: String = outbox
            .scalar(&format!(
                "select aggregateid from {{table}} where id = '{}'::uuid",
                message.event_id()
            ))
            .await;
        order.entry(aggregate).or_default().push(message.seq());
    }
    assert_eq!(order["o-1"], [0, 1, 2, 3]);
    assert_eq!(order["o-2"], [1, 2, 3]);
    outbox.wait_all_published(WAIT).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_debezium_table_is_adopted_and_kafka_consumers_see_the_routers_messages() {
    a_debezium_table_is_adopted_and_its_consumers_see_the_routers_messages(Broker::Kafka).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_debezium_table_is_adopted_and_rabbitmq_consumers_see_the_routers_messages() {
    a_debezium_table_is_adopted_and_its_consumers_see_the_routers_messages(Broker::RabbitMq).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn routing_key_timestamp_and_headers_come_from_the_columns_mapped_to_them() {
    // GIVEN a Debezium-style table with a routing column, a customer column used as the key, a
    // tracing column, a `timestamp` creation column and a `json` payload (kept as written),
    // and a relay whose URL asks for sessions in New York time
    let mut outbox = Outbox::unmigrated().await;
    outbox.database_url = format!(
        "{}?options=-c%20TimeZone%3DAmerica%2FNew_York",
        outbox.database_url
    );
    outbox.database.insert("layout", "\"debezium\"".to_owned());
    outbox
        .exec(
            "create table {table} (
                id uuid primary key default gen_random_uuid(),
                aggregatetype varchar(255) not null default 'unused',
                aggregateid varchar(255) not null default 'unused',
                type varchar(255) not null,
                payload json,
                destination text not null,
                customer text not null,
                tracing text,
                ts timestamp not null)",
        )
        .await;
    // WHEN it is mapped as Debezium's route.by.field, table.field.event.key,
    // table.field.event.timestamp and table.fields.additional.placement would map it
    let columns = outbox.sections.entry("database.columns").or_default();
    columns.insert("aggregate_type".into(), "\"destination\"".into());
    columns.insert("aggregate_id".into(), "\"customer\"".into());
    columns.insert("created_at".into(), "\"ts\"".into());
    let headers = outbox
        .sections
        .entry("database.columns.headers")
        .or_default();
    headers.insert("type".into(), "\"eventType\"".into());
    headers.insert("tracing".into(), "\"traceparent\"".into());
    outbox.migrate().success();
    outbox
        .exec(
            "insert into {table} (type, payload, destination, customer, tracing, ts) values
             ('Placed', '{\"seq\": 0,   \"spaced\":true}', 'invoices', 'c-7', '00-abc-01', '2026-01-02 03:04:05.678'),
             ('Paid', '{\"seq\": 1}', 'invoices', 'c-7', null, '2026-01-02 03:04:06')",
        )
        .await;
    let mut reader = outbox.reader("invoices", 2).await;
    let _relay = outbox.start();
    let received = reader.read_distinct(2, WAIT).await;

    // THEN the topic follows the routing column and the key the customer column
    assert!(received.iter().all(|m| m.topic == outbox.topic("invoices")));
    assert!(received.iter().all(|m| m.key == "c-7"), "{received:?}");
    // AND the mapped columns are headers under their header names (a NULL one is left out)
    assert_eq!(
        header_names(&received[0]),
        ["eventType", "id", "traceparent"]
    );
    assert_eq!(received[0].header("eventType"), "Placed");
    assert_eq!(received[0].header("traceparent"), "00-abc-01");
    assert_eq!(header_names(&received[1]), ["eventType", "id"]);
    // AND the timestamp is the creation column's, read as UTC whatever the session's time
    // zone
    let expected = chrono::NaiveDate::from_ymd_opt(2026, 1, 2)
        .unwrap()
        .and_hms_milli_opt(3, 4, 5, 678)
        .unwrap()
        .and_utc()
        .timestamp_millis();
    assert_eq!(received[0].timestamp, Some(expected));
    // AND a `json` payload is sent exactly as written
    assert_eq!(
        received[0].value.as_deref(),
        Some(&b"{\"seq\": 0,   \"spaced\":true}"[..])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bytea_payloads_are_sent_as_stored_and_null_ones_as_tombstones() {
    // GIVEN a table of the application's own, with its own names, a bytea payload and no
    // headers or creation column
    let mut outbox = Outbox::unmigrated().await;
    outbox
        .exec(
            "create table {table} (
                seq bigint generated always as identity primary key,
                uid uuid not null default gen_random_uuid(),
                kind text not null, entity text not null, what text not null,
                body bytea)",
        )
        .await;
    let columns = outbox.sections.entry("database.columns").or_default();
    for (logical, column) in [
        ("id", "seq"),
        ("event_id", "uid"),
        ("aggregate_type", "kind"),
        ("aggregate_id", "entity"),
        ("event_type", "what"),
        ("payload", "body"),
        ("headers", ""),
        ("created_at", ""),
    ] {
        columns.insert(logical.into(), format!("\"{column}\""));
    }
    outbox.migrate().success();
    // WHEN the application writes bytes that are not UTF-8, and a deletion marker (NULL)
    outbox
        .exec(
            "insert into {table} (kind, entity, what, body) values
             ('order', 'o-1', 'raw', '\\x00ff10'::bytea),
             ('order', 'o-1', 'deleted', null)",
        )
        .await;
    let mut reader = outbox.reader("order", 1).await;
    let _relay = outbox.start();
    let received = reader.read_distinct(2, WAIT).await;

    // THEN the first message's value is those bytes, the second has no value at all
    assert_eq!(received[0].value.as_deref(), Some(&[0x00, 0xff, 0x10][..]));
    assert_eq!(received[1].value, None, "a tombstone");
    // AND both carry the relay's headers with the event id from the mapped column
    let uids: Vec<String> = outbox
        .column("select uid::text from {table} order by seq")
        .await;
    let ids: Vec<&str> = received.iter().map(|m| m.header("event_id")).collect();
    assert_eq!(ids, uids);
    assert_eq!(received[1].header("event_type"), "deleted");
    outbox.wait_all_published(WAIT).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_refuses_to_invent_a_mapped_table_and_never_touches_the_applications_columns() {
    // GIVEN a mapping for a table that does not exist
    let mut outbox = Outbox::unmigrated().await;
    let columns = outbox.sections.entry("database.columns").or_default();
    columns.insert("payload".into(), "\"body\"".into());
    // WHEN migrate runs THEN it refuses, naming the table
    let refused = outbox.migrate();
    assert_eq!(refused.code(), Some(1), "{refused:?}");
    assert!(refused.stderr.contains("does not exist"), "{refused:?}");

    // GIVEN the table, with the application's own columns and a row
    outbox
        .exec(
            "create table {table} (id bigint generated always as identity primary key,
                event_id uuid not null default gen_random_uuid(), aggregate_type text not null,
                aggregate_id text not null, event_type text not null, body jsonb not null,
                headers jsonb, created_at timestamptz not null default now(), note text);
             insert into {table} (aggregate_type, aggregate_id, event_type, body, note)
             values ('order', 'o-1', 'placed', '{\"seq\": 0}', 'kept')",
        )
        .await;
    let before: Vec<(String, String)> = columns_of(&outbox).await;
    // WHEN migrate adopts it (twice: it is idempotent)
    outbox.migrate().success();
    let again = outbox.migrate().success();
    assert!(again.stdout.contains("up to date"), "{again:?}");
    // THEN the application's columns are unchanged and only the relay's were added
    let after = columns_of(&outbox).await;
    assert_eq!(&after[..before.len()], &before[..]);
    let added: Vec<&str> = after[before.len()..]
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(
        added,
        [
            "published_at",
            "attempts",
            "next_attempt_at",
            "last_error",
            "dead_lettered_at",
            "unsettled_attempts",
            "deferrals"
        ]
    );
    let note: String = outbox.scalar("select note from {table}").await;
    assert_eq!(note, "kept");
}

/// The table's columns and types, in order.
async fn columns_of(outbox: &Outbox) -> Vec<(String, String)> {
    sqlx::query_as(
        "select attname::text, format_type(atttypid, atttypmod) from pg_attribute
         where attrelid = $1::regclass and attnum > 0 and not attisdropped order by attnum",
    )
    .bind(&outbox.table)
    .fetch_all(&outbox.pool)
    .await
    .expect("catalog")
}

#[tokio::test(flavor = "multi_thread")]
async fn check_names_a_mapped_column_the_table_lacks_and_status_and_requeue_use_the_mapping() {
    // GIVEN a Debezium table adopted with a header column the table does not have
    let mut outbox = Outbox::unmigrated().await;
    outbox.database.insert("layout", "\"debezium\"".to_owned());
    outbox.exec(DEBEZIUM_TABLE).await;
    outbox.migrate().success();
    outbox
        .sections
        .entry("database.columns.headers")
        .or_default()
        .insert("tenant".into(), "\"tenant\"".into());
    // WHEN check inspects it THEN it fails naming the missing column
    let check = outbox.command(&["check"]);
    assert_eq!(check.code(), Some(1), "{check:?}");
    assert!(
        check.stdout.contains("missing columns: tenant"),
        "{check:?}"
    );
    assert!(
        check.stdout.contains("header = tenant as tenant"),
        "{check:?}"
    );

    // GIVEN the mapping fixed, and a dead-lettered row of aggregate o-1
    outbox.sections.clear();
    insert_debezium(&outbox, "Order", "o-1", 0).await;
    insert_debezium(&outbox, "Order", "o-2", 0).await;
    outbox
        .exec("update {table} set dead_lettered_at = now(), attempts = 5 where aggregateid = 'o-1'")
        .await;
    // WHEN status counts the rows THEN it reads the mapped columns
    let status = outbox.command(&["status", "--json"]).success();
    let status: serde_json::Value = serde_json::from_str(&status.stdout).expect("JSON");
    assert_eq!(status["status"]["pending"], 1, "{status}");
    assert_eq!(status["status"]["dead"], 1, "{status}");
    // AND requeue finds the dead row by its aggregate, and by its event id
    let requeued = outbox.command(&["requeue", "--aggregate", "o-1"]).success();
    assert!(requeued.stdout.contains("requeued 1"), "{requeued:?}");
    outbox
        .exec("update {table} set dead_lettered_at = now() where aggregateid = 'o-1'")
        .await;
    let id: String = outbox
        .scalar("select id::text from {table} where aggregateid = 'o-1'")
        .await;
    let requeued = outbox.command(&["requeue", "--event-id", &id]).success();
    assert!(requeued.stdout.contains("requeued 1"), "{requeued:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_creates_debeziums_table_for_the_debezium_layout_when_it_is_missing() {
    // GIVEN the Debezium layout and no table
    let mut outbox = Outbox::unmigrated().await;
    outbox.database.insert("layout", "\"debezium\"".to_owned());
    // WHEN migrate runs
    outbox.migrate().success();
    // THEN the table has Debezium's columns, then the relay's, and takes the router's insert
    let columns: Vec<String> = columns_of(&outbox)
        .await
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    assert_eq!(
        &columns[..6],
        [
            "id",
            "aggregatetype",
            "aggregateid",
            "type",
            "payload",
            "relay_seq"
        ]
    );
    insert_debezium(&outbox, "Order", "o-1", 0).await;
    let mut reader = outbox.reader("Order", 1).await;
    let _relay = outbox.start();
    let received = reader.read_distinct(1, WAIT).await;
    assert_eq!(header_names(&received[0]), ["id"]);
}
