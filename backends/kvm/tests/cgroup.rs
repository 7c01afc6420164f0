//! A VM's cgroup end to end: a VMM that takes more host memory than its VM's limit (the
//! VMM's test hook, `BOXLET_VMM_TEST_ALLOCATE_MIB`) is stopped by the kernel and reported
//! as such, while another VM beside it runs on.
//!
//! One test in its own executable: it sets the hook in the environment the VMM inherits.
//! Needs root and a cgroup v2 hierarchy with the memory controller (the nested machine's
//! L1 mounts one).

use std::time::Duration;

use boxlet::cgroup::Limits;
use boxlet::hypervisor::{Hypervisor, VmExit};

mod common;
use common::{backend, spec};

#[tokio::test]
#[ignore = "needs a KVM that boots Linux and cgroup v2: make test-nested"]
async fn a_vmm_past_its_memory_limit_is_stopped_and_reported_and_others_run_on() {
    boxlet::cgroup::parent().expect("this test needs cgroup v2 with the memory controller");
    let hv = backend();
    // The bystander, started before the hook is set.
    let calm_dir = tempfile::tempdir().unwrap();
    let mut calm = hv
        .create(spec(calm_dir.path(), "/bin/busybox sleep 60", 1))
        .await
        .unwrap();
    // SAFETY: the only test of this executable, on a current-thread runtime: no other
    // thread reads the environment meanwhile.
    unsafe { std::env::set_var("BOXLET_VMM_TEST_ALLOCATE_MIB", "1024") };
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec(dir.path(), "/bin/busybox sleep 60", 1);
    s.limits = Limits {
        memory_mib: Some(512),
        ..Limits::default()
    };
    let mut greedy = hv.create(s).await.unwrap();
    // SAFETY: as above.
    unsafe { std::env::remove_var("BOXLET_VMM_TEST_ALLOCATE_MIB") };
    let exit = tokio::time::timeout(Duration::from_secs(60), greedy.wait())
        .await
        .expect("the greedy VM ended")
        .unwrap();
    match exit {
        VmExit::MemoryLimit(why) => assert!(why.contains("512 MiB"), "{why}"),
        other => panic!("{other:?}"),
    }
    // The other VM is untouched.
    assert_eq!(
        calm.stop(Duration::from_secs(1)).await.unwrap(),
        VmExit::Stopped
    );
}
