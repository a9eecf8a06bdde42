"""OTLP settings: explicit arguments, the standard ``OTEL_*`` variables and the OTel defaults.

Endpoint, headers (``key=value,...`` with percent-encoding), interval and timeout are resolved
once by :func:`resolve_config`; every bad value raises ValueError with a one-line message that
names the argument or variable at fault (never a header's value). :func:`build_resource` makes the
SDK resource (``service.*`` and ``host.name``, overridable by ``OTEL_RESOURCE_ATTRIBUTES``).
"""

from __future__ import annotations

import math
import os
import re
import socket
import urllib.parse
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from opentelemetry.sdk.resources import OTELResourceDetector, Resource

from wattwarden import __version__

ENV_METRICS_ENDPOINT = "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"
ENV_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
ENV_METRICS_HEADERS = "OTEL_EXPORTER_OTLP_METRICS_HEADERS"
ENV_HEADERS = "OTEL_EXPORTER_OTLP_HEADERS"
ENV_METRICS_TIMEOUT = "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT"
ENV_TIMEOUT = "OTEL_EXPORTER_OTLP_TIMEOUT"
ENV_INTERVAL = "OTEL_METRIC_EXPORT_INTERVAL"
ENV_METRICS_PROTOCOL = "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"
ENV_PROTOCOL = "OTEL_EXPORTER_OTLP_PROTOCOL"
PROTOCOL = "http/protobuf"

DEFAULT_ENDPOINT = "http://localhost:4318"
METRICS_PATH = "/v1/metrics"
DEFAULT_INTERVAL_S = 60.0
"""The OpenTelemetry default for ``OTEL_METRIC_EXPORT_INTERVAL``."""
DEFAULT_TIMEOUT_S = 10.0
"""The OpenTelemetry default for ``OTEL_EXPORTER_OTLP_TIMEOUT``."""
DEFAULT_CLOSE_TIMEOUT_S = 5.0

SERVICE_NAME = "wattwarden"
SCOPE_NAME = "wattwarden"
# The namespace the service semantic conventions name for UUID v5 service.instance.id values.
_INSTANCE_ID_NAMESPACE = uuid.UUID("4d63009a-8d0f-11ee-aad7-4c796ed8e320")
# RFC 9110 token characters: what an HTTP header name may contain.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
AttributeValue = str | bool | int | float


@dataclass(frozen=True, slots=True)
class OtlpConfig:
    """Where and how often to export; built by :func:`resolve_config`."""

    endpoint: str
    """Full URL of the OTLP/HTTP metrics endpoint (ends in ``/v1/metrics`` unless given in full)."""
    headers: dict[str, str] = field(repr=False)
    """Extra request headers (often credentials, hence kept out of ``repr``)."""
    interval_s: float
    timeout_s: float
    """Bound on one export, retries included."""


def parse_headers(text: str, *, source: str = "OTLP headers") -> dict[str, str]:
    """Parse ``key=value,key2=value2`` (the ``OTEL_EXPORTER_OTLP_HEADERS`` format).

    Values may be percent-encoded (``Bearer%20token``) and are decoded; blank entries are skipped.
    Raises ValueError with a one-line message that names the entry or header, never its value.
    """
    headers: dict[str, str] = {}
    for number, entry in enumerate(text.split(","), start=1):
        if not entry.strip():
            continue
        name, sep, raw_value = entry.partition("=")
        name = name.strip()
        if not sep:
            raise ValueError(
                f"{source}: entry {number} has no '=' (expected name=value,name=value)"
            )
        if not name:
            raise ValueError(f"{source}: entry {number} has an empty header name")
        _add_header(headers, name, urllib.parse.unquote(raw_value.strip()), source)
    return headers


def _add_header(headers: dict[str, str], name: str, value: str, source: str) -> None:
    if not _HEADER_NAME.fullmatch(name):
        raise ValueError(f"{source}: {name!r} is not a valid HTTP header name")
    if not value.strip():
        raise ValueError(f"{source}: header {name!r} has an empty value")
    if _CONTROL.search(value):
        raise ValueError(f"{source}: header {name!r} has a control character in its value")
    if any(k.lower() == name.lower() for k in headers):
        raise ValueError(f"{source}: header {name!r} is given more than once")
    headers[name] = value


def _checked_headers(headers: Mapping[str, str], source: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in headers.items():
        _add_header(out, name.strip(), value.strip(), source)
    return out


def _endpoint_url(url: str, source: str, *, append: str) -> str:
    """Validate an http(s) URL; ``append``: ``always`` (a base URL), ``if_bare`` or ``never``."""
    url = url.strip()
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"{source} {url!r} is not an http:// or https:// URL (e.g. http://localhost:4318)"
        )
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError(f"{source} {url!r} has an invalid port") from None
    if parts.query or parts.fragment:
        raise ValueError(f"{source} {url!r} must not have a query or fragment")
    if append == "always" or (append == "if_bare" and parts.path in ("", "/")):
        parts = parts._replace(path=parts.path.rstrip("/") + METRICS_PATH)
    return urllib.parse.urlunsplit(parts)


def positive_seconds(value: float, name: str) -> float:
    """``value`` as a float if it is a positive, finite number; else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def _env_ms(environ: Mapping[str, str], *keys: str) -> float | None:
    """The first of ``keys`` that is set, read as milliseconds, in seconds."""
    for key in keys:
        raw = environ.get(key, "").strip()
        if not raw:
            continue
        try:
            ms = float(raw)
        except ValueError:
            ms = math.nan
        if not (math.isfinite(ms) and ms > 0):
            raise ValueError(f"{key}={raw!r}: expected a positive number of milliseconds")
        return ms / 1000.0
    return None


def resolve_config(
    *,
    endpoint: str | None = None,
    headers: Mapping[str, str] | str | None = None,
    interval_s: float | None = None,
    timeout_s: float | None = None,
    environ: Mapping[str, str] | None = None,
) -> OtlpConfig:
    """Explicit arguments first, then the standard ``OTEL_*`` variables, then the OTel defaults.

    - endpoint: an explicit URL with no path (``http://collector:4318``) gets ``/v1/metrics``
      appended, one with a path is used as is; else ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`` as is;
      else ``OTEL_EXPORTER_OTLP_ENDPOINT`` + ``/v1/metrics``; else ``http://localhost:4318/v1/metrics``.
    - headers: ``OTEL_EXPORTER_OTLP_METRICS_HEADERS`` (or ``OTEL_EXPORTER_OTLP_HEADERS``), with the
      explicit ones (a mapping or a ``k=v,k2=v2`` string) added over them. The OTLP exporter reads
      the variable too and sends its headers whatever is passed, so they merge rather than replace.
    - interval_s: ``OTEL_METRIC_EXPORT_INTERVAL`` (milliseconds), default 60 s.
    - timeout_s: ``OTEL_EXPORTER_OTLP_METRICS_TIMEOUT`` / ``OTEL_EXPORTER_OTLP_TIMEOUT``, read as
      milliseconds as the specification says (the Python exporter alone reads them as seconds),
      default 10 s.

    ``OTEL_EXPORTER_OTLP_(METRICS_)PROTOCOL``, if set, must be ``http/protobuf``.

    Raises ValueError with a one-line message naming the argument or variable at fault.
    """
    env = os.environ if environ is None else environ
    for key in (ENV_METRICS_PROTOCOL, ENV_PROTOCOL):
        protocol = env.get(key, "").strip()
        if protocol:
            if protocol != PROTOCOL:
                raise ValueError(
                    f"{key}={protocol!r}: wattwarden exports OTLP over {PROTOCOL} only; "
                    f"set it to {PROTOCOL} or unset it"
                )
            break
    if endpoint is not None:
        url = _endpoint_url(endpoint, "OTLP endpoint", append="if_bare")
    elif env.get(ENV_METRICS_ENDPOINT, "").strip():
        url = _endpoint_url(env[ENV_METRICS_ENDPOINT], ENV_METRICS_ENDPOINT, append="never")
    elif env.get(ENV_ENDPOINT, "").strip():
        url = _endpoint_url(env[ENV_ENDPOINT], ENV_ENDPOINT, append="always")
    else:
        url = DEFAULT_ENDPOINT + METRICS_PATH

    merged: dict[str, str] = {}
    for key in (ENV_METRICS_HEADERS, ENV_HEADERS):
        if env.get(key, "").strip():
            merged = parse_headers(env[key], source=key)
            break
    if headers is not None:
        explicit = (
            parse_headers(headers)
            if isinstance(headers, str)
            else _checked_headers(headers, "OTLP headers")
        )
        for name, value in explicit.items():
            for old in [k for k in merged if k.lower() == name.lower()]:
                del merged[old]
            merged[name] = value

    if interval_s is None:
        interval = _env_ms(env, ENV_INTERVAL) or DEFAULT_INTERVAL_S
    else:
        interval = positive_seconds(interval_s, "interval_s")
    if timeout_s is None:
        timeout = _env_ms(env, ENV_METRICS_TIMEOUT, ENV_TIMEOUT) or DEFAULT_TIMEOUT_S
    else:
        timeout = positive_seconds(timeout_s, "timeout_s")
    return OtlpConfig(endpoint=url, headers=merged, interval_s=interval, timeout_s=timeout)


def build_resource(
    *,
    host_name: str | None = None,
    resource_attributes: Mapping[str, AttributeValue] | None = None,
) -> Resource:
    """The SDK ``Resource`` for the agent (see the module docstring for precedence)."""
    host = host_name or socket.gethostname()
    defaults: dict[str, AttributeValue] = {
        "service.name": SERVICE_NAME,
        "service.version": __version__,
        "service.instance.id": str(uuid.uuid5(_INSTANCE_ID_NAMESPACE, host)),
        "host.name": host,
    }
    from_env = dict(OTELResourceDetector().detect().attributes)
    return Resource.create({**defaults, **from_env, **dict(resource_attributes or {})})
