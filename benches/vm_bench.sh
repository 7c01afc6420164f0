#!/usr/bin/env bash
# Boot-to-ready, `vm run -- true` and exec round trips (medians), on the busybox box image
# with the agent, through `boxlet vm bench`. Prints the acceleration it ran under.
#   benches/vm_bench.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-10}
cargo build -q --release -p boxlet-cli
BOXLET_AGENT=$(bash scripts/build-agent.sh)
export BOXLET_AGENT
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
target=${CARGO_TARGET_DIR:-target}
boxlet=$target/release/boxlet
"$boxlet" ext4 build "$work/base.ext4" --dir "$(bash fixtures/rootfs/busybox-box.sh)" --agent 2>/dev/null
"$boxlet" vm bench --disk "$work/base.ext4" --runs "$runs"
