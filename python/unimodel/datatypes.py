"""KServe datatypes, their numpy dtypes, and the BYTES serialisation.

Shared by the SDK (validating `um.Tensor` declarations) and the worker runtime (viewing input
arenas, casting outputs). BYTES use the KServe layout: per element a 4-byte little-endian
length, then the bytes; in Python a BYTES tensor is a numpy object array of `bytes`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Iterator

import numpy as np

try:  # BF16 is only a real dtype where ml_dtypes is installed (it ships with jax/tensorflow).
    from ml_dtypes import bfloat16 as _bfloat16

    _BF16 = np.dtype(_bfloat16)
except ImportError:  # pragma: no cover - depends on the environment
    # Raw bits: the plugin sees uint16 and can reinterpret them itself.
    _BF16 = np.dtype("<u2")

#: Every datatype name the protocol knows, in the order error messages list them.
DATATYPE_NAMES: tuple[str, ...] = (
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "BF16",
    "FP32",
    "FP64",
    "BYTES",
)

#: KServe name -> little-endian numpy dtype; BYTES maps to object (elements are `bytes`).
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "BF16": _BF16,
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}

_LEN = struct.Struct("<I")


def numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype for a KServe datatype name; `KeyError` for unknown names."""
    return NUMPY_DTYPES[datatype]


def encode_bytes_elements(elements: Iterable[object], what: str = "BYTES tensor") -> bytearray:
    """Serialises elements (`bytes`, `bytearray`, `memoryview` or `str` as UTF-8).

    `what` names the tensor in the error raised for any other element type. Writes into one
    growing buffer: no list of parts and no length object per element survive the loop, so
    millions of small elements cost about their serialised size (issue 15: a list of parts
    cost ~200 bytes per empty element).
    """
    out = bytearray()
    pack = _LEN.pack
    for index, element in enumerate(elements):
        if isinstance(element, bytes):
            data = element
        elif isinstance(element, str):
            data = element.encode("utf-8")
        elif isinstance(element, bytearray):
            data = element
        elif isinstance(element, memoryview):
            data = element.tobytes()  # len() of a memoryview counts items, not bytes
        else:
            raise TypeError(
                f"{what}: element {index} is {type(element).__name__}; BYTES elements must be "
                "str or bytes (convert with str(x) or x.encode())"
            )
        out += pack(len(data))
        out += data
    return out


def decode_bytes_elements(buffer: bytes | memoryview, count: int) -> list[bytes]:
    """Splits a serialised buffer into exactly `count` elements.

    Raises `ValueError` when the buffer is truncated or holds a different number of elements.
    """
    return list(_bytes_elements(buffer, count))


def decode_bytes_array(buffer: bytes | memoryview, shape: list[int]) -> np.ndarray:
    """A numpy object array of the `bytes` elements of a serialised buffer, with `shape`.

    Fills the array as it splits: no list of the elements is built first (8 bytes less per
    element at the peak, which counts for tensors of millions of small strings). Raises
    `ValueError` as `decode_bytes_elements` does.
    """
    count = math.prod(shape)
    if count == 0:  # fromiter asks the generator for nothing: check the size here
        _check_consumed(len(memoryview(buffer)), 0, 0)
    arr = np.fromiter(_bytes_elements(buffer, count), dtype=object, count=count)
    return arr.reshape(tuple(shape))


def _bytes_elements(buffer: bytes | memoryview, count: int) -> Iterator[bytes]:
    """Yields the `count` elements; the buffer's size is checked before the last one is
    yielded (a consumer that stops at `count` never resumes the generator)."""
    view = memoryview(buffer)
    size = len(view)
    offset = 0
    unpack = _LEN.unpack_from
    if count == 0:
        _check_consumed(size, 0, count)
    for index in range(count):
        if offset + 4 > size:
            raise ValueError(
                f"BYTES element {index} is truncated: length header at offset {offset}, "
                f"{size - offset} bytes left"
            )
        (length,) = unpack(view, offset)
        start = offset + 4
        end = start + length
        if end > size:
            raise ValueError(
                f"BYTES element {index} is truncated: {length} bytes needed at offset {start}, "
                f"{size - start} available"
            )
        offset = end
        if index == count - 1:
            _check_consumed(size, offset, count)
        yield bytes(view[start:end])


def _check_consumed(size: int, offset: int, count: int) -> None:
    if offset != size:
        raise ValueError(
            f"BYTES buffer holds {size - offset} bytes after the {count} elements its shape "
            "declares"
        )


def bytes_array(elements: list[bytes], shape: Iterable[int]) -> np.ndarray:
    """A numpy object array of `bytes` with the given shape."""
    arr = np.empty(len(elements), dtype=object)
    arr[:] = elements
    return arr.reshape(tuple(shape))
