"""``python -m unimodel.worker --inspect`` and the UMLOG log-line format."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from unimodel.inspection import inspect_plugin
from unimodel.logs import PREFIX, UmlogFormatter

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "plugins" / "examples"


def run_inspect(spec: str | Path) -> tuple[int, dict, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "unimodel.worker", "--inspect", str(spec)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT / "python"), "PATH": "/usr/bin:/bin"},
        timeout=60,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, f"stdout must be one JSON document: {proc.stdout!r}"
    return proc.returncode, json.loads(lines[0]), proc.stderr


def test_inspect_doubler_example():
    code, doc, _ = run_inspect(EXAMPLES / "doubler.py")
    assert code == 0
    assert doc == {
        "models": [
            {
                "class": "Doubler",
                "name": "doubler",
                "max_batch_size": 64,
                "max_queue_delay_ms": 1.0,
                "instances": 1,
                "streaming": False,
                "max_concurrency": None,
                "retry_on_worker_failure": False,
                "memory_limit_bytes": None,
                "concurrency": 1,
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1]}],
                "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}],
            }
        ]
    }


@pytest.mark.parametrize(
    ("example", "name", "batch"), [("echo_bytes.py", "echo_bytes", 0), ("mlp.py", "mlp", 32)]
)
def test_inspect_other_examples(example, name, batch):
    code, doc, _ = run_inspect(EXAMPLES / example)
    assert code == 0
    (model,) = doc["models"]
    assert model["name"] == name and model["max_batch_size"] == batch


def test_inspect_prints_stay_off_stdout_and_streaming_is_reported(tmp_path):
    (tmp_path / "chatty.py").write_text(
        textwrap.dedent(
            """
            import unimodel as um
            print("hello from import time")

            class Gen(um.Model):
                inputs = {"prompt": um.Tensor("BYTES", [1])}
                outputs = {"token": um.Tensor("BYTES", [1])}

                def predict(self, prompt):
                    yield {"token": [b"a"]}
            """
        )
    )
    code, doc, stderr = run_inspect(f"{tmp_path / 'chatty.py'}:Gen")
    assert code == 0
    assert doc["models"][0]["streaming"] is True
    assert "hello from import time" in stderr


def test_inspect_reports_all_problems_and_exits_one(tmp_path):
    (tmp_path / "bad.py").write_text(
        "import unimodel as um\n"
        "class A(um.Model):\n"
        "    instances = 0\n"
        "class B(um.Model):\n"
        "    max_queue_delay_ms = -1\n"
    )
    code, doc, _ = run_inspect(tmp_path / "bad.py")
    assert code == 1
    assert set(doc) == {"error", "traceback"}
    assert doc["error"].startswith("InvalidModelError:")
    for needle in ("model class A", "instances must be", "model class B", "max_queue_delay_ms"):
        assert needle in doc["error"], needle
    assert "Traceback" in doc["traceback"]


def test_inspect_missing_plugin_exits_one(tmp_path):
    code, doc, _ = run_inspect(tmp_path / "missing.py")
    assert code == 1
    assert doc["error"].startswith("PluginNotFoundError:")


def test_duplicate_names_are_rejected(tmp_path):
    (tmp_path / "dup.py").write_text(
        "import unimodel as um\n"
        "class A(um.Model):\n"
        "    name = 'same'\n"
        "    inputs = {'x': um.Tensor('FP32', [1])}\n"
        "    outputs = {'y': um.Tensor('FP32', [1])}\n"
        "    def predict(self, x):\n"
        "        return {'y': x}\n"
        "class B(A):\n"
        "    name = 'same'\n"
    )
    with pytest.raises(Exception, match="same name same"):
        inspect_plugin(str(tmp_path / "dup.py"))


def test_umlog_line_is_one_line_of_json_with_exception_text():
    formatter = UmlogFormatter()
    try:
        raise KeyError("missing")
    except KeyError:
        record = logging.LogRecord(
            "unimodel.plugin.m",
            logging.ERROR,
            __file__,
            1,
            "failed %s",
            ("ünïcode",),
            sys.exc_info(),
        )
    line = formatter.format(record)
    assert line.startswith(PREFIX) and line.startswith("\x1eUMLOG {")
    assert "\n" not in line
    payload = json.loads(line[len(PREFIX) :])
    assert list(payload) == ["level", "logger", "message"]
    assert payload["level"] == "ERROR" and payload["logger"] == "unimodel.plugin.m"
    assert payload["message"].startswith("failed ünïcode\nTraceback")
    assert "KeyError: 'missing'" in payload["message"]
