"""Writes a Triton model repository with the two peer-comparison models as Python-backend
models, for the stock ``tritonserver`` binary (the one inside the nvidia-pytriton wheel).

    python make_triton_repo.py OUT_DIR --delay-us 100 --site-packages VENV_SITE_PACKAGES

``matmul`` gets ``dynamic_batching`` with the given ``max_queue_delay_microseconds`` (0: it
still batches what is already queued) and one CPU instance; ``echo`` does not batch.

The Python-backend stub embeds its interpreter in isolated mode (PYTHONPATH is ignored), so
each model.py first puts the venv's site-packages (numpy) on ``sys.path``.
"""

import argparse
import pathlib
import textwrap

ECHO_CONFIG = """\
name: "echo"
backend: "python"
max_batch_size: 0
input [ { name: "text" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "text" data_type: TYPE_STRING dims: [ 1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""

MATMUL_CONFIG = """\
name: "matmul"
backend: "python"
max_batch_size: 64
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ 64 ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ 64 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""

PRELUDE = """\
import sys

sys.path.insert(0, {site!r})
"""

ECHO_MODEL = """\
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "text").as_numpy()
            responses.append(
                pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("text", text)])
            )
        return responses
"""

MATMUL_MODEL = """\
import numpy as np
import triton_python_backend_utils as pb_utils

DIM = 64


class TritonPythonModel:
    def initialize(self, args):
        w = (np.random.default_rng(0).standard_normal((DIM, DIM)) / 8).astype(np.float32)
        self.w_t = np.ascontiguousarray(w.T)

    def execute(self, requests):
        # One matmul over every request of the batch, then split back per request.
        xs = [pb_utils.get_input_tensor_by_name(r, "x").as_numpy() for r in requests]
        y = np.tanh(np.concatenate(xs) @ self.w_t).astype(np.float32)
        responses, at = [], 0
        for x in xs:
            part = y[at : at + len(x)]
            at += len(x)
            responses.append(
                pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("y", part)])
            )
        return responses
"""


def write(root: pathlib.Path, name: str, config: str, model: str, site: str) -> None:
    (root / name / "1").mkdir(parents=True, exist_ok=True)
    (root / name / "config.pbtxt").write_text(config)
    text = PRELUDE.format(site=site) + "\n" + textwrap.dedent(model)
    (root / name / "1" / "model.py").write_text(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--delay-us", type=int, default=100)
    parser.add_argument("--site-packages", required=True)
    args = parser.parse_args()
    write(args.out, "echo", ECHO_CONFIG, ECHO_MODEL, args.site_packages)
    matmul = MATMUL_CONFIG.format(delay_us=args.delay_us)
    write(args.out, "matmul", matmul, MATMUL_MODEL, args.site_packages)
