"""The README's "One model, four ways" blocks, run as written against the real server.

Only the ports change (the test server listens on free ones) and the region key gets this
process's pid (parallel runs must not share a segment). Each block must print the doubled
input; a block that stops working fails here, so the README stays true.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from umclient import REPO_ROOT

SECTION = "## One model, four ways"


def readme_blocks() -> list[tuple[str, str]]:
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return re.findall(r"```(sh|python)\n(.*?)```", text[start:end], flags=re.S)


@pytest.fixture(scope="module")
def doubler(start_module_server):
    return start_module_server(str(REPO_ROOT / "plugins/examples/doubler.py"), "--allow-client-shm")


def test_readme_has_the_four_blocks():
    kinds = [kind for kind, _ in readme_blocks()]
    assert kinds == ["sh", "python", "python", "python"], kinds


@pytest.mark.parametrize("index", range(4))
def test_readme_block_runs_as_written(doubler, index, tmp_path: Path):
    kind, code = readme_blocks()[index]
    http_port = doubler.base_url.rsplit(":", 1)[1]
    grpc_port = doubler.grpc_url.rsplit(":", 1)[1]
    code = code.replace("localhost:8000", f"localhost:{http_port}")
    code = code.replace("localhost:8001", f"localhost:{grpc_port}")
    code = code.replace("/doubler_io", f"/doubler_io_{os.getpid()}")
    if kind == "sh":
        cmd = ["bash", "-c", code]
    else:
        script = tmp_path / "block.py"
        script.write_text(code)
        cmd = [sys.executable, str(script)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout.replace(" ", "")
    assert "[[2.4.6.]]" in out or '"data":[2.0,4.0,6.0]' in out, done.stdout
