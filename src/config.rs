//! Configuration: one TOML file plus `OUTBOX_RELAY__SECTION__KEY` environment overrides.
//!
//! Every struct rejects unknown keys, durations are humantime strings (`"500ms"`, `"5m"`), and
//! [`Config::validate`] names the offending key and the constraint it broke. The reference file
//! `config/outbox-relay.toml` documents every key with its default; a unit test keeps the two in
//! step.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::outbox::Table;
use crate::publisher::template::Template;

/// Prefix of the environment variables that override file keys (`OUTBOX_RELAY__RELAY__BATCH_SIZE`).
pub const ENV_PREFIX: &str = "OUTBOX_RELAY";

/// The whole configuration of one relay process.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the outbox lives.
    pub database: DatabaseConfig,
    /// How rows are claimed and published.
    #[serde(default)]
    pub relay: RelayConfig,
    /// What happens to a row whose publish failed.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Which broker events go to.
    pub sink: SinkConfig,
    /// Log output.
    #[serde(default)]
    pub log: LogConfig,
    /// Health and metrics endpoints; absent: no listener.
    pub http: Option<HttpConfig>,
    /// Deletion of old published (and, optionally, dead-lettered) rows.
    #[serde(default)]
    pub retention: RetentionConfig,
}

/// `[retention]`
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Delete rows published longer ago than this; `"off"` keeps them. Default `7d`.
    #[cfg_attr(test, schemars(with = "String"))]
    #[serde(
        default = "default_retention_published",
        deserialize_with = "duration_or_off"
    )]
    pub published: Option<Duration>,
    /// Delete rows dead-lettered longer ago than this; `"off"` keeps them. Default `off`.
    #[cfg_attr(test, schemars(with = "String"))]
    #[serde(default, deserialize_with = "duration_or_off")]
    pub dead: Option<Duration>,
    /// How often to look for rows to delete. Default 1m.
    #[cfg_attr(test, schemars(with = "String"))]
    #[serde(default = "default_retention_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Rows per delete statement (each its own short transaction). Default 1000.
    #[serde(default = "default_retention_batch_size")]
    pub batch_size: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            published: default_retention_published(),
            dead: None,
            interval: default_retention_interval(),
            batch_size: default_retention_batch_size(),
        }
    }
}

fn default_retention_published() -> Option<Duration> {
    Some(Duration::from_secs(7 * 24 * 3600))
}
fn default_retention_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_retention_batch_size() -> u32 {
    1000
}

/// A humantime duration, or `"off"`.
fn duration_or_off<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    if text.trim().eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    humantime::parse_duration(text.trim())
        .map(Some)
        .map_err(|err| {
            serde::de::Error::custom(format!("expected a duration like \"7d\" or \"off\": {err}"))
        })
}

/// `[http]`
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the listener serving `/healthz`, `/readyz` and `/metrics`, e.g. `0.0.0.0:9187`.
    #[cfg_attr(test, schemars(with = "String"))]
    pub listen: std::net::SocketAddr,
}

/// `[database]`
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// PostgreSQL connection URL. Secret: never logged or printed (only host, port and database are).
    /// Give it here, in `OUTBOX_RELAY__DATABASE__URL`, or in a file named by `url_file`.
    #[serde(default)]
    #[cfg_attr(test, schemars(with = "Option<String>"))]
    pub url: Option<SecretString>,
    /// File holding the URL (e.g. a mounted Kubernetes Secret); trailing whitespace is ignored.
    pub url_file: Option<std::path::PathBuf>,
    /// Outbox table, optionally schema-qualified (`billing.outbox`). Default `outbox`.
    #[serde(default = "default_table")]
    pub table: String,
    /// Connections the relay keeps to the database (LISTEN uses one more). Default 4.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Whether `migrate` installs (true) or drops (false) the NOTIFY trigger. Default true.
    #[serde(default = "default_true")]
    pub notify_trigger: bool,
    /// Upper bound for one statement of the relay (the sessions' PostgreSQL `statement_timeout`);
    /// the relay also abandons an operation, and its connection, that got no answer within this
    /// plus 5 s (a connection that stopped answering). Default 30s.
    #[cfg_attr(test, schemars(with = "String"))]
    #[serde(default = "default_statement_timeout", with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// Allows a connection that may fall back to plaintext (`sslmode` disable, allow or prefer,
    /// the last being libpq's and sqlx's default) to a host that is not loopback. Default false:
    /// such a URL is refused; use `sslmode=verify-full` (with `sslrootcert` for a private CA).
    #[serde(default)]
    pub allow_insecure_transport: bool,
}

/// `[relay]`
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Most rows claimed and published as one batch. Default 2000 (BENCHMARKS.md: 33k / 37–41k
    /// / 41–44k ev/s to Kafka at 500 / 1000 / 2000); `max_batch_bytes` bounds the memory.
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    /// Most payload bytes in one batch (each payload's uncompressed stored size, about its
    /// JSON text, whatever PostgreSQL compressed it to on disk; summed in `id` order); a batch
    /// always takes at least one row. Bounds the
    /// relay's memory for large events: about `max_in_flight_batches` × this, plus the broker
    /// client's copies. Default 8388608 (8 MiB).
    #[serde(default = "default_max_batch_bytes")]
    pub max_batch_bytes: u64,
    /// Batches published at once; the next claim and the marking of earlier batches overlap
    /// the broker's work. Batches in flight never share an aggregate. Default 2.
    #[serde(default = "default_max_in_flight_batches")]
    pub max_in_flight_batches: u32,
    /// Claim only rows no uncommitted transaction can still precede (see README, "Guarantees", 4: late commits):
    /// a row committed after a later-id row of its aggregate is published first. Costs one
    /// `pg_locks` lookup per claim. Default true.
    #[serde(default = "default_true")]
    pub commit_order_guard: bool,
    /// Fallback poll when idle; always on, even with `listen`. Default 1s.
    #[cfg_attr(test, schemars(with = "String"))]
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Wake up on the table's NOTIFY trigger (a hint; polling stays the source of truth). Default true.
    #[serde(default = "default_true")]
    pub listen: bool,
    /// Time a claimed batch belongs to this instance before another one may take it over.
    /// Must exceed the broker's own delivery timeout. Default 2m.
    #[cfg_attr(test, schemars(with = "String"))]
    #[serde(default = "default_lease_duration", with = "humantime_serde")]
    pub lease_duration: Duration,
    /// Time allowed on SIGTERM/SIGINT to finish the batches in flight and flush the producer. Default 10s.
    #[cfg_attr(test, schemars(with = "String"))]
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Period of the info-level summary line (published, failed, pending, oldest pending age). Default 1m.
    #[cfg_attr(test, schemars(with = "String"))]
    #[serde(default = "default_summary_interval", with = "humantime_serde")]
    pub summary_interval: Duration,
}

/// `[retry]`
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Publish attempts of a row before it is dead-lettered. Default 10.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Delay before the first retry; doubles per attempt, with equal jitter (a random point in the upper half). Default 1s.
    #[cfg_attr(test, schemars(with = "String"))]
    #[serde(default = "default_initial_backoff", with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Cap of the retry delay, also of the pause after a broker or database outage. Default 5m.
    #[cfg_attr(test, schemars(with = "String"))]
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
    /// What a dead-lettered row does to the later rows of its aggregate: `park` holds them
    /// back until it is requeued (order kept), `skip` lets them pass (order explicitly broken).
    /// Default `park`.
    #[serde(default)]
    pub on_dead_letter: OnDeadLetter,
    /// Also publish a copy of every dead-lettered row to this destination (Kafka topic or AMQP
    /// exchange template, e.g. `outbox.dead.{aggregate_type}`), with headers
    /// `dead_letter_error` and `dead_letter_attempts`. The row stays dead-lettered in the table
    /// either way (the table is the record; a failed copy is logged). Default: none.
    #[serde(default)]
    pub dead_letter_destination: Option<String>,
}

/// `retry.on_dead_letter`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum OnDeadLetter {
    /// Later rows of the aggregate wait until the dead row is requeued.
    #[default]
    Park,
    /// Later rows of the aggregate are published; the aggregate's order is broken there.
    Skip,
}

/// `[sink]`: `kind` selects one of the sections below; the other may stay configured, so switching
/// brokers is one environment variable (`OUTBOX_RELAY__SINK__KIND`).
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// `kafka`, `rabbitmq`, or `discard` (benchmarks and dry runs: marks rows without sending).
    pub kind: SinkKind,
    /// `[sink.kafka]`, required when `kind = "kafka"`.
    pub kafka: Option<KafkaConfig>,
    /// `[sink.rabbitmq]`, required when `kind = "rabbitmq"`.
    pub rabbitmq: Option<RabbitMqConfig>,
    /// Destinations (Kafka topics, AMQP exchanges) rows may render to: exact names or
    /// `prefix*` patterns. Empty: any valid name. A row rendering another destination fails
    /// permanently (and is dead-lettered), so an application bug cannot route events anywhere.
    #[serde(default)]
    pub allowed_destinations: Vec<String>,
}

/// The brokers the relay can publish to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// Apache Kafka (or any Kafka-protocol broker).
    Kafka,
    /// RabbitMQ (AMQP 0-9-1).
    Rabbitmq,
    /// Sends nothing and counts every row as published: the database-side floor for
    /// benchmarks, and a dry run. Never use it where events matter.
    Discard,
}

/// `[sink.kafka]`
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
            .finish()
    }
}

/// `[sink.rabbitmq]`
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RabbitMqConfig {
    /// AMQP URL (`amqp://` or `amqps://`). Secret: never logged. Or `url_file`.
    #[serde(default)]
    #[cfg_attr(test, schemars(with = "Option<String>"))]
    pub url: Option<SecretString>,
    /// File holding the AMQP URL.
    pub url_file: Option<std::path::PathBuf>,
    /// Exchange template. Default `outbox`.
    #[serde(default = "default_exchange")]
    pub exchange: String,
    /// Routing-key template. Default `{aggregate_type}.{event_type}`.
    #[serde(default = "default_routing_key")]
    pub routing_key: String,
    /// Declare the exchange (durable, topic) if missing. Default true.
    #[serde(default = "default_true")]
    pub declare_exchange: bool,
    /// Time to wait for a publisher confirm. Default 30s.
    #[cfg_attr(test, schemars(with = "String"))]
    #[serde(default = "default_confirm_timeout", with = "humantime_serde")]
    pub confirm_timeout: Duration,
    /// Allows an `amqp://` (plaintext) URL to a host that is not loopback. Default false:
    /// refused; use `amqps://`.
    #[serde(default)]
    pub allow_insecure_transport: bool,
    /// `[sink.rabbitmq.tls]`: trust and client identity for `amqps://`. Absent: the system's
    /// root certificates and no client certificate.
    pub tls: Option<AmqpTlsConfig>,
}

/// `[sink.rabbitmq.tls]` (PEM files, read at start).
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct AmqpTlsConfig {
    /// CA certificates trusted for the broker's certificate, in addition to the system roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// Client certificate (chain) for mutual TLS; needs `key_file`.
    pub cert_file: Option<std::path::PathBuf>,
    /// Private key of `cert_file` (PKCS#8, PKCS#1 or SEC1). Secret: never logged.
    pub key_file: Option<std::path::PathBuf>,
}

/// `[log]`
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `json` or `text`. Default `json`.
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter (`info`, `outbox_relay=debug`); `RUST_LOG` overrides it. Default `info`.
    #[serde(default = "default_level")]
    pub level: String,
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line (for log shippers).
    #[default]
    Json,
    /// Human-readable lines.
    Text,
}

pub(crate) const DEFAULT_TABLE: &str = "outbox";
pub(crate) const DEFAULT_BATCH_SIZE: u32 = 2000;
pub(crate) const MAX_BATCH_SIZE: u32 = 10_000;

fn default_table() -> String {
    DEFAULT_TABLE.to_owned()
}
fn default_max_connections() -> u32 {
    4
}
fn default_statement_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_batch_size() -> u32 {
    DEFAULT_BATCH_SIZE
}
fn default_max_batch_bytes() -> u64 {
    8 * 1024 * 1024
}
fn default_max_in_flight_batches() -> u32 {
    2
}
fn default_poll_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_true() -> bool {
    true
}
fn default_lease_duration() -> Duration {
    Duration::from_secs(120)
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_summary_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_max_attempts() -> u32 {
    10
}
fn default_initial_backoff() -> Duration {
    Duration::from_secs(1)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(300)
}
fn default_topic() -> String {
    "outbox.event.{aggregate_type}".to_owned()
}
fn default_exchange() -> String {
    "outbox".to_owned()
}
fn default_routing_key() -> String {
    "{aggregate_type}.{event_type}".to_owned()
}
fn default_confirm_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_level() -> String {
    "info".to_owned()
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: default_batch_size(),
            max_batch_bytes: default_max_batch_bytes(),
            max_in_flight_batches: default_max_in_flight_batches(),
            commit_order_guard: true,
            poll_interval: default_poll_interval(),
            listen: true,
            lease_duration: default_lease_duration(),
            shutdown_timeout: default_shutdown_timeout(),
            summary_interval: default_summary_interval(),
        }
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
            on_dead_letter: OnDeadLetter::default(),
            dead_letter_destination: None,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::default(),
            level: default_level(),
        }
    }
}

/// Why a configuration was refused. Both variants mean exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or parsed, a key is unknown, or a value has the wrong type.
    #[error("cannot load configuration")]
    Load(#[source] config::ConfigError),
    /// A value parsed but breaks a constraint.
    #[error("invalid configuration: `{key}` {constraint}")]
    Invalid {
        /// Dotted key, e.g. `relay.batch_size`.
        key: String,
        /// What the value must satisfy.
        constraint: String,
    },
}

/// Whether `host` (a name or an address, IPv6 optionally in brackets) is this machine, where
/// plaintext never crosses a network.
fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.to_ascii_lowercase().ends_with(".localhost")
        || host.starts_with('/')
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The host of a `host:port` broker address (`[::1]:9092` included).
fn host_of(broker: &str) -> &str {
    let broker = broker.rsplit_once("://").map_or(broker, |(_, rest)| rest);
    if let Some(rest) = broker.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match broker.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.parse::<u16>().is_ok() => host,
        _ => broker,
    }
}

fn invalid(key: impl Into<String>, constraint: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        constraint: constraint.into(),
    }
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

fn kafka_allowed(key: &str) -> bool {
    KAFKA_ALLOWED
        .iter()
        .any(|pattern| match pattern.strip_suffix('*') {
            Some(prefix) => key.starts_with(prefix),
            None => key == *pattern,
        })
}

impl Config {
    /// Reads `path` (TOML) and applies `OUTBOX_RELAY__*` environment overrides, then validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let raw = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("__")
                    .separator("__"),
            )
            .build()
            .map_err(ConfigError::Load)?;
        let mut config: Config = raw.try_deserialize().map_err(ConfigError::Load)?;
        config.resolve_secret_files()?;
        config.validate()?;
        Ok(config)
    }

    /// Reads `*_file` keys: `database.url_file`, `sink.rabbitmq.url_file`, and any
    /// `sink.kafka.properties` key ending in `_file` (its value is the path; the property
    /// without the suffix gets the file's content, e.g. `"sasl.password_file"`).
    pub fn resolve_secret_files(&mut self) -> Result<(), ConfigError> {
        resolve_url(
            &mut self.database.url,
            self.database.url_file.as_deref(),
            "database.url",
        )?;
        if let Some(rabbit) = &mut self.sink.rabbitmq {
            resolve_url(
                &mut rabbit.url,
                rabbit.url_file.as_deref(),
                "sink.rabbitmq.url",
            )?;
        }
        if let Some(kafka) = &mut self.sink.kafka {
            let files: Vec<(String, String)> = kafka
                .properties
                .iter()
                .filter(|(k, _)| k.ends_with("_file"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            for (key, path) in files {
                kafka.properties.remove(&key);
                let property = key.trim_end_matches("_file").to_owned();
                let value = read_secret(
                    std::path::Path::new(&path),
                    &format!("sink.kafka.properties.\"{key}\""),
                )?;
                kafka
                    .properties
                    .insert(property, value.expose_secret().to_owned());
            }
        }
        Ok(())
    }

    /// Checks every constraint serde cannot express; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let url = self
            .database
            .url
            .as_ref()
            .ok_or_else(|| invalid("database.url", "is required (or database.url_file)"))?
            .expose_secret();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(invalid(
                "database.url",
                "must be a postgres:// or postgresql:// URL",
            ));
        }
        let Ok(options) = sqlx::postgres::PgConnectOptions::from_str(url) else {
            // The parse error may quote the URL, password included: do not pass it on.
            return Err(invalid("database.url", "is not a valid PostgreSQL URL"));
        };
        {
            use sqlx::postgres::PgSslMode;
            let encrypted = matches!(
                options.get_ssl_mode(),
                PgSslMode::Require | PgSslMode::VerifyCa | PgSslMode::VerifyFull
            );
            let local = options.get_socket().is_some() || is_loopback(options.get_host());
            if !encrypted && !local && !self.database.allow_insecure_transport {
                return Err(invalid(
                    "database.url",
                    format!(
                        "connects to {} with an sslmode that may fall back to plaintext; use sslmode=verify-full (or require), or set database.allow_insecure_transport = true",
                        options.get_host()
                    ),
                ));
            }
        }
        Table::parse(&self.database.table)
            .map_err(|constraint| invalid("database.table", constraint))?;
        if !(1..=64).contains(&self.database.max_connections) {
            return Err(invalid(
                "database.max_connections",
                "must be between 1 and 64",
            ));
        }
        check_duration(
            "database.statement_timeout",
            self.database.statement_timeout,
            Duration::from_millis(100),
        )?;

        let relay = &self.relay;
        if !(1..=MAX_BATCH_SIZE).contains(&relay.batch_size) {
            return Err(invalid(
                "relay.batch_size",
                format!("must be between 1 and {MAX_BATCH_SIZE}"),
            ));
        }
        if !(1024..=1024 * 1024 * 1024).contains(&relay.max_batch_bytes) {
            return Err(invalid(
                "relay.max_batch_bytes",
                "must be between 1024 (1 KiB) and 1073741824 (1 GiB)".to_owned(),
            ));
        }
        check_duration(
            "relay.poll_interval",
            relay.poll_interval,
            Duration::from_millis(10),
        )?;
        check_duration(
            "relay.lease_duration",
            relay.lease_duration,
            Duration::from_secs(1),
        )?;
        check_duration(
            "relay.shutdown_timeout",
            relay.shutdown_timeout,
            Duration::from_millis(1),
        )?;
        check_duration(
            "relay.summary_interval",
            relay.summary_interval,
            Duration::from_secs(1),
        )?;

        let retry = &self.retry;
        if retry.max_attempts == 0 {
            return Err(invalid("retry.max_attempts", "must be at least 1"));
        }
        check_duration(
            "retry.initial_backoff",
            retry.initial_backoff,
            Duration::from_millis(1),
        )?;
        if retry.max_backoff < retry.initial_backoff {
            return Err(invalid(
                "retry.max_backoff",
                "must be at least retry.initial_backoff",
            ));
        }
        if let Some(destination) = &retry.dead_letter_destination {
            Template::parse(destination)
                .map_err(|c| invalid("retry.dead_letter_destination", c))?;
        }

        for (i, pattern) in self.sink.allowed_destinations.iter().enumerate() {
            let literal = pattern.strip_suffix('*').unwrap_or(pattern);
            if literal.is_empty() && pattern != "*" || literal.contains('*') {
                return Err(invalid(
                    format!("sink.allowed_destinations[{i}]"),
                    "must be a name or a prefix followed by a single trailing *",
                ));
            }
        }
        match self.sink.kind {
            SinkKind::Kafka => {
                let kafka = self.sink.kafka.as_ref().ok_or_else(|| {
                    invalid("sink.kafka", "is required when sink.kind = \"kafka\"")
                })?;
                kafka.validate(relay.lease_duration)?;
            }
            SinkKind::Discard => {}
            SinkKind::Rabbitmq => {
                let rabbit = self.sink.rabbitmq.as_ref().ok_or_else(|| {
                    invalid("sink.rabbitmq", "is required when sink.kind = \"rabbitmq\"")
                })?;
                rabbit.validate(relay.lease_duration)?;
            }
        }

        let retention = &self.retention;
        check_duration(
            "retention.interval",
            retention.interval,
            Duration::from_millis(100),
        )?;
        if !(1..=100_000).contains(&retention.batch_size) {
            return Err(invalid(
                "retention.batch_size",
                "must be between 1 and 100000",
            ));
        }
        if let Some(published) = retention.published {
            check_duration("retention.published", published, Duration::from_secs(1))?;
        }
        if let Some(dead) = retention.dead {
            check_duration("retention.dead", dead, Duration::from_secs(1))?;
        }

        if !matches!(self.log.level.trim(), "") {
            tracing_subscriber::EnvFilter::try_new(&self.log.level).map_err(|_| {
                invalid(
                    "log.level",
                    "must be a tracing filter such as \"info\" or \"outbox_relay=debug,warn\"",
                )
            })?;
        } else {
            return Err(invalid("log.level", "must not be empty"));
        }
        Ok(())
    }

    /// The validated outbox table name.
    pub(crate) fn table(&self) -> Table {
        Table::parse(&self.database.table).expect("validated in Config::validate")
    }
}

impl KafkaConfig {
    fn validate(&self, lease: Duration) -> Result<(), ConfigError> {
        if self.brokers.split(',').all(|b| b.trim().is_empty()) {
            return Err(invalid(
                "sink.kafka.brokers",
                "must name at least one host:port",
            ));
        }
        Template::parse(&self.topic).map_err(|c| invalid("sink.kafka.topic", c))?;
        let protocol = self
            .properties
            .get("security.protocol")
            .map_or("plaintext".to_owned(), |p| p.to_ascii_lowercase());
        if !matches!(protocol.as_str(), "ssl" | "sasl_ssl") && !self.allow_insecure_transport {
            let remote = self
                .brokers
                .split(',')
                .map(str::trim)
                .filter(|b| !b.is_empty())
                .find(|b| !is_loopback(host_of(b)));
            if let Some(broker) = remote {
                return Err(invalid(
                    "sink.kafka.properties.\"security.protocol\"",
                    format!(
                        "is {protocol}, which sends events and credentials unencrypted to {broker}; use ssl or sasl_ssl, or set sink.kafka.allow_insecure_transport = true"
                    ),
                ));
            }
        }
        for (key, value) in &self.properties {
            let name = || format!("sink.kafka.properties.\"{key}\"");
            if KAFKA_OWNED.contains(&key.as_str()) {
                return Err(invalid(
                    name(),
                    "is set from sink.kafka.brokers and cannot be overridden",
                ));
            }
            if KAFKA_FORBIDDEN.contains(&key.as_str()) {
                return Err(invalid(
                    name(),
                    "is refused: it loads code or runs a command",
                ));
            }
            if !kafka_allowed(key) {
                return Err(invalid(
                    name(),
                    "is not in the passthrough allow-list (producer, network, TLS and SASL settings; see README)",
                ));
            }
            if let Some((_, required)) = KAFKA_GUARDED.iter().find(|(k, _)| k == key) {
                let same =
                    value.eq_ignore_ascii_case(required) || (*required == "all" && value == "-1");
                if !same && !self.allow_unsafe {
                    return Err(invalid(
                        name(),
                        format!(
                            "must stay \"{required}\" (it guards delivery or transport security); set sink.kafka.unsafe = true to override"
                        ),
                    ));
                }
            }
        }
        // librdkafka checks every property name and value when building its configuration
        // (no client is created, nothing connects).
        crate::publisher::kafka::client_config(self)
            .create_native_config()
            .map_err(|err| {
                invalid(
                    "sink.kafka.properties",
                    format!("rejected by librdkafka: {err}"),
                )
            })?;
        let timeout = self.message_timeout();
        // 0 is librdkafka's "no limit": a delivery could outlive any lease.
        if timeout.is_zero() {
            return Err(invalid(
                "sink.kafka.properties.message.timeout.ms",
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
        Ok(())
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
fn flat_properties<'de, D: serde::Deserializer<'de>>(
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

impl RabbitMqConfig {
    fn validate(&self, lease: Duration) -> Result<(), ConfigError> {
        let url = self
            .url
            .as_ref()
            .ok_or_else(|| {
                invalid(
                    "sink.rabbitmq.url",
                    "is required (or sink.rabbitmq.url_file)",
                )
            })?
            .expose_secret();
        if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
            return Err(invalid(
                "sink.rabbitmq.url",
                "must be an amqp:// or amqps:// URL",
            ));
        }
        let Ok(uri) = lapin::uri::AMQPUri::from_str(url) else {
            // The parse error may quote the URL, password included: do not pass it on.
            return Err(invalid("sink.rabbitmq.url", "is not a valid AMQP URL"));
        };
        let plaintext = uri.scheme == lapin::uri::AMQPScheme::AMQP;
        if plaintext && !self.allow_insecure_transport && !is_loopback(&uri.authority.host) {
            return Err(invalid(
                "sink.rabbitmq.url",
                format!(
                    "is amqp:// (plaintext) to {}; use amqps://, or set sink.rabbitmq.allow_insecure_transport = true",
                    uri.authority.host
                ),
            ));
        }
        if let Some(tls) = &self.tls {
            if plaintext {
                return Err(invalid(
                    "sink.rabbitmq.tls",
                    "needs an amqps:// URL in sink.rabbitmq.url",
                ));
            }
            if tls.cert_file.is_some() != tls.key_file.is_some() {
                return Err(invalid(
                    "sink.rabbitmq.tls.cert_file",
                    "and sink.rabbitmq.tls.key_file must be given together",
                ));
            }
        }
        Template::parse(&self.exchange).map_err(|c| invalid("sink.rabbitmq.exchange", c))?;
        Template::parse(&self.routing_key).map_err(|c| invalid("sink.rabbitmq.routing_key", c))?;
        check_duration(
            "sink.rabbitmq.confirm_timeout",
            self.confirm_timeout,
            Duration::from_millis(10),
        )?;
        // Opening a session, and then a batch's writes and confirms, may each take up to
        // confirm_timeout: the lease must outlast both, or a slow broker means duplicates.
        if self.confirm_timeout * 2 > lease {
            return Err(invalid(
                "relay.lease_duration",
                format!(
                    "must be at least twice sink.rabbitmq.confirm_timeout ({})",
                    humantime::format_duration(self.confirm_timeout)
                ),
            ));
        }
        Ok(())
    }
}

fn read_secret(path: &std::path::Path, key: &str) -> Result<SecretString, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        invalid(
            key,
            format!(
                "names a file that cannot be read ({}): {err}",
                path.display()
            ),
        )
    })?;
    Ok(SecretString::from(text.trim_end().to_owned()))
}

fn resolve_url(
    url: &mut Option<SecretString>,
    file: Option<&std::path::Path>,
    key: &str,
) -> Result<(), ConfigError> {
    let Some(file) = file else {
        return Ok(());
    };
    if url.is_some() {
        return Err(invalid(
            key,
            format!("and {key}_file are both set; set one"),
        ));
    }
    *url = Some(read_secret(file, &format!("{key}_file"))?);
    Ok(())
}

impl DatabaseConfig {
    /// The URL, present once the configuration is validated.
    pub fn url(&self) -> &SecretString {
        self.url.as_ref().expect("validated in Config::validate")
    }
}

impl RabbitMqConfig {
    /// The URL, present once the configuration is validated.
    pub fn url(&self) -> &SecretString {
        self.url.as_ref().expect("validated in Config::validate")
    }
}

fn check_duration(key: &str, value: Duration, min: Duration) -> Result<(), ConfigError> {
    if value < min {
        return Err(invalid(
            key,
            format!("must be at least {}", humantime::format_duration(min)),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::ErrorChain;

    fn parse(toml: &str) -> Result<Config, ConfigError> {
        let raw = config::Config::builder()
            .add_source(config::File::from_str(toml, config::FileFormat::Toml))
            .build()
            .map_err(ConfigError::Load)?;
        let mut config: Config = raw.try_deserialize().map_err(ConfigError::Load)?;
        config.resolve_secret_files()?;
        config.validate()?;
        Ok(config)
    }

    const MINIMAL: &str = r#"
        [database]
        url = "postgres://postgres@127.0.0.1:5432/app"
        [sink]
        kind = "kafka"
        [sink.kafka]
        brokers = "127.0.0.1:9092"
    "#;

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let config = parse(MINIMAL).expect("valid");
        assert_eq!(config.database.table, "outbox");
        assert_eq!(config.relay.batch_size, 2000);
        assert_eq!(config.relay.poll_interval, Duration::from_secs(1));
        assert!(config.relay.listen);
        assert_eq!(config.retry.max_attempts, 10);
        assert_eq!(config.retry.max_backoff, Duration::from_secs(300));
        assert_eq!(config.log.format, LogFormat::Json);
        assert_eq!(
            config.retention.published,
            Some(Duration::from_secs(7 * 86_400))
        );
        assert_eq!(config.retention.dead, None);
    }

    #[test]
    fn retention_accepts_off_and_names_bad_values() {
        let off = MINIMAL.replace(
            "[sink]",
            "[retention]\npublished = \"off\"\ndead = \"30d\"\n[sink]",
        );
        let config = parse(&off).expect("valid");
        assert_eq!(config.retention.published, None);
        assert_eq!(
            config.retention.dead,
            Some(Duration::from_secs(30 * 86_400))
        );
        let bad = MINIMAL.replace("[sink]", "[retention]\npublished = \"a week\"\n[sink]");
        let err = ErrorChain(&parse(&bad).expect_err("bad duration")).to_string();
        assert!(err.contains("retention.published"), "{err}");
    }

    fn key_of(result: Result<Config, ConfigError>) -> String {
        match result {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected an invalid key, got {other:?}"),
        }
    }

    #[test]
    fn plaintext_to_a_remote_host_is_refused_unless_allowed() {
        let remote_pg = MINIMAL.replace("postgres@127.0.0.1:5432/app", "relay@db.internal/app");
        assert_eq!(key_of(parse(&remote_pg)), "database.url");
        for fine in ["?sslmode=verify-full", "?sslmode=require"] {
            let url = format!("relay@db.internal/app{fine}");
            parse(&MINIMAL.replace("postgres@127.0.0.1:5432/app", &url)).expect(fine);
        }
        let allowed = remote_pg.replace("[sink]", "allow_insecure_transport = true\n[sink]");
        parse(&allowed).expect("explicitly allowed");
        parse(&MINIMAL.replace("127.0.0.1:5432", "localhost:5432")).expect("loopback");

        let remote_kafka = MINIMAL.replace("127.0.0.1:9092", "127.0.0.1:9092,kafka-1:9092");
        assert_eq!(
            key_of(parse(&remote_kafka)),
            "sink.kafka.properties.\"security.protocol\""
        );
        parse(&format!(
            "{remote_kafka}\n[sink.kafka.properties]\n\"security.protocol\" = \"SASL_SSL\""
        ))
        .expect("sasl_ssl");
        parse(&format!("{remote_kafka}\nallow_insecure_transport = true")).expect("allowed");
        parse(&MINIMAL.replace("127.0.0.1:9092", "[::1]:9092")).expect("loopback v6");

        let rabbit = |url: &str, extra: &str| {
            format!("{MINIMAL}\n[sink.rabbitmq]\nurl = \"{url}\"\n{extra}")
                .replace("kind = \"kafka\"", "kind = \"rabbitmq\"")
        };
        assert_eq!(
            key_of(parse(&rabbit("amqp://u:p@mq.internal:5672/%2f", ""))),
            "sink.rabbitmq.url"
        );
        parse(&rabbit("amqps://u:p@mq.internal/%2f", "")).expect("amqps");
        parse(&rabbit(
            "amqp://u:p@mq.internal/%2f",
            "allow_insecure_transport = true",
        ))
        .expect("allowed");
        assert_eq!(
            key_of(parse(&rabbit(
                "amqp://guest:guest@127.0.0.1/%2f",
                "[sink.rabbitmq.tls]\nca_file = \"/ca.pem\""
            ))),
            "sink.rabbitmq.tls"
        );
        assert_eq!(
            key_of(parse(&rabbit(
                "amqps://guest:guest@127.0.0.1/%2f",
                "[sink.rabbitmq.tls]\ncert_file = \"/c.pem\""
            ))),
            "sink.rabbitmq.tls.cert_file"
        );
    }

    /// Every key of the config structs as a dotted path (`sink.kafka.brokers`), read from the
    /// JSON schema derived from them; maps (`sink.kafka.properties`) are one key.
    fn struct_keys() -> std::collections::BTreeSet<String> {
        fn walk(
            node: &serde_json::Value,
            defs: &serde_json::Value,
            path: &str,
            out: &mut std::collections::BTreeSet<String>,
        ) {
            if let Some(name) = node.get("$ref").and_then(|r| r.as_str()) {
                let name = name.trim_start_matches("#/$defs/");
                return walk(&defs[name], defs, path, out);
            }
            for alternatives in ["anyOf", "oneOf", "allOf"] {
                for option in node
                    .get(alternatives)
                    .and_then(|a| a.as_array())
                    .into_iter()
                    .flatten()
                {
                    walk(option, defs, path, out);
                }
            }
            match node.get("properties").and_then(|p| p.as_object()) {
                Some(properties) => {
                    for (key, child) in properties {
                        let child_path = if path.is_empty() {
                            key.clone()
                        } else {
                            format!("{path}.{key}")
                        };
                        walk(child, defs, &child_path, out);
                    }
                }
                None if !path.is_empty()
                    && node.get("type") != Some(&"null".into())
                    && node.get("anyOf").is_none()
                    && node.get("oneOf").is_none() =>
                {
                    out.insert(path.to_owned());
                }
                None => {}
            }
        }
        let schema = serde_json::to_value(schemars::schema_for!(Config)).unwrap();
        let mut keys = std::collections::BTreeSet::new();
        walk(&schema, &schema["$defs"], "", &mut keys);
        keys
    }

    #[test]
    fn reference_file_is_valid_and_complete() {
        let text = include_str!("../config/outbox-relay.toml");
        let config = parse(text).expect("the reference config must be valid");
        assert_eq!(config.sink.kind, SinkKind::Kafka);
        assert!(
            config.sink.rabbitmq.is_some(),
            "reference documents [sink.rabbitmq]"
        );
        // Keys the file documents: `key = ...` lines, set or commented out, under their
        // (possibly commented-out) section header; pass-through properties are one key.
        let mut documented = std::collections::BTreeSet::new();
        let mut section = String::new();
        for line in text.lines() {
            let line = line.trim().trim_start_matches('#').trim();
            if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = header.to_owned();
                if section.ends_with(".properties") {
                    documented.insert(section.clone());
                }
                continue;
            }
            let Some((key, _)) = line.split_once(" = ") else {
                continue;
            };
            let is_key = key
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if is_key && !section.ends_with(".properties") {
                documented.insert(format!("{section}.{key}"));
            }
        }
        assert_lists_struct_keys("config/outbox-relay.toml", &documented);
    }

    fn assert_lists_struct_keys(what: &str, listed: &std::collections::BTreeSet<String>) {
        let keys = struct_keys();
        assert!(keys.contains("sink.rabbitmq.tls.key_file"), "{keys:?}");
        let missing: Vec<_> = keys.difference(listed).collect();
        let stale: Vec<_> = listed.difference(&keys).collect();
        assert!(
            missing.is_empty() && stale.is_empty(),
            "{what}: undocumented keys {missing:?}, unknown keys {stale:?}"
        );
    }

    #[test]
    fn readme_configuration_table_lists_every_key() {
        let readme = include_str!("../README.md");
        let listed: std::collections::BTreeSet<String> = readme
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split_once('`'))
            .map(|(key, _)| key.to_owned())
            .filter(|key| key.contains('.') && !key.contains(' '))
            .collect();
        assert_lists_struct_keys("README configuration table", &listed);
    }

    #[test]
    fn dotted_property_keys_are_flattened() {
        let toml = format!(
            "{MINIMAL}\n[sink.kafka.properties]\ncompression.type = \"lz4\"\nlinger.ms = 10\n"
        );
        let config = parse(&toml).expect("valid");
        let props = &config.sink.kafka.unwrap().properties;
        assert_eq!(
            props.get("compression.type").map(String::as_str),
            Some("lz4")
        );
        assert_eq!(props.get("linger.ms").map(String::as_str), Some("10"));
    }

    #[test]
    fn passthrough_properties_are_allow_listed() {
        let with = |props: &str| format!("{MINIMAL}\n[sink.kafka.properties]\n{props}\n");
        for forbidden in [
            "\"plugin.library.paths\" = \"/tmp/evil.so\"",
            "\"sasl.kerberos.kinit.cmd\" = \"rm -rf /\"",
            "\"ssl.engine.location\" = \"/tmp/engine.so\"",
            "\"ssl.providers\" = \"legacy\"",
        ] {
            let err = parse(&with(forbidden)).expect_err(forbidden).to_string();
            assert!(err.contains("loads code or runs a command"), "{err}");
        }
        let err = parse(&with("\"transactional.id\" = \"x\""))
            .expect_err("not allowed")
            .to_string();
        assert!(
            err.contains("transactional.id") && err.contains("allow-list"),
            "{err}"
        );
        let err = parse(&with("\"enable.ssl.certificate.verification\" = \"false\""))
            .expect_err("unsafe")
            .to_string();
        assert!(err.contains("unsafe = true"), "{err}");
        let unsafe_ok = with("\"enable.ssl.certificate.verification\" = \"false\"").replace(
            "brokers = \"127.0.0.1:9092\"",
            "brokers = \"127.0.0.1:9092\"\nunsafe = true",
        );
        parse(&unsafe_ok).expect("allowed with unsafe = true");
        parse(&with(
            "compression.type = \"zstd\"\nlinger.ms = 20\n\"security.protocol\" = \"plaintext\"",
        ))
        .expect("ordinary producer settings pass");
    }

    #[test]
    fn weakening_acks_is_refused_naming_the_property() {
        let toml = format!("{MINIMAL}\n[sink.kafka.properties]\nacks = \"1\"\n");
        let err = parse(&toml)
            .expect_err("acks=1 must be refused")
            .to_string();
        assert!(err.contains("sink.kafka.properties.\"acks\""), "{err}");
    }

    #[test]
    fn short_lease_against_kafka_timeout_is_refused() {
        let toml = MINIMAL.replace("[sink]", "[relay]\nlease_duration = \"10s\"\n[sink]");
        let err = parse(&toml).expect_err("lease too short").to_string();
        assert!(err.contains("relay.lease_duration"), "{err}");
    }

    #[test]
    fn a_delivery_timeout_no_lease_can_cover_is_refused() {
        let toml = format!("{MINIMAL}\n[sink.kafka.properties]\n\"message.timeout.ms\" = 0\n");
        let err = parse(&toml).expect_err("0 = no timeout").to_string();
        assert!(err.contains("message.timeout.ms"), "{err}");
    }

    #[test]
    fn a_lease_shorter_than_two_rabbitmq_confirm_timeouts_is_refused() {
        let rabbit = |lease: &str| {
            format!(
                "[database]\nurl = \"postgres://postgres@127.0.0.1:5432/app\"\n[relay]\nlease_duration = \"{lease}\"\n[sink]\nkind = \"rabbitmq\"\n[sink.rabbitmq]\nurl = \"amqp://guest:guest@127.0.0.1:5672/%2f\"\nconfirm_timeout = \"30s\"\n"
            )
        };
        let err = parse(&rabbit("59s")).expect_err("too short").to_string();
        assert!(
            err.contains("relay.lease_duration") && err.contains("confirm_timeout"),
            "{err}"
        );
        parse(&rabbit("60s")).expect("twice the confirm timeout");
    }

    #[test]
    fn kafka_properties_never_show_their_values_in_debug_output() {
        let toml = format!(
            "{MINIMAL}\n[sink.kafka.properties]\n\"sasl.password\" = \"sentinel-secret\"\n"
        );
        let config = parse(&toml).expect("valid");
        let shown = format!("{config:?}");
        assert!(shown.contains("sasl.password"), "the name is shown");
        assert!(!shown.contains("sentinel-secret"), "{shown}");
    }

    #[test]
    fn max_backoff_below_initial_is_refused() {
        let toml = MINIMAL.replace(
            "[sink]",
            "[retry]\ninitial_backoff = \"10s\"\nmax_backoff = \"1s\"\n[sink]",
        );
        let err = parse(&toml).expect_err("bad backoff").to_string();
        assert!(err.contains("retry.max_backoff"), "{err}");
    }

    #[test]
    fn missing_sink_section_is_named() {
        let toml = MINIMAL.replace("kind = \"kafka\"", "kind = \"rabbitmq\"");
        let err = parse(&toml).expect_err("no rabbitmq section").to_string();
        assert!(err.contains("sink.rabbitmq"), "{err}");
    }
}
