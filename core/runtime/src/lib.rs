//! The boxlet runtime: the core traits and what drives a box.
//!
//! - [`hypervisor`]: the `Hypervisor` trait every VMM backend implements.
//! - [`disk_store`]: the `DiskStore` trait: where base-disk records live.
//! - [`agent`]: the async client of the guest agent (exec, copy, shutdown).
//! - [`vm`]: boot a VM on any backend to a ready agent.
//! - [`initramfs`]: the agent's initramfs for directory roots.
//! - [`console`]: bounded console logs.
//! - [`jail`]: the jail every VMM process and daemon starts in (`boxlet-jail`).
//! - [`process`]: waiting for, stopping and classifying VMM processes.
//! - [`rootfs`]: the `RootfsStrategy` trait, the strategies, and the versioned base-disk
//!   cache.

pub mod agent;
pub mod cgroup;
pub mod console;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod daemon_filter;
pub mod disk_store;
#[doc(hidden)]
pub mod fuzz;
pub mod hypervisor;
pub mod initramfs;
pub mod jail;
pub mod process;
pub mod rootfs;
pub mod vm;

pub use agent::{
    AgentClient, AgentError, Connector, CopyOutOptions, CopyOutReport, ExecEvent, ExecSession,
    Output,
};
pub use boxlet_guest::proto::{Exec, ExitStatus, Setup};
pub use disk_store::{DiskStore, DiskStoreError, MemoryDiskStore};
pub use hypervisor::{
    AccelPolicy, Acceleration, Capabilities, DiskFormat, DiskSpec, Hypervisor, HypervisorError,
    ShareIds, ShareSpec, Vm, VmExit, VmSpec, VsockSpec,
};
pub use rootfs::{GuestRootfs, RootfsError, RootfsStrategy, Strategy};
pub use vm::{boot, BootError, BootSpec, Root, RunningVm};
