#!/usr/bin/env bash
# The jail tests, the QEMU box suite and `boxlet run` again as an ordinary user
# (rootless boxlet: each jail in a user namespace of its own), through
# scripts/as-ordinary-user.sh. Ends with "N passed, M failed" like scripts/test.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
export BOXLET_AGENT BOXLET_KERNEL
BOXLET_AGENT=$(bash scripts/build-agent.sh) || { echo "test-rootless: building the agent failed" >&2; exit 1; }
BOXLET_KERNEL=$(BOXLET_KERNEL_CACHED_ONLY=1 bash fixtures/kernel/build.sh) ||
    { echo "test-rootless: no guest kernel: run scripts/setup.sh" >&2; exit 1; }
# No hardware KVM that boots Linux here (see scripts/test.sh).
export BOXLET_ACCEL=${BOXLET_ACCEL:-tcg}
executables() { grep -o '"executable":"[^"]*"' | cut -d'"' -f4; }
tests_of() {
    "${CARGO:-cargo}" test -q -p "$1" --test "$2" --no-run --message-format=json 2>/dev/null |
        grep '"profile":{[^}]*"test":true' | executables
}
mapfile -t tests < <(tests_of boxlet jail; tests_of boxlet-qemu vm)
cli=$("${CARGO:-cargo}" build -q -p boxlet-cli --bin boxlet --message-format=json | executables | grep '/boxlet$')
[ ${#tests[@]} -eq 2 ] && [ -x "$cli" ] || { echo "test-rootless: test executables not built" >&2; exit 1; }
log=$(mktemp)
trap 'rm -f "$log"' EXIT
bash scripts/as-ordinary-user.sh --cli "$cli" "${tests[@]}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
sum() { grep -E '^test result:' "$log" | grep -oE "[0-9]+ $1" | awk '{s += $1} END {print s + 0}'; }
echo
echo "$(sum passed) passed, $(sum failed) failed (rootless)"
exit "$status"
