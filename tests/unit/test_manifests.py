"""The deployment files agree with the code: a renamed variable or port fails here, not in production.

Checks the Dockerfile (textually: no Docker engine is needed), deploy/compose.yaml and every
manifest under deploy/k8s/: they parse, carry the required fields, use one image, listen on the
ports the code defaults to, set only environment variables the code reads, and probe the gRPC
health service on the right ports.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from aqimodels.server.config import ServerConfig
from aqimodels.process.metrics import REGISTRY_METRICS_PORT, WORKER_METRICS_PORT
from aqimodels.training.servicer import WorkerConfig

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
REGISTRY_PORT = ServerConfig().port
WORKER_PORT = WorkerConfig(tracking_uri="sqlite://").port
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"aqimodels:{VERSION}"
ENV_NAME = re.compile(r"\b((?:AQIMODELS|MLFLOW)_[A-Z0-9_]*[A-Z0-9])\b")
# variables of MLflow's own server (not of aqimodels' code), allowed in the mlflow service only
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION"}


def code_env_names() -> set[str]:
    """Every AQIMODELS_* / MLFLOW_* name the processes read (quoted in their configuration code)."""
    names: set[str] = set()
    for rel in ("server/config.py", "process/settings.py", "server/main.py", "training/main.py", "client/cli.py"):
        names |= set(re.findall(r"\"((?:AQIMODELS|MLFLOW)_[A-Z_]+)\"", (ROOT / rel).read_text()))
    return names


def k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path, doc))
    return docs


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in k8s_docs() if d["kind"] == kind}


# Services on images of their own (their environment is theirs, not ours).
THIRD_PARTY = frozenset({"postgres", "prometheus", "grafana"})


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())  # type: ignore[no-any-return]


def container(deployment: str) -> dict[str, Any]:
    containers = by_kind("Deployment")[deployment]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]  # type: ignore[no-any-return]


def container_env(c: dict[str, Any]) -> dict[str, Any]:
    """The container's environment: its ConfigMaps' data, then its own env entries."""
    configmaps = by_kind("ConfigMap")
    env: dict[str, Any] = {}
    for source in c.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]]["data"])
    for entry in c.get("env", []):
        env[entry["name"]] = entry.get("value", entry.get("valueFrom"))
    return env


def ports(c: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c["ports"]}


# ---- k8s ----

def test_every_manifest_parses_with_the_required_fields() -> None:
    docs = k8s_docs()
    assert {d["kind"] for _, d in docs} >= {"Namespace", "ConfigMap", "Deployment", "Service"}
    for path, doc in docs:
        for key in ("apiVersion", "kind", "metadata"):
            assert key in doc, f"{path.name}: {doc.get('kind')} lacks {key}"
        assert doc["metadata"].get("name"), f"{path.name}: a {doc['kind']} without a name"
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "aqimodels", f"{path.name}: {doc['metadata']['name']}"
    for name, dep in by_kind("Deployment").items():
        spec = dep["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items(), name
        assert spec["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_one_image_everywhere() -> None:
    images = {c["image"] for d in by_kind("Deployment").values() for c in d["spec"]["template"]["spec"]["containers"]}
    services = compose()["services"]
    images |= {s["image"] for name, s in services.items() if name not in THIRD_PARTY}
    assert images == {IMAGE}
    assert f"docker build -t {IMAGE} ." in (ROOT / "Dockerfile").read_text()
    assert f"docker build -t {IMAGE} ." in (DEPLOY / "compose.yaml").read_text()


def test_registry_deployment_ports_replicas_and_resources() -> None:
    dep = by_kind("Deployment")["aqimodels-registry"]
    assert dep["spec"]["replicas"] == 2
    c = container("aqimodels-registry")
    assert c["command"] == ["aqimodels", "serve"]
    assert ports(c) == {"grpc": REGISTRY_PORT, "metrics": REGISTRY_METRICS_PORT}
    env = container_env(c)
    assert env["AQIMODELS_PORT"] == str(REGISTRY_PORT)
    assert env["AQIMODELS_METRICS_PORT"] == str(REGISTRY_METRICS_PORT)
    assert env["AQIMODELS_HOST"] == "0.0.0.0"
    assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(REGISTRY_METRICS_PORT)
    for c in (container("aqimodels-registry"), container("aqimodels-worker")):
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), c["name"]


def test_worker_deployment_and_its_headless_service_for_dns_discovery() -> None:
    c = container("aqimodels-worker")
    assert c["command"] == ["aqimodels", "worker"]
    assert ports(c) == {"grpc": WORKER_PORT, "metrics": WORKER_METRICS_PORT}
    env = container_env(c)
    assert env["AQIMODELS_WORKER_PORT"] == str(WORKER_PORT)
    assert env["AQIMODELS_WORKER_METRICS_PORT"] == str(WORKER_METRICS_PORT)
    svc = by_kind("Service")["aqimodels-worker"]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == by_kind("Deployment")["aqimodels-worker"]["spec"]["selector"]["matchLabels"]
    grpc_port = next(p for p in svc["spec"]["ports"] if p["name"] == "grpc")
    assert grpc_port["port"] == WORKER_PORT
    workers = container_env(container("aqimodels-registry"))["AQIMODELS_WORKERS"]
    ns = svc["metadata"]["namespace"]
    assert workers == f"dns:///aqimodels-worker.{ns}.svc.cluster.local:{WORKER_PORT}"


def test_services_target_named_container_ports() -> None:
    for name, svc in by_kind("Service").items():
        c = container(name)
        assert svc["spec"]["selector"] == by_kind("Deployment")[name]["spec"]["selector"]["matchLabels"]
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports(c), f"{name}: {p}"
            assert p["port"] == ports(c)[p["targetPort"]], f"{name}: {p}"


@pytest.mark.parametrize("deployment,port", [("aqimodels-registry", REGISTRY_PORT), ("aqimodels-worker", WORKER_PORT)])
def test_probes_ask_the_grpc_health_service_on_the_grpc_port(deployment: str, port: int) -> None:
    c = container(deployment)
    env = container_env(c)
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    for probe in ("readinessProbe", "livenessProbe"):
        spec = c[probe]
        if "grpc" in spec:  # the kubelet's own gRPC health check (plaintext ports only)
            assert spec["grpc"]["port"] == port
            assert "AQIMODELS_TLS_CERT" not in env, "a native grpc probe cannot check a TLS port"
            continue
        cmd = spec["exec"]["command"]
        assert cmd[0] == "aqimodels" and "health" in cmd, cmd
        # the registry is ready when its read model is warm (its own service name), alive as a process
        service = cmd[cmd.index("--service") + 1] if "--service" in cmd else ""
        ready = deployment == "aqimodels-registry" and probe == "readinessProbe"
        assert service == ("aqimodels.api.registry.v1.ModelRegistry" if ready else ""), cmd
        assert cmd[cmd.index("--target") + 1] == f"localhost:{port}"
        if "AQIMODELS_TLS_CERT" in env:
            ca = cmd[cmd.index("--ca-cert") + 1]
            assert any(ca.startswith(m + "/") for m in mounts), ca


@pytest.mark.parametrize("deployment", ["aqimodels-registry", "aqimodels-worker"])
def test_token_and_tls_files_come_from_mounted_secrets(deployment: str) -> None:
    dep = by_kind("Deployment")[deployment]
    c = container(deployment)
    env = container_env(c)
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    secret_mounts = {m["mountPath"]: volumes[m["name"]]["secret"]["secretName"]
                     for m in c["volumeMounts"] if "secret" in volumes[m["name"]]}
    files = {k: v for k, v in env.items() if k in ("AQIMODELS_TOKENS_FILE", "AQIMODELS_TLS_CERT", "AQIMODELS_TLS_KEY",
                                                     "AQIMODELS_WORKER_CA_CERT")}
    assert {"AQIMODELS_TOKENS_FILE", "AQIMODELS_TLS_CERT", "AQIMODELS_TLS_KEY"} <= set(files)
    for name, path in files.items():
        assert any(path.startswith(m + "/") for m in secret_mounts), f"{name}={path} is not on a Secret volume"
    if deployment == "aqimodels-registry":
        assert env["AQIMODELS_WORKER_TOKEN"] == {"secretKeyRef": {"name": "aqimodels-tokens", "key": "worker-token"}}


def test_every_environment_name_in_the_manifests_is_read_by_the_code() -> None:
    known = code_env_names()
    assert {"AQIMODELS_PORT", "AQIMODELS_METRICS_PORT", "AQIMODELS_WORKER_METRICS_PORT", "MLFLOW_TRACKING_URI",
            "AQIMODELS_TARGET"} <= known  # the grep itself works
    used: dict[str, str] = {}
    for name in ("aqimodels-registry", "aqimodels-worker"):
        for var in container_env(container(name)):
            used[var] = f"k8s {name}"
    for svc_name, svc in compose()["services"].items():
        for var in svc.get("environment", {}):
            if svc_name == "mlflow" and var in MLFLOW_SERVER_ENV:
                continue
            if svc_name not in THIRD_PARTY:
                used[var] = f"compose {svc_name}"
    # and every AQIMODELS_/MLFLOW_ name anywhere in the files, comments and Dockerfile included
    for path in [ROOT / "Dockerfile", DEPLOY / "compose.yaml", *sorted(K8S.glob("*.yaml"))]:
        for var in ENV_NAME.findall(path.read_text()):
            if var not in MLFLOW_SERVER_ENV:
                used.setdefault(var, path.name)
    unknown = {var: where for var, where in used.items() if var not in known}
    assert not unknown, f"environment variables the code does not read: {unknown}"


# ---- compose ----

def test_compose_stack_and_health_based_start_order() -> None:
    services = compose()["services"]
    assert set(services) >= {"postgres", "mlflow", "registry", "worker-1", "worker-2"}
    for name, svc in services.items():
        assert "healthcheck" in svc, name
    mlflow = services["mlflow"]
    assert str(mlflow["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]).lower() == "false"
    cmd = mlflow["command"]
    assert cmd[:2] == ["mlflow", "server"] and "--serve-artifacts" in cmd
    assert cmd[cmd.index("--backend-store-uri") + 1].startswith("postgresql+psycopg://")
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    registry = services["registry"]
    assert {k: v["condition"] for k, v in registry["depends_on"].items()} == {
        "mlflow": "service_healthy", "worker-1": "service_healthy", "worker-2": "service_healthy"}
    for w in ("worker-1", "worker-2"):
        assert services[w]["depends_on"]["mlflow"]["condition"] == "service_healthy"


def test_compose_ports_env_and_healthchecks_match_the_code() -> None:
    services = compose()["services"]
    reg = services["registry"]
    env = reg["environment"]
    assert env["AQIMODELS_PORT"] == str(REGISTRY_PORT)
    assert env["AQIMODELS_METRICS_PORT"] == str(REGISTRY_METRICS_PORT)
    assert env["AQIMODELS_WORKERS"] == f"worker-1:{WORKER_PORT},worker-2:{WORKER_PORT}"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert reg["command"] == ["aqimodels", "serve"]
    assert reg["healthcheck"]["test"][:4] == ["CMD", "aqimodels", "--target", f"127.0.0.1:{REGISTRY_PORT}"]
    assert reg["healthcheck"]["test"][-1] == "health"
    assert f"127.0.0.1:{REGISTRY_PORT}:{REGISTRY_PORT}" in reg["ports"]
    for w in ("worker-1", "worker-2"):
        svc = services[w]
        assert svc["command"] == ["aqimodels", "worker"]
        assert svc["environment"]["AQIMODELS_WORKER_PORT"] == str(WORKER_PORT)
        assert svc["environment"]["AQIMODELS_WORKER_METRICS_PORT"] == str(WORKER_METRICS_PORT)
        assert svc["healthcheck"]["test"][:4] == ["CMD", "aqimodels", "--target", f"127.0.0.1:{WORKER_PORT}"]
        assert svc["environment"]["AQIMODELS_TOKENS_FILE"] == "/run/secrets/tokens.toml"
        assert any(s["target"] == "/run/secrets/tokens.toml" for s in svc["secrets"])


# ---- Dockerfile (no Docker engine here: checked as text) ----

def _stages() -> list[list[str]]:
    stages: list[list[str]] = []
    for raw in (ROOT / "Dockerfile").read_text().replace("\\\n", " ").splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or (not stages and line.upper().startswith("ARG ")):
            continue  # (an ARG before the first FROM is what FROM lines may use)
        if line.upper().startswith("FROM "):
            stages.append([])
        assert stages, "the Dockerfile must start with FROM"
        stages[-1].append(line)
    return stages


def test_dockerfile_is_multi_stage_cpu_torch_non_root_with_healthcheck() -> None:
    stages = _stages()
    assert len(stages) >= 2
    assert re.match(r"FROM \S+ AS build$", stages[0][0], re.IGNORECASE)
    build = "\n".join(stages[0])
    assert "torch==2.13.0" in build and '--index-url "$TORCH_SOURCE"' in build
    assert "ARG TORCH_SOURCE=https://download.pytorch.org/whl/cpu" in build  # the default: PyTorch's CPU index
    assert "ARG BASE_IMAGE=python:3.11-slim" in (ROOT / "Dockerfile").read_text()
    final = stages[-1]
    text = "\n".join(final)
    assert "COPY --from=build" in text
    users = [line.split()[1] for line in final if line.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    for tool in ("gcc", "g++", "build-essential", "make ", "clang", "apt-get install", "pip install"):
        assert tool not in text, f"the final stage must not install build tools ({tool!r})"
    health = [line for line in final if line.upper().startswith("HEALTHCHECK")]
    assert health and '"aqimodels"' in health[0] and '"health"]' in health[0]
    exposed = {int(p) for line in final if line.upper().startswith("EXPOSE") for p in line.split()[1:]}
    assert {REGISTRY_PORT, WORKER_PORT, REGISTRY_METRICS_PORT, WORKER_METRICS_PORT} <= exposed
    assert "CMD [\"aqimodels\", \"serve\"]" in text


def test_the_image_build_context_holds_every_package_folder() -> None:
    """.dockerignore is an allow-list: a package folder missing from it builds an image that cannot start."""
    folders = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    allowed = {line[1:].strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    tops = {folder.split("/")[0] for folder in folders}
    assert tops <= allowed, f"missing from .dockerignore: {sorted(tops - allowed)}"
