"""The deployment files (issue 14, item 4), checked as far as this machine allows.

- The image: scripts/check-deploy.sh builds the Dockerfile's runtime stage from Debian packages
  (mmdebstrap, cached under ~/.cache/unimodel/deploy-rootfs keyed by what goes in), seeds
  /models with the examples as the chart's init container does, runs the image's command in it
  as PID 1, as the non-root user, on a read-only root, serves the doubler, and runs the
  image's HEALTHCHECK; then runs compose's node1, node2 and gateway commands in the image on
  real etcd and NATS (--cluster) and infers through the gateway. hadolint finds nothing in
  the Dockerfile; its COPY sources exist and survive .dockerignore. Every flag compose and
  the chart pass is one the binary takes.
- compose: valid against the compose spec (check-jsonschema's vendored schema), and wired:
  nodes advertise what they listen on, Prometheus scrapes the ports they serve metrics on,
  Grafana's provisioning finds the dashboard and Prometheus; promtool accepts the config.
- The Helm chart: rendered by Helm's own engine (helm-python-sdk binds the Helm Go SDK),
  every manifest valid against the Kubernetes schemas of the oldest and newest versions
  kubernetes-validate carries, selectors and ports consistent, bad values refused by
  values.schema.json, lint clean.

What is not run here, and not pretended: `docker build` (no Docker daemon), `docker compose
up`, `podman run` (the sandbox refuses it), a Kubernetes cluster. docs/cluster.md "Deployment".
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from umclient import REPO_ROOT, unimodel_bin

DEPLOY = REPO_ROOT / "deploy"
CHART = DEPLOY / "helm" / "unimodel"
COMPOSE = DEPLOY / "compose.yaml"
VENV_BIN = Path(sys.executable).parent
# Kubernetes versions the manifests must be valid for: the oldest and newest schemas bundled.
KUBE_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())
# The gauge the HorizontalPodAutoscaler scales on; check-deploy.sh asserts the node serves it.
QUEUE_DEPTH_METRIC = "unimodel_queue_depth"
ETCD = {"etcd": {"endpoints": ["http://etcd.infra:2379"]}}


def run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


# --- the image ---------------------------------------------------------------------------


def test_image_serves_as_non_root_on_a_read_only_root_and_runs_compose_s_cluster():
    assert os.geteuid() == 0, "check-deploy.sh needs root (mmdebstrap, chroot, unshare, mount)"
    assert shutil.which("mmdebstrap"), "install the Debian package mmdebstrap (scripts/test.sh)"
    # Cold (first run, or the package list changed): mmdebstrap fetches ~60 MB, about a minute.
    # No podman import (CI has no podman; where podman is installed it adds ~20 s).
    env = {**os.environ, "CHECK_DEPLOY_PODMAN": "0"}
    result = subprocess.run(
        ["bash", "scripts/check-deploy.sh", "--cluster", str(unimodel_bin())],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    # /models seeded as the chart's init container and compose's models-init do it.
    assert "copied doubler into /models" in out, out
    assert "server uid: 10001" in out, out
    assert '"data":[2.0,4.0,6.0]' in out, out
    assert "passes while serving" in out and "fails once stopped" in out, out
    # --cluster: compose's node1, node2 and gateway commands in the image, on real etcd/NATS.
    assert "registered in etcd: node1 node2" in out, out
    assert "cluster stopped cleanly" in out, out
    assert "image check passed" in out, out


def dockerignore_patterns() -> list[str]:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore drops `path` (its patterns here: plain paths and **/ prefixes)."""
    parts = Path(path).parts
    for pattern in patterns:
        if pattern.startswith("**/"):
            name = pattern[3:]
            if any(Path(p).match(name) for p in parts):
                return True
        elif any(Path(*parts[: i + 1]).match(pattern) for i in range(len(parts))):
            return True
    return False


def test_hadolint_finds_nothing_in_the_dockerfile():
    # hadolint also runs ShellCheck on every RUN.
    result = run([str(VENV_BIN / "hadolint"), "--no-color", "Dockerfile"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_copies_only_what_exists_and_the_build_context_keeps():
    text = re.sub(r"\\\n", " ", (REPO_ROOT / "Dockerfile").read_text())
    copies = [line.split()[1:] for line in text.splitlines() if line.startswith("COPY ")]
    sources = [s for args in copies if not args[0].startswith("--from") for s in args[:-1]]
    assert {"deploy/docker/healthcheck.py", "deploy/docker/seed-examples.sh"} <= set(sources)
    assert "python/unimodel" in sources
    patterns = dockerignore_patterns()
    for source in sources:
        assert (REPO_ROOT / source).exists(), f"the Dockerfile copies {source}, which is missing"
        assert not ignored(source, patterns), f".dockerignore drops {source}, which is copied"
    # The multi-GB build and virtualenv folders stay out of the build context.
    for heavy in ("target", "core/target", ".venv-test", ".git"):
        assert ignored(heavy, patterns), f"{heavy} would be sent to the Docker daemon"
    # What the release build embeds or reads, and the runtime's settings.
    assert "cargo build --release --locked -p unimodel" in text
    assert re.search(r"^USER 10001:10001$", text, re.M)
    assert 'ENTRYPOINT ["unimodel"]' in text
    assert re.search(r"^EXPOSE 8000 8001 8002$", text, re.M)


# --- compose -----------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def flag_values(args: list[str]) -> dict[str, str]:
    """`--name=value` items of a command list (the form compose and the chart use)."""
    return dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """A service's volumes (short syntax, SOURCE:TARGET[:MODE]) as {source: target}."""
    return dict(v.split(":")[:2] for v in service["volumes"])


def test_compose_file_follows_the_compose_spec():
    result = run(
        [
            str(VENV_BIN / "check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE),
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_wires_nodes_gateway_etcd_nats_and_monitoring():
    services = compose()["services"]
    assert {"etcd", "nats", "node1", "node2", "gateway", "prometheus", "grafana"} <= set(services)
    etcd_url = "http://etcd:2379"
    assert "--advertise-client-urls=http://etcd:2379" in services["etcd"]["command"]

    nodes = {name: s for name, s in services.items() if s.get("command", [None])[0] == "serve"}
    assert set(nodes) == {"node1", "node2"}
    metrics_targets = set()
    for name, node in nodes.items():
        flags = flag_values(node["command"])
        assert flags["etcd"] == etcd_url and flags["nats"] == "nats://nats:4222"
        assert flags["node-name"] == name
        # Each node advertises the address it listens on, by its compose service name.
        assert flags["advertise-url"] == f"http://{name}:{flags['port']}"
        assert flags["advertise-grpc-url"] == f"http://{name}:{flags['grpc-port']}"
        assert flags["host"] == "0.0.0.0"
        assert mounts(node)["models"] == flags["model-repository"] == "/models"
        assert node["depends_on"]["models-init"]["condition"] == "service_completed_successfully"
        metrics_targets.add(f"{name}:{flags['metrics-port']}")

    seed = " ".join(services["models-init"]["entrypoint"])
    assert "sh /usr/local/lib/unimodel/seed-examples.sh /models" in seed
    assert mounts(services["models-init"])["models"] == "/models"

    gateway = services["gateway"]
    gw_flags = flag_values(gateway["command"])
    assert gateway["command"][0] == "gateway" and gw_flags["etcd"] == etcd_url
    assert f"{gw_flags['port']}:{gw_flags['port']}" in gateway["ports"]
    assert f"{gw_flags['grpc-port']}:{gw_flags['grpc-port']}" in gateway["ports"]

    # Prometheus: the compose config with the shipped rules beside it, scraping what serves.
    prom_mounts = mounts(services["prometheus"])
    assert prom_mounts["./prometheus/alerts.yml"] == "/etc/prometheus/alerts.yml"
    assert prom_mounts["./prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {j["job_name"]: j["static_configs"][0]["targets"] for j in config["scrape_configs"]}
    assert set(jobs["unimodel-nodes"]) == metrics_targets
    assert jobs["unimodel-gateway"] == [f"gateway:{gw_flags['port']}"]

    # Grafana: provisioning mounted; the dashboard lies where the provider looks; the data
    # source is the compose Prometheus.
    graf_mounts = mounts(services["grafana"])
    assert graf_mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboard_at = Path(graf_mounts["./grafana/unimodel-dashboard.json"])
    prov = DEPLOY / "grafana" / "provisioning"
    (provider,) = yaml.safe_load((prov / "dashboards" / "unimodel.yaml").read_text())["providers"]
    assert dashboard_at.parent == Path(provider["options"]["path"])
    (source,) = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert "9090:9090" in services["prometheus"]["ports"]
    json.loads((DEPLOY / "grafana" / "unimodel-dashboard.json").read_text())


def test_promtool_accepts_the_compose_prometheus_config_and_its_rules():
    promtool = shutil.which("promtool")
    assert promtool, "install the Debian package prometheus (scripts/test.sh)"
    result = run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout, result.stdout


# --- the Helm chart ----------------------------------------------------------------------

EVERYTHING = {
    **ETCD,
    "nats": {"url": "nats://nats.infra:4222", "credsSecret": "nats-creds"},
    "auth": {"apiKeys": {"existingSecret": "keys"}, "jwtSecret": {"existingSecret": "jwt"}},
    "tls": {"existingSecret": "unimodel-tls", "nodes": True},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
    "node": {
        "gpu": {"count": 2},
        "autoscaling": {"enabled": True, "maxReplicas": 6},
        "modelRepository": {"existingClaim": "shared-models", "examples": False},
        "extraArgs": ["--model-control-mode=explicit", "--load-model=doubler"],
    },
    "gateway": {"service": {"type": "LoadBalancer"}},
}
SUBCHARTS = {"etcd": {"enabled": True}, "nats": {"enabled": True}}
# TLS where clients connect (the gateway) only: the default with a TLS Secret.
GATEWAY_TLS = {**ETCD, "tls": {"existingSecret": "unimodel-tls"}}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(str(CHART)) as chart:
        files = chart.render(values, name="demo", namespace="serving")
    docs = []
    for name, text in sorted(files.items()):
        if name.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def by_kind(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize(
    "values", [ETCD, EVERYTHING, SUBCHARTS], ids=["endpoints", "everything", "subcharts"]
)
def test_chart_renders_manifests_valid_for_kubernetes(values):
    docs = render(values)
    kinds = sorted(d["kind"] for d in docs)
    expected = ["Deployment", "PodDisruptionBudget", "PodDisruptionBudget"]
    expected += ["Service", "Service", "StatefulSet"]
    if values is EVERYTHING:
        expected += ["HorizontalPodAutoscaler", "ServiceMonitor", "ServiceMonitor"]
    assert kinds == sorted(expected)
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":
            continue  # a CRD: no bundled schema (its wiring is checked below)
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]


@pytest.mark.parametrize(
    "values", [ETCD, GATEWAY_TLS, EVERYTHING], ids=["endpoints", "gateway-tls", "everything"]
)
def test_chart_selectors_ports_probes_and_node_identity_fit_together(values):
    docs = render(values)
    objs = by_kind(docs)
    sts = objs[("StatefulSet", "demo-unimodel-node")]
    gw = objs[("Deployment", "demo-unimodel-gateway")]
    headless = objs[("Service", "demo-unimodel-node-headless")]
    gw_svc = objs[("Service", "demo-unimodel-gateway")]
    tls = values.get("tls", {})
    gateway_tls = bool(tls.get("existingSecret"))
    scheme = "https" if gateway_tls and tls.get("nodes") else "http"  # the nodes'

    workloads = [sts, gw]
    for w in workloads:
        tls_on = gateway_tls if w is gw else scheme == "https"
        (container,) = pod_spec(w)["containers"]
        assert ("--tls-cert-file=/etc/unimodel/tls/tls.crt" in container["args"]) == tls_on
        assert ("tls" in {m["name"] for m in container["volumeMounts"]}) == tls_on
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert matches(w["spec"]["selector"]["matchLabels"], labels)
        (container,) = pod_spec(w)["containers"]
        ports = {p["name"] for p in container["ports"]}
        assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        for probe in ("livenessProbe", "readinessProbe"):
            assert container[probe]["httpGet"]["port"] in ports
            assert container[probe]["httpGet"]["scheme"] == ("HTTPS" if tls_on else "HTTP")
        mounts = {m["name"] for m in container["volumeMounts"]}
        assert mounts <= {v["name"] for v in pod_spec(w)["volumes"]} | {"models"}
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        # The read-only root needs these writable (check-deploy.sh runs the image so too).
        scratch = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/var/cache/unimodel", "/tmp", "/home/unimodel"} <= scratch
        assert pod_spec(w)["securityContext"]["runAsUser"] == 10001

    # Services select their pods, name ports the containers have; the StatefulSet's DNS.
    for svc, w in ((headless, sts), (gw_svc, gw)):
        assert matches(svc["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
        (container,) = pod_spec(w)["containers"]
        names = {p["name"] for p in container["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= names
    assert headless["spec"]["clusterIP"] == "None"
    assert sts["spec"]["serviceName"] == headless["metadata"]["name"]

    (node,) = pod_spec(sts)["containers"]
    flags = flag_values(node["args"])
    assert node["args"][0] == "serve" and flags["etcd"] == "http://etcd.infra:2379"
    assert flags["node-name"] == "$(POD_NAME)"
    dns = f"$(POD_NAME).{headless['metadata']['name']}.$(POD_NAMESPACE).svc"
    assert flags["advertise-url"] == f"{scheme}://{dns}:{flags['port']}"
    assert flags["advertise-grpc-url"] == f"{scheme}://{dns}:{flags['grpc-port']}"
    env = {e["name"] for e in node["env"]}
    assert {"POD_NAME", "POD_NAMESPACE"} <= env
    (gateway,) = pod_spec(gw)["containers"]
    assert gateway["args"][0] == "gateway"
    assert flag_values(gateway["args"])["etcd"] == flags["etcd"]

    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        selected = [
            w
            for w in workloads
            if matches(
                pdb["spec"]["selector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"]
            )
        ]
        assert len(selected) == 1, pdb["metadata"]["name"]

    if values is EVERYTHING:
        assert node["resources"]["limits"]["nvidia.com/gpu"] == 2
        assert node["resources"]["requests"]["nvidia.com/gpu"] == 2
        assert "--nats=nats://nats.infra:4222" in node["args"]
        assert "--load-model=doubler" in node["args"]
        assert "replicas" not in sts["spec"], "the HPA owns the replica count"
        assert "volumeClaimTemplates" not in sts["spec"] and "initContainers" not in pod_spec(sts)
        hpa = objs[("HorizontalPodAutoscaler", "demo-unimodel-node")]
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("StatefulSet", sts["metadata"]["name"])
        (metric,) = hpa["spec"]["metrics"]
        assert metric["pods"]["metric"]["name"] == QUEUE_DEPTH_METRIC
        for sm in (d for d in docs if d["kind"] == "ServiceMonitor"):
            (svc,) = [
                s
                for s in (headless, gw_svc)
                if matches(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
            ]
            (endpoint,) = sm["spec"]["endpoints"]
            assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
            assert endpoint["scheme"] == "https" and sm["metadata"]["labels"]["release"] == "prom"
    else:
        assert "nvidia.com/gpu" not in json.dumps(node["resources"])
        assert not any(a.startswith("--nats") for a in node["args"])
        (claims,) = sts["spec"]["volumeClaimTemplates"]
        assert claims["metadata"]["name"] == "models"
        (init,) = pod_spec(sts)["initContainers"]
        assert init["command"] == ["sh", "/usr/local/lib/unimodel/seed-examples.sh", "/models"]


def test_chart_subcharts_supply_the_endpoints_when_enabled():
    (sts,) = [d for d in render(SUBCHARTS) if d["kind"] == "StatefulSet"]
    flags = flag_values(pod_spec(sts)["containers"][0]["args"])
    assert flags["etcd"] == "http://demo-etcd:2379" and flags["nats"] == "nats://demo-nats:4222"


def test_chart_without_etcd_fails_with_a_clear_message():
    with pytest.raises(helm.HelmRenderError, match=r"set etcd\.endpoints .* or etcd\.enabled=true"):
        render({})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"node": {"replica": 3}}, "additional properties 'replica' not allowed"),
        ({"etcd": {"endpoints": ["etcd:2379"]}}, "'etcd:2379' does not match pattern"),
        # The nodes' etcd client speaks plain http only (no TLS to etcd yet).
        (
            {"etcd": {"endpoints": ["https://etcd:2379"]}},
            "'https://etcd:2379' does not match pattern",
        ),
        ({"node": {"gpu": {"count": -1}}}, "/node/gpu/count"),
        ({"nats": {"url": "http://nats:4222"}}, "/nats/url"),
    ],
    ids=[
        "misspelt-key",
        "endpoint-without-scheme",
        "endpoint-https",
        "negative-gpus",
        "nats-url-scheme",
    ],
)
def test_chart_refuses_bad_values_naming_them(values, message):
    # values.schema.json: Helm checks it on install, upgrade, template and lint.
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render({**ETCD, **values} if "etcd" not in values else values)


def test_chart_lints_clean():
    report = helm.lint(str(CHART), ETCD)
    problems = [m["error"] for m in report["messages"] if m["severity"] >= 2]
    # The optional subcharts are fetched by `helm dependency build`, which needs their
    # repositories (not reachable here); lint says so and nothing else.
    assert problems == ["chart directory is missing these dependencies: etcd,nats"], report
    assert helm.lint(str(CHART), EVERYTHING)["messages"] == report["messages"]


def help_flags(command: str) -> set[str]:
    result = run([str(unimodel_bin()), command, "--help"])
    assert result.returncode == 0, result.stdout + result.stderr
    return set(re.findall(r"(?m)^\s+(?:-\w, )?(--[a-z0-9-]+)", result.stdout))


def test_every_flag_compose_and_the_chart_pass_is_one_the_binary_takes():
    serve, gateway = help_flags("serve"), help_flags("gateway")
    services = compose()["services"]
    used = {"serve": set(), "gateway": set()}
    for service in services.values():
        command = service.get("command") or []
        if command and command[0] in used:
            used[command[0]] |= {a.split("=", 1)[0] for a in command[1:]}
    for doc in render(EVERYTHING):
        if doc["kind"] in ("StatefulSet", "Deployment"):
            (container,) = pod_spec(doc)["containers"]
            args = container["args"]
            used[args[0]] |= {a.split("=", 1)[0] for a in args[1:]}
    assert used["serve"] - serve == set(), "flags `unimodel serve` does not take"
    assert used["gateway"] - gateway == set(), "flags `unimodel gateway` does not take"
    assert {"--etcd", "--nats", "--node-name", "--advertise-url"} <= used["serve"]
