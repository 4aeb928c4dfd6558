"""Small statistics helpers shared by actors and readers."""

from __future__ import annotations

from collections.abc import Collection


def quantile(values: Collection[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``; 0.0 when there are none."""
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]
