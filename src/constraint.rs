//! The vocabulary every configuration section validates with: the error that names a key and
//! the constraint it broke, and the shared checks (durations, loopback hosts, secret files).
//! A leaf module: the sections, owned by their components, and `config`, which puts them
//! together, import it; it imports none of them.

use std::time::Duration;

use secrecy::SecretString;

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

impl ConfigError {
    /// The same error with keys of `[broker]` spelled as `[sink]`, their earlier name,
    /// for a file that still uses it.
    pub(crate) fn in_old_spelling(self) -> Self {
        let old = |text: String| {
            ["kafka", "rabbitmq", "kind", "allowed_destinations"]
                .iter()
                .fold(text, |text, key| {
                    text.replace(&format!("broker.{key}"), &format!("sink.{key}"))
                })
        };
        match self {
            Self::Invalid { key, constraint } => Self::Invalid {
                key: old(key),
                constraint: old(constraint),
            },
            load @ Self::Load(_) => load,
        }
    }
}

/// The error for `key` breaking `constraint`.
pub(crate) fn invalid(key: impl Into<String>, constraint: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        constraint: constraint.into(),
    }
}

/// `value` of `key` must be at least `min`.
pub(crate) fn at_least(key: &str, value: Duration, min: Duration) -> Result<(), ConfigError> {
    if value < min {
        return Err(invalid(
            key,
            format!("must be at least {}", humantime::format_duration(min)),
        ));
    }
    Ok(())
}

/// Whether `host` (a name or an address, IPv6 optionally in brackets) is this machine, where
/// plaintext never crosses a network.
pub(crate) fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.to_ascii_lowercase().ends_with(".localhost")
        || host.starts_with('/')
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The host of a `host:port` broker address (`[::1]:9092` included).
pub(crate) fn host_of(broker: &str) -> &str {
    let broker = broker.rsplit_once("://").map_or(broker, |(_, rest)| rest);
    if let Some(rest) = broker.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match broker.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.parse::<u16>().is_ok() => host,
        _ => broker,
    }
}

/// Reads a secret from `path` (trailing whitespace dropped); `key` names it in the error.
pub(crate) fn read_secret(path: &std::path::Path, key: &str) -> Result<SecretString, ConfigError> {
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

/// Fills `url` from `file` when that is set; both set is refused.
pub(crate) fn resolve_url(
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

/// `true`, for serde defaults.
pub(crate) fn yes() -> bool {
    true
}
