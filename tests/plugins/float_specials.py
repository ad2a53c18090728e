"""Echoes float tensors and makes NaN and the infinities of its own (issue 15, item 6).

"floats" echoes an FP32 input as FP32, FP64 and FP16 (NaN and ±Inf survive each cast) and
adds "made", always [nan, inf, -inf], so a response must carry them even when the request
had none. "floats64" echoes an FP64 input, so FP64 is read as well as written.
"""

import numpy as np

import unimodel as um

SPECIALS = np.array([np.nan, np.inf, -np.inf], dtype=np.float32)


class Floats(um.Model):
    name = "floats"
    max_batch_size = 0
    inputs = {"x": um.Tensor("FP32", [-1])}
    outputs = {
        "y": um.Tensor("FP32", [-1]),
        "y64": um.Tensor("FP64", [-1]),
        "y16": um.Tensor("FP16", [-1]),
        "made": um.Tensor("FP32", [3]),
    }

    def predict(self, x):
        return {
            "y": x.copy(),
            "y64": x.astype(np.float64),
            "y16": x.astype(np.float16),
            "made": SPECIALS.copy(),
        }


class Floats64(um.Model):
    name = "floats64"
    max_batch_size = 0
    inputs = {"x": um.Tensor("FP64", [-1])}
    outputs = {"y": um.Tensor("FP64", [-1])}

    def predict(self, x):
        return {"y": x.copy()}


class Rows(um.Model):
    """A batching echo: a request of shape [1, 3] is one row of three."""

    name = "rows"
    max_batch_size = 4
    inputs = {"x": um.Tensor("FP32", [-1])}
    outputs = {"y": um.Tensor("FP32", [-1])}

    def predict(self, x):
        return {"y": x.copy()}
