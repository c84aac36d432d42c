//! The `gatehouse.v1` protocol: messages and gRPC stubs generated from
//! `proto/gatehouse/v1/gateway.proto`. The proto file documents every message and the
//! ordering rules; this crate compiles it and holds the rule of `Stats` totals
//! ([`counters`]).
#![deny(unsafe_code)]

pub mod counters;

/// Generated code for package `gatehouse.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("gatehouse.v1");
}

/// Largest gRPC message either side accepts (a snapshot of 100,000 peers is ~15 MiB).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Largest message the Core accepts from a gateway (ordering rule 7): every message a
/// gateway sends is bounded well below it (stats are split at 1 MiB, `Hello` carries at
/// most [`MAX_HELLO_EVENTS`] events, `Applied` lists at most about 100 rejections), so a
/// larger one is a broken or hostile gateway and costs the Core at most this much memory.
pub const MAX_GATEWAY_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Most peer events one `Hello` carries; a longer backlog follows as `PeerEvent`s.
pub const MAX_HELLO_EVENTS: usize = 1000;

/// Most peer rows one `Stats` message carries. A gateway's 1 MiB stats batches hold at
/// most about 29,000 rows (a row is at least 36 bytes), so this cap never splits them.
pub const MAX_STATS_PEERS: usize = 32_768;
