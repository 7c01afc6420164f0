//! Portable VM backend driving qemu-system-x86_64 -M microvm.
//!
//! Not implemented yet: this crate is a placeholder in the workspace layout and is filled
//! by issue #4. It exports nothing.
