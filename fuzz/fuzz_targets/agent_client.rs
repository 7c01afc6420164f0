//! The host side of the agent protocol against a hostile guest: the vsock handshake, the
//! frames of ping, run, exec and copy out, and the copy-out tar stream.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = boxlet::fuzz::agent_client(data);
});
