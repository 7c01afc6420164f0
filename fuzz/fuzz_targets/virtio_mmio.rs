//! virtio-mmio register traffic from arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| boxlet_kvm::virtio::fuzz::transport(data));
