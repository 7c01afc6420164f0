//! `boxlet vm run` end to end: an image built with `boxlet ext4 build --agent`, a qcow2
//! overlay from `boxlet qcow2 create`, a boot on the QEMU backend, stdin in, output and
//! the exit code out. Needs `make setup` (kernel, daemons) and BOXLET_AGENT.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

mod common;

fn boxlet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_boxlet"))
}

fn box_tree() -> PathBuf {
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/rootfs/busybox-box.sh"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn vm_run_streams_stdin_and_output_and_exits_with_the_command_code() {
    assert!(
        std::env::var_os("BOXLET_AGENT").is_some(),
        "BOXLET_AGENT: the static agent (`make test` sets it)"
    );
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.ext4");
    let disk = dir.path().join("box.qcow2");
    ok(boxlet()
        .args(["ext4", "build"])
        .arg(&base)
        .arg("--dir")
        .arg(box_tree())
        .arg("--agent"));
    ok(boxlet()
        .args(["ext4", "cat"])
        .arg(&base)
        .arg("/boxlet/bin/boxlet-guest"));
    ok(boxlet().args(["qcow2", "create"]).arg(&disk).args([
        "--backing",
        "base.ext4",
        "--backing-format",
        "raw",
    ]));
    let mut cmd = boxlet();
    cmd.args(["vm", "run", "--disk"]).arg(&disk).args([
        "--",
        "sh",
        "-c",
        "tr a-z A-Z; echo to-stderr >&2; exit 5",
    ]);
    let out = common::with_stdin(cmd, b"piped through the guest\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert_eq!(out.stdout, b"PIPED THROUGH THE GUEST\n");
    assert!(stderr.contains("to-stderr"), "{stderr}");

    // A directory root (over virtio-fs), read-only use: nothing in it changes.
    let out = boxlet()
        .args(["vm", "run", "--fs"])
        .arg(box_tree())
        .args(["--", "cat", "/etc/motd"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"boxlet test root\n");
    assert!(!box_tree().join("boxlet").exists());
}

#[test]
fn vm_run_refuses_bad_input_with_one_line() {
    let out = boxlet()
        .args(["vm", "run", "--disk", "/no/such.img", "--", "true"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("/no/such.img") && e.lines().count() == 1, "{e}");
    let out = boxlet()
        .args([
            "vm",
            "run",
            "--backend",
            "kvm",
            "--disk",
            "/no/such.img",
            "--",
            "true",
        ])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    if boxlet_kvm::probe::cached().usable {
        // KVM boots Linux here: the backend starts and the disk is what is wrong.
        assert!(e.contains("/no/such.img"), "{e}");
    } else {
        // Not here (this project's machines): the probe's reason and the alternative.
        assert!(
            e.contains("kvm backend cannot run on this host") && e.contains("--backend qemu"),
            "{e}"
        );
        assert_eq!(e.lines().count(), 1, "{e}");
    }
}

#[test]
fn software_emulation_is_used_only_when_asked_for() {
    let hardware = ["kvm_intel", "kvm_amd"]
        .iter()
        .any(|m| std::path::Path::new("/sys/module").join(m).exists());
    let args = [
        "vm",
        "run",
        "--backend",
        "qemu",
        "--disk",
        "/no/such.img",
        "--",
        "true",
    ];
    for how in [("BOXLET_ACCEL", "auto"), ("BOXLET_ACCEL", "kvm")] {
        let out = boxlet().env(how.0, how.1).args(args).output().unwrap();
        assert!(!out.status.success());
        let e = String::from_utf8_lossy(&out.stderr);
        if hardware {
            assert!(e.contains("/no/such.img"), "{e}");
        } else {
            // No silent fall back to TCG: the reason, and how to ask for emulation.
            assert!(e.contains("no hardware acceleration"), "{e}");
            assert!(
                e.contains("--accel tcg") && e.contains("weaker boundary"),
                "{e}"
            );
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }
    // The option overrides the environment; tcg gets as far as the disk.
    let out = boxlet()
        .env("BOXLET_ACCEL", "auto")
        .args(["vm", "run", "--accel", "tcg"])
        .args(&args[2..])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("/no/such.img"), "{e}");
    let out = boxlet()
        .args(["vm", "run", "--accel", "fast"])
        .args(&args[2..])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("fast"), "{e}");
}
