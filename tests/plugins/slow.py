"""Takes `delay_s` seconds per call (`--set delay_s=...`, default 0.2); returns 2x and its pid.

Unbatched, so every request is one call: queue depth, timeouts, draining and instance spread
become easy to reason about.
"""

import os
import time

import numpy as np

import unimodel as um


class Slow(um.Model):
    name = "slow"
    max_batch_size = 0
    instances = 1
    inputs = {"x": um.Tensor("FP32", [1])}
    outputs = {"y": um.Tensor("FP32", [1]), "pid": um.Tensor("INT64", [1])}

    def setup(self, ctx):
        self.delay_s = float(ctx.parameters.get("delay_s", "0.2"))

    def predict(self, x):
        time.sleep(self.delay_s)
        return {
            "y": (x * 2).astype(np.float32),
            "pid": np.array([os.getpid()], dtype=np.int64),
        }
