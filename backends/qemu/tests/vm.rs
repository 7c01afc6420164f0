//! Boxes on the QEMU backend, end to end (boxlet-testkit's suite): our kernel, an ext4
//! base disk built by boxlet with the agent in it, a qcow2 overlay per box, and the agent
//! over vsock. Under TCG here (each boot takes seconds); with KVM where the host has it.
//!
//! Needs what `make setup` provides: the guest kernel, the static agent ($BOXLET_AGENT),
//! busybox-static, vhost-device-vsock and virtiofsd.

use boxlet::Hypervisor;
use boxlet_qemu::Qemu;
use boxlet_testkit as kit;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_box_on_a_qcow2_overlay_runs_commands_and_keeps_its_writes() {
    kit::a_box_on_a_qcow2_overlay_runs_commands_and_keeps_its_writes(&Qemu::new().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_root_over_virtio_fs() {
    let hv = Qemu::new().unwrap();
    assert!(
        hv.capabilities().directory_shares,
        "virtiofsd not found: `make setup` installs it"
    );
    kit::a_directory_root_over_virtio_fs(&hv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boxes_from_an_oci_image_boot_through_every_rootfs_strategy() {
    kit::rootfs_strategies_boot(&Qemu::new().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_filling_its_directory_root_meets_its_quota() {
    kit::a_guest_filling_its_directory_root_meets_its_quota(&Qemu::new().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_kernel_panic_is_an_error_not_a_hang() {
    kit::a_guest_kernel_panic_is_an_error_not_a_hang(&Qemu::new().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_vmm_is_an_error_not_a_hang() {
    kit::a_killed_vmm_is_an_error_not_a_hang(&Qemu::new().unwrap(), "qemu-system-x86_64").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vsock_daemon_killed_by_its_filter_stops_the_vm() {
    kit::a_daemon_killed_by_its_filter_stops_the_vm(&Qemu::new().unwrap(), "vhost-device-vsock")
        .await;
}
