"""One worker running many requests at once (`concurrency`, worker protocol v2), end to end.

Every ordering here comes from rendezvous inside the plugins (tests/plugins/many_at_once.py):
a request that needs others inside the same worker at the same time waits for them at a
barrier or an event, with a timeout that turns a missing partner into a 500. Each model
runs one instance, so "at once" means in one worker process.
"""

import json
import os
import re
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from umclient import Inp, decode, error_of, infer_binary, infer_json, plugin, wait_until

STREAM_TIMEOUT = (5.0, 60.0)
HTTP_TIMEOUT = (5.0, 60.0)
PLUGIN = plugin("many_at_once.py")


def gate(server, cmd: str, x: np.ndarray | None = None) -> requests.Response:
    x = np.zeros(1, np.uint8) if x is None else x
    inputs = [Inp("cmd", "BYTES", [cmd.encode()]), Inp("x", "UINT8", x)]
    return infer_binary(server, "gate", inputs, timeout=HTTP_TIMEOUT)


def out_of(resp: requests.Response) -> str:
    value = decode(resp).outputs["out"][0]
    return value.decode() if isinstance(value, bytes) else str(value)


def open_stream(server, n: int, tag: str) -> requests.Response:
    resp = requests.post(
        server.url("/v2/models/streams/generate_stream"),
        json={"n": n, "tag": tag},
        stream=True,
        timeout=STREAM_TIMEOUT,
    )
    assert resp.status_code == 200, resp.text
    return resp


def events(resp: requests.Response):
    for line in resp.iter_lines(decode_unicode=True):
        if line and line.startswith("data:"):
            yield json.loads(line[len("data:") :].strip())


@pytest.fixture(scope="module")
def server(start_module_server):
    return start_module_server(f"{PLUGIN}:Gate")


def test_requests_are_inside_an_async_predict_at_the_same_time(server):
    # The barrier opens only once 4 requests are inside the one worker's predict at once.
    for _ in range(2):
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: gate(server, "barrier"), range(4)))
        assert [out_of(a) for a in answers] == ["barrier"] * 4


def test_a_later_request_finishes_while_an_earlier_one_waits_for_it(server):
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(gate, server, "wait:b-done")
        # Returns only once the first request is inside its predict.
        assert out_of(gate(server, "wait:entered:b-done")).startswith("wait:entered:b-done")
        assert not first.done()
        assert out_of(gate(server, "set:b-done")) == "set:b-done"
        assert out_of(first.result(timeout=30)).startswith("wait:b-done after set")


def test_an_input_block_held_by_a_slow_request_does_not_hold_back_the_others(start_server):
    # A 1 MiB input arena: the slow request holds 600 kB of it while eight 300 kB requests
    # pass through the rest. Blocks are freed by id when each is answered; freed in
    # allocation order, the second of them would wait for the slow one for ever.
    server = start_server(f"{PLUGIN}:Gate", "--arena-bytes", str(1 << 20))
    big = np.full(600_000, 7, np.uint8)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(gate, server, "wait:slow", big)
        gate(server, "wait:entered:slow")  # the slow one is inside, holding its block
        for i in range(8):
            resp = gate(server, "pid", np.full(300_000, i, np.uint8))
            assert resp.status_code == 200, resp.text
        assert not slow.done()
        gate(server, "set:slow")
        assert out_of(slow.result(timeout=30)) == "wait:slow after set, 600000 bytes held"


def test_cancelling_one_request_leaves_the_others_running(server):
    before = int(decode(gate(server, "pid")).outputs["cancelled"][0])
    with ThreadPoolExecutor(1) as pool:
        waiter = pool.submit(gate, server, "wait:after-cancel")
        gate(server, "wait:entered:after-cancel")
        # A request whose client gives up: its predict is cancelled in the worker.
        with pytest.raises(requests.exceptions.ReadTimeout):
            infer_binary(
                server,
                "gate",
                [Inp("cmd", "BYTES", [b"hold"]), Inp("x", "UINT8", np.zeros(1, np.uint8))],
                timeout=(5.0, 1.0),
            )

        def cancelled_seen() -> bool:
            return int(decode(gate(server, "pid")).outputs["cancelled"][0]) > before

        wait_until(cancelled_seen, 15.0, "the worker to report the hold request cancelled")
        assert not waiter.done(), "the other request was disturbed"
        gate(server, "set:after-cancel")
        assert out_of(waiter.result(timeout=30)).startswith("wait:after-cancel after set")


def test_a_plain_predict_runs_in_a_pool_of_concurrency_threads(start_server):
    server = start_server(f"{PLUGIN}:Pool")

    def one(k: int) -> requests.Response:
        return infer_json(server, "pool", [Inp("k", "INT32", [k])], timeout=HTTP_TIMEOUT)

    with ThreadPoolExecutor(4) as pool:
        answers = [decode(r).outputs for r in pool.map(one, range(4))]
    assert sorted(int(a["k"][0]) for a in answers) == [0, 1, 2, 3]
    assert len({int(a["thread"][0]) for a in answers}) == 4


def test_config_toml_sets_how_many_requests_a_worker_runs_at_once(start_server, tmp_path):
    # The class says 4; config.toml says 6, and the plugin's barrier (sized by the served
    # `concurrency`) only opens once 6 requests are inside the one worker at once.
    model = tmp_path / "repo" / "pool6"
    model.mkdir(parents=True)
    (model / "plugin.py").write_text(Path(PLUGIN).read_text())
    (model / "config.toml").write_text('class = "Pool"\nconcurrency = 6\n')
    server = start_server.serve("--model-repository", str(tmp_path / "repo"))

    def one(k: int) -> requests.Response:
        return infer_json(server, "pool6", [Inp("k", "INT32", [k])], timeout=HTTP_TIMEOUT)

    with ThreadPoolExecutor(6) as pool:
        answers = [decode(r).outputs for r in pool.map(one, range(6))]
    assert len({int(a["thread"][0]) for a in answers}) == 6


def test_sixteen_generator_streams_interleave_in_one_worker(start_server):
    server = start_server(f"{PLUGIN}:Streams")

    def run(k: int) -> list[dict]:
        with open_stream(server, 8, f"sync{k}") as resp:
            return list(events(resp))

    # Each stream waits after its first token until all 16 have produced theirs.
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, range(16)))
    pids = set()
    for k, got in enumerate(results):
        assert [e.get("token", e.get("error")) for e in got] == [f"sync{k}-{i}" for i in range(8)]
        pids.update(e["pid"] for e in got)
    assert len(pids) == 1, "one worker served all 16 streams"


def test_cancelling_one_stream_leaves_the_others_streaming(start_server):
    server = start_server(f"{PLUGIN}:Streams")
    others = [open_stream(server, 40, tag) for tag in ("a", "b")]
    its = [events(r) for r in others]
    firsts = [next(it) for it in its]
    victim = open_stream(server, 1_000_000, "long")
    vit = events(victim)
    assert [next(vit)["token"], next(vit)["token"]] == ["long-0", "long-1"]
    victim.close()  # the client goes away mid-stream
    for tag, first, it, resp in zip(("a", "b"), firsts, its, others, strict=True):
        rest = list(it)
        resp.close()
        tokens = [first["token"]] + [e.get("token", e.get("error")) for e in rest]
        assert tokens == [f"{tag}-{i}" for i in range(40)], tokens[-3:]

    def closed_seen() -> bool:
        with open_stream(server, 1, "probe") as resp:
            return next(events(resp))["closed"] >= 1

    wait_until(closed_seen, 15.0, "the cancelled stream's generator to be closed")
    assert re.search(r"stream 'long' closed after \d+ tokens", server.log_text())


def test_a_worker_killed_with_several_requests_in_flight_answers_all_of_them(start_server):
    server = start_server(f"{PLUGIN}:Doomed")
    with ThreadPoolExecutor(4) as pool:
        calls = [
            pool.submit(
                infer_json, server, "doomed", [Inp("k", "INT32", [k])], timeout=HTTP_TIMEOUT
            )
            for k in range(4)
        ]
        found: dict[str, int] = {}

        def all_inside() -> bool:
            m = re.search(r"all 4 inside, pid (\d+)", server.log_text())
            if m:
                found["pid"] = int(m.group(1))
            return bool(m)

        wait_until(all_inside, 30.0, "four requests inside the worker")
        os.kill(found["pid"], signal.SIGKILL)
        for call in calls:
            message = error_of(call.result(timeout=30), 503)
            assert re.search(r"SIGKILL|signal 9", message), message
            assert "doomed" in message, message
    wait_until(
        lambda: server.get("/v2/models/doomed/ready").status_code == 200, 30.0, "a replacement"
    )
