//! The databases the relay works next to: one module per family (PostgreSQL today), each with
//! its statements, commit-order guard, schema and configuration section, and the error every
//! family's operations report; [`columns`] maps the table's own column names, for all of them.

pub(crate) mod columns;
pub(crate) mod postgres;

use std::time::Duration;

/// A database operation failed. All of them are retried by the relay after a pause; the
/// SQLSTATE tells the operator what to do.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DatabaseError {
    /// The database (or the connection to it) answered with an error.
    #[error("database {op} failed")]
    Sql {
        /// Which statement failed (`claim`, `mark`, ...).
        op: &'static str,
        #[source]
        source: sqlx::Error,
    },
    /// No answer within the client-side bound (`database.statement_timeout` + 5 s), or no
    /// connection within the acquire timeout (every one stuck): the connection stopped
    /// answering (packets dropped, peer gone without a reset). The operation was abandoned,
    /// and with it the connection.
    #[error("database {op} got no answer within {}; the connection was abandoned", humantime::format_duration(*limit))]
    NoAnswer { op: &'static str, limit: Duration },
}

impl DatabaseError {
    /// Wraps the error of statement `op`.
    pub(crate) fn new(op: &'static str) -> impl FnOnce(sqlx::Error) -> Self {
        move |source| Self::Sql { op, source }
    }

    /// An operator hint for errors that need a human, e.g. a missing table.
    pub(crate) fn hint(&self) -> Option<&'static str> {
        let Self::Sql { source, .. } = self else {
            return None;
        };
        let code = source.as_database_error()?.code()?;
        match code.as_ref() {
            "42P01" => Some(
                "the outbox table or its lease table does not exist: run `outbox-relay migrate`",
            ),
            "42703" | "42804" => Some(
                "the outbox table lacks a required column or has a wrong type: run `outbox-relay check`",
            ),
            "42501" => Some("the relay's database role lacks a privilege on the outbox table"),
            // undefined_function: the claim's pg_column_compression is PostgreSQL 14's
            "42883" => Some("the relay needs PostgreSQL 14 or later: run `outbox-relay check`"),
            _ => None,
        }
    }
}
