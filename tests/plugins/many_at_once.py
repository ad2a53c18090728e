"""Models whose worker runs many requests at once (`concurrency`), for test_concurrency.py.

Concurrency is proven inside the plugins by rendezvous, never by timing: a request that
waits at a barrier or for an event fails (TimeoutError, 500) unless the others it waits for
are inside the same worker at the same time.

- "gate" (async, concurrency 4): `cmd` is
  "barrier" (returns once 4 requests are inside at once),
  "wait:TAG" (returns once a later request "set:TAG" has run; on entering it sets the
  event "entered:TAG", so "wait:entered:TAG" returns once that request is inside), "set:TAG",
  "hold" (runs until cancelled, counted in `cancelled`), "pid".
  With `x` (UINT8, any size) it also holds that input while it waits.
- "pool" (plain def, concurrency 4): a threading barrier of `self.concurrency` (the served
  value: config.toml may change it); returns its thread id.
- "streams" (async generator, concurrency 16): `n` tokens; after its first token each
  stream waits until 16 streams have produced theirs, so the chunks of 16 streams
  interleave in one worker. Chunks carry the worker's pid and how many of its streams
  were closed early (a cancelled client).
- "doomed" (async, concurrency 4): waits for 4 requests inside, logs "all 4 inside, pid N",
  then waits for ever (the test kills the worker).
"""

import asyncio
import os
import threading

import numpy as np

import unimodel as um

RENDEZVOUS_TIMEOUT_S = 30.0


def text(value: np.ndarray) -> str:
    return value[0].decode()


def bytes_out(s: str) -> np.ndarray:
    return np.array([s.encode()], dtype=object)


class Gate(um.Model):
    name = "gate"
    concurrency = 4
    inputs = {"cmd": um.Tensor("BYTES", [1]), "x": um.Tensor("UINT8", [-1])}
    outputs = {"out": um.Tensor("BYTES", [1]), "cancelled": um.Tensor("INT64", [1])}

    def setup(self, ctx):
        self.barrier = asyncio.Barrier(self.concurrency)
        self.events: dict[str, asyncio.Event] = {}
        self.cancelled = 0

    def event(self, tag: str) -> asyncio.Event:
        return self.events.setdefault(tag, asyncio.Event())

    async def predict(self, cmd, x):
        command = text(cmd)
        size = x.size  # the input view stays valid (its arena block held) until we answer
        out = command
        if command == "barrier":
            await asyncio.wait_for(self.barrier.wait(), RENDEZVOUS_TIMEOUT_S)
        elif command.startswith("wait:"):
            self.event(f"entered:{command[5:]}").set()
            await asyncio.wait_for(self.event(command[5:]).wait(), RENDEZVOUS_TIMEOUT_S)
            out = f"{command} after set, {size} bytes held"
        elif command.startswith("set:"):
            self.event(command[4:]).set()
        elif command == "hold":
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        elif command == "pid":
            out = str(os.getpid())
        return {"out": bytes_out(out), "cancelled": np.array([self.cancelled], np.int64)}


class Pool(um.Model):
    name = "pool"
    concurrency = 4
    inputs = {"k": um.Tensor("INT32", [1])}
    outputs = {"k": um.Tensor("INT32", [1]), "thread": um.Tensor("INT64", [1])}

    def setup(self, ctx):
        self.barrier = threading.Barrier(self.concurrency, timeout=RENDEZVOUS_TIMEOUT_S)

    def predict(self, k):
        self.barrier.wait()  # BrokenBarrierError (500) unless all are in at once
        return {"k": k.copy(), "thread": np.array([threading.get_ident()], np.int64)}


class Streams(um.Model):
    name = "streams"
    concurrency = 16
    inputs = {"n": um.Tensor("INT32", [1]), "tag": um.Tensor("BYTES", [1])}
    outputs = {
        "token": um.Tensor("BYTES", [1]),
        "pid": um.Tensor("INT64", [1]),
        "closed": um.Tensor("INT64", [1]),
    }

    def setup(self, ctx):
        self.logger = ctx.logger
        self.first_tokens = 0
        self.all_started = asyncio.Event()
        self.closed = 0

    async def predict(self, n, tag):
        name = text(tag)
        count = int(n[0])
        sent = 0
        try:
            for i in range(count):
                await asyncio.sleep(0.001)  # one "decode step"
                yield {
                    "token": bytes_out(f"{name}-{i}"),
                    "pid": np.array([os.getpid()], np.int64),
                    "closed": np.array([self.closed], np.int64),
                }
                sent += 1
                if name.startswith("sync") and i == 0:
                    # Every stream of the round has yielded its first token before any
                    # goes on: 16 generators alive at once in this worker.
                    self.first_tokens += 1
                    if self.first_tokens == self.concurrency:
                        self.all_started.set()
                    await asyncio.wait_for(self.all_started.wait(), RENDEZVOUS_TIMEOUT_S)
        except (GeneratorExit, asyncio.CancelledError):
            self.closed += 1
            self.logger.info("stream %r closed after %d tokens", name, sent)
            raise


class Doomed(um.Model):
    name = "doomed"
    concurrency = 4
    inputs = {"k": um.Tensor("INT32", [1])}
    outputs = {"k": um.Tensor("INT32", [1])}

    def setup(self, ctx):
        self.logger = ctx.logger
        self.barrier = asyncio.Barrier(self.concurrency)

    async def predict(self, k):
        if await asyncio.wait_for(self.barrier.wait(), RENDEZVOUS_TIMEOUT_S) == 0:
            self.logger.info("all %d inside, pid %d", self.concurrency, os.getpid())
        await asyncio.sleep(3600)
        return {"k": k}
