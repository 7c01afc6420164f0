//! A layer tar stream applied and built into an image, which must read back.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| boxlet_ext4::fuzz::layers(data));
