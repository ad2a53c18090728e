"""The two peer-comparison models as UniModel plugins (see benches/peers/README.md).

- ``echo``: returns its one BYTES value; no batching.
- ``matmul``: ``y = tanh(W @ x)`` for ``x`` of 64 FP32, a fixed 64x64 ``W`` (seed 0, the
  same in every peer), dynamically batched up to 64 rows.
"""

import numpy as np

import unimodel as um

DIM = 64


def weights() -> np.ndarray:
    return (np.random.default_rng(0).standard_normal((DIM, DIM)) / 8).astype(np.float32)


class Echo(um.Model):
    name = "echo"
    inputs = {"text": um.Tensor("BYTES", [-1])}
    outputs = {"text": um.Tensor("BYTES", [-1])}

    def predict(self, text: np.ndarray) -> dict[str, np.ndarray]:
        return {"text": text}


class Matmul(um.Model):
    name = "matmul"
    max_batch_size = 64
    max_queue_delay_ms = 1.0
    inputs = {"x": um.Tensor("FP32", [DIM])}
    outputs = {"y": um.Tensor("FP32", [DIM])}

    def setup(self, ctx: um.Context) -> None:
        self.w_t = np.ascontiguousarray(weights().T)

    def predict(self, x: np.ndarray) -> dict[str, np.ndarray]:
        # [batch, 64] @ W.T is W @ x for every row.
        return {"y": np.tanh(x @ self.w_t)}
