"""Structured log lines from the worker to the core.

Every `logging` record becomes one stderr line: ``\\x1eUMLOG {json}`` with ``level``,
``logger`` and ``message`` (exception text and stack included, JSON-escaped so a traceback
stays on one line). The core parses these and re-emits them at their own level, labelled with
the model and instance; anything else on stderr it logs at WARN.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import TextIO

PREFIX = "\x1eUMLOG "


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
        payload = {"level": record.levelname, "logger": record.name, "message": message}
        return PREFIX + json.dumps(payload)


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
