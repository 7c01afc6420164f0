#!/usr/bin/env bash
# Install what the tests need, once. Idempotent: a second run returns quickly.
#   scripts/setup.sh        packages, vhost-user daemons and the guest kernel for `make test`
#   scripts/setup.sh fuzz   also cargo-fuzz and the nightly toolchain for `make fuzz-smoke`
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v qemu-img >/dev/null 2>&1 || need_apt+=(qemu-utils)
command -v qemu-io >/dev/null 2>&1 || need_apt+=(qemu-utils)
command -v mke2fs >/dev/null 2>&1 || need_apt+=(e2fsprogs)
command -v debugfs >/dev/null 2>&1 || need_apt+=(e2fsprogs)
[ -x /bin/busybox ] || need_apt+=(busybox-static)
[ -f /usr/src/linux-source-6.1.tar.xz ] || need_apt+=(linux-source-6.1)
for tool in flex bison bc; do command -v $tool >/dev/null 2>&1 || need_apt+=($tool); done
[ -f /usr/include/libelf.h ] || need_apt+=(libelf-dev)
# The image tests: an OCI registry, and independent tools that build and push images.
command -v skopeo >/dev/null 2>&1 || need_apt+=(skopeo)
command -v umoci >/dev/null 2>&1 || need_apt+=(umoci)
command -v debootstrap >/dev/null 2>&1 || need_apt+=(debootstrap)
# Reflink copies are tested on a loop-mounted XFS.
command -v mkfs.xfs >/dev/null 2>&1 || need_apt+=(xfsprogs)
[ -x /usr/bin/docker-registry ] || need_apt+=(docker-registry)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# virtiofsd builds against these.
[ -f /usr/include/seccomp.h ] || need_apt+=(libseccomp-dev)
[ -f /usr/include/cap-ng.h ] || need_apt+=(libcap-ng-dev)

export DEBIAN_FRONTEND=noninteractive
updated=
apt_update() { [ -n "$updated" ] || { apt-get update -qq; updated=1; }; }
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: installing ${need_apt[*]}" >&2
    apt_update
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    # Debian's QEMU; its qemu-utils must be the same version (a newer backport may be
    # installed, which qemu-system-x86 refuses to sit beside).
    apt_update
    v=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
    echo "setup: installing qemu-system-x86 $v" >&2
    apt-get install -y -qq --allow-downgrades "qemu-system-x86=$v" "qemu-utils=$v" >/dev/null
fi

# The vhost-user daemons of the QEMU backend (rust-vmm's and virtio-fs's own).
export PATH="$HOME/.cargo/bin:$PATH"
command -v vhost-device-vsock >/dev/null 2>&1 ||
    cargo install -q --locked vhost-device-vsock --version 0.3.0
command -v virtiofsd >/dev/null 2>&1 ||
    cargo install -q --locked virtiofsd --version 1.14.0

# The guest kernel (cached by config hash; ~7 minutes the first time on 2 cores).
bash fixtures/kernel/build.sh >/dev/null
# The busybox root tree the VM tests boot, and the busybox image (OCI layout and docker
# archive) the image tests import and push to a registry.
bash fixtures/rootfs/busybox-box.sh >/dev/null
bash fixtures/oci/busybox-image.sh >/dev/null
# A Debian minbase image (debootstrap, a few minutes the first time) for the pull tests.
bash fixtures/oci/minbase-image.sh >/dev/null

if [ "${1:-}" = fuzz ]; then
    rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
    cargo +nightly fuzz --version >/dev/null 2>&1 || cargo install --locked cargo-fuzz
fi
