"""Batched arithmetic with several output datatypes.

The e2e reference model for JSON vs binary results, requested-output filtering and input
validation: two inputs ("vals" FP32 [-1], "mult" INT32 [1]) and five outputs of four datatypes.
"""

import numpy as np

import unimodel as um


class Arith(um.Model):
    name = "arith"
    max_batch_size = 4
    max_queue_delay_ms = 1.0
    inputs = {"vals": um.Tensor("FP32", [-1]), "mult": um.Tensor("INT32", [1])}
    outputs = {
        "total": um.Tensor("FP32", [1]),
        "scaled": um.Tensor("FP32", [-1]),
        "positive": um.Tensor("BOOL", [1]),
        "third": um.Tensor("FP64", [-1]),
        "count": um.Tensor("INT64", [1]),
    }

    def setup(self, ctx):
        self.instance = ctx.instance

    def predict(self, vals, mult):
        total = vals.sum(axis=1, keepdims=True, dtype=np.float32)
        return {
            "total": total,
            "scaled": (vals * mult).astype(np.float32),
            "positive": total > 0,
            "third": vals.astype(np.float64) / 3.0,
            "count": np.full((vals.shape[0], 1), vals.shape[1], dtype=np.int64),
        }
