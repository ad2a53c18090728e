"""Many executes at once in one worker: the runtime of models with ``concurrency > 1`` or an
``async def predict`` (docs/worker-protocol.md, "Concurrency").

Everything runs on one asyncio event loop in the main thread. The loop reads the control
socket itself (``add_reader``: a readable socket drains every complete frame without
blocking), so ``cancel``, ``release`` and ``ping`` are handled while predicts run. Each
execute becomes a task as soon as fewer than `concurrency` are running (else it waits, in
arrival order); tasks answer in whatever order they finish.

- ``async def predict`` and async generators are awaited on the loop: up to `concurrency`
  requests are inside them at once, interleaving at each ``await``. A ``cancel`` cancels
  the task: ``asyncio.CancelledError`` at its current ``await``.
- A plain ``def predict`` (or generator) runs in a pool of `concurrency` threads; a
  generator's ``next`` is one pool call per chunk, so different requests' generators
  interleave. A ``cancel`` closes a generator at its next ``yield``; a running plain
  ``predict`` runs to its end.

Outputs are written by the loop thread into the output arena (`OutputArena`, freed by id).
A stream writes its next chunk only once the core has released its previous one, and a
result that does not fit waits for a release; both wait on the loop, never blocking other
requests. Inputs, outputs and loading are shared with the one-at-a-time loop
(`unimodel.runtime.Worker`).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import logs
from .channel import ChannelClosed
from .runtime import describe
from .tensors import close_fds

if TYPE_CHECKING:
    from .runtime import LoadedModel, OutputPlacement, Worker

log = logging.getLogger("unimodel.worker")

_END = object()
_perf_ns = time.perf_counter_ns


@dataclass
class _Running:
    """One execute being served."""

    task: asyncio.Task | None = None
    cancelled: bool = False
    #: Its last chunk went out in dedicated regions and awaits its release.
    dedicated_chunk: bool = False
    #: Set by a ``release`` (or ``cancel``) for this execute while a chunk waits for one.
    released: asyncio.Event = field(default_factory=asyncio.Event)


class ConcurrentRuntime:
    """Serves a loaded model on an event loop until ``shutdown`` or EOF."""

    def __init__(self, worker: Worker) -> None:
        assert worker.model is not None
        self.worker = worker
        self.model: LoadedModel = worker.model
        self.channel = worker.channel
        self.arena = worker.arena
        self.limit = self.model.concurrency
        #: Executes received while `limit` run, in arrival order, with their descriptors.
        self.waiting: deque[tuple[dict[str, Any], list[int]]] = deque()
        self.running: dict[int, _Running] = {}
        self.pool: ThreadPoolExecutor | None = None
        if not self.model.is_async:
            self.pool = ThreadPoolExecutor(self.limit, thread_name_prefix="predict")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.finished: asyncio.Future[int] | None = None
        #: Set on every release: a result waiting for output-arena room tries again.
        self.room: asyncio.Event | None = None

    def run(self) -> int:
        """Runs the loop; returns the process exit code."""
        try:
            return asyncio.run(self._main())
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=False, cancel_futures=True)

    async def _main(self) -> int:
        self.loop = asyncio.get_running_loop()
        self.finished = self.loop.create_future()
        self.room = asyncio.Event()
        # Executes the one-at-a-time loop had queued before handing over.
        for msg in list(self.worker.pending):
            self._accept(msg)
        self.worker.pending.clear()
        fd = self.channel.sock.fileno()
        self.loop.add_reader(fd, self._on_readable)
        self._on_readable()  # frames already buffered by the channel
        try:
            return await self.finished
        finally:
            self.loop.remove_reader(fd)
            await self._abandon()

    def _finish(self, code: int = 0, error: BaseException | None = None) -> None:
        if self.finished is not None and not self.finished.done():
            if error is not None:
                self.finished.set_exception(error)
            else:
                self.finished.set_result(code)

    # -- control frames ------------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            while (msg := self.channel.poll()) is not None:
                self._dispatch(msg)
        except ChannelClosed:
            self._finish(0)
        except Exception as e:  # a ProtocolError: the core restarts us, with the traceback
            self._finish(error=e)

    def _dispatch(self, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if kind == "execute":
            self._accept(msg)
        elif kind == "release":
            exec_id = msg["id"]
            self.arena.release(exec_id)
            running = self.running.get(exec_id)
            if running is not None:
                running.dedicated_chunk = False
                running.released.set()
            assert self.room is not None
            self.room.set()
        elif kind == "ping":
            self.channel.send({"type": "pong", "seq": msg["seq"]})
        elif kind == "cancel":
            self._cancel(msg["id"])
        elif kind == "shutdown":
            self._finish(0)
        else:
            log.error("ignoring a %r frame while serving", kind)

    def _accept(self, msg: dict[str, Any]) -> None:
        # Descriptors are claimed in arrival order, whenever the execute runs.
        fds = self.worker._claim_fds(msg)
        if len(self.running) < self.limit:
            self._start(msg, fds)
        else:
            self.waiting.append((msg, fds))

    def _start(self, msg: dict[str, Any], fds: list[int]) -> None:
        assert self.loop is not None
        exec_id = msg["id"]
        running = _Running()
        self.running[exec_id] = running
        running.task = self.loop.create_task(self._serve(msg, fds, running))
        running.task.add_done_callback(lambda task: self._ended(exec_id, task))

    def _ended(self, exec_id: int, task: asyncio.Task) -> None:
        running = self.running.pop(exec_id, None)
        if task.cancelled() and running is not None and running.cancelled:
            # Cancelled before its coroutine ran at all: nothing inside answered it.
            try:
                self._answer_cancelled(exec_id, "cancelled before it started")
            except ChannelClosed:
                self._finish(0)
        while self.waiting and len(self.running) < self.limit:
            self._start(*self.waiting.popleft())

    def _cancel(self, exec_id: int) -> None:
        for i, (msg, fds) in enumerate(self.waiting):
            if msg["id"] == exec_id:
                del self.waiting[i]
                close_fds(fds)
                self._send_error(exec_id, "Cancelled: cancelled before it started", "", "cancelled")
                return
        running = self.running.get(exec_id)
        if running is None or running.cancelled:
            return
        running.cancelled = True
        running.released.set()  # a stream waiting for a release stops waiting
        if self.model.is_async and running.task is not None:
            running.task.cancel()

    async def _abandon(self) -> None:
        """On shutdown or EOF: answers executes that never started, stops the running ones."""
        while self.waiting:
            msg, fds = self.waiting.popleft()
            close_fds(fds)
            try:
                self._send_error(msg["id"], "Cancelled: worker shut down first", "", "cancelled")
            except ChannelClosed:
                break  # the core has gone; it fails them itself
        tasks = [r.task for r in self.running.values() if r.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- one execute ---------------------------------------------------------------------------

    async def _serve(self, msg: dict[str, Any], fds: list[int], running: _Running) -> None:
        """Runs one execute and answers it with exactly one ``result`` or ``error``."""
        exec_id = msg["id"]
        trace = msg.get("trace")
        token = logs.set_trace(trace) if trace else None  # this task's own context
        try:
            try:
                kwargs, targets = self._inputs(msg, fds)
            except Exception as e:
                log.error("execute %d: unusable inputs", exec_id, exc_info=True)
                self._send_error(exec_id, describe(e), traceback.format_exc(), "plugin")
                return
            if self.model.streaming:
                await self._stream(msg, kwargs, running)
            else:
                await self._call(msg, kwargs, targets)
        except asyncio.CancelledError:
            if running.cancelled:
                self._answer_cancelled(exec_id, "cancelled while running")
            else:
                raise  # shutdown: `_abandon` cancelled us
        except ChannelClosed:
            self._finish(0)
        except Exception as e:
            log.error("execute %s failed", exec_id, exc_info=True)
            self._answer(exec_id, e, traceback.format_exc())
        finally:
            if token is not None:
                logs.reset_trace(token)

    def _inputs(self, msg: dict[str, Any], fds: list[int]) -> tuple[dict, dict]:
        worker = self.worker
        try:
            kwargs = worker.inputs.arrays(msg["inputs"], fds)
            targets: dict[str, tuple] = {}
            if msg.get("targets") and not self.model.streaming:
                targets = worker.inputs.clients.targets(msg["targets"], fds)
            if self.model.cuda_inputs:
                worker._to_torch(self.model, kwargs)
            return kwargs, targets
        finally:
            close_fds(fds)

    async def _in_pool(self, fn: Any, *args: Any) -> Any:
        """Runs `fn(*args)` on the thread pool, in this task's context (trace ids)."""
        assert self.loop is not None
        ctx = contextvars.copy_context()
        return await self.loop.run_in_executor(self.pool, ctx.run, fn, *args)

    async def _call(self, msg: dict[str, Any], kwargs: dict, targets: dict) -> None:
        exec_id = msg["id"]
        model = self.model
        started = _perf_ns()
        try:
            if model.is_async:
                returned = await model.predict(**kwargs)
            else:
                returned = await self._in_pool(functools.partial(model.predict, **kwargs))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._plugin_error(exec_id, e)
            return
        compute_ns = _perf_ns() - started
        del kwargs  # drop the views before the core may reuse the input block
        placed = await self._place(exec_id, msg, returned, targets)
        if placed is None:
            return
        refs, out_fds = placed
        result = {"type": "result", "id": exec_id, "outputs": refs, "compute_ns": compute_ns}
        self._send(result, out_fds)

    async def _stream(self, msg: dict[str, Any], kwargs: dict, running: _Running) -> None:
        """One ``stream_chunk`` per ``yield``, then an empty ``result``; or an ``error``."""
        exec_id = msg["id"]
        model = self.model
        compute_ns = 0
        started = _perf_ns()
        try:
            gen = model.predict(**kwargs)
        except Exception as e:
            self._plugin_error(exec_id, e)
            return
        del kwargs
        compute_ns += _perf_ns() - started
        closed = False
        try:
            while True:
                started = _perf_ns()
                try:
                    if model.is_async:
                        chunk = await anext(gen, _END)
                    else:
                        chunk = await self._in_pool(next, gen, _END)
                except asyncio.CancelledError:
                    closed = True  # raised inside the generator: it is finished
                    raise
                except Exception as e:
                    closed = True
                    self._plugin_error(exec_id, e)
                    return
                compute_ns += _perf_ns() - started
                if chunk is _END:
                    closed = True
                    break
                await self._await_release(exec_id, running)
                if running.cancelled:
                    break
                placed = await self._place(exec_id, msg, chunk, {})
                if placed is None:
                    return
                refs, out_fds = placed
                running.dedicated_chunk = bool(out_fds)
                self._send({"type": "stream_chunk", "id": exec_id, "outputs": refs}, out_fds)
                if running.cancelled:
                    break
        finally:
            if not closed:
                await self._close(gen, exec_id)
        if running.cancelled:
            self._answer_cancelled(exec_id, "cancelled while streaming")
            return
        self._send({"type": "result", "id": exec_id, "outputs": [], "compute_ns": compute_ns}, [])

    async def _await_release(self, exec_id: int, running: _Running) -> None:
        """Waits until the core has released this stream's previous chunk (it does once the
        client has taken it: a slow client holds its generator here), or cancelled it."""
        while (self.arena.holds(exec_id) or running.dedicated_chunk) and not running.cancelled:
            running.released.clear()
            await running.released.wait()

    async def _close(self, gen: Any, exec_id: int) -> None:
        """Closes a generator (``GeneratorExit`` at its ``yield``); what it raises is logged."""
        try:
            if self.model.is_async:
                await gen.aclose()
            else:
                await self._in_pool(gen.close)
        except Exception:
            log.error("closing the generator of execute %d raised", exec_id, exc_info=True)

    async def _place(
        self, exec_id: int, msg: dict[str, Any], returned: Any, targets: dict
    ) -> tuple[list[dict[str, Any]], list[int]] | None:
        """Writes a result or chunk; None after sending an error for an unusable one."""
        worker = self.worker
        plan: OutputPlacement | None = worker.plan_outputs(
            exec_id, self.model, returned, msg, targets
        )
        if plan is None:
            return None
        if not plan.arena_bytes:
            return worker.place_outside_arena(plan)
        assert self.room is not None
        while (base := self.arena.alloc(plan.arena_bytes, exec_id)) is None:
            # Full: wait for a release (the core releases results as soon as it copied them).
            self.room.clear()
            await self.room.wait()
        return plan.direct + worker.write_arena(base, plan.prepared), []

    # -- answers -------------------------------------------------------------------------------

    def _send(self, frame: dict[str, Any], fds: list[int]) -> None:
        if fds:
            self.worker._send_with_fds(frame, fds)
        else:
            self.channel.send(frame)

    def _send_error(self, exec_id: int, error: str, tb: str, kind: str) -> None:
        self.worker._send_error(exec_id, error, tb, kind)

    def _answer_cancelled(self, exec_id: int, when: str) -> None:
        self._send_error(exec_id, f"Cancelled: {when}", "", "cancelled")

    def _plugin_error(self, exec_id: int, exc: Exception) -> None:
        self.worker._plugin_error(exec_id, exc)

    def _answer(self, exec_id: int, exc: Exception, tb: str) -> None:
        try:
            self._send_error(exec_id, describe(exc), tb, "plugin")
        except ChannelClosed:
            self._finish(0)
