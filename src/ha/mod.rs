//! Several gateways per location (design §12).

pub mod addrwatch;
pub mod source;
