"""Echo models for `benches/amplification.py` and `test_hostile_memory.py`.

What goes in comes back out, so a request's memory cost covers its body, its tensors and its
response.
"""

import unimodel as um


class EchoBytes(um.Model):
    name = "echo_bytes"
    max_batch_size = 0
    inputs = {"x": um.Tensor("BYTES", [-1])}
    outputs = {"y": um.Tensor("BYTES", [-1])}

    def predict(self, x):
        return {"y": x}


class EchoFp32(um.Model):
    name = "echo_fp32"
    max_batch_size = 0
    inputs = {"x": um.Tensor("FP32", [-1])}
    outputs = {"y": um.Tensor("FP32", [-1])}

    def predict(self, x):
        return {"y": x}
