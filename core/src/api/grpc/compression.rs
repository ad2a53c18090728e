//! Compressed gRPC messages, both ways: gzip, deflate and zstd (what tritonclient.grpc's
//! `compression_algorithm` sends, gzip or deflate, and zstd for tonic clients).
//!
//! - Requests: the inference service accepts every coding in `ENCODINGS`. A message is
//!   inflated into a buffer capped at `--max-body-bytes` (tonic's decoding limit), so a small
//!   message that inflates past it is refused with RESOURCE_EXHAUSTED ("size limit ... exceeded
//!   while decompressing message") once the cap is reached, never allocated whole.
//! - Responses: compressed, in the client's preferred coding, only on calls whose requests
//!   are compressed (`grpc-encoding` other than `identity`). gRPC clients built on grpc-core,
//!   tritonclient.grpc among them, advertise every coding they can read in
//!   `grpc-accept-encoding` on every call; honouring that alone would deflate every answer
//!   and make every plain client pay for it. `plain_answers_to_plain_calls` removes the
//!   header from plain calls before tonic chooses the response coding.

use http::Request;
use tonic::codec::CompressionEncoding;

/// The codings the inference service reads and writes.
pub const ENCODINGS: [CompressionEncoding; 3] = [
    CompressionEncoding::Gzip,
    CompressionEncoding::Deflate,
    CompressionEncoding::Zstd,
];

const GRPC_ENCODING: &str = "grpc-encoding";
const GRPC_ACCEPT_ENCODING: &str = "grpc-accept-encoding";

/// A call that sends plain messages gets plain answers (see the module doc).
pub fn plain_answers_to_plain_calls<B>(mut req: Request<B>) -> Request<B> {
    let compressed = req
        .headers()
        .get(GRPC_ENCODING)
        .is_some_and(|coding| coding != "identity");
    if !compressed {
        req.headers_mut().remove(GRPC_ACCEPT_ENCODING);
    }
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(headers: &[(&'static str, &'static str)]) -> Request<()> {
        let mut req = Request::new(());
        for (name, value) in headers {
            req.headers_mut().insert(*name, value.parse().unwrap());
        }
        plain_answers_to_plain_calls(req)
    }

    #[test]
    fn only_compressed_calls_keep_their_accepted_codings() {
        let accept = (GRPC_ACCEPT_ENCODING, "identity,deflate,gzip");
        assert!(
            call(&[accept])
                .headers()
                .get(GRPC_ACCEPT_ENCODING)
                .is_none()
        );
        let identity = call(&[accept, (GRPC_ENCODING, "identity")]);
        assert!(identity.headers().get(GRPC_ACCEPT_ENCODING).is_none());
        let gzip = call(&[accept, (GRPC_ENCODING, "gzip")]);
        assert_eq!(
            gzip.headers().get(GRPC_ACCEPT_ENCODING).unwrap(),
            "identity,deflate,gzip"
        );
        assert_eq!(gzip.headers().get(GRPC_ENCODING).unwrap(), "gzip");
    }
}
