"""Generator plugins end to end: `/generate` and `/generate_stream` (Server-Sent Events).

Every chunk arrives in order and the stream ends; concurrent streams keep their own values; a
client that goes away stops its generator (the plugin sees `GeneratorExit`) and the worker
serves the next request; a plugin exception or a killed worker mid-stream ends the stream
with an error event and the model serves again; ordinary models answer once; bad input is an
ordinary 400 before any stream starts.
"""

import json
import os
import re
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from umclient import error_of, plugin, python_bin, run_cli, wait_until

STREAM_TIMEOUT = (5.0, 30.0)


@pytest.fixture(scope="module")
def server(start_module_server):
    return start_module_server(plugin("tokens.py"), "--instances", "2")


def tokens_body(prompt: str, count: int, delay_ms: float = 0.0) -> dict:
    return {"prompt": prompt, "count": count, "delay_ms": delay_ms}


def open_stream(server, body: dict, model: str = "tokens") -> requests.Response:
    return requests.post(
        server.url(f"/v2/models/{model}/generate_stream"),
        json=body,
        stream=True,
        timeout=STREAM_TIMEOUT,
    )


def events(resp: requests.Response):
    """Yields the JSON object of each SSE `data:` event, until the server closes the stream."""
    for line in resp.iter_lines(decode_unicode=True):
        if line and line.startswith("data:"):
            yield json.loads(line[len("data:") :].strip())


def stream_all(server, body: dict, model: str = "tokens") -> list[dict]:
    with open_stream(server, body, model) as resp:
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"].startswith("text/event-stream")
        return list(events(resp))


def one_chunk(server) -> dict:
    """A fresh one-token request's chunk (tells which worker served it and what it saw)."""
    got = stream_all(server, tokens_body("probe", 1))
    assert len(got) == 1 and "error" not in got[0], got
    return got[0]


def test_every_chunk_arrives_in_order_then_the_stream_ends(server):
    got = stream_all(server, tokens_body("hi", 6, delay_ms=5))
    assert [e["token"] for e in got] == [f"hi-{i}" for i in range(6)]
    assert [e["index"] for e in got] == list(range(6))
    assert all(e["model_name"] == "tokens" and e["model_version"] == "1" for e in got)


def test_generate_answers_once_with_the_chunks_concatenated(server):
    resp = server.post("/v2/models/tokens/generate", json=tokens_body("abc", 4))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["token"] == ["abc-0", "abc-1", "abc-2", "abc-3"]
    assert body["index"] == [0, 1, 2, 3]
    versioned = server.post("/v2/models/tokens/versions/1/generate", json=tokens_body("v", 1))
    assert versioned.status_code == 200 and versioned.json()["token"] == "v-0"


def test_concurrent_streams_keep_their_own_values(server):
    def run(k: int) -> list[str]:
        return [e.get("token", e.get("error")) for e in stream_all(server, tokens_body(f"c{k}", 8))]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, range(32)))
    for k, tokens in enumerate(results):
        assert tokens == [f"c{k}-{i}" for i in range(8)], (k, tokens)


def test_a_client_that_goes_away_stops_its_generator(server):
    before = {}
    for _ in range(8):  # both instances, so the later check sees this worker's count
        chunk = one_chunk(server)
        before[chunk["pid"]] = chunk["closed"]
    resp = open_stream(server, tokens_body("long", 100_000, delay_ms=10))
    assert resp.status_code == 200
    it = events(resp)
    first = next(it)
    second = next(it)
    assert (first["token"], second["token"]) == ("long-0", "long-1")
    pid = first["pid"]
    resp.close()  # the client disconnects mid-stream

    def closed_seen() -> bool:
        chunk = one_chunk(server)
        return chunk["pid"] == pid and chunk["closed"] > before.get(pid, 0)

    wait_until(closed_seen, 10.0, "the cancelled generator's worker to report it closed")
    assert re.search(r"generator for 'long' closed after \d+ tokens", server.log_text())


def test_a_plugin_exception_mid_stream_is_an_error_event_and_the_next_request_is_served(server):
    got = stream_all(server, tokens_body("boom", 5))
    assert [e.get("token") for e in got[:2]] == ["boom-0", "boom-1"]
    assert len(got) == 3, got
    assert "ValueError" in got[2]["error"] and "boom after two tokens" in got[2]["error"], got
    assert one_chunk(server)["token"] == "probe-0"


def test_a_worker_killed_mid_stream_ends_the_stream_with_an_error_naming_the_signal(server):
    resp = open_stream(server, tokens_body("victim", 100_000, delay_ms=10))
    assert resp.status_code == 200
    it = events(resp)
    first = next(it)
    os.kill(first["pid"], signal.SIGKILL)
    rest = list(it)
    resp.close()
    assert rest and "error" in rest[-1], rest[-3:]
    assert all("token" in e for e in rest[:-1])
    assert re.search(r"SIGKILL|signal 9", rest[-1]["error"]), rest[-1]
    assert "tokens" in rest[-1]["error"]

    def replaced() -> bool:
        return any(one_chunk(server)["pid"] != first["pid"] for _ in range(4))

    wait_until(replaced, 15.0, "a replacement worker to serve")


def test_an_ordinary_model_answers_generate_and_generate_stream_once(server):
    resp = server.post("/v2/models/plain/generate", json={"x": [1.5, 2]})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"model_name": "plain", "model_version": "1", "y": [3.0, 4.0]}
    got = stream_all(server, {"x": 4}, model="plain")
    assert got == [{"model_name": "plain", "model_version": "1", "y": 8.0}]


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"prompt": "x", "count": "many", "delay_ms": 0}, "input 'count'"),
        ({"prompt": "x", "count": 1, "delay_ms": 0, "temperature": 1}, "no input 'temperature'"),
        ({"prompt": "x", "count": 1}, "delay_ms"),
        ({"prompt": {"text": "x"}, "count": 1, "delay_ms": 0}, "scalar or list"),
    ],
)
def test_bad_input_is_a_400_before_any_stream_starts(server, body, needle):
    for route in ("generate", "generate_stream"):
        resp = server.post(f"/v2/models/tokens/{route}", json=body)
        assert resp.headers["content-type"].startswith("application/json"), route
        message = error_of(resp, 400)
        assert needle in message, (route, message)
    infer = server.post(
        "/v2/models/tokens/infer",
        json={"inputs": [{"name": "count", "shape": [1], "datatype": "INT32", "data": [1]}]},
    )
    assert "generate_stream" in error_of(infer, 400)
    unknown = server.post("/v2/models/nope/generate_stream", json={})
    assert "unknown model 'nope'" in error_of(unknown, 404)
    not_json = server.post("/v2/models/tokens/generate", data=b"[1, 2]")
    assert "expected a JSON object" in error_of(not_json, 400)
    assert one_chunk(server)["token"] == "probe-0"


def test_predict_prints_a_line_per_chunk_of_a_generator():
    proc = run_cli(
        "predict",
        plugin("tokens.py") + ":Tokens",
        "-i",
        "prompt=p",
        "-i",
        "count=[3]",
        "-i",
        "delay_ms=[0]",
        "--python",
        python_bin(),
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["token"]["data"] for line in lines] == [["p-0"], ["p-1"], ["p-2"]]


def tokens_gauge(server, name: str) -> float:
    text = server.get("/metrics").text
    found = re.search(rf'^unimodel_{name}\{{[^}}]*model="tokens"[^}}]*\}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else -1.0


def queue_depth(server) -> float:
    return tokens_gauge(server, "queue_depth")


def holds(server, inflight: float, queued: float) -> bool:
    """The server counts `inflight` streams, `queued` of them in the queue (a stream leaves
    the queue, freeing its place, when it goes to the worker)."""
    return tokens_gauge(server, "inflight_requests") == inflight and queue_depth(server) == queued


def test_a_full_queue_refuses_streams_with_429_and_a_freed_place_is_served(start_server):
    server = start_server(plugin("tokens.py:Tokens"), "--queue-capacity", "1", "--instances", "1")
    # One stream runs; a second is sent to the worker behind it (the instance's two pipeline
    # slots: streams run alone, never batched); a third waits in the one-place queue.
    first = open_stream(server, tokens_body("first", 100_000, delay_ms=10))
    first_events = events(first)  # kept: a dropped reader closes the connection
    next(first_events)
    with ThreadPoolExecutor(2) as pool:
        # One at a time: sent together, the third could find the place still held by the
        # second on its way to the worker, and be refused.
        second = pool.submit(stream_all, server, tokens_body("second", 2))
        wait_until(lambda: holds(server, 2.0, 0.0), 30.0, "the second stream at the worker")
        third = pool.submit(stream_all, server, tokens_body("third", 1))
        wait_until(lambda: holds(server, 3.0, 1.0), 30.0, "the third stream in the queue")
        full = server.post("/v2/models/tokens/generate_stream", json=tokens_body("late", 1))
        assert "queue is full" in error_of(full, 429)
        assert full.headers["retry-after"] == "1"
        first.close()  # the running stream's client goes away: the others run
        assert [e["token"] for e in second.result(timeout=30)] == ["second-0", "second-1"]
        assert [e["token"] for e in third.result(timeout=30)] == ["third-0"]


def test_sigterm_lets_a_running_stream_finish_then_exits_0(start_server):
    server = start_server(plugin("tokens.py:Tokens"))
    resp = open_stream(server, tokens_body("drain", 20, delay_ms=20))
    it = events(resp)
    assert next(it)["token"] == "drain-0"
    server.proc.send_signal(signal.SIGTERM)
    rest = [e["token"] for e in it]
    assert rest == [f"drain-{i}" for i in range(1, 20)]
    assert server.wait_exit(30) == 0
