-- outbox-relay migration 0003: index the dead-lettered rows that are not published.
--
-- With `retry.on_dead_letter = "park"` (the default) a dead-lettered row holds back the later
-- rows of its aggregate until it is requeued; the claim finds those aggregates through this
-- small partial index. `status` and `requeue` use it too.

create index if not exists {{dead_index}}
    on {{table}} (aggregate_id)
    where published_at is null and dead_lettered_at is not null;
