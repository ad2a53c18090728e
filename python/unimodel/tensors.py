"""Tensors across the worker boundary: input views over shared memory, outputs into the arena.

Inputs become numpy arrays that view the read-only input arena directly (`np.ndarray` with the
mapping as buffer, which keeps it alive; no copy). Outputs are checked against the model's
declaration (names, rank, fixed dimensions, batch dimension, same_kind casts) before any memory
is allocated, then written exactly once into their destination: a block of the output arena, a
dedicated `memfd` when the whole result is larger than the arena, or the client's own shared
memory when the execute names a target for it (`ClientMappings`).
"""

from __future__ import annotations

import fcntl
import math
import mmap
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from .datatypes import NUMPY_DTYPES, decode_bytes_array, encode_bytes_elements
from .model import Tensor
from .protocol import ProtocolError


class InvalidOutputError(Exception):
    """`predict` returned something that does not match the declared outputs."""


class OutputTooLargeError(Exception):
    """An output exceeds the `max_output_bytes` hard limit."""


def map_fd(fd: int, writable: bool) -> mmap.mmap | None:
    """Maps a whole memfd (None when it is empty or not open)."""
    try:
        size = os.fstat(fd).st_size
    except OSError:
        return None
    if size == 0:
        return None
    access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
    return mmap.mmap(fd, size, access=access)


class ClientMappings:
    """Mappings of clients' shared-memory segments (region ``client``), kept across executes.

    A client reuses its segments for request after request; mapping one afresh each time would
    fault in every page again (milliseconds for 64 MiB). Descriptors arrive anew with every
    frame, so mappings are keyed by the object they name (device, inode, size, access). A
    mapping holds its segment alive, so the cache is small and least-recently-used; an evicted
    mapping is only dropped (arrays over it may still be in use), never closed.
    """

    LIMIT = 8

    def __init__(self) -> None:
        self._maps: OrderedDict[tuple[int, int, int, bool], mmap.mmap] = OrderedDict()

    def get(self, fd: int, writable: bool) -> mmap.mmap:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino, st.st_size, writable)
        mm = self._maps.get(key)
        if mm is not None:
            self._maps.move_to_end(key)
            return mm
        if st.st_size == 0:
            raise ProtocolError("a client segment is empty")
        access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
        mm = mmap.mmap(fd, st.st_size, access=access)
        self._maps[key] = mm
        if len(self._maps) > self.LIMIT:
            self._maps.popitem(last=False)
        return mm

    def targets(self, targets: list[dict[str, Any]], fds: list[int]) -> dict[str, tuple]:
        """``{output name: (mapping, offset, length)}`` for an execute's ``targets``."""
        out = {}
        for t in targets:
            index = t.get("fd")
            if not isinstance(index, int) or not 0 <= index < len(fds):
                raise ProtocolError(
                    f"target {t.get('name')!r} names descriptor {index!r}; "
                    f"the frame carried {len(fds)}"
                )
            mm = self.get(fds[index], writable=True)
            if t["offset"] + t["length"] > len(mm):
                raise ProtocolError(f"target {t['name']!r} ends past its segment")
            out[t["name"]] = (mm, t["offset"], t["length"])
        return out


class InputArena:
    """Builds the keyword arguments of `predict` from an execute's tensor references."""

    def __init__(self, fd: int) -> None:
        self.clients = ClientMappings()
        self._fd = fd
        self._mm = map_fd(fd, writable=False)
        self._size = len(self._mm) if self._mm is not None else 0

    def _arena(self, end: int) -> mmap.mmap:
        if end > self._size:
            # The core may have grown the memfd since we mapped it; map it again.
            mm = map_fd(self._fd, writable=False)
            if mm is None or end > len(mm):
                raise ProtocolError(f"input tensor ends at byte {end}, past the input arena")
            self._mm, self._size = mm, len(mm)
        return self._mm  # type: ignore[return-value]

    def arrays(self, refs: list[dict[str, Any]], fds: list[int]) -> dict[str, Any]:
        """``{name: array}`` for `refs`; `fds` are this frame's descriptors (closed here)."""
        out: dict[str, Any] = {}
        dtypes = NUMPY_DTYPES
        for ref in refs:
            datatype = ref["datatype"]
            shape = ref["shape"]
            region = ref["region"]
            length = ref["length"]
            dtype = dtypes.get(datatype)
            if dtype is None:
                raise ProtocolError(f"input {ref['name']!r} has unknown datatype {datatype!r}")
            if region == "input":
                offset = ref["offset"]
                buf: Any = self._arena(offset + length)
            elif region == "fd":
                offset = 0
                buf = self._map_input_fd(fds, ref)
            elif region == "client":
                offset = ref["offset"]
                buf = self._map_client(fds, ref)
            elif region == "inline":
                offset = 0
                buf = ref["data"]
            else:
                raise ProtocolError(f"input {ref['name']!r} has unusable region {region!r}")
            if buf is None and length:
                # An empty (or unmappable) region, or inline without data: no bytes to view.
                # np.empty would hand predict uninitialised memory instead.
                raise ProtocolError(
                    f"input {ref['name']!r} has {length} bytes in an empty {region} region"
                )
            if datatype == "BYTES":
                view = memoryview(buf)[offset : offset + length] if buf is not None else b""
                out[ref["name"]] = decode_bytes_array(view, shape)
                continue
            if math.prod(shape) * dtype.itemsize != length:
                raise ProtocolError(
                    f"input {ref['name']!r}: shape {shape} of {datatype} needs "
                    f"{math.prod(shape) * dtype.itemsize} bytes, reference says {length}"
                )
            if buf is None:  # an empty dedicated region maps to nothing
                out[ref["name"]] = np.empty(shape, dtype)  # length is 0: no element to read
            else:
                out[ref["name"]] = np.ndarray(shape, dtype, buffer=buf, offset=offset)
        return out

    def _map_client(self, fds: list[int], ref: dict[str, Any]) -> mmap.mmap:
        index = ref.get("fd")
        if not isinstance(index, int) or not 0 <= index < len(fds):
            raise ProtocolError(
                f"input {ref['name']!r} names descriptor {index!r}; the frame carried {len(fds)}"
            )
        mm = self.clients.get(fds[index], writable=False)
        if ref["offset"] + ref["length"] > len(mm):
            raise ProtocolError(f"input {ref['name']!r} ends past its client segment")
        return mm

    @staticmethod
    def _map_input_fd(fds: list[int], ref: dict[str, Any]) -> mmap.mmap | None:
        index = ref.get("fd")
        if not isinstance(index, int) or not 0 <= index < len(fds):
            raise ProtocolError(
                f"input {ref['name']!r} names descriptor {index!r}; the frame carried {len(fds)}"
            )
        # The mapping outlives the descriptor; arrays over it keep it alive.
        return map_fd(fds[index], writable=False)


def fd_count(refs: list[dict[str, Any]], targets: list[dict[str, Any]] | None = None) -> int:
    """How many descriptors a frame uses (highest `fd` index + 1) in its tensor references
    (regions ``fd`` and ``client``) and its ``targets``."""
    count = 0
    for ref in refs:
        if ref.get("region") in ("fd", "client"):
            index = ref.get("fd")
            if isinstance(index, int) and index + 1 > count:
                count = index + 1
    for target in targets or ():
        index = target.get("fd")
        if isinstance(index, int) and index + 1 > count:
            count = index + 1
    return count


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


@dataclass(frozen=True)
class OutputSpec:
    """A declared output, resolved once at load time."""

    name: str
    datatype: str
    dtype: np.dtype
    shape: tuple[int, ...]
    is_bytes: bool
    #: Rank of the returned array: the declared shape, plus the batch dimension when batching.
    rank: int
    #: (axis, size) of every fixed (not -1) dimension, axes counted in the returned array.
    fixed: tuple[tuple[int, int], ...]


@dataclass(slots=True)
class PreparedOutput:
    """One validated output, ready to be written: data is an ndarray or serialised BYTES."""

    spec: OutputSpec
    data: Any
    shape: list[int]
    nbytes: int


def to_numpy(value: Any) -> Any:
    """Turns torch/cupy tensors into numpy (duck-typed: no import of either)."""
    if type(value) is np.ndarray:
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu") and hasattr(value, "numpy"):
        return value.detach().cpu().numpy()  # torch
    if hasattr(value, "__cuda_array_interface__") and hasattr(value, "get"):
        return value.get()  # cupy
    return value


class OutputPlan:
    """Validates `predict`'s returned dict against the declared outputs."""

    def __init__(self, outputs: dict[str, Tensor], batching: bool, max_output_bytes: int) -> None:
        lead = 1 if batching else 0
        self.specs = {
            name: OutputSpec(
                name,
                t.datatype,
                NUMPY_DTYPES[t.datatype],
                tuple(t.shape),
                t.datatype == "BYTES",
                len(t.shape) + lead,
                tuple((axis + lead, size) for axis, size in enumerate(t.shape) if size != -1),
            )
            for name, t in outputs.items()
        }
        self.all_names = tuple(self.specs)
        self.batching = batching
        #: Hard limit per output tensor in bytes; 0 or less means none.
        self.max_output_bytes = max_output_bytes

    def prepare(
        self, returned: Any, requested: list[str] | None, batch_size: int
    ) -> list[PreparedOutput]:
        if not isinstance(returned, dict):
            raise InvalidOutputError(
                f"predict must return a dict mapping output names to arrays, got "
                f"{type(returned).__name__}: e.g. return {{{self.all_names[0]!r}: y}}"
            )
        specs = self.specs
        for key in returned:
            if key not in specs:
                raise InvalidOutputError(
                    f"predict returned output {key!r}, which is not declared; declared outputs: "
                    f"{', '.join(self.all_names)}"
                )
        names = self.all_names if requested is None else requested
        prepared = []
        for name in names:
            spec = specs.get(name)
            if spec is None:
                raise InvalidOutputError(
                    f"output {name!r} was requested but is not declared; declared outputs: "
                    f"{', '.join(self.all_names)}"
                )
            if name not in returned:
                raise InvalidOutputError(
                    f"predict did not return output {name!r}; it returned "
                    f"{', '.join(map(repr, returned)) or 'nothing'}"
                )
            prepared.append(self._prepare_one(spec, returned[name], batch_size))
        return prepared

    def _prepare_one(self, spec: OutputSpec, value: Any, batch_size: int) -> PreparedOutput:
        if type(value) is not np.ndarray:
            value = to_numpy(value)
        if spec.is_bytes:
            arr = value if isinstance(value, np.ndarray) else np.asarray(value, dtype=object)
            self._check_shape(spec, arr.shape, batch_size)
            flat = arr.reshape(-1) if arr.dtype == object else arr.astype(object).reshape(-1)
            try:
                data = encode_bytes_elements(flat, f"output {spec.name!r}")
            except TypeError as e:
                raise InvalidOutputError(str(e)) from None
            out = PreparedOutput(spec, data, list(arr.shape), len(data))
        else:
            arr = value if type(value) is np.ndarray else np.asarray(value)
            self._check_shape(spec, arr.shape, batch_size)
            if arr.dtype is not spec.dtype and not np.can_cast(
                arr.dtype, spec.dtype, casting="same_kind"
            ):
                raise InvalidOutputError(
                    f"output {spec.name!r} is {arr.dtype}, which numpy does not cast to "
                    f"{spec.datatype} ({spec.dtype}) under casting='same_kind'; convert it in "
                    f"predict, e.g. y.astype(np.{spec.dtype.name})"
                )
            out = PreparedOutput(spec, arr, list(arr.shape), arr.size * spec.dtype.itemsize)
        limit = self.max_output_bytes
        if limit > 0 and out.nbytes > limit:
            raise OutputTooLargeError(
                f"output {spec.name!r} is {out.nbytes} bytes, over the max_output_bytes limit of "
                f"{limit} bytes; raise it with --max-tensor-bytes"
            )
        return out

    def _check_shape(self, spec: OutputSpec, shape: tuple[int, ...], batch_size: int) -> None:
        if len(shape) == spec.rank and (not self.batching or shape[0] == batch_size):
            for axis, size in spec.fixed:
                if shape[axis] != size:
                    break
            else:
                return
        self._shape_error(spec, shape, batch_size)

    def _shape_error(self, spec: OutputSpec, shape: tuple[int, ...], batch_size: int) -> None:
        declared = list(spec.shape)
        if self.batching:
            if len(shape) != spec.rank:
                raise InvalidOutputError(
                    f"output {spec.name!r} has shape {list(shape)}; with batching it must be "
                    f"[batch, *{declared}] (rank {spec.rank}): keep the batch dimension first"
                )
            if shape[0] != batch_size:
                raise InvalidOutputError(
                    f"output {spec.name!r} has {shape[0]} rows but the batch has {batch_size}: "
                    "return one row per input row (first dimension = batch)"
                )
        elif len(shape) != spec.rank:
            raise InvalidOutputError(
                f"output {spec.name!r} has shape {list(shape)}, declared {declared} "
                f"(rank {spec.rank})"
            )
        raise InvalidOutputError(
            f"output {spec.name!r} has shape {list(shape)}, which does not match the declared "
            f"per-request shape {declared}"
        )


def write_output(mm: mmap.mmap, offset: int, out: PreparedOutput) -> None:
    """Copies one prepared output into `mm` at `offset` (casting on the way if needed)."""
    data = out.data
    if out.nbytes == 0:
        return
    if out.spec.is_bytes or (data.dtype is out.spec.dtype and data.flags.c_contiguous):
        mm[offset : offset + out.nbytes] = data
    else:
        dst = np.ndarray(data.shape, out.spec.dtype, buffer=mm, offset=offset)
        np.copyto(dst, data, casting="same_kind")


#: Seals on every dedicated output region: the core maps it, and a region that could shrink
#: under that mapping would crash the core with SIGBUS, so the core refuses one without them.
_SIZE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


def write_dedicated(out: PreparedOutput) -> int:
    """A new memfd holding one output, sealed at its size; the caller sends it and closes it."""
    fd = os.memfd_create(f"unimodel-output-{out.spec.name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        if out.nbytes:
            os.ftruncate(fd, out.nbytes)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SIZE_SEALS)
        if out.nbytes:
            with mmap.mmap(fd, out.nbytes, access=mmap.ACCESS_WRITE) as mm:
                write_output(mm, 0, out)
    except BaseException:
        os.close(fd)
        raise
    return fd
