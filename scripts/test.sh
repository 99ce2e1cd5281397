#!/usr/bin/env bash
# The project's test command: starts whatever service is missing, then runs every test
# (unit tests and the integration suite against real PostgreSQL, RabbitMQ and Kafka).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-deps.sh
scripts/services.sh
# The shipped alert rules: valid, and each alert fires on the series it is meant for.
promtool check rules deploy/prometheus/outbox-relay.rules.yml
(cd deploy/prometheus && promtool test rules outbox-relay.rules.test.yml)
cargo build --locked --bin outbox-relay
# lib, bin and the integration suite (benches and examples are built by clippy --all-targets;
# the benchmark runs only through scripts/bench.sh).
cargo test --locked --lib --bins --tests -- "$@"
