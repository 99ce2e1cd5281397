#!/usr/bin/env bash
# The project's test command: starts whatever service is missing, then runs every test
# (unit tests and the integration suite against real PostgreSQL, RabbitMQ and Kafka).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-deps.sh
scripts/services.sh
cargo build --locked --bin outbox-relay
cargo test --locked --all-targets -- "$@"
