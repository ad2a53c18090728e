"""The two peer-comparison models on NVIDIA PyTriton (Triton Inference Server driven from
Python; KServe V2 over HTTP), matmul with Triton's dynamic batcher.

    python pytriton_server.py --port 8000 [--delay-us 100]
    POST /v2/models/echo/infer    text: BYTES [1]
    POST /v2/models/matmul/infer  x: FP32 [batch, 64] -> y: FP32 [batch, 64]
"""

import argparse

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

DIM = 64
W = (np.random.default_rng(0).standard_normal((DIM, DIM)) / 8).astype(np.float32)


def echo(requests):
    return [{"text": r["text"]} for r in requests]


@batch
def matmul(x):
    return {"y": np.tanh(x @ W.T).astype(np.float32)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--delay-us", type=int, default=100)
    args = parser.parse_args()
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_verbose=0,
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name="echo",
            infer_func=echo,
            inputs=[Tensor(name="text", dtype=bytes, shape=(1,))],
            outputs=[Tensor(name="text", dtype=bytes, shape=(1,))],
            config=ModelConfig(batching=False),
        )
        triton.bind(
            model_name="matmul",
            infer_func=matmul,
            inputs=[Tensor(name="x", dtype=np.float32, shape=(DIM,))],
            outputs=[Tensor(name="y", dtype=np.float32, shape=(DIM,))],
            config=ModelConfig(
                max_batch_size=64,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.delay_us),
            ),
        )
        triton.serve()
