//! boxlet's own VMM on KVM (kvm-ioctls and rust-vmm crates).
//!
//! Each VM runs in its own `boxlet-vmm` process ([`vmm::run`]): guest memory on a memfd
//! (the kernel mapped copy-on-write from a cached image, [`kernel_image`], when no
//! vhost-user daemon maps RAM), PVH boot of an ELF vmlinux (with an initramfs), SMP vCPUs
//! (an MP table) with KVM's supported CPUID, in-kernel irqchip and PIT, a 16550 console,
//! a minimal i8042, reset as the end of the VM, and virtio-mmio devices ([`virtio`]):
//! virtio-blk on raw files and boxlet's qcow2 engine, virtio-vsock in the VMM
//! (Firecracker's host convention), virtio-fs through a vhost-user frontend to
//! `virtiofsd`. [`KvmBackend`] runs it behind the `Hypervisor` trait, after [`probe`] has
//! checked that this host's KVM boots Linux.

mod backend;
pub mod i8042;
pub mod kernel_image;
pub mod mptable;
pub mod probe;
pub mod seccomp;
pub mod virtio;
pub mod vmm;

pub use backend::{find_vmm, KvmBackend};
