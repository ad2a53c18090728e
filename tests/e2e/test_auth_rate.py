"""Per-caller rate limits (issue 4, item 9) against the real binary: a token bucket per API key
(`--rate-limit`/`--rate-limit-burst`, or the key's own `rps=`/`burst=` in the key file) and per
JWT subject. Past it: 429 with `Retry-After` (whole seconds) over REST, RESOURCE_EXHAUSTED
over gRPC; other callers are not affected; the caller is served again once the wait is over.
"""

import time

import jwt
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException
from umclient import REPO_ROOT

DOUBLER = str(REPO_ROOT / "plugins" / "examples" / "doubler.py")
SLOW_KEY = "slow-key-0123456789abcdef"
FAST_KEY = "fast-key-0123456789abcdef"
SECRET = "rate-limit-test-secret-0123456789abcdef"
BODY = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1]}]}


def infer(server, headers):
    return server.post("/v2/models/doubler/infer", json=BODY, headers=headers)


def token(sub: str) -> str:
    claims = {"sub": sub, "roles": ["infer"], "exp": int(time.time()) + 300}
    return jwt.encode(claims, SECRET, algorithm="HS256")


@pytest.fixture
def server(start_server, tmp_path):
    keys = tmp_path / "keys.txt"
    # The slow key's own line: 1 request per 2 s, bursts of 2. The fast key gets the flags'.
    keys.write_text(f"{SLOW_KEY} infer rps=0.5 burst=2\n{FAST_KEY} infer\n")
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    return start_server(
        DOUBLER,
        "--api-key-file",
        str(keys),
        "--jwt-secret-file",
        str(secret),
        "--rate-limit",
        "0.5",
        "--rate-limit-burst",
        "1",
    )


def test_a_key_past_its_bucket_gets_429_then_recovers(server):
    slow = {"X-API-Key": SLOW_KEY}
    assert infer(server, slow).status_code == 200
    assert infer(server, slow).status_code == 200
    limited = infer(server, slow)
    assert limited.status_code == 429, limited.text
    assert limited.json() == {"error": "rate limit exceeded"}
    retry_after = int(limited.headers["Retry-After"])
    assert 1 <= retry_after <= 2
    # Another key has its own bucket.
    assert infer(server, {"X-API-Key": FAST_KEY}).status_code == 200
    time.sleep(retry_after)
    assert infer(server, slow).status_code == 200
    assert infer(server, slow).status_code == 429
    # Health is not limited (and needs no key).
    for _ in range(5):
        assert server.get("/v2/health/ready").status_code == 200
    metrics = server.get("/metrics").text
    assert 'unimodel_auth_denials_total{protocol="rest",outcome="rate_limited"} 2' in metrics


def test_jwt_subjects_have_buckets_by_sub(server):
    alice = {"Authorization": f"Bearer {token('alice')}"}
    assert infer(server, alice).status_code == 200
    # A new token for the same subject draws from the same bucket.
    again = infer(server, {"Authorization": f"Bearer {token('alice')}"})
    assert again.status_code == 429
    assert int(again.headers["Retry-After"]) == 2
    assert infer(server, {"Authorization": f"Bearer {token('bob')}"}).status_code == 200


def test_grpc_answers_resource_exhausted(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    x = grpcclient.InferInput("x", [1, 1], "FP32")
    x.set_data_from_numpy(np.array([[1]], dtype=np.float32))
    headers = {"x-api-key": FAST_KEY}
    assert client.infer("doubler", [x], headers=headers).as_numpy("y").tolist() == [[2.0]]
    with pytest.raises(InferenceServerException) as info:
        client.infer("doubler", [x], headers=headers)
    assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert info.value.message() == "rate limit exceeded"
    # The server keeps serving others.
    other = {"authorization": f"Bearer {token('carol')}"}
    assert client.infer("doubler", [x], headers=other).as_numpy("y").tolist() == [[2.0]]
