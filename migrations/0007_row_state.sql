-- outbox-relay migration 0007: two counters that make a row's delivery state explicit.
--
-- `unsettled_attempts`: consecutive attempts that ended with no outcome at all (the relay crashed,
-- was killed or lost its lease while the row was in flight). Reaping an expired lease adds one;
-- any outcome (published, failed, deferred, or given back after a broker outage) resets it to 0.
-- At 2 the row is a crash suspect and is published alone (README, guarantee 6). Until 0007 this
-- was inferred from `last_error is null`, which an earlier outage's message defeated.
--
-- `deferrals`: consecutive times the row's destination was in trouble (a queue full with
-- `x-overflow = reject-publish`, a partition without a leader): the row backs off by
-- `retry.initial_backoff` × 2^deferrals (capped at `retry.max_backoff`) without using up an
-- attempt, so one troubled destination holds back only its own rows.
--
-- Both have a constant default, so adding them does not rewrite the table (PostgreSQL ≥ 11).

alter table {{table}} add column if not exists unsettled_attempts integer not null default 0;
alter table {{table}} add column if not exists deferrals integer not null default 0;
