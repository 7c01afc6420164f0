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
use std::sync::{Arc, Condvar, Mutex};
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
/// Each queue's largest size (virtiofsd takes up to 32768; Linux uses what is offered).
const QUEUE_SIZE: u16 = 1024;
/// The vhost-user feature bit that says protocol features exist (never offered to the
/// guest).
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// Indirect descriptors: the daemon walks the rings, so it decides.
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// Ring features the guest may use when the daemon supports them.
const PASSED_THROUGH: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC;

/// How long one exchange with the daemon may take before the VMM gives up on it.
pub const DAEMON_LIMIT: Duration = Duration::from_secs(30);

/// A virtio-fs device whose queues a vhost-user daemon serves.
pub struct Fs {
    frontend: Frontend,
    watchdog: Watchdog,
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
        Self::connect_within(socket, tag, DAEMON_LIMIT)
    }

    /// [`Fs::connect`], giving each exchange with the daemon at most `limit`: past it the
    /// connection is cut, and the exchange (and every later one) fails.
    pub fn connect_within(socket: &Path, tag: &str, limit: Duration) -> Result<Self, String> {
        if tag.is_empty() || tag.len() > TAG_MAX || tag.contains('\0') {
            return Err(format!(
                "tag {tag:?}: from 1 to {TAG_MAX} bytes, without NUL"
            ));
        }
        let name = socket.display().to_string();
        let stream = connect(socket)?;
        let cut = stream.try_clone().map_err(|e| format!("{name}: {e}"))?;
        let watchdog = Watchdog::new(cut, limit)?;
        let mut frontend = Frontend::from_stream(stream, QUEUES as u64);
        watchdog.arm();
        let negotiated = negotiate(&mut frontend, &name);
        let (backend_features, protocol) = watchdog.finish(negotiated)?;
        let mut config = vec![0u8; TAG_MAX + 4];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[TAG_MAX..].copy_from_slice(&1u32.to_le_bytes()); // one request queue
        Ok(Self {
            frontend,
            watchdog,
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
        // Counted as started from the first message on, so a reset stops a ring that a
        // later message failed to finish setting up.
        self.started.push(index);
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
        Ok(())
    }

    fn stop_queues(&mut self) {
        for i in std::mem::take(&mut self.started) {
            self.watchdog.arm();
            // Disabled, then stopped (GET_VRING_BASE), as the specification orders.
            if self.protocol {
                let _ = self.frontend.set_vring_enable(i, false);
            }
            let stopped = self.frontend.get_vring_base(i).map_err(|e| e.to_string());
            if let Err(e) = self.watchdog.finish(stopped) {
                eprintln!("boxlet-vmm: {}: stopping queue {i}: {e}", self.socket);
            }
        }
    }
}

/// SET_OWNER and the feature negotiation that does not depend on the guest: the daemon's
/// features, and whether protocol features (REPLY_ACK) are in use.
fn negotiate(frontend: &mut Frontend, name: &str) -> Result<(u64, bool), String> {
    let err = |what: &str, e: vhost::Error| format!("{name}: {what}: {e}");
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
        // Replies to every request, so a daemon's refusal is an error here and not a
        // silent hang in the guest.
        let take = offered & VhostUserProtocolFeatures::REPLY_ACK;
        frontend
            .set_protocol_features(take)
            .map_err(|e| err("SET_PROTOCOL_FEATURES", e))?;
        if !take.is_empty() {
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
    }
    Ok((backend_features, protocol))
}

/// Cuts the connection to the daemon when one exchange with it outlasts the limit: the
/// vCPU that set DRIVER_OK (or reset the device) waits for the answers, so a stuck daemon
/// then fails the device, which asks the driver for a reset, instead of holding that vCPU
/// forever.
struct Watchdog {
    state: Arc<(Mutex<Watch>, Condvar)>,
    limit: Duration,
}

#[derive(Default)]
struct Watch {
    deadline: Option<Instant>,
    fired: bool,
    closed: bool,
}

impl Watchdog {
    fn new(connection: UnixStream, limit: Duration) -> Result<Self, String> {
        let state = Arc::new((Mutex::new(Watch::default()), Condvar::new()));
        let shared = Arc::clone(&state);
        std::thread::Builder::new()
            .name("vhost-watchdog".into())
            .spawn(move || {
                crate::seccomp::enter(crate::seccomp::Role::Watchdog);
                let (lock, cv) = &*shared;
                let mut w = lock.lock().unwrap_or_else(|e| e.into_inner());
                while !w.closed {
                    let now = Instant::now();
                    w = match w.deadline {
                        None => cv.wait(w).unwrap_or_else(|e| e.into_inner()),
                        Some(d) if d <= now => {
                            // Blocked reads and writes on the connection return at once.
                            let _ = connection.shutdown(std::net::Shutdown::Both);
                            w.fired = true;
                            w.deadline = None;
                            w
                        }
                        Some(d) => {
                            cv.wait_timeout(w, d - now)
                                .unwrap_or_else(|e| e.into_inner())
                                .0
                        }
                    };
                }
            })
            .map_err(|e| format!("starting the watchdog: {e}"))?;
        Ok(Self { state, limit })
    }

    fn set(&self, deadline: Option<Instant>) -> bool {
        let (lock, cv) = &*self.state;
        let mut w = lock.lock().unwrap_or_else(|e| e.into_inner());
        w.deadline = deadline;
        cv.notify_one();
        w.fired
    }

    /// An exchange starts.
    fn arm(&self) {
        self.set(Some(Instant::now() + self.limit));
    }

    /// The exchange ended with `result`; an error of a cut connection says why.
    fn finish<T>(&self, result: Result<T, String>) -> Result<T, String> {
        let fired = self.set(None);
        result.map_err(|e| {
            if fired {
                format!("{e} (the daemon did not answer within {:?})", self.limit)
            } else {
                e
            }
        })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let (lock, cv) = &*self.state;
        lock.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        cv.notify_one();
    }
}

/// Connect to the daemon's socket. It may exist a moment before the daemon listens on it
/// (bind, then listen): a refused connection is tried again for up to 10 s.
fn connect(socket: &Path) -> Result<UnixStream, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(socket) {
            Ok(s) => return Ok(s),
            // Refused: bound, not yet listening. (A stale socket file that the daemon
            // would replace is removed before it starts: see `start_daemon`.)
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
        self.watchdog.arm();
        let started = self.start(queues, driver_features, kicks, mem);
        self.watchdog.finish(started)
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

impl Fs {
    /// Features, memory table and every ready queue to the daemon.
    fn start(
        &mut self,
        queues: &[Queue],
        driver_features: u64,
        kicks: &[EventFd],
        mem: &GuestMemoryMmap,
    ) -> Result<(), String> {
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
}
