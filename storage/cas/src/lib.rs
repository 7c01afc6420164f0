//! Content-addressed blob store with a redb index.
//!
//! Not implemented yet: this crate is a placeholder in the workspace layout and is filled
//! by issue #6. It exports nothing.
