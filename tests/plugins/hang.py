"""Hangs in `predict` when x > 0 (past any execution timeout); otherwise returns its pid."""

import os
import time

import numpy as np

import unimodel as um


class Hang(um.Model):
    name = "hang"
    max_batch_size = 0
    inputs = {"x": um.Tensor("FP32", [1])}
    outputs = {"pid": um.Tensor("INT64", [1])}

    def setup(self, ctx):
        self.pid = os.getpid()

    def predict(self, x):
        if float(x[0]) > 0:
            time.sleep(3600)
        return {"pid": np.array([self.pid], dtype=np.int64)}
