"""Sleeps 20 ms per batch, then answers ``y = 2 * x``: a model whose capacity is set by time,
not by the CPU, for `benches/cluster.py` (3 nodes against 1 through the gateway).

Capacity of one node = ``max_batch_size`` rows per 20 ms per instance, fixed here at
2 rows x 1 instance = 100 req/s. That makes the comparison fair: at c=96 one node's queue
always holds more than a batch, and so does each of three nodes' (about 32 each), so every
batch is full in both set-ups and three nodes can do exactly three times one node's work.
Unbounded batching would hide the node count (one node would batch all 96 requests into one
20 ms call and match three); a small fixed batch and a fixed instance count per node do not.
The rates stay inside what two shared cores carry with debug builds (300 req/s for three
nodes; a debug node spends about 1 ms of CPU per request, measured here).

``--set delay_ms=N`` (or ``[parameters] delay_ms`` in config.toml) changes the sleep.
"""

import time

import numpy as np

import unimodel as um


class Sleep20ms(um.Model):
    name = "sleep_20ms"
    max_batch_size = 2
    max_queue_delay_ms = 1.0
    instances = 1
    inputs = {"x": um.Tensor("FP32", [-1])}
    outputs = {"y": um.Tensor("FP32", [-1])}

    def setup(self, ctx: um.Context) -> None:
        self.delay_s = float(ctx.parameters.get("delay_ms", "20")) / 1000.0

    def predict(self, x: np.ndarray) -> dict[str, np.ndarray]:
        time.sleep(self.delay_s)
        return {"y": x * np.float32(2)}
