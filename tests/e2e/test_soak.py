"""A short soak (benches/soak.py with 20k requests: REST JSON, REST binary, gRPC and bad
requests mixed) against the binary under test: no descriptor growth beyond a small constant,
no growth of the core's live heap, nothing left in /dev/shm, every bad request answered as
expected, and a clean exit on SIGTERM. The 1M-request run and its slopes are in
benches/README.md."""

import json
import subprocess
import sys

import pytest
from umclient import REPO_ROOT, python_bin, unimodel_bin

REQUESTS = 20_000
CONCURRENCY = 8
# Descriptors: the load comes in rounds, and between rounds its connections are closed, so a
# sample holds anything from none to all of them (plus one or two being accepted). A leak is
# growth of the floor: the lowest sample of the last third over the lowest of the first.
FD_SLACK = 8
# Growth of the core's live heap from the first to the last third of the steady state, in MiB,
# each third's lowest sample (requests in flight at a sample only add to it). A leak of 100
# bytes per request adds over 1 MiB between them. The RSS is not checked: mimalloc keeps freed
# pages for reuse, so it moves by tens of MiB without a leak (benches/README.md, burst_memory).
HEAP_SLACK_MIB = 0.5


# A debug build on a loaded 2-core machine: 20k requests take a minute or two.
@pytest.mark.timeout(600)
def test_short_soak_leaks_no_descriptors_and_keeps_memory_bounded(tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "benches" / "soak.py"),
            "--requests",
            str(REQUESTS),
            "--bin",
            str(unimodel_bin()),
            "--python",
            python_bin(),
            "--round-s",
            "2",
            "--sample-s",
            "0.5",
            "--concurrency",
            str(CONCURRENCY),
            "--out-dir",
            str(tmp_path / "soak"),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert out.exists(), f"no report; stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    report = json.loads(out.read_text())
    context = f"stdout:\n{proc.stdout}"
    assert report["requests_answered"] >= REQUESTS, context
    assert set(report["bench_requests"]) == {"rest", "rest-binary", "grpc"}, context
    assert all(n > 0 for n in report["bench_requests"].values()), context
    for kind in ("malformed_json", "unknown_model", "too_large", "hang_up_before_answer"):
        assert report["error_requests"].get(kind, 0) > 0, (kind, context)
    assert report["error_requests"].get("grpc_unknown_model", 0) > 0, context

    steady = [s for s in report["samples"] if s["requests"] >= report["warmup_requests"]]
    assert len(steady) >= 3, context
    first, last = steady[0], steady[-1]
    third = max(1, len(steady) // 3)
    fds = [s["core_fds"] for s in steady]
    assert min(fds[-third:]) - min(fds[:third]) <= FD_SLACK, context
    # At most every client's connection (REST, gRPC and the bad requests' own) above the floor.
    assert max(fds) - min(fds) <= 3 * CONCURRENCY + FD_SLACK, context
    early = min(s["core_heap_mib"] for s in steady[:third])
    late = min(s["core_heap_mib"] for s in steady[-third:])
    assert late - early <= HEAP_SLACK_MIB, context
    assert last["core_threads"] - first["core_threads"] <= FD_SLACK, context
    # Other processes on the machine may create /dev/shm entries; the server holds none.
    assert all(s["dev_shm_ours"] == 0 for s in report["samples"]), context
    assert report["exit_code"] == 0, context
    assert proc.returncode in (0, 1), proc.stderr[-4000:]
