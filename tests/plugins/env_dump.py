"""Answers with its worker's environment (a JSON object, one BYTES element) and its pid, so a
test can see exactly which variables a worker process was given."""

import json
import os

import numpy as np

import unimodel as um


class EnvDump(um.Model):
    name = "env_dump"
    max_batch_size = 0
    inputs = {"x": um.Tensor("FP32", [-1])}
    outputs = {"env": um.Tensor("BYTES", [1]), "pid": um.Tensor("INT64", [1])}

    def predict(self, x):
        env = json.dumps(dict(os.environ)).encode()
        return {"env": np.array([env], dtype=object), "pid": np.array([os.getpid()], np.int64)}
