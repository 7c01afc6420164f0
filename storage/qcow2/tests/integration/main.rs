//! Integration tests of the qcow2 crate: differential against QEMU, a reference model
//! under proptest, malformed headers, crash consistency and the fuzz corpora.

mod crash;
mod create;
mod differential;
mod fuzz_corpus;
mod malformed;
mod model;
mod util;
