//! Build script: compiles the gRPC protocol and makes cargo rebuild when the embedded
//! Python SDK changes.
//!
//! The `.proto` files in `proto/` are parsed by `protox` (a protobuf compiler written in
//! Rust), so building needs no system `protoc`; `tonic-prost-build` turns the descriptors
//! into the message types and the server trait (`api/grpc/mod.rs` includes them).
//!
//! etcd's v3 API (`proto/etcd/`, copied from the etcd-client crate with the REST-gateway
//! options removed) is compiled the same way, client only, for `cluster/etcd/`.
//!
//! `include_dir!` (in `worker/python.rs`) embeds `python/unimodel`, but on stable Rust it
//! cannot tell cargo which files it read, so without the rerun line an SDK edit would not
//! reach the binary until something else forced a rebuild.

const PROTOS: &[&str] = &["grpc_service.proto", "model_config.proto"];
const ETCD_PROTOS: &[&str] = &["etcd/api/etcdserverpb/rpc.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../python/unimodel");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../proto");
    let descriptors = protox::compile(PROTOS, ["../proto"])?;
    tonic_prost_build::configure()
        // The client is for `benches/` (the gRPC load mode); the server needs none.
        .build_client(true)
        // Raw tensor data is sliced into engine tensors without a copy.
        .bytes(".inference.ModelInferRequest.raw_input_contents")
        .bytes(".inference.ModelInferResponse.raw_output_contents")
        // Decode errors are the client's (INVALID_ARGUMENT), not INTERNAL (`proto/codec.rs`).
        .codec_path("crate::proto::codec::ProtoCodec")
        .compile_fds(descriptors)?;
    // etcd: our client only, with prost's own codec (the KServe codec above maps decode
    // errors to INVALID_ARGUMENT for *our* clients; etcd's replies are not client input).
    let etcd = protox::compile(ETCD_PROTOS, ["../proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds(etcd)?;
    Ok(())
}
