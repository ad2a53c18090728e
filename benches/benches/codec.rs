//! Control-message micro-benchmarks: encoding and decoding a typical `execute` and `result`
//! frame (MessagePack via `unimodel::worker::protocol`, length prefix via `codec`), and one
//! frame round trip over a real Unix socket pair.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use unimodel::worker::codec::{frame_bytes, split};
use unimodel::worker::protocol::{CoreMessage, Region, TensorRef, WorkerMessage, decode, encode};

fn execute_msg() -> CoreMessage {
    CoreMessage::Execute {
        id: 123_456,
        batch_size: 8,
        inputs: vec![
            TensorRef::located("input_ids", "INT64", &[8, 128], Region::Input, 0, 8192),
            TensorRef::located(
                "attention_mask",
                "INT64",
                &[8, 128],
                Region::Input,
                8192,
                8192,
            ),
        ],
        outputs: None,
        trace: Vec::new(),
        targets: Vec::new(),
    }
}

fn result_msg() -> WorkerMessage {
    WorkerMessage::Result {
        id: 123_456,
        outputs: vec![TensorRef::located(
            "logits",
            "FP32",
            &[8, 1000],
            Region::Output,
            1_048_576,
            32_000,
        )],
        compute_ns: 1_234_567,
    }
}

fn encode_decode(c: &mut Criterion) {
    let exec = execute_msg();
    let result = result_msg();
    c.bench_function("codec/encode_execute", |b| {
        b.iter(|| frame_bytes(&encode(black_box(&exec)).expect("encode")).expect("frame"))
    });
    let exec_bytes = encode(&exec).expect("encode");
    c.bench_function("codec/decode_execute", |b| {
        b.iter(|| decode::<CoreMessage>(black_box(&exec_bytes)).expect("decode"))
    });
    c.bench_function("codec/encode_result", |b| {
        b.iter(|| frame_bytes(&encode(black_box(&result)).expect("encode")).expect("frame"))
    });
    let result_bytes = encode(&result).expect("encode");
    c.bench_function("codec/decode_result", |b| {
        b.iter(|| decode::<WorkerMessage>(black_box(&result_bytes)).expect("decode"))
    });
}

/// Write one execute frame and read it back through the socket codec (sendmsg/recvmsg).
fn socket_round_trip(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (a, b) = rt
        .block_on(async { tokio::net::UnixStream::pair() })
        .expect("socketpair");
    let (_ra, wa) = rt.block_on(async { split(a) });
    let (mut rb, _wb) = rt.block_on(async { split(b) });
    let payload = encode(&execute_msg()).expect("encode");
    c.bench_function("codec/socket_frame_round_trip", |bench| {
        bench.iter(|| {
            rt.block_on(async {
                wa.write_frame(&payload, &[]).await.expect("write");
                rb.read_frame().await.expect("read").expect("frame")
            })
        })
    });
}

criterion_group!(benches, encode_decode, socket_round_trip);
criterion_main!(benches);
