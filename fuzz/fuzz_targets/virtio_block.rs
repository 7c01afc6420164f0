//! virtio-blk descriptor chains, headers and buffers from arbitrary guest memory.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| boxlet_kvm::virtio::fuzz::block(data));
