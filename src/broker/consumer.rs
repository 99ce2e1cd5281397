//! Consuming: the delivery contract a broker keeps when the inbox takes messages from it, the
//! message as taken ([`Delivery`]), and the closed set of consumers ([`Inbound`]).

use std::future::Future;
use std::time::Duration;

/// One message as the broker gave it, not yet acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Delivery {
    /// The topic or queue it came from.
    pub(crate) source: String,
    /// Kafka: its partition and offset.
    pub(crate) position: Option<(i32, i64)>,
    /// The message key (Kafka) or the routing key it was published with (RabbitMQ).
    pub(crate) key: Option<Vec<u8>>,
    /// Header name → value, in the order the message carried them.
    pub(crate) headers: Vec<(String, HeaderValue)>,
    /// The AMQP `message_id` property.
    pub(crate) message_id: Option<String>,
    /// The AMQP `type` property.
    pub(crate) kind: Option<String>,
    /// The value; `None` for a Kafka tombstone.
    pub(crate) body: Option<Vec<u8>>,
    /// What acknowledges it (see [`Consumer::acknowledge`]).
    pub(crate) receipt: Receipt,
}

/// A header's value as a broker carries it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum HeaderValue {
    /// Kafka headers are bytes (usually UTF-8 text); AMQP long strings too.
    Bytes(Vec<u8>),
    /// An AMQP field value of another type (number, boolean, table, array...).
    Json(serde_json::Value),
    /// A Kafka header without a value.
    Null,
}

impl Eq for HeaderValue {}

impl HeaderValue {
    /// The value as UTF-8 text, when it is text.
    pub(crate) fn text(&self) -> Option<&str> {
        match self {
            Self::Bytes(bytes) => std::str::from_utf8(bytes).ok(),
            Self::Json(serde_json::Value::String(text)) => Some(text),
            _ => None,
        }
    }
}

/// What acknowledging a [`Delivery`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Receipt {
    /// Kafka: the message's position; the offset committed for it is `offset + 1`.
    Kafka {
        topic: String,
        partition: i32,
        offset: i64,
    },
    /// RabbitMQ: the delivery tag on the channel of queue number `queue` of session number
    /// `session` (tags mean nothing on another session's channels).
    Amqp {
        session: u64,
        queue: usize,
        tag: u64,
    },
}

/// Why the consumer could not go on; consuming resumes after a backoff.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConsumeError {
    #[error("kafka consumer error")]
    Kafka(#[source] rdkafka::error::KafkaError),
    #[error("amqp error")]
    Amqp(#[source] lapin::Error),
    #[error("no amqp session within 30 s")]
    OpenTimeout,
    #[error("the broker cancelled the consumer of queue(s) {queue}")]
    Cancelled { queue: String },
}

/// A broker the inbox consumes from.
///
/// # Delivery contract
/// - **Acknowledged means written.** The inbox calls [`Consumer::acknowledge`] only with
///   deliveries whose rows (or rejections) its database transaction has committed; nothing is
///   acknowledged any other way (no auto-commit, no auto-ack). Until then a crash, a rebalance
///   or a lost connection makes the broker deliver them again, and the inbox's unique
///   (`consumer`, `event_id`) turns that into a skipped duplicate.
/// - **Never past the unwritten.** Acknowledging a delivery acknowledges it and, where the
///   broker acknowledges cumulatively (a Kafka offset, an AMQP `multiple` ack), every earlier
///   delivery of its partition or channel; the inbox gives every delivery it was handed, in the
///   order handed, so no earlier one is still unwritten.
/// - **Acknowledged while taking.** The inbox takes the next batch while the one before is
///   written, then acknowledges the earlier batch: later deliveries of the same partition or
///   channel are then out and unacknowledged, and stay so.
/// - **Order.** [`Consumer::next`] hands a partition's (queue's) messages in their order.
/// - **Failure.** An error from either call means the client's state is unknown: the inbox
///   drops the unacknowledged deliveries, backs off and reconnects with
///   [`Consumer::reconnect`]; the broker redelivers them.
pub(crate) trait Consumer: Send {
    /// The next message, waiting at most `wait`; `Ok(None)` when none came. Cancel-safe: the
    /// inbox drops a pending call (shutdown, or its write finished first), and a message not
    /// yet returned is returned by the next call.
    fn next(
        &mut self,
        wait: Duration,
    ) -> impl Future<Output = Result<Option<Delivery>, ConsumeError>> + Send;

    /// Acknowledges the deliveries of `receipts` (see the contract).
    fn acknowledge(
        &mut self,
        receipts: &[Receipt],
    ) -> impl Future<Output = Result<(), ConsumeError>> + Send;

    /// Drops the session and opens a new one (after an error).
    fn reconnect(&mut self) -> impl Future<Output = Result<(), ConsumeError>> + Send;

    /// Leaves cleanly at shutdown (Kafka: commits nothing more and leaves the group, so its
    /// partitions move at once instead of after the session timeout).
    fn close(&mut self) -> impl Future<Output = ()> + Send;
}
