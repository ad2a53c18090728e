"""Takes `delay_s` seconds per call (`--set delay_s=...`, default 0.2); returns 2x and its pid.

Unbatched, so every request is one call: queue depth, timeouts, draining and instance spread
become easy to reason about. With `--set gate=PATH` each call also waits until the file PATH
exists, so a test decides when work finishes instead of racing a delay: what it sees before
it creates the file cannot depend on the machine's speed.
"""

import os
import time
from pathlib import Path

import numpy as np

import unimodel as um


class Slow(um.Model):
    name = "slow"
    max_batch_size = 0
    instances = 1
    inputs = {"x": um.Tensor("FP32", [1])}
    outputs = {"y": um.Tensor("FP32", [1]), "pid": um.Tensor("INT64", [1])}

    def setup(self, ctx):
        self.delay_s = float(ctx.parameters.get("delay_s", "0.2"))
        gate = ctx.parameters.get("gate")
        self.gate = Path(gate) if gate else None

    def predict(self, x):
        # Another process creates the file: there is no event to wait on but its appearance.
        while self.gate is not None and not self.gate.exists():
            time.sleep(0.005)
        time.sleep(self.delay_s)
        return {
            "y": (x * 2).astype(np.float32),
            "pid": np.array([os.getpid()], dtype=np.int64),
        }
