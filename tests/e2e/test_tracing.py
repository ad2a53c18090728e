"""Traces and logs: a W3C traceparent reaches the plugin's log lines, JSON logs parse and
carry their labels, every request gets an access log line, and spans reach an OTLP
collector with the caller's trace id."""

import json
import re
import threading

from otlp_collector import Collector
from umclient import Inp, decode, infer_json, plugin, wait_until

CHATTY = "chatty-e2e-3f9c"  # chatty.MARK
BATCH = "traced-batch-e2e-77a1"  # traced_batch.MARK
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
HEX32 = re.compile(r"^[0-9a-f]{32}$")


def traced_infer(server, model, value, traceparent, shape=(1,)):
    body = {"inputs": [{"name": "x", "shape": list(shape), "datatype": "FP32", "data": [value]}]}
    headers = {"traceparent": traceparent} if traceparent is not None else {}
    return server.post(f"/v2/models/{model}/infer", json=body, headers=headers)


def json_lines(server):
    """Every line of the server's log as JSON (fails on the first line that is not)."""
    out = []
    for line in server.log_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise AssertionError(f"log line is not JSON: {line!r}") from e
    return out


def test_traceparent_reaches_the_plugins_log_lines(start_server):
    server = start_server(plugin("chatty.py"))
    resp = traced_infer(server, "chatty", 1.0, TRACEPARENT)
    assert resp.status_code == 200, resp.text

    def worker_lines():
        lines = server.log_text().splitlines()
        found = [
            line
            for line in lines
            if TRACE_ID in line and (f"{CHATTY} predict-logger" in line or "predict-print" in line)
        ]
        return found if len(found) == 2 else None

    found = wait_until(worker_lines, 10.0, "both predict log lines with the trace id")
    for line in found:
        assert "chatty" in line.replace(CHATTY, ""), line  # labelled with the model too

    # An invalid traceparent is ignored: the request succeeds under a fresh trace id.
    resp = traced_infer(server, "chatty", 2.0, "00-NOT-A-VALID-HEADER-01")
    assert resp.status_code == 200, resp.text


def test_json_logs_parse_and_carry_labels_trace_and_access_fields(start_server):
    server = start_server(plugin("chatty.py"), "--log-format", "json", "--access-log")
    assert traced_infer(server, "chatty", 1.0, TRACEPARENT).status_code == 200
    bad = "00-00000000000000000000000000000000-00f067aa0ba902b7-01"  # all-zero id: invalid
    assert traced_infer(server, "chatty", 2.0, bad).status_code == 200
    assert traced_infer(server, "nope", 1.0, None).status_code == 404

    def access_lines():
        lines = [r for r in json_lines(server) if r.get("target") == "unimodel::access"]
        return lines if len(lines) >= 3 else None

    access = wait_until(access_lines, 10.0, "three access log lines")
    server.stop()
    records = json_lines(server)  # after shutdown too: every line is JSON

    ok = [a for a in access if a.get("trace_id") == TRACE_ID]
    assert len(ok) == 1, access
    a = ok[0]
    assert (a["method"], a["path"], a["model"], a["status"]) == (
        "POST",
        "/v2/models/chatty/infer",
        "chatty",
        200,
    )
    assert a["batch_size"] == 1 and a["level"] == "INFO"
    assert isinstance(a["latency_ms"], float) and 0 < a["latency_ms"] < 60_000
    missing = [a for a in access if a["path"] == "/v2/models/nope/infer"]
    assert missing and missing[0]["status"] == 404 and "batch_size" not in missing[0]
    # The invalid header was ignored: that request got a fresh, valid trace id of its own.
    infers = [a for a in access if a["path"] == "/v2/models/chatty/infer"]
    fresh = {a["trace_id"] for a in infers} - {TRACE_ID}
    assert len(fresh) == 1 and HEX32.match(fresh.pop())

    worker = [r for r in records if r.get("target") == "unimodel::worker::python"]
    assert worker, "no worker log lines"
    for r in worker:
        assert r["model"] == "chatty" and r["instance"] == 0, r
        assert r["level"] in ("TRACE", "DEBUG", "INFO", "WARN", "ERROR"), r
    predict = [r for r in worker if f"{CHATTY} predict-logger" in r.get("message", "")]
    assert {r.get("trace_id") for r in predict} >= {TRACE_ID}, predict
    assert all(r["logger"] == "unimodel.plugin.chatty" for r in predict), predict
    printed = [r for r in worker if f"{CHATTY} predict-print" in r.get("message", "")]
    assert {r.get("trace_id") for r in printed} >= {TRACE_ID}, printed
    # Lines outside a predict (setup) carry no trace id.
    setup = [r for r in worker if f"{CHATTY} setup-logger" in r.get("message", "")]
    assert setup and all("trace_id" not in r for r in setup), setup


def test_a_batch_logs_the_trace_ids_of_all_its_requests(start_server):
    # Two rows per batch at most, and a delay no loaded machine reaches between two clients:
    # two concurrent requests fill one batch, which leaves as soon as it is full.
    server = start_server(
        plugin("traced_batch.py"),
        "--max-batch-size",
        "2",
        "--max-queue-delay-ms",
        "60000",
        "--log-format",
        "json",
        "--access-log",
    )
    ids = [f"{i:032x}" for i in (0xA1, 0xB2)]
    results = {}

    def send(trace_id):
        header = f"00-{trace_id}-{PARENT_ID}-01"
        results[trace_id] = traced_infer(server, "traced_batch", 1.0, header, (1, 1))

    threads = [threading.Thread(target=send, args=(t,)) for t in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(r.status_code == 200 for r in results.values()), results

    def batch_lines():
        lines = [
            r
            for r in json_lines(server)
            if r.get("target") == "unimodel::worker::python"
            and f"{BATCH} rows=2" in r.get("message", "")
        ]
        return lines or None

    line = wait_until(batch_lines, 10.0, "the batch's log line")[0]
    assert sorted(line["trace_id"].split(",")) == sorted(ids), line

    # Lines reach the log through the writer thread, a moment after the response.
    def access_lines():
        access = [r for r in json_lines(server) if r.get("target") == "unimodel::access"]
        infer = [a for a in access if a["path"] == "/v2/models/traced_batch/infer"]
        return infer if len(infer) == len(ids) else None

    infer = wait_until(access_lines, 10.0, "both requests' access lines")
    assert sorted(a["trace_id"] for a in infer) == sorted(ids)
    assert all(a["batch_size"] == 2 for a in infer), infer


def test_spans_reach_an_otlp_collector_with_the_callers_trace_id(start_server):
    collector = Collector()
    try:
        server = start_server(plugin("chatty.py"), "--otlp-endpoint", collector.url)
        assert traced_infer(server, "chatty", 1.0, TRACEPARENT).status_code == 200
        resp = infer_json(server, "chatty", [Inp("x", "FP32", [3.0])])  # no traceparent
        assert decode(resp).outputs["y"].tolist() == [3.0]

        def exported():
            spans = collector.spans()
            names = {(s.name, s.trace_id) for s in spans}
            wanted = {("http", TRACE_ID), ("infer", TRACE_ID)}
            batches = [s for s in spans if s.name == "batch"]
            linked = [b for b in batches if any(t == TRACE_ID for t, _ in b.links)]
            return spans if wanted <= names and linked else None

        spans = wait_until(exported, 20.0, "http, infer and batch spans at the collector")
        assert all(ct == "application/x-protobuf" for ct in collector.content_types)
        http = next(s for s in spans if s.name == "http" and s.trace_id == TRACE_ID)
        infer = next(s for s in spans if s.name == "infer" and s.trace_id == TRACE_ID)
        # The caller's span is the parent of ours; the engine's span is a child of the request's.
        assert http.parent_span_id == PARENT_ID
        assert infer.parent_span_id == http.span_id
        batch = next(s for s in spans if s.name == "batch" and TRACE_ID in dict(s.links))
        assert batch.links == [(TRACE_ID, infer.span_id)]
        # The request without a traceparent started a trace of its own.
        others = {s.trace_id for s in spans if s.name == "http"} - {TRACE_ID}
        assert others and all(HEX32.match(t) for t in others)
    finally:
        collector.close()


def test_otlp_endpoint_down_does_not_break_serving(start_server):
    # Nothing listens there: export fails in the background, requests are still served.
    server = start_server(plugin("chatty.py"), "--otlp-endpoint", "http://127.0.0.1:9")
    assert traced_infer(server, "chatty", 1.0, TRACEPARENT).status_code == 200
