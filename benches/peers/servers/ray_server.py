"""The two peer-comparison models on Ray Serve, matmul with @serve.batch.

    python ray_server.py --port 8000 [--batch-wait 0.001]
    POST /echo   {"text": "..."}    -> {"text": "..."}
    POST /matmul {"x": [64 floats]} -> {"y": [64 floats]}

Runs until killed (SIGTERM).
"""

import argparse
import signal
import threading

import numpy as np
import ray
from ray import serve
from starlette.requests import Request

DIM = 64


@serve.deployment(logging_config={"log_level": "WARNING", "enable_access_log": False})
class Echo:
    async def __call__(self, request: Request) -> dict:
        body = await request.json()
        return {"text": body["text"]}


@serve.deployment(logging_config={"log_level": "WARNING", "enable_access_log": False})
class Matmul:
    def __init__(self, batch_wait: float):
        self.w = (np.random.default_rng(0).standard_normal((DIM, DIM)) / 8).astype(np.float32)
        self.handle_batch.set_batch_wait_timeout_s(batch_wait)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.001)
    async def handle_batch(self, xs: list[np.ndarray]) -> list[dict]:
        y = np.tanh(np.stack(xs) @ self.w.T)
        return [{"y": row.tolist()} for row in y]

    async def __call__(self, request: Request) -> dict:
        body = await request.json()
        return await self.handle_batch(np.asarray(body["x"], dtype=np.float32))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--batch-wait", type=float, default=0.001)
    args = parser.parse_args()
    ray.init(include_dashboard=False, logging_level="warning")
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(Echo.bind(), name="echo", route_prefix="/echo")
    serve.run(Matmul.bind(args.batch_wait), name="matmul", route_prefix="/matmul")
    print("ray serve ready", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
