"""The Kubernetes manifests in deploy/kubernetes: a hardened, monitoring-only exporter DaemonSet on
GPU nodes, and a Service and ServiceMonitor that scrape it, with names and labels that agree."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

try:
    import yaml
except ImportError:
    if os.environ.get("CI"):
        raise  # CI must install PyYAML with the test dependencies
    pytest.skip("PyYAML not installed", allow_module_level=True)

from wattwarden.cli import build_parser
from wattwarden.config import DEFAULT_PORT, parse_listen

K8S_DIR = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
NAMESPACE = "wattwarden"
STATE_DIR = "/var/lib/wattwarden"


def load_all() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def one(kind: str) -> dict[str, Any]:
    (doc,) = [d for d in load_all() if d["kind"] == kind]
    return doc


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = one("DaemonSet")["spec"]["template"]["spec"]
    return spec


def container() -> dict[str, Any]:
    (c,) = pod_spec()["containers"]
    return dict(c)


def test_every_namespaced_object_is_in_the_wattwarden_namespace() -> None:
    docs = load_all()
    assert {d["kind"] for d in docs} == {
        "Namespace",
        "ServiceAccount",
        "DaemonSet",
        "Service",
        "ServiceMonitor",
    }
    assert one("Namespace")["metadata"]["name"] == NAMESPACE
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == NAMESPACE, d["kind"]


def test_kustomization_lists_exactly_the_manifests() -> None:
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    files = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    assert kustomization["images"] == [{"name": "wattwarden", "newTag": "0.1.0"}]


def test_daemonset_runs_only_on_gpu_nodes_with_the_nvidia_runtime() -> None:
    spec = pod_spec()
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["runtimeClassName"] == "nvidia"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    env = {e["name"]: e.get("value") for e in container()["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "utility"
    # It sees the GPUs without requesting (reserving) any of them.
    assert "nvidia.com/gpu" not in str(container()["resources"])


def test_exporter_pod_is_non_root_read_only_without_capabilities() -> None:
    spec, c = pod_spec(), container()
    pod_sc, sc = spec["securityContext"], c["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and sc["runAsNonRoot"] is True
    assert pod_sc["runAsUser"] != 0
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc.get("privileged", False) is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(key, False), key
    # Restricted Pod Security Standard: no hostPath volumes; the namespace enforces it.
    assert all("hostPath" not in v for v in spec["volumes"])
    labels = one("Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_exporter_has_no_kubernetes_api_token() -> None:
    sa = one("ServiceAccount")
    assert pod_spec()["serviceAccountName"] == sa["metadata"]["name"]
    assert sa["automountServiceAccountToken"] is False
    assert pod_spec()["automountServiceAccountToken"] is False


def test_exporter_args_listen_on_all_addresses_keep_state_on_a_volume_and_never_apply() -> None:
    c = container()
    args = build_parser().parse_args(["agent", *c["args"]])
    assert parse_listen(args.listen) == ("0.0.0.0", DEFAULT_PORT)
    assert str(args.state_dir) == STATE_DIR
    assert not args.apply
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    assert "emptyDir" in volumes[mounts[STATE_DIR]]
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_probes_check_healthz_on_the_metrics_port() -> None:
    c = container()
    (port,) = c["ports"]
    assert port == {"name": "metrics", "containerPort": DEFAULT_PORT, "protocol": "TCP"}
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}, probe


def test_exporter_has_resource_requests_and_limits() -> None:
    resources = container()["resources"]
    assert set(resources["requests"]) == {"cpu", "memory"}
    assert set(resources["limits"]) == {"cpu", "memory"}


def test_service_and_servicemonitor_select_the_daemonset_pods_by_the_metrics_port() -> None:
    ds, svc, mon = one("DaemonSet"), one("Service"), one("ServiceMonitor")
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    selector = ds["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert mon["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (svc_port,) = svc["spec"]["ports"]
    assert svc_port["name"] == "metrics" and svc_port["targetPort"] == "metrics"
    assert svc_port["port"] == DEFAULT_PORT
    assert svc["spec"]["clusterIP"] == "None"
    (endpoint,) = mon["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    # Scrape interval == the agent's default export window (window_s = 15).
    assert endpoint["interval"] == "15s"


def test_dockerfile_builds_a_non_root_agent_image_from_python_3_11_slim() -> None:
    text = (K8S_DIR / "Dockerfile").read_text()
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["python:3.11-slim", "python:3.11-slim"]
    (user,) = re.findall(r"^USER (\S+)", text, re.M)
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) == pod_spec()["securityContext"]["runAsUser"]
    assert re.search(r'^ENTRYPOINT \["wattwarden", "agent"\]$', text, re.M)
    assert f"EXPOSE {DEFAULT_PORT}" in text


def test_kubectl_kustomize_renders_the_manifests() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (optional: the other tests parse the files)")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S_DIR)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(result.stdout) if d)
    assert kinds == sorted(d["kind"] for d in load_all())
    images = [
        c["image"]
        for d in yaml.safe_load_all(result.stdout)
        if d and d["kind"] == "DaemonSet"
        for c in d["spec"]["template"]["spec"]["containers"]
    ]
    assert images == ["wattwarden:0.1.0"]
