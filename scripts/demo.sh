#!/usr/bin/env bash
# Run a box: build boxlet and its agent, make a busybox base disk with the agent in it,
# a qcow2 overlay for the box, boot it (QEMU backend) and run a command in it.
#   scripts/demo.sh [CMD...]      default: a greeting from inside the guest
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The CLI and the jail it starts every VM process in (found beside it).
cargo build -q --release -p boxlet-cli -p boxlet --bins
BOXLET_AGENT=$(bash scripts/build-agent.sh)
export BOXLET_AGENT
boxlet=${CARGO_TARGET_DIR:-target}/release/boxlet
work=${BOXLET_DEMO_DIR:-$HOME/.cache/boxlet/demo}
mkdir -p "$work"
rm -f "$work/base.ext4" "$work/box.qcow2"
"$boxlet" ext4 build "$work/base.ext4" --dir "$(bash fixtures/rootfs/busybox-box.sh)" --agent
"$boxlet" qcow2 create "$work/box.qcow2" --backing base.ext4 --backing-format raw
if [ $# -eq 0 ]; then
    set -- sh -c 'echo "hello from $(hostname), kernel $(uname -r), $(nproc) cpu(s)"; cat /etc/motd'
fi
exec "$boxlet" vm run --disk "$work/box.qcow2" --timings -- "$@"
