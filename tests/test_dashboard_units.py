"""Numbers as the dashboard shows them: units always, unknown as a dash (never 0)."""

from __future__ import annotations

import pytest

from wattwarden.dashboard import units


@pytest.mark.parametrize(
    ("hz", "shown"),
    [(1.98e9, "1.98 GHz"), (1.4125e9, "1.41 GHz"), (2.1e8, "0.21 GHz"), (0.0, "0.00 GHz")],
)
def test_a_clock_reads_in_gigahertz_with_two_decimals(hz: float, shown: str) -> None:
    assert units.gigahertz(hz) == shown


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (units.watts(412.4), "412 W"),
        (units.watts(24_100.0), "24.10 kW"),
        (units.energy(999.0), "999 J"),
        (units.energy(12_345.0), "12.3 kJ"),
        (units.energy(7.2e6), "2.00 kWh"),
        (units.celsius(64.4), "64 °C"),
        (units.percent(0.875), "88 %"),
    ],
)
def test_numbers_carry_their_unit(value: str, shown: str) -> None:
    assert value == shown


def test_an_unknown_reading_is_a_dash_never_zero() -> None:
    for show in (units.gigahertz, units.watts, units.energy, units.celsius, units.percent):
        assert show(None) == "—"
