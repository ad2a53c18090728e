"""gRPC ModelStreamInfer with generator (decoupled) models, driven by the official
`tritonclient.grpc` streaming client against the real binary and real workers: one response
per chunk, in order, and the empty final response when asked for; concurrent streams keep
their own values; a plugin error mid-stream reaches the error callback and the stream serves
the next request; a client that closes its stream stops its generator; unary ModelInfer on a
generator model is INVALID_ARGUMENT; ModelConfig says decoupled."""

import queue
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException
from umclient import plugin, wait_until

WAIT_S = 30.0


@pytest.fixture(scope="module")
def server(start_module_server):
    return start_module_server(plugin("tokens.py"), "--instances", "2")


def tokens_inputs(prompt: str, count: int, delay_ms: float = 0.0) -> list:
    values = [
        ("prompt", "BYTES", np.array([prompt.encode()], dtype=object)),
        ("count", "INT32", np.array([count], np.int32)),
        ("delay_ms", "FP32", np.array([delay_ms], np.float32)),
    ]
    inputs = []
    for name, datatype, arr in values:
        inp = grpcclient.InferInput(name, [1], datatype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


class Stream:
    """A `tritonclient.grpc` stream whose callbacks land in a queue."""

    def __init__(self, server):
        self.client = grpcclient.InferenceServerClient(server.grpc_url)
        self.answers: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.answers.put((result, error)))

    def send(self, model: str, inputs: list, request_id: str, final: bool = True):
        self.client.async_stream_infer(
            model, inputs, request_id=request_id, enable_empty_final_response=final
        )

    def next(self):
        return self.answers.get(timeout=WAIT_S)

    def until_final(self) -> list:
        """Every answer up to and including the one flagged final (or an error)."""
        got = []
        while True:
            result, error = self.next()
            got.append((result, error))
            if error is not None or is_final(result):
                return got

    def close(self, cancel: bool = False):
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def is_final(result) -> bool:
    return result.get_response().parameters["triton_final_response"].bool_param


def token(result) -> str:
    return result.as_numpy("token")[0].decode()


def test_every_chunk_arrives_in_order_then_an_empty_final_response(server):
    s = Stream(server)
    try:
        s.send("tokens", tokens_inputs("hi", 6, delay_ms=5), "r1")
        got = s.until_final()
    finally:
        s.close()
    assert all(error is None for _, error in got), got
    chunks, last = [r for r, _ in got[:-1]], got[-1][0]
    assert [token(r) for r in chunks] == [f"hi-{i}" for i in range(6)]
    assert [int(r.as_numpy("index")[0]) for r in chunks] == list(range(6))
    assert not any(is_final(r) for r in chunks)
    response = last.get_response()
    assert is_final(last) and len(response.outputs) == 0
    assert (response.id, response.model_name) == ("r1", "tokens")
    assert all(r.get_response().id == "r1" for r in chunks)


def test_without_the_final_flag_only_chunks_come(server):
    s = Stream(server)
    try:
        s.send("tokens", tokens_inputs("nf", 3), "a", final=False)
        got = [s.next() for _ in range(3)]
    finally:
        s.close()
    assert [token(r) for r, _ in got] == ["nf-0", "nf-1", "nf-2"]
    assert all("triton_final_response" not in r.get_response().parameters for r, _ in got)
    assert s.answers.empty()


def test_requests_on_one_stream_are_answered_in_order_ordinary_models_once(server):
    s = Stream(server)
    try:
        s.send("tokens", tokens_inputs("a", 3, delay_ms=10), "1")
        x = grpcclient.InferInput("x", [2], "FP32")
        x.set_data_from_numpy(np.array([1.5, 2.0], np.float32))
        s.send("plain", [x], "2")
        s.send("tokens", tokens_inputs("b", 2), "3")
        first, plain, third = s.until_final(), s.until_final(), s.until_final()
    finally:
        s.close()
    assert [token(r) for r, _ in first[:-1]] == ["a-0", "a-1", "a-2"]
    assert len(plain) == 1 and plain[0][1] is None
    assert plain[0][0].as_numpy("y").tolist() == [3.0, 4.0]
    assert plain[0][0].get_response().id == "2"
    assert [token(r) for r, _ in third[:-1]] == ["b-0", "b-1"]


def test_concurrent_streams_keep_their_own_values(server):
    def run(k: int) -> list[str]:
        s = Stream(server)
        try:
            s.send("tokens", tokens_inputs(f"c{k}", 8, delay_ms=2), f"k{k}")
            got = s.until_final()
        finally:
            s.close()
        assert all(error is None for _, error in got), got
        return [token(r) for r, _ in got[:-1]]

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(run, range(6)))
    for k, tokens in enumerate(results):
        assert tokens == [f"c{k}-{i}" for i in range(8)], (k, tokens)


def test_a_plugin_error_mid_stream_reaches_the_callback_and_the_stream_goes_on(server):
    s = Stream(server)
    try:
        s.send("tokens", tokens_inputs("boom", 5), "boom")
        got = s.until_final()
        s.send("tokens", tokens_inputs("after", 2), "after")
        after = s.until_final()
    finally:
        s.close()
    assert [token(r) for r, _ in got[:2]] == ["boom-0", "boom-1"]
    result, error = got[2]
    assert result is None and "boom after two tokens" in str(error), got
    assert len(got) == 3
    assert all(error is None for _, error in after), after
    assert [token(r) for r, _ in after[:-1]] == ["after-0", "after-1"]


def test_a_client_that_closes_its_stream_stops_its_generator(server):
    probe = Stream(server)
    try:
        before = {}
        for i in range(8):  # both instances, so the later check sees this worker's count
            probe.send("tokens", tokens_inputs("probe", 1), f"p{i}")
            chunk = probe.until_final()[0][0]
            before[int(chunk.as_numpy("pid")[0])] = int(chunk.as_numpy("closed")[0])
        s = Stream(server)
        s.send("tokens", tokens_inputs("long", 100_000, delay_ms=10), "long")
        first, second = s.next()[0], s.next()[0]
        assert (token(first), token(second)) == ("long-0", "long-1")
        pid = int(first.as_numpy("pid")[0])
        s.close(cancel=True)

        def closed_seen() -> bool:
            probe.send("tokens", tokens_inputs("probe", 1), "again")
            chunk = probe.until_final()[0][0]
            seen = int(chunk.as_numpy("closed")[0])
            return int(chunk.as_numpy("pid")[0]) == pid and seen > before.get(pid, 0)

        wait_until(closed_seen, 10.0, "the cancelled generator's worker to report it closed")
    finally:
        probe.close()
    assert re.search(r"generator for 'long' closed after \d+ tokens", server.log_text())


def test_unary_infer_on_a_generator_model_points_at_the_stream(server):
    c = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException) as info:
        c.infer("tokens", tokens_inputs("u", 2))
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "ModelStreamInfer" in info.value.message()
    # Still serving.
    s = Stream(server)
    try:
        s.send("tokens", tokens_inputs("ok", 1), "ok")
        assert token(s.until_final()[0][0]) == "ok-0"
    finally:
        s.close()


def test_model_config_says_decoupled_for_generators_only(server):
    c = grpcclient.InferenceServerClient(server.grpc_url)
    tokens = c.get_model_config("tokens").config
    assert tokens.model_transaction_policy.decoupled is True
    plain = c.get_model_config("plain").config
    assert plain.model_transaction_policy.decoupled is False
