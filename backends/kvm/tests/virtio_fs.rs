//! virtio-fs on the host (no KVM): the VMM's vhost-user frontend hands a real
//! `virtiofsd` the guest memory (a memfd) and the queues the way the driver set them up,
//! and FUSE requests placed in those queues, as the guest kernel would, come back
//! answered from the shared directory. Also: reset and re-activation, hostile queue
//! addresses, bad tags and a missing daemon.

use std::path::{Path, PathBuf};

mod common;

use boxlet::hypervisor::ShareSpec;
use boxlet::process::{start_daemon, virtiofsd_command, GuestIds};
use boxlet_kvm::virtio::fs::Fs;
use boxlet_kvm::virtio::mmio::MmioTransport;
use common::{reg, set, Ring};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const FUSE_LOOKUP: u32 = 1;
const FUSE_INIT: u32 = 26;
const ROOT: u64 = 1;
const STATUS_OK: u32 = 1 | 2 | 8 | 4;
const NEEDS_RESET: u32 = 0x40;
/// Where the two queues' rings live, and the request and reply buffers.
const RINGS: [u64; 2] = [0x1_0000, 0x5_0000];
const REQ: u64 = 0x10_0000;
const REPLY: u64 = 0x20_0000;

fn virtiofsd() -> PathBuf {
    boxlet::process::find_program("virtiofsd")
        .expect("virtiofsd not found: `make setup` installs it")
}

/// A virtiofsd sharing `dir` on a socket in `run`.
struct Daemon {
    _child: tokio::process::Child,
    socket: PathBuf,
    _rt: tokio::runtime::Runtime,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.socket.with_file_name("virtiofsd.log");
            eprintln!(
                "virtiofsd's log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
    }
}

fn daemon(dir: &Path, run: &Path) -> Daemon {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let socket = run.join("fs.sock");
    let share = ShareSpec {
        tag: "share".into(),
        host_path: dir.to_path_buf(),
        read_only: false,
        exclusive: false,
        ids: boxlet::ShareIds::Host,
    };
    let child = rt.block_on(async {
        let cmd = virtiofsd_command(&virtiofsd(), &share, &socket, GuestIds::AsIs);
        start_daemon(
            "test",
            "virtiofsd",
            cmd,
            &socket,
            &run.join("virtiofsd.log"),
        )
        .await
        .unwrap()
    });
    Daemon {
        _child: child,
        socket,
        _rt: rt,
    }
}

/// A driver's bring-up: take every offered feature, then queue `i` at `rings[i]`
/// (or at the given addresses), DRIVER_OK.
fn bring_up(t: &mut MmioTransport, queues: &[(u64, u64, u64)]) {
    set(t, 0x70, 0);
    set(t, 0x70, 1 | 2);
    for sel in 0..2 {
        set(t, 0x14, sel);
        let offered = reg(t, 0x10);
        set(t, 0x24, sel);
        set(t, 0x20, offered);
    }
    set(t, 0x70, 1 | 2 | 8);
    for (i, &(desc, avail, used)) in queues.iter().enumerate() {
        set(t, 0x30, i as u32);
        set(t, 0x38, 16);
        for (off, addr) in [(0x80, desc), (0x90, avail), (0xa0, used)] {
            set(t, off, addr as u32);
            set(t, off + 4, (addr >> 32) as u32);
        }
        set(t, 0x44, 1);
    }
    set(t, 0x70, STATUS_OK);
}

/// A FUSE request: the 40-byte in-header, then `body`.
fn request(m: &GuestMemoryMmap, opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> u32 {
    let len = 40 + body.len() as u32;
    let mut h = Vec::with_capacity(len as usize);
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&opcode.to_le_bytes());
    h.extend_from_slice(&unique.to_le_bytes());
    h.extend_from_slice(&nodeid.to_le_bytes());
    h.extend_from_slice(&[0u8; 16]); // uid, gid, pid: root; no extensions
    h.extend_from_slice(body);
    m.write_slice(&h, GuestAddress(REQ)).unwrap();
    len
}

fn init_body() -> Vec<u8> {
    let mut b = vec![0u8; 64];
    b[..4].copy_from_slice(&7u32.to_le_bytes()); // major
    b[4..8].copy_from_slice(&31u32.to_le_bytes()); // minor
    b
}

/// Put the request in queue `vq` (slot `at`), let `send` notify, wait for the daemon's
/// interrupt, and return the reply (out-header and body).
fn round_trip(
    t: &mut MmioTransport,
    m: &GuestMemoryMmap,
    vq: &Ring<'_>,
    at: u16,
    len: u32,
    send: impl FnOnce(&mut MmioTransport),
) -> Vec<u8> {
    m.write_slice(&[0u8; 4096], GuestAddress(REPLY)).unwrap();
    let before = vq.used_idx();
    // With EVENT_IDX the driver asks to be interrupted for the next used buffer.
    vq.set_used_event(before);
    vq.push(at, &[(REQ, len, false), (REPLY, 4096, true)]);
    send(t);
    // Wait (bounded, so a broken daemon fails the test instead of hanging it) for the
    // call eventfd, then let the transport turn it into an interrupt.
    let fd = t.host_fd().expect("virtio-fs has a call eventfd");
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd on a descriptor the device keeps open.
    let r = unsafe { libc::poll(&mut p, 1, 20_000) };
    assert_eq!(r, 1, "virtiofsd answered (used index {})", vq.used_idx());
    t.process_host();
    assert_eq!(reg(t, 0x60) & 1, 1, "used-ring interrupt status");
    set(t, 0x64, 1);
    assert_eq!(vq.used_idx(), before + 1, "one request used");
    let (id, used_len) = vq.used(before);
    assert_eq!(id, u32::from(at));
    let mut out = vec![0u8; used_len as usize];
    m.read_slice(&mut out, GuestAddress(REPLY)).unwrap();
    let out_len = u32::from_le_bytes(out[..4].try_into().unwrap());
    assert_eq!(out_len, used_len, "the used length is the reply's");
    out
}

fn error(reply: &[u8]) -> i32 {
    i32::from_le_bytes(reply[4..8].try_into().unwrap())
}

fn unique(reply: &[u8]) -> u64 {
    u64::from_le_bytes(reply[8..16].try_into().unwrap())
}

fn lookup(
    t: &mut MmioTransport,
    m: &GuestMemoryMmap,
    vq: &Ring<'_>,
    at: u16,
    name: &str,
    kick: &EventFd,
) -> Vec<u8> {
    let mut body = name.as_bytes().to_vec();
    body.push(0);
    let len = request(m, FUSE_LOOKUP, 100 + u64::from(at), ROOT, &body);
    // The notification as KVM delivers it: straight to the queue's ioeventfd.
    round_trip(t, m, vq, at, len, |_| kick.write(1).unwrap())
}

/// fuse_entry_out after the 16-byte out-header: attr.size at 48, attr.mode at 100.
fn size_and_mode(reply: &[u8]) -> (u64, u32) {
    let size = u64::from_le_bytes(reply[16 + 48..16 + 56].try_into().unwrap());
    let mode = u32::from_le_bytes(reply[16 + 100..16 + 104].try_into().unwrap());
    (size, mode)
}

#[test]
fn fuse_requests_in_the_guest_queues_are_answered_by_virtiofsd() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello.txt"), b"hello, world\n").unwrap();
    let run = tempfile::tempdir().unwrap();
    let d = daemon(dir.path(), run.path());
    let m = boxlet_kvm::vmm::guest_memory(64 << 20).unwrap();
    let kicks: Vec<EventFd> = (0..2)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let fs = Fs::connect(&d.socket, "share").unwrap();
    let mut t = MmioTransport::new(Box::new(fs), m.clone(), irq.try_clone().unwrap())
        .with_kicks(kicks.iter().map(|k| k.try_clone().unwrap()).collect());
    assert!(t.external(), "the daemon serves the queues");
    assert_eq!(reg(&mut t, 0x8), 26, "a file system device");
    let mut tag = [0u8; 40];
    t.read(0x100, &mut tag);
    assert_eq!(&tag[..6], b"share\0");
    assert_eq!(
        u32::from_le_bytes(tag[36..].try_into().unwrap()),
        1,
        "request queues"
    );
    set(&mut t, 0x14, 0);
    assert_eq!(
        reg(&mut t, 0x10) & (1 << 30),
        0,
        "vhost-user's own bit is not offered"
    );

    let hiprio = Ring::new(&m, RINGS[0]);
    let req = Ring::new(&m, RINGS[1]);
    bring_up(&mut t, &[hiprio.addrs(), req.addrs()]);
    assert_eq!(
        reg(&mut t, 0x70),
        STATUS_OK,
        "activated, not marked for reset"
    );

    // FUSE_INIT, notified through the register (the transport passes it on).
    let len = request(&m, FUSE_INIT, 7, 0, &init_body());
    let reply = round_trip(&mut t, &m, &req, 0, len, |t| set(t, 0x50, 1));
    assert_eq!(error(&reply), 0, "INIT succeeded");
    assert_eq!(unique(&reply), 7);
    assert_eq!(
        u32::from_le_bytes(reply[16..20].try_into().unwrap()),
        7,
        "FUSE major 7"
    );
    assert!(irq.read().is_ok(), "the guest was interrupted");

    // A file of the shared directory, and one that is not there.
    let reply = lookup(&mut t, &m, &req, 2, "hello.txt", &kicks[1]);
    assert_eq!(error(&reply), 0);
    assert_eq!(unique(&reply), 102);
    let (size, mode) = size_and_mode(&reply);
    assert_eq!(size, 13, "the host file's size");
    assert_eq!(mode & libc::S_IFMT, libc::S_IFREG);
    let reply = lookup(&mut t, &m, &req, 4, "absent", &kicks[1]);
    assert_eq!(error(&reply), -libc::ENOENT);

    // The driver resets the device (the daemon's rings stop) and brings it up again on
    // fresh rings: requests work as before.
    set(&mut t, 0x70, 0);
    assert_eq!(reg(&mut t, 0x70), 0);
    let hiprio = Ring::new(&m, 0x3_0000);
    let req = Ring::new(&m, 0x4_0000);
    bring_up(&mut t, &[hiprio.addrs(), req.addrs()]);
    assert_eq!(reg(&mut t, 0x70), STATUS_OK);
    std::fs::write(dir.path().join("later"), vec![1u8; 5000]).unwrap();
    let reply = lookup(&mut t, &m, &req, 0, "later", &kicks[1]);
    assert_eq!(error(&reply), 0);
    assert_eq!(size_and_mode(&reply).0, 5000);
}

#[test]
fn rings_outside_guest_memory_never_reach_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let run = tempfile::tempdir().unwrap();
    let d = daemon(dir.path(), run.path());
    let m = boxlet_kvm::vmm::guest_memory(64 << 20).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let kicks = (0..2)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect();
    let fs = Fs::connect(&d.socket, "share").unwrap();
    let mut t = MmioTransport::new(Box::new(fs), m.clone(), irq).with_kicks(kicks);
    // The request queue's used ring lies past the end of guest memory.
    let hiprio = Ring::new(&m, RINGS[0]);
    let beyond = 1u64 << 40;
    bring_up(
        &mut t,
        &[hiprio.addrs(), (RINGS[1], RINGS[1] + 0x1000, beyond)],
    );
    assert_ne!(reg(&mut t, 0x70) & NEEDS_RESET, 0, "DEVICE_NEEDS_RESET");
    assert_eq!(reg(&mut t, 0x60) & 2, 2, "config interrupt");
    // A reset and a proper bring-up recover the device.
    let req = Ring::new(&m, RINGS[1]);
    bring_up(&mut t, &[hiprio.addrs(), req.addrs()]);
    assert_eq!(reg(&mut t, 0x70), STATUS_OK);
    let len = request(&m, FUSE_INIT, 9, 0, &init_body());
    let reply = round_trip(&mut t, &m, &req, 0, len, |t| set(t, 0x50, 1));
    assert_eq!(error(&reply), 0);
}

#[test]
fn bad_tags_and_missing_daemons_are_errors_naming_them() {
    let run = tempfile::tempdir().unwrap();
    let nowhere = run.path().join("nobody-listens.sock");
    let e = Fs::connect(&nowhere, "share").unwrap_err();
    assert!(e.contains("nobody-listens.sock"), "{e}");
    for tag in ["", "a-tag-much-longer-than-thirty-six-bytes", "nul\0"] {
        let e = Fs::connect(&nowhere, tag).unwrap_err();
        assert!(e.contains("tag"), "{tag:?}: {e}");
    }
}

#[test]
fn a_daemon_that_never_answers_fails_the_device_instead_of_hanging_it() {
    let run = tempfile::tempdir().unwrap();
    let socket = run.path().join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    // Accepts, reads what it is sent, and never answers.
    let silent = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut conn, &mut sink);
    });
    let e = Fs::connect_within(&socket, "share", std::time::Duration::from_secs(1)).unwrap_err();
    assert!(e.contains("did not answer"), "{e}");
    assert!(e.contains("silent.sock"), "{e}");
    // The cut connection ended the daemon's side too.
    silent.join().unwrap();
}
