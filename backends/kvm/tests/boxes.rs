//! Boxes on boxlet's own VMM, end to end: the same suite (boxlet-testkit) the QEMU
//! backend runs, booting the same kernel, disks and agent, with the agent reached over
//! the VMM's own virtio-vsock.
//!
//! They need a KVM that boots Linux: here that is the nested test machine (`make
//! test-nested` passes `--include-ignored`); on a host with hardware KVM, run them with
//! `cargo test -p boxlet-kvm -- --include-ignored`.

use std::time::Duration;

use boxlet_kvm::KvmBackend;
use boxlet_testkit as kit;

/// Each test's hang guard: a good run of the longest takes about a minute in the nested
/// machine.
const LIMIT: Duration = Duration::from_secs(300);

fn backend() -> KvmBackend {
    kit::helper_beside_tests("BOXLET_VMM", "boxlet-vmm");
    // The probe must agree that this KVM boots Linux.
    KvmBackend::new().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a KVM that boots Linux: make test-nested"]
async fn a_box_on_a_qcow2_overlay_runs_commands_and_keeps_its_writes() {
    kit::hang_guarded(
        LIMIT,
        kit::a_box_on_a_qcow2_overlay_runs_commands_and_keeps_its_writes(&backend()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a KVM that boots Linux: make test-nested"]
async fn a_guest_kernel_panic_is_an_error_not_a_hang() {
    kit::hang_guarded(
        LIMIT,
        kit::a_guest_kernel_panic_is_an_error_not_a_hang(&backend()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a KVM that boots Linux: make test-nested"]
async fn a_killed_vmm_is_an_error_not_a_hang() {
    kit::hang_guarded(
        LIMIT,
        kit::a_killed_vmm_is_an_error_not_a_hang(&backend(), "boxlet-vmm"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a KVM that boots Linux: make test-nested"]
async fn a_directory_root_over_virtio_fs() {
    let hv = backend();
    assert!(
        boxlet::hypervisor::Hypervisor::capabilities(&hv).directory_shares,
        "virtiofsd not found: `make setup` installs it"
    );
    kit::hang_guarded(LIMIT, kit::a_directory_root_over_virtio_fs(&hv)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a KVM that boots Linux: make test-nested"]
async fn boxes_from_an_oci_image_boot_through_every_rootfs_strategy() {
    kit::hang_guarded(LIMIT, kit::rootfs_strategies_boot(&backend())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a KVM that boots Linux: make test-nested"]
async fn a_guest_filling_its_directory_root_meets_its_quota() {
    kit::hang_guarded(
        LIMIT,
        kit::a_guest_filling_its_directory_root_meets_its_quota(&backend()),
    )
    .await;
}
