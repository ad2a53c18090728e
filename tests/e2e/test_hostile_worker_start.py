"""Workers that can never start (review of issue 15, item 3).

Issue 15 made a worker start failing for want of descriptors retry forever. As merged, every
start failure and every death before `hello` retried forever, so a model whose worker can
never start (an interpreter gone since the server started, a runtime that does not import)
stayed LOADING for good and `unimodel predict` hung. Only a shortage (EMFILE, ENFILE, ENOMEM,
EAGAIN) is retried forever (tests/e2e/test_hostile_fds.py); anything else ends FAILED with its
reason after `max_setup_failures` attempts, like a failing `setup`.

Each test is bounded by its subprocess timeout or a bounded wait on the server's own routes.
"""

import os
import stat
from pathlib import Path

import requests
from umclient import Inp, infer_json, plugin, python_bin, run_cli, wait_until

EXITER = plugin("exiter.py")

NO_NUMPY = "ModuleNotFoundError: No module named 'numpy'"


def interpreter(tmp_path: Path, broken_runtime: bool) -> Path:
    """A stand-in interpreter: the real one, except that with `broken_runtime` the worker's
    runtime (`-m unimodel.worker` alone; plugin inspection passes `--inspect`) dies before it
    says hello, as it does in an environment whose numpy does not import."""
    path = tmp_path / "python"
    fail = f'  "-m unimodel.worker") echo "{NO_NUMPY}" >&2; exit 1 ;;\n' if broken_runtime else ""
    path.write_text(f'#!/bin/sh\ncase "$*" in\n{fail}esac\nexec {python_bin()} "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_predict_with_a_worker_that_dies_before_hello_fails_with_its_stderr(tmp_path):
    python = interpreter(tmp_path, broken_runtime=True)
    # Before: the start was retried forever and predict never returned (killed at the timeout).
    done = run_cli("predict", EXITER, "-i", "x=[1]", "--python", str(python), timeout_s=60)
    assert done.returncode != 0, done.stdout
    assert "model exiter failed to load" in done.stderr, done.stderr
    assert f"before it said hello: {NO_NUMPY}" in done.stderr, done.stderr


def test_run_with_a_worker_that_dies_before_hello_ends_failed(start_server, tmp_path, monkeypatch):
    monkeypatch.setenv("UNIMODEL_PYTHON", str(interpreter(tmp_path, broken_runtime=True)))
    # Before: the model stayed LOADING for good and this wait ran out.
    server = start_server(EXITER, wait=("exiter", "FAILED"))
    meta = server.get("/v2/models/exiter").json()
    assert "before it said hello" in meta["error"] and NO_NUMPY in meta["error"], meta
    assert NO_NUMPY in meta["traceback"], meta
    assert server.get("/v2/health/live").status_code == 200
    assert server.get("/v2/health/ready").status_code == 503


def test_an_interpreter_removed_while_serving_ends_failed_naming_it(
    start_server, tmp_path, monkeypatch
):
    python = interpreter(tmp_path, broken_runtime=False)
    monkeypatch.setenv("UNIMODEL_PYTHON", str(python))
    server = start_server(EXITER)
    with requests.Session() as s:
        # The interpreter goes (a cleaned cache, an uninstall), then the worker crashes: its
        # restart cannot exec (ENOENT), which no retry mends.
        os.unlink(python)
        resp = infer_json(s, "exiter", [Inp("x", "FP32", [-1.0])], base_url=server.base_url)
        assert resp.status_code == 503, resp.text

        def state() -> str:
            return s.get(server.url("/v2/models/exiter"), timeout=10).json()["state"]

        wait_until(lambda: state() == "FAILED", 60, "the model FAILED")
        meta = s.get(server.url("/v2/models/exiter"), timeout=10).json()
        assert f"cannot start {python}" in meta["error"], meta
        assert "No such file or directory" in meta["error"], meta
        assert s.get(server.url("/v2/health/live"), timeout=10).status_code == 200


def test_a_missing_python_is_a_clear_error_at_start():
    done = run_cli("run", EXITER, "--port", "0", "--python", "/nonexistent/python", timeout_s=60)
    assert done.returncode != 0
    assert "cannot run Python interpreter /nonexistent/python" in done.stderr, done.stderr
    assert "No such file or directory" in done.stderr, done.stderr
