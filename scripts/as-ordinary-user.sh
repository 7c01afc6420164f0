#!/usr/bin/env bash
# Run test executables as an ordinary user (rootless boxlet): `as-ordinary-user.sh
# EXECUTABLE...`, each with --test-threads=1, their output on stdout. As root it drops to
# ROOTLESS_UID (default 61777, an id no account has) with no supplementary group but,
# when ROOTLESS_KVM=1 (the nested machine), one that may open /dev/kvm (its group is
# changed to give it that; never done on a host you keep). As an ordinary user it runs as
# itself. What the tests read is copied where that user may read it (root's home is
# private): the guest kernel and agent ($BOXLET_KERNEL, $BOXLET_AGENT), virtiofsd and
# vhost-device-vsock from PATH, the busybox fixtures, the repository's scripts and
# fixtures ($BOXLET_REPO: the checkout may be private). With --cli BOXLET, also
# `boxlet import` and `boxlet run` of the fixture image as that user, reported as one
# more test. Exits non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
cli=
if [ "${1:-}" = --cli ]; then cli=$2; shift 2; fi
oci=$(bash fixtures/oci/busybox-image.sh) && box=$(bash fixtures/rootfs/busybox-box.sh) ||
    { echo "as-ordinary-user: no busybox fixtures: run scripts/setup.sh" >&2; exit 1; }
share=$(mktemp -d "${TMPDIR:-/tmp}/boxlet-rootless.XXXXXX")
trap 'rm -rf "$share"' EXIT
mkdir -p "$share/bin" "$share/fixtures" "$share/home"
cp "$BOXLET_KERNEL" "$share/vmlinux"
cp "$BOXLET_AGENT" "$share/agent"
for p in virtiofsd vhost-device-vsock; do
    path=$(command -v "$p") || path=${HOME:-/nonexistent}/.cargo/bin/$p
    if [ -x "$path" ]; then cp "$path" "$share/bin/"; fi
done
cp -a "$oci" "$box" "$share/fixtures/"
# The repository's scripts and fixtures the tests run (its checkout may be private).
mkdir -p "$share/repo"
cp -a fixtures scripts "$share/repo/"

run_as=()
if [ "$(id -u)" = 0 ]; then
    uid=${ROOTLESS_UID:-61777}
    chown -R "$uid:$uid" "$share"
    chmod 0755 "$share"
    groups=--clear-groups
    if [ "${ROOTLESS_KVM:-0}" = 1 ] && [ -c /dev/kvm ]; then
        # Like a host's kvm group: a supplementary group of the user's.
        kvm_gid=$((uid + 1))
        chgrp "$kvm_gid" /dev/kvm && chmod 0660 /dev/kvm
        groups=--groups=$kvm_gid
    fi
    run_as=(setpriv --reuid="$uid" --regid="$uid" "$groups")
    for t in "$@" ${cli:+"$cli"}; do
        "${run_as[@]}" test -x "$t" || { echo "as-ordinary-user: uid $uid cannot run $t" >&2; exit 1; }
    done
fi
# A clean environment: what the tests need, and what of boxlet's the caller set.
user_env=(PATH="$share/bin:/usr/local/bin:/usr/bin:/bin" HOME="$share/home"
    TMPDIR="${TMPDIR:-/tmp}" BOXLET_KERNEL="$share/vmlinux" BOXLET_AGENT="$share/agent"
    BOXLET_FIXTURES="$share/fixtures" BOXLET_REPO="$share/repo")
for v in BOXLET_ACCEL BOXLET_VMM BOXLET_JAIL RUST_BACKTRACE RUST_LOG; do
    [ -n "${!v:-}" ] && user_env+=("$v=${!v}")
done
as_user() { (cd "$share" && "${run_as[@]}" env -i "${user_env[@]}" "$@"); }
status=0
for t in "$@"; do
    echo "     Running $t as uid $(as_user id -u) (rootless)"
    as_user "$t" --include-ignored --test-threads=1 --color never || status=1
done
if [ -n "$cli" ]; then
    # The CLI, as a user would run it: an image imported, a box run from it (the Disk
    # strategy, the default), jailed.
    echo "     Running boxlet import and run as uid $(as_user id -u) (rootless)"
    out=$(as_user env BOXLET_HOME="$share/home/boxlet" sh -c \
        "'$cli' import '$share/fixtures/$(basename "$oci")/layout' --name busybox:1 >/dev/null &&
         '$cli' run busybox:1 -- sh -c 'echo rootless \$(id -u)'" 2>&1)
    echo "$out"
    if printf '%s\n' "$out" | grep -qx 'rootless 0'; then
        echo "test result: ok. 1 passed; 0 failed"
    else
        echo "test result: FAILED. 0 passed; 1 failed"
        status=1
    fi
fi
exit "$status"
