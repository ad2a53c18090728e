"""Reports, per row, the size of the batch the plugin was called with.

Used to prove the dynamic batcher really concatenates concurrent requests: "y" = 3x + 1 checks
each request got its own row back, "batch" is the batch size `predict` saw.
"""

import time

import numpy as np

import unimodel as um


class BatchProbe(um.Model):
    name = "batch_probe"
    max_batch_size = 32
    max_queue_delay_ms = 5.0
    inputs = {"x": um.Tensor("INT64", [1])}
    outputs = {"y": um.Tensor("INT64", [1]), "batch": um.Tensor("INT64", [1])}

    def setup(self, ctx):
        self.hold_s = float(ctx.parameters.get("hold_s", "0.002"))

    def predict(self, x):
        # Holding the worker briefly lets concurrent requests pile up behind the running batch.
        time.sleep(self.hold_s)
        rows = x.shape[0]
        return {"y": x * 3 + 1, "batch": np.full((rows, 1), rows, dtype=np.int64)}
