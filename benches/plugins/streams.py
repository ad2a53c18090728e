"""Token streams for benches/streams.py: the same async generator served two ways.

Each request yields `n` tokens; before each it awaits `step_ms` (one decode step of an
engine that runs on an accelerator and frees the CPU meanwhile). "interleaved" runs 16
requests in one worker at once (`concurrency = 16`); "one_at_a_time" is the same code with
`concurrency = 1`. Both have one instance, so every stream of a model goes through one
worker process.
"""

import asyncio

import numpy as np

import unimodel as um


class Interleaved(um.Model):
    name = "interleaved"
    concurrency = 16
    inputs = {"n": um.Tensor("INT32", [1]), "step_ms": um.Tensor("FP32", [1])}
    outputs = {"token": um.Tensor("INT32", [1])}

    async def predict(self, n, step_ms):
        step = float(step_ms[0]) / 1000.0
        for i in range(int(n[0])):
            await asyncio.sleep(step)
            yield {"token": np.array([i], np.int32)}


class OneAtATime(Interleaved):
    name = "one_at_a_time"
    concurrency = 1
