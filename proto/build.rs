//! Compiles `gatehouse/v1/gateway.proto` with protox (pure Rust: no system `protoc`).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "gatehouse/v1/gateway.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["."])?;
    // The rpc is named `Connect`; the transport-generated `connect(dst)` constructor would
    // clash with it, so clients are built from a `tonic::transport::Channel` instead.
    tonic_prost_build::configure()
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
