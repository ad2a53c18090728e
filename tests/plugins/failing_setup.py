"""A model whose `setup` raises every time: it must end FAILED with this traceback."""

import numpy as np

import unimodel as um

MESSAGE = "setup exploded on purpose (e2e marker 5821)"


class FailingSetup(um.Model):
    name = "broken"
    max_batch_size = 0
    inputs = {"x": um.Tensor("FP32", [1])}
    outputs = {"y": um.Tensor("FP32", [1])}

    def setup(self, ctx):
        load_weights()

    def predict(self, x):
        return {"y": np.array(x, dtype=np.float32)}


def load_weights():
    raise RuntimeError(MESSAGE)
