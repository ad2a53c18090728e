#!/usr/bin/env python3
"""Memory amplification per request path: peak RSS of the core and of the worker over body size.

For each path, starts `unimodel run tests/plugins/echo_any.py` afresh, sends one small
request (so lazily started parts exist), resets both processes' peak RSS (`5` into
/proc/PID/clear_refs), notes their VmRSS, sends ONE large request to an echo model, and reads
VmHWM from /proc/PID/status. Amplification = (VmHWM - VmRSS before) / body size: what the
request itself cost each process per byte it sent. Paths:

  json_fp32    KServe JSON, FP32 `data` (numbers like 1.25), JSON output
  json_bytes   KServe JSON, BYTES `data` of empty strings (the issue's 30 M "" case), JSON output
  binary_fp32  Triton's binary tensor extension, binary output
  grpc_fp32    gRPC ModelInfer with raw_input_contents (tritonclient.grpc)

    benches/amplification.py --bin target/debug/unimodel --bin /work/main/target/debug/unimodel

Prints one table per binary. Debug builds are fine for memory (not for time). Needs numpy,
requests and tritonclient[grpc] (tests/requirements.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "tests" / "plugins" / "echo_any.py"
MIB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def descendants(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        for c in map(int, children):
            out.append(c)
            out.extend(descendants(c))
    return out


class Server:
    def __init__(self, binary: str, python: str, log: Path):
        self.port, self.grpc_port = free_port(), free_port()
        cmd = [binary, "run", str(PLUGIN), "--port", str(self.port)]
        cmd += ["--grpc-port", str(self.grpc_port), "--python", python]
        cmd += ["--max-body-bytes", str(1 << 30)]
        self.log = open(log, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url("/v2/health/ready"), timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            assert self.proc.poll() is None, f"server exited; see {log}"
            time.sleep(0.1)
        raise TimeoutError("server not ready")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def workers(self) -> list[int]:
        pythons = [p for p in descendants(self.proc.pid) if "python" in _cmdline(p)]
        assert len(pythons) >= 2, "expected two workers (echo_bytes, echo_fp32)"
        return pythons

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""


def json_body(model_input: dict, binary_out: bool = False) -> bytes:
    return json.dumps(
        {"inputs": [model_input], "parameters": {"binary_data_output": binary_out}}
    ).encode()


def fp32_json(n: int) -> tuple[str, bytes]:
    head = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[%d],"data":[' % n
    return "echo_fp32", head + b",".join([b"1.25"] * n) + b"]}]}"


def bytes_json(n: int) -> tuple[str, bytes]:
    head = b'{"inputs":[{"name":"x","datatype":"BYTES","shape":[%d],"data":[' % n
    return "echo_bytes", head + b",".join([b'""'] * n) + b"]}]}"


def send_http(server: Server, model: str, body: bytes, headers: dict | None = None) -> None:
    resp = requests.post(
        server.url(f"/v2/models/{model}/infer"), data=body, headers=headers, timeout=600
    )
    assert resp.status_code == 200, resp.text[:300]


def path_json_fp32(server: Server, mib: float, _: int) -> int:
    model, body = fp32_json(int(mib * MIB / 5))
    send_http(server, model, body)
    return len(body)


def path_json_bytes(server: Server, _: float, count: int) -> int:
    model, body = bytes_json(count)
    send_http(server, model, body)
    return len(body)


def path_binary_fp32(server: Server, mib: float, _: int) -> int:
    n = int(mib * MIB / 4)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [n],
                    "parameters": {"binary_data_size": n * 4},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    body = header + np.full(n, 1.25, dtype=np.float32).tobytes()
    send_http(
        server,
        "echo_fp32",
        body,
        {"Inference-Header-Content-Length": str(len(header))},
    )
    return len(body)


def path_grpc_fp32(server: Server, mib: float, _: int) -> int:
    import tritonclient.grpc as grpcclient

    n = int(mib * MIB / 4)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    x = grpcclient.InferInput("x", [n], "FP32")
    x.set_data_from_numpy(np.full(n, 1.25, dtype=np.float32))
    opts = [("grpc.max_receive_message_length", 1 << 30)]
    client.close()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}", channel_args=opts)
    client.infer("echo_fp32", [x])
    client.close()
    return n * 4


PATHS = {
    "json_fp32": path_json_fp32,
    "json_bytes": path_json_bytes,
    "binary_fp32": path_binary_fp32,
    "grpc_fp32": path_grpc_fp32,
}


def measure(binary: str, python: str, name: str, mib: float, count: int, logdir: Path) -> dict:
    server = Server(binary, python, logdir / f"{Path(binary).parent.parent.parent.name}-{name}.log")
    try:
        # Warm both models: workers, arenas and allocator pools exist before the reset.
        send_http(server, *fp32_json(4))
        send_http(server, *bytes_json(4))
        pids = {"core": server.proc.pid}
        for i, w in enumerate(server.workers()):
            pids[f"worker{i}"] = w
        base = {}
        for role, pid in pids.items():
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            base[role] = status_kib(pid, "VmRSS")
        size = PATHS[name](server, mib, count)
        grew = {role: status_kib(pid, "VmHWM") - base[role] for role, pid in pids.items()}
        worker = max(v for k, v in grew.items() if k.startswith("worker"))
        return {"path": name, "body": size, "core": grew["core"] * 1024, "worker": worker * 1024}
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", action="append", required=True, help="a unimodel binary (repeat)")
    ap.add_argument("--python", default=os.environ.get("UNIMODEL_PYTHON", "python3"))
    ap.add_argument("--mib", type=float, default=64, help="FP32 body size in MiB")
    ap.add_argument("--bytes-count", type=int, default=10_000_000, help="empty BYTES strings")
    ap.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset")
    args = ap.parse_args()
    logdir = Path(tempfile.mkdtemp(prefix="amplification-"))
    for binary in args.bin:
        print(f"\n{binary}")
        heads = ("path", "body MiB", "core MiB", "core x", "worker MiB", "worker x")
        widths = (-12, 9, 9, 7, 11, 9)
        print(
            " ".join(
                f"{h:<{-w}}" if w < 0 else f"{h:>{w}}" for h, w in zip(heads, widths, strict=True)
            )
        )
        for name in args.paths.split(","):
            r = measure(binary, args.python, name, args.mib, args.bytes_count, logdir)
            body = r["body"]
            print(
                f"{name:<12} {body / MIB:>9.1f} {r['core'] / MIB:>9.1f} {r['core'] / body:>7.2f}"
                f" {r['worker'] / MIB:>11.1f} {r['worker'] / body:>9.2f}",
                flush=True,
            )
    print(f"\nserver logs: {logdir}")


if __name__ == "__main__":
    main()
