//! `migrate` (versioned, embedded SQL applied to the configured table) and the schema check used
//! by `check`.

use std::fmt;

use sqlx::postgres::PgConnection;
use sqlx::{Acquire, AssertSqlSafe, Connection, Row};

use super::Table;
use crate::database::columns::Columns;

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
    (
        8,
        "topic_partitions",
        include_str!("../../../migrations/0008_topic_partitions.sql"),
    ),
    (
        9,
        "notify_when_idle",
        include_str!("../../../migrations/0009_notify_when_idle.sql"),
    ),
];

/// The last version [`ADOPT`] covers: a mapped table gets later versions as they are.
const ADOPTED_THROUGH: i32 = 7;

/// Migration 0005. The lease table holds only the relay's own state, so `migrate` also creates
/// it on every run when it is missing (dropped, or a table adopted at version 5 without it).
const LEASE_TABLE: &str = include_str!("../../../migrations/0005_leases.sql");

/// What `migrate` runs for a table with its own column names (see the file).
const ADOPT: &str = include_str!("../../../migrations/adopt.sql");

/// Debezium's outbox table as its documentation creates it, for `migrate` with
/// `database.layout = "debezium"` when the table does not exist yet.
const DEBEZIUM_TABLE: &str = "create table {{table}} (
    id            uuid primary key,
    aggregatetype varchar(255) not null,
    aggregateid   varchar(255) not null,
    type          varchar(255) not null,
    payload       jsonb)";

/// Renders a migration for `table`: every placeholder becomes a validated, quoted identifier.
fn render(sql: &str, table: &Table) -> String {
    render_with(sql, table, &Columns::relay())
}

/// [`render`] for a table whose columns `columns` names.
fn render_with(sql: &str, table: &Table, columns: &Columns) -> String {
    let bare = |suffix: &str| format!("\"{}_{suffix}\"", table.name());
    sql.replace("{{table}}", &table.quoted())
        .replace("{{id}}", &format!("\"{}\"", columns.id))
        .replace("{{aggregate_id}}", &format!("\"{}\"", columns.aggregate_id))
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
        .replace("{{topic_partitions}}", &table.companion("topic_partitions"))
        .replace("{{awake_table}}", &table.companion("awake"))
        .replace("{{notify_trigger}}", &bare("relay_notify"))
        .replace("{{notify_function}}", &table.companion("relay_notify"))
        .replace("{{uuidv7_function}}", &table.companion("uuidv7"))
}

/// The table recording applied versions, in `table`'s schema.
pub(super) fn tracking_table(table: &Table) -> String {
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

/// Why `migrate` failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MigrateError {
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
    /// A mapped table must exist: `migrate` adopts it, it does not invent the application's
    /// columns.
    #[error(
        "table {0} does not exist: with database.columns set, migrate adopts an existing table (create it first; only database.layout = \"debezium\" with its default columns creates Debezium's table)"
    )]
    NoTable(Table),
}

/// Applies the missing migrations to `table` in one transaction. Safe to run from several
/// sidecars at once: one advisory lock per database serialises every `migrate` (it covers the
/// shared tracking table and schemas too: concurrent `create ... if not exists` of one object can
/// fail), and the second finds nothing to do.
pub(crate) async fn migrate(
    conn: &mut PgConnection,
    table: &Table,
    columns: &Columns,
    notify_trigger: bool,
) -> Result<Migrated, MigrateError> {
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
    create_tracking(&mut tx, &tracking).await?;
    let applied: Vec<i32> = sqlx::query_scalar(AssertSqlSafe(format!(
        "select version from {tracking} where table_name = $1"
    )))
    .bind(table.to_string())
    .fetch_all(&mut *tx)
    .await?;
    // The NOTIFY function (0009) is a security definer and names the awake table with its
    // schema (the configured one, or the one the table is created in), so a caller's
    // search_path cannot redirect it.
    let schema: String = sqlx::query_scalar("select coalesce($1, current_schema())")
        .bind(table.schema())
        .fetch_one(&mut *tx)
        .await?;
    let awake_qualified = format!("\"{schema}\".\"{}_awake\"", table.name());
    let mut done = Vec::new();
    let adopting = !columns.is_relay_default();
    if adopting {
        adopt(&mut tx, table, columns).await?;
    }
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        // An adopted table gets the state of the versions `adopt` covers from it.
        let name = if adopting && *version <= ADOPTED_THROUGH {
            "adopted (database.columns)"
        } else {
            let sql = render_with(sql, table, columns)
                .replace("{{awake_table_qualified}}", &awake_qualified);
            sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut *tx).await?;
            *name
        };
        record(&mut tx, &tracking, table, *version, name).await?;
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

/// Records in `tracking` that `version` (`name`) of `table` is applied.
pub(super) async fn record(
    conn: &mut PgConnection,
    tracking: &str,
    table: &Table,
    version: i32,
    name: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(AssertSqlSafe(format!(
        "insert into {tracking} (table_name, version, name) values ($1, $2, $3)"
    )))
    .bind(table.to_string())
    .bind(version)
    .bind(name)
    .execute(conn)
    .await?;
    Ok(())
}

/// Creates the tracking table `tracking` when it is missing.
pub(super) async fn create_tracking(
    conn: &mut PgConnection,
    tracking: &str,
) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(AssertSqlSafe(format!(
        "create table if not exists {tracking} (
             table_name text not null,
             version    integer not null,
             name       text not null,
             applied_at timestamptz not null default now(),
             primary key (table_name, version))"
    )))
    .execute(conn)
    .await?;
    Ok(())
}

/// Adopts a table with its own column names: creates Debezium's table when that layout is
/// asked for and the table is missing, adds the ordering column when the table has none
/// (`bigint generated by default as identity`, with a unique index; existing rows are numbered
/// in the table's physical order), then everything [`ADOPT`] adds.
async fn adopt(
    tx: &mut PgConnection,
    table: &Table,
    columns: &Columns,
) -> Result<(), MigrateError> {
    let exists: bool = sqlx::query_scalar("select to_regclass($1) is not null")
        .bind(table.quoted())
        .fetch_one(&mut *tx)
        .await?;
    if !exists {
        if *columns != Columns::debezium() {
            return Err(MigrateError::NoTable(table.clone()));
        }
        sqlx::raw_sql(AssertSqlSafe(render_with(DEBEZIUM_TABLE, table, columns)))
            .execute(&mut *tx)
            .await?;
    }
    let has_ordering: bool = sqlx::query_scalar(
        "select exists (select 1 from pg_attribute
                        where attrelid = to_regclass($1) and attname = $2 and not attisdropped)",
    )
    .bind(table.quoted())
    .bind(&columns.id)
    .fetch_one(&mut *tx)
    .await?;
    if !has_ordering {
        sqlx::raw_sql(AssertSqlSafe(format!(
            "alter table {t} add column \"{id}\" bigint generated by default as identity;
             create unique index if not exists {index} on {t} (\"{id}\")",
            t = table.quoted(),
            id = columns.id,
            index = format_args!("\"{}_ordering_idx\"", table.name()),
        )))
        .execute(&mut *tx)
        .await?;
    }
    sqlx::raw_sql(AssertSqlSafe(render_with(ADOPT, table, columns)))
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// A column the relay reads or writes, and the types it accepts.
struct Required {
    /// The column as the table names it.
    name: String,
    /// Type names as `format_type` prints them, without a length or precision (`character
    /// varying`, `timestamp with time zone`); empty: any type.
    types: &'static [&'static str],
    /// The relay relies on the column never being NULL (`check` warns otherwise).
    not_null: bool,
}

const TEXT: &[&str] = &["text", "character varying", "character"];
/// Any type (a column sent as its text).
const ANY: &[&str] = &[];
const TIMESTAMP: &[&str] = &["timestamp with time zone"];

/// The columns the relay needs in a table mapped by `columns`.
fn required(columns: &Columns) -> Vec<Required> {
    let column = |name: &str, types, not_null| Required {
        name: name.to_owned(),
        types,
        not_null,
    };
    let mut out = vec![
        column(&columns.id, &["bigint", "integer"][..], true),
        column(
            &columns.event_id,
            &["uuid", "text", "character varying", "character"],
            true,
        ),
        column(&columns.aggregate_type, TEXT, true),
        column(
            &columns.aggregate_id,
            &[
                "text",
                "character varying",
                "character",
                "uuid",
                "bigint",
                "integer",
            ],
            true,
        ),
        column(&columns.event_type, TEXT, true),
        // NULL is a tombstone, not a failure
        column(
            &columns.payload,
            &["jsonb", "json", "text", "character varying", "bytea"],
            false,
        ),
    ];
    if let Some(headers) = &columns.headers {
        out.push(column(headers, &["jsonb", "json", "text"], false));
    }
    if let Some(created_at) = &columns.created_at {
        out.push(column(
            created_at,
            &["timestamp with time zone", "timestamp without time zone"],
            true,
        ));
    }
    // sent as their text, whatever their type
    for (header_column, _) in &columns.header_columns {
        out.push(column(header_column, ANY, false));
    }
    for (name, types, not_null) in [
        ("published_at", TIMESTAMP, false),
        ("attempts", &["integer"][..], true),
        ("next_attempt_at", TIMESTAMP, false),
        ("last_error", TEXT, false),
        ("dead_lettered_at", TIMESTAMP, false),
        ("unsettled_attempts", &["integer"][..], true),
        ("deferrals", &["integer"][..], true),
    ] {
        out.push(column(name, types, not_null));
    }
    out
}

/// A type as `format_type` prints it, without its length or precision:
/// `character varying(255)` → `character varying`, `timestamp(3) with time zone` →
/// `timestamp with time zone`.
fn without_modifier(ty: &str) -> String {
    match (ty.find('('), ty.find(')')) {
        (Some(open), Some(close)) if open < close => {
            format!("{}{}", &ty[..open], &ty[close + 1..])
        }
        _ => ty.to_owned(),
    }
}

/// What the schema check found.
#[derive(Debug)]
pub(crate) struct Inspection {
    /// `schema.table` as PostgreSQL resolved it.
    pub(crate) resolved: String,
    /// Required columns that are absent.
    pub(crate) missing: Vec<String>,
    /// Required columns present with an unusable type: (column, found type).
    pub(crate) wrong_type: Vec<(String, String)>,
    /// Required columns without the NOT NULL constraint the relay relies on: a row with a NULL
    /// there fails (and is dead-lettered) instead of being published.
    pub(crate) nullable: Vec<String>,
    /// How many columns the relay needs.
    pub(crate) required: usize,
    /// Logical column → the table's column, when the table is mapped (`database.columns`).
    pub(crate) mapped: Vec<(&'static str, String)>,
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
        if !self.mapped.is_empty() {
            let mapped: Vec<String> = self
                .mapped
                .iter()
                .map(|(logical, column)| format!("{logical} = {column}"))
                .collect();
            write!(f, "columns mapped: {}; ", mapped.join(", "))?;
        }
        if self.is_usable() {
            write!(f, "all {} required columns present", self.required)?;
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
    columns_mapped: &Columns,
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

    let needed = required(columns_mapped);
    let mut inspection = Inspection {
        server_version,
        has_lease_table,
        lease_table: lease_table.replace('"', ""),
        channel: format!("outbox_relay:{schema}.{relname}"),
        resolved: format!("{schema}.{relname}"),
        missing: Vec::new(),
        wrong_type: Vec::new(),
        nullable: Vec::new(),
        required: needed.len(),
        mapped: if columns_mapped.is_relay_default() {
            Vec::new()
        } else {
            columns_mapped.mapped()
        },
        extra: Vec::new(),
        has_notify_trigger,
    };
    for required in &needed {
        match columns.iter().find(|(name, _, _)| *name == required.name) {
            None => inspection.missing.push(required.name.clone()),
            Some((_, ty, _))
                if !required.types.is_empty()
                    && !required.types.contains(&without_modifier(ty).as_str()) =>
            {
                inspection
                    .wrong_type
                    .push((required.name.clone(), ty.clone()));
            }
            Some((_, _, not_null)) => {
                if required.not_null && !not_null {
                    inspection.nullable.push(required.name.clone());
                }
            }
        }
    }
    inspection.extra = columns
        .into_iter()
        .filter(|(name, _, _)| !needed.iter().any(|r| r.name == *name))
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
            required: 15,
            mapped: Vec::new(),
            extra: Vec::new(),
            has_notify_trigger: true,
            channel: "outbox_relay:public.outbox".to_owned(),
            has_lease_table: true,
            lease_table: "public.outbox_leases".to_owned(),
            server_version,
        }
    }

    #[test]
    fn type_modifiers_do_not_hide_an_accepted_type() {
        assert_eq!(
            without_modifier("character varying(255)"),
            "character varying"
        );
        assert_eq!(
            without_modifier("timestamp(3) with time zone"),
            "timestamp with time zone"
        );
        assert_eq!(without_modifier("jsonb"), "jsonb");
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
