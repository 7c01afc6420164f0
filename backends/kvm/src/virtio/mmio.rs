//! The virtio-mmio transport, version 2 (virtio 1.x, "modern").

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x786f_6278; // "xbox", little-endian-ish: any value is allowed

const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FAILED: u32 = 0x80;
const STATUS_NEEDS_RESET: u32 = 0x40;
const INT_USED_RING: u32 = 1;
const INT_CONFIG: u32 = 2;

/// One device on the MMIO bus, with its queues and interrupt line.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    irq: EventFd,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
    /// The queues' notifiers, for a device served by another process.
    kicks: Vec<EventFd>,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// `device`, interrupting the guest through `irq` (a KVM irqfd).
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, irq: EventFd) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&m| Queue::new(m).unwrap_or_else(|_| Queue::new(256).expect("256 is valid")))
            .collect();
        Self {
            device,
            mem,
            irq,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
            kicks: Vec::new(),
        }
    }

    /// The queues' notifiers (the ioeventfds KVM signals), which an external device's
    /// daemon waits on directly.
    pub fn with_kicks(mut self, kicks: Vec<EventFd>) -> Self {
        self.kicks = kicks;
        self
    }

    /// Whether another process serves this device's queues (see
    /// [`VirtioDevice::external`]); the VMM then leaves the notifiers alone.
    pub fn external(&self) -> bool {
        self.device.external()
    }

    fn offered(&self) -> u64 {
        if self.device.external() {
            // The daemon walks the rings: only what it supports.
            return self.device.features() | VIRTIO_F_VERSION_1;
        }
        self.device.features() | VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    }

    /// DRIVER_OK for a device served elsewhere: hand it the queues, or mark the device
    /// as needing a reset when the queues are bad or the daemon refuses.
    fn activate_external(&mut self) {
        if !self.queues_valid() {
            // Whatever the daemon still serves from an earlier DRIVER_OK stops too.
            self.device.reset();
            return;
        }
        if let Err(e) =
            self.device
                .activate(&self.queues, self.driver_features, &self.kicks, &self.mem)
        {
            eprintln!(
                "boxlet-vmm: virtio device {}: {e}",
                self.device.device_type()
            );
            self.status |= STATUS_NEEDS_RESET;
            self.interrupt(INT_CONFIG);
        }
    }

    /// After the device used buffers: interrupt the guest if a queue's `used_event` asks
    /// for it (with EVENT_IDX; always without it).
    fn signal_used(&mut self) {
        let mut notify = false;
        for q in &mut self.queues {
            if q.ready() {
                // A used_event outside memory cannot be read: interrupt to be safe.
                notify |= q.needs_notification(&self.mem).unwrap_or(true);
            }
        }
        if notify {
            self.interrupt(INT_USED_RING);
        }
    }

    /// Publish, for every ready queue, where the device stopped taking buffers (the
    /// `avail_event` of EVENT_IDX: the driver notifies once it adds past it).
    fn rearm_notifications(&mut self) {
        for q in &mut self.queues {
            if q.ready() {
                let _ = q.enable_notification(&self.mem);
            }
        }
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status = 0;
    }

    fn interrupt(&mut self, why: u32) {
        self.interrupt_status |= why;
        let _ = self.irq.write(1);
    }

    /// A guest read of `data.len()` bytes at `offset` in the device's window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let v: u32 = match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR,
            0x10 => match self.device_features_sel {
                0 => self.offered() as u32,
                1 => (self.offered() >> 32) as u32,
                _ => 0,
            },
            0x34 => self.queue().map_or(0, |q| u32::from(q.max_size())),
            0x44 => self.queue().map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt_status,
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A guest write of `data` at `offset` in the device's window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 || data.len() != 4 {
            return; // no writable configuration
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        // Queue setup is only allowed before the driver is done with it.
        let setup = self.status & STATUS_DRIVER_OK == 0;
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 if setup => {
                if let Some(q) = self.queue() {
                    // A size the queue refuses (0, not a power of 2, over max) is ignored.
                    let _ = q.try_set_size(v as u16);
                }
            }
            0x44 if setup => {
                if let Some(q) = self.queue() {
                    q.set_ready(v == 1);
                }
            }
            Self::NOTIFY_OFFSET => self.notify(v),
            0x64 => self.interrupt_status &= !v,
            0x70 => {
                if v == 0 {
                    self.reset();
                } else {
                    // Features the driver took must be ones we offered.
                    if self.driver_features & !self.offered() != 0 {
                        self.status |= STATUS_FAILED;
                        return;
                    }
                    let starting = v & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
                    if starting {
                        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
                        for q in &mut self.queues {
                            q.set_event_idx(event_idx);
                        }
                    }
                    self.status = v;
                    if starting && self.device.external() {
                        self.activate_external();
                    }
                }
            }
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 if setup => {
                let Some(q) = self.queue() else { return };
                let (lo, hi) = if offset & 4 == 0 {
                    (Some(v), None)
                } else {
                    (None, Some(v))
                };
                match offset & !4 {
                    0x80 => q.set_desc_table_address(lo, hi),
                    0x90 => q.set_avail_ring_address(lo, hi),
                    _ => q.set_used_ring_address(lo, hi),
                }
            }
            _ => {}
        }
    }

    /// The offset of the queue-notify register in the device's window (the VMM binds an
    /// ioeventfd per queue there, so notifications skip the exit to user space).
    pub const NOTIFY_OFFSET: u64 = 0x50;

    /// The driver notified queue `index` (through the register or its ioeventfd).
    pub fn notify(&mut self, index: u32) {
        if self.status & STATUS_DRIVER_OK == 0 || self.status & STATUS_NEEDS_RESET != 0 {
            return;
        }
        if self.device.external() {
            // A notification that missed its ioeventfd: pass it on to the daemon.
            if let Some(k) = self.kicks.get(index as usize) {
                let _ = k.write(1);
            }
            return;
        }
        let Some(q) = self.queues.get(index as usize) else {
            return;
        };
        if !q.ready() || !self.queues_valid() {
            return;
        }
        let i = index as usize;
        let mut used = false;
        loop {
            let more = self.device.process_queue(i, &mut self.queues, &self.mem);
            used |= more;
            // Re-arm this queue; buffers the driver added meanwhile are taken at once
            // (it will not notify for them), as long as the device makes progress.
            let pending = self.queues[i]
                .enable_notification(&self.mem)
                .unwrap_or(false);
            if !(more && pending) {
                break;
            }
        }
        self.rearm_notifications();
        if used {
            self.signal_used();
        }
    }

    /// Whether every ready queue lies in guest memory, properly aligned. When one does
    /// not, the device stops until the driver resets it.
    fn queues_valid(&mut self) -> bool {
        if self
            .queues
            .iter()
            .any(|q| q.ready() && !q.is_valid(&self.mem))
        {
            self.status |= STATUS_NEEDS_RESET;
            self.interrupt(INT_CONFIG);
            return false;
        }
        true
    }

    /// The device's host-side readiness descriptor (see [`VirtioDevice::host_fd`]).
    pub fn host_fd(&self) -> Option<std::os::fd::RawFd> {
        self.device.host_fd()
    }

    /// Host-side work for the device (its [`MmioTransport::host_fd`] became readable);
    /// interrupts the guest when buffers were used.
    pub fn process_host(&mut self) {
        if self.status & STATUS_DRIVER_OK == 0 || self.status & STATUS_NEEDS_RESET != 0 {
            // Not running: host events are taken (and connections wait or fail).
            self.device.process_host(&mut [], &self.mem);
            return;
        }
        if self.device.external() {
            // The daemon signalled: it already decided the guest wants an interrupt.
            if self.device.process_host(&mut [], &self.mem) {
                self.interrupt(INT_USED_RING);
            }
            return;
        }
        if !self.queues_valid() {
            return;
        }
        let used = self.device.process_host(&mut self.queues, &self.mem);
        self.rearm_notifications();
        if used {
            self.signal_used();
        }
    }
}
