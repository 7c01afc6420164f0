#!/usr/bin/env bash
# Build an ext4 image from the same tree three ways, in one run, and report the median
# wall time and peak memory of each:
#   boxlet        boxlet ext4 build --layer (the layer tarball, nothing extracted)
#   tar+mke2fs    tar -x into a directory, then mke2fs -d (what BoxLite does)
#   mke2fs -d     mke2fs -d on an already extracted directory
# All three write a journal (mke2fs -t ext4 does by default) into an image of the size
# boxlet chose. Trees come from fixtures/rootfs/make-trees.sh (busybox, debootstrap minbase).
#
#   benches/ext4_build.sh [RUNS]       (make bench-ext4)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
cache=$(bash fixtures/rootfs/make-trees.sh | tail -1)
cargo build --release -q -p boxlet-cli
boxlet=${CARGO_TARGET_DIR:-target}/release/boxlet
work=$(mktemp -d /var/tmp/boxlet-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT

# measure NAME CMD...: prints "seconds max_rss_kib" for each of $runs runs, median line last.
median() { sort -n | awk '{a[NR]=$0} END {print a[int((NR+1)/2)]}'; }
measure() {
    local name=$1
    shift
    local t m times=() mems=()
    for _ in $(seq "$runs"); do
        rm -f "$work/out.img"
        sync
        local t0 t1
        t0=$(date +%s%N)
        /usr/bin/time -f "%M" -o "$work/time" "$@" >/dev/null 2>"$work/err" || { cat "$work/err" >&2; exit 1; }
        t1=$(date +%s%N)
        t=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f", (b - a) / 1e9 }')
        read -r m < "$work/time"
        times+=("$t")
        mems+=("$m")
    done
    t=$(printf '%s\n' "${times[@]}" | median)
    m=$(printf '%s\n' "${mems[@]}" | sort -n | tail -1)
    printf '%-12s %-12s median %8.4f s   peak RSS %7d KiB\n' "$tree" "$name" "$t" "$m"
    echo "$t" > "$work/t.$name"
}

for tree in busybox minbase; do
    layer=$cache/$tree.tar
    [ -f "$layer" ] || layer=$cache/$tree.tar.gz
    # The image size boxlet picks for this tree, used by mke2fs too.
    "$boxlet" ext4 build "$work/size.img" --layer "$layer" 2>/dev/null
    size=$(stat -c %s "$work/size.img")
    rm -f "$work/size.img"
    rm -rf "$work/pre" && mkdir "$work/pre" && tar -C "$work/pre" -xf "$layer"

    measure boxlet "$boxlet" ext4 build "$work/out.img" --layer "$layer"
    measure tar+mke2fs sh -c "rm -rf '$work/x' && mkdir '$work/x' && tar -C '$work/x' -xf '$layer' && mke2fs -q -F -t ext4 -d '$work/x' '$work/out.img' $((size / 1024))k"
    measure mke2fs-d mke2fs -q -F -t ext4 -d "$work/pre" "$work/out.img" $((size / 1024))k
    awk -v a="$(cat "$work/t.boxlet")" -v b="$(cat "$work/t.tar+mke2fs")" -v c="$(cat "$work/t.mke2fs-d")" -v t="$tree" \
        'BEGIN { printf "%-12s tar+mke2fs / boxlet = %.2fx   mke2fs -d / boxlet = %.2fx\n", t, b / a, c / a }'
done
