//! boxlet-vmm's seccomp filters end to end: a thread that makes a call outside its filter
//! (the VMM's test hook, `BOXLET_VMM_TEST_FORBIDDEN`) stops the VM, and the runtime
//! reports a sandbox violation naming the thread. Every other KVM test runs the VMM
//! filtered, which is what shows the filters allow what a VM needs.
//!
//! One test in its own executable: it sets the hook in the environment the VMM inherits.

use std::time::Duration;

use boxlet::hypervisor::{Hypervisor, VmExit, VsockSpec};

mod common;
use common::{backend, spec};

#[tokio::test]
#[ignore = "needs a KVM that boots Linux: make test-nested"]
async fn a_forbidden_system_call_in_any_thread_stops_the_vm_and_is_reported() {
    let hv = backend();
    for role in ["vcpu", "device", "main"] {
        // SAFETY: the only test of this executable, on a current-thread runtime: no other
        // thread reads the environment meanwhile.
        unsafe { std::env::set_var("BOXLET_VMM_TEST_FORBIDDEN", role) };
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path(), "/bin/busybox sleep 30", 1);
        // A device (and so a device thread) to misbehave in.
        s.vsock = Some(VsockSpec {
            cid: 3,
            uds_path: boxlet::process::vm_dir(dir.path()).join("vsock.sock"),
        });
        let mut vm = hv.create(s).await.unwrap();
        let exit = tokio::time::timeout(Duration::from_secs(60), vm.wait())
            .await
            .expect("the VM ended")
            .unwrap();
        match exit {
            VmExit::SandboxViolation(why) => assert!(
                why.contains(&format!("the {role} thread made system call 101,")),
                "{role}: {why}"
            ),
            other => panic!("{role}: {other:?}"),
        }
    }
    // SAFETY: as above.
    unsafe { std::env::remove_var("BOXLET_VMM_TEST_FORBIDDEN") };
    // Without the hook the same VM runs until stopped.
    let dir = tempfile::tempdir().unwrap();
    common::runs_until_stopped(&hv, dir.path()).await;
}
