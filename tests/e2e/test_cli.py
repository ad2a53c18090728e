"""`unimodel predict` (one shot, no server) and how the CLI fails on bad setups."""

import json

import pytest
from umclient import free_port, plugin, python_bin, run_cli


def predict(plugin_path: str, *args: str):
    return run_cli("predict", plugin_path, *args, "--python", python_bin())


def test_predict_prints_outputs_as_json(tmp_path):
    # arith batches: one row of "vals" and "mult" gets a batch dimension of 1 added.
    proc = predict(plugin("arith.py"), "-i", "vals=[1.5, 2.5, -1.0]", "-i", "mult=[2]")
    assert proc.returncode == 0, proc.stderr
    outputs = json.loads(proc.stdout)
    assert set(outputs) == {"total", "scaled", "positive", "third", "count"}
    assert outputs["total"] == {"datatype": "FP32", "shape": [1, 1], "data": [3.0]}
    assert outputs["scaled"] == {"datatype": "FP32", "shape": [1, 3], "data": [3.0, 5.0, -2.0]}
    assert outputs["positive"] == {"datatype": "BOOL", "shape": [1, 1], "data": [True]}
    assert outputs["count"] == {"datatype": "INT64", "shape": [1, 1], "data": [3]}
    assert outputs["third"]["datatype"] == "FP64"
    assert outputs["third"]["shape"] == [1, 3]
    assert outputs["third"]["data"] == pytest.approx([0.5, 2.5 / 3, -1.0 / 3], rel=1e-12)


def test_predict_with_a_full_batch_shape():
    proc = predict(plugin("arith.py"), "-i", "vals=[[1, 2], [3, 4]]", "-i", "mult=[[1], [10]]")
    assert proc.returncode == 0, proc.stderr
    outputs = json.loads(proc.stdout)
    assert outputs["scaled"] == {
        "datatype": "FP32",
        "shape": [2, 2],
        "data": [1.0, 2.0, 30.0, 40.0],
    }


def test_predict_passes_a_non_json_value_as_one_bytes_string():
    proc = predict(plugin("bytes_echo.py"), "-i", "text=héllo ✓")
    assert proc.returncode == 0, proc.stderr
    outputs = json.loads(proc.stdout)
    assert outputs["echo"]["datatype"] == "BYTES"
    assert outputs["echo"]["data"] == ["héllo ✓"]
    assert outputs["length"]["data"] == [len("héllo ✓".encode())]


def test_predict_with_a_bad_plugin_path_fails_clearly(tmp_path):
    missing = tmp_path / "no_such_plugin.py"
    proc = predict(str(missing), "-i", "x=1")
    assert proc.returncode != 0
    assert "no_such_plugin.py" in proc.stderr + proc.stdout, proc.stderr


def test_run_with_a_bad_plugin_path_fails_clearly(tmp_path):
    missing = tmp_path / "no_such_plugin.py"
    proc = run_cli("run", str(missing), "--port", str(free_port()), "--python", python_bin())
    assert proc.returncode != 0
    assert "no_such_plugin.py" in proc.stderr + proc.stdout, proc.stderr


@pytest.mark.parametrize("command", ["run", "predict"])
def test_missing_python_interpreter_fails_clearly(command):
    args = (
        ["--port", str(free_port())] if command == "run" else ["-i", "vals=[1.0]", "-i", "mult=[1]"]
    )
    proc = run_cli(command, plugin("arith.py"), *args, "--python", "/nonexistent/python3")
    assert proc.returncode != 0
    assert "/nonexistent/python3" in proc.stderr + proc.stdout, proc.stderr
