//! `[inbox.rabbitmq]` and the inbox's RabbitMQ consumer: one channel per queue (delivery tags
//! are per channel, so a cumulative ack on one never covers another queue's unwritten
//! deliveries), manual acks, `prefetch` unacknowledged deliveries per queue.

use std::fmt;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::config::{AmqpTlsConfig, connection};
use crate::broker::consumer::{ConsumeError, Consumer, Delivery, HeaderValue, Receipt};
use crate::constraint::{ConfigError, invalid};

/// `[inbox.rabbitmq]`
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct InboxRabbitMqConfig {
    /// AMQP URL (`amqp://` or `amqps://`). Secret: never logged. Or `url_file`.
    #[serde(default)]
    #[cfg_attr(test, schemars(with = "Option<String>"))]
    pub url: Option<SecretString>,
    /// File holding the AMQP URL.
    pub url_file: Option<PathBuf>,
    /// Queues to consume (they must exist: the inbox declares nothing).
    pub queues: Vec<String>,
    /// Unacknowledged deliveries the broker may send per queue. Default: eight times
    /// `inbox.batch_size` (at most 65535), so the queue never waits for the inbox's
    /// acknowledgement (benchmark, batches of 1000: 18.3k messages/s with 1000, 19.6k with
    /// 2000, 21.3k with 4000, 22.8k with 8000). The client holds up to this many messages in
    /// memory per queue: lower it for large messages.
    pub prefetch: Option<u16>,
    /// Allows an `amqp://` (plaintext) URL to a host that is not loopback. Default false.
    #[serde(default)]
    pub allow_insecure_transport: bool,
    /// `[inbox.rabbitmq.tls]`, as `[broker.rabbitmq.tls]`.
    pub tls: Option<AmqpTlsConfig>,
}

/// `[inbox.rabbitmq]`, parsed, TLS files read.
#[derive(Clone)]
pub(crate) struct RabbitMqConsumerSettings {
    url: SecretString,
    tls: OwnedTLSConfig,
    pub(crate) queues: Vec<String>,
    prefetch: u16,
}

impl RabbitMqConsumerSettings {
    /// Deliveries the broker may have out unacknowledged at once, over all queues.
    pub(crate) fn window(&self) -> usize {
        usize::from(self.prefetch) * self.queues.len()
    }
}

impl fmt::Debug for RabbitMqConsumerSettings {
    // The URL and the client key are secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitMqConsumerSettings")
            .field("queues", &self.queues)
            .field("prefetch", &self.prefetch)
            .finish_non_exhaustive()
    }
}

impl InboxRabbitMqConfig {
    /// Checks the section and parses it; `batch_size` is `inbox.batch_size`.
    pub(crate) fn validate(
        &self,
        batch_size: usize,
    ) -> Result<RabbitMqConsumerSettings, ConfigError> {
        let (url, tls) = connection(
            "inbox.rabbitmq",
            self.url.as_ref(),
            self.allow_insecure_transport,
            self.tls.as_ref(),
        )?;
        if self.queues.is_empty()
            || self
                .queues
                .iter()
                .any(|q| q.is_empty() || q.len() > 255 || q.starts_with("amq."))
        {
            return Err(invalid(
                "inbox.rabbitmq.queues",
                "must name at least one queue, each 1 to 255 bytes and not amq.*",
            ));
        }
        let prefetch = self
            .prefetch
            .unwrap_or_else(|| u16::try_from(batch_size * 8).unwrap_or(u16::MAX));
        if prefetch == 0 {
            return Err(invalid(
                "inbox.rabbitmq.prefetch",
                "must be at least 1 (0 would be unlimited)",
            ));
        }
        Ok(RabbitMqConsumerSettings {
            url,
            tls,
            queues: self.queues.clone(),
            prefetch,
        })
    }
}

/// What one queue's delivery stream yields: its index and the delivery.
type Deliveries =
    Pin<Box<dyn Stream<Item = (usize, Result<lapin::message::Delivery, lapin::Error>)> + Send>>;

/// One open session: the connection, a channel per queue, their merged deliveries.
struct Session {
    connection: Connection,
    channels: Vec<Channel>,
    deliveries: Deliveries,
}

/// The inbox's RabbitMQ consumer.
pub(crate) struct RabbitMqConsumer {
    settings: RabbitMqConsumerSettings,
    /// The connection name shown in the management UI.
    name: String,
    session: Option<Session>,
    /// Counts the sessions opened; a delivery's receipt carries the one it came from.
    generation: u64,
}

impl fmt::Debug for RabbitMqConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitMqConsumer")
            .field("queues", &self.settings.queues)
            .finish_non_exhaustive()
    }
}

/// How long opening a session may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

impl RabbitMqConsumer {
    /// A consumer that connects on first use.
    pub(crate) fn new(settings: RabbitMqConsumerSettings, name: String) -> Self {
        Self {
            settings,
            name,
            session: None,
            generation: 0,
        }
    }

    async fn connect(
        settings: &RabbitMqConsumerSettings,
        name: &str,
    ) -> Result<Connection, lapin::Error> {
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        let runtime = lapin::runtime::default_runtime()?;
        Connection::connect_with_config(
            settings.url.expose_secret(),
            properties,
            settings.tls.clone(),
            runtime,
        )
        .await
    }

    async fn open(
        settings: &RabbitMqConsumerSettings,
        name: &str,
    ) -> Result<Session, lapin::Error> {
        let connection = Self::connect(settings, name).await?;
        let mut channels = Vec::new();
        let mut streams = Vec::new();
        for (index, queue) in settings.queues.iter().enumerate() {
            let channel = connection.create_channel().await?;
            channel
                .basic_qos(settings.prefetch, BasicQosOptions::default())
                .await?;
            let consumer = channel
                .basic_consume(
                    queue.as_str().into(),
                    format!("{name} #{index}").into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            streams.push(consumer.map(move |delivery| (index, delivery)).boxed());
            channels.push(channel);
        }
        Ok(Session {
            connection,
            channels,
            deliveries: futures::stream::select_all(streams).boxed(),
        })
    }

    async fn session(&mut self) -> Result<&mut Session, ConsumeError> {
        if self.session.is_none() {
            let session =
                tokio::time::timeout(OPEN_TIMEOUT, Self::open(&self.settings, &self.name))
                    .await
                    .map_err(|_| ConsumeError::OpenTimeout)?
                    .map_err(ConsumeError::Amqp)?;
            self.session = Some(session);
            self.generation += 1;
        }
        Ok(self.session.as_mut().expect("set above"))
    }

    /// For `check`: each queue, and whether it exists (a passive declare on its own channel:
    /// a missing queue closes that channel).
    pub(crate) async fn queues(
        settings: RabbitMqConsumerSettings,
    ) -> Result<Vec<(String, bool)>, lapin::Error> {
        let connection = Self::connect(&settings, "outbox-relay inbox check").await?;
        let mut out = Vec::new();
        for queue in &settings.queues {
            let channel = connection.create_channel().await?;
            let found = channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .is_ok();
            out.push((queue.clone(), found));
        }
        let _ = connection.close(200, "check done".into()).await;
        Ok(out)
    }
}

/// An AMQP field value as JSON: numbers, booleans, strings, arrays and tables as themselves,
/// byte arrays as arrays of numbers, a decimal as its string form, a timestamp as seconds.
fn json(value: &AMQPValue) -> serde_json::Value {
    use serde_json::Value;
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::Float(n) => Value::from(f64::from(*n)),
        AMQPValue::Double(n) => Value::from(*n),
        AMQPValue::DecimalValue(d) => Value::String(format!("{}e-{}", d.value, d.scale)),
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => Value::String(String::from_utf8_lossy(s.as_bytes()).into()),
        AMQPValue::FieldArray(items) => Value::Array(items.as_slice().iter().map(json).collect()),
        AMQPValue::Timestamp(t) => Value::from(*t),
        AMQPValue::FieldTable(table) => Value::Object(
            table
                .inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), json(v)))
                .collect(),
        ),
        AMQPValue::ByteArray(bytes) => {
            Value::Array(bytes.as_slice().iter().map(|b| Value::from(*b)).collect())
        }
        AMQPValue::Void => Value::Null,
    }
}

/// The delivery as the inbox records it.
fn delivery(
    queue: &str,
    index: usize,
    session: u64,
    message: lapin::message::Delivery,
) -> Delivery {
    let properties = &message.properties;
    let headers = properties
        .headers()
        .as_ref()
        .map_or_else(Vec::new, |table| {
            table
                .inner()
                .iter()
                .map(|(name, value)| {
                    let value = match value {
                        // Long strings are bytes: kept verbatim, as Kafka headers are.
                        AMQPValue::LongString(s) => HeaderValue::Bytes(s.as_bytes().to_vec()),
                        other => HeaderValue::Json(json(other)),
                    };
                    (name.as_str().to_owned(), value)
                })
                .collect()
        });
    Delivery {
        source: queue.to_owned(),
        position: None,
        key: Some(message.routing_key.as_str().as_bytes().to_vec()),
        headers,
        message_id: properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_owned()),
        kind: properties.kind().as_ref().map(|k| k.as_str().to_owned()),
        body: Some(message.data),
        receipt: Receipt::Amqp {
            session,
            queue: index,
            tag: message.delivery_tag,
        },
    }
}

impl Consumer for RabbitMqConsumer {
    async fn next(&mut self, wait: Duration) -> Result<Option<Delivery>, ConsumeError> {
        let session = self.session().await?;
        let Ok(next) = tokio::time::timeout(wait, session.deliveries.next()).await else {
            return Ok(None);
        };
        match next {
            Some((index, Ok(message))) => {
                let queue = &self.settings.queues[index];
                Ok(Some(delivery(queue, index, self.generation, message)))
            }
            Some((_, Err(err))) => {
                self.session = None;
                Err(ConsumeError::Amqp(err))
            }
            // A consumer's stream ends when the broker cancels it (its queue was deleted).
            None => {
                self.session = None;
                Err(ConsumeError::Cancelled {
                    queue: self.settings.queues.join(","),
                })
            }
        }
    }

    async fn acknowledge(&mut self, receipts: &[Receipt]) -> Result<(), ConsumeError> {
        let Some(session) = self.session.as_ref() else {
            // The session that delivered them is gone: the broker requeued them, and their
            // redelivery is a duplicate the dedupe skips.
            return Ok(());
        };
        let mut last: Vec<Option<u64>> = vec![None; session.channels.len()];
        for receipt in receipts {
            // A delivery of an earlier session is not this session's to acknowledge: the
            // broker requeued it when that session ended.
            if let Receipt::Amqp {
                session: generation,
                queue,
                tag,
            } = *receipt
            {
                if generation == self.generation {
                    let slot = &mut last[queue];
                    *slot = Some(slot.map_or(tag, |t: u64| t.max(tag)));
                }
            }
        }
        for (channel, tag) in session.channels.iter().zip(last) {
            let Some(tag) = tag else { continue };
            // Cumulative: every delivery of this channel up to `tag` was handed to the inbox,
            // in order, and is in the committed transaction.
            if let Err(err) = channel
                .basic_ack(tag, BasicAckOptions { multiple: true })
                .await
            {
                self.session = None;
                return Err(ConsumeError::Amqp(err));
            }
        }
        Ok(())
    }

    async fn reconnect(&mut self) -> Result<(), ConsumeError> {
        if let Some(old) = self.session.take() {
            let _ = old.connection.close(200, "reconnecting".into()).await;
        }
        self.session().await.map(|_| ())
    }

    async fn close(&mut self) {
        if let Some(old) = self.session.take() {
            // Unacknowledged deliveries go back to their queues.
            let _ = old.connection.close(200, "inbox stopped".into()).await;
        }
    }
}
