//! ext4 reader, streaming image builder and file injection.
//!
//! Not implemented yet: this crate is a placeholder in the workspace layout and is filled
//! by issue #3. It exports nothing.
