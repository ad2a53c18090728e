"""Writes a traceback-sized burst to stderr on every call (issue 15 item 2).

Each `predict` prints `lines` lines (parameter, default 100) to stderr, as a plugin that logs
a traceback per failing request would: the core re-emits worker output through its log, so
a stderr nobody reads must stall neither the core nor this worker.
"""

import sys

import numpy as np

import unimodel as um


class Noisy(um.Model):
    name = "noisy"
    max_batch_size = 0
    inputs = {"x": um.Tensor("FP32", [1])}
    outputs = {"y": um.Tensor("FP32", [1])}

    def setup(self, ctx):
        self.lines = int(ctx.parameters.get("lines", "100"))

    def predict(self, x):
        for i in range(self.lines):
            print(f"noisy line {i} of a long traceback-like burst", file=sys.stderr)
        sys.stderr.flush()
        return {"y": np.array(x, dtype=np.float32)}
