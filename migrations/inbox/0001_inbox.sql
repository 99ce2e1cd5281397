-- The inbox (outbox-relay's consumer half): one row per event a consumer received, deduplicated
-- on (consumer, event_id). The relay inserts; the application handles a row and sets
-- processed_at. Placeholders are replaced with validated, quoted identifiers by `migrate`.
create table if not exists {{table}} (
    id             bigint generated always as identity primary key,  -- arrival order
    consumer       text not null,
    event_id       text not null,
    source         text not null,         -- topic or queue
    "partition"    integer,               -- Kafka
    "offset"       bigint,                -- Kafka
    message_key    text,                  -- verbatim, or \x and hex when not UTF-8 text
    event_type     text,
    aggregate_type text,
    aggregate_id   text,
    headers        jsonb not null default '{}',
    payload        jsonb,                 -- the body, when it is JSON
    body           bytea,                 -- the body, verbatim, when it is not
    received_at    timestamptz not null default now(),
    processed_at   timestamptz,           -- set by the application
    constraint {{dedupe}} unique (consumer, event_id),
    constraint {{one_body}} check ((payload is null) <> (body is null))
);
-- What the application's workers scan: unhandled rows in arrival order.
create index if not exists {{unprocessed_index}} on {{table}} (consumer, id) where processed_at is null;
-- Retention of handled rows.
create index if not exists {{processed_index}} on {{table}} (processed_at) where processed_at is not null;
-- Messages the inbox could not record as events (no event id, too large, a value the database
-- refused): kept with the reason, acknowledged so that consumption goes on.
create table if not exists {{rejected}} (
    id           bigint generated always as identity primary key,
    consumer     text not null,
    source       text not null,
    "partition"  integer,
    "offset"     bigint,
    message_key  text,
    headers      jsonb not null default '{}',
    body         bytea,
    reason       text not null,
    received_at  timestamptz not null default now()
);
-- Redeliveries skipped as duplicates, per consumer (for `outbox-relay status`).
create table if not exists {{stats}} (
    consumer   text primary key,
    duplicates bigint not null default 0
);
