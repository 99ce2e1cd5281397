//! RabbitMQ side of the tests: a durable queue bound to the test's exchange, a consumer, and
//! broker control through `rabbitmqctl` (restart, close connections, message size limit).

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties, Consumer, ExchangeKind};
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

use super::{Received, amqp_url, unique, wait_until};

static BROKER: LazyLock<Arc<RwLock<()>>> = LazyLock::new(|| Arc::new(RwLock::new(())));

/// Shared by ordinary RabbitMQ tests; exclusive for tests that disturb the broker.
pub enum Guard {
    Shared(OwnedRwLockReadGuard<()>),
    Exclusive(OwnedRwLockWriteGuard<()>),
}

impl Guard {
    pub async fn shared() -> Self {
        Self::Shared(Arc::clone(&BROKER).read_owned().await)
    }

    pub async fn exclusive() -> Self {
        Self::Exclusive(Arc::clone(&BROKER).write_owned().await)
    }
}

async fn connect() -> Connection {
    Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("RabbitMQ must be running (scripts/services.sh starts it)")
}

/// Declares the exchange (as the relay would) and a durable queue bound with `pattern`.
pub async fn bind_queue(exchange: &str, pattern: &str) -> String {
    bind_queue_with(exchange, pattern, FieldTable::default()).await
}

/// Like [`bind_queue`], with extra queue arguments (`x-max-length`, `x-overflow`, ...).
pub async fn bind_queue_with(exchange: &str, pattern: &str, mut arguments: FieldTable) -> String {
    let connection = connect().await;
    let channel = connection.create_channel().await.expect("channel");
    declare_exchange(
        &channel,
        exchange,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
    )
    .await;
    let queue = unique(exchange);
    // Unused test queues disappear after ten minutes.
    arguments.insert("x-expires".into(), AMQPValue::LongUInt(600_000));
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .expect("declare queue");
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.into(),
            pattern.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind queue");
    let _ = connection.close(200, "done".into()).await;
    queue
}

/// Declares an internal exchange: RabbitMQ refuses a publish to it by closing the channel
/// (ACCESS_REFUSED), without naming the message that caused it.
pub async fn declare_internal_exchange(exchange: &str) {
    let connection = connect().await;
    let channel = connection.create_channel().await.expect("channel");
    declare_exchange(
        &channel,
        exchange,
        ExchangeDeclareOptions {
            internal: true,
            auto_delete: true,
            ..ExchangeDeclareOptions::default()
        },
    )
    .await;
    let _ = connection.close(200, "done".into()).await;
}

async fn declare_exchange(
    channel: &lapin::Channel,
    exchange: &str,
    options: ExchangeDeclareOptions,
) {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            options,
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("declare exchange {exchange}: {e}"));
}

/// Consumes a queue (auto-ack) into `received`.
pub struct QueueReader {
    _connection: Connection,
    consumer: Consumer,
    pub received: Vec<Received>,
    /// Distinct event ids received.
    seen: std::collections::HashSet<String>,
}

impl QueueReader {
    pub async fn new(queue: &str) -> Self {
        let connection = connect().await;
        let channel = connection.create_channel().await.expect("channel");
        let consumer = channel
            .basic_consume(
                queue.into(),
                unique("reader").as_str().into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume");
        Self {
            _connection: connection,
            consumer,
            received: Vec::new(),
            seen: std::collections::HashSet::new(),
        }
    }

    /// Reads until `count` distinct events (by `event_id`) arrived, or panics after `timeout`.
    pub async fn read_distinct(&mut self, count: usize, timeout: Duration) -> &[Received] {
        let deadline = Instant::now() + timeout;
        while self.seen.len() < count && Instant::now() < deadline {
            self.poll_once(deadline).await;
        }
        assert!(
            self.seen.len() >= count,
            "{} distinct of {count} events ({} messages) within {timeout:?}",
            self.seen.len(),
            self.received.len()
        );
        &self.received
    }

    pub async fn read_at_least(&mut self, count: usize, timeout: Duration) -> &[Received] {
        let deadline = Instant::now() + timeout;
        while self.received.len() < count && Instant::now() < deadline {
            self.poll_once(deadline).await;
        }
        assert!(
            self.received.len() >= count,
            "received {} of {count} messages within {timeout:?}",
            self.received.len()
        );
        &self.received
    }

    pub async fn read_for(&mut self, period: Duration) -> &[Received] {
        let deadline = Instant::now() + period;
        while Instant::now() < deadline {
            self.poll_once(deadline).await;
        }
        &self.received
    }

    async fn poll_once(&mut self, deadline: Instant) {
        let next = tokio::time::timeout_at(deadline.into(), self.consumer.next()).await;
        let Ok(Some(delivery)) = next else {
            return;
        };
        let delivery = delivery.expect("delivery");
        let props = &delivery.properties;
        let mut headers = BTreeMap::new();
        if let Some(table) = props.headers() {
            for (name, value) in table.inner() {
                let text = match value {
                    AMQPValue::LongString(s) => s.to_string(),
                    other => format!("{other:?}"),
                };
                headers.insert(name.to_string(), text);
            }
        }
        let mut properties = BTreeMap::new();
        let mut put = |name: &'static str, value: Option<String>| {
            if let Some(value) = value {
                properties.insert(name, value);
            }
        };
        put(
            "message_id",
            props.message_id().as_ref().map(|v| v.to_string()),
        );
        put("type", props.kind().as_ref().map(|v| v.to_string()));
        put(
            "content_type",
            props.content_type().as_ref().map(|v| v.to_string()),
        );
        put(
            "delivery_mode",
            props.delivery_mode().map(|v| v.to_string()),
        );
        put("timestamp", props.timestamp().map(|v| v.to_string()));
        let received = Received {
            topic: delivery.routing_key.to_string(),
            partition: 0,
            key: headers.get("aggregate_id").cloned().unwrap_or_default(),
            payload: serde_json::from_slice(&delivery.data).unwrap_or_default(),
            value: Some(delivery.data.clone()),
            timestamp: props.timestamp().map(|t| t as i64 * 1000),
            headers,
            properties,
        };
        self.seen.insert(received.event_id().to_owned());
        self.received.push(received);
    }
}

/// Runs `rabbitmqctl` and returns its stdout; panics on failure.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("run rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Closes every AMQP connection whose client-provided name contains `name`; returns how many.
pub fn close_connections_named(name: &str) -> usize {
    let listing = rabbitmqctl(&[
        "list_connections",
        "-q",
        "--no-table-headers",
        "pid",
        "client_properties",
    ]);
    let mut closed = 0;
    for line in listing.lines().filter(|l| l.contains(name)) {
        let pid = line.split_whitespace().next().expect("pid column");
        rabbitmqctl(&["close_connection", pid, "closed by the test"]);
        closed += 1;
    }
    closed
}

/// `rabbitmqctl stop_app` then `start_app`: every connection drops, durable queues and
/// persistent messages survive.
pub async fn restart_app() {
    tokio::task::block_in_place(|| {
        rabbitmqctl(&["stop_app"]);
        rabbitmqctl(&["start_app"]);
        rabbitmqctl(&["await_startup"]);
    });
    wait_until(
        Duration::from_secs(60),
        "RabbitMQ accepting connections",
        || async {
            Connection::connect(&amqp_url(), ConnectionProperties::default())
                .await
                .is_ok()
        },
    )
    .await;
}

/// Sets the broker's `max_message_size` (bytes) for channels opened from now on.
pub fn set_max_message_size(bytes: u64) {
    rabbitmqctl(&[
        "eval",
        &format!("application:set_env(rabbit, max_message_size, {bytes})."),
    ]);
}
