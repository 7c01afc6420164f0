//! virtio-vsock driven the way a guest driver would, on the host (no KVM): packets built
//! in guest memory, host programs on real Unix sockets (Firecracker's convention), valid
//! and hostile traffic.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use boxlet_kvm::virtio::vsock::*;
use boxlet_kvm::virtio::VirtioDevice;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const CID: u64 = 3;
const QSIZE: u16 = 256;
const RX_BUF: u32 = (HDR_LEN + MAX_PAYLOAD) as u32;
const WRITE: u16 = 2;
const NEXT: u16 = 1;

/// A guest driver's view: three queues in guest memory and buffers after them.
struct Driver<'a> {
    m: &'a GuestMemoryMmap,
    rx: MockSplitQueue<'a, GuestMemoryMmap>,
    tx: MockSplitQueue<'a, GuestMemoryMmap>,
    queues: Vec<Queue>,
    /// Next free descriptor index per queue (rx, tx).
    next_desc: [u16; 2],
    /// Where the next buffer goes.
    next_buf: u64,
    /// Used entries of each queue read so far.
    seen: [u16; 2],
    /// Buffer address of each rx descriptor.
    rx_bufs: Vec<u64>,
}

impl<'a> Driver<'a> {
    fn new(m: &'a GuestMemoryMmap) -> Self {
        let rx = MockSplitQueue::create(m, GuestAddress(0), QSIZE);
        let tx = MockSplitQueue::create(m, GuestAddress(0x1_0000), QSIZE);
        let ev = MockSplitQueue::create(m, GuestAddress(0x2_0000), QSIZE);
        let queues = vec![
            rx.create_queue().unwrap(),
            tx.create_queue().unwrap(),
            ev.create_queue().unwrap(),
        ];
        Self {
            m,
            rx,
            tx,
            queues,
            next_desc: [0, 0],
            next_buf: 0x10_0000,
            seen: [0, 0],
            rx_bufs: vec![0; QSIZE as usize],
        }
    }

    fn buf(&mut self, len: u32) -> u64 {
        let a = self.next_buf;
        self.next_buf += u64::from(len).next_multiple_of(0x1000);
        a
    }

    /// Offer `n` receive buffers of `len` bytes.
    fn give_rx(&mut self, n: usize, len: u32) {
        for _ in 0..n {
            let addr = self.buf(len);
            let i = self.next_desc[0];
            self.next_desc[0] += 1;
            self.rx_bufs[i as usize] = addr;
            let d = RawDescriptor::from(SplitDescriptor::new(addr, len, WRITE, 0));
            self.rx.add_desc_chains(&[d], i).unwrap();
        }
    }

    /// Queue raw descriptors (addr, len, flags) as one transmit chain.
    fn send_raw(&mut self, descs: &[(u64, u32, u16)]) {
        let first = self.next_desc[1];
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(k, &(a, l, f))| {
                let last = k == descs.len() - 1;
                let flags = f | if last { 0 } else { NEXT };
                let next = if last { 0 } else { first + k as u16 + 1 };
                RawDescriptor::from(SplitDescriptor::new(a, l, flags, next))
            })
            .collect();
        self.next_desc[1] += descs.len() as u16;
        self.tx.add_desc_chains(&raw, first).unwrap();
    }

    /// Send a packet: the header in one descriptor, the payload (if any) in a second.
    /// A header `len` of 0 is set to the payload's.
    fn send(&mut self, mut h: Header, payload: &[u8]) {
        if h.len == 0 {
            h.len = payload.len() as u32;
        }
        let ha = self.buf(HDR_LEN as u32);
        self.m.write_slice(&h.encode(), GuestAddress(ha)).unwrap();
        if payload.is_empty() {
            self.send_raw(&[(ha, HDR_LEN as u32, 0)]);
        } else {
            let pa = self.buf(payload.len() as u32);
            self.m.write_slice(payload, GuestAddress(pa)).unwrap();
            self.send_raw(&[(ha, HDR_LEN as u32, 0), (pa, payload.len() as u32, 0)]);
        }
    }

    fn notify_tx(&mut self, dev: &mut Vsock) -> bool {
        dev.process_queue(1, &mut self.queues, self.m)
    }

    fn notify_rx(&mut self, dev: &mut Vsock) -> bool {
        dev.process_queue(0, &mut self.queues, self.m)
    }

    /// Packets the device put in receive buffers since the last call.
    fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        let idx = self.rx.used().idx().load();
        while self.seen[0] != idx {
            let e = self
                .rx
                .used()
                .ring()
                .ref_at(self.seen[0] as usize)
                .unwrap()
                .load();
            self.seen[0] += 1;
            let addr = self.rx_bufs[e.id() as usize];
            let len = e.len() as usize;
            if len < HDR_LEN {
                out.push((Header::default(), Vec::new()));
                continue;
            }
            let mut b = vec![0u8; len];
            self.m.read_slice(&mut b, GuestAddress(addr)).unwrap();
            let h = Header::decode(b[..HDR_LEN].try_into().unwrap());
            assert_eq!(
                h.len as usize,
                len - HDR_LEN,
                "header len matches the used len"
            );
            out.push((h, b[HDR_LEN..].to_vec()));
        }
        out
    }

    /// How many transmit chains the device has completed.
    fn tx_used(&self) -> u16 {
        self.tx.used().idx().load()
    }
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x400_0000)]).unwrap()
}

fn guest(src_port: u32, dst_port: u32, op: u16) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 1 << 20,
        ..Default::default()
    }
}

fn device(dir: &Path) -> Vsock {
    Vsock::new(CID, &dir.join("v.sock")).unwrap()
}

fn read_exactly(s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).unwrap();
    b
}

fn read_line(s: &mut UnixStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut line = Vec::new();
    let mut c = [0u8];
    while s.read(&mut c).unwrap() == 1 && c[0] != b'\n' {
        line.push(c[0]);
    }
    String::from_utf8(line).unwrap()
}

/// Pump host events until `want` packets arrived (bounded).
fn pump(d: &mut Driver<'_>, dev: &mut Vsock, want: usize) -> Vec<(Header, Vec<u8>)> {
    let mut got = Vec::new();
    for _ in 0..200 {
        dev.process_host(&mut d.queues, d.m);
        got.extend(d.received());
        if got.len() >= want {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    got
}

/// A host program connects to guest port `port` (the line, then host events pumped):
/// its stream, and what reached the guest (the request, when all went well).
fn host_connects(
    d: &mut Driver<'_>,
    dev: &mut Vsock,
    dir: &Path,
    port: u32,
) -> (UnixStream, Vec<(Header, Vec<u8>)>) {
    let mut host = UnixStream::connect(dir.join("v.sock")).unwrap();
    host.write_all(format!("CONNECT {port}\n").as_bytes())
        .unwrap();
    let got = pump(d, dev, 1);
    (host, got)
}

#[test]
fn the_config_space_holds_the_guest_cid() {
    let dir = tempfile::tempdir().unwrap();
    let dev = device(dir.path());
    let mut b = [0u8; 8];
    dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), CID);
    assert_eq!(dev.device_type(), 19);
    assert!(
        dir.path().join("v.sock").exists(),
        "the host socket is bound"
    );
    drop(dev);
    assert!(
        !dir.path().join("v.sock").exists(),
        "and removed with the device"
    );
}

#[test]
fn a_guest_connection_reaches_the_host_socket_for_its_port_and_carries_data_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let listener = UnixListener::bind(dir.path().join("v.sock_1024")).unwrap();
    let m = mem();
    let mut d = Driver::new(&m);
    let mut dev = device(dir.path());
    d.give_rx(16, RX_BUF);

    d.send(guest(777, 1024, OP_REQUEST), &[]);
    assert!(d.notify_tx(&mut dev));
    assert_eq!(d.tx_used(), 1);
    let (mut host, _) = listener.accept().unwrap();
    let got = d.received();
    assert_eq!(got.len(), 1);
    let (h, _) = &got[0];
    assert_eq!((h.op, h.src_cid, h.dst_cid), (OP_RESPONSE, HOST_CID, CID));
    assert_eq!((h.src_port, h.dst_port), (1024, 777));
    assert_eq!(h.buf_alloc, BUF_ALLOC);
    assert_eq!(dev.connections(), 1);

    // Guest to host.
    d.send(guest(777, 1024, OP_RW), b"hello from the guest");
    d.notify_tx(&mut dev);
    assert_eq!(read_exactly(&mut host, 20), b"hello from the guest");

    // Host to guest.
    host.write_all(b"hello from the host").unwrap();
    let got = pump(&mut d, &mut dev, 1);
    let data: Vec<u8> = got
        .iter()
        .filter(|(h, _)| h.op == OP_RW)
        .flat_map(|(_, b)| b.clone())
        .collect();
    assert_eq!(data, b"hello from the host");
    assert!(got
        .iter()
        .all(|(h, _)| h.dst_port == 777 && h.src_port == 1024));

    // The host closes: the guest hears both directions shut; its reset ends it.
    drop(host);
    let got = pump(&mut d, &mut dev, 1);
    assert!(
        got.iter()
            .any(|(h, _)| h.op == OP_SHUTDOWN && h.flags == SHUTDOWN_RCV | SHUTDOWN_SEND),
        "{got:?}"
    );
    d.send(guest(777, 1024, OP_RST), &[]);
    d.notify_tx(&mut dev);
    assert_eq!(dev.connections(), 0);
}

#[test]
fn a_host_connect_line_becomes_a_guest_request_and_ok_with_the_host_port() {
    let dir = tempfile::tempdir().unwrap();
    let m = mem();
    let mut d = Driver::new(&m);
    let mut dev = device(dir.path());
    d.give_rx(16, RX_BUF);

    let (mut host, got) = host_connects(&mut d, &mut dev, dir.path(), 5000);
    assert_eq!(got.len(), 1, "{got:?}");
    let req = got[0].0;
    assert_eq!((req.op, req.dst_port, req.dst_cid), (OP_REQUEST, 5000, CID));
    assert!(
        req.src_port >= 1 << 30,
        "host ports come from the high range"
    );

    // The guest accepts.
    let mut resp = guest(5000, req.src_port, OP_RESPONSE);
    resp.buf_alloc = 1 << 16;
    d.send(resp, &[]);
    d.notify_tx(&mut dev);
    assert_eq!(read_line(&mut host), format!("OK {}", req.src_port));

    host.write_all(b"ping").unwrap();
    let got = pump(&mut d, &mut dev, 1);
    assert_eq!(got[0].1, b"ping");
    d.send(guest(5000, req.src_port, OP_RW), b"pong");
    d.notify_tx(&mut dev);
    assert_eq!(read_exactly(&mut host, 4), b"pong");
}

/// Whether the device's host descriptor (its epoll set) has events, waiting `ms`.
fn host_ready(dev: &Vsock, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd: dev.host_fd().unwrap(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for the duration of the call.
    unsafe { libc::poll(&mut p, 1, ms) == 1 }
}

#[test]
fn a_guest_that_stops_sending_leaves_the_device_idle_until_the_host_acts() {
    // The agent's end of an exec: it sends its last frame, shuts its sending side and
    // waits for the host to close. Meanwhile nothing happens, and the device's thread
    // must sleep (a shutdown repeated at every socket event used to wake it at once,
    // again and again: a busy loop on the host's CPU).
    let dir = tempfile::tempdir().unwrap();
    let m = mem();
    let mut d = Driver::new(&m);
    let mut dev = device(dir.path());
    d.give_rx(16, RX_BUF);
    let (mut host, got) = host_connects(&mut d, &mut dev, dir.path(), 5000);
    let req = got[0].0;
    d.send(guest(5000, req.src_port, OP_RESPONSE), &[]);
    d.notify_tx(&mut dev);
    assert_eq!(read_line(&mut host), format!("OK {}", req.src_port));

    d.send(guest(5000, req.src_port, OP_RW), b"exit 0");
    let mut shut = guest(5000, req.src_port, OP_SHUTDOWN);
    shut.flags = SHUTDOWN_SEND;
    d.send(shut, &[]);
    d.notify_tx(&mut dev);
    assert_eq!(read_exactly(&mut host, 6), b"exit 0");
    let mut b = [0u8; 8];
    assert_eq!(host.read(&mut b).unwrap(), 0, "the host sees the end");

    // Take whatever events the above left, then expect none until the host acts.
    for _ in 0..3 {
        dev.process_host(&mut d.queues, d.m);
    }
    let mut wakeups = 0;
    for _ in 0..10 {
        if host_ready(&dev, 20) {
            wakeups += 1;
            dev.process_host(&mut d.queues, d.m);
        }
    }
    assert_eq!(wakeups, 0, "the device woke with nothing to do");
    assert_eq!(dev.connections(), 1, "the guest still receives");

    // The host closes: that is an event, and the guest hears of it.
    drop(host);
    assert!(host_ready(&dev, 1000));
    let got = pump(&mut d, &mut dev, 1);
    assert!(
        got.iter()
            .any(|(h, _)| h.op == OP_SHUTDOWN || h.op == OP_RST),
        "{got:?}"
    );
}

#[test]
fn a_guest_refusal_closes_the_host_connection() {
    let dir = tempfile::tempdir().unwrap();
    let m = mem();
    let mut d = Driver::new(&m);
    let mut dev = device(dir.path());
    d.give_rx(4, RX_BUF);
    let (mut host, got) = host_connects(&mut d, &mut dev, dir.path(), 9);
    let req = got[0].0;
    d.send(guest(9, req.src_port, OP_RST), &[]);
    d.notify_tx(&mut dev);
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 8];
    assert_eq!(host.read(&mut b).unwrap(), 0, "closed, no OK line");
    assert_eq!(dev.connections(), 0);
}

#[test]
fn bad_connect_lines_are_closed_without_reaching_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    let m = mem();
    let mut d = Driver::new(&m);
    let mut dev = device(dir.path());
    d.give_rx(4, RX_BUF);
    for line in [
        &b"HELLO\n"[..],
        b"CONNECT x\n",
        b"CONNECT 99999999999\n",
        &[b'A'; 100],
    ] {
        let mut host = UnixStream::connect(dir.path().join("v.sock")).unwrap();
        host.write_all(line).unwrap();
        let mut got = Vec::new();
        for _ in 0..10 {
            dev.process_host(&mut d.queues, d.m);
            got.extend(d.received());
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(got.is_empty(), "{line:?}: {got:?}");
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 8];
        assert_eq!(host.read(&mut b).unwrap_or(0), 0, "{line:?}: closed");
    }
    assert_eq!(dev.connections(), 0);
}

#[test]
fn only_this_user_can_reach_the_guest_through_the_host_socket() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let m = mem();
    let mut d = Driver::new(&m);
    let mut dev = device(dir.path());
    d.give_rx(4, RX_BUF);
    let sock = dir.path().join("v.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the socket is its owner's");
    if !nix_is_root() {
        eprintln!("skipped the other-user half: needs root to act as another user");
        return;
    }
    // Even with the socket and its directory opened to everyone, another user's
    // connection is refused by its credentials.
    for p in [dir.path(), sock.as_path()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let mut other = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "perl", "-MIO::Socket::UNIX"])
        .arg("-e")
        .arg(
            "$SIG{PIPE} = \"IGNORE\"; $SIG{ALRM} = sub { print \"open\"; exit }; alarm 30; \
             my $s = IO::Socket::UNIX->new(Peer => $ARGV[0]) or die \"connect: $!\\n\"; \
             print $s \"CONNECT 5000\\n\"; my $b; print(sysread($s, $b, 8) ? \"open\" : \"closed\");",
        )
        .arg(&sock)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Serve host events until the other user's program is done (it may start slowly:
    // the nested machine runs under emulation).
    let mut got = Vec::new();
    for _ in 0..6000 {
        dev.process_host(&mut d.queues, d.m);
        got.extend(d.received());
        if other.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = other.wait_with_output().unwrap();
    assert!(
        got.is_empty(),
        "another user's CONNECT reached the guest: {got:?}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "closed");
    assert_eq!(dev.connections(), 0);
    // This user still gets through.
    let (_host, got) = host_connects(&mut d, &mut dev, dir.path(), 5000);
    assert_eq!(got.len(), 1, "{got:?}");
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn a_request_to_a_port_nobody_listens_on_is_reset() {
    let dir = tempfile::tempdir().unwrap();
    let m = mem();
    let mut d = Driver::new(&m);
    let mut dev = device(dir.path());
    d.give_rx(4, RX_BUF);
    d.send(guest(1, 4444, OP_REQUEST), &[]);
    d.notify_tx(&mut dev);
    let got = d.received();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].0.op, got[0].0.dst_port), (OP_RST, 1));
    assert_eq!(dev.connections(), 0);
}

#[test]
fn host_data_never_exceeds_the_guest_credit() {
    let dir = tempfile::tempdir().unwrap();
    let listener = UnixListener::bind(dir.path().join("v.sock_7")).unwrap();
    let m = mem();
    let mut d = Driver::new(&m);
    let mut dev = device(dir.path());
    d.give_rx(64, RX_BUF);
    let mut req = guest(70, 7, OP_REQUEST);
    req.buf_alloc = 10_000;
    d.send(req, &[]);
    d.notify_tx(&mut dev);
    let (host, _) = listener.accept().unwrap();
    d.received();

    let blob: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    let writer = {
        let mut h = host.try_clone().unwrap();
        let blob = blob.clone();
        std::thread::spawn(move || h.write_all(&blob).unwrap())
    };
    let mut got = Vec::new();
    let mut fwd = 0u32;
    for _ in 0..2000 {
        let before = got.len();
        dev.process_host(&mut d.queues, &m);
        for (h, b) in d.received() {
            assert_eq!(h.op, OP_RW);
            got.extend(b);
        }
        assert!(
            got.len() as u32 - fwd <= 10_000,
            "{} bytes in flight with 10000 of credit",
            got.len() as u32 - fwd
        );
        if got.len() == blob.len() {
            break;
        }
        if got.len() == before {
            // The guest application read everything: announce the credit.
            fwd = got.len() as u32;
            let mut upd = guest(70, 7, OP_CREDIT_UPDATE);
            upd.buf_alloc = 10_000;
            upd.fwd_cnt = fwd;
            d.send(upd, &[]);
            d.notify_tx(&mut dev);
            if d.next_desc[1] > QSIZE - 4 {
                panic!("too many credit rounds");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    writer.join().unwrap();
    assert_eq!(got, blob);
    drop(host.shutdown(std::net::Shutdown::Both));
}

#[test]
fn host_data_waits_for_receive_buffers_and_flows_when_the_guest_adds_them() {
    let dir = tempfile::tempdir().unwrap();
    let listener = UnixListener::bind(dir.path().join("v.sock_6")).unwrap();
    let m = mem();
    let mut d = Driver::new(&m);
    let mut dev = device(dir.path());
    d.give_rx(1, RX_BUF); // room for the response only
    d.send(guest(60, 6, OP_REQUEST), &[]);
    d.notify_tx(&mut dev);
    let (mut host, _) = listener.accept().unwrap();
    assert_eq!(d.received()[0].0.op, OP_RESPONSE);
    host.write_all(b"queued until there is room").unwrap();
    for _ in 0..5 {
        dev.process_host(&mut d.queues, &m);
    }
    assert!(d.received().is_empty(), "no buffer, nothing delivered");
    d.give_rx(1, RX_BUF);
    assert!(d.notify_rx(&mut dev), "the new buffer is used at once");
    let got = d.received();
    assert_eq!(got[0].1, b"queued until there is room");
}

#[test]
fn a_credit_request_is_answered_with_the_forwarded_count() {
    let dir = tempfile::tempdir().unwrap();
    let listener = UnixListener::bind(dir.path().join("v.sock_8")).unwrap();
    let m = mem();
    let mut d = Driver::new(&m);
    let mut dev = device(dir.path());
    d.give_rx(8, RX_BUF);
    d.send(guest(80, 8, OP_REQUEST), &[]);
    d.notify_tx(&mut dev);
    let (mut host, _) = listener.accept().unwrap();
    d.received();
    d.send(guest(80, 8, OP_RW), &[7u8; 1000]);
    d.send(guest(80, 8, OP_CREDIT_REQUEST), &[]);
    d.notify_tx(&mut dev);
    assert_eq!(read_exactly(&mut host, 1000), vec![7u8; 1000]);
    let got = d.received();
    let upd = got
        .iter()
        .find(|(h, _)| h.op == OP_CREDIT_UPDATE)
        .expect("a credit update");
    assert_eq!(upd.0.fwd_cnt, 1000);
    assert_eq!(upd.0.buf_alloc, BUF_ALLOC);
}

#[test]
fn hostile_packets_get_resets_or_are_dropped_and_nothing_panics() {
    let dir = tempfile::tempdir().unwrap();
    let listener = UnixListener::bind(dir.path().join("v.sock_1")).unwrap();
    let m = mem();
    let mut d = Driver::new(&m);
    let mut dev = device(dir.path());
    d.give_rx(64, RX_BUF);
    d.send(guest(10, 1, OP_REQUEST), &[]);
    d.notify_tx(&mut dev);
    let (mut host, _) = listener.accept().unwrap();
    d.received();

    // A stranger's cid, a foreign destination, a datagram, an unknown op, data for no
    // connection, a header claiming more payload than its chain holds, and one beyond
    // the 64 KiB limit: each answered with a reset to its sender.
    let mut spoofed = guest(11, 1, OP_REQUEST);
    spoofed.src_cid = 99;
    let mut elsewhere = guest(12, 1, OP_REQUEST);
    elsewhere.dst_cid = 4;
    let mut dgram = guest(13, 1, OP_REQUEST);
    dgram.type_ = 2;
    let unknown = guest(10, 1, 42);
    let stray = guest(14, 1, OP_RW);
    d.send(spoofed, &[]);
    d.send(elsewhere, &[]);
    d.send(dgram, &[]);
    d.send(stray, b"x");
    let mut lying = guest(15, 1, OP_RW);
    lying.len = 5000;
    d.send(lying, &[0u8; 100]);
    let mut huge = guest(16, 1, OP_RW);
    huge.len = (MAX_PAYLOAD + 1) as u32;
    d.send(huge, &[]);
    d.notify_tx(&mut dev);
    let got = d.received();
    assert_eq!(got.len(), 6, "{got:?}");
    assert!(got.iter().all(|(h, _)| h.op == OP_RST), "{got:?}");
    let ports: Vec<u32> = got.iter().map(|(h, _)| h.dst_port).collect();
    assert_eq!(ports, vec![11, 12, 13, 14, 15, 16]);
    assert_eq!(dev.connections(), 1, "the real connection is untouched");

    // Chains that cannot hold a header: too short, device-writable, outside memory, a
    // header split short over two descriptors. Completed, nothing else happens.
    let a = d.buf(64);
    d.send_raw(&[(a, 10, 0)]);
    d.send_raw(&[(a, 64, WRITE)]);
    d.send_raw(&[(0x7fff_0000_0000, 64, 0)]);
    d.send_raw(&[(a, 20, 0), (a, 20, 0)]);
    let before = d.tx_used();
    d.notify_tx(&mut dev);
    assert_eq!(d.tx_used() - before, 4);
    assert!(d.received().is_empty());

    // An unknown op on the live connection resets it.
    d.send(unknown, &[]);
    d.notify_tx(&mut dev);
    let got = d.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, OP_RST);
    assert_eq!(dev.connections(), 0);
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(
        host.read(&mut [0u8; 4]).unwrap_or(0),
        0,
        "the host side is closed"
    );
}

#[test]
fn a_guest_overrunning_the_device_credit_loses_its_connection() {
    let dir = tempfile::tempdir().unwrap();
    let listener = UnixListener::bind(dir.path().join("v.sock_2")).unwrap();
    let m = mem();
    let mut d = Driver::new(&m);
    let mut dev = device(dir.path());
    d.give_rx(128, RX_BUF);
    d.send(guest(20, 2, OP_REQUEST), &[]);
    d.notify_tx(&mut dev);
    let (_host, _) = listener.accept().unwrap(); // never reads
    d.received();
    let chunk = vec![1u8; MAX_PAYLOAD];
    // The host socket buffer takes some; the device buffers up to its credit, then resets.
    for _ in 0..((BUF_ALLOC as usize / MAX_PAYLOAD) + 64) {
        d.send(guest(20, 2, OP_RW), &chunk);
        d.notify_tx(&mut dev);
        if dev.connections() == 0 {
            break;
        }
    }
    assert_eq!(dev.connections(), 0);
    assert!(d.received().iter().any(|(h, _)| h.op == OP_RST));
}

#[test]
fn receive_buffers_too_small_for_a_header_are_returned_empty() {
    let dir = tempfile::tempdir().unwrap();
    let m = mem();
    let mut d = Driver::new(&m);
    let mut dev = device(dir.path());
    d.give_rx(2, 10);
    d.give_rx(1, RX_BUF);
    d.send(guest(1, 4444, OP_REQUEST), &[]); // refused: a reset to deliver
    d.notify_tx(&mut dev);
    let got = d.received();
    assert_eq!(got.len(), 3);
    assert_eq!(got[0].0, Header::default());
    assert_eq!(got[1].0, Header::default());
    assert_eq!(got[2].0.op, OP_RST);
}

#[test]
fn a_device_reset_drops_every_connection() {
    let dir = tempfile::tempdir().unwrap();
    let listener = UnixListener::bind(dir.path().join("v.sock_3")).unwrap();
    let m = mem();
    let mut d = Driver::new(&m);
    let mut dev = device(dir.path());
    d.give_rx(8, RX_BUF);
    d.send(guest(30, 3, OP_REQUEST), &[]);
    d.notify_tx(&mut dev);
    let (mut host, _) = listener.accept().unwrap();
    assert_eq!(dev.connections(), 1);
    dev.reset();
    assert_eq!(dev.connections(), 0);
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(host.read(&mut [0u8; 4]).unwrap_or(0), 0);
}
