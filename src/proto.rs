//! Generated protobuf and gRPC code (see `proto/banmesh.proto`), and the
//! descriptor set that server reflection hands to grpcurl.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("banmesh.v1");

/// Encoded `FileDescriptorSet` of the banmesh protocol, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("banmesh_descriptor");
