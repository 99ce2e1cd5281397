-- outbox-relay migration 0002: index the rows that hold their aggregate back.
--
-- The claim skips every aggregate that has a row waiting (leased by an instance, or backing off
-- after a failure). Those rows are few — the batches in flight plus the failing rows — so a small
-- partial index over them lets the claim build the set of held-back aggregates in a fraction of
-- a millisecond, whatever the size of the backlog or of the table. It replaces the
-- (aggregate_id, id) index of 0001, which the claim no longer uses; one index fewer also makes
-- the application's inserts cheaper.

create index if not exists {{waiting_index}}
    on {{table}} (next_attempt_at)
    where published_at is null and next_attempt_at is not null;

drop index if exists {{aggregate_index_qualified}};
