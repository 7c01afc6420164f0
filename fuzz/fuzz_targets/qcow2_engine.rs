//! The read/write engine running operations on a mutated image.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| boxlet_qcow2::fuzz::engine(data));
