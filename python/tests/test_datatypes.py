"""KServe datatypes and the BYTES serialisation (same layout as core/src/engine/bytes_codec.rs)."""

import numpy as np
import pytest

from unimodel.datatypes import (
    DATATYPE_NAMES,
    NUMPY_DTYPES,
    bytes_array,
    decode_bytes_array,
    decode_bytes_elements,
    encode_bytes_elements,
)


def test_every_datatype_has_a_little_endian_dtype():
    assert set(DATATYPE_NAMES) == set(NUMPY_DTYPES)
    sizes = {
        "BOOL": 1,
        "UINT8": 1,
        "INT8": 1,
        "UINT16": 2,
        "INT16": 2,
        "FP16": 2,
        "BF16": 2,
        "UINT32": 4,
        "INT32": 4,
        "FP32": 4,
        "UINT64": 8,
        "INT64": 8,
        "FP64": 8,
    }
    for name, size in sizes.items():
        dtype = NUMPY_DTYPES[name]
        assert dtype.itemsize == size, name
        assert dtype.byteorder in ("<", "|", "="), name
    assert NUMPY_DTYPES["BYTES"] == np.dtype(object)


def test_bytes_layout_matches_kserve():
    # Same elements as the Rust codec's test: empty, non-ASCII, raw bytes.
    data = encode_bytes_elements([b"", "héllo ✓", b"\x00\xff"])
    assert data == (
        b"\x00\x00\x00\x00" + b"\x0a\x00\x00\x00" + "héllo ✓".encode() + b"\x02\x00\x00\x00\x00\xff"
    )
    assert decode_bytes_elements(data, 3) == [b"", "héllo ✓".encode(), b"\x00\xff"]


def test_round_trip_non_ascii_and_empty_strings():
    elements = ["", "日本語", "emoji 🙂", "", "a" * 1000]
    data = encode_bytes_elements(elements)
    decoded = decode_bytes_elements(memoryview(data), len(elements))
    assert [d.decode() for d in decoded] == elements
    arr = bytes_array(decoded, [5])
    assert arr.dtype == object and arr.shape == (5,)
    assert isinstance(arr[1], bytes)


def test_bytes_array_keeps_shape_and_equal_length_elements_as_bytes():
    arr = bytes_array([b"ab", b"cd", b"ef", b"gh"], [2, 2])
    assert arr.shape == (2, 2)
    assert arr[1, 0] == b"ef"
    assert bytes_array([], [0]).shape == (0,)


def test_decode_rejects_truncation_and_extra_bytes():
    data = encode_bytes_elements([b"abc"])
    with pytest.raises(ValueError, match="truncated"):
        decode_bytes_elements(data[:-1], 1)
    with pytest.raises(ValueError, match="truncated"):
        decode_bytes_elements(data[:2], 1)
    with pytest.raises(ValueError, match="after the 1 elements"):
        decode_bytes_elements(data + b"\x00", 1)


def test_encode_rejects_non_string_elements():
    with pytest.raises(TypeError, match="element 1 is int"):
        encode_bytes_elements(["a", 3], "output 'y'")


def test_decode_bytes_array_fills_the_shape_and_checks_the_size():
    elements = [b"", b"ab", "é".encode(), b"", b"x", b"yz"]
    data = encode_bytes_elements(elements)
    arr = decode_bytes_array(memoryview(data), [2, 3])
    assert arr.dtype == object and arr.shape == (2, 3)
    assert arr.ravel().tolist() == elements
    assert decode_bytes_array(b"", [0, 4]).shape == (0, 4)
    with pytest.raises(ValueError, match="2 bytes after the 6 elements"):
        decode_bytes_array(bytes(data) + b"\0\0", [6])
    with pytest.raises(ValueError, match="truncated"):
        decode_bytes_array(data[:-1], [6])
    with pytest.raises(ValueError, match="bytes after the 0 elements"):
        decode_bytes_array(b"\0\0\0\0", [0])
