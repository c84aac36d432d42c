//! Route source for takeover handshakes (placeholder: the routing-table writer is built
//! separately; this one only reports that it is missing).

use std::net::{IpAddr, SocketAddr};

/// Why the source routes could not be installed or removed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("source routes: {0}")]
    Unsupported(String),
}

/// gatehouse's host routes (preferred source = the VIP) in its own routing table.
#[derive(Debug)]
pub struct SourceRoutes {
    table: u32,
}

impl SourceRoutes {
    pub fn new(table: u32) -> Self {
        SourceRoutes { table }
    }

    /// Installs a host route per endpoint whose family has a present VIP; returns the
    /// number of routes now installed.
    pub fn install(
        &mut self,
        vips: &[IpAddr],
        endpoints: &[SocketAddr],
    ) -> Result<usize, SourceError> {
        let _ = (vips, endpoints);
        Err(SourceError::Unsupported(format!(
            "table {}: not implemented in this build",
            self.table
        )))
    }

    /// Removes gatehouse's routes and rules.
    pub fn clear(&mut self) -> Result<(), SourceError> {
        Err(SourceError::Unsupported(format!(
            "table {}: not implemented in this build",
            self.table
        )))
    }
}
