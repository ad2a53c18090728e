"""Many concurrent clients: every request answered with its own row, and batches really form."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests
from umclient import Inp, decode, infer_json, plugin, wait_until

MODEL = "batch_probe"
MAX_BATCH = 32  # the plugin's max_batch_size
REQUESTS = 1000
CLIENTS = 64


def test_concurrent_requests_are_answered_correctly_and_batched(start_server):
    server = start_server(plugin("batch_probe.py"))
    local = threading.local()

    def one(i: int) -> tuple[int, int, int]:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        resp = infer_json(
            local.session, MODEL, [Inp("x", "INT64", [[i]])], base_url=server.base_url
        )
        result = decode(resp)
        return i, int(result.outputs["y"][0, 0]), int(result.outputs["batch"][0, 0])

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        answers = list(pool.map(one, range(REQUESTS)))
    elapsed = time.monotonic() - started

    assert len(answers) == REQUESTS
    wrong = [(i, y) for i, y, _ in answers if y != 3 * i + 1]
    assert not wrong, f"{len(wrong)} requests got another row's answer, e.g. {wrong[:5]}"
    sizes = [b for _, _, b in answers]
    assert all(1 <= b <= MAX_BATCH for b in sizes), sorted(set(sizes))
    assert (
        max(sizes) > 1
    ), f"no batching: every one of {REQUESTS} requests ran alone ({elapsed:.1f}s)"

    # Triton-style statistics agree: 1000 rows inferred in fewer executions, and the batch
    # sizes executed are exactly the ones the plugin reported.
    def stats_complete():
        resp = server.get(f"/v2/models/{MODEL}/stats")
        assert resp.status_code == 200, resp.text
        model_stats = resp.json()["model_stats"][0]
        return model_stats if model_stats["inference_count"] >= REQUESTS else None

    stats = wait_until(stats_complete, 5.0, "statistics to count every request")
    assert stats["name"] == MODEL
    assert stats["inference_count"] == REQUESTS
    assert stats["inference_stats"]["success"]["count"] == REQUESTS
    assert stats["execution_count"] < REQUESTS
    batch_stats = {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]}
    assert sum(size * count for size, count in batch_stats.items()) == REQUESTS
    assert sum(batch_stats.values()) == stats["execution_count"]
    assert set(sizes) == {size for size, count in batch_stats.items() if count > 0}
