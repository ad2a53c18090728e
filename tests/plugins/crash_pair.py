"""Two models in one file, each with its own worker: one to kill, one that must not notice.

"victim" sleeps x seconds when x > 0, after writing a marker file named after its pid into the
directory given by `--set marker_dir=...`, so a test knows the request is inside `predict`
before it kills the worker. Both models return their worker's pid.
"""

import os
import time
from pathlib import Path

import numpy as np

import unimodel as um


class Victim(um.Model):
    name = "victim"
    max_batch_size = 0
    inputs = {"x": um.Tensor("FP32", [1])}
    outputs = {"pid": um.Tensor("INT64", [1])}

    def setup(self, ctx):
        self.marker_dir = Path(ctx.parameters["marker_dir"])

    def predict(self, x):
        seconds = float(x[0])
        if seconds > 0:
            (self.marker_dir / str(os.getpid())).write_text("in predict\n")
            time.sleep(seconds)
        return {"pid": np.array([os.getpid()], dtype=np.int64)}


class Bystander(um.Model):
    name = "bystander"
    max_batch_size = 0
    inputs = {"x": um.Tensor("FP32", [1])}
    outputs = {"y": um.Tensor("FP32", [1]), "pid": um.Tensor("INT64", [1])}

    def setup(self, ctx):
        self.pid = os.getpid()

    def predict(self, x):
        return {
            "y": (x + 1).astype(np.float32),
            "pid": np.array([self.pid], dtype=np.int64),
        }
