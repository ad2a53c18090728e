"""System shared memory (Triton's extension) through the official tritonclient.

Regions are created with `tritonclient.utils.shared_memory`, registered over REST and used for
inputs, outputs or both; results must equal the JSON and binary paths. Every malformed use is
answered with a clear error while the server keeps serving, registration needs
--allow-client-shm, and unregistering a region that queued requests still use breaks nothing.
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException
from umclient import plugin, wait_until

PLUGIN = plugin("shm_models.py")
_counter = iter(range(1_000_000))


def new_key(tag: str) -> str:
    return f"/um-e2e-{os.getpid()}-{next(_counter)}-{tag}"


@pytest.fixture(scope="module")
def server(start_module_server):
    return start_module_server(PLUGIN, "--allow-client-shm", "--set", "delay_s=0.5")


@pytest.fixture
def client(server):
    c = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield c
    c.unregister_system_shared_memory()
    c.close()


@pytest.fixture
def regions():
    """`make(tag, byte_size)` -> (name, key, handle); every region is destroyed afterwards."""
    made = []

    def make(tag: str, byte_size: int):
        key = new_key(tag)
        handle = shm.create_shared_memory_region(tag, key, byte_size)
        made.append(handle)
        return tag, key, handle

    yield make
    for handle in made:
        shm.destroy_shared_memory_region(handle)


def register(client, regions, tag: str, values: np.ndarray | None = None, size: int = 0):
    size = size or values.nbytes
    name, key, handle = regions(tag, size)
    if values is not None:
        shm.set_shared_memory_region(handle, [values])
    client.register_system_shared_memory(name, key, size)
    return name, handle


def assert_serving(client):
    x = np.arange(3, dtype=np.float32)
    inp = httpclient.InferInput("x", [3], "FP32")
    inp.set_data_from_numpy(x)
    out = client.infer("identity", [inp]).as_numpy("y")
    np.testing.assert_array_equal(out, x)


def raises(call, *fragments: str, status: str = "400") -> str:
    with pytest.raises(InferenceServerException) as info:
        call()
    message = info.value.message()
    for fragment in fragments:
        assert fragment in message, message
    assert info.value.status() == status, (info.value.status(), message)
    return message


# -- registration ------------------------------------------------------------------------------


def test_register_status_unregister(client, regions):
    a, key_a, _ = regions("ra", 64)
    b, key_b, _ = regions("rb", 128)
    client.register_system_shared_memory(a, key_a, 64)
    client.register_system_shared_memory(b, key_b, 32, offset=16)
    status = client.get_system_shared_memory_status()
    assert status == [
        {"name": "ra", "key": key_a, "offset": 0, "byte_size": 64},
        {"name": "rb", "key": key_b, "offset": 16, "byte_size": 32},
    ]
    assert client.get_system_shared_memory_status("rb") == [status[1]]
    client.unregister_system_shared_memory("ra")
    assert [r["name"] for r in client.get_system_shared_memory_status()] == ["rb"]
    raises(
        lambda: client.get_system_shared_memory_status("ra"), "unknown shared-memory region 'ra'"
    )
    client.unregister_system_shared_memory("ra")  # idempotent, as in Triton
    client.unregister_system_shared_memory()
    assert client.get_system_shared_memory_status() == []


def test_registration_errors_are_clear(client, regions):
    name, key, _ = regions("reg", 64)
    raises(
        lambda: client.register_system_shared_memory("r", "/no-such-segment-um", 8),
        "cannot open shared-memory segment '/no-such-segment-um'",
    )
    raises(
        lambda: client.register_system_shared_memory("r", "/../etc/passwd", 8),
        "is not allowed",
    )
    raises(
        lambda: client.register_system_shared_memory("r", "/a/b", 8),
        "only one leading '/'",
    )
    raises(
        lambda: client.register_system_shared_memory("r", key, 64, offset=8),
        "offset 8 + byte_size 64 is past the end",
        "(64 bytes)",
    )
    client.register_system_shared_memory(name, key, 64)
    raises(
        lambda: client.register_system_shared_memory(name, key, 64),
        f"region '{name}' is already registered",
    )
    assert_serving(client)


def test_registration_needs_the_flag(start_server, regions):
    server = start_server(PLUGIN)
    c = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    name, key, _ = regions("off", 64)
    raises(
        lambda: c.register_system_shared_memory(name, key, 64),
        "--allow-client-shm",
        status="403",
    )
    assert c.get_system_shared_memory_status() == []
    assert_serving(c)


def test_cuda_shared_memory_is_refused_clearly(client):
    message = "CUDA shared memory is not supported by this server yet"
    raises(client.get_cuda_shared_memory_status, message, status="501")
    raises(lambda: client.register_cuda_shared_memory("c", b"handle", 0, 8), message, status="501")
    raises(client.unregister_cuda_shared_memory, message, status="501")
    raises(lambda: client.unregister_cuda_shared_memory("c"), message, status="501")
    assert_serving(client)


# -- inference ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shm_in", [True, False], ids=["shm_in", "json_in"])
@pytest.mark.parametrize("shm_out", [True, False], ids=["shm_out", "body_out"])
def test_identity_through_shared_memory(client, regions, shm_in, shm_out):
    x = np.linspace(-1, 1, 1000, dtype=np.float32)
    inp = httpclient.InferInput("x", [1000], "FP32")
    if shm_in:
        name, _ = register(client, regions, "in", x)
        inp.set_shared_memory(name, x.nbytes)
    else:
        inp.set_data_from_numpy(x, binary_data=False)
    out = httpclient.InferRequestedOutput("y", binary_data=True)
    if shm_out:
        out_name, out_handle = register(client, regions, "out", size=x.nbytes)
        out.set_shared_memory(out_name, x.nbytes)
    result = client.infer("identity", [inp], outputs=[out])
    meta = result.get_output("y")
    assert meta["shape"] == [1000] and meta["datatype"] == "FP32"
    if shm_out:
        assert "data" not in meta
        assert meta["parameters"] == {
            "shared_memory_region": "out",
            "shared_memory_byte_size": x.nbytes,
        }
        y = shm.get_contents_as_numpy(out_handle, np.float32, [1000])
    else:
        y = result.as_numpy("y")
    np.testing.assert_array_equal(y, x)


def test_worker_maps_client_segments_instead_of_copying(client, regions):
    """A request alone in its batch: the worker reads the input segment itself and writes the
    output segment itself (both appear in its memory map); the result is still right."""
    x = np.arange(1024, dtype=np.float32)
    in_name, key_in, h_in = regions("zin", x.nbytes)
    shm.set_shared_memory_region(h_in, [x])
    client.register_system_shared_memory(in_name, key_in, x.nbytes)
    out_name, key_out, h_out = regions("zout", x.nbytes)
    client.register_system_shared_memory(out_name, key_out, x.nbytes)
    inp = httpclient.InferInput("x", [1024], "FP32")
    inp.set_shared_memory(in_name, x.nbytes)
    y = httpclient.InferRequestedOutput("y")
    y.set_shared_memory(out_name, x.nbytes)
    mapped = httpclient.InferRequestedOutput("mapped")
    result = client.infer("maps_probe", [inp], outputs=[y, mapped])
    paths = {p.decode() for p in result.as_numpy("mapped")}
    assert {"/dev/shm" + key_in, "/dev/shm" + key_out} <= paths, paths
    np.testing.assert_array_equal(shm.get_contents_as_numpy(h_out, np.float32, [1024]), x)


def test_offsets_within_regions(client, regions):
    x = np.arange(16, dtype=np.float32)
    name, key, handle = regions("big", 4096)
    shm.set_shared_memory_region(handle, [x], offset=1024 + 256)
    client.register_system_shared_memory(name, key, 2048, offset=1024)
    inp = httpclient.InferInput("x", [16], "FP32")
    inp.set_shared_memory(name, x.nbytes, offset=256)
    out = httpclient.InferRequestedOutput("y")
    out.set_shared_memory(name, x.nbytes, offset=512)
    result = client.infer("identity", [inp], outputs=[out])
    assert result.get_output("y")["parameters"]["shared_memory_offset"] == 512
    y = shm.get_contents_as_numpy(handle, np.float32, [16], offset=1024 + 512)
    np.testing.assert_array_equal(y, x)


def mixed_inputs(a: np.ndarray, b: np.ndarray, how: str, client=None, regions=None):
    ia = httpclient.InferInput("a", list(a.shape), "FP32")
    ib = httpclient.InferInput("b", list(b.shape), "INT32")
    if how == "json":
        ia.set_data_from_numpy(a, binary_data=False)
        ib.set_data_from_numpy(b, binary_data=False)
    elif how == "binary":
        ia.set_data_from_numpy(a, binary_data=True)
        ib.set_data_from_numpy(b, binary_data=True)
    elif how == "shm":
        na, _ = register(client, regions, "a", a)
        nb, _ = register(client, regions, "b", b)
        ia.set_shared_memory(na, a.nbytes)
        ib.set_shared_memory(nb, b.nbytes)
    elif how == "shm+json":
        na, _ = register(client, regions, "a", a)
        ia.set_shared_memory(na, a.nbytes)
        ib.set_data_from_numpy(b, binary_data=False)
    else:  # "shm+binary"
        na, _ = register(client, regions, "a", a)
        ia.set_shared_memory(na, a.nbytes)
        ib.set_data_from_numpy(b, binary_data=True)
    return [ia, ib]


def test_json_binary_and_shm_inputs_give_identical_results(client, regions):
    a = np.array([[0.5, -1.5, 3.25, 1e6]], dtype=np.float32)
    b = np.array([[1, -2, 2**30, 0]], dtype=np.int32)
    results = {}
    for how in ["json", "binary", "shm", "shm+json", "shm+binary"]:
        r = client.infer("mixed", mixed_inputs(a, b, how, client, regions))
        results[how] = (r.as_numpy("sum"), r.as_numpy("neg"))
        client.unregister_system_shared_memory()
    for how, (s, n) in results.items():
        np.testing.assert_array_equal(s, (a + b).astype(np.float32), err_msg=how)
        np.testing.assert_array_equal(n, -b, err_msg=how)


def test_mixed_outputs_shm_and_binary(client, regions):
    a = np.array([[1, 2, 3, 4]], dtype=np.float32)
    b = np.array([[5, 6, 7, 8]], dtype=np.int32)
    name, handle = register(client, regions, "sum", size=a.nbytes)
    sum_out = httpclient.InferRequestedOutput("sum")
    sum_out.set_shared_memory(name, a.nbytes)
    neg_out = httpclient.InferRequestedOutput("neg", binary_data=True)
    r = client.infer(
        "mixed", mixed_inputs(a, b, "shm+binary", client, regions), outputs=[sum_out, neg_out]
    )
    assert "data" not in r.get_output("sum")
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.float32, [1, 4]), a + b)
    np.testing.assert_array_equal(r.as_numpy("neg"), -b)


def test_shm_requests_batched_with_json_requests(server, client, regions):
    """Four concurrent requests share one batch (`mixed_four` waits for the fourth): the shm
    one is copied in."""
    rows = [np.full((1, 4), i, dtype=np.float32) for i in range(4)]
    b = np.ones((1, 4), dtype=np.int32)
    in_name, _ = register(client, regions, "bin", rows[0])
    out_name, out_handle = register(client, regions, "bout", size=16)

    def call(i: int):
        # tritonclient.http clients (gevent) must stay in the thread that made them.
        c = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
        try:
            if i > 0:
                return c.infer("mixed_four", mixed_inputs(rows[i], b, "json")).as_numpy("sum")
            ia = httpclient.InferInput("a", [1, 4], "FP32")
            ia.set_shared_memory(in_name, 16)
            ib = httpclient.InferInput("b", [1, 4], "INT32")
            ib.set_data_from_numpy(b)
            out = httpclient.InferRequestedOutput("sum")
            out.set_shared_memory(out_name, 16)
            c.infer("mixed_four", [ia, ib], outputs=[out])
            return shm.get_contents_as_numpy(out_handle, np.float32, [1, 4])
        finally:
            c.close()

    with ThreadPoolExecutor(4) as pool:
        sums = list(pool.map(call, range(4)))
    for i, s in enumerate(sums):
        np.testing.assert_array_equal(s, rows[i] + 1)
    stats = client.get_inference_statistics("mixed_four")["model_stats"][0]
    assert [(s["batch_size"], s["compute_infer"]["count"]) for s in stats["batch_stats"]] == [
        (4, 1)
    ], stats


# -- malformed requests ------------------------------------------------------------------------


def test_malformed_shm_requests_are_answered_clearly(client, regions):
    x = np.arange(8, dtype=np.float32)
    name, _ = register(client, regions, "m", x)

    def infer_in(region: str, byte_size: int, offset: int = 0, shape=(8,)):
        inp = httpclient.InferInput("x", list(shape), "FP32")
        inp.set_shared_memory(region, byte_size, offset=offset)
        return lambda: client.infer("identity", [inp])

    raises(infer_in("nope", 32), "unknown shared-memory region 'nope'")
    raises(
        infer_in(name, 32, offset=4),
        "input 'x': shared_memory_offset 4 + shared_memory_byte_size 32 is past the end of "
        "region 'm' (32 bytes)",
    )
    raises(
        infer_in(name, 16),
        "input 'x': shared_memory_byte_size is 16 but shape [8] of FP32 needs 32 bytes",
    )
    raises(infer_in(name, 64, shape=(16,)), "past the end of region 'm'")

    small, _ = register(client, regions, "small", size=16)
    inp = httpclient.InferInput("x", [8], "FP32")
    inp.set_shared_memory(name, 32)
    out = httpclient.InferRequestedOutput("y")
    out.set_shared_memory(small, 16)
    raises(
        lambda: client.infer("identity", [inp], outputs=[out]),
        "output 'y' is 32 bytes, but shared_memory_byte_size gives 16 bytes in region 'small'",
    )
    out = httpclient.InferRequestedOutput("y")
    out.set_shared_memory(small, 32)
    raises(
        lambda: client.infer("identity", [inp], outputs=[out]),
        "output 'y': shared_memory_offset 0 + shared_memory_byte_size 32 is past the end of "
        "region 'small'",
    )
    assert_serving(client)


# -- lifetime ----------------------------------------------------------------------------------


def test_unregister_while_requests_are_queued(server, regions):
    """Five requests queue behind each other (0.5 s each); their regions are unregistered and
    destroyed meanwhile. Every request is still answered, correctly, and the server serves on."""
    control = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    n = 5
    handles = []
    for i in range(n):
        x = np.full(256, i, dtype=np.float32)
        name_in, key_in, h_in = regions(f"q{i}", x.nbytes)
        shm.set_shared_memory_region(h_in, [x])
        control.register_system_shared_memory(name_in, key_in, x.nbytes)
        name_out, key_out, h_out = regions(f"qo{i}", x.nbytes)
        control.register_system_shared_memory(name_out, key_out, x.nbytes)
        handles.append((name_in, name_out, h_out))
    first_sent = threading.Event()

    def call(i: int):
        c = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}", network_timeout=60)
        name_in, name_out, h_out = handles[i]
        inp = httpclient.InferInput("x", [256], "FP32")
        inp.set_shared_memory(name_in, 1024)
        out = httpclient.InferRequestedOutput("y")
        out.set_shared_memory(name_out, 1024)
        first_sent.set()
        try:
            c.infer("slow_identity", [inp], outputs=[out])
            return shm.get_contents_as_numpy(h_out, np.float32, [256])
        finally:
            c.close()

    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(call, i) for i in range(n)]
        first_sent.wait(10)
        # Let the requests reach the server and queue, then pull the regions from under them.
        wait_for_queue(server, "slow_identity", n)
        control.unregister_system_shared_memory()
        assert control.get_system_shared_memory_status() == []
        results = [f.result(timeout=60) for f in futures]
    for i, y in enumerate(results):
        np.testing.assert_array_equal(y, np.full(256, i + 1, dtype=np.float32))
    assert_serving(control)
    control.close()


def wait_for_queue(server, model: str, n: int) -> None:
    """Until the model holds `n` requests (the inflight gauge counts them on arrival)."""

    def inflight() -> bool:
        for line in server.get("/metrics").text.splitlines():
            if line.startswith("unimodel_inflight_requests{") and f'model="{model}"' in line:
                return float(line.rsplit(" ", 1)[1]) >= n
        return False

    wait_until(inflight, 10, f"{n} requests in flight for {model}")


def test_server_leaves_nothing_in_dev_shm(start_server, regions):
    before = set(os.listdir("/dev/shm"))
    server = start_server(PLUGIN, "--allow-client-shm")
    c = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    x = np.arange(4096, dtype=np.float32)
    name, _ = register(c, regions, "leak", x)
    inp = httpclient.InferInput("x", [4096], "FP32")
    inp.set_shared_memory(name, x.nbytes)
    np.testing.assert_array_equal(c.infer("identity", [inp]).as_numpy("y"), x)
    c.close()
    server.stop()
    # Only the test's own segment (destroyed at teardown) may have appeared.
    created = set(os.listdir("/dev/shm")) - before
    assert all(entry.startswith(f"um-e2e-{os.getpid()}-") for entry in created), created
