-- outbox-relay: adopting a table with its own column names (`database.layout`,
-- `[database.columns]`), as of migration 0007. `migrate` runs it instead of 0001-0007 for such a
-- table and records those versions as applied. It only adds: the relay's own columns (constant
-- defaults, so no rewrite), its indexes over the mapped ordering ({{id}}) and aggregate
-- ({{aggregate_id}}) columns. (The lease table and, from migration 0009, the NOTIFY function come
-- after it.) It never drops, renames
-- or rewrites the application's columns. (The ordering column, when the table has none, is
-- added before this script runs.)

alter table {{table}}
    add column if not exists published_at timestamptz,
    add column if not exists attempts integer not null default 0,
    add column if not exists next_attempt_at timestamptz,
    add column if not exists last_error text,
    add column if not exists dead_lettered_at timestamptz,
    add column if not exists unsettled_attempts integer not null default 0,
    add column if not exists deferrals integer not null default 0;

-- as in 0001, 0002, 0003 and 0004
create index if not exists {{pending_index}}
    on {{table}} ({{id}})
    where published_at is null and dead_lettered_at is null;

create index if not exists {{waiting_index}}
    on {{table}} (next_attempt_at)
    where published_at is null and next_attempt_at is not null;

create index if not exists {{dead_index}}
    on {{table}} ({{aggregate_id}})
    where published_at is null and dead_lettered_at is not null;

create index if not exists {{published_index}}
    on {{table}} (published_at)
    where published_at is not null;
