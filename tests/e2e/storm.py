"""A crash storm: clients hammer a model while a killer SIGKILLs one of its workers at a
fixed interval, and a sampler watches the model's readiness.

Driven by tests/e2e/test_crash_storm.py (a short run that asserts) and benches/crash_storm.py
(the 60 s run that reports). Only the standard library and `requests`, so the bench can use
it outside pytest.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import requests

# (connect, read) timeouts of storm clients: an answer slower than this counts as a hang.
CLIENT_TIMEOUT = (5.0, 30.0)


@dataclass
class Answer:
    """One request's fate: an HTTP status (None: no answer, `error` says why)."""

    status: int | None
    at: float
    value: float
    y: float | None = None
    pid: int | None = None
    message: str = ""
    error: str = ""


@dataclass
class Kill:
    pid: int
    at: float
    # Pids that had served before the kill: the first success from any other is the
    # replacement's (or, with several instances, a replacement's).
    known: frozenset[int]


@dataclass
class StormResult:
    answers: list[Answer]
    kills: list[Kill]
    # (monotonic time, /v2/models/{m}/ready status or None)
    readiness: list[tuple[float, int | None]] = field(default_factory=list)

    def count(self, status: int | None) -> int:
        return sum(1 for a in self.answers if a.status == status)

    def recoveries(self) -> list[float]:
        """Per kill, seconds until a pid unknown at the kill first answered 200."""
        ok = sorted((a.at, a.pid) for a in self.answers if a.status == 200)
        out = []
        for k in self.kills:
            first = next((t for t, pid in ok if t > k.at and pid not in k.known), None)
            if first is not None:
                out.append(first - k.at)
        return out


def worker_pids(server_pid: int) -> list[int]:
    """Live `unimodel.worker` children of the server, oldest first."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # After the name: state (field 3), ppid (4), ..., starttime (22).
                stat = f.read().rsplit(") ", 1)[1].split()
            if int(stat[1]) != server_pid or stat[0] in ("Z", "X"):
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, IndexError, ValueError):
            continue
        if b"unimodel.worker" in cmdline:
            found.append((int(stat[19]), int(entry)))
    return [pid for _, pid in sorted(found)]


def infer_once(session: requests.Session, url: str, value: float) -> Answer:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [value]}]}
    try:
        resp = session.post(
            url,
            data=json.dumps(body),
            headers={"Content-Type": "application/json"},
            timeout=CLIENT_TIMEOUT,
        )
    except requests.RequestException as exc:
        return Answer(None, time.monotonic(), value, error=repr(exc))
    at = time.monotonic()
    if resp.status_code != 200:
        try:
            message = resp.json().get("error", resp.text)
        except ValueError:
            message = resp.text
        return Answer(resp.status_code, at, value, message=message)
    outputs = {o["name"]: o["data"] for o in resp.json()["outputs"]}
    return Answer(200, at, value, y=float(outputs["y"][0]), pid=int(outputs["pid"][0]))


class Storm:
    """`clients` threads send requests back to back for `duration_s`; every `kill_every_s` the
    longest-lived worker that has served is SIGKILLed (one that has not served yet may still
    be in setup: killing it would test setup failures, not crashes)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        server_pid: int,
        clients: int,
        duration_s: float,
        kill_every_s: float = 1.0,
    ):
        self.base_url = base_url
        self.model = model
        self.server_pid = server_pid
        self.clients = clients
        self.duration_s = duration_s
        self.kill_every_s = kill_every_s
        self._lock = threading.Lock()
        self._served: set[int] = set()
        self._answers: list[Answer] = []
        self._kills: list[Kill] = []
        self._readiness: list[tuple[float, int | None]] = []
        self._stop = threading.Event()

    def run(self) -> StormResult:
        threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True)
            for i in range(self.clients)
        ]
        threads.append(threading.Thread(target=self._sample_readiness, daemon=True))
        for t in threads:
            t.start()
        self._kill_loop()
        self._stop.set()
        for t in threads:
            # A client is bounded by its own timeouts; past them it is a hang.
            t.join(timeout=CLIENT_TIMEOUT[0] + CLIENT_TIMEOUT[1] + 10.0)
        hung = [t for t in threads if t.is_alive()]
        assert not hung, f"{len(hung)} storm threads never finished"
        return StormResult(self._answers, self._kills, self._readiness)

    def _client(self, index: int) -> None:
        session = requests.Session()
        url = f"{self.base_url}/v2/models/{self.model}/infer"
        i = 0
        while not self._stop.is_set():
            answer = infer_once(session, url, float(index * 1_000_000 + i))
            with self._lock:
                self._answers.append(answer)
                if answer.pid is not None:
                    self._served.add(answer.pid)
            i += 1

    def _kill_loop(self) -> None:
        end = time.monotonic() + self.duration_s
        next_kill = time.monotonic() + self.kill_every_s
        while time.monotonic() < end:
            self._stop.wait(max(0.0, next_kill - time.monotonic()))
            next_kill += self.kill_every_s
            with self._lock:
                served = set(self._served)
            victims = [p for p in worker_pids(self.server_pid) if p in served]
            if not victims:
                continue
            try:
                os.kill(victims[0], signal.SIGKILL)
            except ProcessLookupError:
                continue
            self._kills.append(Kill(victims[0], time.monotonic(), frozenset(served)))

    def _sample_readiness(self) -> None:
        session = requests.Session()
        url = f"{self.base_url}/v2/models/{self.model}/ready"
        while not self._stop.is_set():
            try:
                status = session.get(url, timeout=(2.0, 5.0)).status_code
            except requests.RequestException:
                status = None
            self._readiness.append((time.monotonic(), status))
            time.sleep(0.02)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
