"""Exits its worker process (status 3) on a negative input; otherwise returns 2x and its pid.

A crash on command, for tests that need a worker restart at a moment they choose.
"""

import os

import numpy as np

import unimodel as um


class Exiter(um.Model):
    name = "exiter"
    max_batch_size = 0
    inputs = {"x": um.Tensor("FP32", [1])}
    outputs = {"y": um.Tensor("FP32", [1]), "pid": um.Tensor("INT64", [1])}

    def setup(self, ctx):
        self.pid = os.getpid()

    def predict(self, x):
        if float(x[0]) < 0:
            os._exit(3)
        return {"y": (x * 2).astype(np.float32), "pid": np.array([self.pid], dtype=np.int64)}
