"""Issue 15 item 2: logging can neither freeze the server nor be flooded by clients.

- A stderr pipe that nobody reads once froze every route after ~400 logged requests (the
  log line was written synchronously on a runtime thread). Lines now go through a bounded
  queue to a writer thread; what does not fit is dropped, counted in /metrics and reported
  in the log once the writer catches up.
- Denied requests log a burst, then at most a few lines a second per caller; the rest are
  summarised as "suppressed K similar lines", so the count is kept while the volume is not.
"""

import math
import os
import re
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests
from umclient import (
    REPO_ROOT,
    Inp,
    decode,
    free_port,
    infer_json,
    plugin,
    python_bin,
    unimodel_bin,
    wait_until,
)

DOUBLER = str(REPO_ROOT / "plugins" / "examples" / "doubler.py")
# Enough access-log lines to fill the pipe (64 KiB) and the log queue (4096 lines) twice over.
FLOOD = 12_000
CLIENTS = 4
# Generous: a request that waits this long is stuck behind the log, not slow.
CLIENT_TIMEOUT_S = 20.0
DROPPED = re.compile(r"(\d+) log lines dropped")
# telemetry::throttle: what one key (here: one caller's denials) may log.
KEY_BURST = 20
KEY_LINES_PER_SECOND = 2
SUPPRESSED = re.compile(r"suppressed (\d+) similar lines: auth denials")


def counter(base_url: str, name: str) -> float | None:
    text = requests.get(f"{base_url}/metrics", timeout=CLIENT_TIMEOUT_S).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split(" ")[1])
    return None


def ready(base_url: str) -> bool:
    try:
        return requests.get(base_url + "/v2/health/ready", timeout=5).status_code == 200
    except requests.ConnectionError:
        return False


def flood(base_url: str, path: str, count: int, headers: dict | None = None) -> list[int]:
    """GETs `path` `count` times from CLIENTS keep-alive sessions; every status, in order."""

    def one_client(n: int) -> list[int]:
        with requests.Session() as s:
            return [
                s.get(base_url + path, headers=headers, timeout=CLIENT_TIMEOUT_S).status_code
                for _ in range(n)
            ]

    with ThreadPoolExecutor(CLIENTS) as pool:
        parts = pool.map(one_client, [count // CLIENTS] * CLIENTS)
        return [status for part in parts for status in part]


class StderrReader:
    """Reads the server's stderr on a thread once started; `wait_for` blocks on a pattern."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.started = False

    def start(self) -> None:
        self.started = True
        self.thread.start()

    def _read(self) -> None:
        for raw in self.proc.stderr:
            with self.changed:
                self.lines.append(raw.decode("utf-8", "replace"))
                self.changed.notify_all()
        with self.changed:
            self.lines.append("")  # EOF marker
            self.changed.notify_all()

    def wait_for(self, pattern: re.Pattern, timeout_s: float) -> list[re.Match]:
        def found() -> list[re.Match]:
            return [m for line in self.lines if (m := pattern.search(line))]

        with self.changed:
            self.changed.wait_for(
                lambda: found() or (self.lines and self.lines[-1] == ""), timeout_s
            )
            return found()


def start_with_unread_stderr(plugin_path: str, *flags: str) -> tuple[subprocess.Popen, str]:
    """A server whose stderr is a pipe the test leaves unread (until it starts a reader)."""
    port = free_port()
    cmd = [str(unimodel_bin()), "run", plugin_path, "--port", str(port), "--grpc-port", "0"]
    cmd += ["--python", python_bin(), *flags]
    env = dict(os.environ, UNIMODEL_LOG="info")
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    return proc, f"http://127.0.0.1:{port}"


def stop(proc: subprocess.Popen, reader: StderrReader) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    if not reader.started:
        reader.start()
    return proc.wait(timeout=30)


def assert_still_serving(base: str, model: str, x: list, y: list) -> None:
    """Health and inference answer, within the client's timeout."""
    assert requests.get(base + "/v2/health/ready", timeout=CLIENT_TIMEOUT_S).status_code == 200
    with requests.Session() as session:
        answer = infer_json(
            session, model, [Inp("x", "FP32", x)], base_url=base, timeout=CLIENT_TIMEOUT_S
        )
    assert decode(answer).outputs["y"].tolist() == y


def assert_drops_reported(base: str, reader: StderrReader) -> None:
    """Once stderr is read, the writer catches up and says how many lines it lost."""
    dropped_total = counter(base, "unimodel_log_lines_dropped_total")
    assert dropped_total is not None and dropped_total > 0
    reader.start()
    reports = reader.wait_for(DROPPED, 30.0)
    assert reports, "no 'N log lines dropped' report in:\n" + "".join(reader.lines[-20:])
    reported = sum(int(m.group(1)) for m in reports)
    assert 0 < reported <= counter(base, "unimodel_log_lines_dropped_total")
    # The lines that were not dropped arrived whole and in order (first the start-up).
    assert any("listening" in line for line in reader.lines[:50])


def test_a_stderr_nobody_reads_does_not_freeze_the_server():
    proc, base = start_with_unread_stderr(DOUBLER, "--access-log")
    reader = StderrReader(proc)
    try:
        wait_until(lambda: ready(base), 60.0, "the server to be ready")
        # Each request logs an access line; the pipe and the queue fill long before the end.
        statuses = flood(base, "/v2/health/live", FLOOD)
        assert statuses == [200] * len(statuses)
        assert_still_serving(base, "doubler", [[1.0, 2.0]], [[2.0, 4.0]])
        assert_drops_reported(base, reader)
    finally:
        code = stop(proc, reader)
    assert code == 0


def test_worker_output_with_stderr_unread_stalls_neither_core_nor_worker():
    # 100 stderr lines per call: 120 calls are 12,000 lines through the core's log.
    proc, base = start_with_unread_stderr(plugin("noisy.py"))
    reader = StderrReader(proc)
    try:
        wait_until(lambda: ready(base), 60.0, "the server to be ready")
        with requests.Session() as session:
            for i in range(120):
                answer = infer_json(
                    session, "noisy", [Inp("x", "FP32", [float(i)])], base_url=base,
                    timeout=CLIENT_TIMEOUT_S,
                )  # fmt: skip
                assert decode(answer).outputs["y"].tolist() == [float(i)]
        assert_still_serving(base, "noisy", [7.0], [7.0])
        assert_drops_reported(base, reader)
    finally:
        code = stop(proc, reader)
    assert code == 0


def test_denials_are_rate_limited_with_a_count_of_what_was_held_back(start_server, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("infer-key-0011223344556677 infer\n")
    server = start_server(DOUBLER, "--api-key-file", str(keys), env={"UNIMODEL_LOG": "info"})
    sent = 2_000
    started = time.monotonic()
    statuses = flood(
        server.base_url, "/v2/models/doubler", sent, headers={"Authorization": "Bearer wrong-key"}
    )
    elapsed = time.monotonic() - started
    assert statuses == [401] * sent
    suppressed_metric = counter(server.base_url, "unimodel_log_lines_suppressed_total")
    # A clean stop writes what the throttle still holds back, then flushes the log.
    server.stop()
    assert server.proc.returncode == 0
    log = server.log_text()
    logged = len(re.findall(r"denied GET /v2/models/doubler", log))
    summarised = sum(int(n) for n in SUPPRESSED.findall(log))
    # Nothing is lost from the count, and most of the flood never reached the log.
    assert logged + summarised == sent, (logged, summarised)
    # The key's burst, then at most its rate for each second the flood lasted.
    assert logged <= KEY_BURST + KEY_LINES_PER_SECOND * math.ceil(elapsed + 1), (logged, elapsed)
    assert summarised == suppressed_metric > 0
