-- outbox-relay migration 0004: index the published rows by publication time.
--
-- Retention deletes rows published before a cutoff, oldest first, in bounded batches; without
-- this index each batch had to scan the table in id order past every recent (or still pending)
-- row to find old published ones, a cost that grew with the table. A mark already writes new
-- entries into every index (the pending index's predicate changes, so the update is never
-- HOT); this adds one more.
--
-- Building it locks out writes to the table while it runs (seconds per million rows). On a
-- large existing table, create it beforehand without blocking and `migrate` will keep it:
--   create index concurrently <table>_published_idx on <table> (published_at)
--       where published_at is not null;

create index if not exists {{published_index}}
    on {{table}} (published_at)
    where published_at is not null;
