"""The collectors the agent runs beside the GPU collector: one registration line each.

A new collector is one module (its sample type, its :class:`~wattwarden.collectors.base.Collector`,
its metric rows and its :class:`~wattwarden.collectors.base.Registration`) and one line here. The
GPU collector is not listed: its windows, history and job attribution make it the agent's own.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from wattwarden.collectors import host, rapl
from wattwarden.collectors.base import AnyRegistration, Collector, CollectorSettings
from wattwarden.collectors.errors import CollectorUnavailable

REGISTRATIONS: tuple[AnyRegistration, ...] = (
    host.REGISTRATION,
    rapl.REGISTRATION,
)


@dataclass(frozen=True, slots=True)
class Opened:
    """The collectors that opened, and why each one that did not is absent."""

    collectors: list[Collector]
    absent: list[str]


def open_collectors(
    settings: CollectorSettings,
    *,
    enabled: Collection[str] | None = None,
    registrations: tuple[AnyRegistration, ...] = REGISTRATIONS,
) -> Opened:
    """Open the enabled collectors (by default, those enabled by default), in registration order.

    A collector whose source this machine lacks is left out with its one-line reason.
    """
    opened = Opened([], [])
    for reg in registrations:
        if not (reg.default_enabled if enabled is None else reg.name in enabled):
            continue
        try:
            opened.collectors.append(reg.factory(settings))
        except CollectorUnavailable as e:
            opened.absent.append(str(e))
    return opened
