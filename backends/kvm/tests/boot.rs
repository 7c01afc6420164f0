//! boxlet's VMM booting the guest kernel, through the `Hypervisor` trait.
//!
//! These need a KVM that can boot Linux. On this project's development machines /dev/kvm
//! is a software hypervisor that cannot, so they run inside the nested test machine
//! (`make test-nested`, which passes `--include-ignored`); on a host with real KVM, run
//! them with `cargo test -p boxlet-kvm -- --include-ignored`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use boxlet::hypervisor::{Hypervisor, VmExit};
use boxlet_testkit as kit;

mod common;
use common::{backend, spec};

const NEEDS_KVM: &str = "needs a KVM that boots Linux: make test-nested";

/// Wait for `vm` to end, stopping it after two minutes (a hang guard, not a speed
/// limit: boots here take seconds) and showing its console then.
async fn wait(vm: &mut Box<dyn boxlet::hypervisor::Vm>, console: &Path) -> VmExit {
    match tokio::time::timeout(Duration::from_secs(60), vm.wait()).await {
        Ok(exit) => exit.unwrap(),
        Err(_) => {
            // Ask the VMM for its vCPUs' registers (SIGUSR1) before stopping it.
            let dir = console.parent().unwrap().to_str().unwrap().to_owned();
            let _ = Command::new("pkill")
                .args(["-USR1", "-f", &format!("boxlet-vmm {dir}")])
                .status();
            tokio::time::sleep(Duration::from_secs(2)).await;
            let _ = vm.stop(Duration::from_secs(1)).await;
            let stderr = console
                .parent()
                .map(|d| d.join("vmm.stderr"))
                .unwrap_or_default();
            // The console without the kernel's long CPUID dumps.
            let text = std::fs::read_to_string(console).unwrap_or_default();
            let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with("CPUID[")).collect();
            panic!(
                "the VM hung; console:\n{}\nvmm stderr:\n{}",
                lines[lines.len().saturating_sub(60)..].join("\n"),
                std::fs::read_to_string(stderr).unwrap_or_default()
            );
        }
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
    let exit = wait(&mut vm, &dir.path().join("console.log")).await;
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
    match wait(&mut vm, &dir.path().join("console.log")).await {
        VmExit::GuestPanic(line) => assert!(line.contains("kill init"), "{line}"),
        other => panic!("{other:?}"),
    }
    // A guest that never ends, stopped from the host.
    let dir = tempfile::tempdir().unwrap();
    common::runs_until_stopped(&hv, dir.path()).await;
}

#[tokio::test]
async fn a_share_of_a_missing_directory_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let hv = backend();
    let mut s = spec(dir.path(), "true", 1);
    let missing = dir.path().join("no-such-dir");
    s.shares.push(boxlet::hypervisor::ShareSpec {
        tag: "x".into(),
        host_path: missing.clone(),
        read_only: true,
        exclusive: false,
        ids: boxlet::ShareIds::Host,
    });
    let e = hv.create(s).await.unwrap_err().to_string();
    assert!(e.contains("virtiofsd"), "{e}");
    assert!(e.contains(missing.to_str().unwrap()), "{e}");
}

#[tokio::test]
#[ignore = "needs a KVM that boots Linux: make test-nested"]
async fn an_ext4_root_on_a_qcow2_overlay_keeps_its_writes() {
    let dir = tempfile::tempdir().unwrap();
    let hv = backend();
    // The base: the busybox tree with an init that shows and then extends its state.
    let mut tree = boxlet_ext4::Tree::from_dir(&kit::box_tree()).unwrap();
    let init = "#!/bin/sh\nmount -t proc proc /proc\necho boxlet-l2-state: $(cat /state 2>/dev/null || echo none)\necho written >> /state\nsync\nreboot -f\n";
    tree.put(
        "/boxlet-test-init",
        boxlet_ext4::Node {
            kind: boxlet_ext4::NodeKind::File(boxlet_ext4::FileData::Bytes(
                init.as_bytes().to_vec(),
            )),
            meta: boxlet_ext4::NodeMeta {
                mode: 0o755,
                ..Default::default()
            },
        },
    )
    .unwrap();
    let base = dir.path().join("base.ext4");
    boxlet_ext4::build_file(&tree, &base, &boxlet_ext4::BuildOptions::default()).unwrap();
    let before = std::fs::read(&base).unwrap();
    let overlay = dir.path().join("box.qcow2");
    boxlet_qcow2::create(
        &overlay,
        &boxlet_qcow2::CreateOptions::overlay("base.ext4", boxlet_qcow2::BackingFormat::Raw),
    )
    .unwrap();
    let boot = |n: u32| {
        let mut s = spec(dir.path(), "", 1);
        s.initrd = None;
        s.console_log = dir.path().join(format!("console{n}.log"));
        s.cmdline = "console=ttyS0 reboot=t panic=-1 8250.nr_uarts=1 root=/dev/vda rw \
                     rootfstype=ext4 init=/boxlet-test-init"
            .into();
        s.disks = vec![boxlet::hypervisor::DiskSpec {
            path: overlay.clone(),
            format: boxlet::hypervisor::DiskFormat::Qcow2,
            read_only: false,
        }];
        s
    };
    for (n, want) in [(1, "none"), (2, "written")] {
        let s = boot(n);
        let log = s.console_log.clone();
        let mut vm = hv.create(s).await.unwrap();
        let exit = wait(&mut vm, &log).await;
        let console = std::fs::read_to_string(&log).unwrap();
        assert_eq!(exit, VmExit::Shutdown, "{console}");
        assert!(
            console.contains(&format!("boxlet-l2-state: {want}")),
            "boot {n}: {console}"
        );
    }
    assert!(
        std::fs::read(&base).unwrap() == before,
        "the base never changes"
    );
}
