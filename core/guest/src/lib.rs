//! The boxlet guest agent and the host<->guest protocol.
//!
//! The agent is PID 1 in every box (`init=/boxlet/bin/boxlet-guest`): it mounts the
//! basics, reaps orphans, tells the host it is ready over vsock, and serves requests:
//! exec with streamed stdio, signals and timeouts, file copy in and out, shutdown. The
//! protocol ([`proto`], docs/agent-protocol.md) is small, framed and versioned; the same
//! agent serves a Unix socket on the host (`--listen-unix`), which is how its logic is
//! tested without a VM.

pub mod agent;
pub mod init;
pub mod proto;
pub mod serve;
mod sys;
pub mod users;
