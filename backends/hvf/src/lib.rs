//! macOS Hypervisor.framework backend.
//!
//! Not implemented yet: this crate is a placeholder in the workspace layout and is filled
//! by issue #5. It exports nothing.
