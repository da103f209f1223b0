//! Compiles `proto/*.proto` with protox (pure Rust), so a fresh machine needs no `protoc`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(["shoal.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
