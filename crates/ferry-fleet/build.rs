//! Compiles proto/ferry.proto with protox (pure Rust: no protoc to install).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = "../../proto";
    println!("cargo:rerun-if-changed={proto_dir}/ferry.proto");
    let fds = protox::compile(["ferry.proto"], [proto_dir])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
