"""A real worker process driven by a Python stand-in for the core (see fake_core.py).

Each test spawns ``python -m unimodel.worker`` with the control socket and both arenas at
fds 3/4/5 and plays one part of docs/worker-protocol.md against it.
"""

from __future__ import annotations

import fcntl
import json
import os
import textwrap

import numpy as np
import pytest
from fake_core import FakeCore

PLUGIN = textwrap.dedent(
    """
    import os
    import resource
    import time

    import numpy as np

    import unimodel as um


    class Doubler(um.Model):
        max_batch_size = 8
        inputs = {"x": um.Tensor("FP32", [-1])}
        outputs = {"y": um.Tensor("FP32", [-1]), "total": um.Tensor("FP64", [])}

        def setup(self, ctx):
            self.factor = float(ctx.parameters.get("factor", "2"))
            ctx.logger.info("setup for %s on %s", ctx.model_name, ctx.device)

        def predict(self, x):
            if x.size and x.flat[0] < 0:
                raise ValueError("negative input")
            if x.size and x.flat[0] == 999:
                time.sleep(0.3)
            if x.size and x.flat[0] == 777:
                return {"y": x[:1]}  # wrong number of rows
            assert not x.flags.writeable
            return {"y": x * self.factor, "total": x.sum(axis=1)}


    class Big(um.Model):
        inputs = {"n": um.Tensor("INT64", [1])}
        outputs = {"blob": um.Tensor("UINT8", [-1])}

        def predict(self, n):
            count = int(n[0])
            return {"blob": (np.arange(count) % 251).astype(np.uint8)}


    class Echo(um.Model):
        inputs = {"text": um.Tensor("BYTES", [-1])}
        outputs = {"text": um.Tensor("BYTES", [-1]), "lengths": um.Tensor("INT32", [-1])}

        def predict(self, text):
            assert text.dtype == object and all(isinstance(t, bytes) for t in text)
            upper = [t.decode("utf-8").upper() for t in text]
            return {"text": upper, "lengths": [len(t) for t in text]}


    class Counter(um.Model):
        inputs = {"n": um.Tensor("INT32", [1])}
        outputs = {"i": um.Tensor("INT32", [1])}

        def predict(self, n):
            try:
                for i in range(int(n[0])):
                    yield {"i": np.array([i], np.int32)}
            except GeneratorExit:
                os.write(2, b"generator closed\\n")
                raise


    class BigChunks(um.Model):
        inputs = {"n": um.Tensor("INT32", [1])}
        outputs = {"blob": um.Tensor("UINT8", [-1])}

        def predict(self, n):
            for i in range(int(n[0])):
                yield {"blob": np.full(100_000, i, np.uint8)}


    class Odd(um.Model):
        # Fails outside predict proper, chosen by x[0]; anything else returns [0, 1, 2, 3].

        inputs = {"x": um.Tensor("INT64", [1])}
        outputs = {"y": um.Tensor("UINT8", [-1])}

        def setup(self, ctx):
            self.hoard = []
            self.nofile = resource.getrlimit(resource.RLIMIT_NOFILE)

        def predict(self, x):
            for fd in self.hoard:
                os.close(fd)
            self.hoard.clear()
            resource.setrlimit(resource.RLIMIT_NOFILE, self.nofile)
            mode = int(x[0])
            if mode == 1:

                class Refusing(dict):
                    def __getitem__(self, key):
                        raise KeyError(key)

                return Refusing(y=None)
            if mode == 2:

                class BrokenTensor:
                    def detach(self):
                        raise RuntimeError("CUDA error: device-side assert triggered")

                    cpu = numpy = detach

                return {"y": BrokenTensor()}
            if mode == 3:
                # Take every free descriptor: the worker gets no memfd for this large output.
                resource.setrlimit(resource.RLIMIT_NOFILE, (256, self.nofile[1]))
                try:
                    while True:
                        self.hoard.append(os.open("/dev/null", os.O_RDONLY))
                except OSError:
                    pass
                return {"y": np.zeros(100_000, np.uint8)}
            return {"y": np.arange(4, dtype=np.uint8)}


    class Broken(um.Model):
        inputs = {"x": um.Tensor("FP32", [-1])}
        outputs = {"y": um.Tensor("FP32", [-1])}

        def setup(self, ctx):
            raise RuntimeError("weights not found in " + ctx.model_dir)

        def predict(self, x):
            return {"y": x}
    """
)


@pytest.fixture
def plugin(tmp_path):
    path = tmp_path / "test_plugin.py"
    path.write_text(PLUGIN)
    return path


@pytest.fixture
def core():
    cores: list[FakeCore] = []

    def make(**kwargs) -> FakeCore:
        c = FakeCore(**kwargs)
        cores.append(c)
        return c

    yield make
    for c in cores:
        c.close()


def umlog_records(stderr: str) -> list[dict]:
    return [
        json.loads(line[len("\x1eUMLOG ") :])
        for line in stderr.split("\n")  # not splitlines(): it splits at \x1e too
        if line.startswith("\x1eUMLOG ")
    ]


def test_full_lifecycle(core, plugin):
    c = core()
    hello = c.hello()
    assert hello == {
        "type": "hello",
        "protocol": 2,
        "pid": c.proc.pid,
        "python": hello["python"],
        "sdk": "0.1.0",
    }
    ready = c.load(plugin, "Doubler", model="dbl", parameters={"factor": "3"}, max_batch_size=8)
    assert ready["type"] == "ready" and isinstance(ready["setup_ms"], float), ready

    # One execute: results are read back from the output arena.
    x = np.array([[1, 2, 3], [4, 5, 6]], np.float32)
    c.execute(1, [c.put("x", x)], batch_size=2)
    result = c.recv()
    assert result["type"] == "result" and result["id"] == 1
    assert result["compute_ns"] > 0
    refs = {r["name"]: r for r in result["outputs"]}
    assert refs["y"]["region"] == "output" and refs["y"]["offset"] % 64 == 0
    assert refs["total"]["offset"] % 64 == 0
    assert refs["y"]["datatype"] == "FP32" and refs["y"]["shape"] == [2, 3]
    out = c.outputs(result)
    np.testing.assert_array_equal(out["y"], x * 3)
    np.testing.assert_array_equal(out["total"], np.array([6.0, 15.0]))
    assert out["total"].dtype == np.float64  # cast FP32 -> declared FP64
    c.send({"type": "release", "id": 1})

    # Pipelined executes: answered in order; a subset of outputs when asked.
    for i in range(2, 7):
        c.execute(i, [c.put("x", np.full((1, 4), i, np.float32))], outputs=["y"])
    for i in range(2, 7):
        result = c.recv()
        assert result["id"] == i
        assert [r["name"] for r in result["outputs"]] == ["y"]
        np.testing.assert_array_equal(c.outputs(result)["y"], np.full((1, 4), 3 * i))
    c.send({"type": "release", "id": 6})

    # predict raises: an error frame with the traceback, and the next execute is served.
    c.execute(7, [c.put("x", np.array([[-1, 0]], np.float32))])
    c.execute(8, [c.put("x", np.array([[5, 0]], np.float32))])
    error = c.recv()
    assert error["type"] == "error" and error["id"] == 7 and error["kind"] == "plugin"
    assert error["error"] == "ValueError: negative input"
    assert "Traceback" in error["traceback"] and "test_plugin.py" in error["traceback"]
    result = c.recv()
    assert result["type"] == "result" and result["id"] == 8
    np.testing.assert_array_equal(c.outputs(result)["y"], [[15, 0]])
    c.send({"type": "release", "id": 8})

    # Wrong batch dimension in the output: invalid_output, naming the problem.
    c.execute(9, [c.put("x", np.array([[777], [1]], np.float32))], batch_size=2)
    error = c.recv()
    assert error["kind"] == "invalid_output" and "1 rows but the batch has 2" in error["error"]

    # Cancel: the slow execute 10 runs; 11 is cancelled while 10 runs, before it starts.
    c.execute(10, [c.put("x", np.array([[999]], np.float32))])
    c.execute(11, [c.put("x", np.array([[1]], np.float32))])
    c.execute(12, [c.put("x", np.array([[2]], np.float32))])
    c.send({"type": "cancel", "id": 11})
    answers = [c.recv()]
    c.send({"type": "cancel", "id": 10})  # already answered: ignored
    c.send({"type": "cancel", "id": 99})  # unknown: ignored
    answers += [c.recv(), c.recv()]
    assert [(a["type"], a["id"]) for a in answers] == [
        ("result", 10),
        ("error", 11),
        ("result", 12),
    ]
    assert answers[1]["kind"] == "cancelled"
    c.send({"type": "release", "id": 12})

    # Ping / pong.
    c.send({"type": "ping", "seq": 42})
    assert c.recv() == {"type": "pong", "seq": 42}

    assert c.shutdown() == 0
    records = umlog_records(c.stderr())
    assert any(
        r["logger"] == "unimodel.plugin.dbl" and r["message"] == "setup for dbl on cpu"
        for r in records
    ), records
    errors = [r for r in records if r["level"] == "ERROR"]
    assert any("negative input" in r["message"] and "Traceback" in r["message"] for r in errors)


def test_large_output_goes_through_a_dedicated_fd(core, plugin):
    c = core(output_bytes=64 * 1024)
    c.hello()
    assert c.load(plugin, "Big")["type"] == "ready"
    c.execute(1, [c.put("n", np.array([100_000], np.int64))])
    result = c.recv()
    assert result["type"] == "result", result
    (ref,) = result["outputs"]
    assert ref["region"] == "fd" and ref["fd"] == 0 and ref["length"] == 100_000
    assert len(c.channel.fds) == 1
    # Sealed at its size: the core refuses a region that could shrink under its mapping.
    seals = fcntl.fcntl(c.channel.fds[0], fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW, seals
    with pytest.raises(PermissionError):
        os.ftruncate(c.channel.fds[0], 10)
    blob = c.outputs(result)["blob"]
    np.testing.assert_array_equal(blob, (np.arange(100_000) % 251).astype(np.uint8))
    # Small outputs still use the arena.
    c.execute(2, [c.put("n", np.array([10], np.int64))])
    result = c.recv()
    assert result["outputs"][0]["region"] == "output"
    assert c.shutdown() == 0


def test_output_over_max_output_bytes_is_too_large(core, plugin):
    c = core()
    c.hello()
    assert c.load(plugin, "Big", max_output_bytes=1000)["type"] == "ready"
    c.execute(1, [c.put("n", np.array([1001], np.int64))])
    error = c.recv()
    assert error["type"] == "error" and error["kind"] == "too_large"
    assert "1001 bytes" in error["error"] and "max_output_bytes limit of 1000" in error["error"]
    assert "raise it with --max-tensor-bytes" in error["error"]
    c.execute(2, [c.put("n", np.array([1000], np.int64))])
    assert c.recv()["type"] == "result"
    assert c.shutdown() == 0


def test_full_output_arena_blocks_until_release(core, plugin):
    c = core(output_bytes=64 * 1024)
    c.hello()
    assert c.load(plugin, "Big")["type"] == "ready"
    n = 40 * 1024  # two of these do not fit in 64 KiB
    c.execute(1, [c.put("n", np.array([n], np.int64))])
    first = c.recv()
    assert first["outputs"][0]["region"] == "output"
    c.execute(2, [c.put("n", np.array([n], np.int64))])
    assert c.nothing_arrives(0.3), "result 2 must wait for room in the output arena"
    # While blocked the worker still reads frames: pings are answered, executes queued.
    c.send({"type": "ping", "seq": 1})
    assert c.recv() == {"type": "pong", "seq": 1}
    c.execute(3, [c.put("n", np.array([16], np.int64))])
    assert c.nothing_arrives(0.2)
    c.send({"type": "release", "id": 1})
    second = c.recv()
    assert second["type"] == "result" and second["id"] == 2
    third = c.recv()
    assert third["type"] == "result" and third["id"] == 3
    np.testing.assert_array_equal(c.outputs(second)["blob"], (np.arange(n) % 251).astype(np.uint8))
    assert c.shutdown() == 0


def test_bytes_round_trip(core, plugin):
    c = core()
    c.hello()
    assert c.load(plugin, "Echo")["type"] == "ready"
    words = ["héllo", "", "日本語 🙂", "plain"]
    c.execute(1, [c.put("text", words, "BYTES")])
    result = c.recv()
    assert result["type"] == "result", result
    refs = {r["name"]: r for r in result["outputs"]}
    assert refs["text"]["datatype"] == "BYTES" and refs["text"]["shape"] == [4]
    out = c.outputs(result)
    assert [t.decode() for t in out["text"]] == [w.upper() for w in words]
    np.testing.assert_array_equal(out["lengths"], [len(w.encode()) for w in words])
    assert out["lengths"].dtype == np.int32
    assert c.shutdown() == 0


def test_client_segments_are_read_and_written_in_place(core, plugin):
    """Region ``client`` inputs are views of the client's segment; outputs with a target that
    fits are written into it (result region ``client``); one that does not fit goes to the
    arena. The mapping is kept for the next execute, which sends new descriptors."""
    c = core()
    c.hello()
    assert c.load(plugin, "Doubler", max_batch_size=8)["type"] == "ready"
    seg = os.memfd_create("client", os.MFD_CLOEXEC)
    os.ftruncate(seg, 8192)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    os.pwrite(seg, x.tobytes(), 1000)
    ro = os.open(f"/proc/self/fd/{seg}", os.O_RDONLY)
    ref = {
        "name": "x",
        "datatype": "FP32",
        "shape": [2, 3],
        "region": "client",
        "offset": 1000,
        "length": x.nbytes,
        "fd": 0,
    }
    for exec_id, target_len in [(1, x.nbytes), (2, x.nbytes - 4)]:
        target = {"name": "y", "fd": 1, "offset": 4096, "length": target_len}
        c.send(
            {
                "type": "execute",
                "id": exec_id,
                "batch_size": 2,
                "inputs": [ref],
                "outputs": ["y"],
                "targets": [target],
            },
            [ro, seg],
        )
        result = c.recv()
        assert result["type"] == "result", result
        (out,) = result["outputs"]
        if exec_id == 1:
            assert (out["region"], out["offset"], out["length"]) == ("client", 4096, x.nbytes)
            written = np.frombuffer(os.pread(seg, x.nbytes, 4096), np.float32).reshape(2, 3)
            np.testing.assert_array_equal(written, x * 2)
            os.pwrite(seg, b"\0" * x.nbytes, 4096)
            c.send({"type": "release", "id": exec_id})
        else:
            assert out["region"] == "output", out  # too large for its target
            np.testing.assert_array_equal(c.outputs(result)["y"], x * 2)
            assert os.pread(seg, x.nbytes, 4096) == b"\0" * x.nbytes
    os.close(ro)
    os.close(seg)
    assert c.shutdown() == 0


def test_inputs_from_a_dedicated_fd_and_inline(core, plugin):
    c = core()
    c.hello()
    assert c.load(plugin, "Doubler", max_batch_size=8)["type"] == "ready"
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    fd = os.memfd_create("input", os.MFD_CLOEXEC)
    os.write(fd, x.tobytes())
    ref = {
        "name": "x",
        "datatype": "FP32",
        "shape": [2, 3],
        "region": "fd",
        "offset": 0,
        "length": x.nbytes,
        "fd": 0,
    }
    c.execute(1, [ref], batch_size=2, fds=[fd])
    os.close(fd)
    result = c.recv()
    assert result["type"] == "result", result
    np.testing.assert_array_equal(c.outputs(result)["y"], x * 2)
    inline = {
        "name": "x",
        "datatype": "FP32",
        "shape": [1, 2],
        "region": "inline",
        "offset": 0,
        "length": 8,
        "data": np.array([[1.5, 2.5]], np.float32).tobytes(),
    }
    c.execute(2, [inline])
    np.testing.assert_array_equal(c.outputs(c.recv())["y"], [[3.0, 5.0]])
    assert c.shutdown() == 0


def test_streaming_predict_sends_chunks_then_an_empty_result(core, plugin):
    c = core()
    c.hello()
    assert c.load(plugin, "Counter")["type"] == "ready"
    c.execute(1, [c.put("n", np.array([3], np.int32))])
    kinds, values = [], []
    for i in range(3):
        chunk = c.recv()
        kinds.append(chunk["type"])
        values.append(int(c.outputs(chunk)["i"][0]))
        if i < 2:
            # The next chunk waits for this one's release (the stream's back-pressure).
            assert c.nothing_arrives(0.2)
        c.send({"type": "release", "id": 1})
    assert kinds == ["stream_chunk"] * 3
    assert values == [0, 1, 2]
    end = c.recv()
    assert end["type"] == "result" and end["id"] == 1 and end["outputs"] == []
    assert end["compute_ns"] > 0
    assert c.shutdown() == 0


def test_chunks_in_dedicated_regions_wait_for_their_release_too(core, plugin):
    c = core(output_bytes=64 * 1024)
    c.hello()
    assert c.load(plugin, "BigChunks")["type"] == "ready"
    c.execute(1, [c.put("n", np.array([3], np.int32))])
    for i in range(3):
        chunk = c.recv()
        assert chunk["type"] == "stream_chunk", chunk
        assert chunk["outputs"][0]["region"] == "fd"
        assert int(c.outputs(chunk)["blob"][0]) == i
        if i < 2:
            # Larger than the arena, but a slow client holds the generator all the same.
            assert c.nothing_arrives(0.2), "a dedicated chunk ran ahead of its release"
        c.send({"type": "release", "id": 1})
    assert c.recv()["type"] == "result"
    assert c.shutdown() == 0


def test_cancel_closes_a_running_generator_and_the_worker_keeps_serving(core, plugin):
    c = core()
    c.hello()
    assert c.load(plugin, "Counter")["type"] == "ready"
    c.execute(1, [c.put("n", np.array([1000], np.int32))])
    first = c.recv()
    assert first["type"] == "stream_chunk" and int(c.outputs(first)["i"][0]) == 0
    # The worker waits for the release; the cancel must reach it there.
    c.send({"type": "cancel", "id": 1})
    cancelled = c.recv()
    assert cancelled["type"] == "error" and cancelled["id"] == 1, cancelled
    assert cancelled["kind"] == "cancelled"
    c.send({"type": "release", "id": 1})
    c.execute(2, [c.put("n", np.array([1], np.int32))])
    chunk = c.recv()
    assert chunk["type"] == "stream_chunk" and chunk["id"] == 2
    c.send({"type": "release", "id": 2})
    assert c.recv()["type"] == "result"
    assert c.shutdown() == 0
    assert "generator closed" in c.stderr()


def test_setup_failure_is_load_failed_with_traceback(core, plugin):
    c = core()
    c.hello()
    failed = c.load(plugin, "Broken", model_dir="/models/broken")
    assert failed["type"] == "load_failed"
    assert failed["error"] == "RuntimeError: weights not found in /models/broken"
    assert "Traceback" in failed["traceback"] and "def setup" not in failed["error"]
    assert "test_plugin.py" in failed["traceback"]
    # Executes before a successful load are answered, not dropped.
    c.execute(1, [c.put("x", np.array([1], np.float32))])
    error = c.recv()
    assert error["type"] == "error" and error["id"] == 1 and "NotLoaded" in error["error"]
    assert c.shutdown() == 0
    assert any(
        r["level"] == "ERROR" and "weights not found" in r["message"]
        for r in umlog_records(c.stderr())
    )


def test_invalid_class_is_load_failed_listing_every_problem(core, tmp_path):
    path = tmp_path / "bad_plugin.py"
    path.write_text(
        "import unimodel as um\n"
        "class Bad(um.Model):\n"
        "    max_batch_size = -2\n"
        "    inputs = {'x': um.Tensor('FP33', [-1])}\n"
    )
    c = core()
    c.hello()
    failed = c.load(path, "Bad")
    assert failed["type"] == "load_failed"
    assert failed["error"].startswith("InvalidModelError: model class Bad")
    for needle in ("max_batch_size", "FP33", "outputs is missing", "predict is missing"):
        assert needle in failed["error"], needle
    assert c.shutdown() == 0


def test_missing_plugin_file_is_load_failed(core, tmp_path):
    c = core()
    c.hello()
    failed = c.load(tmp_path / "nope.py", "Nope")
    assert failed["type"] == "load_failed"
    assert failed["error"].startswith("PluginNotFoundError:")
    assert c.shutdown() == 0


def test_eof_on_the_socket_exits_zero(core, plugin):
    c = core()
    c.hello()
    assert c.load(plugin, "Doubler", max_batch_size=8)["type"] == "ready"
    c.sock.shutdown(2)
    assert c.proc.wait(10) == 0


def test_failures_outside_predict_fail_only_their_execute(core, plugin, tmp_path):
    c = core(output_bytes=64 * 1024)
    c.hello()
    assert c.load(plugin, "Odd")["type"] == "ready"

    def run(exec_id: int, mode: int) -> dict:
        c.execute(exec_id, [c.put("x", np.array([mode], np.int64))])
        return c.recv()

    # An odd returned mapping and a tensor-like that cannot become numpy: invalid_output.
    error = run(1, 1)
    assert (error["type"], error["id"], error["kind"]) == ("error", 1, "invalid_output"), error
    assert error["error"] == "KeyError: 'y'" and "__getitem__" in error["traceback"]
    error = run(2, 2)
    assert (error["type"], error["kind"]) == ("error", "invalid_output"), error
    assert error["error"] == "RuntimeError: CUDA error: device-side assert triggered"
    # An input descriptor the worker cannot map (write-only).
    path = tmp_path / "write-only"
    path.write_bytes(np.array([0], np.int64).tobytes())
    fd = os.open(path, os.O_WRONLY)
    ref = {"name": "x", "datatype": "INT64", "shape": [1], "region": "fd", "offset": 0}
    c.execute(3, [{**ref, "length": 8, "fd": 0}], fds=[fd])
    os.close(fd)
    error = c.recv()
    assert (error["type"], error["id"], error["kind"]) == ("error", 3, "plugin"), error
    assert error["error"].startswith("PermissionError"), error
    # No descriptor for the dedicated output region: OSError from memfd_create. (Last: until
    # the next predict frees them, the worker cannot even receive a descriptor.)
    error = run(4, 3)
    assert (error["type"], error["id"], error["kind"]) == ("error", 4, "plugin"), error
    assert error["error"].startswith("OSError: [Errno 24]"), error
    # The same worker keeps serving.
    result = run(5, 0)
    assert result["type"] == "result" and result["id"] == 5, result
    np.testing.assert_array_equal(c.outputs(result)["y"], [0, 1, 2, 3])
    assert c.proc.poll() is None
    assert c.shutdown() == 0


def test_empty_outputs_with_an_arena_smaller_than_one_block(core, plugin):
    # 32 bytes hold no 64-byte block: the empty result goes out as a dedicated region instead
    # of waiting forever for arena room.
    c = core(output_bytes=32, timeout=10.0)
    c.hello()
    assert c.load(plugin, "Big")["type"] == "ready"
    c.execute(1, [c.put("n", np.array([0], np.int64))])
    result = c.recv()
    assert result["type"] == "result", result
    (ref,) = result["outputs"]
    assert ref["region"] == "fd" and ref["length"] == 0, ref
    assert c.outputs(result)["blob"].shape == (0,)
    assert c.shutdown() == 0
