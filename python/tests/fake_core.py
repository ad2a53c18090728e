"""A minimal core, in Python, for driving a real worker process in tests and benchmarks.

It does what ``core/src/worker/`` does at spawn: a socketpair, two memfd arenas, the child's
end at fds 3/4/5 (dup2 in the child before exec), the protocol's environment, then
``python -m unimodel.worker`` with this tree's SDK on PYTHONPATH. Input tensors are copied into
the input arena by a bump allocator; outputs are read back from the output arena or from the
descriptors a result carries.
"""

from __future__ import annotations

import array
import fcntl
import mmap
import os
import select
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from unimodel.allocator import align_up
from unimodel.channel import Channel
from unimodel.datatypes import NUMPY_DTYPES, bytes_array, decode_bytes_elements
from unimodel.datatypes import encode_bytes_elements as encode_bytes
from unimodel.protocol import PROTOCOL_VERSION, encode_message

SDK_PATH = Path(__file__).resolve().parent.parent  # python/

KSERVE_NAMES = {
    np.dtype(np.bool_): "BOOL",
    np.dtype("u1"): "UINT8",
    np.dtype("<u2"): "UINT16",
    np.dtype("<u4"): "UINT32",
    np.dtype("<u8"): "UINT64",
    np.dtype("i1"): "INT8",
    np.dtype("<i2"): "INT16",
    np.dtype("<i4"): "INT32",
    np.dtype("<i8"): "INT64",
    np.dtype("<f2"): "FP16",
    np.dtype("<f4"): "FP32",
    np.dtype("<f8"): "FP64",
}


def _memfd(name: str, size: int) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


class FakeCore:
    """Spawns one worker and speaks the protocol to it."""

    def __init__(
        self,
        input_bytes: int = 1 << 20,
        output_bytes: int = 1 << 20,
        timeout: float | None = 20.0,
    ) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        in_fd = _memfd("test-input-arena", input_bytes)
        out_fd = _memfd("test-output-arena", output_bytes)
        self.in_mm = mmap.mmap(in_fd, input_bytes, access=mmap.ACCESS_WRITE)
        self.out_mm = mmap.mmap(out_fd, output_bytes, access=mmap.ACCESS_READ)
        # Park the child's descriptors high, so the dup2s below never overwrite each other.
        high = [
            fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in (child.fileno(), in_fd, out_fd)
        ]
        for fd in (in_fd, out_fd):
            os.close(fd)
        child.close()

        def place_fds() -> None:  # runs in the child between fork and exec
            for target, fd in zip((3, 4, 5), high, strict=True):
                os.dup2(fd, target)  # dup2 clears close-on-exec on the target

        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(SDK_PATH),
            "PYTHONUNBUFFERED": "1",
            "UNIMODEL_CONTROL_FD": "3",
            "UNIMODEL_INPUT_ARENA_FD": "4",
            "UNIMODEL_OUTPUT_ARENA_FD": "5",
            "UNIMODEL_MODEL": "test",
            "UNIMODEL_INSTANCE": "0",
        }
        # Files, not pipes: a chatty worker can never block on a full pipe nobody reads.
        self.stderr_file = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self.stdout_file = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "unimodel.worker"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.stdout_file,
            stderr=self.stderr_file,
            close_fds=False,
            preexec_fn=place_fds,
        )
        for fd in high:
            os.close(fd)
        parent.settimeout(timeout)
        self.sock = parent
        self.channel = Channel(parent)
        self._in_head = 0

    # -- frames ---------------------------------------------------------------------------------

    def send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        frame = encode_message(message)
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            sent = self.sock.sendmsg([frame], anc)
            if sent < len(frame):
                self.sock.sendall(frame[sent:])
        else:
            self.sock.sendall(frame)

    def recv(self) -> dict[str, Any]:
        return self.channel.recv()

    def nothing_arrives(self, seconds: float) -> bool:
        """True if no frame arrives within `seconds` (nothing is consumed)."""
        if self.channel.buffered():
            return False
        readable, _, _ = select.select([self.sock], [], [], seconds)
        return not readable

    # -- lifecycle ------------------------------------------------------------------------------

    def hello(self) -> dict[str, Any]:
        msg = self.recv()
        assert msg["type"] == "hello", msg
        return msg

    def load(
        self,
        plugin: str | Path,
        cls: str = "",
        *,
        model: str = "m",
        parameters: dict[str, str] | None = None,
        max_batch_size: int = 0,
        max_output_bytes: int = 1 << 30,
        model_dir: str = "",
        concurrency: int = 0,
    ) -> dict[str, Any]:
        """Sends ``load``; `concurrency` 0 leaves it to the class (as if a v2 core sent the
        class's own value)."""
        self.send(
            {
                "type": "load",
                "protocol": PROTOCOL_VERSION,
                "plugin": str(plugin),
                "class": cls,
                "model": model,
                "instance": 0,
                "device": "cpu",
                "model_dir": model_dir,
                "parameters": parameters or {},
                "max_batch_size": max_batch_size,
                "max_output_bytes": max_output_bytes,
                "concurrency": concurrency,
            }
        )
        return self.recv()

    def shutdown(self, timeout: float = 10.0) -> int:
        self.send({"type": "shutdown"})
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.sock.close()
        self.channel.close_unclaimed_fds()
        self.stderr_file.close()
        self.stdout_file.close()

    def stderr(self) -> str:
        self.stderr_file.seek(0)
        return self.stderr_file.read().decode("utf-8", "replace")

    # -- tensors --------------------------------------------------------------------------------

    def put(self, name: str, value: Any, datatype: str | None = None) -> dict[str, Any]:
        """Copies a tensor into the input arena; returns its reference."""
        if datatype == "BYTES":
            arr = np.asarray(value, dtype=object)
            data = encode_bytes(arr.reshape(-1))
            shape = list(arr.shape)
        else:
            arr = np.ascontiguousarray(value)
            datatype = datatype or KSERVE_NAMES[arr.dtype]
            data = arr.tobytes()
            shape = list(arr.shape)
        size = align_up(max(len(data), 1))
        if self._in_head + size > len(self.in_mm):
            self._in_head = 0
        offset = self._in_head
        self.in_mm[offset : offset + len(data)] = data
        self._in_head += size
        return {
            "name": name,
            "datatype": datatype,
            "shape": shape,
            "region": "input",
            "offset": offset,
            "length": len(data),
        }

    def execute(
        self,
        exec_id: int,
        inputs: list[dict[str, Any]],
        batch_size: int = 1,
        outputs: list[str] | None = None,
        fds: list[int] | None = None,
        trace: list[str] | None = None,
    ) -> None:
        self.send(
            {
                "type": "execute",
                "id": exec_id,
                "batch_size": batch_size,
                "inputs": inputs,
                "outputs": outputs,
                "trace": trace or [],
            },
            fds,
        )

    def read(self, ref: dict[str, Any], fds: list[int] | None = None) -> np.ndarray:
        """Copies an output tensor out of the output arena (or its dedicated memfd)."""
        if ref["region"] == "output":
            raw = bytes(self.out_mm[ref["offset"] : ref["offset"] + ref["length"]])
        elif ref["region"] == "fd":
            assert fds is not None
            fd = fds[ref["fd"]]
            raw = os.pread(fd, ref["length"], 0) if ref["length"] else b""
        else:
            raise AssertionError(f"unexpected region {ref['region']}")
        if ref["datatype"] == "BYTES":
            count = int(np.prod(ref["shape"]))
            return bytes_array(decode_bytes_elements(raw, count), ref["shape"])
        dtype = NUMPY_DTYPES[ref["datatype"]]
        return np.frombuffer(raw, dtype=dtype).reshape(ref["shape"])

    def outputs(self, result: dict[str, Any]) -> dict[str, np.ndarray]:
        """All outputs of a result or stream chunk; claims and closes its descriptors."""
        refs = result["outputs"]
        count = max((r["fd"] + 1 for r in refs if r["region"] == "fd"), default=0)
        fds = self.channel.take_fds(count) if count else []
        try:
            return {r["name"]: self.read(r, fds) for r in refs}
        finally:
            for fd in fds:
                os.close(fd)
