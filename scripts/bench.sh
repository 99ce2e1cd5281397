#!/usr/bin/env bash
# The benchmark: starts the services if needed, builds the release binary, and prints the
# tables that BENCHMARKS.md records. Options pass through, e.g.
#   scripts/bench.sh --rows 1000000 --only drain
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-deps.sh >&2
scripts/services.sh >&2
cargo build --release --locked --bin outbox-relay >&2
cargo bench --locked --bench relay -- "$@"
