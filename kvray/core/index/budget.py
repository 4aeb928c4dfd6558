"""A memory-budgeted index: the memory backend's structures, bounded by bytes instead of keys.

Cost model: the same structures as ``MemoryIndex`` (one dict per tier, key → holder bitset), so
the same bytes per (block, holder) pair; every mutation also updates a running byte estimate
(``_KEY_BYTES`` per key plus ``sys.getsizeof`` of masks too large for CPython's small-int cache),
about 60 ns per key more than ``MemoryIndex``.

Eviction is cost-aware: when the estimate passes ``budget_bytes``, the oldest window of keys
(least recently stored) is examined and the keys held by the FEWEST holders go first: dropping
a key held by one pod loses one (block, holder) pair of routing value for the same bytes that a
key held by 50 pods would cost 50 pairs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from itertools import islice

from kvray.core.index.base import IndexStats
from kvray.core.index.memory import _DICT_ENTRY_BYTES, _KEY_INT_BYTES, MemoryIndex, _map_bytes
from kvray.errors import ConfigError
from kvray.types import PodId, Tier

_KEY_BYTES = _DICT_ENTRY_BYTES + _KEY_INT_BYTES  # dict entry + the u64 key int object


def _mask_bytes(m: int) -> int:
    return sys.getsizeof(m) if m > 255 else 0


class BudgetIndex(MemoryIndex):
    """Byte-budgeted index (``name = "budget"``).

    Args:
        budget_bytes: the estimate never stays above this after a call returns.
        window: oldest keys examined per eviction pass (cost-aware choice among them).
    """

    name = "budget"

    def __init__(self, budget_bytes: int = 512 * 2**20, *, window: int = 4096) -> None:
        if budget_bytes < 64 * _KEY_BYTES:
            raise ConfigError(f"budget_bytes={budget_bytes} is too small to hold an index")
        self.budget_bytes = budget_bytes
        self._window = window
        super().__init__(max_keys=sys.maxsize)

    def add(self, pod: PodId, tier: Tier, keys: Sequence[int]) -> None:
        self.add_held(pod, tier, keys)

    def add_held(self, pod: PodId, tier: Tier, keys: Sequence[int]) -> list[int]:
        bit = self._bit(pod)
        d = self._tiers.setdefault(tier, {})
        pop = d.pop
        delta = 0
        held: list[int] = []
        for i, k in enumerate(keys):
            old = pop(k, None)
            if old is None:
                new = bit
                delta += _KEY_BYTES + _mask_bytes(new)
                self._nkeys += 1
            else:
                if old & bit:
                    held.append(i)
                new = old | bit
                delta += _mask_bytes(new) - _mask_bytes(old)
            d[k] = new
        self._bytes += delta
        if self._bytes > self.budget_bytes:
            self._evict_to_budget()
        if self._retired:
            self._sweep_step()
        return held

    def remove(self, pod: PodId, tier: Tier, keys: Sequence[int]) -> None:
        slot = self._slot.get(pod)
        d = self._tiers.get(tier)
        if slot is None or d is None:
            return
        keep = ~(1 << slot)
        for k in keys:
            m = d.get(k)
            if m is None:
                continue
            new = m & keep
            if new:
                d[k] = new
                self._bytes += _mask_bytes(new) - _mask_bytes(m)
            else:
                del d[k]
                self._nkeys -= 1
                self._bytes -= _KEY_BYTES + _mask_bytes(m)
        if self._retired:
            self._sweep_step()

    def _sweep_step(self) -> None:
        before = self._nkeys
        super()._sweep_step()
        # Swept-out keys free their entry; mask shrinkage is small and re-counted by stats().
        self._bytes -= (before - self._nkeys) * _KEY_BYTES

    def _evict_to_budget(self) -> None:
        target = int(self.budget_bytes * 0.98)  # a little headroom: no eviction on every add
        while self._bytes > target and self._nkeys:
            tier, d = max(self._tiers.items(), key=lambda td: len(td[1]))
            window = list(islice(d.items(), self._window))
            window.sort(key=lambda km: km[1].bit_count())
            gone: list[tuple[int, int]] = []
            for k, m in window:
                del d[k]
                gone.append((k, m))
                self._nkeys -= 1
                self._evicted += 1
                self._bytes -= _KEY_BYTES + _mask_bytes(m)
                if self._bytes <= target:
                    break
            self._report_evicted(tier, gone)

    def stats(self) -> IndexStats:
        st = super().stats()
        st.bytes_estimate = self._bytes + _map_bytes(self._emap)
        return st

    def _reset(self) -> None:
        super()._reset()
        self._bytes = 0
