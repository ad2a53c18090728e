"""Plugin failures: exceptions, killed workers, setup that keeps failing, hung predicts.

Each must be answered with a clear error, leave the server up, and (except a FAILED setup)
end with the model serving again.
"""

import os
import re
import signal
import threading
import time

import requests
from umclient import (
    Inp,
    decode,
    error_of,
    infer_json,
    pid_alive,
    plugin,
    wait_until,
)

# How soon a replacement serves (the spec: within 1 s on an idle machine) is measured by
# benches/crash_storm.py; here a loaded machine could miss any budget, so the test checks
# what happens and in which order, not how fast.
TIMEOUT_WORDS = re.compile(r"time(d)?[ _-]?out", re.IGNORECASE)


def x_input(value: float) -> list[Inp]:
    return [Inp("x", "FP32", [value])]


def pid_from(server, model: str, value: float = 0.0, timeout=(2.0, 10.0)) -> int | None:
    """The worker pid that answered a request, or None if it was not answered with 200."""
    try:
        resp = infer_json(server, model, x_input(value), timeout=timeout)
    except requests.RequestException:
        return None
    if resp.status_code != 200:
        return None
    return int(decode(resp).outputs["pid"][0])


def test_plugin_exception_is_a_500_and_the_worker_keeps_serving(start_server):
    server = start_server(plugin("raiser.py"))
    first = decode(infer_json(server, "raiser", x_input(1.5)))
    assert first.outputs["y"].tolist() == [1.5]
    pid = int(first.outputs["pid"][0])

    message = error_of(infer_json(server, "raiser", x_input(-2.0)), 500)
    assert "ValueError" in message, message
    assert "negative input rejected by raiser: -2.0" in message, message

    after = decode(infer_json(server, "raiser", x_input(3.0)))
    assert after.outputs["y"].tolist() == [3.0]
    assert int(after.outputs["pid"][0]) == pid, "an exception in predict must not cost the worker"


def test_sigkilled_worker_fails_its_request_and_is_replaced(start_server, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    server = start_server(plugin("crash_pair.py"), "--set", f"marker_dir={markers}")
    victim_pid = pid_from(server, "victim")
    bystander_pid = pid_from(server, "bystander")
    assert victim_pid, "victim not served"
    assert bystander_pid, "bystander not served"
    assert victim_pid != bystander_pid, "each model must have its own worker"

    # The other model of the same file is hit continuously throughout.
    stop = threading.Event()
    bystander_log: list[tuple[int, object]] = []

    def bystander_traffic():
        session = requests.Session()
        i = 0
        while not stop.is_set():
            try:
                resp = infer_json(
                    session,
                    "bystander",
                    x_input(float(i)),
                    base_url=server.base_url,
                    timeout=(2.0, 10.0),
                )
                if resp.status_code == 200:
                    out = decode(resp).outputs
                    bystander_log.append((i, (float(out["y"][0]), int(out["pid"][0]))))
                else:
                    bystander_log.append((i, f"{resp.status_code}: {resp.text[:300]}"))
            except Exception as exc:
                bystander_log.append((i, repr(exc)))
            i += 1
            time.sleep(0.02)

    slow: dict[str, object] = {}

    def slow_request():
        try:
            slow["resp"] = infer_json(server, "victim", x_input(60.0), timeout=(5.0, 90.0))
        except Exception as exc:
            slow["exc"] = exc

    traffic = threading.Thread(target=bystander_traffic, daemon=True)
    in_flight = threading.Thread(target=slow_request, daemon=True)
    traffic.start()
    in_flight.start()
    try:
        wait_until(lambda: (markers / str(victim_pid)).exists(), 30.0, "the victim's predict")
        os.kill(victim_pid, signal.SIGKILL)

        in_flight.join(timeout=30.0)
        assert not in_flight.is_alive(), "the request on the killed worker was never answered"
        assert "exc" not in slow, slow.get("exc")
        message = error_of(slow["resp"], 503)
        assert re.search(r"SIGKILL|signal 9", message), message
        assert "victim" in message, message

        new_pid = wait_until(
            lambda: (pid := pid_from(server, "victim")) not in (None, victim_pid) and pid,
            30.0,
            "a replacement victim worker",
        )
        assert new_pid != victim_pid
        wait_until(
            lambda: server.get("/v2/models/victim/ready").status_code == 200, 5.0, "victim ready"
        )
        wait_until(lambda: not pid_alive(victim_pid), 5.0, "the killed worker to be reaped")
        time.sleep(0.3)  # a little more bystander traffic after the recovery
    finally:
        stop.set()
        traffic.join(timeout=30.0)

    assert not traffic.is_alive()
    assert len(bystander_log) >= 5, bystander_log
    bad = [(i, got) for i, got in bystander_log if got != (float(i) + 1.0, bystander_pid)]
    assert not bad, f"the bystander model was disturbed: {bad[:5]}"
    assert pid_alive(bystander_pid)
    assert server.alive()


def test_setup_failing_every_time_ends_failed_with_traceback(start_server):
    message = "setup exploded on purpose (e2e marker 5821)"  # failing_setup.MESSAGE
    server = start_server(plugin("failing_setup.py"), wait=("broken", "FAILED"))
    meta = server.get("/v2/models/broken").json()
    assert meta["state"] == "FAILED"
    assert message in meta["error"], meta
    assert "RuntimeError" in meta["error"], meta
    traceback = meta["traceback"]
    # Frames of the real Python traceback: the plugin file and the function that raised.
    assert "failing_setup.py" in traceback, traceback
    assert "load_weights" in traceback, traceback

    assert server.get("/v2/health/live").status_code == 200
    assert server.get("/v2/health/ready").status_code == 503
    assert server.get("/v2/models/broken/ready").status_code == 503
    error_of(infer_json(server, "broken", x_input(1.0)), 503)
    # Log lines reach the file through the core's writer thread, a moment after they happen.
    wait_until(lambda: message in server.log_text(), 10.0, "the setup error in the server log")
    time.sleep(1.0)
    assert server.alive(), "the server must stay up when a model fails"
    assert server.get("/v2/health/live").status_code == 200
    assert server.get("/v2/models/broken").json()["state"] == "FAILED"


def test_hung_predict_is_timed_out_and_the_worker_replaced(start_server):
    server = start_server(
        plugin("hang.py"), "--execution-timeout-ms", "1500", "--request-timeout-ms", "60000"
    )
    old_pid = pid_from(server, "hang")
    assert old_pid

    started = time.monotonic()
    resp = infer_json(server, "hang", x_input(1.0), timeout=(5.0, 60.0))
    elapsed = time.monotonic() - started
    assert resp.status_code >= 500, resp.text
    message = error_of(resp)
    assert TIMEOUT_WORDS.search(message), message
    assert 1.0 <= elapsed < 30.0, f"answered after {elapsed:.1f}s with a 1.5s execution timeout"

    new_pid = wait_until(
        lambda: (pid := pid_from(server, "hang")) not in (None, old_pid) and pid,
        30.0,
        "a replacement hang worker",
    )
    assert new_pid != old_pid
    wait_until(lambda: not pid_alive(old_pid), 10.0, "the hung worker to be killed")
    assert server.alive()
