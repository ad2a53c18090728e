//! The protobuf codec of the generated gRPC code (`core/build.rs` names it): prost encoding,
//! with a request that does not decode answered `INVALID_ARGUMENT`.
//!
//! tonic-prost's own codec turns a decode error into `INTERNAL`, which tells a client the
//! server broke when its own bytes were garbage, and is counted as a server failure. Bytes
//! that are not the message the method takes are the client's error, as with a malformed
//! JSON body over REST (400).

use prost::Message;
use std::marker::PhantomData;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};

/// `tonic_prost::ProstCodec`, but decode errors are `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct ProtoCodec<T, U> {
    inner: tonic_prost::ProstCodec<T, U>,
}

impl<T, U> Default for ProtoCodec<T, U> {
    fn default() -> Self {
        ProtoCodec {
            inner: tonic_prost::ProstCodec::default(),
        }
    }
}

impl<T, U> Codec for ProtoCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = ProtoDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.inner.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProtoDecoder {
            _message: PhantomData,
            buffer_settings: BufferSettings::default(),
        }
    }
}

/// Decodes one `U`; bytes that are not one are the client's error.
#[derive(Debug)]
pub struct ProtoDecoder<U> {
    _message: PhantomData<U>,
    buffer_settings: BufferSettings,
}

impl<U: Message + Default> Decoder for ProtoDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        decode_message(buf).map(Some)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.buffer_settings
    }
}

/// One `U` from `buf`, or `INVALID_ARGUMENT` naming the message the bytes are not.
fn decode_message<U: Message + Default>(buf: impl prost::bytes::Buf) -> Result<U, Status> {
    U::decode(buf).map_err(|e| {
        Status::invalid_argument(format!(
            "the request is not a valid {} protobuf message: {e}",
            message_name::<U>()
        ))
    })
}

/// `ModelInferRequest`, from the Rust type's path.
fn message_name<U>() -> &'static str {
    let full = std::any::type_name::<U>();
    full.rsplit("::").next().unwrap_or(full)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ModelInferRequest;

    #[test]
    fn garbage_is_invalid_argument_naming_the_message() {
        // Field 1 as a length-delimited string that claims more bytes than follow.
        let garbage: &[u8] = &[0x0a, 0xff, 0x01, b'x'];
        let status = decode_message::<ModelInferRequest>(garbage).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status
                .message()
                .starts_with("the request is not a valid ModelInferRequest protobuf message"),
            "{}",
            status.message()
        );
    }
}
