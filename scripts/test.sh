#!/usr/bin/env bash
# Run the workspace tests and end with one summary line over every test binary:
# "N passed, M failed". Exits with cargo's status.
# The VM tests find the static agent and the guest kernel through BOXLET_AGENT and
# BOXLET_KERNEL, set here (scripts/setup.sh builds the kernel).
set -uo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT
BOXLET_AGENT=$(bash scripts/build-agent.sh) || { echo "test: building the agent failed" >&2; exit 1; }
BOXLET_KERNEL=$(BOXLET_KERNEL_CACHED_ONLY=1 bash fixtures/kernel/build.sh) ||
    { echo "test: no guest kernel: run scripts/setup.sh" >&2; exit 1; }
# This host has no hardware KVM that boots Linux: the QEMU tests run under software
# emulation, which boxlet uses only when asked (the nested suite runs on L1's real KVM).
BOXLET_ACCEL=${BOXLET_ACCEL:-tcg}
export BOXLET_AGENT BOXLET_KERNEL BOXLET_ACCEL
"${CARGO:-cargo}" test --workspace "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
sum() { grep -E '^test result:' "$log" | grep -oE "[0-9]+ $1" | awk '{s += $1} END {print s + 0}'; }
echo
echo "$(sum passed) passed, $(sum failed) failed"
exit "$status"
