"""Flow control: a full queue refuses with 429, client deadlines expire with 504, and work is
spread over every instance."""

import re
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from umclient import (
    Inp,
    decode,
    error_of,
    gated_burst,
    infer_json,
    model_gauge,
    plugin,
    wait_until,
)

MODEL = "slow"


def x_input(value: float) -> list[Inp]:
    return [Inp("x", "FP32", [value])]


def test_full_queue_answers_429_with_retry_after(start_server, tmp_path):
    gate = tmp_path / "gate"
    server = start_server(
        plugin("slow.py"),
        "--set",
        "delay_s=0",
        "--set",
        f"gate={gate}",
        "--queue-capacity",
        "2",
        "--request-timeout-ms",
        "120000",
    )
    clients = 24

    def one(i: int):
        return i, infer_json(server, MODEL, x_input(float(i)), timeout=(5.0, 120.0))

    # While the gate is shut at most four are accepted (two with the worker, two queued), so
    # at least twenty are refused, at the door: before anything accepted can finish.
    answers, early = gated_burst(clients, one, gate, refused=clients - 4)
    assert [resp.status_code for _, resp in early] == [429] * (clients - 4)
    statuses = sorted(resp.status_code for _, resp in answers)
    assert set(statuses) <= {200, 429}, statuses
    refused = [resp for _, resp in answers if resp.status_code == 429]
    served = [(i, resp) for i, resp in answers if resp.status_code == 200]
    assert served, statuses
    for resp in refused:
        assert re.fullmatch(r"\d+", resp.headers.get("Retry-After", "")), dict(resp.headers)
        assert "queue" in error_of(resp).lower()
    for i, resp in served:
        assert decode(resp).outputs["y"].tolist() == [2.0 * i]

    # The queue drained: the model serves again.
    assert decode(infer_json(server, MODEL, x_input(5.0))).outputs["y"].tolist() == [10.0]


def test_request_timeout_parameter_expires_in_the_queue(start_server, tmp_path):
    gate = tmp_path / "gate"
    server = start_server(
        plugin("slow.py"),
        "--set",
        "delay_s=0",
        "--set",
        f"gate={gate}",
        "--request-timeout-ms",
        "120000",
    )
    # Two requests occupy the single worker (one running, one pipelined) until the gate opens;
    # the third waits in the queue behind them with a 300ms deadline.
    with ThreadPoolExecutor(max_workers=2) as pool:
        ahead = [
            pool.submit(infer_json, server, MODEL, x_input(float(i)), timeout=(5.0, 60.0))
            for i in (1, 2)
        ]
        try:
            wait_until(
                lambda: model_gauge(server, "unimodel_inflight_requests", MODEL) == 2,
                30.0,
                "the two requests ahead to be in the server",
            )
            resp = infer_json(
                server, MODEL, x_input(3.0), parameters={"timeout": 300_000}, timeout=(5.0, 60.0)
            )
        finally:
            gate.touch()
        # Nothing could answer it but its deadline: the requests ahead were still held.
        message = error_of(resp, 504)
        assert re.search(r"time(d)?[ _-]?out", message, re.IGNORECASE), message
        for i, future in zip((1, 2), ahead, strict=True):
            assert decode(future.result(timeout=60)).outputs["y"].tolist() == [2.0 * i]

    # Without a deadline the same request is served.
    assert decode(infer_json(server, MODEL, x_input(3.0))).outputs["y"].tolist() == [6.0]


def test_requests_spread_over_instances(start_server):
    server = start_server(plugin("slow.py"), "--set", "delay_s=0.2", "--instances", "2")
    pids: set[int] = set()
    deadline = time.monotonic() + 60.0
    rounds = 0
    with ThreadPoolExecutor(max_workers=8) as pool:
        while len(pids) < 2 and time.monotonic() < deadline:
            rounds += 1
            results = pool.map(
                lambda i: decode(infer_json(server, MODEL, x_input(float(i)))), range(8)
            )
            for i, result in enumerate(results):
                assert result.outputs["y"].tolist() == [2.0 * i]
                pids.add(int(np.asarray(result.outputs["pid"])[0]))
    assert len(pids) == 2, f"requests reached worker pids {pids} after {rounds} rounds"
