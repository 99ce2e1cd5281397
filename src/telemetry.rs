//! Logging setup (tracing, JSON or text, `RUST_LOG` over `log.level`) and error display helpers.

use std::error::Error;
use std::fmt;
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. Logs go to stderr; command output (`check`, `migrate`) goes
/// to stdout.
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| {
            // sqlx reports server notices ("already exists, skipping") at info: keep them quiet
            // unless the user asks for sqlx explicitly.
            // lapin logs channel closes itself at error; the relay logs them once, with context.
            let mut level = config.level.clone();
            if !level.contains("sqlx") {
                level.push_str(",sqlx=warn");
            }
            if !level.contains("lapin") {
                level.push_str(",lapin=off");
            }
            EnvFilter::try_new(level)
        })
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    // A second init (tests) keeps the first subscriber.
    let _ = match config.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Displays an error with its chain of sources: `database claim failed: pool timed out`.
/// For log fields and for the `last_error` column; the error itself is passed on as a value.
#[derive(Debug)]
pub struct ErrorChain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(err) = source {
            write!(f, ": {err}")?;
            source = err.source();
        }
        Ok(())
    }
}
