"""Output checks of `unimodel.tensors`, in process (no worker)."""

from __future__ import annotations

import numpy as np
import pytest

import unimodel as um
from unimodel.tensors import InvalidOutputError, OutputPlan, OutputTooLargeError


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
