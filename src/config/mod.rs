//! Configuration: one TOML file plus `OUTBOX_RELAY__SECTION__KEY` environment overrides,
//! parsed once into typed [`Settings`].
//!
//! Each component owns the type of its section and parses it: `[database]`
//! (`database::postgres::config`), `[relay]`, `[retry]` and `[retention]`
//! (`outbox::config`), `[broker]` with `[broker.kafka]` and `[broker.rabbitmq]`
//! (`broker::config`, beside each broker's code), `[log]` ([`crate::telemetry`]) and `[http]`
//! ([`crate::health`]). This module puts the sections together, reads the secret files and
//! checks what spans sections. Every struct rejects unknown keys, durations are humantime
//! strings (`"500ms"`, `"5m"`), and each error names the offending key and the constraint it
//! broke (`constraint`). The reference file `config/outbox-relay.toml` documents every key
//! with its default; a unit test keeps the two in step.
//!
//! Renamed keys keep working under their old spelling: `[sink]` is `[broker]` since 2026-12 (the
//! broker is no longer only where events go), and `OUTBOX_RELAY__SINK__…` variables still apply.

use std::net::SocketAddr;
use std::path::Path;

use secrecy::ExposeSecret;
use serde::Deserialize;

pub use crate::constraint::ConfigError;
use crate::constraint::{read_secret, resolve_url};

use crate::broker::config::{BrokerConfig, BrokerSettings};
use crate::database::postgres::config::{DatabaseConfig, DatabaseSettings};
use crate::health::HttpConfig;
use crate::inbox::config::{InboxConfig, InboxSettings};
use crate::outbox::config::{RelayConfig, RetentionConfig, RetryConfig, RetryPolicy};
use crate::telemetry::{LogConfig, LogSettings};

/// Prefix of the environment variables that override file keys (`OUTBOX_RELAY__RELAY__BATCH_SIZE`).
pub const ENV_PREFIX: &str = "OUTBOX_RELAY";

/// The whole configuration of one relay process, as written.
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
    /// Which broker events go to. Also accepted as `[sink]`, its name until 2026-12. Absent:
    /// no outbox relay runs (then `[inbox]` is required).
    #[serde(alias = "sink")]
    pub broker: Option<BrokerConfig>,
    /// The consumer half: messages from a broker into the inbox table. Absent: no inbox runs.
    pub inbox: Option<InboxConfig>,
    /// Log output.
    #[serde(default)]
    pub log: LogConfig,
    /// Health and metrics endpoints; absent: no listener.
    pub http: Option<HttpConfig>,
    /// Deletion of old published (and, optionally, dead-lettered) rows.
    #[serde(default)]
    pub retention: RetentionConfig,
}

/// The configuration, checked and parsed: what every component is built from. Nothing in it is
/// parsed again.
#[derive(Debug)]
pub struct Settings {
    pub(crate) database: DatabaseSettings,
    pub(crate) relay: RelayConfig,
    pub(crate) retry: RetryPolicy,
    /// `[broker]`; `None`: the outbox direction does not run.
    pub(crate) broker: Option<BrokerSettings>,
    /// `[inbox]`; `None`: the inbox direction does not run.
    pub(crate) inbox: Option<InboxSettings>,
    pub(crate) retention: RetentionConfig,
    /// `[log]`; taken by `telemetry::init`.
    pub(crate) log: Option<LogSettings>,
    /// `http.listen`; `None`: no listener.
    pub(crate) http: Option<SocketAddr>,
}

impl Config {
    /// Reads `path` (TOML), applies `OUTBOX_RELAY__*` environment overrides and the secret
    /// files, and parses the result.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let raw = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("__")
                    .separator("__"),
            )
            .build()
            .map_err(ConfigError::Load)?;
        // A file (or environment) still using `[sink]` gets errors naming its own keys.
        let old_spelling = raw.get_table("sink").is_ok();
        let mut config: Config = raw.try_deserialize().map_err(ConfigError::Load)?;
        config
            .resolve_secret_files()
            .and_then(|()| config.validate())
            .map_err(|err| {
                if old_spelling {
                    err.in_old_spelling()
                } else {
                    err
                }
            })
    }

    /// Reads `*_file` keys: `database.url_file`, `broker.rabbitmq.url_file`, and any
    /// `broker.kafka.properties` key ending in `_file` (its value is the path; the property
    /// without the suffix gets the file's content, e.g. `"sasl.password_file"`).
    pub fn resolve_secret_files(&mut self) -> Result<(), ConfigError> {
        resolve_url(
            &mut self.database.url,
            self.database.url_file.as_deref(),
            "database.url",
        )?;
        let broker = self.broker.as_mut();
        if let Some(rabbit) = broker.and_then(|b| b.rabbitmq.as_mut()) {
            resolve_url(
                &mut rabbit.url,
                rabbit.url_file.as_deref(),
                "broker.rabbitmq.url",
            )?;
        }
        if let Some(kafka) = self.broker.as_mut().and_then(|b| b.kafka.as_mut()) {
            property_files(&mut kafka.properties, "broker.kafka")?;
        }
        if let Some(inbox) = &mut self.inbox {
            if let Some(rabbit) = &mut inbox.rabbitmq {
                resolve_url(
                    &mut rabbit.url,
                    rabbit.url_file.as_deref(),
                    "inbox.rabbitmq.url",
                )?;
            }
            if let Some(kafka) = &mut inbox.kafka {
                property_files(&mut kafka.properties, "inbox.kafka")?;
            }
        }
        Ok(())
    }

    /// Checks every constraint serde cannot express and parses each section; the error names
    /// the key.
    pub fn validate(&self) -> Result<Settings, ConfigError> {
        let database = self.database.validate()?;
        let relay = self.relay.validate()?;
        let retry = self.retry.validate()?;
        if self.broker.is_none() && self.inbox.is_none() {
            return Err(crate::constraint::invalid(
                "broker",
                "or [inbox] is required: [broker] runs the outbox relay, [inbox] the consumer half, both run both",
            ));
        }
        let broker = self
            .broker
            .as_ref()
            .map(|b| b.validate(relay.lease_duration))
            .transpose()?;
        let inbox = self
            .inbox
            .as_ref()
            .map(|i| i.validate(broker.as_ref().map(|_| &database.table)))
            .transpose()?;
        let retention = self.retention.validate()?;
        let log = self.log.validate()?;
        Ok(Settings {
            database,
            relay,
            retry,
            broker,
            inbox,
            retention,
            log: Some(log),
            http: self.http.as_ref().map(|http| http.listen),
        })
    }
}

/// Replaces each `<property>_file` key of `properties` with `<property>` and the file's content
/// (`section` names the keys in errors).
fn property_files(
    properties: &mut std::collections::BTreeMap<String, String>,
    section: &str,
) -> Result<(), ConfigError> {
    let files: Vec<(String, String)> = properties
        .iter()
        .filter(|(k, _)| k.ends_with("_file"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (key, path) in files {
        properties.remove(&key);
        let property = key.trim_end_matches("_file").to_owned();
        let value = read_secret(Path::new(&path), &format!("{section}.properties.\"{key}\""))?;
        properties.insert(property, value.expose_secret().to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::config::BrokerKind;
    use crate::telemetry::{ErrorChain, LogFormat};
    use std::time::Duration;

    /// The configuration as written, once it parsed and validated.
    fn parse(toml: &str) -> Result<Config, ConfigError> {
        parse_with_settings(toml).map(|(config, _)| config)
    }

    fn parse_with_settings(toml: &str) -> Result<(Config, Settings), ConfigError> {
        let raw = config::Config::builder()
            .add_source(config::File::from_str(toml, config::FileFormat::Toml))
            .build()
            .map_err(ConfigError::Load)?;
        let mut config: Config = raw.try_deserialize().map_err(ConfigError::Load)?;
        config.resolve_secret_files()?;
        let settings = config.validate()?;
        Ok((config, settings))
    }

    const MINIMAL: &str = r#"
        [database]
        url = "postgres://postgres@127.0.0.1:5432/app"
        [broker]
        kind = "kafka"
        [broker.kafka]
        brokers = "127.0.0.1:9092"
    "#;

    const INBOX_ONLY: &str = r#"
        [database]
        url = "postgres://postgres@127.0.0.1:5432/app"
        [inbox]
        consumer = "billing"
        from = "kafka"
        [inbox.kafka]
        brokers = "127.0.0.1:9092"
        topics = ["outbox.event.order"]
    "#;

    #[test]
    fn an_inbox_alone_is_a_configuration_and_neither_direction_is_refused_naming_broker() {
        let (config, settings) = parse_with_settings(INBOX_ONLY).expect("inbox only is valid");
        assert!(config.broker.is_none() && settings.broker.is_none());
        let inbox = settings.inbox.expect("inbox settings");
        assert_eq!(inbox.table.to_string(), "inbox");
        assert_eq!(inbox.batch_size, 1000);
        assert_eq!(inbox.rules.max_message_bytes, 16 * 1024 * 1024);
        assert_eq!(
            inbox.keep_processed,
            Some(Duration::from_secs(7 * 24 * 3600))
        );
        match inbox.source {
            crate::inbox::config::Source::Kafka(kafka) => assert_eq!(kafka.group_id, "billing"),
            other => panic!("{other:?}"),
        }
        let neither = "[database]\nurl = \"postgres://postgres@127.0.0.1:5432/app\"\n";
        let err = ErrorChain(&parse(neither).unwrap_err()).to_string();
        assert!(err.contains("`broker` or [inbox] is required"), "{err}");
    }

    #[test]
    fn inbox_keys_are_checked_naming_the_key() {
        for (change, key) in [
            (("from = \"kafka\"", "from = \"rabbitmq\""), "inbox.kafka"),
            (
                ("consumer = \"billing\"", "consumer = \"\""),
                "inbox.consumer",
            ),
            (
                ("topics = [\"outbox.event.order\"]", "topics = []"),
                "inbox.kafka.topics",
            ),
            (
                (
                    "consumer = \"billing\"",
                    "consumer = \"billing\"\nbatch_size = 0",
                ),
                "inbox.batch_size",
            ),
            (
                (
                    "topics = [",
                    "properties = { \"enable.auto.commit\" = \"true\" }\ntopics = [",
                ),
                "inbox.kafka.properties.\"enable.auto.commit\"",
            ),
            (
                (
                    "brokers = \"127.0.0.1:9092\"",
                    "brokers = \"kafka.internal:9092\"",
                ),
                "inbox.kafka.properties.\"security.protocol\"",
            ),
        ] {
            let toml = INBOX_ONLY.replacen(change.0, change.1, 1);
            let err = ErrorChain(&parse(&toml).unwrap_err()).to_string();
            assert!(err.contains(&format!("`{key}`")), "{key}: {err}");
        }
        let same_table = format!(
            "{MINIMAL}\n[inbox]\ntable = \"outbox\"\nconsumer = \"b\"\nfrom = \"kafka\"\n[inbox.kafka]\nbrokers = \"127.0.0.1:9092\"\ntopics = [\"t\"]\n"
        );
        let err = ErrorChain(&parse(&same_table).unwrap_err()).to_string();
        assert!(err.contains("`inbox.table` must differ"), "{err}");
    }

    #[test]
    fn a_rabbitmq_inbox_batch_takes_at_most_half_of_the_prefetch_window() {
        let rabbit = |extra: &str| {
            format!(
                "[database]\nurl = \"postgres://postgres@127.0.0.1:5432/app\"\n[inbox]\nconsumer = \"billing\"\nfrom = \"rabbitmq\"\n{extra}\n[inbox.rabbitmq]\nurl = \"amqp://guest:guest@127.0.0.1:5672/%2f\"\nqueues = [\"a\", \"b\"]\n"
            )
        };
        // Default prefetch: eight times the batch, so the batch is kept whole.
        let (_, settings) = parse_with_settings(&rabbit("")).expect("valid");
        assert_eq!(settings.inbox.expect("inbox").batch_size, 1000);
        // A small prefetch cuts the batch to half of all queues' window (2 × 300 / 2).
        let small = rabbit("").replace("queues = [", "prefetch = 300\nqueues = [");
        let (_, settings) = parse_with_settings(&small).expect("valid");
        assert_eq!(settings.inbox.expect("inbox").batch_size, 300);
        // Eight times a large batch is past u16: the largest prefetch the protocol allows
        // (2 × 65535 over the two queues still holds two batches of 40 000).
        let (_, settings) = parse_with_settings(&rabbit("batch_size = 40000")).expect("valid");
        assert_eq!(settings.inbox.expect("inbox").batch_size, 40000);
        let one_queue = rabbit("batch_size = 40000").replace("\"a\", \"b\"", "\"a\"");
        let (_, settings) = parse_with_settings(&one_queue).expect("valid");
        assert_eq!(settings.inbox.expect("inbox").batch_size, 32767);
        let zero = rabbit("").replace("queues = [", "prefetch = 0\nqueues = [");
        let err = ErrorChain(&parse(&zero).unwrap_err()).to_string();
        assert!(err.contains("`inbox.rabbitmq.prefetch`"), "{err}");
    }

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
            "[broker]",
            "[retention]\npublished = \"off\"\ndead = \"30d\"\n[broker]",
        );
        let config = parse(&off).expect("valid");
        assert_eq!(config.retention.published, None);
        assert_eq!(
            config.retention.dead,
            Some(Duration::from_secs(30 * 86_400))
        );
        let bad = MINIMAL.replace("[broker]", "[retention]\npublished = \"a week\"\n[broker]");
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
        let allowed = remote_pg.replace("[broker]", "allow_insecure_transport = true\n[broker]");
        parse(&allowed).expect("explicitly allowed");
        parse(&MINIMAL.replace("127.0.0.1:5432", "localhost:5432")).expect("loopback");

        let remote_kafka = MINIMAL.replace("127.0.0.1:9092", "127.0.0.1:9092,kafka-1:9092");
        assert_eq!(
            key_of(parse(&remote_kafka)),
            "broker.kafka.properties.\"security.protocol\""
        );
        parse(&format!(
            "{remote_kafka}\n[broker.kafka.properties]\n\"security.protocol\" = \"SASL_SSL\""
        ))
        .expect("sasl_ssl");
        parse(&format!("{remote_kafka}\nallow_insecure_transport = true")).expect("allowed");
        parse(&MINIMAL.replace("127.0.0.1:9092", "[::1]:9092")).expect("loopback v6");

        let rabbit = |url: &str, extra: &str| {
            format!("{MINIMAL}\n[broker.rabbitmq]\nurl = \"{url}\"\n{extra}")
                .replace("kind = \"kafka\"", "kind = \"rabbitmq\"")
        };
        assert_eq!(
            key_of(parse(&rabbit("amqp://u:p@mq.internal:5672/%2f", ""))),
            "broker.rabbitmq.url"
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
                "[broker.rabbitmq.tls]\nca_file = \"/ca.pem\""
            ))),
            "broker.rabbitmq.tls"
        );
        assert_eq!(
            key_of(parse(&rabbit(
                "amqps://guest:guest@127.0.0.1/%2f",
                "[broker.rabbitmq.tls]\ncert_file = \"/c.pem\""
            ))),
            "broker.rabbitmq.tls.cert_file"
        );
    }

    /// Every key of the config structs as a dotted path (`broker.kafka.brokers`), read from the
    /// JSON schema derived from them; maps (`broker.kafka.properties`) are one key.
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
    fn the_kubernetes_examples_configurations_are_valid() {
        for (file, yaml) in [
            (
                "sidecar.yaml",
                include_str!("../../deploy/kubernetes/sidecar.yaml"),
            ),
            (
                "inbox-sidecar.yaml",
                include_str!("../../deploy/kubernetes/inbox-sidecar.yaml"),
            ),
        ] {
            // The ConfigMap's file: the lines under `outbox-relay.toml: |`, indented by four.
            let toml: String = yaml
                .lines()
                .skip_while(|l| !l.trim_start().starts_with("outbox-relay.toml: |"))
                .skip(1)
                .take_while(|l| l.is_empty() || l.starts_with("    "))
                .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
                .collect();
            // The secrets are files in the pod: their values from the Secret instead.
            let secret = |key: &str| {
                yaml.lines()
                    .find_map(|l| l.trim().strip_prefix(&format!("{key}: ")))
                    .unwrap_or_else(|| panic!("{file}: secret {key}"))
                    .to_owned()
            };
            let toml = toml
                .replace(
                    "url_file = \"/run/secrets/outbox-relay/database-url\"",
                    &format!("url = {}", secret("database-url")),
                )
                .replace(
                    "\"sasl.password_file\" = \"/run/secrets/outbox-relay/kafka-password\"",
                    &format!("\"sasl.password\" = {}", secret("kafka-password")),
                );
            assert!(
                toml.contains("[database]"),
                "{file}: no configuration found"
            );
            parse(&toml).unwrap_or_else(|err| panic!("{file}: {}", ErrorChain(&err)));
        }
    }

    #[test]
    fn reference_file_is_valid_and_complete() {
        let text = include_str!("../../config/outbox-relay.toml");
        let config = parse(text).expect("the reference config must be valid");
        assert_eq!(config.broker.as_ref().unwrap().kind, BrokerKind::Kafka);
        assert!(
            config.broker.as_ref().unwrap().rabbitmq.is_some(),
            "reference documents [broker.rabbitmq]"
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
        assert!(keys.contains("broker.rabbitmq.tls.key_file"), "{keys:?}");
        let missing: Vec<_> = keys.difference(listed).collect();
        let stale: Vec<_> = listed.difference(&keys).collect();
        assert!(
            missing.is_empty() && stale.is_empty(),
            "{what}: undocumented keys {missing:?}, unknown keys {stale:?}"
        );
    }

    #[test]
    fn readme_configuration_table_lists_every_key() {
        let readme = include_str!("../../README.md");
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
            "{MINIMAL}\n[broker.kafka.properties]\ncompression.type = \"lz4\"\nlinger.ms = 10\n"
        );
        let config = parse(&toml).expect("valid");
        let props = &config.broker.unwrap().kafka.unwrap().properties;
        assert_eq!(
            props.get("compression.type").map(String::as_str),
            Some("lz4")
        );
        assert_eq!(props.get("linger.ms").map(String::as_str), Some("10"));
    }

    #[test]
    fn passthrough_properties_are_allow_listed() {
        let with = |props: &str| format!("{MINIMAL}\n[broker.kafka.properties]\n{props}\n");
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
        let toml = format!("{MINIMAL}\n[broker.kafka.properties]\nacks = \"1\"\n");
        let err = parse(&toml)
            .expect_err("acks=1 must be refused")
            .to_string();
        assert!(err.contains("broker.kafka.properties.\"acks\""), "{err}");
    }

    #[test]
    fn short_lease_against_kafka_timeout_is_refused() {
        let toml = MINIMAL.replace("[broker]", "[relay]\nlease_duration = \"10s\"\n[broker]");
        let err = parse(&toml).expect_err("lease too short").to_string();
        assert!(err.contains("relay.lease_duration"), "{err}");
    }

    #[test]
    fn a_delivery_timeout_no_lease_can_cover_is_refused() {
        let toml = format!("{MINIMAL}\n[broker.kafka.properties]\n\"message.timeout.ms\" = 0\n");
        let err = parse(&toml).expect_err("0 = no timeout").to_string();
        assert!(err.contains("message.timeout.ms"), "{err}");
    }

    #[test]
    fn a_lease_shorter_than_two_rabbitmq_confirm_timeouts_is_refused() {
        let rabbit = |lease: &str| {
            format!(
                "[database]\nurl = \"postgres://postgres@127.0.0.1:5432/app\"\n[relay]\nlease_duration = \"{lease}\"\n[broker]\nkind = \"rabbitmq\"\n[broker.rabbitmq]\nurl = \"amqp://guest:guest@127.0.0.1:5672/%2f\"\nconfirm_timeout = \"30s\"\n"
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
            "{MINIMAL}\n[broker.kafka.properties]\n\"sasl.password\" = \"sentinel-secret\"\n"
        );
        let (config, settings) = parse_with_settings(&toml).expect("valid");
        let shown = format!("{config:?}");
        assert!(shown.contains("sasl.password"), "the name is shown");
        assert!(!shown.contains("sentinel-secret"), "{shown}");
        let parsed = format!("{settings:?}");
        assert!(!parsed.contains("sentinel-secret"), "{parsed}");
    }

    #[test]
    fn max_backoff_below_initial_is_refused() {
        let toml = MINIMAL.replace(
            "[broker]",
            "[retry]\ninitial_backoff = \"10s\"\nmax_backoff = \"1s\"\n[broker]",
        );
        let err = parse(&toml).expect_err("bad backoff").to_string();
        assert!(err.contains("retry.max_backoff"), "{err}");
    }

    #[test]
    fn the_broker_section_is_still_accepted_under_its_old_name_sink() {
        let old = MINIMAL
            .replace("[broker]", "[sink]")
            .replace("[broker.kafka]", "[sink.kafka]");
        let (config, settings) = parse_with_settings(&old).expect("[sink] still loads");
        assert_eq!(config.broker.as_ref().unwrap().kind, BrokerKind::Kafka);
        assert!(matches!(
            settings.broker,
            Some(BrokerSettings::Kafka { .. })
        ));
    }

    #[test]
    fn parsed_settings_carry_typed_values() {
        let toml = MINIMAL.replace(
            "[broker]",
            "[retry]\ndead_letter_destination = \"dead.{aggregate_type}\"\n[broker]",
        );
        let (_, settings) = parse_with_settings(&toml).expect("valid");
        assert_eq!(settings.database.table.to_string(), "outbox");
        assert_eq!(settings.database.connect.get_host(), "127.0.0.1");
        assert!(settings.retry.dead_letter_destination.is_some());
        assert!(settings.retry.parks());
        assert_eq!(settings.http, None);
    }

    #[test]
    fn missing_broker_section_is_named() {
        let toml = MINIMAL.replace("kind = \"kafka\"", "kind = \"rabbitmq\"");
        let err = parse(&toml).expect_err("no rabbitmq section").to_string();
        assert!(err.contains("broker.rabbitmq"), "{err}");
    }
}
