#!/usr/bin/env bash
# Run the workspace tests and end with one summary line over every test binary:
# "N passed, M failed". Exits with cargo's status.
set -uo pipefail
log=$(mktemp)
trap 'rm -f "$log"' EXIT
"${CARGO:-cargo}" test --workspace "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
sum() { grep -E '^test result:' "$log" | grep -oE "[0-9]+ $1" | awk '{s += $1} END {print s + 0}'; }
echo
echo "$(sum passed) passed, $(sum failed) failed"
exit "$status"
