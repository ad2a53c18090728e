"""Prometheus metrics: values move as requests, errors, 429s, batches and worker crashes happen;
the Triton statistics report the same numbers; promtool accepts the output, the alert rules and
their unit tests; the Grafana dashboard and the alerts name only metrics the server exports.

promtool comes from the Debian package `prometheus` (scripts/test.sh installs it). These tests
fail, not skip, without it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import requests
from umclient import (
    REPO_ROOT,
    Inp,
    decode,
    error_of,
    free_port,
    infer_json,
    plugin,
    wait_until,
)

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "unimodel-dashboard.json"
ALERTS = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = REPO_ROOT / "deploy" / "prometheus" / "alerts_test.yml"

SAMPLE_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
METRIC_NAME = re.compile(r"\bunimodel_[a-zA-Z0-9_]+")
HIST = ("_bucket", "_sum", "_count")


def x_input(value: float) -> list[Inp]:
    return [Inp("x", "FP32", [value])]


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, (
        "promtool not found: install the Debian package `prometheus` "
        "(scripts/test.sh installs it)"
    )
    return path


class Samples:
    """One scrape of /metrics: sample values by name and labels, plus the declared families."""

    def __init__(self, text: str):
        self.text = text
        self.values: dict[tuple[str, frozenset], float] = {}
        self.families: dict[str, str] = {}
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ", 3)
                self.families[name] = kind
                continue
            if not line or line.startswith("#"):
                continue
            match = SAMPLE_LINE.match(line)
            assert match, f"unparsable metrics line: {line!r}"
            name, labels, value = match.groups()
            key = (name, frozenset(LABEL.findall(labels or "")))
            assert key not in self.values, f"duplicate series: {line!r}"
            self.values[key] = float(value)

    def get(self, name: str, **labels: str) -> float:
        """The series with exactly these labels; 0 if it does not exist yet."""
        return self.values.get((name, frozenset(labels.items())), 0.0)

    def names(self) -> set[str]:
        return {name for name, _ in self.values}


def scrape(base_url: str) -> Samples:
    resp = requests.get(base_url + "/metrics", timeout=(5.0, 30.0))
    assert resp.status_code == 200, resp.text[:500]
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return Samples(resp.text)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return after.get(name, **labels) - before.get(name, **labels)


def test_requests_errors_and_shared_memory_bytes_move_the_metrics(start_server):
    server = start_server(plugin("raiser.py"))
    before = scrape(server.base_url)
    for value in (1.0, 2.0, 3.0):
        assert decode(infer_json(server, "raiser", x_input(value))).outputs["y"].tolist() == [value]
    for value in (-1.0, -2.0):
        error_of(infer_json(server, "raiser", x_input(value)), 500)
    error_of(infer_json(server, "raiser", [Inp("x", "INT32", [1])]), 400)
    error_of(infer_json(server, "no_such_model", x_input(1.0)), 404)
    after = scrape(server.base_url)

    req = {"model": "raiser", "version": "1", "protocol": "rest"}
    mv = {"model": "raiser", "version": "1"}
    total = "unimodel_requests_total"
    assert delta(before, after, total, **req, outcome="success") == 3
    assert delta(before, after, total, **req, outcome="plugin_error") == 2
    assert delta(before, after, total, **req, outcome="bad_request") == 1
    # An unknown model name must not become a label value.
    unknown = {"model": "", "version": "", "protocol": "rest", "outcome": "not_found"}
    assert delta(before, after, total, **unknown) == 1
    assert not any("no_such_model" in line for line in after.text.splitlines())

    assert delta(before, after, "unimodel_request_duration_seconds_count", **req) == 3
    assert delta(before, after, "unimodel_request_duration_seconds_sum", **req) > 0
    # Latency buckets are cumulative and end with every observation.
    assert after.get("unimodel_request_duration_seconds_bucket", **req, le="+Inf") == 3
    # Failed batches are not batches: 3 successful calls of one row each.
    assert delta(before, after, "unimodel_batch_size_count", **mv) == 3
    assert delta(before, after, "unimodel_batch_size_sum", **mv) == 3
    assert delta(before, after, "unimodel_plugin_compute_duration_seconds_count", **mv) == 3
    assert delta(before, after, "unimodel_worker_call_duration_seconds_count", **mv) == 3
    assert delta(before, after, "unimodel_queue_duration_seconds_count", **mv) == 3
    # Five requests reached the worker with one FP32 (4 bytes); three came back with an FP32
    # and an INT64 (12 bytes).
    shm = "unimodel_shared_memory_bytes_total"
    assert delta(before, after, shm, model="raiser", direction="in") == 5 * 4
    assert delta(before, after, shm, model="raiser", direction="out") == 3 * 12
    assert after.get("unimodel_inflight_requests", model="raiser") == 0
    assert after.get("unimodel_queue_depth", model="raiser") == 0
    assert after.get("unimodel_worker_instances", model="raiser", state="ready") == 1
    assert after.get("unimodel_worker_starts_total", model="raiser") == 1
    assert after.get("unimodel_worker_crashes_total", model="raiser") == 0


def test_triton_statistics_report_the_same_numbers_as_the_metrics(start_server):
    server = start_server(plugin("batch_probe.py"), "--set", "hold_s=0.05")
    clients, rounds = 12, 3
    barrier = threading.Barrier(clients, timeout=30)

    def client(i: int) -> list[int]:
        seen = []
        for r in range(rounds):
            barrier.wait()
            x = i * 100 + r
            out = decode(infer_json(server, "batch_probe", [Inp("x", "INT64", [[x]])])).outputs
            assert out["y"].tolist() == [[3 * x + 1]]
            seen.append(int(out["batch"][0][0]))
        return seen

    with ThreadPoolExecutor(max_workers=clients) as pool:
        sizes_seen = [s for seen in pool.map(client, range(clients)) for s in seen]
    rows = clients * rounds
    assert len(sizes_seen) == rows
    assert max(sizes_seen) > 1, f"no batching happened: {sizes_seen}"
    # Each batch of size b answered b requests, each of which saw b.
    batches = {b: n // b for b, n in Counter(sizes_seen).items()}

    (stats,) = server.get("/v2/models/batch_probe/stats").json()["model_stats"]
    m = scrape(server.base_url)
    mv = {"model": "batch_probe", "version": "1"}
    inference = stats["inference_stats"]

    assert stats["inference_count"] == rows == m.get("unimodel_batch_size_sum", **mv)
    assert stats["execution_count"] == sum(batches.values())
    assert stats["execution_count"] == m.get("unimodel_batch_size_count", **mv)
    assert inference["success"]["count"] == rows
    assert inference["success"]["count"] == m.get(
        "unimodel_requests_total", **mv, protocol="rest", outcome="success"
    )
    # Per batch size: the Triton batch_stats, the batches the plugin saw and the histogram's
    # cumulative buckets all agree.
    assert {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]} == batches
    for le in (1, 2, 4, 8, 16, 32):
        expected = sum(n for b, n in batches.items() if b <= le)
        assert m.get("unimodel_batch_size_bucket", **mv, le=str(le)) == expected, le

    def agree(stat: dict, family: str) -> None:
        assert stat["count"] == m.get(f"{family}_count", **mv), family
        seconds = m.get(f"{family}_sum", **mv)
        assert math.isclose(stat["ns"] / 1e9, seconds, rel_tol=1e-6, abs_tol=1e-6), family

    agree(inference["queue"], "unimodel_queue_duration_seconds")
    agree(inference["compute_infer"], "unimodel_plugin_compute_duration_seconds")
    # The plugin holds each batch 50 ms; the core's round trip includes it.
    assert m.get("unimodel_worker_call_duration_seconds_sum", **mv) >= 0.05 * sum(batches.values())


def test_full_queue_counts_rejections_and_shows_depth_and_in_flight(start_server, tmp_path):
    gate = tmp_path / "gate"
    server = start_server(
        plugin("slow.py"),
        "--set",
        "delay_s=0",
        "--set",
        f"gate={gate}",
        "--queue-capacity",
        "2",
        "--request-timeout-ms",
        "120000",
    )
    base = server.base_url
    assert scrape(base).get("unimodel_queue_capacity", model="slow") == 2
    accepted, clients = 4, 10

    def one(i: int) -> int:
        return infer_json(server, "slow", x_input(float(i)), timeout=(5.0, 120.0)).status_code

    def holds(m: Samples, inflight: int, queued: int) -> bool:
        # A request leaves the queue (and frees its place) when it goes to the worker.
        return (
            m.get("unimodel_inflight_requests", model="slow") == inflight
            and m.get("unimodel_queue_depth", model="slow") == queued
        )

    with ThreadPoolExecutor(max_workers=clients) as pool:
        try:
            # One at a time, each seen by the server before the next: two go to the worker
            # (held at the gate), two fill the queue; the rest find it full.
            futures = []
            for i in range(clients):
                futures.append(pool.submit(one, i))
                if i < accepted:
                    wait_until(
                        lambda n=i + 1: holds(scrape(base), inflight=n, queued=max(0, n - 2)),
                        30.0,
                        f"{i + 1} requests in the server",
                    )
            refused = [f.result(timeout=60) for f in futures[accepted:]]
            m = scrape(base)
            assert m.get("unimodel_queue_depth", model="slow") == 2
            assert m.get("unimodel_inflight_requests", model="slow") == accepted
        finally:
            gate.touch()
        statuses = Counter(refused + [f.result(timeout=60) for f in futures[:accepted]])

    assert refused == [429] * (clients - accepted), refused
    assert statuses == {200: accepted, 429: clients - accepted}, statuses
    m = scrape(base)
    req = {"model": "slow", "version": "1", "protocol": "rest"}
    assert m.get("unimodel_queue_rejections_total", model="slow") == statuses[429]
    assert m.get("unimodel_requests_total", **req, outcome="queue_full") == statuses[429]
    assert m.get("unimodel_requests_total", **req, outcome="success") == statuses[200]
    assert m.get("unimodel_queue_depth", model="slow") == 0
    assert m.get("unimodel_inflight_requests", model="slow") == 0


def test_killed_worker_counts_a_crash_a_restart_and_a_worker_error(start_server, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    server = start_server(plugin("crash_pair.py"), "--set", f"marker_dir={markers}")
    pid = int(decode(infer_json(server, "victim", x_input(0.0))).outputs["pid"][0])
    before = scrape(server.base_url)
    assert before.get("unimodel_worker_starts_total", model="victim") == 1

    answer: dict = {}

    def in_flight():
        answer["resp"] = infer_json(server, "victim", x_input(60.0), timeout=(5.0, 90.0))

    thread = threading.Thread(target=in_flight, daemon=True)
    thread.start()
    wait_until(lambda: (markers / str(pid)).exists(), 30.0, "the victim's predict")
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=30.0)
    assert not thread.is_alive(), "the request on the killed worker was never answered"
    error_of(answer["resp"], 503)
    server.wait_model_state("victim", "READY", 30.0)

    def recovered():
        m = scrape(server.base_url)
        return m if m.get("unimodel_worker_instances", model="victim", state="ready") == 1 else None

    after = wait_until(recovered, 10.0, "the victim's instance gauge back at ready")
    assert delta(before, after, "unimodel_worker_crashes_total", model="victim") == 1
    assert delta(before, after, "unimodel_worker_restarts_total", model="victim") == 1
    assert delta(before, after, "unimodel_worker_starts_total", model="victim") == 1
    for state in ("starting", "restarting", "failed", "stopped"):
        assert after.get("unimodel_worker_instances", model="victim", state=state) == 0, state
    req = {"model": "victim", "version": "1", "protocol": "rest"}
    assert delta(before, after, "unimodel_requests_total", **req, outcome="worker_error") == 1
    # The other model's worker was not touched.
    assert after.get("unimodel_worker_crashes_total", model="bystander") == 0
    assert after.get("unimodel_worker_restarts_total", model="bystander") == 0


def test_hung_predict_counts_an_execution_timeout(start_server):
    server = start_server(
        plugin("hang.py"), "--execution-timeout-ms", "1000", "--request-timeout-ms", "60000"
    )
    before = scrape(server.base_url)
    resp = infer_json(server, "hang", x_input(1.0), timeout=(5.0, 60.0))
    assert resp.status_code == 503, resp.text
    after = wait_until(
        lambda: (m := scrape(server.base_url)).get("unimodel_worker_restarts_total", model="hang")
        == 1
        and m,
        30.0,
        "the hung worker's restart",
    )
    assert delta(before, after, "unimodel_execution_timeouts_total", model="hang") == 1
    assert delta(before, after, "unimodel_worker_crashes_total", model="hang") == 1
    req = {"model": "hang", "version": "1", "protocol": "rest"}
    assert delta(before, after, "unimodel_requests_total", **req, outcome="worker_error") == 1


def test_setup_that_keeps_failing_shows_a_failed_instance(start_server):
    server = start_server(plugin("failing_setup.py"), wait=("broken", "FAILED"))

    def failed():
        m = scrape(server.base_url)
        return (
            m if m.get("unimodel_worker_instances", model="broken", state="failed") == 1 else None
        )

    m = wait_until(failed, 10.0, "the failed instance in the metrics")
    # Three setups (the default --max-setup-failures policy), each one a crash; two retries.
    assert m.get("unimodel_worker_starts_total", model="broken") == 3
    assert m.get("unimodel_worker_crashes_total", model="broken") == 3
    assert m.get("unimodel_worker_restarts_total", model="broken") == 2
    error_of(infer_json(server, "broken", x_input(1.0)), 503)
    after = scrape(server.base_url)
    req = {"model": "broken", "version": "1", "protocol": "rest"}
    assert after.get("unimodel_requests_total", **req, outcome="unavailable") == 1


def test_promtool_accepts_the_metrics_output(start_server):
    server = start_server(plugin("raiser.py"))
    decode(infer_json(server, "raiser", x_input(1.0)))
    error_of(infer_json(server, "raiser", x_input(-1.0)), 500)
    text = scrape(server.base_url).text
    result = subprocess.run(
        [promtool(), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_metrics_port_serves_the_same_metrics(start_server):
    port = free_port()
    server = start_server(plugin("raiser.py"), "--metrics-port", str(port))
    side = f"http://127.0.0.1:{port}"
    decode(infer_json(server, "raiser", x_input(1.0)))
    main, other = scrape(server.base_url), scrape(side)
    assert main.families == other.families
    req = {"model": "raiser", "version": "1", "protocol": "rest", "outcome": "success"}
    assert other.get("unimodel_requests_total", **req) == 1
    # Only /metrics lives there.
    assert requests.get(side + "/v2/health/ready", timeout=(5.0, 30.0)).status_code == 404


def test_alert_rules_pass_promtool_check_and_their_unit_tests():
    for args in (["check", "rules", str(ALERTS)], ["test", "rules", str(ALERT_TESTS)]):
        result = subprocess.run(
            [promtool(), *args], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
        )
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"
        assert "SUCCESS" in result.stdout, result.stdout


def dashboard_queries(node) -> list[str]:
    """Every PromQL string of the dashboard: panel targets and templating queries."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            # A templating variable's query is a string in some Grafana versions.
            promql_key = key in ("expr", "definition") or key == "query"
            if promql_key and isinstance(value, str):
                found.append(value)
            else:
                found.extend(dashboard_queries(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(dashboard_queries(item))
    return found


def test_dashboard_and_alerts_name_only_exported_metrics(start_server):
    server = start_server(plugin("raiser.py"))
    # Request-level series appear with the first request.
    decode(infer_json(server, "raiser", x_input(1.0)))
    m = scrape(server.base_url)
    exported = m.names() | set(m.families)

    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert "model" in variables, variables
    targets = [
        t["expr"]
        for p in dashboard["panels"]
        if p.get("type") != "row"
        for t in p.get("targets", [])
    ]
    assert targets
    for expr in targets:
        assert METRIC_NAME.search(expr), f"dashboard query without a unimodel metric: {expr}"
        assert "$model" in expr, f"dashboard query not filtered by the model variable: {expr}"
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("throughput", "p50", "p99", "queue depth", "batch size", "restarts"):
        assert topic in titles, f"no dashboard panel about {topic}: {titles}"

    used = {
        "dashboard": {n for q in dashboard_queries(dashboard) for n in METRIC_NAME.findall(q)},
        "alerts": set(METRIC_NAME.findall(ALERTS.read_text())),
    }
    # A histogram family (declared even before its first sample) exports these series.
    exported |= {f + s for f, kind in m.families.items() if kind == "histogram" for s in HIST}
    for source, names in used.items():
        assert names, source
        unknown = sorted(names - exported)
        assert not unknown, f"{source} names metrics the server does not export: {unknown}"
