-- outbox-relay migration 0006: time-ordered event ids by default.
--
-- `event_id` defaulted to gen_random_uuid(), a random (v4) UUID, so its unique index took every
-- new id at a random leaf page — on the application's insert, and again on every mark: a mark is
-- never a HOT update (migration 0004), so each index gets an entry for the row's new version, and
-- the unique index looks up the old one. Measured on the development machine (200 000 rows of
-- 1 KB, 100 marks of 2 000 rows, after a checkpoint): insert 1.74–1.77 → 1.65–1.69 s, mark
-- 2.81–3.03 → 2.29–2.40 s. A UUIDv7 (RFC 9562: 48 bits of Unix milliseconds, then random bits)
-- keeps consecutive rows on the same few leaf pages.
--
-- Only the default this project set is replaced: a table adopted with its own default keeps it.
-- Applications that supply their own event ids get the same effect by supplying UUIDv7s.

create or replace function {{uuidv7_function}}() returns uuid
language sql volatile parallel safe as $$
    -- a random UUID whose first 48 bits become the time in milliseconds and whose version
    -- nibble becomes 7 (bits 52 and 53 set: 0100 -> 0111); the variant bits stay RFC 9562's
    select encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
               placing substring(int8send((extract(epoch from clock_timestamp()) * 1000)::bigint) from 3)
               from 1 for 6), 52, 1), 53, 1), 'hex')::uuid
$$;

do $$
begin
    if (select pg_get_expr(d.adbin, d.adrelid)
        from pg_attrdef d
        join pg_attribute a on a.attrelid = d.adrelid and a.attnum = d.adnum
        where d.adrelid = '{{table}}'::regclass and a.attname = 'event_id') = 'gen_random_uuid()'
    then
        alter table {{table}} alter column event_id set default {{uuidv7_function}}();
    end if;
end
$$;
