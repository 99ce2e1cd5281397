#!/usr/bin/env bash
# The project's test command: starts whatever service is missing, then runs every test
# (unit tests and the integration suite against real PostgreSQL, RabbitMQ and Kafka).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-deps.sh
scripts/services.sh
cargo build --locked --bin outbox-relay
# lib, bin and the integration suite (benches and examples are built by clippy --all-targets;
# the benchmark runs only through scripts/bench.sh).
cargo test --locked --lib --bins --tests -- "$@"
