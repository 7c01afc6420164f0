//! boxlet's VMM booting the guest kernel, through the `Hypervisor` trait.
//!
//! These need a KVM that can boot Linux. On this project's development machines /dev/kvm
//! is a software hypervisor that cannot, so they run inside the nested test machine
//! (`make test-nested`, which passes `--include-ignored`); on a host with real KVM, run
//! them with `cargo test -p boxlet-kvm -- --include-ignored`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use boxlet::hypervisor::{Hypervisor, VmExit, VmSpec};
use boxlet::initramfs::Initramfs;
use boxlet_kvm::KvmBackend;

const NEEDS_KVM: &str = "needs a KVM that boots Linux: make test-nested";

fn kernel() -> PathBuf {
    if let Some(k) = std::env::var_os("BOXLET_KERNEL") {
        return k.into();
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/kernel/build.sh");
    let out = Command::new("bash")
        .arg(script)
        .env("BOXLET_KERNEL_CACHED_ONLY", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "no guest kernel: make setup");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn backend() -> KvmBackend {
    // Test binaries live in target/<profile>/deps; boxlet-vmm one level up.
    if std::env::var_os("BOXLET_VMM").is_none() {
        let exe = std::env::current_exe().unwrap();
        let vmm = exe.parent().unwrap().parent().unwrap().join("boxlet-vmm");
        std::env::set_var("BOXLET_VMM", vmm);
    }
    KvmBackend::new().unwrap()
}

/// A VM whose init is `script` (run by busybox sh from an initramfs).
fn spec(dir: &Path, script: &str, vcpus: u8) -> VmSpec {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static (make setup)");
    let mut i = Initramfs::new();
    i.dir("bin", 0o755)
        .file("bin/busybox", 0o755, &busybox)
        .dir("dev", 0o755)
        .char_dev("dev/console", 0o600, 5, 1)
        .file(
            "init",
            0o755,
            format!("#!/bin/busybox sh\n{script}\n").as_bytes(),
        );
    let initrd = dir.join("initrd.cpio");
    std::fs::write(&initrd, i.finish()).unwrap();
    VmSpec {
        name: "l2".into(),
        vcpus,
        memory_mib: 256,
        kernel: kernel(),
        initrd: Some(initrd),
        cmdline: "console=ttyS0 reboot=t panic=-1 quiet 8250.nr_uarts=1 rdinit=/init".into(),
        disks: Vec::new(),
        shares: Vec::new(),
        vsock: None,
        console_log: dir.join("console.log"),
        run_dir: dir.to_path_buf(),
    }
}

#[tokio::test]
#[ignore = "needs a KVM that boots Linux: make test-nested"]
async fn the_guest_kernel_boots_to_its_init_and_resets() {
    let _ = NEEDS_KVM;
    let dir = tempfile::tempdir().unwrap();
    let hv = backend();
    let s = spec(
        dir.path(),
        "/bin/busybox echo boxlet-l2-init-ran $(/bin/busybox nproc)\n/bin/busybox reboot -f",
        2,
    );
    let mut vm = hv.create(s).await.unwrap();
    let exit = vm.wait().await.unwrap();
    let console = std::fs::read_to_string(dir.path().join("console.log")).unwrap();
    assert_eq!(exit, VmExit::Shutdown, "{console}");
    assert!(console.contains("boxlet-l2-init-ran"), "{console}");
}

#[tokio::test]
#[ignore = "needs a KVM that boots Linux: make test-nested"]
async fn a_guest_panic_and_a_killed_vmm_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let hv = backend();
    // init exits: the kernel panics.
    let mut vm = hv.create(spec(dir.path(), "exit 0", 1)).await.unwrap();
    match vm.wait().await.unwrap() {
        VmExit::GuestPanic(line) => assert!(line.contains("kill init"), "{line}"),
        other => panic!("{other:?}"),
    }
    // A guest that never ends, stopped from the host.
    let dir = tempfile::tempdir().unwrap();
    let mut vm = hv
        .create(spec(
            dir.path(),
            "while :; do /bin/busybox sleep 1; done",
            1,
        ))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        vm.stop(Duration::from_secs(1)).await.unwrap(),
        VmExit::Stopped
    );
}

#[tokio::test]
async fn specs_it_cannot_serve_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let hv = backend();
    let mut s = spec(dir.path(), "true", 1);
    s.shares.push(boxlet::hypervisor::ShareSpec {
        tag: "x".into(),
        host_path: "/".into(),
        read_only: true,
    });
    let e = hv.create(s).await.unwrap_err();
    assert!(e.to_string().contains("directory shares"), "{e}");
}
