#!/usr/bin/env bash
# Install what the tests need, once. Idempotent: a second run returns at once.
#   scripts/setup.sh        packages for `make test`
#   scripts/setup.sh fuzz   also cargo-fuzz and the nightly toolchain for `make fuzz-smoke`
set -euo pipefail

need_apt=()
command -v qemu-img >/dev/null 2>&1 || need_apt+=(qemu-utils)
command -v qemu-io >/dev/null 2>&1 || need_apt+=(qemu-utils)
command -v mke2fs >/dev/null 2>&1 || need_apt+=(e2fsprogs)
command -v debugfs >/dev/null 2>&1 || need_apt+=(e2fsprogs)

if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: installing ${need_apt[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ "${1:-}" = fuzz ]; then
    rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
    cargo +nightly fuzz --version >/dev/null 2>&1 || cargo install --locked cargo-fuzz
fi
