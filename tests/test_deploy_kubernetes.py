"""The Kubernetes manifests in deploy/kubernetes: a hardened, monitoring-only exporter DaemonSet on
GPU nodes, and a Service and ServiceMonitor that scrape it, with names and labels that agree; and
the fleet controller's Deployment, hardened too, with the RBAC it needs (reading pods, evicting
them) and nothing more."""

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


EXPORTER = "wattwarden-exporter"
CONTROLLER = "wattwarden-controller"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    """The one object of this kind (and name, where several share the kind)."""
    (doc,) = [
        d
        for d in load_all()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
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
        "Deployment",
        "Service",
        "ServiceMonitor",
        "ClusterRole",
        "ClusterRoleBinding",
    }
    assert one("Namespace")["metadata"]["name"] == NAMESPACE
    for d in docs:
        if d["kind"] not in CLUSTER_SCOPED:
            assert d["metadata"]["namespace"] == NAMESPACE, d["kind"]
        else:
            assert "namespace" not in d["metadata"], d["kind"]


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


def assert_restricted(spec: dict[str, Any], c: dict[str, Any]) -> None:
    """A pod and its container as the restricted Pod Security Standard wants them: not root,
    read-only root file system, RuntimeDefault seccomp, no escalation, every capability dropped.
    """
    pod_sc, sc = spec["securityContext"], c["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and sc["runAsNonRoot"] is True
    assert pod_sc["runAsUser"] != 0
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc.get("privileged", False) is False
    assert sc["capabilities"] == {"drop": ["ALL"]}


def test_exporter_pod_is_non_root_read_only_without_capabilities() -> None:
    spec, c = pod_spec(), container()
    assert_restricted(spec, c)
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(key, False), key
    # Restricted Pod Security Standard: no hostPath volumes; the namespace enforces it.
    assert all("hostPath" not in v for v in spec["volumes"])
    labels = one("Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_exporter_has_no_kubernetes_api_token() -> None:
    sa = one("ServiceAccount", EXPORTER)
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
    ds, svc, mon = one("DaemonSet"), one("Service", EXPORTER), one("ServiceMonitor", EXPORTER)
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
        if d and d["kind"] in ("DaemonSet", "Deployment")
        for c in d["spec"]["template"]["spec"]["containers"]
    ]
    assert images == ["wattwarden:0.1.0", "wattwarden:0.1.0"]


# ------------------------------------------------------------------ the fleet controller
CONTROLLER_PORT = 9768  # the controller's default --listen port
TOKEN_DIR = "/etc/wattwarden/agent-tokens"


def controller_pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = one("Deployment", CONTROLLER)["spec"]["template"]["spec"]
    return spec


def controller_container() -> dict[str, Any]:
    (c,) = controller_pod_spec()["containers"]
    return dict(c)


def test_controller_rbac_is_exactly_reading_pods_and_creating_evictions() -> None:
    role = one("ClusterRole", CONTROLLER)
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert granted == {
        ("", "pods", "get"),
        ("", "pods", "list"),
        ("", "pods/eviction", "create"),
    }
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}  # no resourceNames, no URLs
    assert "aggregationRule" not in role


def test_controller_role_is_bound_to_its_service_account_only() -> None:
    binding = one("ClusterRoleBinding", CONTROLLER)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": CONTROLLER,
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": CONTROLLER, "namespace": NAMESPACE}
    ]
    sa = one("ServiceAccount", CONTROLLER)
    assert controller_pod_spec()["serviceAccountName"] == sa["metadata"]["name"]
    # Not mounted by default for the account; the controller's pod asks for it (Eviction API).
    assert sa["automountServiceAccountToken"] is False
    assert controller_pod_spec()["automountServiceAccountToken"] is True
    # The exporter's account has no binding at all.
    bound = {s["name"] for d in load_all() if "Binding" in d["kind"] for s in d["subjects"]}
    assert bound == {CONTROLLER}


def test_controller_is_one_replica_replaced_with_recreate() -> None:
    deployment = one("Deployment", CONTROLLER)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    text = (K8S_DIR / "controller-deployment.yaml").read_text()
    assert "Recreate" in text and "409" in text  # the comment says why a second is harmless


def test_controller_pod_is_non_root_read_only_without_capabilities() -> None:
    spec, c = controller_pod_spec(), controller_container()
    assert_restricted(spec, c)
    for key in ("hostNetwork", "hostPID", "hostIPC", "runtimeClassName", "nodeSelector"):
        assert not spec.get(key), key  # no GPU, no host: it runs anywhere
    assert all("hostPath" not in v for v in spec["volumes"])
    assert "nvidia.com/gpu" not in str(c["resources"])


def test_controller_reads_agent_tokens_from_a_secret_mounted_read_only() -> None:
    c, volumes = controller_container(), {v["name"]: v for v in controller_pod_spec()["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    tokens = mounts[TOKEN_DIR]
    assert tokens["readOnly"] is True
    secret = volumes[tokens["name"]]["secret"]
    assert secret["secretName"] == "wattwarden-agent-tokens"
    assert secret["defaultMode"] == 0o440  # owner and fsGroup only
    assert controller_pod_spec()["securityContext"]["fsGroup"] == 65532
    assert f"--token-dir={TOKEN_DIR}" in c["args"]
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]


def test_controller_probes_healthz_on_its_metrics_port_and_has_resources() -> None:
    c = controller_container()
    (port,) = c["ports"]
    assert port == {"name": "metrics", "containerPort": CONTROLLER_PORT, "protocol": "TCP"}
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}, probe
    assert set(c["resources"]["requests"]) == {"cpu", "memory"}
    assert set(c["resources"]["limits"]) == {"cpu", "memory"}


def test_controller_runs_the_controller_command_in_dry_run_with_apply_as_the_next_step() -> None:
    c = controller_container()
    assert c["command"] == ["wattwarden", "controller"]  # the image's entrypoint is the agent
    assert c["image"] == one("DaemonSet")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert "--apply" not in c["args"]
    text = (K8S_DIR / "controller-deployment.yaml").read_text()
    assert re.search(r"^\s*# - --apply$", text, re.M), "--apply, commented, as the next step"
    flags = {a.split("=", 1)[0] for a in c["args"]}
    assert {"--prometheus", "--budget-watts", "--scheduler", "--id", "--listen"} <= flags


def test_controller_args_parse_with_the_cli() -> None:
    c = controller_container()
    args = build_parser().parse_args(["controller", *c["args"]])
    assert args.command == "controller"
    assert not args.apply
    assert args.budget_watts > 0
    assert args.scheduler == "kubernetes"
    assert args.prometheus.startswith("http://")
    assert parse_listen(args.listen) == ("0.0.0.0", CONTROLLER_PORT)
    assert str(args.token_dir) == TOKEN_DIR
    # A fixed id: the pod's name, the default, changes with every pod, and only the same id
    # takes over its own live leases at once.
    assert args.id == CONTROLLER
    applied = build_parser().parse_args(["controller", *c["args"], "--apply"])
    assert applied.apply


def test_controller_service_and_servicemonitor_scrape_it_as_wattwarden_controller() -> None:
    deployment = one("Deployment", CONTROLLER)
    svc, mon = one("Service", CONTROLLER), one("ServiceMonitor", CONTROLLER)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    # Neither selects the other's pods.
    exporter_labels = one("DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert not svc["spec"]["selector"].items() <= exporter_labels.items()
    assert not one("Service", EXPORTER)["spec"]["selector"].items() <= pod_labels.items()
    (svc_port,) = svc["spec"]["ports"]
    assert svc_port == {
        "name": "metrics",
        "port": CONTROLLER_PORT,
        "targetPort": "metrics",
        "protocol": "TCP",
    }
    (endpoint,) = mon["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert endpoint["honorLabels"] is True  # node_budget_watts{instance} keeps the node's name
    assert {"targetLabel": "job", "replacement": CONTROLLER, "action": "replace"} in endpoint[
        "relabelings"
    ]
