"""Generator plugins for the streaming tests.

"tokens" yields `count` tokens made from `prompt` ("<prompt>-<i>"), sleeping `delay_ms` before
each. Every chunk also carries the worker's pid and how many of this worker's generators have
been closed early (`GeneratorExit`, i.e. cancelled), so a test can see a cancelled generator
stop from a later request. The prompt "boom" raises after two tokens.

"plain" is an ordinary (non-generator) model: y = 2x.
"""

import os
import time

import numpy as np

import unimodel as um


class Tokens(um.Model):
    name = "tokens"
    max_batch_size = 0
    inputs = {
        "prompt": um.Tensor("BYTES", [1]),
        "count": um.Tensor("INT32", [1]),
        "delay_ms": um.Tensor("FP32", [1]),
    }
    outputs = {
        "token": um.Tensor("BYTES", [1]),
        "index": um.Tensor("INT32", [1]),
        "pid": um.Tensor("INT64", [1]),
        "closed": um.Tensor("INT64", [1]),
    }

    def setup(self, ctx):
        self.logger = ctx.logger
        self.closed = 0

    def predict(self, prompt, count, delay_ms):
        text = prompt[0].decode()
        sent = 0
        try:
            for i in range(int(count[0])):
                if text == "boom" and i == 2:
                    raise ValueError("boom after two tokens")
                time.sleep(float(delay_ms[0]) / 1000.0)
                yield {
                    "token": np.array([f"{text}-{i}".encode()], dtype=object),
                    "index": np.array([i], np.int32),
                    "pid": np.array([os.getpid()], np.int64),
                    "closed": np.array([self.closed], np.int64),
                }
                sent += 1
        except GeneratorExit:
            self.closed += 1
            self.logger.info("generator for %r closed after %d tokens", text, sent)
            raise


class Plain(um.Model):
    name = "plain"
    max_batch_size = 0
    inputs = {"x": um.Tensor("FP32", [-1])}
    outputs = {"y": um.Tensor("FP32", [-1])}

    def predict(self, x):
        return {"y": (x * 2).astype(np.float32)}
