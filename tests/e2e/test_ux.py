"""What an operator sees: load progress and one summary line per model, the plugin's own
traceback when setup fails (never a Rust backtrace), /openapi.json describing every route,
and /docs rendering it with no external assets."""

import re

import pytest
from umclient import plugin, python_bin, run_cli, wait_until

RUST_BACKTRACE_MARKS = ("stack backtrace", "panicked at", "RUST_BACKTRACE")


def test_run_reports_each_instance_ready_then_a_summary_with_the_url(start_server):
    server = start_server(plugin("chatty.py"), "--instances", "2")

    def progress_done():
        log = server.log_text()
        return "2/2 instances ready" in log and "READY" in log

    wait_until(progress_done, 30.0, "progress and summary lines")
    log = server.log_text()
    assert "loading model chatty: 2 instance(s) starting" in log
    assert "model chatty: 1/2 instances ready" in log
    assert "model chatty: 2/2 instances ready" in log
    summary = [line for line in log.splitlines() if "model chatty READY" in line]
    assert len(summary) == 1, log
    assert f"{server.base_url}/v2/models/chatty" in summary[0]


def test_setup_failure_shows_the_plugins_traceback_not_a_rust_backtrace(start_server):
    server = start_server(plugin("failing_setup.py"), wait=("broken", "FAILED"))
    # Log lines reach the file through the core's writer thread, a moment after they happen.
    wait_until(lambda: "load_weights" in server.log_text(), 10.0, "the traceback in the log")
    log = server.log_text()
    assert "Traceback (most recent call last)" in log
    assert "failing_setup.py" in log and "load_weights" in log
    assert "setup exploded on purpose (e2e marker 5821)" in log
    for mark in RUST_BACKTRACE_MARKS:
        assert mark not in log, f"{mark!r} in the server log"


def test_predict_with_failing_setup_prints_the_plugins_traceback():
    proc = run_cli("predict", plugin("failing_setup.py"), "-i", "x=[1]", "--python", python_bin())
    assert proc.returncode != 0
    out = proc.stderr + proc.stdout
    assert "load_weights" in out and "setup exploded on purpose" in out, out
    for mark in RUST_BACKTRACE_MARKS:
        assert mark not in out, out


# Routes the server must serve and document (the Rust unit test checks the router's source
# against the document; this checks the running server against it).
ROUTES = {
    ("get", "/v2"),
    ("get", "/v2/health/live"),
    ("get", "/v2/health/ready"),
    ("get", "/health/live"),
    ("get", "/health/ready"),
    ("get", "/v2/models/stats"),
    ("get", "/v2/models/{model}"),
    ("get", "/v2/models/{model}/versions/{version}"),
    ("get", "/v2/models/{model}/ready"),
    ("get", "/v2/models/{model}/versions/{version}/ready"),
    ("post", "/v2/models/{model}/infer"),
    ("post", "/v2/models/{model}/versions/{version}/infer"),
    ("get", "/v2/models/{model}/stats"),
    ("get", "/v2/models/{model}/versions/{version}/stats"),
    ("post", "/v2/repository/index"),
    ("post", "/v2/repository/models/{model}/load"),
    ("post", "/v2/repository/models/{model}/unload"),
    ("get", "/openapi.json"),
    ("get", "/docs"),
}


@pytest.fixture(scope="module")
def chatty(start_module_server):
    return start_module_server(plugin("chatty.py"))


def test_openapi_json_describes_every_route(chatty):
    resp = chatty.get("/openapi.json")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/json")
    spec = resp.json()
    assert spec["openapi"].startswith("3.")
    documented = {(m, p) for p, item in spec["paths"].items() for m in item}
    assert documented >= ROUTES, ROUTES - documented
    # And every documented operation exists on the running server.
    body = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}
    for method, path in sorted(documented):
        url = path.replace("{model}", "chatty").replace("{version}", "1")
        url = url.replace("{region}", "r")
        # The generate extension takes inputs by name (see test_stream.py).
        payload = {"x": [1.0]} if "/generate" in path else body
        resp = chatty.post(url, json=payload) if method == "post" else chatty.get(url)
        op = spec["paths"][path][method]
        if "shared memory" in op.get("tags", []):
            # Shared-memory routes need regions (and --allow-client-shm) to answer 200; with
            # this body and server they must answer one of their documented statuses.
            expected = set(op["responses"])
        elif path.startswith("/v1/") and path != "/v1/models":
            # The OpenAI routes serve LLMs only: `chatty` is not one (404 for its id), and
            # this body is not an OpenAI request (400); both documented.
            expected = {"404"} if method == "get" else {"400"}
            assert expected <= set(op["responses"]), path
        elif path.startswith("/v2/repository/models/"):
            # `unimodel run` has no model repository: load and unload answer a documented 400.
            expected = {"400"}
            assert "400" in op["responses"], path
        else:
            expected = {"200"}
        assert str(resp.status_code) in expected, (method, path, resp.status_code, resp.text[:200])
        for status in op["responses"]:
            assert re.fullmatch(r"[1-5]\d\d", status), (path, status)


def test_docs_is_html_without_external_urls(chatty):
    resp = chatty.get("/docs")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    page = resp.text
    assert page.startswith("<!DOCTYPE html>")
    assert "/v2/models/{model}/infer" in page and "/openapi.json" in page
    for needle in ("http://", "https://", "<script", "<link", "src=", "@import", "url("):
        assert needle not in page, needle
    assert not re.search(r"""(href|src)\s*=\s*["']?//""", page)
