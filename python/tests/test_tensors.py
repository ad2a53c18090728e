"""Input views and output checks of `unimodel.tensors`, in process (no worker)."""

from __future__ import annotations

import os

import numpy as np
import pytest

import unimodel as um
from unimodel.protocol import ProtocolError
from unimodel.tensors import InputArena, InvalidOutputError, OutputPlan, OutputTooLargeError


def test_cast_errors_name_the_rule_and_both_types():
    plan = OutputPlan({"y": um.Tensor("INT32", [-1])}, batching=False, max_output_bytes=0)
    with pytest.raises(InvalidOutputError) as err:
        plan.prepare({"y": np.array([1.5])}, None, 1)
    message = str(err.value)
    assert "float64" in message and "INT32 (int32)" in message, message
    assert "casting='same_kind'" in message and "safely" not in message, message
    # same_kind, not safe: int64 -> FP32 is accepted.
    plan = OutputPlan({"y": um.Tensor("FP32", [-1])}, batching=False, max_output_bytes=0)
    (out,) = plan.prepare({"y": np.array([1, 2], np.int64)}, None, 1)
    assert out.nbytes == 8


def test_too_large_names_the_real_flag():
    plan = OutputPlan({"y": um.Tensor("UINT8", [-1])}, batching=False, max_output_bytes=4)
    with pytest.raises(OutputTooLargeError, match="raise it with --max-tensor-bytes"):
        plan.prepare({"y": np.zeros(5, np.uint8)}, None, 1)


def fd_ref(length: int) -> dict:
    shape = [length // 4]
    return {"name": "x", "datatype": "FP32", "shape": shape, "region": "fd", "offset": 0,
            "length": length, "fd": 0}  # fmt: skip


def test_an_empty_region_cannot_stand_for_nonempty_data():
    arena = InputArena(-1)  # not open: no input arena
    fd = os.memfd_create("empty", os.MFD_CLOEXEC)
    try:
        # Nothing to map: the 16 bytes the reference promises do not exist.
        with pytest.raises(ProtocolError, match="16 bytes in an empty fd region"):
            arena.arrays([fd_ref(16)], [fd])
        inline = {"name": "x", "datatype": "FP32", "shape": [1], "region": "inline",
                  "offset": 0, "length": 4, "data": None}  # fmt: skip
        with pytest.raises(ProtocolError, match="4 bytes in an empty inline region"):
            arena.arrays([inline], [])
        # An empty tensor in an empty region is fine.
        empty = arena.arrays([fd_ref(0)], [fd])["x"]
        assert empty.shape == (0,) and empty.dtype == np.float32
    finally:
        os.close(fd)
