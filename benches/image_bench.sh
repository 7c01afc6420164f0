#!/usr/bin/env bash
# The content store and image pulls against the tools of the field, in one run, medians:
#   ingest   a 1 GiB file into the store (hash while writing, fsync, rename, index)
#            against hashing it alone (sha256sum; b3sum on one thread and on all) and
#            against writing it alone (dd conv=fsync)
#   pull     the debootstrap minbase image from a local docker-registry (plain HTTP)
#            into an empty store, against `skopeo copy` of it into an empty OCI layout
#
#   benches/image_bench.sh [RUNS]       (make bench-images)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
cargo build --release -q -p boxlet-cli
boxlet=$(realpath "${CARGO_TARGET_DIR:-target}/release/boxlet")
export PATH="$HOME/.cargo/bin:$PATH"
command -v b3sum >/dev/null || cargo install -q --locked b3sum
work=$(mktemp -d /var/tmp/boxlet-bench.XXXXXX)
registry_pid=
cleanup() { [ -z "$registry_pid" ] || kill "$registry_pid" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

median() { sort -n | awk '{a[NR]=$0} END {print a[int((NR+1)/2)]}'; }
# time_runs NAME PREP CMD: the median wall seconds of CMD over $runs runs, PREP before each.
declare -A result
time_runs() {
    local name=$1 prep=$2 cmd=$3 times=()
    for _ in $(seq "$runs"); do
        eval "$prep"
        sync
        local t0 t1
        t0=$(date +%s%N)
        eval "$cmd" >/dev/null 2>>"$work/stderr.log" || { cat "$work/stderr.log" >&2; exit 1; }
        t1=$(date +%s%N)
        times+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", (b - a) / 1e9}')")
    done
    result[$name]=$(printf '%s\n' "${times[@]}" | median)
    printf '  %-34s %8.3f s   (runs: %s)\n' "$name" "${result[$name]}" "${times[*]}"
}
ratio() { awk -v a="${result[$1]}" -v b="${result[$2]}" 'BEGIN {printf "%.2f", a / b}'; }

blob=/var/tmp/boxlet-bench-1g
[ -f "$blob" ] || head -c 1G /dev/urandom > "$blob"
cat "$blob" > /dev/null
echo "ingest of a 1 GiB file ($(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"
time_runs "sha256sum" ":" "sha256sum $blob"
time_runs "b3sum --num-threads 1" ":" "b3sum --num-threads 1 $blob"
time_runs "b3sum (all CPUs)" ":" "b3sum $blob"
time_runs "dd conv=fsync (write alone)" "rm -f $work/copy" "dd if=$blob of=$work/copy bs=1M conv=fsync status=none"
time_runs "boxlet store ingest --alg sha256" "rm -rf $work/home" "BOXLET_HOME=$work/home $boxlet store ingest --alg sha256 $blob"
time_runs "boxlet store ingest --alg blake3" "rm -rf $work/home" "BOXLET_HOME=$work/home $boxlet store ingest --alg blake3 $blob"
rm -f "$work/copy"
echo "  ratios: sha256 ingest / sha256sum $(ratio 'boxlet store ingest --alg sha256' sha256sum);" \
    "blake3 ingest / b3sum 1 thread $(ratio 'boxlet store ingest --alg blake3' 'b3sum --num-threads 1');" \
    "sha256 ingest / write alone $(ratio 'boxlet store ingest --alg sha256' 'dd conv=fsync (write alone)')"

layout=$(bash fixtures/oci/minbase-image.sh)/layout
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$work/registry.yml" <<YML
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $work/registry
http:
  addr: 127.0.0.1:$port
YML
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
registry_pid=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
skopeo copy -q --dest-tls-verify=false "oci:$layout:latest" "docker://127.0.0.1:$port/boxlet/minbase:1"
size=$(du -sb "$work/registry" | cut -f1)
echo "pull of debootstrap minbase ($((size / 1024 / 1024)) MiB in the registry) from docker-registry on 127.0.0.1"
time_runs "skopeo copy (to an OCI layout)" "rm -rf $work/dst" \
    "skopeo copy -q --src-tls-verify=false docker://127.0.0.1:$port/boxlet/minbase:1 oci:$work/dst:1"
time_runs "boxlet pull" "rm -rf $work/home" \
    "BOXLET_HOME=$work/home $boxlet pull --insecure 127.0.0.1:$port/boxlet/minbase:1"
time_runs "boxlet pull (stored already)" ":" \
    "BOXLET_HOME=$work/home $boxlet pull --insecure 127.0.0.1:$port/boxlet/minbase:1"
echo "  ratio: boxlet pull / skopeo copy $(ratio 'boxlet pull' 'skopeo copy (to an OCI layout)')"
