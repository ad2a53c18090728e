"""A stand-in OpenTelemetry collector: an HTTP server that records OTLP/HTTP protobuf posts
to /v1/traces and decodes just enough of `ExportTraceServiceRequest` to list the spans
(name, trace id, span id, parent span id, links)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    links: list[tuple[str, str]] = field(default_factory=list)  # (trace id, span id)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def fields(buf: bytes) -> list[tuple[int, object]]:
    """Top-level fields of a protobuf message: (number, int or bytes)."""
    out, pos = [], 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        out.append((number, value))
    return out


def _sub(buf: bytes, number: int) -> list[bytes]:
    return [v for n, v in fields(buf) if n == number and isinstance(v, bytes)]


def decode_spans(body: bytes) -> list[Span]:
    """ExportTraceServiceRequest{1: ResourceSpans{2: ScopeSpans{2: Span}}}."""
    spans = []
    for resource_spans in _sub(body, 1):
        for scope_spans in _sub(resource_spans, 2):
            for raw in _sub(scope_spans, 2):
                f = fields(raw)

                def one(n: int, f=f) -> bytes:
                    return next((v for k, v in f if k == n and isinstance(v, bytes)), b"")

                links = [
                    (
                        next((v for k, v in fields(link) if k == 1), b"").hex(),
                        next((v for k, v in fields(link) if k == 2), b"").hex(),
                    )
                    for k, link in f
                    if k == 13 and isinstance(link, bytes)
                ]
                spans.append(
                    Span(
                        name=one(5).decode("utf-8"),
                        trace_id=one(1).hex(),
                        span_id=one(2).hex(),
                        parent_span_id=one(4).hex(),
                        links=links,
                    )
                )
    return spans


class Collector:
    """Listens on 127.0.0.1 (free port); `spans()` is everything received so far."""

    def __init__(self) -> None:
        self._spans: list[Span] = []
        self._lock = threading.Lock()
        self.content_types: list[str] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status = 404
                if self.path == "/v1/traces":
                    with collector._lock:
                        collector.content_types.append(self.headers.get("Content-Type", ""))
                        collector._spans.extend(decode_spans(body))
                    status = 200
                self.send_response(status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def spans(self) -> list[Span]:
        with self._lock:
            return list(self._spans)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
