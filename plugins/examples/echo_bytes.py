"""Echo: returns its BYTES input unchanged, one request at a time (no batching).

Run and call it::

    unimodel run plugins/examples/echo_bytes.py
    curl -s localhost:8000/v2/models/echo_bytes/infer \\
      -d '{"inputs":[{"name":"text","shape":[2],"datatype":"BYTES","data":["héllo","wörld"]}]}'

BYTES tensors arrive as numpy object arrays of ``bytes``; any sequence of ``str`` or
``bytes`` may be returned.
"""

import numpy as np

import unimodel as um


class EchoBytes(um.Model):
    inputs = {"text": um.Tensor("BYTES", [-1])}
    outputs = {"text": um.Tensor("BYTES", [-1])}

    def predict(self, text: np.ndarray) -> dict[str, np.ndarray]:
        return {"text": text}
