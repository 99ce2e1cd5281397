//! `migrate` (versioned, embedded SQL applied to the configured table) and the schema check used
//! by `check`.

use std::fmt;

use sqlx::postgres::PgConnection;
use sqlx::{Acquire, AssertSqlSafe, Connection, Row};

use super::Table;

/// The migrations, in order, embedded in the binary. Versions are recorded per table in
/// `outbox_relay_migrations` (in the outbox table's schema).
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "outbox",
        include_str!("../../../migrations/0001_outbox.sql"),
    ),
    (
        2,
        "waiting_index",
        include_str!("../../../migrations/0002_waiting_index.sql"),
    ),
    (
        3,
        "dead_index",
        include_str!("../../../migrations/0003_dead_index.sql"),
    ),
    (
        4,
        "published_index",
        include_str!("../../../migrations/0004_published_index.sql"),
    ),
    (5, "leases", LEASE_TABLE),
    (
        6,
        "event_id_uuidv7",
        include_str!("../../../migrations/0006_event_id_uuidv7.sql"),
    ),
    (
        7,
        "row_state",
        include_str!("../../../migrations/0007_row_state.sql"),
    ),
];

/// Migration 0005. The lease table holds only the relay's own state, so `migrate` also creates
/// it on every run when it is missing (dropped, or a table adopted at version 5 without it).
const LEASE_TABLE: &str = include_str!("../../../migrations/0005_leases.sql");

/// Renders a migration for `table`: every placeholder becomes a validated, quoted identifier.
fn render(sql: &str, table: &Table) -> String {
    let bare = |suffix: &str| format!("\"{}_{suffix}\"", table.name());
    sql.replace("{{table}}", &table.quoted())
        .replace("{{pending_index}}", &bare("pending_idx"))
        .replace("{{aggregate_index}}", &bare("aggregate_pending_idx"))
        .replace(
            "{{aggregate_index_qualified}}",
            &table.companion("aggregate_pending_idx"),
        )
        .replace("{{waiting_index}}", &bare("waiting_idx"))
        .replace("{{dead_index}}", &bare("dead_idx"))
        .replace("{{published_index}}", &bare("published_idx"))
        .replace("{{lease_table}}", &table.companion("leases"))
        .replace("{{notify_trigger}}", &bare("relay_notify"))
        .replace("{{notify_function}}", &table.companion("relay_notify"))
        .replace("{{uuidv7_function}}", &table.companion("uuidv7"))
}

fn tracking_table(table: &Table) -> String {
    match table.schema() {
        Some(schema) => format!("\"{schema}\".\"outbox_relay_migrations\""),
        None => "\"outbox_relay_migrations\"".to_owned(),
    }
}

/// What `migrate` did.
#[derive(Debug)]
pub(crate) struct Migrated {
    /// Versions applied by this run (empty when the table was up to date).
    pub(crate) applied: Vec<i32>,
    /// The newest version now in place.
    pub(crate) current: i32,
}

/// Applies the missing migrations to `table` in one transaction. Safe to run from several
/// sidecars at once: one advisory lock per database serialises every `migrate` (it covers the
/// shared tracking table and schemas too: concurrent `create ... if not exists` of one object can
/// fail), and the second finds nothing to do.
pub(crate) async fn migrate(
    conn: &mut PgConnection,
    table: &Table,
    notify_trigger: bool,
) -> Result<Migrated, sqlx::Error> {
    let mut tx = sqlx::Connection::begin(conn).await?;
    sqlx::query("select pg_advisory_xact_lock(hashtextextended('outbox-relay:migrate', 0))")
        .execute(&mut *tx)
        .await?;
    let tracking = tracking_table(table);
    if let Some(schema) = table.schema() {
        sqlx::raw_sql(AssertSqlSafe(format!(
            "create schema if not exists \"{schema}\""
        )))
        .execute(&mut *tx)
        .await?;
    }
    sqlx::raw_sql(AssertSqlSafe(format!(
        "create table if not exists {tracking} (
             table_name text not null,
             version    integer not null,
             name       text not null,
             applied_at timestamptz not null default now(),
             primary key (table_name, version))"
    )))
    .execute(&mut *tx)
    .await?;
    let applied: Vec<i32> = sqlx::query_scalar(AssertSqlSafe(format!(
        "select version from {tracking} where table_name = $1"
    )))
    .bind(table.to_string())
    .fetch_all(&mut *tx)
    .await?;
    let mut done = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        sqlx::raw_sql(AssertSqlSafe(render(sql, table)))
            .execute(&mut *tx)
            .await?;
        sqlx::query(AssertSqlSafe(format!(
            "insert into {tracking} (table_name, version, name) values ($1, $2, $3)"
        )))
        .bind(table.to_string())
        .bind(version)
        .bind(name)
        .execute(&mut *tx)
        .await?;
        done.push(*version);
    }
    // `create table if not exists`: a no-op unless the lease table was dropped.
    sqlx::raw_sql(AssertSqlSafe(render(LEASE_TABLE, table)))
        .execute(&mut *tx)
        .await?;
    // The NOTIFY trigger follows `database.notify_trigger` on every run: NOTIFY takes a
    // database-wide lock at commit, which busy writers may not want to pay for (see README).
    let trigger = format!("\"{}_relay_notify\"", table.name());
    let statement = if notify_trigger {
        format!(
            "create or replace trigger {trigger} after insert on {} for each statement execute function {}()",
            table.quoted(),
            table.companion("relay_notify")
        )
    } else {
        format!("drop trigger if exists {trigger} on {}", table.quoted())
    };
    sqlx::raw_sql(AssertSqlSafe(statement))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Migrated {
        applied: done,
        current: MIGRATIONS.last().map_or(0, |m| m.0),
    })
}

/// A column the relay reads or writes, and the types it accepts.
struct Required {
    name: &'static str,
    types: &'static [&'static str],
    /// The relay relies on the column never being NULL (`check` warns otherwise).
    not_null: bool,
}

const REQUIRED: &[Required] = &[
    Required {
        name: "id",
        types: &["bigint"],
        not_null: true,
    },
    Required {
        name: "event_id",
        types: &["uuid"],
        not_null: true,
    },
    Required {
        name: "aggregate_type",
        types: &["text", "character varying"],
        not_null: true,
    },
    Required {
        name: "aggregate_id",
        types: &["text", "character varying"],
        not_null: true,
    },
    Required {
        name: "event_type",
        types: &["text", "character varying"],
        not_null: true,
    },
    Required {
        name: "payload",
        types: &["jsonb", "json"],
        not_null: true,
    },
    Required {
        name: "headers",
        types: &["jsonb", "json"],
        not_null: false,
    },
    Required {
        name: "created_at",
        types: &["timestamp with time zone"],
        not_null: true,
    },
    Required {
        name: "published_at",
        types: &["timestamp with time zone"],
        not_null: false,
    },
    Required {
        name: "attempts",
        types: &["integer"],
        not_null: true,
    },
    Required {
        name: "next_attempt_at",
        types: &["timestamp with time zone"],
        not_null: false,
    },
    Required {
        name: "last_error",
        types: &["text", "character varying"],
        not_null: false,
    },
    Required {
        name: "dead_lettered_at",
        types: &["timestamp with time zone"],
        not_null: false,
    },
    Required {
        name: "unsettled_attempts",
        types: &["integer"],
        not_null: true,
    },
    Required {
        name: "deferrals",
        types: &["integer"],
        not_null: true,
    },
];

/// What the schema check found.
#[derive(Debug)]
pub(crate) struct Inspection {
    /// `schema.table` as PostgreSQL resolved it.
    pub(crate) resolved: String,
    /// Required columns that are absent.
    pub(crate) missing: Vec<&'static str>,
    /// Required columns present with an unusable type: (column, found type).
    pub(crate) wrong_type: Vec<(&'static str, String)>,
    /// Required columns without the NOT NULL constraint the relay relies on: a row with a NULL
    /// there fails (and is dead-lettered) instead of being published.
    pub(crate) nullable: Vec<&'static str>,
    /// Columns beyond the required ones (the application's own).
    pub(crate) extra: Vec<String>,
    /// Whether the NOTIFY trigger of `migrate` is installed.
    pub(crate) has_notify_trigger: bool,
    /// The channel the NOTIFY trigger uses for this table.
    pub(crate) channel: String,
    /// Whether the lease table of migration 0005 exists.
    pub(crate) has_lease_table: bool,
    /// Its name, for the message.
    pub(crate) lease_table: String,
    /// `server_version_num`: the claim measures payloads with `pg_column_compression`
    /// (PostgreSQL 14).
    pub(crate) server_version: i32,
}

/// The oldest PostgreSQL the relay's statements run on, as `server_version_num`.
const MIN_SERVER_VERSION: i32 = 140_000;

impl Inspection {
    /// True when the relay can run against the table.
    pub(crate) fn is_usable(&self) -> bool {
        self.missing.is_empty()
            && self.wrong_type.is_empty()
            && self.has_lease_table
            && self.server_version >= MIN_SERVER_VERSION
    }
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "table {}: ", self.resolved)?;
        if self.is_usable() {
            write!(f, "all {} required columns present", REQUIRED.len())?;
        } else {
            if !self.missing.is_empty() {
                write!(f, "missing columns: {}", self.missing.join(", "))?;
            }
            for (column, found) in &self.wrong_type {
                write!(f, "; column {column} has type {found}")?;
            }
            if self.server_version < MIN_SERVER_VERSION {
                write!(
                    f,
                    "; PostgreSQL {}.{} is older than 14, the oldest the relay supports",
                    self.server_version / 10_000,
                    self.server_version % 10_000
                )?;
            }
            if !self.has_lease_table {
                write!(
                    f,
                    "; lease table {} missing (run `outbox-relay migrate`)",
                    self.lease_table
                )?;
            }
        }
        if !self.nullable.is_empty() {
            write!(
                f,
                "; WARNING: columns without NOT NULL: {} (a row with a NULL there is dead-lettered, not published; add the constraints)",
                self.nullable.join(", ")
            )?;
        }
        if !self.extra.is_empty() {
            write!(f, "; extra columns: {}", self.extra.join(", "))?;
        }
        if self.has_notify_trigger {
            write!(f, "; notify trigger: installed (channel {})", self.channel)
        } else {
            write!(f, "; notify trigger: absent")
        }
    }
}

/// Why the table cannot be inspected.
#[derive(Debug, thiserror::Error)]
pub(crate) enum InspectError {
    /// `to_regclass` found nothing.
    #[error("outbox table {0} does not exist: run `outbox-relay migrate`")]
    Missing(Table),
    /// The catalog query failed.
    #[error("cannot read the outbox table's columns")]
    Query(#[from] sqlx::Error),
}

/// Reads the table's columns and trigger from the catalog and compares them with what the relay needs.
pub(crate) async fn inspect(
    conn: &mut PgConnection,
    table: &Table,
) -> Result<Inspection, InspectError> {
    let conn = conn.acquire().await?;
    let found = sqlx::query(
        "select n.nspname, c.relname, c.oid::bigint as oid from pg_class c
         join pg_namespace n on n.oid = c.relnamespace
         where c.oid = to_regclass($1)",
    )
    .bind(table.quoted())
    .fetch_optional(&mut *conn)
    .await?;
    let Some(found) = found else {
        return Err(InspectError::Missing(table.clone()));
    };
    let schema: String = found.try_get(0)?;
    let relname: String = found.try_get(1)?;
    let oid: i64 = found.try_get(2)?;
    let columns = sqlx::query(
        "select attname::text, format_type(atttypid, atttypmod), attnotnull from pg_attribute
         where attrelid = $1::bigint::oid and attnum > 0 and not attisdropped order by attnum",
    )
    .bind(oid)
    .fetch_all(&mut *conn)
    .await?;
    let columns: Vec<(String, String, bool)> = columns
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
        .collect::<Result<_, sqlx::Error>>()?;
    let has_notify_trigger: bool = sqlx::query_scalar(
        "select exists (select 1 from pg_trigger where tgrelid = $1::bigint::oid and tgname = $2)",
    )
    .bind(oid)
    .bind(format!("{}_relay_notify", table.name()))
    .fetch_one(&mut *conn)
    .await?;
    let lease_table = table.companion("leases");
    let has_lease_table: bool = sqlx::query_scalar("select to_regclass($1) is not null")
        .bind(&lease_table)
        .fetch_one(&mut *conn)
        .await?;

    let server_version: i32 =
        sqlx::query_scalar("select current_setting('server_version_num')::int")
            .fetch_one(&mut *conn)
            .await?;

    let mut inspection = Inspection {
        server_version,
        has_lease_table,
        lease_table: lease_table.replace('"', ""),
        channel: format!("outbox_relay:{schema}.{relname}"),
        resolved: format!("{schema}.{relname}"),
        missing: Vec::new(),
        wrong_type: Vec::new(),
        nullable: Vec::new(),
        extra: Vec::new(),
        has_notify_trigger,
    };
    for required in REQUIRED {
        match columns.iter().find(|(name, _, _)| name == required.name) {
            None => inspection.missing.push(required.name),
            Some((_, ty, _)) if !required.types.contains(&ty.as_str()) => {
                inspection.wrong_type.push((required.name, ty.clone()));
            }
            Some((_, _, not_null)) => {
                if required.not_null && !not_null {
                    inspection.nullable.push(required.name);
                }
            }
        }
    }
    inspection.extra = columns
        .into_iter()
        .filter(|(name, _, _)| !REQUIRED.iter().any(|r| r.name == name))
        .map(|(name, _, _)| name)
        .collect();
    Ok(inspection)
}

/// Connects once (used by `migrate` and `check`).
pub(crate) async fn connect(
    options: &sqlx::postgres::PgConnectOptions,
) -> Result<PgConnection, sqlx::Error> {
    PgConnection::connect_with(options).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inspection(server_version: i32) -> Inspection {
        Inspection {
            resolved: "public.outbox".to_owned(),
            missing: Vec::new(),
            wrong_type: Vec::new(),
            nullable: Vec::new(),
            extra: Vec::new(),
            has_notify_trigger: true,
            channel: "outbox_relay:public.outbox".to_owned(),
            has_lease_table: true,
            lease_table: "public.outbox_leases".to_owned(),
            server_version,
        }
    }

    #[test]
    fn a_server_older_than_postgresql_14_is_named_and_refused() {
        assert!(inspection(140_000).is_usable());
        let old = inspection(130_011);
        assert!(!old.is_usable());
        let text = old.to_string();
        assert!(text.contains("PostgreSQL 13.11 is older than 14"), "{text}");
    }
}
