//! `[broker.rabbitmq]`: the section as written and the settings the producer is made from.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use lapin::tcp::OwnedTLSConfig;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::broker::template::Template;
use crate::constraint::{ConfigError, at_least, invalid, is_loopback, yes};

/// `[broker.rabbitmq]`
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
    #[serde(default = "yes")]
    pub declare_exchange: bool,
    /// Time to wait for a publisher confirm. Default 30s.
    #[cfg_attr(test, schemars(with = "String"))]
    #[serde(default = "default_confirm_timeout", with = "humantime_serde")]
    pub confirm_timeout: Duration,
    /// Allows an `amqp://` (plaintext) URL to a host that is not loopback. Default false:
    /// refused; use `amqps://`.
    #[serde(default)]
    pub allow_insecure_transport: bool,
    /// `[broker.rabbitmq.tls]`: trust and client identity for `amqps://`. Absent: the system's
    /// root certificates and no client certificate.
    pub tls: Option<AmqpTlsConfig>,
}

/// `[broker.rabbitmq.tls]` (PEM files, read at start).
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

fn default_exchange() -> String {
    "outbox".to_owned()
}
fn default_routing_key() -> String {
    "{aggregate_type}.{event_type}".to_owned()
}
fn default_confirm_timeout() -> Duration {
    Duration::from_secs(30)
}

/// `[broker.rabbitmq]`, parsed, with its TLS files read.
pub(crate) struct RabbitMqSettings {
    /// The AMQP URL. Secret: never logged.
    pub(crate) url: SecretString,
    pub(crate) exchange: Template,
    pub(crate) routing_key: Template,
    pub(crate) declare_exchange: bool,
    pub(crate) confirm_timeout: Duration,
    /// Trust roots and client identity, from `[broker.rabbitmq.tls]`.
    pub(crate) tls: OwnedTLSConfig,
}

impl fmt::Debug for RabbitMqSettings {
    // The URL and the client key are secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitMqSettings")
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .field("declare_exchange", &self.declare_exchange)
            .field("confirm_timeout", &self.confirm_timeout)
            .finish_non_exhaustive()
    }
}

impl RabbitMqConfig {
    /// Checks the section, reads the TLS files it names, and parses it; `lease` is
    /// `relay.lease_duration`, which must cover two confirm timeouts.
    pub(crate) fn validate(&self, lease: Duration) -> Result<RabbitMqSettings, ConfigError> {
        let (url, tls) = connection(
            "broker.rabbitmq",
            self.url.as_ref(),
            self.allow_insecure_transport,
            self.tls.as_ref(),
        )?;
        let exchange =
            Template::parse(&self.exchange).map_err(|c| invalid("broker.rabbitmq.exchange", c))?;
        let routing_key = Template::parse(&self.routing_key)
            .map_err(|c| invalid("broker.rabbitmq.routing_key", c))?;
        at_least(
            "broker.rabbitmq.confirm_timeout",
            self.confirm_timeout,
            Duration::from_millis(10),
        )?;
        // Opening a session, and then a batch's writes and confirms, may each take up to
        // confirm_timeout: the lease must outlast both, or a slow broker means duplicates.
        if self.confirm_timeout * 2 > lease {
            return Err(invalid(
                "relay.lease_duration",
                format!(
                    "must be at least twice broker.rabbitmq.confirm_timeout ({})",
                    humantime::format_duration(self.confirm_timeout)
                ),
            ));
        }
        Ok(RabbitMqSettings {
            url,
            exchange,
            routing_key,
            declare_exchange: self.declare_exchange,
            confirm_timeout: self.confirm_timeout,
            tls,
        })
    }
}

/// The URL and TLS keys every AMQP client section has (`section` is where they are written:
/// `broker.rabbitmq`, `inbox.rabbitmq`), checked: an `amqp://` or `amqps://` URL, no plaintext
/// to a remote host unless allowed, TLS files read (an unreadable file names its key).
pub(crate) fn connection(
    section: &str,
    url: Option<&SecretString>,
    allow_insecure_transport: bool,
    tls: Option<&AmqpTlsConfig>,
) -> Result<(SecretString, OwnedTLSConfig), ConfigError> {
    let key = format!("{section}.url");
    let url = url
        .ok_or_else(|| invalid(&key, format!("is required (or {section}.url_file)")))?
        .expose_secret();
    if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
        return Err(invalid(&key, "must be an amqp:// or amqps:// URL"));
    }
    let Ok(uri) = lapin::uri::AMQPUri::from_str(url) else {
        // The parse error may quote the URL, password included: do not pass it on.
        return Err(invalid(&key, "is not a valid AMQP URL"));
    };
    let plaintext = uri.scheme == lapin::uri::AMQPScheme::AMQP;
    if plaintext && !allow_insecure_transport && !is_loopback(&uri.authority.host) {
        return Err(invalid(
            &key,
            format!(
                "is amqp:// (plaintext) to {}; use amqps://, or set {section}.allow_insecure_transport = true",
                uri.authority.host
            ),
        ));
    }
    if let Some(tls) = tls {
        if plaintext {
            return Err(invalid(
                format!("{section}.tls"),
                format!("needs an amqps:// URL in {section}.url"),
            ));
        }
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            return Err(invalid(
                format!("{section}.tls.cert_file"),
                format!("and {section}.tls.key_file must be given together"),
            ));
        }
    }
    let read = |name: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|err| {
            invalid(
                format!("{section}.tls.{name}"),
                format!("cannot be read ({}): {err}", path.display()),
            )
        })
    };
    let mut owned = OwnedTLSConfig::default();
    if let Some(files) = tls {
        if let Some(path) = &files.ca_file {
            let pem = read("ca_file", path)?;
            owned.cert_chain =
                Some(String::from_utf8(pem).map_err(|_| {
                    invalid(format!("{section}.tls.ca_file"), "must be a PEM file")
                })?);
        }
        if let (Some(cert), Some(key)) = (&files.cert_file, &files.key_file) {
            owned.identity = Some(lapin::tcp::OwnedIdentity::PKCS8 {
                pem: read("cert_file", cert)?,
                key: read("key_file", key)?,
            });
        }
    }
    Ok((SecretString::from(url.to_owned()), owned))
}
