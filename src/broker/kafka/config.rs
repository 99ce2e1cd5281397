//! `[broker.kafka]`: the section as written, the passthrough policy for librdkafka
//! properties, and the settings the producer is created from.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rdkafka::ClientConfig;
use serde::Deserialize;

use super::partitions::OnPartitionChange;
use crate::broker::template::Template;
use crate::constraint::at_least;
use crate::constraint::{ConfigError, host_of, invalid, is_loopback};

/// `[broker.kafka]`
#[derive(Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma-separated `host:port`.
    pub brokers: String,
    /// Topic template; placeholders `{aggregate_type}` and `{event_type}`. Default `outbox.event.{aggregate_type}`.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// librdkafka properties passed through (`compression.type`, `security.protocol`, ...).
    /// `acks`, `enable.idempotence` and `enable.gapless.guarantee` cannot be weakened. TOML's dotted keys
    /// (`compression.type = "lz4"`) and quoted keys are both accepted; values may be strings,
    /// numbers or booleans.
    #[cfg_attr(test, schemars(with = "BTreeMap<String, String>"))]
    #[serde(default, deserialize_with = "flat_properties")]
    pub properties: BTreeMap<String, String>,
    /// Allows properties that weaken durability or certificate verification (`acks`,
    /// `enable.idempotence`, `enable.gapless.guarantee`, `enable.ssl.certificate.verification`, ...). Default false.
    #[serde(default, rename = "unsafe")]
    pub allow_unsafe: bool,
    /// Allows `security.protocol` plaintext or sasl_plaintext (the former is librdkafka's
    /// default) with brokers that are not loopback. Default false: refused; use `ssl` or
    /// `sasl_ssl`.
    #[serde(default)]
    pub allow_insecure_transport: bool,
    /// What a topic's changed partition count does: `"pause"` publishing to it until
    /// `outbox-relay partitions --accept TOPIC`, or `"continue"` (logged and counted either
    /// way). Default "pause".
    #[serde(default)]
    pub on_partition_change: OnPartitionChange,
    /// How often the partition counts of the topics written to are compared with the recorded
    /// ones. Default 30s.
    #[cfg_attr(test, schemars(with = "String"))]
    #[serde(default = "default_partition_check_interval", with = "humantime_serde")]
    pub partition_check_interval: Duration,
}

fn default_partition_check_interval() -> Duration {
    Duration::from_secs(30)
}

impl fmt::Debug for KafkaConfig {
    // Properties may hold secrets (`sasl.password`, `ssl.key.password`, ...): only their names.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("properties", &self.properties.keys().collect::<Vec<_>>())
            .field("allow_unsafe", &self.allow_unsafe)
            .field("allow_insecure_transport", &self.allow_insecure_transport)
            .field("on_partition_change", &self.on_partition_change)
            .field("partition_check_interval", &self.partition_check_interval)
            .finish()
    }
}

/// `[broker.kafka]`, parsed and checked by librdkafka.
#[derive(Clone)]
pub(crate) struct KafkaSettings {
    /// The producer's properties: the user's, under the relay's own (see `client_config`).
    pub(crate) client: ClientConfig,
    /// `broker.kafka.topic`.
    pub(crate) topic: Template,
    pub(crate) on_partition_change: OnPartitionChange,
    pub(crate) partition_check_interval: Duration,
}

impl fmt::Debug for KafkaSettings {
    // ClientConfig's Debug shows the properties, and some may be secrets: show none.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSettings")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

/// The relay's producer settings, applied over the user's properties. `acks` and idempotence
/// carry the delivery guarantee; the config validation refuses any other value for them.
fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("client.id", "outbox-relay")
        .set("linger.ms", "5")
        // The Java producer's placement (murmur2 over the key bytes, positive, modulo the
        // partition count), as Kafka Streams, Debezium and Kafka Connect use it: a topic also
        // written by them keeps each key on one partition. librdkafka's own default,
        // `consistent_random` (CRC32), would put the same key elsewhere. Overridable.
        .set("partitioner", "murmur2_random")
        .set(
            "message.timeout.ms",
            KAFKA_DEFAULT_MESSAGE_TIMEOUT.as_millis().to_string(),
        );
    for (key, value) in &config.properties {
        client.set(key, value);
    }
    client
        .set("bootstrap.servers", &config.brokers)
        .set("enable.idempotence", "true")
        // A batch the broker refused for good (say MSG_SIZE_TOO_LARGE) would otherwise leave
        // a gap: the producer goes on with the partition's later messages, so an aggregate's
        // later events land before the failed one is retried. With the guarantee, such an
        // error is fatal instead: the later messages fail too (and are retried in order), and
        // the producer is replaced (`recover_from_fatal`).
        .set("enable.gapless.guarantee", "true")
        .set("acks", "all");
    client
}

/// librdkafka properties that carry the delivery guarantee or transport security, with the
/// value the relay requires; any other value needs `unsafe = true`.
const KAFKA_GUARDED: &[(&str, &str)] = &[
    ("acks", "all"),
    ("request.required.acks", "all"),
    ("enable.idempotence", "true"),
    ("enable.gapless.guarantee", "true"),
    ("enable.ssl.certificate.verification", "true"),
    ("ssl.endpoint.identification.algorithm", "https"),
    ("enable.sasl.oauthbearer.unsecure.jwt", "false"),
];

/// Properties the relay owns.
const KAFKA_OWNED: &[&str] = &["bootstrap.servers", "metadata.broker.list"];

/// Properties that load code or run commands: never accepted.
const KAFKA_FORBIDDEN: &[&str] = &[
    "plugin.library.paths",
    "ssl.engine.location",
    "ssl.engine.id",
    "sasl.kerberos.kinit.cmd",
    "sasl.oauthbearer.token.endpoint.url",
    // loads OpenSSL provider modules (shared objects)
    "ssl.providers",
];

/// Passthrough allow-list: exact names and `prefix.*` families of producer, network, TLS and
/// SASL settings. Anything else is refused, naming the property.
const KAFKA_ALLOWED: &[&str] = &[
    "client.id",
    "client.rack",
    "client.dns.lookup",
    "compression.*",
    "linger.ms",
    "batch.*",
    "queue.buffering.*",
    "message.*",
    "delivery.timeout.ms",
    "request.timeout.ms",
    "socket.*",
    "retry.*",
    "retries",
    "reconnect.*",
    "topic.metadata.*",
    "metadata.*",
    "max.in.flight*",
    "api.version.*",
    "broker.*",
    "connections.max.idle.ms",
    "partitioner",
    "sticky.*",
    "statistics.interval.ms",
    "log_level",
    "log.*",
    "debug",
    "security.protocol",
    "ssl.*",
    "ssl_key",
    "sasl.*",
    "enable.ssl.certificate.verification",
    "enable.sasl.oauthbearer.unsecure.jwt",
    "acks",
    "request.required.acks",
    "enable.idempotence",
    "enable.gapless.guarantee",
    "allow.auto.create.topics",
    "receive.message.max.bytes",
    "resolve.canonical.bootstrap.servers.only",
];

/// The checks every Kafka client's passthrough properties get, producer and consumer alike
/// (`section` is where they are written): no plaintext to a remote broker unless allowed, none
/// of `owned`, nothing that loads code, only what `allowed` lists (exact names and `prefix*`).
pub(crate) fn check_passthrough(
    section: &str,
    brokers: &str,
    properties: &BTreeMap<String, String>,
    allow_insecure_transport: bool,
    owned: &[&str],
    allowed: &[&str],
) -> Result<(), ConfigError> {
    let protocol = properties
        .get("security.protocol")
        .map_or("plaintext".to_owned(), |p| p.to_ascii_lowercase());
    if !matches!(protocol.as_str(), "ssl" | "sasl_ssl") && !allow_insecure_transport {
        let remote = brokers
            .split(',')
            .map(str::trim)
            .filter(|b| !b.is_empty())
            .find(|b| !is_loopback(host_of(b)));
        if let Some(broker) = remote {
            return Err(invalid(
                format!("{section}.properties.\"security.protocol\""),
                format!(
                    "is {protocol}, which sends events and credentials unencrypted to {broker}; use ssl or sasl_ssl, or set {section}.allow_insecure_transport = true"
                ),
            ));
        }
    }
    for key in properties.keys() {
        let name = || format!("{section}.properties.\"{key}\"");
        if owned.contains(&key.as_str()) {
            return Err(invalid(
                name(),
                "is set by the relay (from its own keys) and cannot be overridden",
            ));
        }
        if KAFKA_FORBIDDEN.contains(&key.as_str()) {
            return Err(invalid(
                name(),
                "is refused: it loads code or runs a command",
            ));
        }
        let listed = allowed
            .iter()
            .any(|pattern| match pattern.strip_suffix('*') {
                Some(prefix) => key.starts_with(prefix),
                None => key == pattern,
            });
        if !listed {
            return Err(invalid(
                name(),
                "is not in the passthrough allow-list (see README)",
            ));
        }
    }
    Ok(())
}

impl KafkaConfig {
    /// Checks the section, the property policy and, through librdkafka, every property name
    /// and value (no client is created, nothing connects), and parses it; `lease` is
    /// `relay.lease_duration`, which must cover two delivery timeouts.
    pub(crate) fn validate(&self, lease: Duration) -> Result<KafkaSettings, ConfigError> {
        if self.brokers.split(',').all(|b| b.trim().is_empty()) {
            return Err(invalid(
                "broker.kafka.brokers",
                "must name at least one host:port",
            ));
        }
        let topic = Template::parse(&self.topic).map_err(|c| invalid("broker.kafka.topic", c))?;
        check_passthrough(
            "broker.kafka",
            &self.brokers,
            &self.properties,
            self.allow_insecure_transport,
            KAFKA_OWNED,
            KAFKA_ALLOWED,
        )?;
        for (key, value) in &self.properties {
            let name = || format!("broker.kafka.properties.\"{key}\"");
            if let Some((_, required)) = KAFKA_GUARDED.iter().find(|(k, _)| k == key) {
                let same =
                    value.eq_ignore_ascii_case(required) || (*required == "all" && value == "-1");
                if !same && !self.allow_unsafe {
                    return Err(invalid(
                        name(),
                        format!(
                            "must stay \"{required}\" (it guards delivery or transport security); set broker.kafka.unsafe = true to override"
                        ),
                    ));
                }
            }
        }
        // librdkafka checks every property name and value when building its configuration
        // (no client is created, nothing connects). This is the one check: the producer is
        // created from the same `ClientConfig`.
        let client = client_config(self);
        client.create_native_config().map_err(|err| {
            invalid(
                "broker.kafka.properties",
                format!("rejected by librdkafka: {err}"),
            )
        })?;
        let timeout = self.message_timeout();
        // 0 is librdkafka's "no limit": a delivery could outlive any lease.
        if timeout.is_zero() {
            return Err(invalid(
                "broker.kafka.properties.message.timeout.ms",
                "must be above 0 (0 means no delivery timeout, which no lease can cover)",
            ));
        }
        if timeout * 2 > lease {
            return Err(invalid(
                "relay.lease_duration",
                format!(
                    "must be at least twice the Kafka delivery timeout (message.timeout.ms = {} ms)",
                    timeout.as_millis()
                ),
            ));
        }
        at_least(
            "broker.kafka.partition_check_interval",
            self.partition_check_interval,
            Duration::from_secs(1),
        )?;
        Ok(KafkaSettings {
            client,
            topic,
            on_partition_change: self.on_partition_change,
            partition_check_interval: self.partition_check_interval,
        })
    }

    /// librdkafka's delivery timeout as the relay will configure it.
    pub(crate) fn message_timeout(&self) -> Duration {
        ["message.timeout.ms", "delivery.timeout.ms"]
            .iter()
            .find_map(|k| self.properties.get(*k))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(KAFKA_DEFAULT_MESSAGE_TIMEOUT, Duration::from_millis)
    }
}

/// A property value as TOML (or the environment) gives it; nested tables come from dotted keys.
#[derive(Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(untagged)]
enum PropertyValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
    Table(BTreeMap<String, PropertyValue>),
}

/// Flattens `{compression: {type: "lz4"}}` into `{"compression.type": "lz4"}`.
pub(crate) fn flat_properties<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    fn flatten(prefix: &str, value: PropertyValue, out: &mut BTreeMap<String, String>) {
        let text = match value {
            PropertyValue::Bool(b) => b.to_string(),
            PropertyValue::Int(i) => i.to_string(),
            PropertyValue::Float(f) => f.to_string(),
            PropertyValue::Text(t) => t,
            PropertyValue::Table(table) => {
                for (key, value) in table {
                    flatten(&format!("{prefix}{key}."), value, out);
                }
                return;
            }
        };
        out.insert(prefix.trim_end_matches('.').to_owned(), text);
    }
    let top = BTreeMap::<String, PropertyValue>::deserialize(d)?;
    let mut out = BTreeMap::new();
    for (key, value) in top {
        flatten(&format!("{key}."), value, &mut out);
    }
    Ok(out)
}

/// The relay's default for librdkafka `message.timeout.ms` (librdkafka's own is 5 minutes, which
/// would force very long leases).
pub(crate) const KAFKA_DEFAULT_MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);

fn default_topic() -> String {
    "outbox.event.{aggregate_type}".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(properties: &[(&str, &str)]) -> KafkaConfig {
        KafkaConfig {
            brokers: "127.0.0.1:9092".to_owned(),
            topic: default_topic(),
            properties: properties
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            allow_unsafe: false,
            allow_insecure_transport: false,
            on_partition_change: OnPartitionChange::Pause,
            partition_check_interval: default_partition_check_interval(),
        }
    }

    #[test]
    fn keys_are_placed_as_the_java_producer_places_them_unless_configured_otherwise() {
        let default = config(&[]).validate(Duration::from_secs(120)).unwrap();
        assert_eq!(default.client.get("partitioner"), Some("murmur2_random"));
        let old = config(&[("partitioner", "consistent_random")])
            .validate(Duration::from_secs(120))
            .unwrap();
        assert_eq!(old.client.get("partitioner"), Some("consistent_random"));
    }
}
