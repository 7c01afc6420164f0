//! The boxlet runtime: core traits (RootfsStrategy, DiskStore, Hypervisor) and box lifecycle.
//!
//! Not implemented yet: this crate is a placeholder in the workspace layout and is filled
//! by issue #4. It exports nothing.
