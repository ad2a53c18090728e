"""Structured log lines from the worker to the core.

Every `logging` record becomes one stderr line: ``\\x1eUMLOG {json}`` with ``level``,
``logger`` and ``message`` (exception text and stack included, JSON-escaped so a traceback
stays on one line). The core parses these and re-emits them at their own level, labelled with
the model and instance; anything else on stderr it logs at WARN.

Trace ids: while a traced ``predict`` runs (`set_trace` .. `reset_trace`, from the
``execute`` frame's ``trace`` key), every record also carries ``trace_id`` (several ids of one
batch joined with ``,``), and lines printed to stdout become ``UMLOG`` records at INFO with
logger ``stdout`` so that they carry it too (`TracedStdout`). The id lives in a
`contextvars.ContextVar`, so code the plugin runs in another thread or task does not inherit
it unless it copies the context.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

PREFIX = "\x1eUMLOG "

#: The running predict's trace id(s), comma-joined; None outside a traced predict.
_TRACE: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "unimodel_trace_id", default=None
)


def current_trace_id() -> str | None:
    """The trace id(s) of the predict running in this context, or None."""
    return _TRACE.get()


def set_trace(trace_ids: Sequence[str]) -> contextvars.Token:
    """Makes `trace_ids` the current trace; pass the token to `reset_trace` afterwards."""
    return _TRACE.set(",".join(trace_ids))


def reset_trace(token: contextvars.Token) -> None:
    """Ends a traced predict: a partial stdout line is sent with its trace, then reset."""
    out = sys.stdout
    if isinstance(out, TracedStdout):
        out.finish_line()
    _TRACE.reset(token)


def record_line(level: str, logger: str, message: str, trace_id: str | None) -> str:
    """One ``UMLOG`` line (without newline)."""
    payload: dict[str, Any] = {"level": level, "logger": logger, "message": message}
    if trace_id is not None:
        payload["trace_id"] = trace_id
    return PREFIX + json.dumps(payload)


class UmlogFormatter(logging.Formatter):
    """Formats a record as the one-line ``UMLOG`` JSON form."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            message = f"{message}\n{record.exc_text}"
        if record.stack_info:
            message = f"{message}\n{self.formatStack(record.stack_info)}"
        return record_line(record.levelname, record.name, message, _TRACE.get())


class UmlogHandler(logging.StreamHandler):
    """Writes UMLOG lines to a stream (stderr unless told otherwise), resolved at emit time."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self._fixed_stream = stream
        self.setFormatter(UmlogFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        # Follow sys.stderr if it is swapped (pytest capture, redirect_stderr).
        if self._fixed_stream is None:
            self.stream = sys.stderr
        super().emit(record)


def configure(level: str | int | None = None) -> None:
    """Routes every logging record in the process to stderr as UMLOG lines.

    The level comes from `level`, else ``UNIMODEL_LOG_LEVEL``, else INFO.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(UmlogHandler())
    resolved = level or os.environ.get("UNIMODEL_LOG_LEVEL", "INFO")
    if isinstance(resolved, str):
        resolved = resolved.upper()
    try:
        root.setLevel(resolved)
    except (ValueError, TypeError):
        root.setLevel(logging.INFO)
    logging.captureWarnings(True)


class TracedStdout:
    """Stands in for ``sys.stdout``: outside a traced predict it writes straight through;
    inside one, each printed line becomes a ``UMLOG`` record carrying the trace id.

    Everything else (``fileno``, ``buffer``, ``encoding``, ...) is the wrapped stream's.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._partial: list[str] = []

    def write(self, text: str) -> int:
        trace = _TRACE.get()
        if trace is None and not self._partial:
            return self._stream.write(text)
        lines = text.split("\n")
        # Every element but the last ends a line; the last is the start of the next one.
        for piece in lines[:-1]:
            self._partial.append(piece)
            self._emit("".join(self._partial), trace)
            self._partial.clear()
        if lines[-1]:
            self._partial.append(lines[-1])
        return len(text)

    def finish_line(self) -> None:
        """Sends a line left without its newline (``print(..., end="")``) with its trace."""
        if self._partial:
            self._emit("".join(self._partial), _TRACE.get())
            self._partial.clear()
            self._stream.flush()

    def _emit(self, line: str, trace: str | None) -> None:
        if trace is None:
            self._stream.write(line + "\n")
        else:
            self._stream.write(record_line("INFO", "stdout", line, trace) + "\n")

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def tag_stdout() -> None:
    """Installs `TracedStdout` over ``sys.stdout`` (once); the worker calls it at start."""
    if not isinstance(sys.stdout, TracedStdout):
        sys.stdout = TracedStdout(sys.stdout)
