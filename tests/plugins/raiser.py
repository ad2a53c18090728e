"""Raises ValueError on a negative input; otherwise returns x and the worker's pid."""

import os

import numpy as np

import unimodel as um


class Raiser(um.Model):
    name = "raiser"
    max_batch_size = 0
    inputs = {"x": um.Tensor("FP32", [1])}
    outputs = {"y": um.Tensor("FP32", [1]), "pid": um.Tensor("INT64", [1])}

    def setup(self, ctx):
        self.pid = os.getpid()

    def predict(self, x):
        value = float(x[0])
        if value < 0:
            raise ValueError(f"negative input rejected by raiser: {value}")
        return {"y": np.array(x, dtype=np.float32), "pid": np.array([self.pid], dtype=np.int64)}
