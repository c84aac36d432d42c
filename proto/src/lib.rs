//! The `gatehouse.v1` protocol: messages and gRPC stubs generated from
//! `proto/gatehouse/v1/gateway.proto`. The proto file documents every message and the
//! ordering rules; this crate only compiles it.

/// Generated code for package `gatehouse.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("gatehouse.v1");
}

/// Largest gRPC message either side accepts (a snapshot of 100,000 peers is ~15 MiB).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
