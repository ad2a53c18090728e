"""Trace ids in the worker's log output: the context variable set around a traced predict,
the ``trace_id`` key of UMLOG records, printed lines turned into records, and the
``execute.trace`` key on the wire (docs/worker-protocol.md, "Trace ids")."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import pytest

from unimodel import logs, protocol
from unimodel.runtime import Worker

DOC = Path(__file__).resolve().parents[2] / "docs" / "worker-protocol.md"
A = "4bf92f3577b34da6a3ce929d0e0e4736"
B = "0af7651916cd43dd8448eb211c80319c"


def lines_of(text: str) -> list[str]:
    # Not str.splitlines: it also splits at \x1e, the record separator UMLOG lines start with.
    return [line for line in text.split("\n") if line]


def parse(line: str) -> dict:
    assert line.startswith(logs.PREFIX), line
    return json.loads(line[len(logs.PREFIX) :])


@pytest.fixture
def captured():
    """A logger whose records are formatted as UMLOG lines into a buffer."""
    buf = io.StringIO()
    handler = logs.UmlogHandler(buf)
    logger = logging.getLogger("unimodel.plugin.tracetest")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, buf
    logger.removeHandler(handler)


def test_records_carry_no_trace_id_outside_a_traced_predict(captured):
    logger, buf = captured
    logger.info("plain")
    record = parse(lines_of(buf.getvalue())[0])
    assert record == {"level": "INFO", "logger": "unimodel.plugin.tracetest", "message": "plain"}
    assert logs.current_trace_id() is None


def test_records_carry_the_trace_ids_while_set(captured):
    logger, buf = captured
    token = logs.set_trace([A])
    try:
        assert logs.current_trace_id() == A
        logger.warning("one")
    finally:
        logs.reset_trace(token)
    token = logs.set_trace([A, B])
    try:
        logger.error("two", exc_info=ValueError("boom"))
    finally:
        logs.reset_trace(token)
    logger.info("after")
    one, two, after = (parse(line) for line in lines_of(buf.getvalue()))
    assert (one["trace_id"], one["level"]) == (A, "WARNING")
    assert two["trace_id"] == f"{A},{B}" and "ValueError: boom" in two["message"]
    assert "trace_id" not in after


def test_printed_lines_become_traced_records_only_inside_a_traced_predict():
    raw = io.StringIO()
    out = logs.TracedStdout(raw)
    print("before", file=out)
    token = logs.set_trace([A])
    try:
        print("inside", file=out)
        out.write("multi\nline\npart")
        out.write("ial")
    finally:
        _reset_with(out, token)
    print("after", file=out)
    lines = lines_of(raw.getvalue())
    assert lines[0] == "before" and lines[-1] == "after"
    records = [parse(line) for line in lines[1:-1]]
    assert [r["message"] for r in records] == ["inside", "multi", "line", "partial"]
    assert all(r["trace_id"] == A and r["logger"] == "stdout" for r in records)
    assert all(r["level"] == "INFO" for r in records)


def _reset_with(out: logs.TracedStdout, token) -> None:
    """`logs.reset_trace` finishes the partial line of ``sys.stdout``; here it is `out`."""
    out.finish_line()
    logs.reset_trace(token)


def test_traced_stdout_delegates_everything_else():
    raw = io.StringIO()
    out = logs.TracedStdout(raw)
    assert out.getvalue() == ""  # an attribute of the wrapped stream
    out.flush()


class _Recorder(Worker):
    """A Worker without sockets or arenas: `_execute` records what the plugin would see."""

    def __init__(self) -> None:
        self.seen: list[str | None] = []

    def _execute(self, msg):
        self.seen.append(logs.current_trace_id())


def test_execute_sets_the_trace_for_exactly_the_predict():
    w = _Recorder()
    w.execute({"type": "execute", "id": 1, "trace": [A, B]})
    w.execute({"type": "execute", "id": 2})
    w.execute({"type": "execute", "id": 3, "trace": []})
    assert w.seen == [f"{A},{B}", None, None]
    assert logs.current_trace_id() is None


def test_execute_trace_is_written_last_and_only_when_non_empty():
    base = {"type": "execute", "id": 1, "batch_size": 1, "inputs": [], "outputs": None}
    without = protocol.encode_message(base)
    assert protocol.encode_message({**base, "trace": []}) == without
    with_trace = protocol.decode_frame(protocol.encode_message({**base, "trace": [A]}))
    assert list(with_trace) == ["type", "id", "batch_size", "inputs", "outputs", "trace"]
    assert with_trace["trace"] == [A]


def test_the_docs_execute_with_trace_vector_round_trips():
    text = DOC.read_text(encoding="utf-8")
    block = re.search(r"<!-- vectors:begin -->\s*```json\n(.*?)```", text, re.S)
    assert block, "no vectors block in the doc"
    vectors = {v["name"]: v for v in json.loads(block.group(1))}
    v = vectors["execute with trace ids"]
    frame = bytes.fromhex(v["frame"])
    assert protocol.decode_frame(frame) == v["message"]
    assert protocol.encode_message(v["message"]) == frame
    # The vectors without a trace still encode without the key.
    plain = vectors["execute selecting outputs"]
    assert protocol.encode_message(plain["message"]) == bytes.fromhex(plain["frame"])
