"""The concurrent runtime (protocol v2) driven by a Python stand-in for the core.

Models with ``concurrency > 1`` or an ``async def predict`` run many executes at once and
answer them in any order. Concurrency is proven by rendezvous inside the plugins (an event
that opens only when N requests are in, with a timeout that fails the request otherwise),
never by timing.
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
from fake_core import FakeCore

PLUGIN = textwrap.dedent(
    """
    import asyncio
    import os
    import threading

    import numpy as np

    import unimodel as um

    GATE_TIMEOUT = 20.0


    class Gate(um.Model):
        concurrency = 4
        inputs = {"k": um.Tensor("INT32", [1])}
        outputs = {"k": um.Tensor("INT32", [1])}

        def setup(self, ctx):
            self.logger = ctx.logger
            self.inside = 0
            self.all_in = asyncio.Event()
            self.b_done = asyncio.Event()

        async def predict(self, k):
            key = int(k[0])
            if key < 100:  # a barrier: opens once `concurrency` requests are inside
                self.inside += 1
                if self.inside == self.concurrency:
                    self.all_in.set()
                await asyncio.wait_for(self.all_in.wait(), GATE_TIMEOUT)
            elif key == 100:  # A: waits for B, which was sent after it
                await asyncio.wait_for(self.b_done.wait(), GATE_TIMEOUT)
            elif key == 101:  # B
                self.b_done.set()
            elif key == 200:  # runs until cancelled
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    os.write(2, b"predict 200 cancelled\\n")
                    raise
            self.logger.info("done %d", key)
            return {"k": np.array([key], np.int32)}


    class Pool(um.Model):
        concurrency = 4
        inputs = {"k": um.Tensor("INT32", [1])}
        outputs = {"k": um.Tensor("INT32", [1]), "thread": um.Tensor("INT64", [1])}

        def setup(self, ctx):
            self.logger = ctx.logger
            self.barrier = threading.Barrier(4, timeout=GATE_TIMEOUT)

        def predict(self, k):
            self.barrier.wait()  # raises BrokenBarrierError unless 4 threads are in
            self.logger.info("pool %d", int(k[0]))
            return {"k": k.copy(), "thread": np.array([threading.get_ident()], np.int64)}


    class Streams(um.Model):
        concurrency = 3
        inputs = {"n": um.Tensor("INT32", [1])}
        outputs = {"i": um.Tensor("INT32", [1])}

        async def predict(self, n):
            count = int(n[0])
            try:
                for i in range(count):
                    await asyncio.sleep(0)
                    yield {"i": np.array([i], np.int32)}
            except GeneratorExit:
                os.write(2, b"stream of %d closed\\n" % count)
                raise


    class ThreadStreams(um.Model):
        concurrency = 2
        inputs = {"n": um.Tensor("INT32", [1])}
        outputs = {"i": um.Tensor("INT32", [1])}

        def predict(self, n):
            for i in range(int(n[0])):
                yield {"i": np.array([i], np.int32)}


    class Held(um.Model):
        concurrency = 2
        inputs = {"k": um.Tensor("INT32", [1])}
        outputs = {"blob": um.Tensor("UINT8", [-1])}

        async def predict(self, k):
            return {"blob": np.full(3000, int(k[0]), np.uint8)}
    """
)


@pytest.fixture
def plugin(tmp_path):
    path = tmp_path / "concurrent_plugin.py"
    path.write_text(PLUGIN)
    return path


@pytest.fixture
def core():
    made = []

    def make(**kwargs):
        c = FakeCore(**kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def ready(c: FakeCore, plugin, cls: str) -> None:
    c.hello()
    loaded = c.load(plugin, cls)
    assert loaded["type"] == "ready", loaded


def ints(c: FakeCore, frame, name: str = "k") -> int:
    return int(c.outputs(frame)[name][0])


def test_async_predicts_run_at_once_and_answer_out_of_order(core, plugin):
    c = core()
    ready(c, plugin, "Gate")
    # Four requests meet at the barrier: each answers only if all four were inside at once.
    for i in range(4):
        c.execute(i + 1, [c.put("k", np.array([i], np.int32))])
    answers = [c.recv() for _ in range(4)]
    assert sorted(a["id"] for a in answers) == [1, 2, 3, 4]
    assert all(a["type"] == "result" for a in answers), answers
    for a in answers:
        c.send({"type": "release", "id": a["id"]})
    # A (sent first) waits for B (sent second): B's answer comes first.
    c.execute(10, [c.put("k", np.array([100], np.int32))])
    c.execute(11, [c.put("k", np.array([101], np.int32))])
    first, second = c.recv(), c.recv()
    assert (first["id"], second["id"]) == (11, 10), (first, second)
    assert (ints(c, first), ints(c, second)) == (101, 100)
    assert c.shutdown() == 0


def test_cancel_stops_one_async_predict_and_the_others_go_on(core, plugin):
    c = core()
    ready(c, plugin, "Gate")
    c.execute(1, [c.put("k", np.array([200], np.int32))])  # runs until cancelled
    c.execute(2, [c.put("k", np.array([100], np.int32))])  # waits for 101
    c.execute(3, [c.put("k", np.array([101], np.int32))])
    # Tasks start in arrival order: once 3 and 2 answered, 1 is inside its predict.
    assert [c.recv()["id"], c.recv()["id"]] == [3, 2]
    c.send({"type": "cancel", "id": 1})
    assert c.recv() == {
        "type": "error",
        "id": 1,
        "error": "Cancelled: cancelled while running",
        "traceback": "",
        "kind": "cancelled",
    }
    c.send({"type": "ping", "seq": 5})
    assert c.recv() == {"type": "pong", "seq": 5}
    c.execute(4, [c.put("k", np.array([101], np.int32))])
    assert c.recv()["id"] == 4
    assert c.shutdown() == 0
    assert "predict 200 cancelled" in c.stderr()


def test_executes_past_the_concurrency_wait_and_can_be_cancelled_there(core, plugin):
    c = core()
    ready(c, plugin, "Gate")
    for i in range(4):  # four long ones fill the worker
        c.execute(i + 1, [c.put("k", np.array([200], np.int32))])
    c.execute(5, [c.put("k", np.array([101], np.int32))])
    assert c.nothing_arrives(0.3), "a fifth ran while four were running"
    c.send({"type": "cancel", "id": 5})
    assert c.recv()["error"] == "Cancelled: cancelled before it started"
    c.execute(6, [c.put("k", np.array([101], np.int32))])
    c.send({"type": "cancel", "id": 2})
    assert c.recv()["id"] == 2
    # Id 2's slot went to the oldest waiting execute.
    answer = c.recv()
    assert answer["type"] == "result" and answer["id"] == 6
    assert c.shutdown() == 0


def test_plain_predicts_run_in_a_pool_of_concurrency_threads(core, plugin):
    c = core()
    ready(c, plugin, "Pool")
    for i in range(4):
        c.execute(i + 1, [c.put("k", np.array([i], np.int32))])
    answers = [c.recv() for _ in range(4)]
    assert all(a["type"] == "result" for a in answers), answers
    threads = {int(c.outputs(a)["thread"][0]) for a in answers}
    assert len(threads) == 4, "the barrier of 4 passed, in 4 threads"
    assert c.shutdown() == 0


@pytest.mark.parametrize("cls", ["Streams", "ThreadStreams"])
def test_generators_of_different_requests_interleave(core, plugin, cls):
    c = core()
    ready(c, plugin, cls)
    streams = 2
    for i in range(streams):
        c.execute(i + 1, [c.put("n", np.array([3], np.int32))])
    # Each stream's chunk waits for its release: the first chunk of every stream arrives
    # before any second chunk, so the streams run side by side.
    firsts = [c.recv() for _ in range(streams)]
    assert sorted(f["id"] for f in firsts) == [1, 2]
    assert all(f["type"] == "stream_chunk" and ints(c, f, "i") == 0 for f in firsts)
    assert c.nothing_arrives(0.2), "a stream ran ahead of its release"
    got: dict[int, list[int]] = {1: [0], 2: [0]}
    ended = set()
    for f in firsts:
        c.send({"type": "release", "id": f["id"]})
    while len(ended) < streams:
        frame = c.recv()
        if frame["type"] == "result":
            assert frame["outputs"] == []
            ended.add(frame["id"])
            continue
        assert frame["type"] == "stream_chunk", frame
        got[frame["id"]].append(ints(c, frame, "i"))
        c.send({"type": "release", "id": frame["id"]})
    assert got == {1: [0, 1, 2], 2: [0, 1, 2]}
    assert c.shutdown() == 0


def test_cancel_closes_one_stream_and_the_other_goes_on(core, plugin):
    c = core()
    ready(c, plugin, "Streams")
    c.execute(1, [c.put("n", np.array([100], np.int32))])
    c.execute(2, [c.put("n", np.array([2], np.int32))])
    firsts = {c.recv()["id"], c.recv()["id"]}
    assert firsts == {1, 2}
    # Stream 1 waits for the release of its chunk; cancel it there.
    c.send({"type": "cancel", "id": 1})
    c.send({"type": "release", "id": 2})
    frames = [c.recv() for _ in range(2)]
    by_id = {f["id"]: f for f in frames if f["type"] != "stream_chunk"}
    assert by_id[1]["kind"] == "cancelled" and by_id[1]["error"].startswith("Cancelled")
    chunk = next(f for f in frames if f["type"] == "stream_chunk")
    assert chunk["id"] == 2 and ints(c, chunk, "i") == 1
    c.send({"type": "release", "id": 2})
    end = c.recv()
    assert (end["type"], end["id"], end["outputs"]) == ("result", 2, [])
    assert c.shutdown() == 0
    assert "stream of 100 closed" in c.stderr()


def test_a_held_output_block_does_not_block_other_results(core, plugin):
    # Room for two 3000-byte results (3008 bytes each, aligned) in an 8 KiB arena.
    c = core(output_bytes=8192)
    ready(c, plugin, "Held")
    c.execute(1, [c.put("k", np.array([1], np.int32))])
    held = c.recv()
    assert held["type"] == "result" and held["id"] == 1
    # Result 1 stays unreleased (a slow request's block); others come and go beside it.
    for i in range(2, 8):
        c.execute(i, [c.put("k", np.array([i], np.int32))])
        answer = c.recv()
        assert answer["id"] == i and answer["type"] == "result"
        assert answer["outputs"][0]["offset"] != held["outputs"][0]["offset"]
        assert int(c.outputs(answer)["blob"][0]) == i
        c.send({"type": "release", "id": i})
    assert int(c.outputs(held)["blob"][0]) == 1, "the held block was never overwritten"
    assert c.shutdown() == 0


def log_traces(c: FakeCore) -> dict[str, str]:
    """``{message: trace_id}`` of the worker's log records so far."""
    records = [
        json.loads(line[len("\x1eUMLOG ") :])
        for line in c.stderr().split("\n")  # not splitlines(): it splits at \x1e too
        if line.startswith("\x1eUMLOG ")
    ]
    return {r["message"]: r.get("trace_id", "") for r in records}


def test_each_concurrent_execute_logs_with_its_own_trace_ids(core, plugin):
    traces = [f"{i:032x}" for i in range(1, 7)]
    c = core()
    ready(c, plugin, "Gate")
    # 100 waits while 101 runs and logs: contexts must not leak between the two tasks.
    c.execute(1, [c.put("k", np.array([100], np.int32))], trace=[traces[0]])
    c.execute(2, [c.put("k", np.array([101], np.int32))], trace=[traces[1]])
    assert [c.recv()["id"], c.recv()["id"]] == [2, 1]
    assert c.shutdown() == 0
    logged = log_traces(c)
    assert (logged["done 100"], logged["done 101"]) == (traces[0], traces[1])

    pool = core()
    ready(pool, plugin, "Pool")
    for i in range(4):
        pool.execute(i + 1, [pool.put("k", np.array([i], np.int32))], trace=[traces[2 + i]])
    assert sorted(pool.recv()["id"] for _ in range(4)) == [1, 2, 3, 4]
    assert pool.shutdown() == 0
    logged = log_traces(pool)
    assert [logged[f"pool {i}"] for i in range(4)] == traces[2:]
