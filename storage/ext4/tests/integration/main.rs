//! Integration tests of the ext4 reader: differential against e2fsprogs, malformed
//! images, and the fuzz corpus.

mod builder;
mod differential;
mod fuzz_corpus;
mod inject;
mod layer_model;
mod layers;
mod malformed;
mod roundtrip;
mod tree;
