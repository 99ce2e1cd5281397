//! The inbox direction: messages from Kafka or RabbitMQ into the consumer's inbox table,
//! deduplicated on (`consumer`, `event_id`), acknowledged only after the database commit.
//!
//! This module holds what the inbox records about a message and the pure decision of how a
//! [`Delivery`] becomes a row or a rejection ([`entry`]); [`store::InboxStore`] is what it
//! needs from a database; [`ingest`] the loop (take a batch, write it in one transaction,
//! acknowledge); [`config`] the `[inbox]` section.

pub(crate) mod config;
pub(crate) mod ingest;
pub(crate) mod store;

use std::fmt;

use crate::broker::consumer::{Delivery, HeaderValue};
use config::MissingEventId;

/// Headers the event id is read from, in this order (this relay's `event_id`, Debezium's
/// router's `id`, the CloudEvents Kafka binding's `ce_id` and AMQP binding's `cloudEvents:id`);
/// then the AMQP `message_id` property.
pub(crate) const EVENT_ID_HEADERS: &[&str] = &["event_id", "id", "ce_id", "cloudEvents:id"];
/// Headers the event type is read from, in order; then the AMQP `type` property.
const EVENT_TYPE_HEADERS: &[&str] = &["event_type", "ce_type", "cloudEvents:type"];
/// The longest event id accepted (a longer one is a rejected message).
pub(crate) const MAX_EVENT_ID: usize = 255;

/// What decides how a delivery is recorded (from `[inbox]`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rules {
    /// `inbox.max_message_bytes`: a larger message (body, key and headers) is rejected.
    pub(crate) max_message_bytes: usize,
    /// `inbox.missing_event_id`.
    pub(crate) missing_event_id: MissingEventId,
}

/// How one delivery is recorded: a row of the inbox, or a rejection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Entry {
    Row(InboxRow),
    Rejected(Rejected),
}

/// Where a message came from, as both tables record it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Origin {
    /// Topic or queue.
    pub(crate) source: String,
    /// Kafka partition and offset.
    pub(crate) partition: Option<i32>,
    pub(crate) offset: Option<i64>,
    /// The key as text: verbatim when it is UTF-8 without NUL, else `\x` and hex.
    pub(crate) message_key: Option<String>,
    /// The headers as a JSON object (see [`headers_json`]).
    pub(crate) headers: String,
}

/// A row of the inbox table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InboxRow {
    pub(crate) event_id: String,
    pub(crate) origin: Origin,
    pub(crate) event_type: Option<String>,
    pub(crate) aggregate_type: Option<String>,
    pub(crate) aggregate_id: Option<String>,
    pub(crate) content: Content,
}

/// A message's body: exactly one of the table's `payload` and `body` columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Content {
    /// The body is JSON: its text, for `payload` (jsonb).
    Json(String),
    /// Anything else, verbatim, for `body` (bytea); empty for a Kafka tombstone.
    Bytes(Vec<u8>),
}

/// A message the inbox cannot record as an event: it goes to `<inbox>_rejected`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rejected {
    pub(crate) origin: Origin,
    pub(crate) body: Option<Vec<u8>>,
    pub(crate) reason: Reason,
}

/// Why a message was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reason {
    /// None of the headers or properties the event id is read from is set.
    NoEventId,
    /// `inbox.missing_event_id = "derive"` needs a Kafka position; a RabbitMQ message has none.
    NoPosition,
    /// The event id is longer than [`MAX_EVENT_ID`] bytes or holds a NUL.
    BadEventId { len: usize },
    /// Over `inbox.max_message_bytes`.
    TooLarge { size: usize, limit: usize },
    /// The database refused the row (a value it cannot store); the message of its error.
    Refused(String),
}

impl Reason {
    /// The `reason` label of the rejected-messages counter.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Self::NoEventId | Self::NoPosition => "no_event_id",
            Self::BadEventId { .. } => "bad_event_id",
            Self::TooLarge { .. } => "too_large",
            Self::Refused(_) => "refused_by_database",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoEventId => write!(
                f,
                "no event id: none of the headers {} nor an AMQP message_id",
                EVENT_ID_HEADERS.join(", ")
            ),
            Self::NoPosition => f.write_str(
                "no event id, and inbox.missing_event_id = \"derive\" needs a Kafka position",
            ),
            Self::BadEventId { len } => write!(
                f,
                "event id of {len} bytes: at most {MAX_EVENT_ID} bytes of text without NUL"
            ),
            Self::TooLarge { size, limit } => write!(
                f,
                "message of {size} bytes exceeds inbox.max_message_bytes ({limit})"
            ),
            Self::Refused(error) => write!(f, "the database refused the row: {error}"),
        }
    }
}

/// Text PostgreSQL can store (no NUL), or `None`.
fn storable(text: &str) -> Option<String> {
    (!text.contains('\0')).then(|| text.to_owned())
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// The headers as one JSON object: a text value (UTF-8 without NUL) as a string, an AMQP
/// value of another type as its JSON, a header without value as `null`, and bytes that are not
/// storable text as `{"hex": "…"}`. A name that appears twice keeps its last value.
pub(crate) fn headers_json(headers: &[(String, HeaderValue)]) -> String {
    let mut object = serde_json::Map::new();
    for (name, value) in headers {
        let name = name.replace('\0', "\u{fffd}");
        let value = match value {
            HeaderValue::Null => serde_json::Value::Null,
            HeaderValue::Bytes(bytes) => match std::str::from_utf8(bytes).ok().and_then(storable) {
                Some(text) => serde_json::Value::String(text),
                None => serde_json::json!({ "hex": hex(bytes) }),
            },
            HeaderValue::Json(json) => {
                let text = json.to_string();
                if text.contains("\\u0000") {
                    serde_json::json!({ "hex": hex(text.as_bytes()) })
                } else {
                    json.clone()
                }
            }
        };
        object.insert(name, value);
    }
    serde_json::Value::Object(object).to_string()
}

/// The first header of `names` (in that order) with a text value; of a name given twice, the
/// last.
fn header<'d>(headers: &'d [(String, HeaderValue)], names: &[&str]) -> Option<&'d str> {
    names.iter().find_map(|name| {
        headers
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.text())
            .filter(|t| !t.is_empty())
    })
}

/// Whether `body` can go into a jsonb column: JSON (RFC 8259) without `\u0000`, which
/// PostgreSQL's jsonb cannot hold.
fn is_storable_json(body: &[u8]) -> bool {
    serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok()
        && !body.windows(6).any(|w| w == b"\\u0000")
}

/// The size [`Rules::max_message_bytes`] limits (and `inbox.max_batch_bytes` sums): body, key
/// and headers.
pub(crate) fn size(delivery: &Delivery) -> usize {
    let headers: usize = delivery
        .headers
        .iter()
        .map(|(name, value)| {
            name.len()
                + match value {
                    HeaderValue::Bytes(bytes) => bytes.len(),
                    HeaderValue::Json(json) => json.to_string().len(),
                    HeaderValue::Null => 0,
                }
        })
        .sum();
    delivery.body.as_ref().map_or(0, Vec::len) + delivery.key.as_ref().map_or(0, Vec::len) + headers
}

/// Why `delivery` cannot be recorded as an event, or its event id.
fn event_id(delivery: &Delivery, size: usize, rules: &Rules) -> Result<String, Reason> {
    if size > rules.max_message_bytes {
        return Err(Reason::TooLarge {
            size,
            limit: rules.max_message_bytes,
        });
    }
    let found = header(&delivery.headers, EVENT_ID_HEADERS)
        .or(delivery.message_id.as_deref().filter(|m| !m.is_empty()))
        .map(str::to_owned);
    let event_id = match (found, rules.missing_event_id, delivery.position) {
        (Some(id), _, _) => id,
        (None, MissingEventId::Reject, _) => return Err(Reason::NoEventId),
        (None, MissingEventId::Derive, Some((partition, offset))) => {
            format!("{}/{partition}/{offset}", delivery.source)
        }
        (None, MissingEventId::Derive, None) => return Err(Reason::NoPosition),
    };
    if event_id.len() > MAX_EVENT_ID || event_id.contains('\0') {
        return Err(Reason::BadEventId {
            len: event_id.len(),
        });
    }
    Ok(event_id)
}

/// How `delivery` is recorded: a row with its event id, or a rejection with its reason. Pure:
/// nothing a message holds makes it fail. `size` is [`size`] of `delivery` (the caller needs it
/// too, for the batch byte bound, so it is measured once).
pub(crate) fn entry(delivery: Delivery, size: usize, rules: &Rules) -> Entry {
    let event_id = event_id(&delivery, size, rules);
    let Delivery {
        source,
        position,
        key,
        headers,
        message_id: _,
        kind,
        body,
        receipt: _,
    } = delivery;
    let text = |value: Option<&str>| value.and_then(storable);
    let origin = Origin {
        source,
        partition: position.map(|(p, _)| p),
        offset: position.map(|(_, o)| o),
        message_key: key
            .as_deref()
            .map(|k| text(std::str::from_utf8(k).ok()).unwrap_or_else(|| format!("\\x{}", hex(k)))),
        headers: headers_json(&headers),
    };
    let event_id = match event_id {
        Ok(id) => id,
        Err(reason) => {
            return Entry::Rejected(Rejected {
                origin,
                body,
                reason,
            });
        }
    };
    // The Kafka key is the aggregate's id when the producer partitions by aggregate (this
    // relay, Debezium's router); a routing key is not.
    let kafka_key = position.and(key.as_deref());
    let aggregate_id = header(&headers, &["aggregate_id"])
        .or_else(|| kafka_key.and_then(|k| std::str::from_utf8(k).ok()));
    Entry::Row(InboxRow {
        event_id,
        event_type: text(header(&headers, EVENT_TYPE_HEADERS).or(kind.as_deref())),
        aggregate_type: text(header(&headers, &["aggregate_type"])),
        aggregate_id: text(aggregate_id),
        origin,
        content: match body {
            None => Content::Bytes(Vec::new()),
            Some(bytes) if is_storable_json(&bytes) => match String::from_utf8(bytes) {
                Ok(json) => Content::Json(json),
                Err(err) => Content::Bytes(err.into_bytes()),
            },
            Some(bytes) => Content::Bytes(bytes),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`entry`] with the size it is given in the loop.
    fn decide(delivery: Delivery, rules: &Rules) -> Entry {
        let size = size(&delivery);
        entry(delivery, size, rules)
    }
    use crate::broker::consumer::Receipt;

    fn rules() -> Rules {
        Rules {
            max_message_bytes: 1024,
            missing_event_id: MissingEventId::Reject,
        }
    }

    fn kafka(headers: &[(&str, &str)], body: &[u8]) -> Delivery {
        Delivery {
            source: "orders".into(),
            position: Some((2, 41)),
            key: Some(b"order-7".to_vec()),
            headers: headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), HeaderValue::Bytes(v.as_bytes().to_vec())))
                .collect(),
            message_id: None,
            kind: None,
            body: Some(body.to_vec()),
            receipt: Receipt::Kafka {
                topic: "orders".into(),
                partition: 2,
                offset: 41,
            },
        }
    }

    fn row(entry: Entry) -> InboxRow {
        match entry {
            Entry::Row(row) => row,
            Entry::Rejected(r) => panic!("rejected: {}", r.reason),
        }
    }

    fn reason(entry: Entry) -> Reason {
        match entry {
            Entry::Rejected(r) => r.reason,
            Entry::Row(row) => panic!("recorded as {}", row.event_id),
        }
    }

    #[test]
    fn the_event_id_comes_from_the_first_header_of_the_lookup_order_then_the_message_id() {
        let both = kafka(
            &[("ce_id", "ce"), ("event_id", "relay"), ("id", "dbz")],
            b"{}",
        );
        assert_eq!(row(decide(both.clone(), &rules())).event_id, "relay");
        let debezium = kafka(&[("ce_id", "ce"), ("id", "dbz")], b"{}");
        assert_eq!(row(decide(debezium.clone(), &rules())).event_id, "dbz");
        let cloudevents = kafka(&[("ce_id", "ce")], b"{}");
        assert_eq!(row(decide(cloudevents.clone(), &rules())).event_id, "ce");
        let mut amqp = kafka(&[], b"{}");
        amqp.message_id = Some("m-1".into());
        assert_eq!(row(decide(amqp.clone(), &rules())).event_id, "m-1");
    }

    #[test]
    fn a_message_without_an_event_id_is_rejected_unless_one_is_derived_from_its_position() {
        let none = kafka(&[("event_id", "")], b"{}");
        assert_eq!(reason(decide(none.clone(), &rules())), Reason::NoEventId);
        let derive = Rules {
            missing_event_id: MissingEventId::Derive,
            ..rules()
        };
        assert_eq!(row(decide(none.clone(), &derive)).event_id, "orders/2/41");
        let mut amqp = none.clone();
        amqp.position = None;
        assert_eq!(reason(decide(amqp.clone(), &derive)), Reason::NoPosition);
    }

    #[test]
    fn oversized_messages_and_unstorable_ids_are_rejected_with_their_reason() {
        let big = kafka(&[("event_id", "e")], &[b'x'; 1100]);
        assert!(matches!(
            reason(decide(big.clone(), &rules())),
            Reason::TooLarge { limit: 1024, .. }
        ));
        let long = "e".repeat(MAX_EVENT_ID + 1);
        let long = kafka(&[("event_id", &long)], b"{}");
        assert!(matches!(
            reason(decide(long.clone(), &rules())),
            Reason::BadEventId { .. }
        ));
        let nul = kafka(&[("event_id", "a\0b")], b"{}");
        assert!(matches!(
            reason(decide(nul.clone(), &rules())),
            Reason::BadEventId { .. }
        ));
    }

    #[test]
    fn a_json_body_is_payload_and_anything_else_is_kept_verbatim() {
        let json = row(decide(kafka(&[("event_id", "e")], br#"{"a":1}"#), &rules()));
        assert_eq!(json.content, Content::Json(r#"{"a":1}"#.into()));
        for body in [&b"not json"[..], b"\xff\xfe", br#"{"a":"\u0000"}"#, b""] {
            let got = row(decide(kafka(&[("event_id", "e")], body), &rules()));
            assert_eq!(got.content, Content::Bytes(body.to_vec()), "{body:?}");
        }
        let mut tombstone = kafka(&[("event_id", "e")], b"");
        tombstone.body = None;
        assert_eq!(
            row(decide(tombstone.clone(), &rules())).content,
            Content::Bytes(Vec::new())
        );
    }

    #[test]
    fn identity_columns_come_from_the_headers_and_the_kafka_key() {
        let relay = kafka(
            &[
                ("event_id", "e"),
                ("event_type", "created"),
                ("aggregate_type", "order"),
                ("aggregate_id", "order-9"),
            ],
            b"{}",
        );
        let got = row(decide(relay.clone(), &rules()));
        assert_eq!(got.event_type.as_deref(), Some("created"));
        assert_eq!(got.aggregate_type.as_deref(), Some("order"));
        assert_eq!(got.aggregate_id.as_deref(), Some("order-9"));
        assert_eq!(got.origin.partition, Some(2));
        assert_eq!(got.origin.offset, Some(41));
        let debezium = row(decide(kafka(&[("id", "e")], b"{}"), &rules()));
        assert_eq!(debezium.aggregate_id.as_deref(), Some("order-7"));
        let mut amqp = kafka(&[("event_id", "e")], b"{}");
        amqp.position = None;
        amqp.kind = Some("shipped".into());
        let got = row(decide(amqp.clone(), &rules()));
        assert_eq!(
            got.aggregate_id, None,
            "a routing key is not an aggregate id"
        );
        assert_eq!(got.event_type.as_deref(), Some("shipped"));
    }

    #[test]
    fn headers_become_one_json_object_postgresql_can_store() {
        let headers = vec![
            ("text".to_owned(), HeaderValue::Bytes(b"plain".to_vec())),
            ("binary".to_owned(), HeaderValue::Bytes(vec![0, 0xff])),
            ("none".to_owned(), HeaderValue::Null),
            ("count".to_owned(), HeaderValue::Json(serde_json::json!(3))),
            (
                "nul".to_owned(),
                HeaderValue::Json(serde_json::json!("a\0")),
            ),
        ];
        let json: serde_json::Value = serde_json::from_str(&headers_json(&headers)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "text": "plain",
                "binary": { "hex": "00ff" },
                "none": null,
                "count": 3,
                "nul": { "hex": hex(br#""a\u0000""#) },
            })
        );
        let mut binary_key = kafka(&[("event_id", "e")], b"{}");
        binary_key.key = Some(vec![0x00, 0x01]);
        let got = row(decide(binary_key.clone(), &rules()));
        assert_eq!(got.origin.message_key.as_deref(), Some("\\x0001"));
    }
}
