"""The worker process's event loop: the Python side of docs/worker-protocol.md.

Flow: send ``hello``; on ``load`` import the plugin, instantiate the class and call
``setup(ctx)`` (answer ``ready`` or ``load_failed``); then serve ``execute`` frames, one
``result`` or ``error`` each, keyed by the execute's id. The core's side is
``core/src/worker/`` (supervisor, request pipeline, arenas, control channel).

A model with ``concurrency > 1`` or an ``async def predict`` is served by the asyncio
runtime in `unimodel.concurrent` (many executes at once, answered in any order); this
module's loop serves the rest, one execute at a time in arrival order, and hands over to
that runtime right after ``load`` when the model needs it. It also owns what both share:
loading, turning inputs into arrays and writing outputs.

This loop is single-threaded and `predict` runs on it. Frames that arrive while `predict` runs
wait in the socket; before starting a queued execute the loop drains them without blocking,
so a ``cancel`` for a queued execute is seen in time. A generator `predict` streams: after
each chunk it sends, the loop drains pending frames the same way, so a ``cancel`` of the
running stream closes the generator at its next ``yield``; and it writes a chunk into the
output arena only once the core has released the previous one (the stream's back-pressure).
Per execute the hot path is: one ``recvmsg_into``, one ``unpackb``, one `np.ndarray` per
input over the arena, `predict`, one copy per output into the output arena, one ``pack`` and
one ``sendall``. Nothing is logged on it unless something fails.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Any

from . import __version__, logs
from .allocator import ALIGN, OutputArena, align_up
from .channel import Channel, ChannelClosed
from .discovery import PluginSpec, find_models, is_llm_class, parse_spec
from .errors import PluginError
from .model import Context
from .protocol import PROTOCOL_VERSION
from .tensors import (
    InputArena,
    InvalidOutputError,
    OutputPlan,
    OutputTooLargeError,
    PreparedOutput,
    close_fds,
    fd_count,
    map_fd,
    write_dedicated,
    write_output,
)
from .validation import check_model_class, is_async, is_streaming

log = logging.getLogger("unimodel.worker")

_perf_ns = time.perf_counter_ns


class _Stop(Exception):
    """Shutdown arrived while waiting for output-arena room: give up the current result."""


def describe(exc: BaseException) -> str:
    """The protocol's ``"Type: text"`` form of an exception."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass
class OutputPlacement:
    """Where a result's outputs go: `direct` refs already written into client memory, and
    `prepared` outputs for one output-arena block of `arena_bytes` (0: too large for the
    arena, so one dedicated region each)."""

    direct: list[dict[str, Any]]
    prepared: list[PreparedOutput]
    arena_bytes: int


class LoadedModel:
    """A set-up plugin instance plus what the hot path needs, resolved once."""

    def __init__(self, instance: Any, cls: type, msg: dict[str, Any]) -> None:
        self.instance = instance
        self.predict = instance.predict
        self.streaming = is_streaming(cls)
        self.is_async = is_async(cls)
        #: Executes run at once: the core's value (config may override the class's).
        self.concurrency = max(1, int(msg.get("concurrency") or cls.concurrency or 1))
        #: Served by `unimodel.concurrent` rather than this module's one-at-a-time loop.
        self.concurrent = self.is_async or self.concurrency > 1
        self.max_batch_size = int(msg.get("max_batch_size") or 0)
        max_output_bytes = int(msg.get("max_output_bytes") or 0)
        self.plan = OutputPlan(cls.outputs or {}, self.max_batch_size > 0, max_output_bytes)
        #: Inputs declared on a CUDA device: converted to torch tensors before predict.
        self.cuda_inputs = {
            name for name, t in (cls.inputs or {}).items() if t.device.startswith("cuda")
        }
        self.torch_device = ""
        if self.cuda_inputs:
            self.torch_device = str(msg.get("device") or "cuda")
            if not self.torch_device.startswith("cuda"):
                self.torch_device = "cuda"


class Worker:
    """One worker process's protocol state."""

    def __init__(self, channel: Channel, input_fd: int, output_fd: int) -> None:
        self.channel = channel
        self.inputs = InputArena(input_fd)
        self.out_mm = map_fd(output_fd, writable=True)
        self.arena = OutputArena(len(self.out_mm) if self.out_mm is not None else 0)
        self.model: LoadedModel | None = None
        #: Executes received and not yet started, in arrival order.
        self.pending: deque[dict[str, Any]] = deque()
        #: Ids of pending executes the core cancelled.
        self.cancelled: set[int] = set()
        #: The streaming execute now running, and whether the core cancelled it.
        self.streaming_id: int | None = None
        self.stream_cancelled = False
        # The stream whose last chunk went out in dedicated regions and awaits its release:
        # such a chunk holds no arena block, but must not run ahead of a slow client either.
        self.dedicated_chunk: int | None = None
        self.stopping = False
        #: Client memory the current execute's outputs go to: name -> (mapping, offset, length).
        self.targets: dict[str, tuple] = {}

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> int:
        """Serves until ``shutdown`` or EOF; returns the process exit code."""
        self.channel.send(
            {
                "type": "hello",
                "protocol": PROTOCOL_VERSION,
                "pid": os.getpid(),
                "python": platform.python_version(),
                "sdk": __version__,
            }
        )
        channel = self.channel
        pending = self.pending
        try:
            while not self.stopping:
                if pending:
                    # Frames that came in during the last predict: cancels, releases, pings.
                    while (msg := channel.poll()) is not None:
                        self.dispatch(msg)
                    if self.stopping:
                        break
                    self.execute(pending.popleft())
                    continue
                msg = channel.recv()
                if msg["type"] == "execute" and not channel.buffered():
                    self.execute(msg)  # the common case: nothing queued, nothing behind it
                else:
                    self.dispatch(msg)
                    if self.model is not None and self.model.concurrent:
                        from .concurrent import ConcurrentRuntime

                        return ConcurrentRuntime(self).run()
        except (ChannelClosed, _Stop):
            pass
        self._answer_abandoned()
        return 0

    def dispatch(self, msg: dict[str, Any]) -> None:
        """Handles one frame that is not executed right now (executes are queued)."""
        kind = msg["type"]
        if kind == "execute":
            self.pending.append(msg)
        elif kind == "release":
            self.arena.release(msg["id"])
            if self.dedicated_chunk == msg["id"]:
                self.dedicated_chunk = None
        elif kind == "ping":
            self.channel.send({"type": "pong", "seq": msg["seq"]})
        elif kind == "cancel":
            target = msg["id"]
            if target == self.streaming_id:
                self.stream_cancelled = True
            elif any(p["id"] == target for p in self.pending):
                self.cancelled.add(target)
        elif kind == "shutdown":
            self.stopping = True
        elif kind == "load":
            self.load(msg)
        else:
            log.error("ignoring a %r frame: the core never sends those", kind)

    def _answer_abandoned(self) -> None:
        """On shutdown, answers executes that never started, so none is left unanswered."""
        while self.pending:
            msg = self.pending.popleft()
            close_fds(self._claim_fds(msg))
            try:
                self._send_error(msg["id"], "Cancelled: worker shut down first", "", "cancelled")
            except ChannelClosed:
                return  # the core has gone; it fails them itself

    # -- load ----------------------------------------------------------------------------------

    def load(self, msg: dict[str, Any]) -> None:
        if self.model is not None:
            log.error("ignoring a second load: %s is already loaded", msg.get("model"))
            return
        llm_decl: dict[str, Any] | None = None
        try:
            spec = parse_spec(str(msg["plugin"]))
            class_name = msg.get("class") or spec.class_name
            classes = find_models(PluginSpec(spec.path, class_name))
            if len(classes) > 1:
                names = ", ".join(c.__name__ for c in classes)
                raise PluginError(f"{spec.path} defines several models ({names}); load names none")
            cls = classes[0]
            model_name = str(msg.get("model") or cls.name)
            ctx = Context(
                model_name=model_name,
                model_dir=str(msg.get("model_dir") or spec.path.parent),
                device=str(msg.get("device") or "cpu"),
                instance=int(msg.get("instance") or 0),
                parameters={str(k): str(v) for k, v in (msg.get("parameters") or {}).items()},
            )
            if is_llm_class(cls):
                # Each execute is one engine step (`unimodel.llm_worker`), one at a time.
                from .llm_worker import StepRunner, load_llm

                runner, llm_decl, setup_ms = load_llm(cls, ctx)
                step_msg = {**msg, "max_batch_size": 0, "concurrency": 1}
                loaded = LoadedModel(runner, StepRunner, step_msg)
            else:
                check_model_class(cls, str(spec.path))
                instance = cls()
                # The served values win over the class defaults (CLI flags, --set, config).
                instance.name = model_name  # type: ignore[misc]
                instance.max_batch_size = int(msg.get("max_batch_size") or 0)  # type: ignore[misc]
                instance.concurrency = int(msg.get("concurrency") or cls.concurrency)  # type: ignore[misc]
                started = time.perf_counter()
                instance.setup(ctx)
                setup_ms = (time.perf_counter() - started) * 1000.0
                loaded = LoadedModel(instance, cls, msg)
            if loaded.cuda_inputs:
                import torch  # noqa: F401 - fail the load now rather than on the first request
        except (Exception, SystemExit) as e:
            log.error("loading %s failed", msg.get("plugin"), exc_info=True)
            self.channel.send(
                {
                    "type": "load_failed",
                    "error": describe(e),
                    "traceback": traceback.format_exc(),
                }
            )
            return
        self.model = loaded
        # Everything alive now lives for the whole process: keep the collector off it.
        gc.collect()
        gc.freeze()
        ready: dict[str, Any] = {"type": "ready", "setup_ms": setup_ms}
        if llm_decl is not None:
            ready["llm"] = llm_decl  # what the core's LLM scheduler reads (docs/llm.md)
        self.channel.send(ready)
        log.info("model %s ready (setup %.1f ms)", ctx.model_name, setup_ms)

    # -- execute -------------------------------------------------------------------------------

    def _claim_fds(self, msg: dict[str, Any]) -> list[int]:
        refs = msg.get("inputs") or ()
        count = fd_count(refs, msg.get("targets"))
        return self.channel.take_fds(count) if count else []

    def execute(self, msg: dict[str, Any]) -> None:
        """Runs one execute and answers it with exactly one ``result`` or ``error``.

        Whatever goes wrong with this batch stays this batch's problem: besides `predict`
        raising, converting its inputs (a descriptor that cannot be mapped, a CUDA copy that
        fails), handling an odd returned object or writing the outputs (no memfd to be had)
        can raise anything, and the worker must keep serving. Only a lost channel and shutdown
        (`ChannelClosed`, `_Stop`) get out. Log records (and printed lines) of a traced
        predict carry the batch's trace ids.
        """
        trace = msg.get("trace")
        token = logs.set_trace(trace) if trace else None
        try:
            self._execute(msg)
        except (ChannelClosed, _Stop):
            raise
        except Exception as e:
            log.error("execute %s failed", msg.get("id"), exc_info=True)
            self._send_error(msg["id"], describe(e), traceback.format_exc(), "plugin")
        finally:
            self.targets = {}  # they belong to this execute only, however it ended
            if token is not None:
                logs.reset_trace(token)

    def _execute(self, msg: dict[str, Any]) -> None:
        exec_id = msg["id"]
        model = self.model
        refs = msg["inputs"]
        fds: list[int] = []
        targets = msg.get("targets")
        if targets:
            fds = self._claim_fds(msg)
        else:
            for ref in refs:
                if ref["region"] in ("fd", "client"):
                    fds = self._claim_fds(msg)
                    break
        try:
            if self.cancelled and exec_id in self.cancelled:
                self.cancelled.discard(exec_id)
                self._send_error(exec_id, "Cancelled: cancelled before it started", "", "cancelled")
                return
            if model is None:
                self._send_error(
                    exec_id, "NotLoaded: execute before a successful load", "", "plugin"
                )
                return
            try:
                kwargs = self.inputs.arrays(refs, fds)
                if targets and not model.streaming:
                    self.targets = self.inputs.clients.targets(targets, fds)
                if model.cuda_inputs:
                    self._to_torch(model, kwargs)
            except Exception as e:
                log.error("execute %d: unusable inputs", exec_id, exc_info=True)
                self._send_error(exec_id, describe(e), traceback.format_exc(), "plugin")
                return
        finally:
            if fds:
                close_fds(fds)
        if model.streaming:
            self._execute_stream(model, msg, kwargs)
            return
        started = _perf_ns()
        try:
            returned = model.predict(**kwargs)
        except Exception as e:
            self._plugin_error(exec_id, e)
            return
        compute_ns = _perf_ns() - started
        del kwargs  # drop the views before the core may reuse the input block
        outputs = self._emit(exec_id, model, returned, msg)
        if outputs is None:
            return
        refs_out, out_fds = outputs
        result = {"type": "result", "id": exec_id, "outputs": refs_out, "compute_ns": compute_ns}
        if out_fds:
            self._send_with_fds(result, out_fds)
        else:
            self.channel.send(result)

    def _execute_stream(self, model: LoadedModel, msg: dict[str, Any], kwargs: dict) -> None:
        """Runs a generator `predict`: one ``stream_chunk`` per ``yield``, then an empty
        ``result``; or an ``error`` (``cancelled`` when the core cancelled it mid-stream)."""
        exec_id = msg["id"]
        self.streaming_id = exec_id
        self.stream_cancelled = False
        gen = None
        try:
            compute_ns = 0
            started = _perf_ns()
            gen = model.predict(**kwargs)
            compute_ns += _perf_ns() - started
            while True:
                started = _perf_ns()
                try:
                    chunk = next(gen)
                except StopIteration:
                    compute_ns += _perf_ns() - started
                    break
                compute_ns += _perf_ns() - started
                self._await_chunk_release(exec_id)
                if self.stream_cancelled:
                    break
                outputs = self._emit(exec_id, model, chunk, msg)
                if outputs is None:
                    self._close(gen, exec_id)
                    return
                refs_out, out_fds = outputs
                frame = {"type": "stream_chunk", "id": exec_id, "outputs": refs_out}
                if out_fds:
                    self.dedicated_chunk = exec_id
                    self._send_with_fds(frame, out_fds)
                else:
                    self.channel.send(frame)
                # A cancel (the client went away) must not wait for the generator's end.
                while (pending := self.channel.poll()) is not None:
                    self.dispatch(pending)
                if self.stream_cancelled:
                    break
        except (ChannelClosed, _Stop):
            raise
        except Exception as e:
            self._plugin_error(exec_id, e)
            return
        finally:
            self.streaming_id = None
            self.dedicated_chunk = None
        if self.stream_cancelled:
            self._close(gen, exec_id)
            self._send_error(exec_id, "Cancelled: cancelled while streaming", "", "cancelled")
            return
        end = {"type": "result", "id": exec_id, "outputs": [], "compute_ns": compute_ns}
        self.channel.send(end)

    def _await_chunk_release(self, exec_id: int) -> None:
        """Waits (serving control frames) until the core has released this stream's previous
        chunk, or cancelled the stream: the core releases a chunk only once its client has
        taken it, so a slow client holds the generator here instead of filling memory."""
        while (
            self.arena.holds(exec_id) or self.dedicated_chunk == exec_id
        ) and not self.stream_cancelled:
            self.dispatch(self.channel.recv())
            if self.stopping:
                raise _Stop()

    @staticmethod
    def _close(gen: Any, exec_id: int) -> None:
        """Closes a generator (``GeneratorExit`` at its ``yield``); what it raises is logged."""
        if gen is None:
            return
        try:
            gen.close()
        except Exception:
            log.error("closing the generator of execute %d raised", exec_id, exc_info=True)

    def _plugin_error(self, exec_id: int, exc: Exception) -> None:
        tb = traceback.format_exc()
        log.error("predict raised for execute %d", exec_id, exc_info=exc)
        self._send_error(exec_id, describe(exc), tb, "plugin")

    def _send_error(self, exec_id: int, error: str, tb: str, kind: str) -> None:
        self.channel.send(
            {"type": "error", "id": exec_id, "error": error, "traceback": tb, "kind": kind}
        )

    def _send_with_fds(self, frame: dict[str, Any], fds: list[int]) -> None:
        try:
            self.channel.send_with_fds(frame, fds)
        finally:
            close_fds(fds)

    @staticmethod
    def _to_torch(model: LoadedModel, kwargs: dict[str, Any]) -> None:
        import torch

        for name in model.cuda_inputs:
            if name in kwargs:
                kwargs[name] = torch.tensor(kwargs[name], device=model.torch_device)

    # -- outputs -------------------------------------------------------------------------------

    def _emit(
        self, exec_id: int, model: LoadedModel, returned: Any, msg: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], list[int]] | None:
        """Validates and writes outputs; returns (refs, fds), or None after sending an error.

        A failure while writing (e.g. no memfd for a dedicated region) propagates to `execute`.
        """
        plan = self.plan_outputs(exec_id, model, returned, msg, self.targets)
        if plan is None:
            return None
        if plan.arena_bytes:
            base = self._alloc(plan.arena_bytes, exec_id)
            return plan.direct + self.write_arena(base, plan.prepared), []
        return self.place_outside_arena(plan)

    def plan_outputs(
        self,
        exec_id: int,
        model: LoadedModel,
        returned: Any,
        msg: dict[str, Any],
        targets: dict[str, tuple],
    ) -> OutputPlacement | None:
        """Validates what `predict` returned and writes the outputs that have client targets;
        says where the rest go. None after sending an ``error`` for an unusable result."""
        try:
            prepared = model.plan.prepare(returned, msg["outputs"], msg["batch_size"])
        except InvalidOutputError as e:
            kind, exc, tb = "invalid_output", e, ""
        except OutputTooLargeError as e:
            kind, exc, tb = "too_large", e, ""
        except Exception as e:
            # An odd returned object: a cast numpy refused after all, a mapping whose lookup
            # raises, a tensor-like whose .numpy() fails. The traceback shows which.
            kind, exc, tb = "invalid_output", e, traceback.format_exc()
        else:
            direct: list[dict[str, Any]] = []
            if targets:
                direct, prepared = self._write_targets(prepared, targets)
                if not prepared:
                    return OutputPlacement(direct, [], 0)
            total = 0
            for out in prepared:
                total += align_up(out.nbytes)
            # An all-empty result still takes one ALIGN block (`write_arena`): an arena smaller
            # than that could never hold it, and allocation would wait for room forever.
            size = max(total, ALIGN)
            return OutputPlacement(direct, prepared, size if size <= self.arena.capacity else 0)
        log.error("execute %d: %s", exec_id, exc, exc_info=bool(tb))
        self._send_error(exec_id, describe(exc), tb, kind)
        return None

    def place_outside_arena(self, plan: OutputPlacement) -> tuple[list[dict[str, Any]], list[int]]:
        """Refs (and descriptors) of a result that takes no arena block."""
        if not plan.prepared:
            return plan.direct, []
        refs, fds = self._write_dedicated(plan.prepared)
        return plan.direct + refs, fds

    @staticmethod
    def _write_targets(
        prepared: list[PreparedOutput], targets: dict[str, tuple]
    ) -> tuple[list[dict[str, Any]], list[PreparedOutput]]:
        """Writes the outputs that have a target and fit it straight into client memory;
        returns their refs (region ``client``) and the outputs left for the arena."""
        direct = []
        rest = []
        for out in prepared:
            target = targets.get(out.spec.name)
            if target is None or out.nbytes > target[2]:
                rest.append(out)  # too large: the core reports it, naming the sizes
                continue
            mm, offset, _ = target
            write_output(mm, offset, out)
            direct.append(
                {
                    "name": out.spec.name,
                    "datatype": out.spec.datatype,
                    "shape": out.shape,
                    "region": "client",
                    "offset": offset,
                    "length": out.nbytes,
                }
            )
        return direct, rest

    def write_arena(self, base: int, prepared: list[PreparedOutput]) -> list[dict[str, Any]]:
        """Writes the outputs into the output-arena block at `base`; returns their refs."""
        mm = self.out_mm
        refs = []
        offset = base
        for out in prepared:
            write_output(mm, offset, out)  # type: ignore[arg-type]
            spec = out.spec
            refs.append(
                {
                    "name": spec.name,
                    "datatype": spec.datatype,
                    "shape": out.shape,
                    "region": "output",
                    "offset": offset,
                    "length": out.nbytes,
                }
            )
            offset += align_up(out.nbytes)
        return refs

    @staticmethod
    def _write_dedicated(prepared: list[PreparedOutput]) -> tuple[list[dict[str, Any]], list[int]]:
        """One memfd per output, for results larger than the whole arena."""
        refs = []
        fds: list[int] = []
        try:
            for index, out in enumerate(prepared):
                fds.append(write_dedicated(out))
                spec = out.spec
                refs.append(
                    {
                        "name": spec.name,
                        "datatype": spec.datatype,
                        "shape": out.shape,
                        "region": "fd",
                        "offset": 0,
                        "length": out.nbytes,
                        "fd": index,
                    }
                )
        except BaseException:
            close_fds(fds)
            raise
        return refs, fds

    def _alloc(self, size: int, owner: int) -> int:
        """A block of the output arena; while it is full, serve control frames until a release."""
        arena = self.arena
        offset = arena.alloc(size, owner)
        while offset is None:
            self.dispatch(self.channel.recv())
            if self.stopping:
                raise _Stop()
            offset = arena.alloc(size, owner)
        return offset


def serve(control_fd: int, input_fd: int, output_fd: int) -> int:
    """Runs the worker protocol on inherited descriptors; returns the exit code."""
    import socket

    sock = socket.socket(fileno=control_fd)
    logs.tag_stdout()
    worker = Worker(Channel(sock), input_fd, output_fd)
    try:
        return worker.run()
    finally:
        worker.channel.close_unclaimed_fds()
