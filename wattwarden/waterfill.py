"""Water-filling: raise a group's shares to one common level without spending more than given.

Shared by the node's budget split over GPUs (``policies/budget.py``) and the fleet controller's
split over nodes (``fleet/allocate.py``): the same arithmetic, over GPUs or over nodes.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping
from typing import TypeVar

K = TypeVar("K", bound=Hashable)


def water_fill(
    shares: dict[K, float], ceiling: Mapping[K, float], group: Iterable[K], amount_w: float
) -> float:
    """Water-fill up to ``amount_w`` into ``group``: raise its shares to one common level.

    Each share becomes the level, clamped between where it is and its ceiling; the level is the
    highest one that spends no more than ``amount_w``. ``shares`` is changed in place. Returns
    what was spent.
    """
    room = [(shares[g], ceiling[g], g) for g in group if ceiling[g] > shares[g]]
    total = math.fsum(hi - lo for lo, hi, _ in room)
    if total <= amount_w:
        for _, hi, g in room:
            shares[g] = hi
        return total
    # f(level) = sum(clamp(level, lo, hi) - lo) is piecewise linear and rising: walk its kinks
    # (each share's lo, where it starts rising, and hi, where it stops) until it reaches amount_w
    kinks = sorted([(lo, 1) for lo, _, _ in room] + [(hi, -1) for _, hi, _ in room])
    level, rising, spent = kinks[0][0], 0, 0.0
    for at, change in kinks:
        gain = rising * (at - level)
        if rising and spent + gain >= amount_w:
            level += (amount_w - spent) / rising
            break
        spent += gain
        level = at
        rising += change
    for lo, hi, g in room:
        shares[g] = min(hi, max(lo, level))
    return amount_w
