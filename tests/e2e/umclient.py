"""Helpers for the end-to-end tests: run the real `unimodel` binary, talk KServe V2 to it.

`ServerFactory` starts `unimodel run PLUGIN` on a free port (gRPC on a port the server
picks, `--grpc-port 0`, read back from its "grpc listening" log line), waits (bounded) until
it is ready or a model reaches a given state, sends its log (stdout and stderr) to a file, and
always kills it at teardown. The infer helpers speak both the JSON form and Triton's binary
tensor extension with `requests`; every call has a timeout, every wait has a deadline.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import requests

REPO_ROOT = Path(__file__).resolve().parents[2]
PLUGINS_DIR = REPO_ROOT / "tests" / "plugins"

# Generous but bounded: a loaded CI machine may take seconds to start Python and numpy.
STARTUP_DEADLINE_S = 90.0
HTTP_TIMEOUT = (5.0, 60.0)  # (connect, read) seconds for every request
POLL_INTERVAL_S = 0.05
STOP_GRACE_S = 5.0
# The address in the server's "grpc listening" log line (text or JSON log format).
GRPC_LISTENING = re.compile(
    r"grpc listening.*?(127\.0\.0\.1:\d+)|(127\.0\.0\.1:\d+).*?grpc listening"
)

NP_DTYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


def unimodel_bin() -> Path:
    """The binary under test: $UNIMODEL_BIN (relative to the repo root), else the debug build."""
    path = Path(os.environ.get("UNIMODEL_BIN", "target/debug/unimodel"))
    if not path.is_absolute():
        path = REPO_ROOT / path
    assert path.is_file(), f"no unimodel binary at {path}: run `cargo build` or set UNIMODEL_BIN"
    return path


def python_bin() -> str:
    """The interpreter the workers run: $UNIMODEL_PYTHON, else the one running the tests."""
    return os.environ.get("UNIMODEL_PYTHON") or sys.executable


def plugin(file_name: str) -> str:
    return str(PLUGINS_DIR / file_name)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Every server still running when the interpreter exits is killed, whatever went wrong.
_LIVE: set[subprocess.Popen] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _kill_leftovers() -> None:
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


class ServerError(AssertionError):
    """The server exited or did not get where a test needed it in time."""


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log_path: Path
    _log_file: Any = field(repr=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    @property
    def grpc_url(self) -> str:
        """`127.0.0.1:PORT` of the gRPC server (as `tritonclient.grpc` wants it)."""
        found: list[str] = []

        def logged() -> bool:
            match = GRPC_LISTENING.search(self.log_text())
            if match:
                found.append(match.group(1) or match.group(2))
            return bool(match)

        self._poll(logged, "the 'grpc listening' log line", STARTUP_DEADLINE_S)
        return found[0]

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", HTTP_TIMEOUT)
        return requests.get(self.url(path), **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", HTTP_TIMEOUT)
        return requests.post(self.url(path), **kwargs)

    def log_text(self) -> str:
        # The server writes the file through its own descriptor: nothing to flush here.
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _check_alive(self, waiting_for: str) -> None:
        if not self.alive():
            raise ServerError(
                f"server exited with {self.proc.returncode} while waiting for {waiting_for}; "
                f"log tail:\n{self.log_tail()}"
            )

    def wait_ready(self, deadline_s: float = STARTUP_DEADLINE_S) -> None:
        """Polls /v2/health/ready until 200."""
        self._poll(lambda: self._status("/v2/health/ready") == 200, "health/ready 200", deadline_s)

    def wait_model_state(
        self, model: str, state: str, deadline_s: float = STARTUP_DEADLINE_S
    ) -> dict:
        """Polls GET /v2/models/{model} until its "state" is `state`; returns that metadata."""
        seen: dict = {}

        def reached() -> bool:
            try:
                resp = self.get(f"/v2/models/{model}", timeout=(1.0, 5.0))
            except requests.RequestException:
                return False
            if resp.status_code != 200:
                return False
            seen.clear()
            seen.update(resp.json())
            return seen.get("state") == state

        self._poll(reached, f"model {model!r} in state {state}", deadline_s, lambda: seen)
        return seen

    def _status(self, path: str) -> int | None:
        try:
            return self.get(path, timeout=(1.0, 5.0)).status_code
        except requests.RequestException:
            return None

    def _poll(self, done, what: str, deadline_s: float, last=lambda: None) -> None:
        deadline = time.monotonic() + deadline_s
        while True:
            self._check_alive(what)
            if done():
                return
            if time.monotonic() > deadline:
                raise ServerError(
                    f"no {what} within {deadline_s}s (last seen: {last()}); "
                    f"log tail:\n{self.log_tail()}"
                )
            time.sleep(POLL_INTERVAL_S)

    def wait_exit(self, deadline_s: float) -> int:
        """Waits for the process to exit; returns its exit code (ServerError past the deadline)."""
        try:
            return self.proc.wait(timeout=deadline_s)
        except subprocess.TimeoutExpired:
            raise ServerError(
                f"server still running {deadline_s}s later; log tail:\n{self.log_tail()}"
            ) from None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period; always leaves the process reaped."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        with _LIVE_LOCK:
            _LIVE.discard(self.proc)
        self._log_file.close()


class ServerFactory:
    """Starts servers for one test (or module) and stops every one of them at teardown."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.servers: list[Server] = []

    def __call__(
        self,
        plugin_path: str,
        *flags: str,
        wait: str | tuple[str, str] | None = "ready",
        env: dict[str, str] | None = None,
        preexec_fn=None,
    ) -> Server:
        """Runs `unimodel run plugin_path --port P --grpc-port 0 --python PY *flags`.

        wait: "ready" (GET /v2/health/ready is 200), (model, state) (GET /v2/models/{model}
        reports that state), or None (return as soon as the process is started).
        preexec_fn: run in the child before exec (e.g. to set its resource limits).
        """
        return self._start(["run", plugin_path], flags, wait, env, preexec_fn)

    def serve(
        self,
        *flags: str,
        wait: str | tuple[str, str] | None = "ready",
        env: dict[str, str] | None = None,
    ) -> Server:
        """Runs `unimodel serve --port P --python PY *flags` (many models); `wait` as above."""
        return self._start(["serve"], flags, wait, env)

    def _start(self, head: list[str], flags, wait, env, preexec_fn=None) -> Server:
        for attempt in range(3):
            server = self._spawn(head, flags, env, attempt, preexec_fn)
            try:
                if wait == "ready":
                    server.wait_ready()
                elif wait is not None:
                    server.wait_model_state(*wait)
                return server
            except ServerError:
                # Another process may have taken the free port between our check and the bind.
                if not server.alive() and "in use" in server.log_text().lower() and attempt < 2:
                    continue
                raise
        raise AssertionError("unreachable")

    def _spawn(self, head: list[str], flags, env, attempt: int, preexec_fn=None) -> Server:
        port = free_port()
        log_path = self.log_dir / f"server-{len(self.servers)}-{attempt}.log"
        # Closed by Server.stop, not here: the server writes to it for its whole life.
        log_file = open(log_path, "w+b")  # noqa: SIM115
        cmd = [
            str(unimodel_bin()),
            *head,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            # Tests run several servers at once: let each pick a free gRPC port.
            "--grpc-port",
            "0",
            "--python",
            python_bin(),
            *flags,
        ]
        full_env = dict(os.environ)
        full_env.update(env or {})
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=full_env,
            preexec_fn=preexec_fn,
        )
        with _LIVE_LOCK:
            _LIVE.add(proc)
        server = Server(proc=proc, port=port, log_path=log_path, _log_file=log_file)
        self.servers.append(server)
        return server

    def close(self) -> None:
        for server in self.servers:
            server.stop()
            # Shown by pytest only when the test failed.
            print(f"----- {server.log_path.name}: `{' '.join(server.proc.args)}`")
            print(server.log_tail(200))


def run_cli(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    """Runs the binary to completion (killed past the timeout, which fails the test)."""
    return subprocess.run(
        [str(unimodel_bin()), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


# ---------------------------------------------------------------------------------------------
# Tensors and the KServe V2 infer protocol


class Inp(NamedTuple):
    """One input tensor: `value` is anything numpy turns into an array of the right shape."""

    name: str
    datatype: str
    value: Any


def as_array(datatype: str, value: Any) -> np.ndarray:
    if datatype == "BYTES":
        arr = np.array(value, dtype=object)
        flat = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in arr.ravel()]
        out = np.empty(len(flat), dtype=object)
        out[:] = flat
        return out.reshape(arr.shape)
    return np.asarray(value, dtype=NP_DTYPES[datatype])


def json_data(datatype: str, arr: np.ndarray) -> list:
    """Flat, row-major JSON data as KServe expects it (BYTES as UTF-8 strings)."""
    if datatype == "BYTES":
        return [v.decode("utf-8") for v in arr.ravel()]
    return arr.ravel().tolist()


def binary_data(datatype: str, arr: np.ndarray) -> bytes:
    """Triton binary tensor data: raw little-endian, BYTES with 4-byte length prefixes."""
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in arr.ravel())
    dtype = np.dtype(NP_DTYPES[datatype]).newbyteorder("<")
    return np.ascontiguousarray(arr, dtype=dtype).tobytes()


def decode_binary(datatype: str, shape: list[int], blob: bytes) -> np.ndarray:
    if datatype == "BYTES":
        items, offset = [], 0
        while offset < len(blob):
            (size,) = struct.unpack_from("<I", blob, offset)
            items.append(blob[offset + 4 : offset + 4 + size])
            offset += 4 + size
        assert offset == len(blob), "BYTES output truncated"
        out = np.empty(len(items), dtype=object)
        out[:] = items
        return out.reshape(shape)
    dtype = np.dtype(NP_DTYPES[datatype]).newbyteorder("<")
    return np.frombuffer(blob, dtype=dtype).reshape(shape)


def decode_json_data(datatype: str, shape: list[int], data: list) -> np.ndarray:
    if datatype == "BYTES":
        return as_array("BYTES", np.array(data, dtype=object).reshape(shape))
    return np.asarray(data, dtype=NP_DTYPES[datatype]).reshape(shape)


def _outputs_field(outputs: list[str | dict] | None) -> list[dict] | None:
    if outputs is None:
        return None
    return [o if isinstance(o, dict) else {"name": o} for o in outputs]


def infer_path(model: str, version: str | None = None) -> str:
    if version is None:
        return f"/v2/models/{model}/infer"
    return f"/v2/models/{model}/versions/{version}/infer"


def json_request(
    inputs: list[Inp],
    outputs: list[str | dict] | None = None,
    parameters: dict | None = None,
    request_id: str | None = None,
) -> dict:
    body: dict[str, Any] = {"inputs": []}
    if request_id is not None:
        body["id"] = request_id
    for inp in inputs:
        arr = as_array(inp.datatype, inp.value)
        body["inputs"].append(
            {
                "name": inp.name,
                "datatype": inp.datatype,
                "shape": list(arr.shape),
                "data": json_data(inp.datatype, arr),
            }
        )
    if outputs is not None:
        body["outputs"] = _outputs_field(outputs)
    if parameters:
        body["parameters"] = parameters
    return body


def infer_json(
    target: Server | requests.Session,
    model: str,
    inputs: list[Inp],
    outputs: list[str | dict] | None = None,
    parameters: dict | None = None,
    version: str | None = None,
    request_id: str | None = None,
    base_url: str | None = None,
    timeout: Any = HTTP_TIMEOUT,
    ascii_json: bool = False,
) -> requests.Response:
    """POSTs a JSON infer request (to a Server, or through a Session with `base_url`).

    The body is UTF-8 JSON with non-ASCII characters as is, or ASCII-only with `ascii_json`.
    """
    body = json_request(inputs, outputs, parameters, request_id)
    url, post = _poster(target, base_url, infer_path(model, version))
    return post(
        url,
        data=json.dumps(body, ensure_ascii=ascii_json).encode("utf-8"),
        headers={"Content-Type": "application/json"},
        timeout=timeout,
    )


def binary_request(
    inputs: list[Inp],
    outputs: list[str | dict] | None = None,
    parameters: dict | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Body and headers of a binary-extension request (every input sent as binary data)."""
    header: dict[str, Any] = {"inputs": []}
    blobs = []
    for inp in inputs:
        arr = as_array(inp.datatype, inp.value)
        blob = binary_data(inp.datatype, arr)
        blobs.append(blob)
        header["inputs"].append(
            {
                "name": inp.name,
                "datatype": inp.datatype,
                "shape": list(arr.shape),
                "parameters": {"binary_data_size": len(blob)},
            }
        )
    if outputs is not None:
        header["outputs"] = _outputs_field(outputs)
    if parameters:
        header["parameters"] = parameters
    return raw_binary_body(header, b"".join(blobs))


def raw_binary_body(header: dict, payload: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    headers = {
        "Inference-Header-Content-Length": str(len(head)),
        "Content-Type": "application/octet-stream",
    }
    return head + payload, headers


def infer_binary(
    target: Server | requests.Session,
    model: str,
    inputs: list[Inp],
    outputs: list[str | dict] | None = None,
    parameters: dict | None = None,
    version: str | None = None,
    base_url: str | None = None,
    timeout: Any = HTTP_TIMEOUT,
) -> requests.Response:
    body, headers = binary_request(inputs, outputs, parameters)
    url, post = _poster(target, base_url, infer_path(model, version))
    return post(url, data=body, headers=headers, timeout=timeout)


def _poster(target, base_url: str | None, path: str):
    if isinstance(target, Server):
        return target.url(path), requests.post
    assert base_url is not None, "a Session needs base_url"
    return base_url + path, target.post


@dataclass
class Result:
    """A decoded 200 infer response."""

    header: dict
    outputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    was_binary: dict[str, bool]


def decode(resp: requests.Response) -> Result:
    """Decodes a successful infer response, JSON or binary extension; asserts it is well formed."""
    assert resp.status_code == 200, f"expected 200, got {resp.status_code}: {resp.text[:2000]}"
    body = resp.content
    header_len = resp.headers.get("Inference-Header-Content-Length")
    if header_len is None:
        header, rest = json.loads(body), b""
    else:
        split = int(header_len)
        header, rest = json.loads(body[:split]), body[split:]
    outputs, datatypes, was_binary = {}, {}, {}
    offset = 0
    for out in header["outputs"]:
        name, datatype, shape = out["name"], out["datatype"], out["shape"]
        assert name not in outputs, f"output {name!r} appears twice"
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            blob = rest[offset : offset + size]
            assert len(blob) == size, f"binary data of {name!r} truncated"
            offset += size
            outputs[name] = decode_binary(datatype, shape, blob)
            assert "data" not in out, f"output {name!r} has both data and binary_data_size"
        else:
            outputs[name] = decode_json_data(datatype, shape, out["data"])
        datatypes[name] = datatype
        was_binary[name] = size is not None
    assert offset == len(rest), f"{len(rest) - offset} unexplained bytes after the outputs"
    return Result(header, outputs, datatypes, was_binary)


def error_of(resp: requests.Response, status: int | None = None) -> str:
    """Asserts an error answer of the KServe shape {"error": "..."}; returns the message."""
    if status is not None:
        assert (
            resp.status_code == status
        ), f"expected {status}, got {resp.status_code}: {resp.text[:2000]}"
    try:
        body = resp.json()
    except ValueError:
        raise AssertionError(f"error body is not JSON: {resp.text[:2000]!r}") from None
    assert isinstance(body, dict), f"error body is not an object: {body!r}"
    message = body.get("error")
    assert isinstance(message, str), f"no error message in {body!r}"
    assert message.strip(), f"empty error message in {body!r}"
    return message


def pid_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    # The state letter follows the parenthesised command name.
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(predicate, deadline_s: float, what: str, interval_s: float = POLL_INTERVAL_S):
    """Polls `predicate` until it returns a truthy value; AssertionError past the deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {deadline_s}s waiting for {what}")
        time.sleep(interval_s)


def gated_burst(clients: int, one, gate: Path, refused: int) -> tuple[list, list]:
    """Runs `one(i)` in `clients` threads released together against a model that holds every
    call until `gate` exists (`slow.py` with `--set gate=...`). Nothing admitted can finish
    while the gate is shut, so the first `refused` answers are the refusals, however slowly
    the machine runs; then it opens the gate. Returns (all answers in request order, the
    answers that came before the gate opened)."""
    barrier = threading.Barrier(clients, timeout=30)

    def run(i: int):
        barrier.wait()
        return one(i)

    with ThreadPoolExecutor(max_workers=clients) as pool:
        futures = [pool.submit(run, i) for i in range(clients)]
        early = []
        try:
            for future in as_completed(futures, timeout=60):
                early.append(future.result())
                if len(early) == refused:
                    break
        finally:
            gate.touch()
        assert len(early) == refused, f"{len(early)} answers before the gate opened: {early}"
        return [f.result(timeout=120) for f in futures], early


def model_gauge(server: Server, name: str, model: str) -> float:
    """A per-model gauge from `/metrics` (`unimodel_inflight_requests`, `unimodel_queue_depth`):
    the server's own count, for tests to wait on instead of sleeping; 0 before it exists."""
    text = server.get("/metrics", timeout=30).text
    match = re.search(rf'^{name}{{model="{re.escape(model)}"}} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0
