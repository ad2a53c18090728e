"""A small numpy MLP: 4 features in, softmax over 3 classes out, batched.

Run and call it::

    unimodel run plugins/examples/mlp.py
    curl -s localhost:8000/v2/models/mlp/infer \\
      -d '{"inputs":[{"name":"features","shape":[1,4],"datatype":"FP32","data":[5.1,3.5,1.4,0.2]}]}'

The weights are random but fixed (seeded in `setup`, ``--set seed=N`` changes them), so the
answers are reproducible; a real plugin would load its weights from ``ctx.model_dir``.
"""

import numpy as np

import unimodel as um


class MLP(um.Model):
    name = "mlp"
    max_batch_size = 32
    max_queue_delay_ms = 2.0
    inputs = {"features": um.Tensor("FP32", [4])}
    outputs = {"probabilities": um.Tensor("FP32", [3])}

    def setup(self, ctx: um.Context) -> None:
        rng = np.random.default_rng(int(ctx.parameters.get("seed", "0")))
        hidden = int(ctx.parameters.get("hidden", "16"))
        self.w1 = rng.standard_normal((4, hidden)).astype(np.float32) * 0.5
        self.b1 = np.zeros(hidden, np.float32)
        self.w2 = rng.standard_normal((hidden, 3)).astype(np.float32) * 0.5
        self.b2 = np.zeros(3, np.float32)
        ctx.logger.info("mlp ready: 4 -> %d -> 3", hidden)

    def predict(self, features: np.ndarray) -> dict[str, np.ndarray]:
        h = np.maximum(features @ self.w1 + self.b1, 0.0)  # [batch, hidden], ReLU
        logits = h @ self.w2 + self.b2
        logits -= logits.max(axis=1, keepdims=True)  # numerically stable softmax
        e = np.exp(logits)
        return {"probabilities": e / e.sum(axis=1, keepdims=True)}
