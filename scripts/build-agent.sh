#!/usr/bin/env bash
# Build the guest agent as a static binary (glibc, crt-static) and print its path.
# It runs as PID 1 in guests that have no libc of their own to offer it.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${AGENT_PROFILE:-guest}
target=x86_64-unknown-linux-gnu
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build -q --profile "$profile" -p boxlet-guest --target "$target" >&2
dir=${CARGO_TARGET_DIR:-target}
[ "$profile" = dev ] && profile=debug
echo "$(cd "$dir" && pwd)/$target/$profile/boxlet-guest"
