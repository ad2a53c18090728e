"""BYTES tensors: non-ASCII, empty and non-UTF-8 elements round trip, over JSON and binary."""

import numpy as np
import pytest
from umclient import Inp, decode, infer_binary, infer_json, plugin

MODEL = "bytes_echo"
TEXTS = ["héllo ✓", "日本語", "", "plain ascii", "emoji 🚀 and tab\t"]


@pytest.fixture(scope="module")
def server(start_module_server):
    return start_module_server(plugin("bytes_echo.py"))


def check_echo(result, elements: list[bytes]):
    assert result.datatypes == {"echo": "BYTES", "length": "INT64"}
    assert result.outputs["echo"].shape == (len(elements),)
    assert list(result.outputs["echo"]) == elements
    np.testing.assert_array_equal(result.outputs["length"], [len(e) for e in elements])


@pytest.mark.parametrize(
    "send",
    [
        pytest.param(lambda s, i, p: infer_json(s, MODEL, i, parameters=p), id="json_utf8"),
        pytest.param(
            lambda s, i, p: infer_json(s, MODEL, i, parameters=p, ascii_json=True),
            id="json_escaped",
        ),
        pytest.param(lambda s, i, p: infer_binary(s, MODEL, i, parameters=p), id="binary"),
    ],
)
@pytest.mark.parametrize("binary_out", [False, True], ids=["json_out", "binary_out"])
def test_text_round_trips(server, send, binary_out):
    params = {"binary_data_output": True} if binary_out else None
    result = decode(send(server, [Inp("text", "BYTES", TEXTS)], params))
    assert result.was_binary == {"echo": binary_out, "length": binary_out}
    check_echo(result, [t.encode("utf-8") for t in TEXTS])


def test_single_empty_string(server):
    result = decode(infer_json(server, MODEL, [Inp("text", "BYTES", [""])]))
    check_echo(result, [b""])
    result = decode(
        infer_binary(
            server, MODEL, [Inp("text", "BYTES", [""])], parameters={"binary_data_output": True}
        )
    )
    check_echo(result, [b""])


def test_raw_bytes_round_trip_over_binary(server):
    # Not UTF-8 and with NUL bytes: only the binary extension can carry these.
    elements = [b"\xff\xfe\x00raw\x00", b"", b"\x80", bytes(range(256))]
    resp = infer_binary(
        server, MODEL, [Inp("text", "BYTES", elements)], parameters={"binary_data_output": True}
    )
    check_echo(decode(resp), elements)
