"""The worker wire format: length-prefixed MessagePack frames (docs/worker-protocol.md).

A frame is a 4-byte little-endian length, then a MessagePack map with a ``type`` key. The
doc fixes the key order (``type`` first, then the order its tables list), so the Rust and
Python encoders produce identical bytes; `encode_message` applies that order to any dict.
The runtime's hot path builds its dicts in that order directly and packs them itself.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

#: 2: answers keyed by id in any order, output blocks released by id, ``load.concurrency``.
PROTOCOL_VERSION = 2
#: Frames larger than this are a protocol error on both sides (tensors travel in arenas).
MAX_FRAME_BYTES = 16 * 1024 * 1024

LENGTH = struct.Struct("<I")

#: Message keys in wire order, after ``type``.
MESSAGE_KEYS: dict[str, tuple[str, ...]] = {
    # worker -> core
    "hello": ("protocol", "pid", "python", "sdk"),
    "ready": ("setup_ms", "llm"),
    "load_failed": ("error", "traceback"),
    "result": ("id", "outputs", "compute_ns"),
    "error": ("id", "error", "traceback", "kind"),
    "stream_chunk": ("id", "outputs"),
    "pong": ("seq",),
    # core -> worker
    "load": (
        "protocol",
        "plugin",
        "class",
        "model",
        "instance",
        "device",
        "model_dir",
        "parameters",
        "max_batch_size",
        "max_output_bytes",
        "concurrency",
    ),
    "execute": ("id", "batch_size", "inputs", "outputs", "trace", "targets"),
    "release": ("id",),
    "cancel": ("id",),
    "ping": ("seq",),
    "shutdown": (),
}

TENSOR_KEYS: tuple[str, ...] = ("name", "datatype", "shape", "region", "offset", "length")
#: Keys that hold tensor-reference arrays.
_TENSOR_LISTS = {"inputs", "outputs"}
#: Keys the doc types as float: always encoded as float64, even when given an int.
_FLOAT_KEYS = {"setup_ms"}
#: Optional keys written only when they hold something (``execute.trace``, ``.targets``,
#: ``ready.llm``).
_OMIT_EMPTY = {"trace", "targets", "llm"}
#: Keys of an ``execute.targets`` entry, in wire order.
TARGET_KEYS: tuple[str, ...] = ("name", "fd", "offset", "length")


class ProtocolError(Exception):
    """A frame that breaks docs/worker-protocol.md (bad length, unknown type, bad map)."""


def new_packer() -> msgpack.Packer:
    """A packer with the protocol's settings: str as str, bytes as bin, floats as float64."""
    return msgpack.Packer(use_bin_type=True, use_single_float=False, autoreset=True)


_PACKER = new_packer()


def _canonical_tensor(ref: dict[str, Any]) -> dict[str, Any]:
    out = {k: ref[k] for k in TENSOR_KEYS if k in ref}
    for k in ("fd", "data"):
        if ref.get(k) is not None:
            out[k] = ref[k]
    for k, v in ref.items():
        if k not in out and k not in ("fd", "data"):
            out[k] = v
    return out


def canonical(message: dict[str, Any]) -> dict[str, Any]:
    """A copy of `message` with keys in wire order (unknown keys kept, at the end)."""
    kind = message.get("type")
    if kind not in MESSAGE_KEYS:
        raise ProtocolError(f"unknown message type {kind!r}")
    out: dict[str, Any] = {"type": kind}
    for key in MESSAGE_KEYS[kind]:
        value = message.get(key)
        if key in _OMIT_EMPTY and not value:
            continue
        if key in _FLOAT_KEYS and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif key in _TENSOR_LISTS and isinstance(value, list):
            value = [_canonical_tensor(t) if isinstance(t, dict) else t for t in value]
        elif key == "targets" and isinstance(value, list):
            value = [
                {**{k: t[k] for k in TARGET_KEYS if k in t}, **t} if isinstance(t, dict) else t
                for t in value
            ]
        out[key] = value
    for key, value in message.items():
        if key not in out and not (key in _OMIT_EMPTY and not value):
            out[key] = value
    return out


def encode_message(message: dict[str, Any]) -> bytes:
    """One frame (length prefix included) for `message`, keys in wire order."""
    body = _PACKER.pack(canonical(message))
    if len(body) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds MAX_FRAME_BYTES")
    return LENGTH.pack(len(body)) + body


def decode_body(body: bytes | memoryview) -> dict[str, Any]:
    """Decodes one frame body (without the length prefix)."""
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as e:
        raise ProtocolError(f"undecodable frame: {e}") from e
    if not isinstance(message, dict) or "type" not in message:
        raise ProtocolError(f"frame is not a map with a 'type' key: {message!r:.200}")
    if message["type"] not in MESSAGE_KEYS:
        raise ProtocolError(f"unknown message type {message['type']!r}")
    return message


def decode_frame(frame: bytes | memoryview) -> dict[str, Any]:
    """Decodes one whole frame, length prefix included; the length must match exactly."""
    if len(frame) < LENGTH.size:
        raise ProtocolError(f"frame of {len(frame)} bytes has no length prefix")
    (length,) = LENGTH.unpack_from(frame, 0)
    if length != len(frame) - LENGTH.size:
        raise ProtocolError(
            f"length prefix says {length} bytes, frame carries {len(frame) - LENGTH.size}"
        )
    return decode_body(memoryview(frame)[LENGTH.size :])
