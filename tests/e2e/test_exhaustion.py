"""Resource exhaustion: plugins that run out of memory, return too much, never return, or
never finish `setup`. Each must end in a clear error while the server stays up (and, except
for a setup that never finishes, the model keeps serving).

The plugins are written here, one per test, so each misbehaviour sits next to its checks.
"""

import re
import textwrap
import threading

import numpy as np
from umclient import (
    Inp,
    decode,
    error_of,
    infer_binary,
    infer_json,
    model_gauge,
    pid_alive,
    wait_until,
)

MEMORY_LIMIT = 1 << 30  # generous: RLIMIT_AS counts virtual memory (see the README)


def write_plugin(tmp_path, body: str) -> str:
    path = tmp_path / "plugin.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def x(value: float) -> list[Inp]:
    return [Inp("x", "FP32", [value])]


HOG = f"""
    import os
    import sys

    import numpy as np

    import unimodel as um


    class Hog(um.Model):
        name = "hog"
        memory_limit_bytes = {MEMORY_LIMIT}
        inputs = {{"x": um.Tensor("FP32", [1])}}
        outputs = {{"y": um.Tensor("FP32", [1]), "pid": um.Tensor("INT64", [1])}}

        def predict(self, x):
            mode = int(x[0])
            if mode == 1:
                # Heap: allocate until the memory limit refuses (MemoryError).
                hog = []
                while True:
                    hog.append(bytearray(16 << 20))
            if mode == 2:
                # Stack: recurse in C until the kernel kills the process (SIGSEGV).
                sys.setrecursionlimit(10**8)
                nested = []
                for _ in range(10**6):
                    nested = [nested]
                repr(nested)
            return {{"y": x * 2, "pid": np.array([os.getpid()], dtype=np.int64)}}
"""


def test_allocating_past_the_memory_limit_is_a_500_naming_the_limit(start_server, tmp_path):
    server = start_server(write_plugin(tmp_path, HOG))
    first = decode(infer_json(server, "hog", x(0.0)))
    pid = int(first.outputs["pid"][0])

    message = error_of(infer_json(server, "hog", x(1.0), timeout=(5.0, 60.0)), 500)
    assert "MemoryError" in message, message
    assert f"memory limit of {MEMORY_LIMIT} bytes reached" in message, message
    assert "'hog'" in message, message

    # The exception freed what it held: the same worker keeps serving.
    after = decode(infer_json(server, "hog", x(3.0)))
    assert after.outputs["y"].tolist() == [6.0]
    assert int(after.outputs["pid"][0]) == pid
    assert server.alive()


def test_a_worker_the_kernel_kills_is_a_503_naming_signal_and_limit(start_server, tmp_path):
    server = start_server(write_plugin(tmp_path, HOG))
    pid = int(decode(infer_json(server, "hog", x(0.0))).outputs["pid"][0])

    message = error_of(infer_json(server, "hog", x(2.0), timeout=(5.0, 60.0)), 503)
    assert "'hog'" in message, message
    assert re.search(r"killed by signal \d+ \(SIG[A-Z]+\)", message), message
    assert f"memory limit is {MEMORY_LIMIT} bytes" in message, message

    # Replaced: a new worker serves.
    new = wait_until(
        lambda: (r := infer_json(server, "hog", x(0.5))).status_code == 200 and decode(r),
        30.0,
        "a replacement hog worker",
    )
    assert new.outputs["y"].tolist() == [1.0]
    assert int(new.outputs["pid"][0]) != pid
    wait_until(lambda: not pid_alive(pid), 10.0, "the killed worker to be reaped")
    assert server.alive()


BIG_OUTPUT = """
    import os

    import numpy as np

    import unimodel as um


    class Big(um.Model):
        name = "big"
        inputs = {"n": um.Tensor("INT64", [1])}
        outputs = {"y": um.Tensor("FP32", [-1]), "pid": um.Tensor("INT64", [1])}

        def predict(self, n):
            y = np.arange(int(n[0]), dtype=np.float32)
            return {"y": y, "pid": np.array([os.getpid()], dtype=np.int64)}
"""


def test_outputs_larger_than_the_arena_or_the_tensor_limit(start_server, tmp_path):
    arena, limit = 1 << 16, 1 << 21
    server = start_server(
        write_plugin(tmp_path, BIG_OUTPUT),
        "--arena-bytes",
        str(arena),
        "--max-tensor-bytes",
        str(limit),
    )

    def ask(n: int):
        outputs = [{"name": "y", "parameters": {"binary_data": True}}, "pid"]
        return infer_binary(server, "big", [Inp("n", "INT64", [n])], outputs, timeout=(5, 60))

    # 1 MiB, 16 times the arena: it travels in a dedicated region, as the protocol says.
    n = (1 << 20) // 4
    ok = decode(ask(n))
    assert np.array_equal(ok.outputs["y"], np.arange(n, dtype=np.float32))
    pid = int(ok.outputs["pid"][0])

    # Past --max-tensor-bytes: a 500 that names the size, the limit and the flag.
    n = (limit // 4) + 1
    message = error_of(ask(n), 500)
    assert f"{n * 4} bytes" in message, message
    assert str(limit) in message, message
    assert "--max-tensor-bytes" in message, message
    assert "'big'" in message, message

    # The worker keeps serving.
    again = decode(ask(10))
    assert again.outputs["y"].tolist() == list(range(10))
    assert int(again.outputs["pid"][0]) == pid
    assert server.alive()


NEVER_RETURNS = """
    import os
    import threading

    import numpy as np

    import unimodel as um


    class Stuck(um.Model):
        name = "stuck"
        retry_on_worker_failure = True  # a timed-out batch is not retried: it could hang again
        inputs = {"x": um.Tensor("FP32", [1])}
        outputs = {"y": um.Tensor("FP32", [1]), "pid": um.Tensor("INT64", [1])}

        def predict(self, x):
            if x[0] < 0:
                threading.Event().wait()  # never returns
            return {"y": x * 2, "pid": np.array([os.getpid()], dtype=np.int64)}
"""


def test_a_predict_that_never_returns_times_out_and_requests_behind_it_are_served(
    start_server, tmp_path
):
    server = start_server(write_plugin(tmp_path, NEVER_RETURNS), "--execution-timeout-ms", "1500")
    pid = int(decode(infer_json(server, "stuck", x(1.0))).outputs["pid"][0])

    stuck: dict = {}
    hung = threading.Thread(
        target=lambda: stuck.update(resp=infer_json(server, "stuck", x(-1.0), timeout=(5, 60)))
    )
    hung.start()
    # The hung request is in the server first (one request, an idle worker: it goes straight
    # there); the next one queues behind it.
    wait_until(
        lambda: model_gauge(server, "unimodel_inflight_requests", "stuck") == 1,
        30.0,
        "the hung request in the server",
    )
    behind = infer_json(server, "stuck", x(4.0), timeout=(5.0, 60.0))
    hung.join(timeout=60)
    assert not hung.is_alive()

    message = error_of(stuck["resp"], 503)
    assert "'stuck'" in message and "1.5s execution timeout" in message, message
    # Queued behind it, never started: served by the replacement.
    result = decode(behind)
    assert result.outputs["y"].tolist() == [8.0]
    assert int(result.outputs["pid"][0]) != pid
    assert "retrying its requests once" not in server.log_text()
    assert server.alive()


SETUP_HANGS = """
    import threading

    import unimodel as um


    class Frozen(um.Model):
        name = "frozen"
        inputs = {"x": um.Tensor("FP32", [1])}
        outputs = {"y": um.Tensor("FP32", [1])}

        def setup(self, ctx):
            threading.Event().wait()  # never finishes

        def predict(self, x):
            return {"y": x}
"""


def test_a_setup_that_never_finishes_ends_failed_with_the_reason(start_server, tmp_path):
    server = start_server(
        write_plugin(tmp_path, SETUP_HANGS),
        "--load-timeout-ms",
        "1000",
        wait=("frozen", "FAILED"),
    )
    meta = server.get("/v2/models/frozen").json()
    assert "setup did not finish within the 1s load timeout" in meta["error"], meta
    assert server.get("/v2/models/frozen/ready").status_code == 503
    message = error_of(infer_json(server, "frozen", x(1.0)), 503)
    assert "FAILED" in message and "load timeout" in message, message
    assert server.get("/v2/health/live").status_code == 200
    assert server.alive()
