"""Models for the hostile shared-memory tests (tests/e2e/test_hostile_shm.py): doublers of
FP32 [4], batched and not, some gated so that a test can shrink a client segment while a
request is inside `predict`.

- `doubler`: batched (up to 32 rows, 200 ms batching delay), so concurrent requests share a
  batch and the core assembles inputs and splits outputs.
- `doubler_lone`: unbatched: each request alone, its client memory handed to the worker.
- `gated_lone`: unbatched; `predict` touches the file `entered` (`--set entered=PATH`), then
  waits until the file `gate` (`--set gate=PATH`) exists.
- `gated_pair`: as `gated_lone`, batched in pairs exactly (it waits up to a minute for the
  second request), so two requests always share one batch.
"""

import time
from pathlib import Path

import numpy as np

import unimodel as um


class Doubler(um.Model):
    name = "doubler"
    max_batch_size = 32
    max_queue_delay_ms = 200.0
    inputs = {"x": um.Tensor("FP32", [4])}
    outputs = {"y": um.Tensor("FP32", [4])}

    def predict(self, x):
        return {"y": (x * 2).astype(np.float32)}


class DoublerLone(Doubler):
    name = "doubler_lone"
    max_batch_size = 0


class GatedLone(Doubler):
    name = "gated_lone"
    max_batch_size = 0

    def setup(self, ctx):
        self.entered = Path(ctx.parameters.get("entered", "/nonexistent-entered"))
        self.gate = Path(ctx.parameters.get("gate", "/nonexistent-gate"))

    def predict(self, x):
        self.entered.touch()
        # Another process creates the file: there is no event to wait on but its appearance.
        while not self.gate.exists():
            time.sleep(0.005)
        return {"y": (x * 2).astype(np.float32)}


class GatedPair(GatedLone):
    name = "gated_pair"
    max_batch_size = 2
    max_queue_delay_ms = 60_000.0
