"""Echoes a BYTES tensor and reports each element's length in bytes.

"length" proves the plugin received `bytes` (UTF-8 encoded), not `str`: a `str` element makes
`predict` raise TypeError instead.
"""

import numpy as np

import unimodel as um


class BytesEcho(um.Model):
    name = "bytes_echo"
    max_batch_size = 0
    inputs = {"text": um.Tensor("BYTES", [-1])}
    outputs = {"echo": um.Tensor("BYTES", [-1]), "length": um.Tensor("INT64", [-1])}

    def setup(self, ctx):
        self.instance = ctx.instance

    def predict(self, text):
        items = list(text.ravel())
        for item in items:
            if not isinstance(item, bytes):
                raise TypeError(f"BYTES element arrived as {type(item).__name__}, not bytes")
        echo = np.empty(len(items), dtype=object)
        echo[:] = items
        lengths = np.array([len(item) for item in items], dtype=np.int64)
        return {"echo": echo.reshape(text.shape), "length": lengths.reshape(text.shape)}
