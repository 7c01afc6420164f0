//! boxlet's own VMM on KVM (kvm-ioctls and rust-vmm crates).
//!
//! Each VM runs in its own `boxlet-vmm` process ([`vmm::run`]). Working today: guest
//! memory on a memfd, PVH boot of an ELF vmlinux (with an initramfs), SMP vCPUs with
//! KVM's supported CPUID, in-kernel irqchip and PIT, a 16550 console, i8042 and
//! triple-fault reset as the end of the VM; [`KvmBackend`] runs it behind the
//! `Hypervisor` trait. To come (issue 5): virtio-mmio with virtio-blk, virtio-vsock and
//! vhost-user-fs (until then the backend refuses specs with disks or shares, and the
//! runtime's boot, which needs vsock, cannot use it), the KVM probe.

mod backend;
pub mod mptable;
pub mod probe;
pub mod virtio;
pub mod vmm;

pub use backend::{find_vmm, KvmBackend};
