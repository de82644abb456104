//! Compiles `proto/banmesh.proto` with a vendored `protoc`, so a fresh machine
//! needs nothing but cargo, and writes the descriptor set that server
//! reflection serves to grpcurl.
//!
//! The hub's `Hub` server is compiled a second time, on its own
//! (`proto::served`): every message is the one of the first compile, but a
//! `Subscribe` response is `proto::wire::EncodedEvent` (an event encoded
//! once and shared by every subscriber) and every method uses
//! `proto::wire::HubCodec` (smaller encode and decode buffers per stream).
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
    let served = out.join("served");
    std::fs::create_dir_all(&served)?;
    tonic_prost_build::configure()
        .build_client(false)
        .out_dir(&served)
        .extern_path(".banmesh.v1", "crate::proto")
        .extern_path(".banmesh.v1.Event", "crate::proto::wire::EncodedEvent")
        .codec_path("crate::proto::wire::HubCodec")
        .compile_protos(&["proto/banmesh.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/banmesh.proto");
    Ok(())
}
