//! Compiles `proto/banmesh.proto` with a vendored `protoc`, so a fresh machine
//! needs nothing but cargo, and writes the descriptor set that server
//! reflection serves to grpcurl.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded; nothing reads the
        // environment concurrently.
        unsafe { env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let out = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("banmesh_descriptor.bin"))
        .compile_protos(&["proto/banmesh.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/banmesh.proto");
    Ok(())
}
