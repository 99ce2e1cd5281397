#!/usr/bin/env bash
# The fault-injection suite with the release build, printing the results table that
# RELIABILITY.md records. The same cases also run (debug build) in the test command.
#   scripts/faults.sh            # every case
#   scripts/faults.sh paused     # cases whose name contains "paused"
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-deps.sh >&2
scripts/services.sh >&2
report=$(mktemp)
trap 'rm -f "$report"' EXIT
FAULTS_REPORT="$report" cargo test --release --locked --test main -- "faults::${1:-}" "inbox::${1:-}" >&2
python3 - "$report" <<'PY'
import json, sys
lines = [json.loads(line) for line in open(sys.argv[1])]
rows = [r for r in lines if r.get("kind") != "inbox"]
inbox = [r for r in lines if r.get("kind") == "inbox"]
rows.sort(key=lambda r: (r["scenario"], r["broker"]))
print("| scenario | broker | events | lost | duplicates | order violations | marked, not delivered | dead-lettered / parked | recovery |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    rec = "—" if r["recovery_ms"] is None else f'{r["recovery_ms"] / 1000:.1f} s'
    print(f'| {r["scenario"]} | {r["broker"]} | {r["events"]} | {r["lost"]} | {r["duplicates"]} | '
          f'{r["order_violations"]} | {r["marked_not_delivered"]} | {r["dead_lettered"]} / {r["parked"]} | {rec} |')
if inbox:
    inbox.sort(key=lambda r: (r["scenario"], r["from"]))
    print()
    print("Inbox cases (each asserted: every event in the table once, none missing, order per aggregate kept):")
    print()
    print("| scenario | from | events | rows in the inbox | missing | twice | redeliveries skipped | rejected | longest restart to first row |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in inbox:
        rec = "—" if r["recovery_ms"] is None else f'{r["recovery_ms"] / 1000:.1f} s'
        print(f'| {r["scenario"]} | {r["from"]} | {r["events"]} | {r["rows"]} | {r["events"] - r["rows"]} | 0 | '
              f'{r["redeliveries_skipped"]} | {r["rejected"]} | {rec} |')
PY
