//! `database.layout` and `[database.columns]`: which of the table's columns hold each part of
//! an event. Shared by every database family; each quotes the names its own way.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;

use crate::constraint::{ConfigError, invalid};
use crate::outbox::Layout;

/// `[database.columns]`: the table's column for each logical column; a key left out keeps the
/// layout's default, an empty string maps an optional column to none.
#[derive(Debug, Default, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ColumnsConfig {
    /// The ordering column (`bigint` or `integer`, ascending with inserts, unique). Default `id`
    /// (`relay_seq` with the Debezium layout, added by `migrate` when the table lacks it).
    pub id: Option<String>,
    /// The event id (`uuid` or text). Default `event_id` (Debezium: `id`).
    pub event_id: Option<String>,
    /// Default `aggregate_type` (Debezium: `aggregatetype`); the `{aggregate_type}` of
    /// destination templates.
    pub aggregate_type: Option<String>,
    /// The ordering key and Kafka key. Default `aggregate_id` (Debezium: `aggregateid`).
    pub aggregate_id: Option<String>,
    /// Default `event_type` (Debezium: `type`).
    pub event_type: Option<String>,
    /// The message value: `jsonb`, `json`, text or `bytea`, sent as stored; NULL sends no value
    /// (a tombstone). Default `payload`.
    pub payload: Option<String>,
    /// A JSON object column whose members become headers (default `headers`; the Debezium
    /// layout has none), or a table from column to header name (`[database.columns.headers]`,
    /// a header name `"*"` marks the JSON object column among them).
    #[cfg_attr(test, schemars(with = "Option<BTreeMap<String, String>>"))]
    pub headers: Option<HeadersConfig>,
    /// The creation time (`timestamptz`, or `timestamp` read as UTC): the message timestamp.
    /// Default `created_at` (Debezium: none; the message then carries its send time).
    pub created_at: Option<String>,
}

/// `database.columns.headers`: one JSON column, or columns of their own.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum HeadersConfig {
    /// The JSON object column.
    Column(String),
    /// Column name → header name.
    Columns(BTreeMap<String, String>),
}

/// The mapping, parsed: column names as the table spells them (not quoted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Columns {
    pub(crate) id: String,
    pub(crate) event_id: String,
    pub(crate) aggregate_type: String,
    pub(crate) aggregate_id: String,
    pub(crate) event_type: String,
    pub(crate) payload: String,
    /// The JSON object column whose members become headers.
    pub(crate) headers: Option<String>,
    /// Columns sent as headers of their own: (column, header name), in header-name order.
    pub(crate) header_columns: Vec<(String, Arc<str>)>,
    pub(crate) created_at: Option<String>,
}

/// The relay's own columns: a mapping may not point at them.
pub(crate) const RELAY_OWNED: &[&str] = &[
    "published_at",
    "attempts",
    "next_attempt_at",
    "last_error",
    "dead_lettered_at",
    "unsettled_attempts",
    "deferrals",
];

/// The ordering column `migrate` adds to a Debezium-layout table that has none.
pub(crate) const DEBEZIUM_ORDERING: &str = "relay_seq";

impl Columns {
    /// The layout `migrate` creates.
    pub(crate) fn relay() -> Self {
        Self {
            id: "id".into(),
            event_id: "event_id".into(),
            aggregate_type: "aggregate_type".into(),
            aggregate_id: "aggregate_id".into(),
            event_type: "event_type".into(),
            payload: "payload".into(),
            headers: Some("headers".into()),
            header_columns: Vec::new(),
            created_at: Some("created_at".into()),
        }
    }

    /// Debezium's outbox table (`id`, `aggregatetype`, `aggregateid`, `type`, `payload`), with
    /// the relay's ordering column.
    pub(crate) fn debezium() -> Self {
        Self {
            id: DEBEZIUM_ORDERING.into(),
            event_id: "id".into(),
            aggregate_type: "aggregatetype".into(),
            aggregate_id: "aggregateid".into(),
            event_type: "type".into(),
            payload: "payload".into(),
            headers: None,
            header_columns: Vec::new(),
            created_at: None,
        }
    }

    /// The layout's defaults with `config` applied over them.
    pub(crate) fn parse(
        layout: Layout,
        config: Option<&ColumnsConfig>,
    ) -> Result<Self, ConfigError> {
        let mut columns = match layout {
            Layout::Relay => Self::relay(),
            Layout::Debezium => Self::debezium(),
        };
        let Some(config) = config else {
            return Ok(columns);
        };
        let required = |key: &str, value: &Option<String>, slot: &mut String| {
            if let Some(name) = value {
                *slot = column_name(&format!("database.columns.{key}"), name)?;
            }
            Ok::<_, ConfigError>(())
        };
        required("id", &config.id, &mut columns.id)?;
        required("event_id", &config.event_id, &mut columns.event_id)?;
        required(
            "aggregate_type",
            &config.aggregate_type,
            &mut columns.aggregate_type,
        )?;
        required(
            "aggregate_id",
            &config.aggregate_id,
            &mut columns.aggregate_id,
        )?;
        required("event_type", &config.event_type, &mut columns.event_type)?;
        required("payload", &config.payload, &mut columns.payload)?;
        if let Some(created_at) = &config.created_at {
            columns.created_at = optional("database.columns.created_at", created_at)?;
        }
        match &config.headers {
            None => {}
            Some(HeadersConfig::Column(name)) => {
                columns.headers = optional("database.columns.headers", name)?;
            }
            Some(HeadersConfig::Columns(map)) => {
                columns.headers = None;
                let mut by_header: Vec<(String, Arc<str>)> = Vec::new();
                for (column, header) in map {
                    let key = format!("database.columns.headers.{column}");
                    let column = column_name(&key, column)?;
                    if header == "*" {
                        if columns.headers.replace(column).is_some() {
                            return Err(invalid(
                                key,
                                "is a second JSON headers column (\"*\"); at most one",
                            ));
                        }
                    } else if header.is_empty() || header.len() > 255 {
                        return Err(invalid(key, "must be a header name of 1 to 255 bytes"));
                    } else {
                        by_header.push((column, header.as_str().into()));
                    }
                }
                by_header.sort_by(|a, b| a.1.cmp(&b.1));
                columns.header_columns = by_header;
            }
        }
        if columns.id == columns.event_id {
            return Err(invalid(
                "database.columns.id",
                "must differ from database.columns.event_id (the ordering column is a number the database assigns)",
            ));
        }
        Ok(columns)
    }

    /// Whether this is the layout `migrate` creates, under its own names.
    pub(crate) fn is_relay_default(&self) -> bool {
        *self == Self::relay()
    }

    /// Each logical column and the table's column behind it, then each header column as
    /// `column as header` (`check` prints them).
    pub(crate) fn mapped(&self) -> Vec<(&'static str, String)> {
        let mut out: Vec<(&'static str, String)> = [
            ("id", &self.id),
            ("event_id", &self.event_id),
            ("aggregate_type", &self.aggregate_type),
            ("aggregate_id", &self.aggregate_id),
            ("event_type", &self.event_type),
            ("payload", &self.payload),
        ]
        .into_iter()
        .map(|(logical, column)| (logical, column.clone()))
        .collect();
        if let Some(headers) = &self.headers {
            out.push(("headers", headers.clone()));
        }
        if let Some(created_at) = &self.created_at {
            out.push(("created_at", created_at.clone()));
        }
        for (column, header) in &self.header_columns {
            out.push(("header", format!("{column} as {header}")));
        }
        out
    }
}

/// A column name as the table spells it: 1 to 63 bytes, no double quote, backtick or NUL (so
/// that quoting it is safe in every SQL dialect the relay speaks), not one of the relay's own.
fn column_name(key: &str, name: &str) -> Result<String, ConfigError> {
    if name.is_empty()
        || name.len() > 63
        || name.contains(['"', '`', '\0'])
        || name.chars().any(char::is_control)
    {
        return Err(invalid(
            key,
            "must be a column name of 1 to 63 bytes without quotes, backticks or control characters",
        ));
    }
    if RELAY_OWNED.contains(&name) {
        return Err(invalid(
            key,
            format!("names {name}, a column the relay owns"),
        ));
    }
    Ok(name.to_owned())
}

fn optional(key: &str, name: &str) -> Result<Option<String>, ConfigError> {
    if name.is_empty() {
        Ok(None)
    } else {
        column_name(key, name).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(value: serde_json::Value) -> ColumnsConfig {
        serde_json::from_value(value).expect("a columns table")
    }

    #[test]
    fn the_debezium_layout_presets_the_routers_columns_and_a_mapping_overrides_them() {
        let debezium = Columns::parse(Layout::Debezium, None).unwrap();
        assert_eq!(debezium.event_id, "id");
        assert_eq!(debezium.aggregate_type, "aggregatetype");
        assert_eq!(debezium.id, DEBEZIUM_ORDERING);
        assert!(debezium.headers.is_none() && debezium.created_at.is_none());
        let custom = Columns::parse(
            Layout::Debezium,
            Some(&config(serde_json::json!({
                "aggregate_id": "customer",
                "created_at": "timestamp",
                "headers": {"type": "eventType", "meta": "*"},
            }))),
        )
        .unwrap();
        assert_eq!(custom.aggregate_id, "customer");
        assert_eq!(custom.created_at.as_deref(), Some("timestamp"));
        assert_eq!(custom.headers.as_deref(), Some("meta"));
        assert_eq!(
            custom.header_columns,
            [("type".to_owned(), Arc::<str>::from("eventType"))]
        );
        assert!(!custom.is_relay_default());
        assert!(
            Columns::parse(Layout::Relay, None)
                .unwrap()
                .is_relay_default()
        );
    }

    #[test]
    fn bad_mappings_name_the_key() {
        use serde_json::json;
        for (value, key) in [
            (json!({"payload": "pay\"load"}), "database.columns.payload"),
            (
                json!({"event_id": "published_at"}),
                "database.columns.event_id",
            ),
            (json!({"id": ""}), "database.columns.id"),
            (json!({"id": "event_id"}), "database.columns.id"),
            (
                json!({"headers": {"a": "*", "b": "*"}}),
                "database.columns.headers.b",
            ),
            (json!({"headers": {"a": ""}}), "database.columns.headers.a"),
        ] {
            let err = Columns::parse(Layout::Relay, Some(&config(value.clone()))).unwrap_err();
            assert!(err.to_string().contains(key), "{value}: {err}");
        }
        let none = Columns::parse(Layout::Relay, Some(&config(json!({"created_at": ""})))).unwrap();
        assert_eq!(none.created_at, None);
    }
}
