"""Identity over one FP32 vector, unbatched: what `shmbench` pushes 64 MiB tensors through."""

import unimodel as um


class IdentityFp32(um.Model):
    name = "identity_fp32"
    max_batch_size = 0
    inputs = {"x": um.Tensor("FP32", [-1])}
    outputs = {"y": um.Tensor("FP32", [-1])}

    def predict(self, x):
        return {"y": x}
