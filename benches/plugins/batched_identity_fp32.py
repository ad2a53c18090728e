"""Identity over one FP32 vector, batched: what `benches/shm_batched.py` sends concurrent
shared-memory requests through, so that the core assembles them into one batch."""

import unimodel as um


class BatchedIdentityFp32(um.Model):
    name = "batched_identity_fp32"
    max_batch_size = 8
    max_queue_delay_ms = 20.0
    inputs = {"x": um.Tensor("FP32", [-1])}
    outputs = {"y": um.Tensor("FP32", [-1])}

    def predict(self, x):
        return {"y": x}
