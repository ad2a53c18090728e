"""The two peer-comparison models on LitServe, matmul with its dynamic batching.

python litserve_server.py --port 8000 [--batch-timeout 0.001]
POST /echo   {"text": "..."}    -> {"text": "..."}
POST /matmul {"x": [64 floats]} -> {"y": [64 floats]}
"""

import argparse

import litserve as ls
import numpy as np

DIM = 64


class EchoAPI(ls.LitAPI):
    def setup(self, device):
        pass

    def decode_request(self, request):
        return request["text"]

    def predict(self, text):
        return text

    def encode_response(self, output):
        return {"text": output}


class MatmulAPI(ls.LitAPI):
    def setup(self, device):
        self.w = (np.random.default_rng(0).standard_normal((DIM, DIM)) / 8).astype(np.float32)

    def decode_request(self, request):
        return np.asarray(request["x"], dtype=np.float32)

    def batch(self, inputs):
        return np.stack(inputs)

    def predict(self, x):
        # x: [batch, 64] (or [64] unbatched); rows @ W.T is W @ x per row.
        return np.tanh(x @ self.w.T)

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output):
        return {"y": output.tolist()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--batch-timeout", type=float, default=0.001)
    args = parser.parse_args()
    apis = [
        EchoAPI(api_path="/echo"),
        MatmulAPI(
            api_path="/matmul", max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout
        ),
    ]
    server = ls.LitServer(apis, accelerator="cpu", workers_per_device=1)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)
