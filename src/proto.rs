//! Generated protobuf and gRPC code (see `proto/banmesh.proto`), and the
//! descriptor set that server reflection hands to grpcurl.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("banmesh.v1");

/// Publish response header: the highest report sequence the hub holds for
/// the calling host, so a node whose outbox was reset numbers on from there.
pub const LAST_SEQ_HEADER: &str = "banmesh-last-seq";

/// Publish request header: how many reports the node's outbox held when
/// it opened the stream, for `hub hosts` to show a throttled host's backlog.
pub const BACKLOG_HEADER: &str = "banmesh-backlog";

/// Publish trailer beside RESOURCE_EXHAUSTED: milliseconds the node waits
/// before it opens a new stream (the hub's per-host report limit).
pub const RETRY_AFTER_HEADER: &str = "banmesh-retry-after-ms";

/// Encoded `FileDescriptorSet` of the banmesh protocol, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("banmesh_descriptor");

/// Server reflection for grpcurl, in both versions: `v1` for current
/// tools, `v1alpha` for grpcurl 1.8 and others that only speak it.
#[allow(clippy::type_complexity)]
pub fn reflection() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}
