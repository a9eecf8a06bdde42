"""Moving a job off a node, through the scheduler that owns it: Kubernetes or Slurm.

The controller never moves a job itself: it asks the job's scheduler to take it off its node and
place it again elsewhere, and reports what the scheduler said.

- Kubernetes: the Eviction API (``POST .../pods/NAME/eviction`` with a ``policy/v1``
  ``Eviction``), which honours PodDisruptionBudgets: the API answers 429 when evicting the pod
  would violate one, and the pod stays (``refused``). Its controller (a Deployment, a Job, a
  training operator) recreates the pod, and the Kubernetes scheduler places it anew. The API is
  the pod's own (its service account) or, for a controller outside the cluster, the URL, token
  file and CA bundle it is given.
- Slurm: ``scontrol requeue JOBID`` ends the job and puts it back in the queue, so that it starts
  again (from its checkpoint) where Slurm has room.

A job names its scheduler in its agent record (``"scheduler": {"kind", "id"}``); an id that is
not well formed is ``failed`` before anything is called.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import ssl
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from wattwarden.config import ConfigError
from wattwarden.fleet.config import read_secret
from wattwarden.fleet.leases import one_line

MOVE_RESULTS = ("requested", "refused", "failed")
"""Every value of :attr:`MoveResult.result`, in the order metrics list them."""

SERVICE_HOST_ENV = "KUBERNETES_SERVICE_HOST"
SERVICE_PORT_ENV = "KUBERNETES_SERVICE_PORT"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
"""Where Kubernetes mounts a pod's service-account credentials."""
SERVICE_ACCOUNT_TOKEN = "token"
SERVICE_ACCOUNT_CA = "ca.crt"
EVICTION_PATH = "/api/v1/namespaces/{namespace}/pods/{pod}/eviction"

DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
"""A namespace's name (RFC 1123 label: at most 63 characters)."""
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
"""A pod's name (RFC 1123 subdomain: at most 253 characters)."""
SLURM_JOB_ID = re.compile(r"[0-9]{1,19}(_[0-9]{1,19})?")
"""A Slurm job id, or an array task's ``JOBID_TASKID`` (these patterns are for fullmatch)."""


@dataclass(frozen=True, slots=True)
class JobRef:
    """A job the controller may move: where it runs and who schedules it."""

    instance: str
    """The agent (``HOST:PORT``) whose node runs it."""
    name: str
    priority: str
    kind: str
    """The scheduler's kind: ``kubernetes`` or ``slurm`` (from the job's ``scheduler``)."""
    id: str
    """``NAMESPACE/POD`` for Kubernetes, ``JOBID`` for Slurm."""

    @classmethod
    def from_record(cls, instance: str, record: Mapping[str, Any]) -> JobRef | None:
        """The job of an agent's job record; None when it names no scheduler (or is malformed)."""
        scheduler = record.get("scheduler")
        if not isinstance(scheduler, Mapping):
            return None
        kind, job_id = scheduler.get("kind"), scheduler.get("id")
        name, priority = record.get("name"), record.get("priority", "normal")
        if not all(isinstance(v, str) for v in (kind, job_id, name, priority)):
            return None
        return cls(instance, str(name), str(priority), str(kind), str(job_id))


@dataclass(frozen=True, slots=True)
class MoveResult:
    """What the scheduler said to a move."""

    result: str
    """``requested`` (it will move), ``refused`` (it said no, by policy), ``failed``."""
    message: str
    """One line."""


class Scheduler(Protocol):
    """Moves a job off its node: what the controller needs of Kubernetes or Slurm."""

    name: str

    def move(self, job: JobRef) -> MoveResult:
        """Ask for ``job`` to be moved; the answer, never an exception."""
        ...


def _wrong_kind(job: JobRef, name: str) -> MoveResult | None:
    if job.kind == name:
        return None
    return MoveResult("failed", f"job {job.name!r} is scheduled by {job.kind!r}, not {name}")


# ------------------------------------------------------------------------------ Kubernetes
class KubernetesScheduler:
    """Evictions through the Kubernetes API (honouring PodDisruptionBudgets).

    The bearer token is read from ``token_file`` at each move (the kubelet rotates projected
    service-account tokens in place). Needs RBAC ``create`` on ``pods/eviction``.
    """

    name = "kubernetes"

    def __init__(
        self,
        api_url: str,
        *,
        token_file: str | None,
        ca_file: str | None,
        timeout_s: float = 5.0,
    ) -> None:
        parts = urlsplit(api_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"Kubernetes API URL must be http(s)://HOST[:PORT], got {api_url!r}")
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(f"Kubernetes API URL {api_url!r} has a bad port") from None
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ConfigError(f"Kubernetes API timeout must be above 0, got {timeout_s}")
        self.api_url = api_url.rstrip("/")
        self._host = parts.hostname
        self._port = port
        self._prefix = parts.path.rstrip("/")
        self.token_file = token_file
        self.timeout_s = timeout_s
        self._context: ssl.SSLContext | None = None
        if parts.scheme == "https":
            try:
                self._context = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(f"Kubernetes CA file {ca_file}: cannot load it: {e}") from None

    @classmethod
    def in_cluster(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        service_account_dir: str = SERVICE_ACCOUNT_DIR,
        timeout_s: float = 5.0,
    ) -> KubernetesScheduler:
        """The API server as a pod sees it.

        ``$KUBERNETES_SERVICE_HOST`` and ``$KUBERNETES_SERVICE_PORT``, and the service
        account's token and CA; ConfigError naming what is missing.
        """
        env = os.environ if environ is None else environ
        host, port = env.get(SERVICE_HOST_ENV), env.get(SERVICE_PORT_ENV)
        if not host or not port:
            missing = SERVICE_HOST_ENV if not host else SERVICE_PORT_ENV
            raise ConfigError(
                f"--scheduler kubernetes: ${missing} is not set (outside a pod, give "
                "--kubernetes-api and --kubernetes-token-file)"
            )
        sa = Path(service_account_dir)
        token, ca = sa / SERVICE_ACCOUNT_TOKEN, sa / SERVICE_ACCOUNT_CA
        for path in (token, ca):
            if not path.is_file():
                raise ConfigError(
                    f"--scheduler kubernetes: {path} is missing (is a service account mounted?)"
                )
        netloc = f"[{host}]" if ":" in host else host
        return cls(
            f"https://{netloc}:{port}", token_file=str(token), ca_file=str(ca), timeout_s=timeout_s
        )

    def __repr__(self) -> str:
        return f"KubernetesScheduler({self.api_url!r})"

    def move(self, job: JobRef) -> MoveResult:
        """Evict ``job``'s pod; the answer, never an exception.

        200/201: requested; 429: refused (a PodDisruptionBudget would be violated); 404: failed
        (the pod is gone); anything else: failed with the status and the API's message.
        """
        wrong = _wrong_kind(job, self.name)
        if wrong is not None:
            return wrong
        namespace, slash, pod = job.id.partition("/")
        if not slash or not DNS1123_LABEL.fullmatch(namespace):
            return MoveResult("failed", f"job {job.name!r}: {job.id!r} is not NAMESPACE/POD")
        if len(pod) > 253 or not DNS1123_SUBDOMAIN.fullmatch(pod):
            return MoveResult("failed", f"job {job.name!r}: pod name {pod!r} is not valid")
        where = f"{namespace}/{pod}"
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.token_file is not None:
            try:
                token = Path(self.token_file).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as e:
                return MoveResult("failed", one_line(f"cannot read {self.token_file}: {e}"))
            headers["Authorization"] = f"Bearer {token}"
        body = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": pod, "namespace": namespace},
        }
        path = self._prefix + EVICTION_PATH.format(namespace=namespace, pod=pod)
        try:
            status, raw = self._post(path, json.dumps(body).encode(), headers)
        except (OSError, http.client.HTTPException) as e:
            reason = "timed out" if isinstance(e, TimeoutError) else f"{e}" or type(e).__name__
            return MoveResult(
                "failed", one_line(f"cannot reach the Kubernetes API at {self.api_url}: {reason}")
            )
        message = _status_message(status, raw)
        if status in (200, 201):
            return MoveResult("requested", f"eviction of pod {where} requested")
        if status == 429:
            return MoveResult(
                "refused",
                one_line(f"eviction of pod {where} refused (PodDisruptionBudget): {message}"),
            )
        if status == 404:
            return MoveResult("failed", one_line(f"pod {where} gone: {message}"))
        return MoveResult("failed", one_line(f"eviction of pod {where}: {status} {message}"))

    def _post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        conn: http.client.HTTPConnection
        if self._context is not None:
            conn = http.client.HTTPSConnection(
                self._host, self._port, timeout=self.timeout_s, context=self._context
            )
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout_s)
        try:
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()


def _status_message(status: int, raw: bytes) -> str:
    """A Kubernetes ``Status`` object's message, else the body's text, else the reason."""
    try:
        data = json.loads(raw or b"null")
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("message"), str) and data["message"]:
        return one_line(data["message"])
    text = raw.decode(errors="replace").strip()
    return one_line(text) if text else http.client.responses.get(status, "")


# ----------------------------------------------------------------------------------- Slurm
class SlurmScheduler:
    """``scontrol requeue JOBID``: the job ends and waits in the queue to start again."""

    name = "slurm"

    def __init__(self, scontrol: str = "scontrol", *, timeout_s: float = 10.0) -> None:
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ConfigError(f"scontrol timeout must be above 0, got {timeout_s}")
        self.scontrol = scontrol
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"SlurmScheduler({self.scontrol!r})"

    def move(self, job: JobRef) -> MoveResult:
        """Requeue ``job``: exit 0 requested; otherwise failed with the first line it said."""
        wrong = _wrong_kind(job, self.name)
        if wrong is not None:
            return wrong
        if not SLURM_JOB_ID.fullmatch(job.id):
            return MoveResult("failed", f"job {job.name!r}: {job.id!r} is not a Slurm job id")
        argv = [self.scontrol, "requeue", job.id]
        try:
            done = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=self.timeout_s,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except FileNotFoundError:
            return MoveResult("failed", f"{self.scontrol} not found: is Slurm's scontrol on PATH?")
        except subprocess.TimeoutExpired:
            return MoveResult(
                "failed", f"{self.scontrol} requeue {job.id} timed out after {self.timeout_s:g} s"
            )
        except OSError as e:
            return MoveResult("failed", one_line(f"cannot run {self.scontrol}: {e}"))
        if done.returncode == 0:
            return MoveResult("requested", f"slurm job {job.id} requeued")
        said = next((line for line in done.stderr.splitlines() if line.strip()), "")
        said = said or next((line for line in done.stdout.splitlines() if line.strip()), "")
        return MoveResult(
            "failed",
            one_line(f"{self.scontrol} requeue {job.id} exited {done.returncode}: {said}"),
        )


def scheduler_for(
    kind: str,
    *,
    kubernetes_api: str | None = None,
    kubernetes_token_file: str | None = None,
    kubernetes_ca_file: str | None = None,
) -> Scheduler | None:
    """``--scheduler``'s value as a scheduler: ``none`` (None), ``kubernetes``, ``slurm``.

    Kubernetes is ``kubernetes_api`` (with its token and CA files) where given, else the
    in-cluster API; ConfigError for another value, outside a cluster without an API URL, or a
    token file that cannot be read now.
    """
    if kind == "none":
        return None
    if kind == "kubernetes":
        if kubernetes_api is None:
            return KubernetesScheduler.in_cluster()
        if kubernetes_token_file is not None:  # readable and not empty now, or exit 2
            read_secret(Path(kubernetes_token_file), "kubernetes_token_file")
        return KubernetesScheduler(
            kubernetes_api, token_file=kubernetes_token_file, ca_file=kubernetes_ca_file
        )
    if kind == "slurm":
        return SlurmScheduler()
    raise ConfigError(f"--scheduler must be none, kubernetes or slurm, got {kind!r}")
