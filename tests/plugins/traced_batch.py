"""Logs through ctx.logger and print in a batched `predict`, so the e2e tests can see which
trace ids the worker's log lines of one batch carry."""

import time

import numpy as np

import unimodel as um

MARK = "traced-batch-e2e-77a1"


class TracedBatch(um.Model):
    name = "traced_batch"
    max_batch_size = 8
    max_queue_delay_ms = 1.0
    inputs = {"x": um.Tensor("FP32", [1])}
    outputs = {"y": um.Tensor("FP32", [1])}

    def setup(self, ctx):
        self.logger = ctx.logger

    def predict(self, x):
        rows = x.shape[0]
        self.logger.info(f"{MARK} rows={rows}")
        print(f"{MARK} printed rows={rows}")
        # Holding the worker lets concurrent requests form the next batch behind this one.
        time.sleep(0.05)
        return {"y": np.array(x, dtype=np.float32)}
