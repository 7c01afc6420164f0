//! The boxlet guest agent (PID 1 in the VM) and the host<->guest protocol.
//!
//! Not implemented yet: this crate is a placeholder in the workspace layout and is filled
//! by issue #4. It exports nothing.
