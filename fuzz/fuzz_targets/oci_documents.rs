//! What a hostile registry or image sends: manifests, indexes, configurations, references
//! and compressed layer streams.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    boxlet_oci::fuzz::documents(data);
});
