//! The ext4 reader: open, walk, read every file, link and xattr of arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| boxlet_ext4::fuzz::reader(data));
