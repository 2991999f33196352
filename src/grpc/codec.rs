//! The prost codec of every generated tagllm service and client, decoding from contiguous bytes.
//!
//! tonic's stock `ProstCodec` hands prost a `DecodeBuf`: a wrapper over the receive buffer whose
//! every `advance` (one per field, varint and string) goes through `BytesMut`'s out-of-line
//! bookkeeping, so prost cannot use its slice fast paths. tonic has always gathered a whole message
//! into that one buffer before it decodes, so [`SliceCodec`] decodes from the message's bytes as a
//! plain `&[u8]`, as a client decoding values read from Redis does. For a 500-note NOTE_MAJOR answer
//! (~210 KiB, 500 maps) that is ~0.3 ms less client time per call on the benchmark machine
//! (BENCHMARKS.md); requests are decoded the same way on the server. Encoding is prost's, unchanged.
//! The bytes on the wire are the same either way: any gRPC client can talk to the server.

use std::marker::PhantomData;

use bytes::Buf;
use prost::Message;
use tonic::{
    codec::{Codec, DecodeBuf, Decoder},
    Status,
};

/// tonic's prost codec with a contiguous-bytes decoder (see the module docs).
#[derive(Debug, Clone)]
pub struct SliceCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SliceCodec<T, U> {
    fn default() -> Self {
        SliceCodec(PhantomData)
    }
}

impl<T, U> Codec for SliceCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <tonic_prost::ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = SliceDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        SliceDecoder(PhantomData)
    }
}

/// Decodes a message from its bytes as one slice.
#[derive(Debug, Clone)]
pub struct SliceDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for SliceDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        let n = buf.remaining();
        let decoded = if buf.chunk().len() == n {
            U::decode(buf.chunk())
        } else {
            // Not one slice (tonic does not do this today): gather it once.
            U::decode(buf.copy_to_bytes(n))
        };
        buf.advance(buf.remaining());
        decoded
            .map(Some)
            // What tonic's ProstCodec answers for a message that does not decode.
            .map_err(|e| Status::internal(e.to_string()))
    }
}
