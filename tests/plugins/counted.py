"""Slow models that write down every call, so a test can prove a request never cost one.

Each `predict` first appends one line to the file named by `--set calls_file=PATH`:
"<model> <x values of the batch, comma-separated>", then sleeps `delay_s` (default 1.0).
A request whose x value never appears in the file never reached `predict`. With `--set
gate=PATH`, "counted" also holds each call until the file PATH exists, so a test decides when
the worker becomes free instead of racing the delay.

"counted" is unbatched (one request per call); "counted_batch" batches up to 8 rows and
waits up to a minute for a batch to fill, so a test can cancel some requests of a forming
batch and then complete it, with no race against the delay.

"ticker" is a generator: it yields `count` ticks `delay_ms` apart and, in its `finally`,
appends "ticker <tag> stopped after <n>" to the file, so a test sees the generator end.
"""

import time
from pathlib import Path

import numpy as np

import unimodel as um


def _append(path: str, line: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


class Counted(um.Model):
    name = "counted"
    max_batch_size = 0
    instances = 1
    inputs = {"x": um.Tensor("FP32", [1])}
    outputs = {"y": um.Tensor("FP32", [1])}

    def setup(self, ctx):
        self.calls_file = ctx.parameters["calls_file"]
        self.delay_s = float(ctx.parameters.get("delay_s", "1.0"))
        gate = ctx.parameters.get("gate")
        self.gate = Path(gate) if gate else None

    def predict(self, x):
        values = ",".join(f"{v:g}" for v in np.asarray(x).ravel())
        _append(self.calls_file, f"{self.name} {values}")
        # Another process creates the file: there is no event to wait on but its appearance.
        while self.gate is not None and not self.gate.exists():
            time.sleep(0.005)
        time.sleep(self.delay_s)
        return {"y": (x * 2).astype(np.float32)}


class CountedBatch(Counted):
    name = "counted_batch"
    max_batch_size = 8
    max_queue_delay_ms = 60_000.0

    def setup(self, ctx):
        super().setup(ctx)
        self.delay_s = float(ctx.parameters.get("batch_delay_s", "0.1"))
        self.gate = None


class Ticker(um.Model):
    name = "ticker"
    max_batch_size = 0
    instances = 1
    inputs = {"tag": um.Tensor("BYTES", [1]), "count": um.Tensor("INT32", [1])}
    outputs = {"tick": um.Tensor("INT32", [1])}

    def setup(self, ctx):
        self.calls_file = ctx.parameters["calls_file"]
        self.delay_s = float(ctx.parameters.get("tick_ms", "20")) / 1000.0

    def predict(self, tag, count):
        sent = 0
        try:
            for i in range(int(count[0])):
                time.sleep(self.delay_s)
                yield {"tick": np.array([i], np.int32)}
                sent += 1
        finally:
            _append(self.calls_file, f"ticker {tag[0].decode()} stopped after {sent}")
