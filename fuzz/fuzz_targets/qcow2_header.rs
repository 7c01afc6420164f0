//! qcow2 header parsing and the first reads of a disk, on arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| boxlet_qcow2::fuzz::header(data));
