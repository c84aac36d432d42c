//! tmp
pub mod codec;
