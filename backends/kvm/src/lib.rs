//! boxlet's own VMM on KVM (kvm-ioctls and rust-vmm crates).
//!
//! Not implemented yet: this crate is a placeholder in the workspace layout and is filled
//! by issue #5. It exports nothing.
