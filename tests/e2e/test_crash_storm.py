"""Crash storms: a worker SIGKILLed every second under concurrent load.

Every request must be answered (a result, or a 503 naming the model and the signal), none may
hang, the model must be ready again at the end, and with `retry_on_worker_failure` no request
may fail at all. The 60 s version with 64 clients and recovery latencies is
benches/crash_storm.py.
"""

import os
import re
import signal
import textwrap

import pytest
from storm import Storm, worker_pids
from umclient import wait_until

CLIENTS = 16
STORM_S = 8.0

PLUGIN = textwrap.dedent(
    """
    import os
    import time
    from pathlib import Path

    import numpy as np

    import unimodel as um


    class Storm(um.Model):
        name = "storm"
        max_batch_size = 8
        max_queue_delay_ms = 1.0
        instances = 2
        inputs = {"x": um.Tensor("FP32", [1])}
        outputs = {"y": um.Tensor("FP32", [1]), "pid": um.Tensor("INT64", [1])}

        def setup(self, ctx):
            # While the file `hold` names exists, a starting worker waits (the test's window).
            hold = ctx.parameters.get("hold")
            while hold and Path(hold).exists():
                time.sleep(0.01)

        def predict(self, x):
            time.sleep(0.005)  # long enough for kills to land mid-batch
            pid = np.full((x.shape[0], 1), os.getpid(), dtype=np.int64)
            return {"y": (x * 2).astype(np.float32), "pid": pid}


    class StormRetry(Storm):
        name = "storm_retry"
        retry_on_worker_failure = True
    """
)


@pytest.fixture
def storm_plugin(tmp_path):
    path = tmp_path / "storm_plugin.py"
    path.write_text(PLUGIN)
    return path


def check_answers(result, model: str) -> None:
    """Every request answered: 200 with the right value, or a 503 that names the crash."""
    hung = [a for a in result.answers if a.status is None]
    assert not hung, f"{len(hung)} requests got no answer, e.g. {hung[0].error}"
    others = [a for a in result.answers if a.status not in (200, 503)]
    assert not others, f"unexpected answers: {[(a.status, a.message) for a in others[:5]]}"
    wrong = [a for a in result.answers if a.status == 200 and a.y != 2.0 * a.value]
    assert not wrong, f"wrong results: {wrong[:5]}"
    for a in result.answers:
        if a.status == 503:
            assert f"'{model}'" in a.message, a.message
            assert re.search(r"SIGKILL|signal 9", a.message), a.message
    assert result.count(200) + result.count(503) == len(result.answers)


def run_storm(server, model: str):
    result = Storm(
        server.base_url, model, server.proc.pid, clients=CLIENTS, duration_s=STORM_S
    ).run()
    assert len(result.kills) >= STORM_S - 2, f"only {len(result.kills)} kills landed"
    assert result.count(200) > len(result.kills), "the storm served almost nothing"
    return result


def wait_ready_again(server, model: str) -> None:
    wait_until(
        lambda: server.get(f"/v2/models/{model}/ready").status_code == 200,
        30.0,
        f"{model} ready after the storm",
    )
    assert server.get("/v2/health/ready").status_code == 200
    assert server.get(f"/v2/models/{model}").json()["state"] == "READY"
    assert server.alive()


def test_every_request_of_a_crash_storm_is_answered(start_server, storm_plugin):
    server = start_server(f"{storm_plugin}:Storm")
    result = run_storm(server, "storm")
    check_answers(result, "storm")
    # Without retries, the requests in the killed batches fail (and say why).
    assert result.count(503) > 0, "no request was on a killed worker: the storm missed"
    wait_ready_again(server, "storm")


def test_with_retry_on_worker_failure_no_request_fails(start_server, storm_plugin):
    server = start_server(f"{storm_plugin}:StormRetry")
    result = run_storm(server, "storm_retry")
    check_answers(result, "storm_retry")
    failed = [a.message for a in result.answers if a.status != 200]
    assert not failed, f"{len(failed)} of {len(result.answers)} failed: {failed[:3]}"
    # Log lines reach the file through the core's writer thread, a moment after they happen.
    wait_until(lambda: "retrying its requests once" in server.log_text(), 10.0, "a batch retried")
    wait_ready_again(server, "storm_retry")


def test_readiness_is_false_while_no_instance_is_up_and_true_after(
    start_server, storm_plugin, tmp_path
):
    hold = tmp_path / "hold"
    server = start_server(f"{storm_plugin}:Storm", "--set", f"hold={hold}")
    pids = worker_pids(server.proc.pid)
    assert len(pids) == 2, pids
    # The replacements wait in setup until the test has seen the outage (it would otherwise
    # last only the restart delay and a Python start: a window a loaded machine can miss).
    hold.touch()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)

    # Both gone: not ready, model and server alike, until a replacement serves.
    def down() -> bool:
        return (
            server.get("/v2/models/storm/ready").status_code == 503
            and server.get("/v2/health/ready").status_code == 503
            and server.get("/v2/models/storm").json()["state"] == "UNAVAILABLE"
        )

    try:
        wait_until(down, 30.0, "storm and the server not ready after both workers died")
    finally:
        hold.unlink()
    wait_ready_again(server, "storm")
    replacements = worker_pids(server.proc.pid)
    assert len(replacements) == 2 and not set(replacements) & set(pids), replacements
