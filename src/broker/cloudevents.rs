//! `[broker.cloudevents]`: CloudEvents 1.0 in binary content mode. The event stays the message
//! value; its attributes travel as headers: `ce_*` on Kafka (the Kafka protocol binding), and
//! `amqp_header_prefix` + name on RabbitMQ (the AMQP binding's application properties, with
//! the media type in `content_type`).

use chrono::SecondsFormat;
use serde::Deserialize;

use crate::constraint::{ConfigError, invalid};
use crate::outbox::OutboxRow;

/// `[broker.cloudevents]`
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct CloudEventsConfig {
    /// The `source` attribute of every event, a URI-reference (`/billing`, `urn:svc:billing`,
    /// `https://billing.example.com`). Required.
    pub source: String,
    /// Prefix of the attribute headers on RabbitMQ. Default `cloudEvents:`.
    #[serde(default = "default_amqp_prefix")]
    pub amqp_header_prefix: String,
}

fn default_amqp_prefix() -> String {
    "cloudEvents:".to_owned()
}

/// `[broker.cloudevents]`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CloudEvents {
    source: String,
    amqp_header_prefix: String,
}

impl CloudEventsConfig {
    pub(crate) fn validate(&self) -> Result<CloudEvents, ConfigError> {
        // A URI-reference (RFC 3986) is never empty here and holds no whitespace, control
        // characters or characters URIs exclude.
        if self.source.is_empty()
            || self
                .source
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || "<>\"{}|\\^`".contains(c))
        {
            return Err(invalid(
                "broker.cloudevents.source",
                "must be a non-empty URI-reference (e.g. \"/billing\" or \"urn:svc:billing\") without spaces",
            ));
        }
        if self.amqp_header_prefix.is_empty() || self.amqp_header_prefix.len() > 64 {
            return Err(invalid(
                "broker.cloudevents.amqp_header_prefix",
                "must be 1 to 64 bytes",
            ));
        }
        Ok(CloudEvents {
            source: self.source.clone(),
            amqp_header_prefix: self.amqp_header_prefix.clone(),
        })
    }
}

/// Where the attributes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Binding {
    Kafka,
    Amqp,
}

impl CloudEvents {
    /// The event's attributes as headers for `binding`: `specversion` 1.0, `id` = the event
    /// id, `source`, `type` = the event type, `subject` = the aggregate id, `time` = the
    /// creation time (RFC 3339 in UTC, microseconds; absent when the table maps no creation
    /// column) and, on Kafka, `content-type` for a JSON payload (on AMQP that is the message's
    /// `content_type` property).
    pub(crate) fn headers(&self, row: &OutboxRow, binding: Binding) -> Vec<(String, String)> {
        let prefix = match binding {
            Binding::Kafka => "ce_",
            Binding::Amqp => self.amqp_header_prefix.as_str(),
        };
        let mut out = vec![
            (format!("{prefix}specversion"), "1.0".to_owned()),
            (format!("{prefix}id"), row.event_id.clone()),
            (format!("{prefix}source"), self.source.clone()),
            (format!("{prefix}type"), row.event_type.clone()),
            (format!("{prefix}subject"), row.aggregate_id.clone()),
        ];
        if let Some(created_at) = row.created_at {
            out.push((
                format!("{prefix}time"),
                created_at.to_rfc3339_opts(SecondsFormat::Micros, true),
            ));
        }
        if binding == Binding::Kafka
            && let Some(content_type) = row.payload.content_type()
        {
            out.push(("content-type".to_owned(), content_type.to_owned()));
        }
        out
    }

    /// Whether `name` is one of the attribute headers for `binding` (a row's own header of
    /// that name is dropped).
    pub(crate) fn owns(&self, name: &str, binding: Binding) -> bool {
        match binding {
            Binding::Kafka => name.starts_with("ce_") || name == "content-type",
            Binding::Amqp => name.starts_with(self.amqp_header_prefix.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events() -> CloudEvents {
        CloudEventsConfig {
            source: "/billing".to_owned(),
            amqp_header_prefix: default_amqp_prefix(),
        }
        .validate()
        .unwrap()
    }

    #[test]
    fn attributes_follow_each_binding() {
        let mut row = OutboxRow::sample(1, "o-1");
        row.created_at = chrono::DateTime::from_timestamp_millis(1_767_323_045_678);
        let kafka = events().headers(&row, Binding::Kafka);
        let names: Vec<&str> = kafka.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "ce_specversion",
                "ce_id",
                "ce_source",
                "ce_type",
                "ce_subject",
                "ce_time",
                "content-type"
            ]
        );
        assert_eq!(kafka[5].1, "2026-01-02T03:04:05.678000Z");
        let amqp = events().headers(&row, Binding::Amqp);
        assert_eq!(amqp[0].0, "cloudEvents:specversion");
        assert_eq!(amqp.len(), 6, "the media type is a property on AMQP");
    }

    #[test]
    fn a_source_that_is_no_uri_reference_is_refused() {
        for bad in ["", "with space", "a\nb", "x<y"] {
            let err = CloudEventsConfig {
                source: bad.to_owned(),
                amqp_header_prefix: default_amqp_prefix(),
            }
            .validate()
            .unwrap_err();
            assert!(
                err.to_string().contains("broker.cloudevents.source"),
                "{err}"
            );
        }
    }
}
