//! A gRPC codec that sends request bytes encoded once, before the run.
//!
//! The generated client would encode every `SensorValuesRequest` again for
//! every call, which for 100 readings per call costs about as much CPU as the
//! sink spends decoding it: the load generator would then measure itself. With
//! this codec a call costs one copy of bytes that were encoded up front.

use bytes::{Buf, BufMut, Bytes};
use prost::Message;
use sink_proto::SensorValuesResponse;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// Encodes a request as the bytes it already is; decodes the (empty) response.
#[derive(Debug, Clone, Copy, Default)]
pub struct PreEncoded;

impl Codec for PreEncoded {
    type Encode = Bytes;
    type Decode = SensorValuesResponse;
    type Encoder = BytesEncoder;
    type Decoder = ResponseDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        BytesEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        ResponseDecoder
    }
}

/// Copies an encoded message into the gRPC frame.
#[derive(Debug)]
pub struct BytesEncoder;

impl Encoder for BytesEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

/// Decodes `SensorValuesResponse`, so that a server answering something else
/// is noticed rather than counted as an acknowledgement.
#[derive(Debug)]
pub struct ResponseDecoder;

impl Decoder for ResponseDecoder {
    type Item = SensorValuesResponse;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        let response = SensorValuesResponse::decode(src.copy_to_bytes(src.remaining()))
            .map_err(|err| Status::internal(format!("undecodable response: {err}")))?;
        Ok(Some(response))
    }
}
