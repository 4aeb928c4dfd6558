"""Holder ids: one pod's data-parallel rank, written ``"<pod>"`` (rank 0) or ``"<pod>#dp<r>"``.

The only place that builds or parses them: shards, ingestors, clients and placement use
``holder_id`` / ``parse_holder`` / ``Holder`` rather than splitting strings themselves.
"""

from __future__ import annotations

from typing import NamedTuple

from kvray.types import PodId

_DP = "#dp"


class Holder(NamedTuple):
    """A parsed holder id: the pod and its data-parallel rank (0 for the pod itself)."""

    pod: str
    rank: int

    @property
    def id(self) -> PodId:
        return holder_id(self.pod, self.rank)


def holder_id(pod: str, dp_rank: int | None) -> PodId:
    """The holder id of a pod's data-parallel rank.

    Rank nil or 0 is the pod itself; rank r ≥ 1 is ``"<pod>#dp<r>"``, a distinct holder because
    each rank has its own KV cache (and its own event stream and sequence numbers).
    """
    if not dp_rank:
        return PodId(pod)
    return PodId(f"{pod}{_DP}{dp_rank}")


def parse_holder(holder: str) -> Holder:
    """``"a#dp3"`` → ``Holder("a", 3)``; anything else (``"a"``, ``"a#dpx"``) is rank 0."""
    pod, sep, rank = holder.rpartition(_DP)
    if sep and rank.isdigit():
        return Holder(pod, int(rank))
    return Holder(holder, 0)


def base_pod(holder: str) -> str:
    """The pod of a holder id (``"<pod>#dp<r>"`` → ``"<pod>"``)."""
    return parse_holder(holder).pod


def holds_for(holder: str, pod: str) -> bool:
    """Whether ``holder`` is one of ``pod``'s ranks."""
    return base_pod(holder) == pod
