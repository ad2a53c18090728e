"""The two peer-comparison models behind a plain FastAPI app (no batching): the baseline of
what one Python process answers per request.

    python fastapi_server.py --port 8000
    POST /echo   {"text": "..."}    -> {"text": "..."}
    POST /matmul {"x": [64 floats]} -> {"y": [64 floats]}
"""

import argparse

import numpy as np
import uvicorn
from fastapi import FastAPI

DIM = 64
W = (np.random.default_rng(0).standard_normal((DIM, DIM)) / 8).astype(np.float32)

app = FastAPI()


@app.post("/echo")
async def echo(body: dict) -> dict:
    return {"text": body["text"]}


@app.post("/matmul")
async def matmul(body: dict) -> dict:
    x = np.asarray(body["x"], dtype=np.float32)
    return {"y": np.tanh(W @ x).tolist()}


@app.get("/health")
async def health() -> dict:
    return {"ok": True}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
