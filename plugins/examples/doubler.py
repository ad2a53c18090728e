"""Doubler: the smallest batched UniModel plugin. ``y = x * factor`` for FP32 vectors.

Run and call it::

    unimodel run plugins/examples/doubler.py            # or: --set factor=3
    curl -s localhost:8000/v2/models/doubler/infer \\
      -d '{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2,3]}]}'

Requests are batched: up to 64 rows per `predict` call, waiting at most 1 ms for a batch
to fill. ``x`` arrives as a read-only ``[batch, n]`` view of shared memory.
"""

import numpy as np

import unimodel as um


class Doubler(um.Model):
    name = "doubler"
    max_batch_size = 64
    max_queue_delay_ms = 1.0
    inputs = {"x": um.Tensor("FP32", [-1])}
    outputs = {"y": um.Tensor("FP32", [-1])}

    def setup(self, ctx: um.Context) -> None:
        self.factor = np.float32(ctx.parameters.get("factor", "2"))

    def predict(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {"y": x * self.factor}
