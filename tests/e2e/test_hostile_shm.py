"""A hostile client of the shared-memory extension (issue 15, item 1, and the region cap).

The attack: register a 64 KiB POSIX segment, `ftruncate` it to 4 KiB, then send 32
concurrent infers whose input (or output) lies at offset 32768. The core used to copy from
and to its mapping of the segment when it assembled a batch or wrote a batch's outputs, and
died of SIGBUS (exit 135). Now it never maps a client segment: every request of the attack
gets a 400 naming the region, the segment's size now and the range asked for, on REST and
gRPC, batched or alone; a segment shrunk while a request is inside `predict` fails that
request the same way (batched) or costs only the worker, which is restarted (alone); and the
server keeps serving, the shrunk region's remaining bytes included.

`--max-shm-regions` caps the registered regions (each holds descriptors of the core): past
it registering is refused with 429 / RESOURCE_EXHAUSTED naming the flag, until one goes.

Segments are made the way tritonclient's `create_shared_memory_region` makes them (a file in
/dev/shm is a POSIX shared-memory object) so that the test can shrink them with ftruncate.
"""

import os
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException
from umclient import plugin, wait_until

PLUGIN = plugin("shm_hostile.py")
SEGMENT = 64 << 10
SHRUNK = 4096
OFFSET = 32 << 10
CONCURRENT = 32
X = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
NBYTES = X.nbytes
_counter = iter(range(1_000_000))


class Segment:
    """A POSIX shared-memory object (`/dev/shm/<key>`) the test owns, and may shrink."""

    def __init__(self, tag: str, size: int = SEGMENT):
        self.key = f"/um-hostile-{os.getpid()}-{next(_counter)}-{tag}"
        self.path = Path("/dev/shm") / self.key[1:]
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(self.fd, size)

    def write(self, offset: int, data: np.ndarray) -> None:
        os.pwrite(self.fd, data.tobytes(), offset)

    def read(self, offset: int, count: int) -> np.ndarray:
        return np.frombuffer(os.pread(self.fd, count * 4, offset), dtype=np.float32)

    def shrink(self) -> None:
        os.ftruncate(self.fd, SHRUNK)

    def close(self) -> None:
        os.close(self.fd)
        self.path.unlink(missing_ok=True)


@pytest.fixture
def segments():
    """`make(tag)` -> a fresh 64 KiB Segment; every one is removed afterwards."""
    made: list[Segment] = []

    def make(tag: str) -> Segment:
        made.append(Segment(tag))
        return made[-1]

    yield make
    for s in made:
        s.close()


@pytest.fixture(scope="module")
def server(start_module_server):
    return start_module_server(PLUGIN, "--allow-client-shm")


def register(server, name: str, seg: Segment) -> None:
    c = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    c.register_system_shared_memory(name, seg.key, SEGMENT)
    c.close()


def shape_of(model: str) -> list[int]:
    return [4] if model.endswith("lone") else [1, 4]


def shm_params(region: str, offset: int) -> dict:
    return {
        "shared_memory_region": region,
        "shared_memory_byte_size": NBYTES,
        "shared_memory_offset": offset,
    }


# -- one request over each protocol: (status, message or outputs) --------------------------


def rest_infer(server, model: str, region: str, where: str, offset: int):
    """Input `x` and/or output `y` in `region` at `offset` (`where`: input, output, both)."""
    x: dict = {"name": "x", "datatype": "FP32", "shape": shape_of(model)}
    if where in ("input", "both"):
        x["parameters"] = shm_params(region, offset)
    else:
        x["data"] = X.tolist()
    y: dict = {"name": "y"}
    if where in ("output", "both"):
        y["parameters"] = shm_params(region, offset)
    try:
        resp = requests.post(
            f"{server.base_url}/v2/models/{model}/infer",
            json={"inputs": [x], "outputs": [y]},
            timeout=120,
        )
    except requests.ConnectionError as e:
        return LOST["rest"], str(e)
    body = resp.json()
    return resp.status_code, body.get("error") or body


def grpc_infer(server, model: str, region: str, where: str, offset: int):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        x = grpcclient.InferInput("x", shape_of(model), "FP32")
        if where in ("input", "both"):
            x.set_shared_memory(region, NBYTES, offset)
        else:
            x.set_data_from_numpy(X.reshape(shape_of(model)))
        y = grpcclient.InferRequestedOutput("y")
        if where in ("output", "both"):
            y.set_shared_memory(region, NBYTES, offset)
        try:
            result = client.infer(model, [x], outputs=[y], client_timeout=120)
        except InferenceServerException as e:
            return e.status(), e.message()
        return "OK", result.get_response()
    finally:
        client.close()


INFER = {"rest": rest_infer, "grpc": grpc_infer}
BAD_REQUEST = {"rest": 400, "grpc": "StatusCode.INVALID_ARGUMENT"}
LOST = {"rest": "connection lost", "grpc": "StatusCode.UNAVAILABLE"}
OK = {"rest": 200, "grpc": "OK"}


def concurrently(count: int, one) -> list:
    """`one()` in `count` threads released together (so batching models batch them)."""
    barrier = threading.Barrier(count, timeout=30)

    def run(_):
        barrier.wait()
        return one()

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(run, range(count), timeout=180))


def assert_alive(server, protocol: str, answers: list) -> None:
    """The server process still runs; a lost connection says how the server ended."""
    lost = [a for a in answers if a[0] == LOST[protocol]]
    if lost:
        try:
            status = server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            status = None
        raise AssertionError(
            f"{len(lost)} of {len(answers)} requests lost their connection ({lost[0]}); "
            f"server exit status {status} (-7: SIGBUS); log tail:\n{server.log_tail()}"
        )
    assert server.proc.poll() is None, server.log_tail()


def assert_names_the_shrink(answer, protocol: str, region: str, what: str) -> None:
    status, message = answer
    assert status == BAD_REQUEST[protocol], answer
    for fragment in (
        f"{what} 'x'" if what == "input" else f"{what} 'y'",
        f"region '{region}'",
        f"now {SHRUNK} bytes",
        f"[{OFFSET}, {OFFSET}+{NBYTES})",
    ):
        assert fragment in message, message


def assert_serving(server, protocol: str, seg: Segment, region: str, model: str) -> None:
    """A good request through `region` (input and output at offset 0, inside even a shrunk
    segment) is answered right, and the server process is still running."""
    seg.write(0, X)
    status, _ = INFER[protocol](server, model, region, "both", 0)
    assert status == OK[protocol], (status, server.log_tail())
    np.testing.assert_array_equal(seg.read(0, 4), X * 2)
    assert server.proc.poll() is None, server.log_tail()


# -- the attack ---------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
@pytest.mark.parametrize("where", ["input", "output"])
@pytest.mark.parametrize("model", ["doubler", "doubler_lone"])
def test_a_shrunk_segment_is_refused_and_the_server_lives(server, segments, protocol, where, model):
    seg = segments("attack")
    region = f"hostile-{next(_counter)}"
    seg.write(OFFSET, X)
    register(server, region, seg)
    seg.shrink()
    answers = concurrently(
        CONCURRENT, lambda: INFER[protocol](server, model, region, where, OFFSET)
    )
    assert_alive(server, protocol, answers)
    for answer in answers:
        assert_names_the_shrink(answer, protocol, region, where)
    assert_serving(server, protocol, seg, region, model)


# -- a segment shrunk while the request is inside predict -------------------------------


@pytest.fixture
def gated(start_server, tmp_path):
    """A server whose gated models wait in `predict` for `gate` (after touching `entered`)."""
    entered, gate = tmp_path / "entered", tmp_path / "gate"
    server = start_server(
        PLUGIN, "--allow-client-shm", "--set", f"entered={entered}", "--set", f"gate={gate}"
    )
    return server, entered, gate


def shrink_inside_predict(seg: Segment, entered: Path, gate: Path, ask) -> list:
    """Runs `ask()` (a list of request thunks) until `predict` has started, shrinks the
    segment, then opens the gate; returns the answers."""
    with ThreadPoolExecutor(max_workers=len(ask)) as pool:
        futures = [pool.submit(one) for one in ask]
        wait_until(entered.exists, 60, "the gated predict to start")
        seg.shrink()
        gate.touch()
        return [f.result(timeout=120) for f in futures]


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_a_segment_shrunk_under_a_batch_fails_its_requests_only(gated, segments, protocol):
    """The batch ran with the outputs' targets inside the segment; the core writes a batch's
    outputs, and finds the segment shrunk when it does."""
    server, entered, gate = gated
    seg = segments("batch")
    register(server, "under", seg)
    one = lambda: INFER[protocol](server, "gated_pair", "under", "output", OFFSET)  # noqa: E731
    answers = shrink_inside_predict(seg, entered, gate, [one, one])
    assert_alive(server, protocol, answers)
    for answer in answers:
        assert_names_the_shrink(answer, protocol, "under", "output")
    after = segments("after")
    register(server, "after", after)
    assert_serving(server, protocol, after, "after", "doubler_lone")


def test_a_worker_killed_by_a_shrunk_segment_is_restarted(gated, segments):
    """Alone, a request's output target goes to the worker, which maps the client segment
    itself: shrunk while `predict` runs, the worker dies of SIGBUS writing the output. Its
    request gets an error (never a hang), the worker is restarted, the server lives on."""
    server, entered, gate = gated
    seg = segments("lone")
    register(server, "lone", seg)
    one = lambda: rest_infer(server, "gated_lone", "lone", "output", OFFSET)  # noqa: E731
    [(status, message)] = shrink_inside_predict(seg, entered, gate, [one])
    assert status in (400, 503), (status, message)
    assert "region 'lone'" in message or "worker" in message, message
    assert server.proc.poll() is None, server.log_tail()
    server.wait_model_state("gated_lone", "READY")
    fresh = segments("fresh")
    register(server, "fresh", fresh)
    assert_serving(server, "rest", fresh, "fresh", "gated_lone")


# -- the region cap -----------------------------------------------------------------------


def test_registered_regions_are_capped(start_server, segments):
    server = start_server(PLUGIN, "--allow-client-shm", "--max-shm-regions", "3")
    seg = segments("cap")
    http = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    for name in ("a", "b", "c"):
        http.register_system_shared_memory(name, seg.key, SEGMENT)
    with pytest.raises(InferenceServerException) as rest_refusal:
        http.register_system_shared_memory("d", seg.key, SEGMENT)
    assert rest_refusal.value.status() == "429", rest_refusal.value
    with pytest.raises(InferenceServerException) as grpc_refusal:
        grpc.register_system_shared_memory("d", seg.key, SEGMENT)
    assert grpc_refusal.value.status() == "StatusCode.RESOURCE_EXHAUSTED", grpc_refusal.value
    for refusal in (rest_refusal, grpc_refusal):
        message = refusal.value.message()
        assert "region 'd'" in message and "3 regions" in message, message
        assert "--max-shm-regions" in message, message
    assert [r["name"] for r in http.get_system_shared_memory_status()] == ["a", "b", "c"]
    metrics = server.get("/metrics").text
    assert "\nunimodel_shm_regions 3\n" in metrics, metrics
    # The server keeps serving, through the regions it holds, and room comes back.
    assert_serving(server, "rest", seg, "a", "doubler_lone")
    http.unregister_system_shared_memory("b")
    grpc.register_system_shared_memory("d", seg.key, SEGMENT)
    assert_serving(server, "grpc", seg, "d", "doubler")
    assert "\nunimodel_shm_regions 3\n" in server.get("/metrics").text
    http.close()
    grpc.close()


# -- a size the client names ----------------------------------------------------------------


def test_a_bytes_input_naming_a_huge_sparse_segment_is_refused_before_it_is_read(
    start_server, segments
):
    # A sparse segment costs the client nothing. The core reads BYTES and BOOL inputs out of
    # the segment (to check every element), and used to allocate and read whatever size the
    # input named before --max-tensor-bytes (1 GiB) was checked: with 1 TiB the core grew
    # until the kernel's OOM killer took it. Now the size is checked before any allocation.
    # 8 GiB is past the limit and keeps a build without the check from eating the machine.
    server = start_server(plugin("bytes_echo.py"), "--allow-client-shm")
    seg = segments("huge")
    huge = 8 << 30
    os.ftruncate(seg.fd, huge)
    http = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    http.register_system_shared_memory("huge", seg.key, huge)
    for client, module in ((http, httpclient), (grpc, grpcclient)):
        text = module.InferInput("text", [1], "BYTES")
        text.set_shared_memory("huge", huge)
        with pytest.raises(InferenceServerException) as refusal:
            client.infer("bytes_echo", [text])
        assert refusal.value.status() in ("400", "StatusCode.INVALID_ARGUMENT"), refusal.value
        message = refusal.value.message()
        assert f"names {huge} bytes of shared memory" in message, message
        assert f"({1 << 30} bytes, --max-tensor-bytes)" in message, message
    assert server.alive(), server.log_tail(20)
    # The server serves on: a BYTES input from the same region within the limit.
    element = b"hello"
    seg_bytes = len(element).to_bytes(4, "little") + element
    os.pwrite(seg.fd, seg_bytes, 0)
    text = httpclient.InferInput("text", [1], "BYTES")
    text.set_shared_memory("huge", len(seg_bytes))
    answer = http.infer("bytes_echo", [text])
    assert answer.as_numpy("echo").tolist() == [element]
    http.close()
    grpc.close()
