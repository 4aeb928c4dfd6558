"""Small statistics helpers shared by actors and readers."""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Collection, Sequence
from typing import Any


def quantile(values: Collection[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``; 0.0 when there are none."""
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


REQUEST_BOUNDS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
"""Bucket upper bounds (seconds) for request and tokenization latencies."""

LAG_BOUNDS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
"""Bucket upper bounds (seconds) for event-to-visible and replica lags (ms to a minute)."""


class Histogram:
    """A tiny cumulative histogram: no prometheus state, picklable ``state()`` for stats dicts.

    ``observe(v)`` counts ``v`` in the first bucket whose bound is ``>= v`` (Prometheus ``le``
    semantics), or in ``+Inf``.
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float] = REQUEST_BOUNDS) -> None:
        b = tuple(float(x) for x in bounds)
        if not b or any(not math.isfinite(x) for x in b) or list(b) != sorted(set(b)):
            raise ValueError("histogram bounds must be finite, strictly increasing, non-empty")
        self.bounds = b
        self.counts = [0] * (len(b) + 1)  # per bucket (not cumulative); the last is +Inf
        self.total = 0.0  # sum of observations

    def observe(self, seconds: float) -> None:
        self.total += seconds
        self.counts[bisect_left(self.bounds, seconds)] += 1

    @property
    def count(self) -> int:
        return sum(self.counts)

    def reset(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative ``(le, count)`` pairs ending with ``+Inf``, as Prometheus wants them."""
        return cumulative(self.bounds, self.counts)

    def state(self) -> dict[str, Any]:
        """Plain-data snapshot for a stats dict (``render`` reads it back)."""
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.total}


class LatencyHistogram(Histogram):
    """A request-latency histogram (``REQUEST_BOUNDS``)."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(REQUEST_BOUNDS)


def lag_histogram() -> Histogram:
    """A histogram with bounds suited to seconds-scale lags (``LAG_BOUNDS``)."""
    return Histogram(LAG_BOUNDS)


def cumulative(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, float]]:
    """Cumulative ``(le, count)`` pairs of per-bucket counts, ending with ``+Inf``."""
    out: list[tuple[str, float]] = []
    acc = 0
    for b, n in zip(bounds, counts, strict=False):
        acc += n
        out.append((repr(float(b)), acc))
    out.append(("+Inf", acc + counts[len(bounds)]))
    return out
