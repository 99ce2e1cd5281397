//! `[database]` for PostgreSQL: the section as written, and the settings it parses into.

use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sqlx::postgres::{PgConnectOptions, PgSslMode};

use super::{APPLICATION_NAME, IDLE_IN_TRANSACTION_TIMEOUT, Table};
use crate::constraint::{ConfigError, at_least, invalid, is_loopback, yes};
use crate::database::columns::{Columns, ColumnsConfig};
use crate::outbox::Layout;

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
    #[serde(default = "yes")]
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
    /// The table layout the column mapping starts from and the shape of the messages:
    /// `"relay"` (this relay's table and headers) or `"debezium"` (Debezium's outbox table and
    /// its Outbox Event Router's message). Default "relay".
    #[serde(default)]
    pub layout: Layout,
    /// `[database.columns]`: the table's own column names (see [`ColumnsConfig`]).
    #[serde(default)]
    pub columns: Option<ColumnsConfig>,
}

pub(crate) const DEFAULT_TABLE: &str = "outbox";

fn default_table() -> String {
    DEFAULT_TABLE.to_owned()
}
fn default_max_connections() -> u32 {
    4
}
fn default_statement_timeout() -> Duration {
    Duration::from_secs(30)
}

/// `[database]`, parsed.
#[derive(Debug, Clone)]
pub(crate) struct DatabaseSettings {
    /// Connection options of every relay session (see [`DatabaseConfig::validate`]).
    pub(crate) connect: PgConnectOptions,
    /// The outbox table.
    pub(crate) table: Table,
    pub(crate) max_connections: u32,
    pub(crate) statement_timeout: Duration,
    /// `database.notify_trigger`: what `migrate` does with the trigger.
    pub(crate) notify_trigger: bool,
    /// `database.layout`: the shape of the messages.
    pub(crate) layout: Layout,
    /// The table's column for each part of an event (`database.layout`, `[database.columns]`).
    pub(crate) columns: Columns,
}

impl DatabaseConfig {
    /// Checks the section and parses it.
    ///
    /// Every session is in UTC (sqlx sends `TimeZone=UTC` at startup, over any `options` the
    /// URL carries), so `timestamp` columns of an adopted table are read as UTC.
    ///
    /// The connection options carry, for every relay session, the application name, the
    /// statement timeout, `idle_in_transaction_session_timeout` and `synchronous_commit = off`.
    /// The relay's only transactions are claims, whose statements follow each other at once; a
    /// session idle inside one belongs to a relay that is paused (SIGSTOP, a stalled VM) or
    /// hung, and it holds the table's claim lock. PostgreSQL ends such a session after
    /// [`IDLE_IN_TRANSACTION_TIMEOUT`], so the other instances go on claiming. Asynchronous
    /// commit is safe here: a claim or mark lost in a database crash only makes a row publish
    /// again (a duplicate, which at-least-once allows), it can never make a row count as
    /// published when it was not; the application's own transactions keep their setting.
    pub(crate) fn validate(&self) -> Result<DatabaseSettings, ConfigError> {
        let url = self
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
        let Ok(options) = PgConnectOptions::from_str(url) else {
            // The parse error may quote the URL, password included: do not pass it on.
            return Err(invalid("database.url", "is not a valid PostgreSQL URL"));
        };
        let encrypted = matches!(
            options.get_ssl_mode(),
            PgSslMode::Require | PgSslMode::VerifyCa | PgSslMode::VerifyFull
        );
        let local = options.get_socket().is_some() || is_loopback(options.get_host());
        if !encrypted && !local && !self.allow_insecure_transport {
            return Err(invalid(
                "database.url",
                format!(
                    "connects to {} with an sslmode that may fall back to plaintext; use sslmode=verify-full (or require), or set database.allow_insecure_transport = true",
                    options.get_host()
                ),
            ));
        }
        let table = Table::parse(&self.table)
            .map_err(|constraint| invalid("database.table", constraint))?;
        if !(1..=64).contains(&self.max_connections) {
            return Err(invalid(
                "database.max_connections",
                "must be between 1 and 64",
            ));
        }
        at_least(
            "database.statement_timeout",
            self.statement_timeout,
            Duration::from_millis(100),
        )?;
        let timeout_ms = self.statement_timeout.as_millis().to_string();
        let connect = options.application_name(APPLICATION_NAME).options([
            ("statement_timeout", timeout_ms.as_str()),
            (
                "idle_in_transaction_session_timeout",
                IDLE_IN_TRANSACTION_TIMEOUT,
            ),
            ("synchronous_commit", "off"),
        ]);
        let columns = Columns::parse(self.layout, self.columns.as_ref())?;
        Ok(DatabaseSettings {
            connect,
            table,
            layout: self.layout,
            columns,
            max_connections: self.max_connections,
            statement_timeout: self.statement_timeout,
            notify_trigger: self.notify_trigger,
        })
    }
}
