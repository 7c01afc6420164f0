//! boxlet's own VMM on KVM (kvm-ioctls and rust-vmm crates).
//!
//! Each VM runs in its own `boxlet-vmm` process ([`vmm::run`]). Working today: guest
//! memory on a memfd, PVH boot of an ELF vmlinux (with an initramfs), SMP vCPUs with
//! KVM's supported CPUID, in-kernel irqchip and PIT, a 16550 console, i8042 and
//! triple-fault reset as the end of the VM. To come (issue 5): virtio-mmio with
//! virtio-blk, virtio-vsock and vhost-user-fs, the `Hypervisor` implementation, the KVM
//! probe.

pub mod vmm;
