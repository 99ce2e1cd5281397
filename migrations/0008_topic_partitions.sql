-- outbox-relay migration 0008: the partition count of each Kafka topic the relay writes to.
--
-- Keyed messages are placed by their key's hash modulo the topic's partition count: when a topic
-- gains partitions, keys move and per-aggregate order breaks for consumers. The relay records
-- each topic's count here at first sight (shared by every instance, kept across restarts), and
-- when the cluster shows another count it pauses publishing to the topic until an operator runs
-- `outbox-relay partitions --accept TOPIC` (see README, "Partition-count changes").
--
-- The relay's role needs select, insert and update on this table.

create table if not exists {{topic_partitions}} (
    topic       text primary key,
    partitions  integer not null,
    recorded_at timestamptz not null default now()
);
