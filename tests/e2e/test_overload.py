"""Overload: a model's max_concurrency (queued plus running) and its bounded queue refuse the
excess at once, 429 with Retry-After over REST and RESOURCE_EXHAUSTED over gRPC, and bursts
of large requests past them leave nothing behind in the core's heap."""

import json
import re
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException
from umclient import (
    Inp,
    decode,
    error_of,
    gated_burst,
    infer_binary,
    infer_json,
    plugin,
    wait_until,
)

SLOW = "slow"


def x_input(value: float) -> list[Inp]:
    return [Inp("x", "FP32", [value])]


def burst(clients: int, one):
    """Runs `one(i)` in `clients` threads released together; returns their results."""
    barrier = threading.Barrier(clients, timeout=30)

    def run(i: int):
        barrier.wait()
        return one(i)

    with ThreadPoolExecutor(max_workers=clients) as pool:
        return list(pool.map(run, range(clients)))


def test_max_concurrency_flag_refuses_the_excess_with_429(start_server, tmp_path):
    limit, clients = 4, 12
    gate = tmp_path / "gate"
    server = start_server(
        plugin("slow.py"),
        "--set",
        "delay_s=0",
        "--set",
        f"gate={gate}",
        "--max-concurrency",
        str(limit),
    )

    def one(i: int):
        return i, infer_json(server, SLOW, x_input(float(i)), timeout=(5.0, 120.0))

    # The refusals all come while the admitted requests are held: refused at the door.
    answers, early = gated_burst(clients, one, gate, refused=clients - limit)
    assert [r.status_code for _, r in early] == [429] * (clients - limit)
    served = [(i, r) for i, r in answers if r.status_code == 200]
    assert len(served) == limit, sorted(r.status_code for _, r in answers)
    for _, resp in early:
        assert re.fullmatch(r"\d+", resp.headers.get("Retry-After", "")), dict(resp.headers)
        message = error_of(resp)
        assert f"max_concurrency limit of {limit}" in message, message
        assert "'slow'" in message, message
    for i, resp in served:
        assert decode(resp).outputs["y"].tolist() == [2.0 * i]
    # Answered requests give their admission back.
    assert decode(infer_json(server, SLOW, x_input(5.0))).outputs["y"].tolist() == [10.0]


GUARDED = """
    import time
    from pathlib import Path

    import numpy as np

    import unimodel as um


    class Guarded(um.Model):
        name = "guarded"
        max_concurrency = 2
        inputs = {"x": um.Tensor("FP32", [1])}
        outputs = {"y": um.Tensor("FP32", [1])}

        def setup(self, ctx):
            self.gate = Path(ctx.parameters["gate"])

        def predict(self, x):
            # Held until the test opens the gate (see umclient.gated_burst).
            while not self.gate.exists():
                time.sleep(0.005)
            return {"y": (x * 2).astype(np.float32)}
"""


def grpc_infer(server, model: str, value: float):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    inp = grpcclient.InferInput("x", [1], "FP32")
    inp.set_data_from_numpy(np.array([value], dtype=np.float32))
    try:
        result = client.infer(model, [inp], client_timeout=60)
        return float(result.as_numpy("y")[0]), None
    except InferenceServerException as e:
        return None, e
    finally:
        client.close()


def test_max_concurrency_class_attribute_over_grpc_is_resource_exhausted(start_server, tmp_path):
    path = tmp_path / "guarded.py"
    path.write_text(textwrap.dedent(GUARDED))
    gate = tmp_path / "gate"
    server = start_server(str(path), "--set", f"gate={gate}")
    answers, early = gated_burst(
        6, lambda i: grpc_infer(server, "guarded", float(i)), gate, refused=4
    )
    ok = [y for y, e in answers if e is None]
    assert len(ok) == 2, [(y, e and e.status()) for y, e in answers]
    for _, e in early:
        assert e is not None, early
        assert e.status() == "StatusCode.RESOURCE_EXHAUSTED", f"{e.status()}: {e.message()}"
        assert "max_concurrency limit of 2" in e.message(), e.message()
    # The same over REST, the gate shut again.
    gate.unlink()
    answers, early = gated_burst(
        4,
        lambda i: infer_json(server, "guarded", x_input(1.0), timeout=(5, 60)),
        gate,
        refused=2,
    )
    assert [r.status_code for r in early] == [429, 429]
    assert sorted(r.status_code for r in answers) == [200, 200, 429, 429]


def test_full_queue_over_grpc_is_resource_exhausted(start_server):
    server = start_server(plugin("slow.py"), "--set", "delay_s=1.0", "--queue-capacity", "2")
    answers = burst(10, lambda i: grpc_infer(server, SLOW, float(i)))
    errors = [e for _, e in answers if e is not None]
    assert errors, "no request was refused past a queue of 2"
    assert [y for y, e in answers if e is None], "nothing was served"
    for e in errors:
        assert e.status() == "StatusCode.RESOURCE_EXHAUSTED", f"{e.status()}: {e.message()}"
        assert "queue is full" in e.message(), e.message()


BIG_INPUT = """
    import time
    from pathlib import Path

    import numpy as np

    import unimodel as um


    class Sink(um.Model):
        name = "sink"
        inputs = {"x": um.Tensor("FP32", [-1])}
        outputs = {"total": um.Tensor("FP32", [1])}

        def setup(self, ctx):
            self.gate = Path(ctx.parameters["gate"])

        def predict(self, x):
            # Held until the test opens the gate (see umclient.gated_burst).
            while not self.gate.exists():
                time.sleep(0.005)
            return {"total": np.array([x.sum()], dtype=np.float32)}
"""


def heap_live_bytes(server) -> int:
    """The core's live heap (`UNIMODEL_HEAP_ACCOUNTING=1`), from `/metrics`."""
    text = server.get("/metrics", timeout=30).text
    match = re.search(r"^unimodel_heap_live_bytes (\d+)$", text, re.MULTILINE)
    assert match, "no unimodel_heap_live_bytes in /metrics"
    return int(match.group(1))


def test_bursts_of_large_requests_past_the_queue_do_not_grow_memory(start_server, tmp_path):
    # The RSS is no measure of this: mimalloc keeps freed pages for reuse and purges them
    # later, so after bursts of a core that frees everything it wandered 100-230 MB
    # (benches/burst_memory.py). The live heap comes back to within a few hundred kB (a
    # connection's read buffer until its close is seen) after every burst.
    rounds = 4
    path = tmp_path / "sink.py"
    path.write_text(textwrap.dedent(BIG_INPUT))
    gate = tmp_path / "gate"
    gate.touch()
    server = start_server(
        str(path),
        "--set",
        f"gate={gate}",
        "--queue-capacity",
        "2",
        "--max-concurrency",
        "3",
        env={"UNIMODEL_HEAP_ACCOUNTING": "1"},
    )
    clients, size = 32, 4 << 20  # 128 MiB offered per burst
    data = np.ones(size // 4, dtype=np.float32)

    def one(_i: int) -> int:
        resp = infer_binary(server, "sink", [Inp("x", "FP32", data)], timeout=(5.0, 120.0))
        return resp.status_code

    assert burst(1, one) == [200]
    before = heap_live_bytes(server)
    # One body kept after its answer, by any path (refused, served, cancelled), is 4 MiB.
    bound = before + size // 4
    after = []
    for _ in range(rounds):
        # Three are admitted and held at the gate, however slowly the 128 MiB arrive: the
        # other 29 are read in full and refused.
        gate.unlink()
        statuses, early = gated_burst(clients, one, gate, refused=clients - 3)
        assert early == [429] * (clients - 3), early
        assert sorted(statuses) == [200] * 3 + [429] * (clients - 3), statuses
        # Every answer is back, but the server may not have seen each client's close yet.
        wait_until(
            lambda: heap_live_bytes(server) <= bound,
            30.0,
            f"the live heap to come back under {bound} bytes (before the bursts: {before};"
            f" after each: {after})",
        )
        after.append(heap_live_bytes(server))
    assert server.alive()


BIG_CHUNKS = """
    import numpy as np

    import unimodel as um


    class Firehose(um.Model):
        name = "firehose"
        inputs = {"n": um.Tensor("INT32", [1])}
        outputs = {"blob": um.Tensor("UINT8", [-1])}

        def setup(self, ctx):
            self.progress = ctx.parameters["progress"]

        def predict(self, n):
            for i in range(int(n[0])):
                with open(self.progress, "w") as f:
                    f.write(str(i + 1))
                yield {"blob": np.full(100_000, i % 251, np.uint8)}
"""


def test_a_slow_reader_holds_a_generator_of_chunks_larger_than_the_arena(start_server, tmp_path):
    path = tmp_path / "firehose.py"
    path.write_text(textwrap.dedent(BIG_CHUNKS))
    progress = tmp_path / "progress"
    server = start_server(str(path), "--arena-bytes", str(1 << 16), "--set", f"progress={progress}")
    total = 300
    with requests.post(
        server.url("/v2/models/firehose/generate_stream"),
        json={"n": total},
        stream=True,
        timeout=(5.0, 30.0),
    ) as resp:
        assert resp.status_code == 200, resp.text
        lines = resp.iter_lines()
        first = next(line for line in lines if line.startswith(b"data:"))
        assert json.loads(first[5:])["blob"][:3] == [0, 0, 0]
        time.sleep(2.0)  # a client that stops reading
        produced = int(progress.read_text())
        # Each 100 kB chunk travels in a dedicated region and waits for its release, which
        # the core sends once the client took the chunk: the generator stays within the
        # socket buffers' worth of chunks of the reader instead of running to the end.
        assert produced < total // 4, f"the generator ran {produced} chunks ahead"
    # Closing the stream cancels the generator; the model serves the next request.
    got = server.post("/v2/models/firehose/generate", json={"n": 2}, timeout=(5, 30))
    assert got.status_code == 200, got.text
    assert server.alive()


def test_config_toml_sets_the_guards_of_a_repository_model(start_server, tmp_path):
    repo = tmp_path / "models"
    model = repo / "slow"
    model.mkdir(parents=True)
    model.joinpath("plugin.py").write_text(Path(plugin("slow.py")).read_text())
    limit = 2 << 30
    gate = tmp_path / "gate"
    model.joinpath("config.toml").write_text(
        "max_concurrency = 1\n"
        "retry_on_worker_failure = true\n"
        f"memory_limit_bytes = {limit}\n"
        f'[parameters]\ndelay_s = 0\ngate = "{gate}"\n'
    )
    server = start_server.serve("--model-repository", str(repo), wait=("slow", "READY"))
    answers, early = gated_burst(
        3, lambda i: infer_json(server, SLOW, x_input(1.0), timeout=(5, 60)), gate, refused=2
    )
    assert [r.status_code for r in early] == [429, 429]
    assert sorted(r.status_code for r in answers) == [200, 429, 429]
    refused = next(r for r in answers if r.status_code == 429)
    assert "max_concurrency limit of 1" in error_of(refused)
    # The worker runs under the limit (RLIMIT_AS, set before exec).
    pid = int(decode(infer_json(server, SLOW, x_input(1.0))).outputs["pid"][0])
    with open(f"/proc/{pid}/limits") as f:
        line = next(line for line in f if line.startswith("Max address space"))
    assert line.split()[3:5] == [str(limit), str(limit)], line
