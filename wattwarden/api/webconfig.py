"""TLS and basic auth for the agent's HTTP server, configured like Prometheus exporters.

The file follows the exporter-toolkit web configuration (the ``--web.config.file`` of
node_exporter and friends), so operators can reuse theirs::

    tls_server_config:
      cert_file: server.crt         # relative paths are relative to this file
      key_file: server.key
      client_ca_file: clients.crt   # optional: mutual TLS
      client_auth_type: RequireAndVerifyClientCert
      min_version: TLS12
    basic_auth_users:
      prometheus: $2y$10$...        # bcrypt hashes, as htpasswd -B makes them

Basic auth guards reads; ``/healthz`` stays open for probes, and writes keep needing the bearer
token (one Authorization header cannot carry both).
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import yaml

_TLS_KEYS = {"cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version"}
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_MIN_VERSION = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}


@dataclass
class WebConfig:
    """What the server enforces: an SSL context (or plain HTTP) and basic-auth users."""

    ssl_context: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)
    _verified: set[bytes] = field(default_factory=set, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def check_basic(self, user: str, password: str) -> bool:
        """Whether the pair matches; bcrypt is slow, so good pairs are remembered (by digest).

        Every refusal costs one bcrypt check at the configured cost, whether the user exists or
        not, so user names cannot be told apart by timing. Passwords over bcrypt's 72 bytes are
        refused (as the exporter-toolkit does), not truncated.
        """
        secret = password.encode()
        hashed = self.users.get(user)
        if hashed is None or len(secret) > MAX_PASSWORD_BYTES:
            bcrypt.checkpw(b"x", _dummy_hash(_cost(hashed) if hashed else self._max_cost()))
            return False
        key = hashlib.sha256(user.encode() + b"\0" + secret + b"\0" + hashed).digest()
        with self._lock:
            if any(hmac.compare_digest(key, k) for k in self._verified):
                return True
        if not bcrypt.checkpw(secret, hashed):
            return False
        with self._lock:
            self._verified.add(key)
        return True

    def _max_cost(self) -> int:
        return max((_cost(h) for h in self.users.values()), default=_MIN_COST)


MAX_PASSWORD_BYTES = 72
"""bcrypt uses at most 72 bytes of a password (and bcrypt>=4.1 raises beyond)."""
_MIN_COST = 4
_dummy_hashes: dict[int, bytes] = {}
_dummy_lock = threading.Lock()


def _cost(hashed: bytes) -> int:
    """The cost (log2 rounds) of a ``$2y$10$...`` hash."""
    try:
        return min(31, max(_MIN_COST, int(hashed.split(b"$")[2])))
    except (IndexError, ValueError):
        return _MIN_COST


def _dummy_hash(cost: int) -> bytes:
    """A hash of a throwaway password at ``cost``, made once per cost."""
    with _dummy_lock:
        if cost not in _dummy_hashes:
            _dummy_hashes[cost] = bcrypt.hashpw(b"wattwarden", bcrypt.gensalt(rounds=cost))
        return _dummy_hashes[cost]


def load_web_config(path: Path) -> WebConfig:
    """Parse and check the file; ValueError with one line naming the key on any problem."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ValueError(f"web config {path}: cannot read: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise ValueError(f"web config {path}: not valid YAML: {str(e).splitlines()[0]}") from e
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ValueError(f"web config {path}: must be a mapping")
    unknown = set(raw) - {"tls_server_config", "basic_auth_users", "http_server_config"}
    if unknown:
        raise ValueError(f"web config {path}: unknown key {sorted(unknown)[0]!r}")
    config = WebConfig()
    tls = raw.get("tls_server_config")
    if tls is not None:
        config.ssl_context = _ssl_context(tls, path)
    users = raw.get("basic_auth_users") or {}
    if not isinstance(users, dict):
        raise ValueError(f"web config {path}: basic_auth_users must map user names to hashes")
    for user, hashed in users.items():
        if not isinstance(hashed, str) or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise ValueError(
                f"web config {path}: basic_auth_users.{user} must be a bcrypt hash ($2y$...)"
            )
        config.users[str(user)] = hashed.encode()
    if config.users:
        _dummy_hash(config._max_cost())  # made now, not on the first unknown user's request
    return config


def _ssl_context(tls: Any, path: Path) -> ssl.SSLContext:
    where = f"web config {path}: tls_server_config"
    if not isinstance(tls, dict):
        raise ValueError(f"{where} must be a mapping")
    unknown = set(tls) - _TLS_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    for key in ("cert_file", "key_file"):
        if not isinstance(tls.get(key), str):
            raise ValueError(f"{where}.{key} is required")

    def resolve(name: str) -> Path:
        p = Path(tls[name])
        return p if p.is_absolute() else path.parent / p

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    version = tls.get("min_version", "TLS12")
    if version not in _MIN_VERSION:
        raise ValueError(f"{where}.min_version must be TLS12 or TLS13, got {version!r}")
    ctx.minimum_version = _MIN_VERSION[version]
    try:
        ctx.load_cert_chain(resolve("cert_file"), resolve("key_file"))
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"{where}: cannot load cert_file/key_file: {e}") from e
    auth = tls.get("client_auth_type", "NoClientCert")
    if auth not in _CLIENT_AUTH:
        raise ValueError(f"{where}.client_auth_type must be one of {', '.join(_CLIENT_AUTH)}")
    ctx.verify_mode = _CLIENT_AUTH[auth]
    if auth != "NoClientCert":
        if not isinstance(tls.get("client_ca_file"), str):
            raise ValueError(f"{where}.client_ca_file is required with {auth}")
        try:
            ctx.load_verify_locations(resolve("client_ca_file"))
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"{where}: cannot load client_ca_file: {e}") from e
    return ctx
