#!/usr/bin/env bash
# One-command demo on a machine without Docker: starts PostgreSQL and a Kafka-protocol broker
# (or uses running ones), migrates an outbox table, starts the relay, writes an order and its
# event in one application-style transaction every second, and prints the events as consumed
# from Kafka with key and headers. Ctrl-C stops everything cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-deps.sh
scripts/services.sh
cargo build --release --locked --bin outbox-relay --example consume

db=outbox_demo
psql_() { psql -qAt -h 127.0.0.1 -U postgres "$@"; }
psql_ -d postgres -c "select 1 from pg_database where datname = '$db'" | grep -q 1 ||
  psql_ -d postgres -c "create database $db"
psql_ -d $db -c "create table if not exists orders (id bigserial primary key, customer text not null, total_cents int not null)"

work=$(mktemp -d)
cat >"$work/relay.toml" <<TOML
[database]
url = "postgres://postgres@127.0.0.1:5432/$db"
table = "outbox"
[relay]
poll_interval = "1s"
[broker]
kind = "kafka"
[broker.kafka]
brokers = "127.0.0.1:9092"
topic = "demo.{aggregate_type}"
[log]
format = "text"
level = "info"
TOML

target/release/outbox-relay -c "$work/relay.toml" migrate
target/release/outbox-relay -c "$work/relay.toml" run 2>"$work/relay.log" &
relay=$!
target/release/examples/consume 127.0.0.1:9092 demo.order &
consumer=$!

stop() {
  echo
  echo "demo: stopping (relay log: $work/relay.log)"
  kill -TERM "$relay" 2>/dev/null || true
  wait "$relay" 2>/dev/null || true
  kill "$consumer" 2>/dev/null || true
  wait "$consumer" 2>/dev/null || true
  exit 0
}
trap stop INT TERM

echo "demo: writing one order + its outbox event per second (Ctrl-C to stop)"
n=0
while true; do
  n=$((n + 1))
  psql_ -d $db <<SQL
begin;
with o as (
  insert into orders (customer, total_cents) values ('customer-$((n % 3))', $((n * 100))) returning id, customer, total_cents
)
insert into outbox (aggregate_type, aggregate_id, event_type, payload, headers)
select 'order', o.id::text, 'order_placed',
       jsonb_build_object('order_id', o.id, 'customer', o.customer, 'total_cents', o.total_cents),
       jsonb_build_object('source', 'demo')
from o;
commit;
SQL
  sleep 1
done
