"""Models for the shared-memory tests (tests/e2e/test_shm.py).

- `identity`: unbatched FP32 identity, the zero-copy path's simplest case.
- `mixed`: batched, two inputs of two datatypes and two outputs, so that one request can mix
  JSON, binary and shared-memory tensors, and concurrent requests batch together.
- `mixed_four`: `mixed` in batches of exactly four rows: it waits up to a minute for the
  fourth, so four concurrent requests always share one batch, however slowly they arrive.
- `slow_identity`: identity after `delay_s` seconds (default 0.5), to keep requests queued
  while a test unregisters their region.
"""

import time

import numpy as np

import unimodel as um


class Identity(um.Model):
    name = "identity"
    max_batch_size = 0
    inputs = {"x": um.Tensor("FP32", [-1])}
    outputs = {"y": um.Tensor("FP32", [-1])}

    def predict(self, x):
        return {"y": x}


class Mixed(um.Model):
    name = "mixed"
    max_batch_size = 8
    max_queue_delay_ms = 300.0
    inputs = {"a": um.Tensor("FP32", [4]), "b": um.Tensor("INT32", [4])}
    outputs = {"sum": um.Tensor("FP32", [4]), "neg": um.Tensor("INT32", [4])}

    def predict(self, a, b):
        return {"sum": (a + b).astype(np.float32), "neg": -b}


class MixedFour(Mixed):
    name = "mixed_four"
    max_batch_size = 4
    max_queue_delay_ms = 60_000.0


class SlowIdentity(um.Model):
    name = "slow_identity"
    max_batch_size = 0
    inputs = {"x": um.Tensor("FP32", [-1])}
    outputs = {"y": um.Tensor("FP32", [-1])}

    def setup(self, ctx):
        self.delay_s = float(ctx.parameters.get("delay_s", "0.5"))

    def predict(self, x):
        time.sleep(self.delay_s)
        return {"y": x + 1}


class MapsProbe(um.Model):
    """Identity that also reports which /dev/shm segments its worker has mapped: a client
    segment shows up only if the core handed it over instead of copying its bytes."""

    name = "maps_probe"
    max_batch_size = 0
    inputs = {"x": um.Tensor("FP32", [-1])}
    outputs = {"y": um.Tensor("FP32", [-1]), "mapped": um.Tensor("BYTES", [-1])}

    def predict(self, x):
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "/dev/shm/" in line})
        return {"y": x, "mapped": np.array([p.encode() for p in paths], dtype=object)}
