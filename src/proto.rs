//! Generated protobuf and gRPC code (see `proto/banmesh.proto`), and the
//! descriptor set that server reflection hands to grpcurl.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("banmesh.v1");

/// What the hub writes on the wire for a subscription: each live event is
/// encoded once, when it is published, and the same bytes go to every
/// subscriber (before, each subscriber built its own `proto::Event`, with
/// its strings, and encoded it: CPU per delivery). And the codec every
/// `Hub` method is served with, which starts each stream's encode and
/// decode buffers small (tonic's default is 8 KiB each, per stream, held as
/// long as the stream: a cost per subscriber).
pub mod wire {
    use std::marker::PhantomData;

    use prost::{
        DecodeError, Message,
        bytes::{Buf, BufMut, Bytes},
        encoding::{DecodeContext, WireType},
    };
    use tonic::codec::{BufferSettings, Codec};
    use tonic_prost::{ProstDecoder, ProstEncoder};

    /// Initial capacity of a stream's encode and decode buffers. They grow for
    /// a larger message and for a burst (up to tonic's yield threshold, 32
    /// KiB, before it hands a chunk to HTTP/2); an event is ~100 bytes.
    pub const STREAM_BUFFER: usize = 1024;
    /// Bytes encoded before tonic hands them to HTTP/2 (tonic's default).
    const YIELD_THRESHOLD: usize = 32 * 1024;

    /// A `banmesh.v1.Event`, already encoded. Cloning shares the bytes.
    #[derive(Clone, Debug, Default, PartialEq)]
    pub struct EncodedEvent(Bytes);

    impl EncodedEvent {
        /// Encodes `event` once, for as many subscribers as receive it.
        pub fn of(event: &crate::ban::Event) -> EncodedEvent {
            EncodedEvent(event.to_proto().encode_to_vec().into())
        }

        /// The encoded message (no gRPC length prefix).
        pub fn bytes(&self) -> &Bytes {
            &self.0
        }
    }

    /// Encoding writes the bytes as they are. Decoding keeps nothing: the hub
    /// never receives an event, and a client decodes `proto::Event`.
    impl Message for EncodedEvent {
        fn encode_raw(&self, buf: &mut impl BufMut) {
            buf.put_slice(&self.0);
        }

        fn merge_field(
            &mut self,
            tag: u32,
            wire_type: WireType,
            buf: &mut impl Buf,
            ctx: DecodeContext,
        ) -> Result<(), DecodeError> {
            prost::encoding::skip_field(wire_type, tag, buf, ctx)
        }

        fn encoded_len(&self) -> usize {
            self.0.len()
        }

        fn clear(&mut self) {
            self.0 = Bytes::new();
        }
    }

    /// tonic-prost's codec with [`STREAM_BUFFER`] for initial buffers.
    #[derive(Debug)]
    pub struct HubCodec<T, U>(PhantomData<(T, U)>);

    impl<T, U> Default for HubCodec<T, U> {
        fn default() -> Self {
            HubCodec(PhantomData)
        }
    }

    fn settings() -> BufferSettings {
        BufferSettings::new(STREAM_BUFFER, YIELD_THRESHOLD)
    }

    impl<T, U> Codec for HubCodec<T, U>
    where
        T: Message + Send + 'static,
        U: Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = ProstDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            ProstEncoder::new(settings())
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstDecoder::new(settings())
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::ban::{Ban, Event, EventKind};

        #[test]
        fn an_encoded_event_decodes_as_the_event() {
            let event = Event {
                id: 7,
                kind: EventKind::Ban,
                ban: Ban::new("sshd", "tcp", "22", "192.0.2.1").unwrap(),
                added_by: "web-1".into(),
                created_ms: 1_700_000_000_000,
                lifts: 0,
                term: Default::default(),
            };
            let wire = EncodedEvent::of(&event);
            let mut framed = Vec::new();
            wire.encode(&mut framed).unwrap();
            let back = crate::proto::Event::decode(framed.as_slice()).unwrap();
            assert_eq!(back, event.to_proto());
            assert_eq!(wire.encoded_len(), framed.len());
        }
    }
}

/// The hub's `Hub` server as it is served: the messages above, except that
/// a `Subscribe` response is a [`wire::EncodedEvent`] and every method runs
/// on [`wire::HubCodec`] (see `build.rs`). Clients use `hub_client` above.
pub mod served {
    include!(concat!(env!("OUT_DIR"), "/served/banmesh.v1.rs"));
}

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
