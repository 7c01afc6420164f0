//! virtio-vsock in the VMM, with Firecracker's host convention:
//!
//! - a guest connection to CID 2 (the host), port P, reaches the host Unix socket
//!   `<uds path>_P` (the device connects to it);
//! - a host program connects to the Unix socket `<uds path>` (the device listens there),
//!   writes `CONNECT P\n` and, once the guest accepted, reads `OK <host port>\n`; then the
//!   stream is the connection.
//!
//! This is the convention of `vhost-device-vsock`, which the QEMU backend uses, so the
//! runtime cannot tell the backends apart.
//!
//! Streams only (no seqpacket). Flow control follows the spec: every packet to the guest
//! carries this side's buffer size and forwarded count, the device never sends more than
//! the guest's credit, and a guest that overruns the device's credit loses the connection.
//! Every packet from the guest is checked (header size, payload length against the chain
//! and the 64 KiB limit, addresses, type, op); a bad one is answered with a reset, never a
//! panic. Host sockets are non-blocking; the VMM's device thread waits on [`Vsock::host_fd`].

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::{read_config_bytes, VirtioDevice};

/// The host's context id.
pub const HOST_CID: u64 = 2;
/// The virtio device id.
pub const DEVICE_TYPE: u32 = 19;
const RX: usize = 0;
const TX: usize = 1;
const QUEUE_SIZE: u16 = 256;

/// Packet header size on the wire.
pub const HDR_LEN: usize = 44;
/// The largest payload of one packet (Linux's own limit).
pub const MAX_PAYLOAD: usize = 64 << 10;
/// This side's receive buffer per connection: the credit the guest gets.
pub const BUF_ALLOC: u32 = 256 << 10;
/// The most connections (host sockets) one VM may hold open at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// The most stand-alone resets waiting for receive buffers; more are dropped.
const MAX_PENDING_RESETS: usize = 1024;
/// Host ports for host-initiated connections start here (as in Firecracker).
const FIRST_HOST_PORT: u32 = 1 << 30;
/// The longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 32;

/// Packet types and operations.
pub const TYPE_STREAM: u16 = 1;
/// Connection request.
pub const OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Connection reset (refused or closed).
pub const OP_RST: u16 = 3;
/// One side will not send and/or receive any more.
pub const OP_SHUTDOWN: u16 = 4;
/// Data.
pub const OP_RW: u16 = 5;
/// Credit announcement.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Credit asked for.
pub const OP_CREDIT_REQUEST: u16 = 7;
/// SHUTDOWN flags.
pub const SHUTDOWN_RCV: u32 = 1;
/// The peer will send no more.
pub const SHUTDOWN_SEND: u32 = 2;

/// A packet header (virtio 1.2, 5.10.6), little-endian on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source context id.
    pub src_cid: u64,
    /// Destination context id.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type (1: stream).
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags.
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from this connection so far.
    pub fwd_cnt: u32,
}

impl Header {
    /// Decode the wire form.
    pub fn decode(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// The wire form.
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// A connection: (host port, guest port).
type Key = (u32, u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Host-initiated: the request is on its way to the guest.
    Connecting,
    Established,
}

#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    state: State,
    /// Guest data not yet written to the host socket (at most `BUF_ALLOC`).
    to_host: VecDeque<u8>,
    /// Guest bytes written to the host socket so far (wrapping, as the spec counts).
    fwd_cnt: u32,
    /// The `fwd_cnt` the guest last heard of.
    fwd_cnt_sent: u32,
    /// Host bytes read but not yet in a receive buffer.
    to_guest: Vec<u8>,
    /// Host bytes delivered to the guest so far.
    rx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// The host socket may have data (edge-triggered readiness not yet drained).
    readable: bool,
    /// The host side reached end of stream: the guest gets a SHUTDOWN.
    host_eof: bool,
    /// The guest will send no more: close the socket's write side once flushed.
    guest_done_sending: bool,
    /// The guest will receive no more.
    guest_done_receiving: bool,
    /// The host socket's write side is shut down (after `guest_done_sending`).
    host_write_shut: bool,
    /// A credit update for this connection waits in the pending queue: one is enough,
    /// however often the guest asks (its fields are filled in when it is sent).
    credit_update_queued: bool,
}

impl Conn {
    fn new(stream: UnixStream, state: State, peer: &Header) -> Self {
        Self {
            stream,
            state,
            to_host: VecDeque::new(),
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            to_guest: Vec::new(),
            rx_cnt: 0,
            peer_buf_alloc: peer.buf_alloc,
            peer_fwd_cnt: peer.fwd_cnt,
            readable: true,
            host_eof: false,
            guest_done_sending: false,
            guest_done_receiving: false,
            host_write_shut: false,
            credit_update_queued: false,
        }
    }

    /// Bytes the guest can still take.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Write what the guest sent to the host socket, as far as it takes it.
    fn flush(&mut self) -> io::Result<()> {
        while !self.to_host.is_empty() {
            let (a, _) = self.to_host.as_slices();
            match self.stream.write(a) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.guest_done_sending && !self.host_write_shut {
            // Once: a shutdown wakes the socket's own waiters, so repeating it at every
            // flush would make the (edge-triggered) epoll report this socket again and
            // again: a busy loop until the connection ends.
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
            self.host_write_shut = true;
        }
        Ok(())
    }
}

/// A packet waiting for a receive buffer.
#[derive(Debug, Clone, Copy)]
enum Pending {
    /// For a live connection: its credit fields are filled in when it is sent.
    Conn(Key, u16, u32),
    /// A reset for a packet that has (or no longer has) no connection.
    Reset(Header),
}

/// What an epoll token stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Listener,
    /// A host connection still sending its `CONNECT` line.
    Accepting,
    Conn(Key),
}

/// Counts complaints about guest behaviour and logs the first few, then every 1000th.
#[derive(Debug, Default)]
struct Complaints(u64);

impl Complaints {
    fn log(&mut self, what: std::fmt::Arguments<'_>) {
        self.0 += 1;
        if self.0 <= 10 || self.0.is_multiple_of(1000) {
            eprintln!("boxlet-vmm: vsock: {what} (complaint {})", self.0);
        }
    }
}

/// The virtio-vsock device.
pub struct Vsock {
    cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    slots: HashMap<RawFd, Slot>,
    accepting: HashMap<RawFd, (UnixStream, Vec<u8>)>,
    conns: HashMap<Key, Conn>,
    pending: VecDeque<Pending>,
    resets: usize,
    next_port: u32,
    config: [u8; 8],
    complaints: Complaints,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("cid", &self.cid)
            .field("uds_path", &self.uds_path)
            .field("connections", &self.conns.len())
            .finish_non_exhaustive()
    }
}

/// Whether the process at the other end of a host connection may use the guest: it runs
/// as this process's user, or as root. Anything else (or a peer whose credentials cannot
/// be read) is refused, whatever the socket file's mode let through.
pub fn peer_may_connect(stream: &UnixStream) -> bool {
    match nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials) {
        Ok(cred) => cred.uid() == 0 || cred.uid() == nix::unistd::geteuid().as_raw(),
        Err(_) => false,
    }
}

fn edge(events: EventSet, fd: RawFd) -> EpollEvent {
    EpollEvent::new(events | EventSet::EDGE_TRIGGERED, fd as u64)
}

impl Vsock {
    /// A device for guest `cid` (3 or more), listening for host connections on `uds_path`
    /// (a stale socket file there is replaced; any other file is an error).
    pub fn new(cid: u64, uds_path: &Path) -> io::Result<Self> {
        if !(3..u64::from(u32::MAX)).contains(&cid) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("vsock cid {cid}: from 3 to {}", u32::MAX - 1),
            ));
        }
        match std::fs::symlink_metadata(uds_path) {
            Ok(m) if m.file_type().is_socket() => std::fs::remove_file(uds_path)?,
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{}: exists and is not a socket", uds_path.display()),
                ))
            }
            Err(_) => {}
        }
        let listener = UnixListener::bind(uds_path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", uds_path.display())))?;
        // Whoever connects here runs commands in the guest: only this user (the run
        // directory is private as well; accept checks the peer too).
        std::fs::set_permissions(uds_path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        let fd = listener.as_raw_fd();
        epoll.ctl(ControlOperation::Add, fd, edge(EventSet::IN, fd))?;
        Ok(Self {
            cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            epoll,
            slots: HashMap::from([(fd, Slot::Listener)]),
            accepting: HashMap::new(),
            conns: HashMap::new(),
            pending: VecDeque::new(),
            resets: 0,
            next_port: FIRST_HOST_PORT,
            config: cid.to_le_bytes(),
            complaints: Complaints::default(),
        })
    }

    /// Open connections (for tests and logs).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    fn watch(&mut self, fd: RawFd, events: EventSet, slot: Slot) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, edge(events, fd))?;
        self.slots.insert(fd, slot);
        Ok(())
    }

    fn forget(&mut self, fd: RawFd) {
        // Closing the fd removes it from the epoll set; this keeps the books.
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        self.slots.remove(&fd);
    }

    fn remove(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            self.forget(c.stream.as_raw_fd());
            // Its queued packets go with it: they would otherwise pile up over connect
            // and reset cycles, or reach a new connection that reuses the key.
            self.pending
                .retain(|p| !matches!(p, Pending::Conn(k, _, _) if *k == key));
        }
    }

    /// A reset answering `h` (whatever it was).
    fn reset_for(&mut self, h: &Header) {
        if h.op == OP_RST {
            return; // never answer a reset with a reset
        }
        self.remove((h.dst_port, h.src_port));
        if self.resets >= MAX_PENDING_RESETS {
            self.complaints
                .log(format_args!("too many resets pending: dropping one"));
            return;
        }
        self.resets += 1;
        self.pending.push_back(Pending::Reset(Header {
            src_cid: h.dst_cid,
            dst_cid: h.src_cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Default::default()
        }));
    }

    /// Reset connection `key` from the host side.
    fn reset_conn(&mut self, key: Key) {
        self.remove(key);
        // Not capped: there is at most one per connection.
        self.resets += 1;
        self.pending.push_back(Pending::Reset(Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.0,
            dst_port: key.1,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Default::default()
        }));
    }

    /// Queue a packet for connection `key`. Each connection has at most one of each
    /// kind waiting (a request, response or shutdown happens once in its life; credit
    /// updates are merged), so the queue is bounded by the connection limit however a
    /// guest floods it.
    fn queue_conn_packet(&mut self, key: Key, op: u16, flags: u32) {
        if op == OP_CREDIT_UPDATE {
            match self.conns.get_mut(&key) {
                Some(c) if !c.credit_update_queued => c.credit_update_queued = true,
                _ => return,
            }
        }
        self.pending.push_back(Pending::Conn(key, op, flags));
    }

    /// Packets waiting for receive buffers (for tests and logs).
    pub fn pending_packets(&self) -> usize {
        self.pending.len()
    }

    /// One packet from the guest.
    fn handle(&mut self, h: Header, payload: &[u8]) {
        if h.src_cid != self.cid || h.dst_cid != HOST_CID {
            self.complaints.log(format_args!(
                "packet from cid {} to cid {}: only {} -> {HOST_CID} is served",
                h.src_cid, h.dst_cid, self.cid
            ));
            return self.reset_for(&h);
        }
        if h.type_ != TYPE_STREAM {
            return self.reset_for(&h);
        }
        let key = (h.dst_port, h.src_port);
        if h.op == OP_REQUEST {
            return self.guest_connects(&h);
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return self.reset_for(&h);
        };
        conn.peer_buf_alloc = h.buf_alloc;
        conn.peer_fwd_cnt = h.fwd_cnt;
        match (h.op, conn.state) {
            (OP_RESPONSE, State::Connecting) => {
                conn.state = State::Established;
                let line = format!("OK {}\n", key.0);
                // A fresh socket's buffer takes a line this short at once.
                if !matches!(conn.stream.write(line.as_bytes()), Ok(n) if n == line.len()) {
                    self.reset_conn(key);
                }
            }
            (OP_RST, _) => self.remove(key),
            (OP_SHUTDOWN, State::Established) => {
                conn.guest_done_sending |= h.flags & SHUTDOWN_SEND != 0;
                conn.guest_done_receiving |= h.flags & SHUTDOWN_RCV != 0;
                if conn.guest_done_receiving {
                    conn.to_guest.clear();
                }
                let flushed = conn.flush();
                let (sending, receiving) = (conn.guest_done_sending, conn.guest_done_receiving);
                if flushed.is_err() || (sending && receiving && conn.to_host.is_empty()) {
                    // Fully shut down: the guest waits for our reset to finish the close.
                    self.reset_conn(key);
                }
            }
            (OP_RW, State::Established) => {
                if conn.guest_done_sending {
                    return self.reset_conn(key);
                }
                if conn.to_host.len() + payload.len() > BUF_ALLOC as usize {
                    self.complaints.log(format_args!(
                        "port {} sent beyond its credit: connection reset",
                        h.src_port
                    ));
                    return self.reset_conn(key);
                }
                conn.to_host.extend(payload);
                if conn.flush().is_err() {
                    return self.reset_conn(key);
                }
                self.maybe_credit_update(key);
            }
            (OP_CREDIT_UPDATE, State::Established) => {}
            (OP_CREDIT_REQUEST, State::Established) => {
                self.queue_conn_packet(key, OP_CREDIT_UPDATE, 0);
            }
            _ => self.reset_for(&h),
        }
    }

    /// Tell the guest about freed buffer space once a quarter of it is free again, or
    /// when everything it sent has been forwarded.
    fn maybe_credit_update(&mut self, key: Key) {
        let Some(c) = self.conns.get(&key) else {
            return;
        };
        let unannounced = c.fwd_cnt.wrapping_sub(c.fwd_cnt_sent);
        if unannounced >= BUF_ALLOC / 4 || (unannounced > 0 && c.to_host.is_empty()) {
            self.queue_conn_packet(key, OP_CREDIT_UPDATE, 0);
        }
    }

    /// The guest connects to host port `h.dst_port`: connect to `<uds path>_<port>`.
    fn guest_connects(&mut self, h: &Header) {
        let key = (h.dst_port, h.src_port);
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
            return self.reset_for(h);
        }
        let path = format!("{}_{}", self.uds_path.display(), h.dst_port);
        let stream = match UnixStream::connect(&path) {
            Ok(s) => s,
            Err(_) => return self.reset_for(h), // nobody listens there: refused
        };
        if stream.set_nonblocking(true).is_err() {
            return self.reset_for(h);
        }
        let fd = stream.as_raw_fd();
        self.conns
            .insert(key, Conn::new(stream, State::Established, h));
        let events = EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP;
        if self.watch(fd, events, Slot::Conn(key)).is_err() {
            return self.reset_conn(key);
        }
        self.queue_conn_packet(key, OP_RESPONSE, 0);
    }

    /// Host connections arriving on the listener.
    fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return, // WouldBlock, or a resource limit: try at the next edge
            };
            if !peer_may_connect(&stream) {
                self.complaints.log(format_args!(
                    "a host connection from another user was refused"
                ));
                continue;
            }
            if self.conns.len() + self.accepting.len() >= MAX_CONNECTIONS
                || stream.set_nonblocking(true).is_err()
            {
                continue; // dropped: the host sees the connection closed
            }
            let fd = stream.as_raw_fd();
            self.accepting.insert(fd, (stream, Vec::new()));
            if self
                .watch(fd, EventSet::IN | EventSet::READ_HANG_UP, Slot::Accepting)
                .is_err()
            {
                self.accepting.remove(&fd);
                self.slots.remove(&fd);
            }
            // Data may have arrived before the fd was watched.
            self.read_connect_line(fd);
        }
    }

    /// Read what a host connection sent of its `CONNECT <port>\n` line.
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some((stream, line)) = self.accepting.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        // Byte by byte: nothing past the newline may be consumed (it is connection data).
        let done = loop {
            match stream.read(&mut byte) {
                Ok(0) => break Err(()),
                Ok(_) if byte[0] == b'\n' => break Ok(true),
                Ok(_) if line.len() >= MAX_CONNECT_LINE => break Err(()),
                Ok(_) => line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break Err(()),
            }
        };
        match done {
            Ok(false) => {}
            Err(()) => {
                self.forget(fd);
                self.accepting.remove(&fd);
            }
            Ok(true) => {
                self.forget(fd);
                let Some((stream, line)) = self.accepting.remove(&fd) else {
                    return;
                };
                let port = std::str::from_utf8(&line)
                    .ok()
                    .and_then(|l| l.strip_prefix("CONNECT "))
                    .and_then(|p| p.trim().parse::<u32>().ok());
                if let Some(port) = port {
                    self.host_connects(stream, port);
                }
            }
        }
    }

    /// A host program asked for guest port `port`: send the guest a request.
    fn host_connects(&mut self, stream: UnixStream, port: u32) {
        // A free host port (the counter wraps within the host-initiated range).
        let mut local = self.next_port;
        while self.conns.contains_key(&(local, port)) {
            local = local.wrapping_add(1).max(FIRST_HOST_PORT);
        }
        self.next_port = local.wrapping_add(1).max(FIRST_HOST_PORT);
        let key = (local, port);
        let fd = stream.as_raw_fd();
        let peer = Header::default(); // no credit until the guest answers
        self.conns
            .insert(key, Conn::new(stream, State::Connecting, &peer));
        let events = EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP;
        if self.watch(fd, events, Slot::Conn(key)).is_err() {
            self.remove(key);
            return;
        }
        self.queue_conn_packet(key, OP_REQUEST, 0);
    }

    /// Readiness of a connection's host socket.
    fn conn_event(&mut self, key: Key, events: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.state == State::Connecting {
            if events.intersects(EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR) {
                // The host gave up before the guest answered.
                self.reset_conn(key);
            }
            return;
        }
        if events
            .intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR)
        {
            conn.readable = true;
        }
        if events.contains(EventSet::OUT) {
            if conn.flush().is_err() {
                return self.reset_conn(key);
            }
            if conn.guest_done_sending && conn.guest_done_receiving && conn.to_host.is_empty() {
                // The last of a fully shut down connection reached the host.
                return self.reset_conn(key);
            }
            self.maybe_credit_update(key);
        }
    }

    /// Host sockets became ready: take their events.
    fn host_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            for ev in &events[..n] {
                let fd = ev.data() as RawFd;
                match self.slots.get(&fd).copied() {
                    Some(Slot::Listener) => self.accept(),
                    Some(Slot::Accepting) => self.read_connect_line(fd),
                    Some(Slot::Conn(key)) => self.conn_event(key, ev.event_set()),
                    None => {}
                }
            }
            if n < events.len() {
                return;
            }
        }
    }

    /// Read host data for connections that have credit and nothing staged.
    fn stage_host_data(&mut self) {
        let mut broken = Vec::new();
        let mut ended = Vec::new();
        for (key, c) in self.conns.iter_mut() {
            if c.state != State::Established || !c.readable || c.host_eof || !c.to_guest.is_empty()
            {
                continue;
            }
            if c.guest_done_receiving {
                // Nothing more goes to the guest: drain and drop what the host sends.
                let mut sink = [0u8; 4096];
                loop {
                    match c.stream.read(&mut sink) {
                        Ok(0) => {
                            c.host_eof = true;
                            break;
                        }
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            c.readable = false;
                            break;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => {
                            broken.push(*key);
                            break;
                        }
                    }
                }
                continue;
            }
            let want = (c.peer_credit() as usize).min(MAX_PAYLOAD);
            if want == 0 {
                continue;
            }
            c.to_guest.resize(want, 0);
            match c.stream.read(&mut c.to_guest) {
                Ok(0) => {
                    c.to_guest.clear();
                    c.host_eof = true;
                    ended.push(*key);
                }
                Ok(n) => c.to_guest.truncate(n),
                Err(e) => {
                    c.to_guest.clear();
                    match e.kind() {
                        io::ErrorKind::WouldBlock => c.readable = false,
                        io::ErrorKind::Interrupted => {}
                        _ => broken.push(*key),
                    }
                }
            }
        }
        for key in broken {
            self.reset_conn(key);
        }
        for key in ended {
            // The host closed its end: both directions are done.
            self.queue_conn_packet(key, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND);
        }
    }

    /// The header of a packet on connection `key` (credit fields current, and from now
    /// on known to the guest).
    fn conn_header(&mut self, key: Key, op: u16, flags: u32, len: u32) -> Option<Header> {
        let c = self.conns.get_mut(&key)?;
        c.fwd_cnt_sent = c.fwd_cnt;
        Some(Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: c.fwd_cnt,
        })
    }

    /// The next packet for the guest, if any: control packets first, then staged data.
    fn next_packet(&mut self, room: usize) -> Option<(Header, Vec<u8>)> {
        while let Some(p) = self.pending.pop_front() {
            match p {
                Pending::Reset(h) => {
                    self.resets -= 1;
                    return Some((h, Vec::new()));
                }
                Pending::Conn(key, op, flags) => {
                    if op == OP_CREDIT_UPDATE {
                        if let Some(c) = self.conns.get_mut(&key) {
                            c.credit_update_queued = false;
                        }
                    }
                    if let Some(h) = self.conn_header(key, op, flags, 0) {
                        return Some((h, Vec::new()));
                    }
                }
            }
        }
        let key = self
            .conns
            .iter()
            .find(|(_, c)| !c.to_guest.is_empty())
            .map(|(k, _)| *k)?;
        let c = self.conns.get_mut(&key)?;
        let n = c.to_guest.len().min(room);
        let data: Vec<u8> = c.to_guest.drain(..n).collect();
        c.rx_cnt = c.rx_cnt.wrapping_add(n as u32);
        self.conn_header(key, OP_RW, 0, n as u32).map(|h| (h, data))
    }

    /// Move pending packets and host data into the guest's receive buffers.
    fn fill_rx(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        loop {
            self.stage_host_data();
            let has_data = self.conns.values().any(|c| !c.to_guest.is_empty());
            if self.pending.is_empty() && !has_data {
                break;
            }
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break; // out of buffers: the guest's next RX notification resumes
            };
            let head = chain.head_index();
            let mut w = match Writer::new(mem, chain) {
                Ok(w) if w.available_bytes() >= HDR_LEN => w,
                _ => {
                    // A buffer that cannot hold a header: hand it back empty.
                    self.complaints
                        .log(format_args!("receive buffer unusable: returned empty"));
                    if q.add_used(mem, head, 0).is_err() {
                        break;
                    }
                    used = true;
                    continue;
                }
            };
            let room = (w.available_bytes() - HDR_LEN).min(MAX_PAYLOAD);
            let Some((h, data)) = self.next_packet(room) else {
                q.go_to_previous_position();
                break;
            };
            let mut written = 0;
            if w.write_all(&h.encode()).is_ok() && w.write_all(&data).is_ok() {
                written = (HDR_LEN + data.len()) as u32;
            }
            if q.add_used(mem, head, written).is_err() {
                break;
            }
            used = true;
        }
        used
    }

    /// Packets the guest sent.
    fn drain_tx(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        let mut payload = Vec::new();
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match self.read_packet(chain, mem, &mut payload) {
                Ok(h) => self.handle(h, &payload),
                Err(Some(h)) => {
                    self.complaints.log(format_args!(
                        "malformed packet from port {} (len {})",
                        h.src_port, h.len
                    ));
                    self.reset_for(&h);
                }
                Err(None) => self
                    .complaints
                    .log(format_args!("transmit buffer without a whole header")),
            }
            if q.add_used(mem, head, 0).is_err() {
                break;
            }
            used = true;
        }
        used
    }

    /// Read one packet; `Err(Some(header))` when the header was readable but the packet
    /// is not valid.
    fn read_packet(
        &self,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        payload: &mut Vec<u8>,
    ) -> Result<Header, Option<Header>> {
        let mut r = Reader::new(mem, chain).map_err(|_| None)?;
        let mut hb = [0u8; HDR_LEN];
        r.read_exact(&mut hb).map_err(|_| None)?;
        let h = Header::decode(&hb);
        let len = h.len as usize;
        if len > MAX_PAYLOAD || len > r.available_bytes() {
            return Err(Some(h));
        }
        payload.resize(len, 0);
        r.read_exact(payload).map_err(|_| Some(h))?;
        Ok(h)
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        0
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        if index == TX {
            if let Some(tx) = queues.get_mut(TX) {
                used |= self.drain_tx(tx, mem);
            }
        }
        // New receive buffers, or replies and credit from what was just sent.
        if let Some(rx) = queues.get_mut(RX).filter(|q| q.ready()) {
            used |= self.fill_rx(rx, mem);
        }
        used
    }

    fn host_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn process_host(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        self.host_events();
        match queues.get_mut(RX).filter(|q| q.ready()) {
            Some(rx) => self.fill_rx(rx, mem),
            None => false,
        }
    }

    fn reset(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for k in keys {
            self.remove(k);
        }
        let fds: Vec<RawFd> = self.accepting.keys().copied().collect();
        for fd in fds {
            self.forget(fd);
            self.accepting.remove(&fd);
        }
        self.pending.clear();
        self.resets = 0;
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_in_44_bytes() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1234,
            dst_port: 5000,
            len: 77,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 3,
            buf_alloc: 1 << 18,
            fwd_cnt: 0xdead_beef,
        };
        let b = h.encode();
        assert_eq!(b.len(), HDR_LEN);
        assert_eq!(&b[20..24], &5000u32.to_le_bytes());
        assert_eq!(Header::decode(&b), h);
    }

    #[test]
    fn credit_is_what_the_peer_has_room_for_across_wrapping_counters() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = Conn::new(
            a,
            State::Established,
            &Header {
                buf_alloc: 1000,
                fwd_cnt: u32::MAX - 10,
                ..Default::default()
            },
        );
        c.rx_cnt = u32::MAX - 10;
        assert_eq!(c.peer_credit(), 1000);
        c.rx_cnt = c.rx_cnt.wrapping_add(600); // wraps past zero
        assert_eq!(c.peer_credit(), 400);
        c.rx_cnt = c.rx_cnt.wrapping_add(500); // a peer that lies about its fwd_cnt
        assert_eq!(c.peer_credit(), 0);
    }

    #[test]
    fn a_flood_of_credit_requests_queues_one_reply() {
        let dir = tempfile::tempdir().unwrap();
        let mut dev = Vsock::new(3, &dir.path().join("v.sock")).unwrap();
        let (a, _b) = UnixStream::pair().unwrap();
        let guest = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 80,
            dst_port: 8,
            type_: TYPE_STREAM,
            op: OP_CREDIT_REQUEST,
            buf_alloc: 1 << 20,
            ..Default::default()
        };
        dev.conns
            .insert((8, 80), Conn::new(a, State::Established, &guest));
        // No receive buffers: nothing leaves the queue while the guest keeps asking.
        for _ in 0..100_000 {
            dev.handle(guest, &[]);
        }
        assert_eq!(dev.pending_packets(), 1);
        // Once sent, the next request queues a reply again.
        let (h, _) = dev.next_packet(0).unwrap();
        assert_eq!((h.op, h.dst_port), (OP_CREDIT_UPDATE, 80));
        assert_eq!(dev.pending_packets(), 0);
        dev.handle(guest, &[]);
        dev.handle(guest, &[]);
        assert_eq!(dev.pending_packets(), 1);
        // A removed connection takes its queued packets with it.
        dev.remove((8, 80));
        assert_eq!(dev.pending_packets(), 0);
    }
}
