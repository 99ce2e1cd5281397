-- outbox-relay migration 0005: claims are recorded per batch in a small lease table instead of
-- on every claimed row.
--
-- Until 0005 a claim wrote the lease expiry into `next_attempt_at` of each of its rows: one
-- more version of every (~1 KB) row, with new entries in every index, just to say "taken".
-- Measured on the development machine (100 000 rows of 1 KB, batch 1 000): that update was
-- 60 % of the database's work per event. Now a claim reads its rows and inserts one row here
-- naming them; the rows themselves are written once, by the mark (or a failure's record).
--
-- A lease row lives from the claim until its batch is settled (deleted by the mark) or, when
-- the instance died or stalled past `until`, until the next claim of any instance reaps it,
-- charging an attempt to the rows it left without an outcome. Claims skip the aggregates of
-- every lease row, so batches in flight never share an aggregate.
--
-- The relay's role needs select, insert, update (row locks fence the settling statements) and
-- delete on this table.

create table if not exists {{lease_table}} (
    id          bigint generated always as identity primary key,  -- the fencing token
    claimed_at  timestamptz not null,                             -- start of the claim
    until       timestamptz not null,                             -- lease expiry
    ids         bigint[] not null,                                -- the batch's outbox rows
    aggregates  text[] not null                                   -- their aggregates, distinct
);
