"""Writes down every request it runs, per node, so a cluster test can prove none ran twice.

Each `predict` first appends the request's `id` (an INT64 the client makes unique) as one
line to `{calls_dir}/{node pid}.log`, where `calls_dir` is `--set calls_dir=PATH` (or
`[parameters] calls_dir` in config.toml) and the node pid is the worker's parent, the
`unimodel` process: every node, and every restart of a node, gets its own file without any
per-node configuration. Then it sleeps `delay_ms` (default 20) and answers the id and the
node pid, so a client also learns which node ran its request.

Unbatched and one instance: one call is one request, and a node's capacity (50 req/s at
20 ms) is set by the sleep, not by the CPU of a loaded test machine.
"""

import os
import time
from pathlib import Path

import numpy as np

import unimodel as um


class RunLog(um.Model):
    name = "run_log"
    max_batch_size = 0
    instances = 1
    inputs = {"id": um.Tensor("INT64", [1])}
    outputs = {"id": um.Tensor("INT64", [1]), "node_pid": um.Tensor("INT64", [1])}

    def setup(self, ctx):
        self.node_pid = os.getppid()
        self.path = Path(ctx.parameters["calls_dir"]) / f"{self.node_pid}.log"
        self.delay_s = float(ctx.parameters.get("delay_ms", "20")) / 1000.0

    def predict(self, id):
        # One short O_APPEND write per request: whole lines even if the node dies mid-run.
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{int(id[0])}\n")
        time.sleep(self.delay_s)
        return {"id": np.array(id, dtype=np.int64), "node_pid": np.array([self.node_pid])}
