//! virtio-fs through a vhost-user frontend: the queues are served by `virtiofsd`, a
//! separate process that maps guest memory (our memfd) and reads the rings itself. The
//! VMM only negotiates: features and protocol features when it connects, then on the
//! driver's DRIVER_OK the memory table and each ready queue's size, ring addresses (as
//! addresses in this process, which the daemon translates through the memory table),
//! kick (the queue's ioeventfd, so guest notifications go straight to the daemon) and
//! call (one eventfd for every queue, which the device thread turns into the transport's
//! used-ring interrupt).

use std::io::ErrorKind;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{read_config_bytes, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

/// The virtio device id of a file system.
pub const TYPE_FS: u32 = 26;
/// Longest tag the config space holds.
pub const TAG_MAX: usize = 36;
/// The high-priority queue and one request queue.
const QUEUES: usize = 2;
/// virtiofsd's largest queue.
const QUEUE_SIZE: u16 = 1024;
/// The vhost-user feature bit that says protocol features exist (never offered to the
/// guest).
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// Indirect descriptors: the daemon walks the rings, so it decides.
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// Ring features the guest may use when the daemon supports them.
const PASSED_THROUGH: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC;

/// A virtio-fs device whose queues a vhost-user daemon serves.
pub struct Fs {
    frontend: Frontend,
    socket: String,
    config: Vec<u8>,
    backend_features: u64,
    protocol: bool,
    call: EventFd,
    /// Queues the daemon is serving (stopped on reset).
    started: Vec<usize>,
}

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fs")
            .field("socket", &self.socket)
            .field("started", &self.started)
            .finish_non_exhaustive()
    }
}

impl Fs {
    /// Connect to the daemon listening on `socket` and negotiate what does not depend on
    /// the guest; the guest mounts the file system by `tag`.
    pub fn connect(socket: &Path, tag: &str) -> Result<Self, String> {
        if tag.is_empty() || tag.len() > TAG_MAX || tag.contains('\0') {
            return Err(format!(
                "tag {tag:?}: from 1 to {TAG_MAX} bytes, without NUL"
            ));
        }
        let name = socket.display().to_string();
        let err = |what: &str, e: vhost::Error| format!("{name}: {what}: {e}");
        let mut frontend = Frontend::from_stream(connect(socket)?, QUEUES as u64);
        frontend.set_owner().map_err(|e| err("SET_OWNER", e))?;
        let backend_features = frontend
            .get_features()
            .map_err(|e| err("GET_FEATURES", e))?;
        if backend_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(format!("{name}: the daemon does not offer virtio 1.x"));
        }
        let protocol = backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0;
        if protocol {
            let offered = frontend
                .get_protocol_features()
                .map_err(|e| err("GET_PROTOCOL_FEATURES", e))?;
            // Replies to every request, so a daemon's refusal is an error here and not
            // a silent hang in the guest.
            let take = offered & VhostUserProtocolFeatures::REPLY_ACK;
            frontend
                .set_protocol_features(take)
                .map_err(|e| err("SET_PROTOCOL_FEATURES", e))?;
            if !take.is_empty() {
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        let mut config = vec![0u8; TAG_MAX + 4];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[TAG_MAX..].copy_from_slice(&1u32.to_le_bytes()); // one request queue
        Ok(Self {
            frontend,
            socket: name,
            config,
            backend_features,
            protocol,
            call: EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?,
            started: Vec::new(),
        })
    }

    fn start_queue(
        &mut self,
        index: usize,
        q: &Queue,
        mem: &GuestMemoryMmap,
        kick: &EventFd,
    ) -> Result<(), String> {
        let err = |what: &str, e: vhost::Error| format!("queue {index}: {what}: {e}");
        let host = |a: u64, what: &str| {
            mem.get_host_address(GuestAddress(a))
                .map(|p| p as u64)
                .map_err(|e| format!("queue {index}: {what} at {a:#x}: {e}"))
        };
        let ring = VringConfigData {
            queue_max_size: q.max_size(),
            queue_size: q.size(),
            flags: 0,
            desc_table_addr: host(q.desc_table(), "descriptor table")?,
            used_ring_addr: host(q.used_ring(), "used ring")?,
            avail_ring_addr: host(q.avail_ring(), "available ring")?,
            log_addr: None,
        };
        let f = &mut self.frontend;
        f.set_vring_num(index, q.size())
            .map_err(|e| err("SET_VRING_NUM", e))?;
        f.set_vring_addr(index, &ring)
            .map_err(|e| err("SET_VRING_ADDR", e))?;
        f.set_vring_base(index, 0)
            .map_err(|e| err("SET_VRING_BASE", e))?;
        f.set_vring_call(index, &self.call)
            .map_err(|e| err("SET_VRING_CALL", e))?;
        f.set_vring_kick(index, kick)
            .map_err(|e| err("SET_VRING_KICK", e))?;
        if self.protocol {
            f.set_vring_enable(index, true)
                .map_err(|e| err("SET_VRING_ENABLE", e))?;
        }
        self.started.push(index);
        Ok(())
    }

    fn stop_queues(&mut self) {
        for i in std::mem::take(&mut self.started) {
            // GET_VRING_BASE stops the ring in the daemon.
            if let Err(e) = self.frontend.get_vring_base(i) {
                eprintln!("boxlet-vmm: {}: stopping queue {i}: {e}", self.socket);
            }
        }
    }
}

/// Connect to the daemon's socket. It may exist a moment before the daemon listens on it
/// (bind, then listen): a refused connection is tried again for a few seconds.
fn connect(socket: &Path) -> Result<UnixStream, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(socket) {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("{}: connecting: {e}", socket.display())),
        }
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn features(&self) -> u64 {
        self.backend_features & PASSED_THROUGH
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; QUEUES]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn process_queue(&mut self, _: usize, _: &mut [Queue], _: &GuestMemoryMmap) -> bool {
        false // the daemon serves the queues
    }

    fn external(&self) -> bool {
        true
    }

    fn activate(
        &mut self,
        queues: &[Queue],
        driver_features: u64,
        kicks: &[EventFd],
        mem: &GuestMemoryMmap,
    ) -> Result<(), String> {
        self.stop_queues();
        let acked = driver_features & self.features()
            | self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES;
        let name = self.socket.clone();
        self.frontend
            .set_features(acked)
            .map_err(|e| format!("{name}: SET_FEATURES: {e}"))?;
        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{name}: guest memory is not shareable: {e}"))?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(|e| format!("{name}: SET_MEM_TABLE: {e}"))?;
        for (i, q) in queues.iter().enumerate().filter(|(_, q)| q.ready()) {
            let kick = kicks
                .get(i)
                .ok_or_else(|| format!("{name}: no notifier for queue {i}"))?;
            self.start_queue(i, q, mem, kick)
                .map_err(|e| format!("{name}: {e}"))?;
        }
        Ok(())
    }

    fn host_fd(&self) -> Option<RawFd> {
        Some(self.call.as_raw_fd())
    }

    fn process_host(&mut self, _: &mut [Queue], _: &GuestMemoryMmap) -> bool {
        // The daemon used buffers (and, with EVENT_IDX, decided the guest wants to know).
        self.call.read().is_ok()
    }

    fn reset(&mut self) {
        self.stop_queues();
    }
}
