"""Prints to stdout and logs through ctx.logger in `setup` and `predict`.

The e2e test looks for each marker in the server's log, on a line that names the model.
"""

import numpy as np

import unimodel as um

MARK = "chatty-e2e-3f9c"


class Chatty(um.Model):
    name = "chatty"
    max_batch_size = 0
    inputs = {"x": um.Tensor("FP32", [1])}
    outputs = {"y": um.Tensor("FP32", [1])}

    def setup(self, ctx):
        self.logger = ctx.logger
        print(f"{MARK} setup-print", flush=True)
        self.logger.info(f"{MARK} setup-logger")

    def predict(self, x):
        print(f"{MARK} predict-print", flush=True)
        self.logger.info(f"{MARK} predict-logger")
        return {"y": np.array(x, dtype=np.float32)}
