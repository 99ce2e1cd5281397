//! The inbox tables in PostgreSQL: their migrations, the batch write (one transaction, `ON
//! CONFLICT DO NOTHING`), retention of processed rows, and what `status` reports.

use std::time::Duration;

use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Connection, SqlStr};

use super::schema::{MigrateError, Migrated};
use super::{Connections, Table, sql};
use crate::database::DatabaseError;
use crate::inbox::store::{InboxStatus, InboxStore, Written};
use crate::inbox::{Content, Entry, InboxRow, Reason, Rejected};

/// The inbox's migrations, in order; versions are recorded for the inbox table in
/// `outbox_relay_migrations`, as the outbox's are for its table.
const MIGRATIONS: &[(i32, &str, &str)] = &[(
    1,
    "inbox",
    include_str!("../../../migrations/inbox/0001_inbox.sql"),
)];

fn render(sql: &str, table: &Table) -> String {
    sql.replace("{{table}}", &table.quoted())
        .replace("{{rejected}}", &table.companion("rejected"))
        .replace("{{stats}}", &table.companion("stats"))
        .replace("{{dedupe}}", &format!("\"{}_dedupe\"", table.name()))
        .replace("{{one_body}}", &format!("\"{}_one_body\"", table.name()))
        .replace(
            "{{unprocessed_index}}",
            &format!("\"{}_unprocessed_idx\"", table.name()),
        )
        .replace(
            "{{processed_index}}",
            &format!("\"{}_processed_idx\"", table.name()),
        )
}

/// Creates or updates the inbox tables (idempotent; serialised with every other `migrate` by
/// the same advisory lock).
pub(crate) async fn migrate(
    conn: &mut PgConnection,
    table: &Table,
) -> Result<Migrated, MigrateError> {
    let mut tx = conn.begin().await?;
    sqlx::query("select pg_advisory_xact_lock(hashtextextended('outbox-relay:migrate', 0))")
        .execute(&mut *tx)
        .await?;
    let tracking = super::schema::tracking_table(table);
    if let Some(schema) = table.schema() {
        sqlx::raw_sql(AssertSqlSafe(format!(
            "create schema if not exists \"{schema}\""
        )))
        .execute(&mut *tx)
        .await?;
    }
    super::schema::create_tracking(&mut tx, &tracking).await?;
    let applied: Vec<i32> = sqlx::query_scalar(AssertSqlSafe(format!(
        "select version from {tracking} where table_name = $1"
    )))
    .bind(table.to_string())
    .fetch_all(&mut *tx)
    .await?;
    let mut done = Vec::new();
    for (version, name, text) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        sqlx::raw_sql(AssertSqlSafe(render(text, table)))
            .execute(&mut *tx)
            .await?;
        super::schema::record(&mut tx, &tracking, table, *version, name).await?;
        done.push(*version);
    }
    tx.commit().await?;
    Ok(Migrated {
        applied: done,
        current: MIGRATIONS.last().map_or(0, |m| m.0),
    })
}

/// The inbox's statements over the shared pool.
#[derive(Debug, Clone)]
pub(crate) struct PgInbox {
    connections: Connections,
    insert: SqlStr,
    reject: SqlStr,
    count_duplicates: SqlStr,
    delete_processed: SqlStr,
    status: SqlStr,
}

impl PgInbox {
    /// The statements for `table`; nothing connects yet.
    pub(crate) fn new(connections: Connections, table: &Table) -> Self {
        let t = table.quoted();
        let rejected = table.companion("rejected");
        let stats = table.companion("stats");
        Self {
            connections,
            // Rows keep the order given (`with ordinality`), so their ids follow the broker's.
            insert: sql(format!(
                "insert into {t} (consumer, event_id, source, \"partition\", \"offset\", message_key,
                                  event_type, aggregate_type, aggregate_id, headers, payload, body)
                 select $1, event_id, source, part, off, message_key, event_type, aggregate_type,
                        aggregate_id, headers::jsonb, payload::jsonb, body
                 from unnest($2::text[], $3::text[], $4::int4[], $5::int8[], $6::text[], $7::text[],
                             $8::text[], $9::text[], $10::text[], $11::text[], $12::bytea[])
                      with ordinality
                      as m(event_id, source, part, off, message_key, event_type, aggregate_type,
                           aggregate_id, headers, payload, body, n)
                 order by n
                 on conflict (consumer, event_id) do nothing"
            )),
            reject: sql(format!(
                "insert into {rejected} (consumer, source, \"partition\", \"offset\", message_key,
                                         headers, body, reason)
                 select $1, source, part, off, message_key, headers::jsonb, body, reason
                 from unnest($2::text[], $3::int4[], $4::int8[], $5::text[], $6::text[],
                             $7::bytea[], $8::text[]) with ordinality
                      as m(source, part, off, message_key, headers, body, reason, n)
                 order by n"
            )),
            count_duplicates: sql(format!(
                "insert into {stats} (consumer, duplicates) values ($1, $2)
                 on conflict (consumer) do update set duplicates = {stats}.duplicates + excluded.duplicates"
            )),
            delete_processed: sql(format!(
                "delete from {t} where id in (
                     select id from {t}
                     where consumer = $1 and processed_at < now() - $2::interval
                     limit $3)"
            )),
            status: status_sql(table),
        }
    }

    /// Inserts `rows` in one statement; the rows it added.
    async fn insert_rows(
        &self,
        tx: &mut PgConnection,
        consumer: &str,
        rows: &[&InboxRow],
    ) -> Result<u64, sqlx::Error> {
        let mut payload = Vec::with_capacity(rows.len());
        let mut body = Vec::with_capacity(rows.len());
        for row in rows {
            match &row.content {
                Content::Json(json) => {
                    payload.push(Some(json.as_str()));
                    body.push(None);
                }
                Content::Bytes(bytes) => {
                    payload.push(None);
                    body.push(Some(bytes.as_slice()));
                }
            }
        }
        let done = sqlx::query(self.insert.clone())
            .bind(consumer)
            .bind(rows.iter().map(|r| r.event_id.as_str()).collect::<Vec<_>>())
            .bind(
                rows.iter()
                    .map(|r| r.origin.source.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(rows.iter().map(|r| r.origin.partition).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.origin.offset).collect::<Vec<_>>())
            .bind(
                rows.iter()
                    .map(|r| r.origin.message_key.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(
                rows.iter()
                    .map(|r| r.event_type.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(
                rows.iter()
                    .map(|r| r.aggregate_type.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(
                rows.iter()
                    .map(|r| r.aggregate_id.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(
                rows.iter()
                    .map(|r| r.origin.headers.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(payload)
            .bind(body)
            .execute(&mut *tx)
            .await?;
        Ok(done.rows_affected())
    }

    async fn insert_rejected(
        &self,
        tx: &mut PgConnection,
        consumer: &str,
        rejected: &[(&Rejected, String)],
    ) -> Result<(), sqlx::Error> {
        if rejected.is_empty() {
            return Ok(());
        }
        sqlx::query(self.reject.clone())
            .bind(consumer)
            .bind(
                rejected
                    .iter()
                    .map(|(r, _)| r.origin.source.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                rejected
                    .iter()
                    .map(|(r, _)| r.origin.partition)
                    .collect::<Vec<_>>(),
            )
            .bind(
                rejected
                    .iter()
                    .map(|(r, _)| r.origin.offset)
                    .collect::<Vec<_>>(),
            )
            .bind(
                rejected
                    .iter()
                    .map(|(r, _)| r.origin.message_key.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(
                rejected
                    .iter()
                    .map(|(r, _)| r.origin.headers.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                rejected
                    .iter()
                    .map(|(r, _)| r.body.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(
                rejected
                    .iter()
                    .map(|(_, why)| why.as_str())
                    .collect::<Vec<_>>(),
            )
            .execute(&mut *tx)
            .await?;
        Ok(())
    }

    /// One transaction: the rows in one statement, the rejections in another. With `one_by_one`,
    /// each row goes in under its own savepoint, and a row the database refuses as a value is
    /// recorded as rejected instead.
    async fn write_batch(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        entries: &[Entry],
        one_by_one: bool,
    ) -> Result<Written, sqlx::Error> {
        let mut tx = conn.begin().await?;
        // The relay's sessions commit asynchronously (safe for the outbox, where a lost commit
        // only repeats a publish); the inbox acknowledges after this commit, so it must be
        // durable when `commit` returns, or a database crash would lose acknowledged messages.
        sqlx::query("set local synchronous_commit = on")
            .execute(&mut *tx)
            .await?;
        let mut rows = Vec::new();
        let mut rejected = Vec::new();
        for entry in entries {
            match entry {
                Entry::Row(row) => rows.push(row),
                Entry::Rejected(r) => rejected.push((r, r.reason.to_string())),
            }
        }
        let mut written = Written::default();
        if one_by_one {
            let mut refused_rows = Vec::new();
            for (index, entry) in entries.iter().enumerate() {
                let Entry::Row(row) = entry else { continue };
                sqlx::query("savepoint inbox_row").execute(&mut *tx).await?;
                match self.insert_rows(&mut tx, consumer, &[row]).await {
                    Ok(n) => {
                        written.inserted += n;
                        sqlx::query("release savepoint inbox_row")
                            .execute(&mut *tx)
                            .await?;
                    }
                    Err(err) if refused_as_value(&err) => {
                        sqlx::query("rollback to savepoint inbox_row")
                            .execute(&mut *tx)
                            .await?;
                        let message = err
                            .as_database_error()
                            .map_or_else(String::new, |e| e.message().to_owned());
                        written.refused.push((index, message.clone()));
                        refused_rows.push(Rejected {
                            origin: row.origin.clone(),
                            body: match &row.content {
                                Content::Json(json) => Some(json.clone().into_bytes()),
                                Content::Bytes(bytes) => Some(bytes.clone()),
                            },
                            reason: Reason::Refused(message),
                        });
                    }
                    Err(err) => return Err(err),
                }
            }
            let more: Vec<(&Rejected, String)> = refused_rows
                .iter()
                .map(|r| (r, r.reason.to_string()))
                .collect();
            rejected.extend(more);
            self.insert_rejected(&mut tx, consumer, &rejected).await?;
            written.duplicates = (rows.len() - written.refused.len()) as u64 - written.inserted;
            self.count(&mut tx, consumer, written.duplicates).await?;
            tx.commit().await?;
            return Ok(written);
        }
        if !rows.is_empty() {
            written.inserted = self.insert_rows(&mut tx, consumer, &rows).await?;
        }
        self.insert_rejected(&mut tx, consumer, &rejected).await?;
        written.duplicates = rows.len() as u64 - written.inserted;
        self.count(&mut tx, consumer, written.duplicates).await?;
        tx.commit().await?;
        Ok(written)
    }

    /// Adds `duplicates` to the consumer's count (for `status`); nothing when there are none.
    async fn count(
        &self,
        tx: &mut PgConnection,
        consumer: &str,
        duplicates: u64,
    ) -> Result<(), sqlx::Error> {
        if duplicates > 0 {
            sqlx::query(self.count_duplicates.clone())
                .bind(consumer)
                .bind(i64::try_from(duplicates).unwrap_or(i64::MAX))
                .execute(&mut *tx)
                .await?;
        }
        Ok(())
    }
}

/// A data exception (class 22: a value the column cannot hold, invalid JSON for jsonb, ...) or
/// a program limit (class 54: a value too deep or too large): the row's fault, not the
/// database's.
fn refused_as_value(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code.starts_with("22") || code.starts_with("54"))
}

impl InboxStore for PgInbox {
    async fn write(&self, consumer: &str, entries: &[Entry]) -> Result<Written, DatabaseError> {
        self.connections
            .bounded("inbox write", |pool| async move {
                let mut conn = pool
                    .acquire()
                    .await
                    .map_err(DatabaseError::new("inbox write"))?;
                match self.write_batch(&mut conn, consumer, entries, false).await {
                    Err(err) if refused_as_value(&err) => {
                        // Some row holds a value the database refuses: write them one by one
                        // and record that one as rejected, so it never blocks the others.
                        self.write_batch(&mut conn, consumer, entries, true)
                            .await
                            .map_err(DatabaseError::new("inbox write"))
                    }
                    done => done.map_err(DatabaseError::new("inbox write")),
                }
            })
            .await
    }

    async fn status(&self, consumer: &str) -> Result<InboxStatus, DatabaseError> {
        self.connections
            .bounded("inbox status", |pool| async move {
                sqlx::query_as::<_, StatusRow>(self.status.clone())
                    .bind(consumer)
                    .fetch_one(&pool)
                    .await
                    .map(into_status)
                    .map_err(DatabaseError::new("inbox status"))
            })
            .await
    }

    async fn delete_processed(
        &self,
        consumer: &str,
        older_than: Duration,
        limit: u32,
    ) -> Result<u64, DatabaseError> {
        let interval = format!("{} seconds", older_than.as_secs());
        self.connections
            .bounded("inbox retention", |pool| async move {
                let done = sqlx::query(self.delete_processed.clone())
                    .bind(consumer)
                    .bind(&interval)
                    .bind(i64::from(limit))
                    .execute(&pool)
                    .await
                    .map_err(DatabaseError::new("inbox retention"))?;
                Ok(done.rows_affected())
            })
            .await
    }
}

/// Reads the inbox's state for `consumer`.
pub(crate) async fn status(
    conn: &mut PgConnection,
    table: &Table,
    consumer: &str,
) -> Result<InboxStatus, sqlx::Error> {
    sqlx::query_as(status_sql(table))
        .bind(consumer)
        .fetch_one(conn)
        .await
        .map(into_status)
}

type StatusRow = (i64, Option<f64>, i64, Option<i64>);

fn status_sql(table: &Table) -> SqlStr {
    // The oldest waiting row is the first by id (the unprocessed index), not min(received_at)
    // over all of them.
    sql(format!(
        "select (select count(*) from {t} where consumer = $1 and processed_at is null),
                (select extract(epoch from now() - received_at)::float8 from {t}
                 where consumer = $1 and processed_at is null order by id limit 1),
                (select count(*) from {rejected} where consumer = $1),
                (select duplicates from {stats} where consumer = $1)",
        t = table.quoted(),
        rejected = table.companion("rejected"),
        stats = table.companion("stats"),
    ))
}

fn into_status((waiting, oldest, rejected, duplicates): StatusRow) -> InboxStatus {
    InboxStatus {
        waiting,
        oldest_waiting_age_s: oldest,
        rejected,
        duplicates_skipped: duplicates.unwrap_or(0),
    }
}
