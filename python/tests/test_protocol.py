"""The wire format against docs/worker-protocol.md.

`test_doc_vectors` decodes every test vector in the doc's ``vectors`` block and re-encodes it;
it fails (never skips) while the block holds no vectors, because then nothing pins the format
the Rust core speaks. The other tests pin this encoder on its own: a round trip per message
type, key order, integer widths and floats.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any

import msgpack
import pytest

from unimodel.channel import Channel, ChannelClosed
from unimodel.protocol import (
    MESSAGE_KEYS,
    ProtocolError,
    canonical,
    decode_frame,
    encode_message,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "worker-protocol.md"
_BLOCK = re.compile(
    r"<!-- vectors:begin -->\s*```json\s*\n(?P<body>.*?)\n```\s*<!-- vectors:end -->", re.DOTALL
)


def from_json(value: Any) -> Any:
    """JSON test-vector values to Python: ``{"$bin": hex}`` becomes bytes."""
    if isinstance(value, dict):
        if set(value) == {"$bin"}:
            return bytes.fromhex(value["$bin"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def load_doc_vectors() -> list[dict[str, Any]]:
    text = DOC.read_text(encoding="utf-8")
    match = _BLOCK.search(text)
    assert match, f"{DOC} has no <!-- vectors:begin --> ```json ... ``` <!-- vectors:end --> block"
    body = match.group("body").strip()
    try:
        vectors = json.loads(body)
    except json.JSONDecodeError as e:
        pytest.fail(f"the vectors block in {DOC.name} is not JSON yet ({e}): {body[:80]!r}")
    assert isinstance(vectors, list) and vectors, f"the vectors block in {DOC.name} is empty"
    return vectors


def check_vector(vector: dict[str, Any]) -> None:
    """Decode the frame and compare; encode the message and compare bytes."""
    name = vector["name"]
    frame = bytes.fromhex(vector["frame"])
    expected = from_json(vector["message"])
    decoded = decode_frame(frame)
    assert decoded == expected, f"vector {name!r}: decoded {decoded!r}, doc says {expected!r}"
    encoded = encode_message(expected)
    assert encoded.hex() == frame.hex(), f"vector {name!r}: encoding differs"


def test_doc_vectors():
    vectors = load_doc_vectors()
    names = [v["name"] for v in vectors]
    assert len(names) == len(set(names)), "vector names must be unique"
    for vector in vectors:
        check_vector(vector)
    # Every message type of the protocol should be pinned by at least one vector.
    covered = {from_json(v["message"])["type"] for v in vectors}
    assert covered >= set(MESSAGE_KEYS), f"no vector for {sorted(set(MESSAGE_KEYS) - covered)}"


# -- this encoder on its own -------------------------------------------------------------------

TENSOR_IN = {
    "name": "x",
    "datatype": "FP32",
    "shape": [2, 3],
    "region": "input",
    "offset": 128,
    "length": 24,
}
TENSOR_FD = {
    "name": "big",
    "datatype": "UINT8",
    "shape": [100000],
    "region": "fd",
    "offset": 0,
    "length": 100000,
    "fd": 0,
}
TENSOR_INLINE = {
    "name": "flag",
    "datatype": "BOOL",
    "shape": [1],
    "region": "inline",
    "offset": 0,
    "length": 1,
    "data": b"\x01",
}

EXAMPLES: list[dict[str, Any]] = [
    {"type": "hello", "protocol": 2, "pid": 4242, "python": "3.11.7", "sdk": "0.1.0"},
    {"type": "ready", "setup_ms": 12.5},
    {"type": "load_failed", "error": "RuntimeError: boom", "traceback": "Traceback ...\n"},
    {"type": "result", "id": 7, "outputs": [TENSOR_IN, TENSOR_FD], "compute_ns": 123456789},
    {"type": "result", "id": 8, "outputs": [], "compute_ns": 0},
    {"type": "error", "id": 9, "error": "ValueError: bad", "traceback": "tb", "kind": "plugin"},
    {"type": "stream_chunk", "id": 10, "outputs": [TENSOR_IN]},
    {"type": "pong", "seq": 3},
    {
        "type": "load",
        "protocol": 2,
        "plugin": "/srv/plugins/doubler.py",
        "class": "Doubler",
        "model": "doubler",
        "instance": 0,
        "device": "cpu",
        "model_dir": "/srv/plugins",
        "parameters": {"factor": "3", "ünïcode": "✓"},
        "max_batch_size": 16,
        "max_output_bytes": 1 << 32,
        "concurrency": 16,
    },
    {"type": "execute", "id": 1, "batch_size": 2, "inputs": [TENSOR_IN], "outputs": None},
    {
        "type": "execute",
        "id": 2**40,
        "batch_size": 1,
        "inputs": [TENSOR_FD, TENSOR_INLINE],
        "outputs": ["y"],
    },
    {"type": "release", "id": 7},
    {"type": "cancel", "id": 8},
    {"type": "ping", "seq": 3},
    {"type": "shutdown"},
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: m["type"])
def test_round_trip_every_message_type(message):
    frame = encode_message(message)
    assert int.from_bytes(frame[:4], "little") == len(frame) - 4
    assert decode_frame(frame) == message
    # Encoding is deterministic: the decoded message encodes to the same bytes.
    assert encode_message(decode_frame(frame)) == frame


def test_examples_cover_every_message_type():
    assert {m["type"] for m in EXAMPLES} == set(MESSAGE_KEYS)


def test_key_order_is_type_first_then_table_order():
    scrambled = {"compute_ns": 5, "outputs": [], "id": 1, "type": "result"}
    frame = encode_message(scrambled)
    keys = list(msgpack.unpackb(frame[4:], object_pairs_hook=lambda pairs: pairs))
    assert [k for k, _ in keys] == ["type", "id", "outputs", "compute_ns"]
    ref = dict(reversed(list(TENSOR_FD.items())))
    execute = {"type": "execute", "id": 1, "batch_size": 1, "inputs": [ref], "outputs": None}
    body = canonical(execute)
    assert list(body["inputs"][0]) == [
        "name",
        "datatype",
        "shape",
        "region",
        "offset",
        "length",
        "fd",
    ]


def test_exact_bytes_of_small_messages():
    # Hand-assembled MessagePack: fixmap, fixstr keys, positive fixint / uint types.
    assert encode_message({"type": "ping", "seq": 3}) == bytes.fromhex(
        "10000000" "82" "a474797065" "a470696e67" "a3736571" "03"
    )
    assert encode_message({"type": "shutdown"}) == bytes.fromhex(
        "0f000000" "81" "a474797065" "a873687574646f776e"
    )
    # smallest integer encodings: 200 -> uint8 (cc), 70000 -> uint32 (ce)
    frame = encode_message({"type": "release", "id": 200})
    assert frame.endswith(bytes.fromhex("a26964" "ccc8"))
    frame = encode_message({"type": "release", "id": 70000})
    assert frame.endswith(bytes.fromhex("a26964" "ce00011170"))


def test_floats_are_float64_even_when_given_an_int():
    frame = encode_message({"type": "ready", "setup_ms": 12})
    assert frame.endswith(bytes.fromhex("a8" + b"setup_ms".hex() + "cb4028000000000000"))
    assert decode_frame(frame) == {"type": "ready", "setup_ms": 12.0}


def test_bin_payloads_are_msgpack_bin():
    frame = encode_message(
        {"type": "execute", "id": 1, "batch_size": 1, "inputs": [TENSOR_INLINE], "outputs": None}
    )
    assert bytes.fromhex("c40101") in frame  # bin8, length 1, 0x01


def test_absent_optional_value_is_nil_and_unknown_keys_survive():
    message = decode_frame(
        encode_message({"type": "execute", "id": 1, "batch_size": 1, "inputs": [], "later": True})
    )
    assert message["outputs"] is None
    assert message["later"] is True


def test_vector_checker_accepts_a_known_good_vector():
    # The same checker the doc vectors go through, on a vector computed by hand.
    check_vector(
        {
            "name": "ping",
            "frame": "1000000082a474797065a470696e67a373657103",
            "message": {"type": "ping", "seq": 3},
        }
    )
    check_vector(
        {
            "name": "inline",
            "frame": encode_message(
                {
                    "type": "execute",
                    "id": 1,
                    "batch_size": 1,
                    "inputs": [TENSOR_INLINE],
                    "outputs": None,
                }
            ).hex(),
            "message": {
                "type": "execute",
                "id": 1,
                "batch_size": 1,
                "inputs": [{**TENSOR_INLINE, "data": {"$bin": "01"}}],
                "outputs": None,
            },
        }
    )


@pytest.mark.parametrize(
    "frame",
    [
        b"\x01\x00",  # no full length prefix
        b"\x05\x00\x00\x00\x81",  # length says 5, one byte follows
        bytes.fromhex("05000000") + msgpack.packb([1, 2, 3, 4]),  # not a map
    ],
)
def test_bad_frames_are_protocol_errors(frame):
    with pytest.raises(ProtocolError):
        decode_frame(frame)


def test_unknown_type_is_a_protocol_error():
    body = msgpack.packb({"type": "bogus"})
    with pytest.raises(ProtocolError, match="unknown message type"):
        decode_frame(len(body).to_bytes(4, "little") + body)


def test_sending_on_a_lost_socket_is_channel_closed():
    # The worker treats it like EOF (exit) instead of dying of an OSError mid-execute.
    ours, theirs = socket.socketpair()
    theirs.close()
    channel = Channel(ours)
    with pytest.raises(ChannelClosed):
        channel.send({"type": "pong", "seq": 1})
    with pytest.raises(ChannelClosed):
        channel.send_with_fds({"type": "pong", "seq": 2}, [ours.fileno()])
    ours.close()
