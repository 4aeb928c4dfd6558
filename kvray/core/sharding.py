"""Which shard owns a holder: a pinned pod's shard, else a stable keyed hash of the holder id.

Python salts ``str`` hashes per process (PYTHONHASHSEED), so two ingestors would disagree about
owners; xxh3-64 of the UTF-8 id gives every process, and every restart, the same answer.

A hash spreads many holders evenly but few badly: 16 pods on 4 shards land 7 / 4 / 3 / 2, and
the hottest shard's single ingest thread then caps the whole deployment. So named pods that a
shard reads itself (``add_pod`` with a name, ``events.connect`` entries with ``pod``) are
*pinned*: each goes to the shard with the fewest pinned pods (the hash's choice among ties), and
every data-parallel rank of a pinned pod goes with it. ``Placement`` holds the pins; the
controller decides them and hands them to the ingestors, shards and clients that route by them.
Holders nobody pinned (pods publishing to a bound socket, discovered from their topic) keep the
hash, which needs no coordination.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

import xxhash

from kvray.core.holders import base_pod


@functools.lru_cache(maxsize=65536)
def shard_of(holder: str, num_shards: int) -> int:
    """The shard index in ``[0, num_shards)`` the hash gives ``holder`` (memoised: asked per
    message)."""
    if num_shards <= 0:
        raise ValueError(f"num_shards must be positive, got {num_shards}")
    return int(xxhash.xxh3_64_intdigest(holder.encode("utf-8")) % num_shards)


class Placement:
    """Holder → shard: the pod's pin when it has one, else ``shard_of``.

    Args:
        num_shards: how many shards there are.
        pins: pod → shard, decided earlier (``pins()`` of another ``Placement``).
    """

    def __init__(self, num_shards: int, pins: Mapping[str, int] | None = None) -> None:
        if num_shards <= 0:
            raise ValueError(f"num_shards must be positive, got {num_shards}")
        self.num_shards = num_shards
        self._pins: dict[str, int] = {}
        self._load = [0] * num_shards
        self.update(pins or {})

    @classmethod
    def balanced(cls, num_shards: int, pods: Iterable[str]) -> Placement:
        """Pods placed in order, each on the least loaded shard: a pure function of its
        arguments, so every process reading the same config places its pods alike."""
        placement = cls(num_shards)
        for pod in pods:
            placement.place(pod)
        return placement

    def owner(self, holder: str) -> int:
        """The shard owning ``holder`` (a pod id or ``"<pod>#dp<r>"``)."""
        pins = self._pins
        if pins:
            shard = pins.get(holder)
            if shard is None:
                shard = pins.get(base_pod(holder))
            if shard is not None:
                return shard
        return shard_of(holder, self.num_shards)

    def is_pinned(self, pod: str) -> bool:
        return base_pod(pod) in self._pins

    def pin(self, pod: str, shard: int) -> None:
        """Put ``pod`` (all its ranks) on ``shard``."""
        if not 0 <= shard < self.num_shards:
            raise ValueError(f"shard {shard} out of range [0, {self.num_shards})")
        old = self._pins.get(pod)
        if old is not None:
            self._load[old] -= 1
        self._pins[pod] = shard
        self._load[shard] += 1

    def place(self, pod: str) -> int:
        """``pod``'s shard: its pin, else a new pin on the shard with the fewest pinned pods
        (the hash's shard when it is among them, so small changes move little)."""
        shard = self._pins.get(pod)
        if shard is None:
            least = min(self._load)
            shard = shard_of(pod, self.num_shards)
            if self._load[shard] != least:
                shard = self._load.index(least)
            self.pin(pod, shard)
        return shard

    def pins(self) -> dict[str, int]:
        """Pod → shard, for the pinned pods."""
        return dict(self._pins)

    def update(self, pins: Mapping[str, int]) -> None:
        for pod, shard in pins.items():
            self.pin(pod, shard)
