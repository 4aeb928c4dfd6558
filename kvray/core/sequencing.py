"""Per-stream sequence numbers: in order, gap (→ replay or loss), or restart (→ clear the pod).

A stream is one publisher process: ``(pod, data_parallel_rank)``. vLLM counts ``seq`` from 0 per
process, so a seq BELOW the expected one means the process restarted and everything kvray knew
about that holder is stale. Replayed batches are deduplicated by the ingestor before they reach
here, so a live seq can never legitimately go back.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Verdict(Enum):
    """What a seq means for its stream."""

    FIRST = "first"
    """First message seen from the stream (no gap is assumed before it)."""
    IN_ORDER = "in_order"
    """Exactly the expected seq."""
    GAP = "gap"
    """Later than expected: ``[expected, seq)`` were missed."""
    RESTART = "restart"
    """Earlier than expected: the publisher restarted; clear its holder first."""


@dataclass(slots=True, frozen=True)
class SeqResult:
    """The verdict and, for a gap, the missing range ``[missing_from, missing_to)``."""

    verdict: Verdict
    missing_from: int = 0
    missing_to: int = 0

    @property
    def missing(self) -> int:
        return self.missing_to - self.missing_from


_FIRST = SeqResult(Verdict.FIRST)
_IN_ORDER = SeqResult(Verdict.IN_ORDER)
_RESTART = SeqResult(Verdict.RESTART)


class SeqTracker:
    """Tracks the next expected seq of every stream."""

    def __init__(self) -> None:
        self._expected: dict[tuple[str, int], int] = {}

    def observe(self, stream: tuple[str, int], seq: int) -> SeqResult:
        """Record ``seq`` as received on ``stream`` and classify it."""
        expected = self._expected.get(stream)
        self._expected[stream] = seq + 1
        if seq == expected:
            return _IN_ORDER
        if expected is None:
            return _FIRST
        if seq > expected:
            return SeqResult(Verdict.GAP, expected, seq)
        return _RESTART

    def expected(self, stream: tuple[str, int]) -> int | None:
        """The next seq expected on ``stream`` (None when never seen)."""
        return self._expected.get(stream)

    def forget(self, stream: tuple[str, int]) -> None:
        """Drop a stream (its pod was removed)."""
        self._expected.pop(stream, None)

    def streams(self) -> dict[tuple[str, int], int]:
        """A copy of stream → next expected seq."""
        return dict(self._expected)
