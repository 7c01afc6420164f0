//! virtio over MMIO (the transport, version 2) and the devices boxlet's VMM offers.
//!
//! Every value the guest writes (register offsets and sizes, queue sizes and addresses,
//! descriptor chains) is checked: a bad access is ignored, a bad queue marks the device
//! as needing a reset, a bad chain is completed with an error status. Nothing a guest
//! does here makes the VMM panic.

pub mod block;
pub mod fs;
#[doc(hidden)]
pub mod fuzz;
pub mod mmio;
pub mod vsock;

use std::os::fd::RawFd;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// virtio 1.x (the only version the transport offers).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Notification suppression by ring indexes (`used_event` / `avail_event`), which the
/// transport offers for every device.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// A device behind the MMIO transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (2: block, 19: vsock, 26: fs).
    fn device_type(&self) -> u32;
    /// Feature bits offered (the transport adds `VIRTIO_F_VERSION_1`).
    fn features(&self) -> u64;
    /// Largest size of each queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// Read device configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver notified queue `index` (one of `queues`, the device's queues, all
    /// valid when ready): process what it made available. Returns whether any buffer was
    /// used (the transport then interrupts the guest).
    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool;
    /// A file descriptor that becomes readable when the device has host-side work (its
    /// sockets are ready); the VMM then calls [`VirtioDevice::process_host`].
    fn host_fd(&self) -> Option<RawFd> {
        None
    }
    /// Do host-side work; returns whether any buffer was used.
    fn process_host(&mut self, _queues: &mut [Queue], _mem: &GuestMemoryMmap) -> bool {
        false
    }
    /// The driver reset the device: drop all state.
    fn reset(&mut self) {}
    /// Whether another process serves the queues (vhost-user). The transport then offers
    /// only the device's own ring features, hands the queues over in
    /// [`VirtioDevice::activate`], forwards notifications to their notifiers, and turns
    /// host events into used-ring interrupts without looking at the rings.
    fn external(&self) -> bool {
        false
    }
    /// The driver set DRIVER_OK with `driver_features`: an external device starts serving
    /// the ready `queues`, whose notifications arrive on `kicks`. An error marks the
    /// device as needing a reset.
    fn activate(
        &mut self,
        _queues: &[Queue],
        _driver_features: u64,
        _kicks: &[EventFd],
        _mem: &GuestMemoryMmap,
    ) -> Result<(), String> {
        Ok(())
    }
}

/// Read `data.len()` bytes of `config` at `offset`; out of range reads see zeros.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(off) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(off..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}
