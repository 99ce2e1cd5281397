-- outbox-relay migration 0009: NOTIFY only while no relay is awake.
--
-- NOTIFY takes a database-wide lock at commit, which serialises the application's concurrent
-- writers (measured: 8 writers lost 41-65 % of their commit rate to the trigger of 0001). It is
-- only worth that while every relay is idle, waiting out a backed-off poll: a relay that is
-- claiming rows polls again within milliseconds anyway. So each relay instance, while its
-- claims find rows, keeps a row here whose `until` lies a quarter of a second ahead, and the
-- trigger sends its notification only when no such row is current. A busy relay costs the
-- writers one lookup in this small table per inserting statement; an idle relay is woken at
-- once by the first commit, and a relay that died simply stops renewing its row.
--
-- The function runs with its owner's rights (the role that ran `migrate`), so the application's
-- role needs no privilege on this table; the relay's role needs select, insert, update and
-- delete on it.

create table if not exists {{awake_table}} (
    instance uuid primary key,           -- one relay process
    until    timestamptz not null        -- awake until then (renewed while claims find rows)
);

-- Every name in it is qualified (functions and operators resolve in pg_catalog first anyway), so
-- a caller's search_path cannot redirect it; a `set search_path` clause would cost every
-- inserting statement a configuration save and restore.
create or replace function {{notify_function}}() returns trigger
language plpgsql security definer as $$
begin
    if not exists (select 1 from {{awake_table_qualified}}
                   where until > pg_catalog.clock_timestamp()) then
        perform pg_catalog.pg_notify('outbox_relay:' || tg_table_schema || '.' || tg_table_name, '');
    end if;
    return null;
end
$$;
