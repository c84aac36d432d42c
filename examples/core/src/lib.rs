//! The reference Core.
