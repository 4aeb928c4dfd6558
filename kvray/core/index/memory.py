"""The default index: per tier, one table from block key to a bitset of holder slots, LRU-bounded.

The tables are ``kvray.core.fast.U64Dict`` (tiers, in recency order) and ``U64Map`` (the engine
map; the tiers of an index without recency, i.e. read replicas): C tables with a dict's
operations, or plain dicts without the extension. Either way the code below sees a dict.

Cost model (measured in ``benchmarks/bench_core.py``; CPython 3.11, 64-bit):

* per key, with the C tables: a 16-byte entry plus 8–16 bytes of index, and the mask int (0 B for
  masks < 2^8, which CPython caches; 28 B + 4 B per 30 bits above). With dicts: one dict entry
  (~40 B with the table slack) + the u64 key int (32–36 B) + the mask int; at ~4 holders per
  block that is ~25–30 B per (block, holder) pair, against ~115–250 B for a dict of sets.
* ``add``/``remove``: O(keys) dict operations; ``add`` re-inserts the key at the dict's end, so
  dict order IS the recency order (least recently stored first).
* eviction: when the key count passes ``max_keys`` the oldest ``evict_fraction`` of keys go in one
  pass (``islice`` from the dict's start), amortised O(1) per insert. A plain dict instead of an
  ``OrderedDict`` saves its ~50 B linked-list node per key; evicting in batches avoids the
  quadratic rescans a dict pays when popped from the front one key at a time.
* ``score``: ``map(dict.get)`` + ``accumulate(and_)`` + ``takewhile`` run in C and stop at the
  first block no allowed holder has; only the (at most #holders) points where the running mask
  shrinks are located in Python, by bisection. O(run) C steps + O(changes · log run) Python steps.
* engine map: a removal forgets the engine keys of blocks no tier holds any more
  (``remove_engine``/``forget_engine_keys``); what that misses (LRU evictions, cleared pods) is
  pruned once the map outgrows twice the key count, ``_EMAP_PRUNE_BATCH`` entries per write.
* the inner loops (bit set/clear, engine map) run in C when ``kvray._speedups`` is built
  (``kvray.core.fast``; pure-Python twins otherwise).
* ``clear_pod``: O(1). The holder gets a fresh slot; its old bit is *retired* and swept out of
  the masks incrementally (a bounded number of keys per mutating call) before the slot is reused.
  Retired bits are never attributed to a holder, so scores are exact while the sweep runs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate, chain, islice, repeat, takewhile
from operator import and_
from typing import Any

from kvray.core.fast import (
    U64Dict,
    U64Map,
    U64Values,
    add_engine,
    and_bits,
    apply_frames,
    apply_ops,
    clear_slots,
    forget_unindexed,
    lookup,
    or_bits,
    remove_engine,
    slot_keys,
)
from kvray.core.index.base import IndexStats, add_engine_generic, remove_engine_generic
from kvray.core.snapshot import decode_snapshot, encode_snapshot, engine_pairs, holder_keys
from kvray.types import GPU, PodId, Tier

_DICT_ENTRY_BYTES = 42  # measured sys.getsizeof(dict)/len at 250 k-1 M int keys (3.11)
_KEY_INT_BYTES = 36  # a u64 int object (>= 2^60 needs 3 digits of 30 bits)
_EMAP_PRUNE_BATCH = 2048  # engine-map entries checked per put_engine_map while pruning


@dataclass(slots=True)
class FrameApplied:
    """What ``MemoryIndex.apply_frames`` did with a run of one holder's frames."""

    stop: int
    """The index of the first frame not taken (the run's length: all were)."""
    ops: list[tuple[int, bytes]]
    """Change-stream ops in order: (0 add / 1 remove, packed keys), one per store and per run
    of removals that removed anything (what the general path records)."""
    pools: list[int]
    """Pool-gauge steps in order: +n blocks stored, -n removed."""
    stored: int
    removed: int
    unknown_removed: int
    unknown_parent: int


class MemoryIndex:
    """Bounded in-memory index (``name = "memory"``); see the module docstring for costs.

    Args:
        max_keys: most (key, tier) entries kept; the least recently stored go first.
        evict_fraction: share of ``max_keys`` evicted in one pass when the bound is hit.
        sweep_batch: keys examined per mutating call while retired slots are being swept.
        recency: keep dict order = store recency (what LRU eviction needs); an index that
            never evicts (a read replica, whose evictions arrive as removes) skips it: an add
            is then a ``get`` + store, about twice as fast as ``pop`` + re-insert.
    """

    name = "memory"

    def __init__(
        self,
        max_keys: int = 10_000_000,
        *,
        evict_fraction: float = 0.01,
        sweep_batch: int = 4096,
        recency: bool = True,
    ) -> None:
        self.max_keys = max_keys
        self.recency = recency
        self._evict_n = max(1, int(max_keys * evict_fraction))
        self._sweep_batch = sweep_batch
        self._evicted = 0
        self.evict_listener: Callable[[PodId, Tier, list[int]], None] | None = None
        """Called, per holder, with the keys the size bound dropped (read replicas mirror it)."""
        self._reset()

    def _reset(self) -> None:
        """Empty every structure (construction and ``restore``)."""
        self._tiers: dict[Tier, dict[int, int]] = {}
        self._slot: dict[PodId, int] = {}
        self._slot_pod: dict[int, PodId] = {}
        self._live = 0  # bitmask of live slots
        self._free: list[int] = []
        self._next_slot = 0
        self._retired = 0  # slots cleared, bits still present in some masks
        self._sweeping = 0  # the retired bits the current sweep removes
        self._sweep_iter: Iterator[tuple[Tier, int]] | None = None
        # engine key → request key; u64 values: every request key in its slot, no int object
        self._emap: dict[int, int] = U64Values()
        self._emap_sweep: Iterator[int] | None = None
        self._nkeys = 0

    # --- slots -----------------------------------------------------------------------------

    def _bit(self, pod: PodId) -> int:
        slot = self._slot.get(pod)
        if slot is None:
            if self._free:
                slot = self._free.pop()
            else:
                slot = self._next_slot
                self._next_slot += 1
            self._slot[pod] = slot
            self._slot_pod[slot] = pod
            self._live |= 1 << slot
        return 1 << slot

    def _mask_of(self, pods: Collection[str] | None) -> int:
        if pods is None:
            return self._live
        mask = 0
        for p in pods:
            slot = self._slot.get(PodId(p))
            if slot is not None:
                mask |= 1 << slot
        return mask

    # --- writes ----------------------------------------------------------------------------

    def add(self, pod: PodId, tier: Tier, keys: Sequence[int]) -> None:
        # With recency, a stored key moves to the dict's end: dict order is recency order.
        self._grew(or_bits(self._tier(tier), keys, self._bit(pod), self.recency))

    def add_held(self, pod: PodId, tier: Tier, keys: Sequence[int]) -> list[int]:
        """``add``; returns the positions of the keys ``pod`` already held in ``tier``."""
        held: list[int] = []
        self._grew(or_bits(self._tier(tier), keys, self._bit(pod), self.recency, held))
        return held

    def add_engine(self, pod: PodId, tier: Tier, keys: list[int], engine: list[int]) -> list[int]:
        """``add_held(pod, tier, keys)`` and ``put_engine_map(zip(engine, keys))`` in one pass."""
        if type(self).add_held is not MemoryIndex.add_held:  # a subclass keeps its accounting
            return add_engine_generic(self, pod, tier, keys, engine)
        bit = self._bit(pod)
        held: list[int] = []
        d = self._tier(tier)
        self._grew(add_engine(d, self._emap, keys, engine, bit, self.recency, held))
        self._after_engine_put()
        return held

    def remove_engine(self, pod: PodId, tier: Tier, engine: Sequence[int]) -> tuple[list[int], int]:
        """Resolve engine keys, remove ``pod`` from those blocks and forget the engine keys of
        blocks nobody holds any more; returns (the request keys resolved, how many were not)."""
        slot = self._slot.get(pod)
        d = self._tiers.get(tier)
        if type(self).remove is not MemoryIndex.remove or slot is None or d is None:
            return remove_engine_generic(self, pod, tier, engine)
        keys, unknown, deleted = remove_engine(
            d, self._emap, engine, ~(1 << slot), list(self._tiers.values())
        )
        self._nkeys -= deleted
        if self._retired:
            self._sweep_step()
        return keys, unknown

    def apply_frames(
        self,
        pod: PodId,
        payloads: list[Any],
        start: int,
        tag: int,
        root: int,
        block_size: int,
        copies: dict[int, int],
        limits: tuple[int, int, int],
    ) -> FrameApplied:
        """A run of one holder's frames, ``payloads[start:]`` in order (bytes, or the scans
        ``kvray.core.fast.scan_frame`` kept of them), in one C call
        (``kvray.core.fast.apply_frames``), keyed by request keys on the GPU tier, up to the
        first frame not in fast form (``FrameApplied.stop``); ``copies`` is the holder's GPU
        copy counts (engine key → copies beyond the first), kept as ``IndexWriter`` keeps them.
        Nothing is taken (``stop == start``) when the extension is not built, this is a
        subclass (it keeps its own accounting) or the holder has no GPU keys yet (its first
        frame takes the general path).

        The size bound and the retired-slot sweep run once after the run, not per event."""
        slot = self._slot.get(pod)
        d = self._tiers.get(GPU)
        if apply_frames is None or type(self) is not MemoryIndex or slot is None or d is None:
            return FrameApplied(start, [], [], 0, 0, 0, 0)
        bit = 1 << slot
        out = apply_frames(
            payloads, start, d, self._emap, list(self._tiers.values()), bit, ~bit, self.recency,
            tag, root, block_size, copies, *limits,
        )  # fmt: skip
        stop, ops, pools, stored, removed, unknown_removed, unknown_parent, added, deleted = out
        self._nkeys -= deleted
        self._grew(added)
        self._after_engine_put()
        return FrameApplied(stop, ops, pools, stored, removed, unknown_removed, unknown_parent)

    def apply_ops(self, ops: list[Any], start: int, holders: set[str]) -> int:
        """Apply change-stream ops from ``ops[start]`` on in one C call
        (``kvray.core.fast.apply_ops``) until one needs the caller (a speculative op, a clear,
        a new holder or tier); returns its index (``len(ops)``: all done; ``start``: none,
        and always without the extension or in a subclass). Holders that added keys join
        ``holders``."""
        if apply_ops is None or type(self) is not MemoryIndex:
            return start
        stop, added, deleted = apply_ops(ops, start, self._tiers, self._slot, holders)
        self._nkeys -= deleted
        self._grew(added)
        return stop  # type: ignore[no-any-return]

    def _tier(self, tier: Tier) -> dict[int, int]:
        d = self._tiers.get(tier)
        if d is None:
            # C tables (dicts without the extension); without recency nothing needs the order.
            d = self._tiers[tier] = U64Dict() if self.recency else U64Map()
        return d

    def _grew(self, added: int) -> None:
        """Bookkeeping after ``added`` new keys: the size bound, then the retired-slot sweep."""
        self._nkeys += added
        if self._nkeys > self.max_keys:
            self._evict()
        if self._retired:
            self._sweep_step()

    def remove(self, pod: PodId, tier: Tier, keys: Sequence[int]) -> None:
        slot = self._slot.get(pod)
        d = self._tiers.get(tier)
        if slot is None or d is None:
            return
        self._nkeys -= and_bits(d, keys, ~(1 << slot))
        if self._retired:
            self._sweep_step()

    def clear_pod(self, pod: PodId) -> None:
        slot = self._slot.pop(pod, None)
        if slot is None:
            return
        del self._slot_pod[slot]
        self._live &= ~(1 << slot)
        self._retired |= 1 << slot
        self._sweep_step()

    def clear_pods(self, pods: Iterable[PodId]) -> None:
        """``clear_pod`` for many holders at once, done now rather than swept a batch per call.

        One C pass over each tier clears all their bits from every key (``clear_slots``: per
        key, not per pair) and the slots are free at once. A read replica re-loading a shard's
        snapshot clears hundreds or thousands of holders; one sweep step each would keep their
        slots retired for thousands of calls and push new holders into ever wider masks.
        """
        mask = 0
        for pod in pods:
            slot = self._slot.pop(pod, None)
            if slot is not None:
                del self._slot_pod[slot]
                mask |= 1 << slot
        if not mask:
            return
        self._live &= ~mask
        for d in self._tiers.values():
            self._nkeys -= clear_slots(d, mask)
        self._free.extend(_slots(mask))

    def _evict(self) -> None:
        """Drop the oldest keys of the largest tier until under the bound (one batch)."""
        while self._nkeys > self.max_keys:
            tier, d = max(self._tiers.items(), key=lambda td: len(td[1]))
            victims = _oldest(d, self._evict_n)
            for k, _ in victims:
                del d[k]
            self._nkeys -= len(victims)
            self._evicted += len(victims)
            self._report_evicted(tier, victims)

    def _report_evicted(self, tier: Tier, victims: Sequence[tuple[int, int]]) -> None:
        """Tell ``evict_listener`` which live holder lost which keys."""
        if self.evict_listener is None or not victims:
            return
        for slot, ks in slot_keys(dict(victims), self._live).items():
            self.evict_listener(self._slot_pod[slot], tier, ks)

    def _sweep_step(self) -> None:
        """Clear retired bits from up to ``sweep_batch`` keys; free the slots when done."""
        if self._sweep_iter is None:
            self._sweeping = self._retired
            # Snapshot the key lists: the sweep must tolerate concurrent inserts/deletes.
            self._sweep_iter = chain.from_iterable(
                [zip(repeat(t), list(d)) for t, d in self._tiers.items()]
            )
        keep = ~self._sweeping
        for n, (tier, k) in enumerate(self._sweep_iter, 1):
            d = self._tiers[tier]
            m = d.get(k)
            if m is not None and m & self._sweeping:
                m &= keep
                if m:
                    d[k] = m
                else:
                    del d[k]
                    self._nkeys -= 1
            if n >= self._sweep_batch:
                return
        # Sweep finished: the swept slots are free again.
        done = self._sweeping
        self._retired &= ~done
        self._sweeping = 0
        self._sweep_iter = None
        slot = 0
        while done:
            if done & 1:
                self._free.append(slot)
            done >>= 1
            slot += 1
        if self._retired:
            self._sweep_iter = None  # bits retired during this sweep: next call starts anew

    # --- reads -----------------------------------------------------------------------------

    def pods(self) -> list[PodId]:
        return list(self._slot)

    def score(
        self,
        keys: Sequence[int],
        weights: Mapping[str, float],
        pods: Collection[str] | None = None,
    ) -> dict[PodId, float]:
        allowed = self._mask_of(pods)
        dicts = [(t, d) for t, d in self._tiers.items() if d]
        if not allowed or not keys or not dicts:
            return {}
        if len(dicts) == 1:
            masks = map(dicts[0][1].get, keys, repeat(0))
        else:
            gets = [map(d.get, keys, repeat(0)) for _, d in dicts]
            masks = map(_or_all, *gets)
        # levels[j] = holders with blocks 0..j-1 (levels[0] = allowed); stops at the first 0.
        levels = list(takewhile(bool, accumulate(chain((allowed,), masks), and_)))
        run_of = _runs(levels)
        if not run_of:
            return {}
        slot_pod = self._slot_pod
        weights_by_tier = {t: weights.get(t, 1.0) for t, _ in dicts}
        top = max(weights_by_tier.values())
        result: dict[PodId, float] = {}
        if len(dicts) == 1 or len(set(weights_by_tier.values())) == 1:
            for bits, run in run_of:
                score = run * top
                for slot in _slots(bits):
                    result[slot_pod[slot]] = score
            return result
        # Several tiers with different weights: per block, each holder's best tier counts.
        n = len(levels) - 1
        tier_masks = [(weights_by_tier[t], list(map(d.get, keys[:n], repeat(0)))) for t, d in dicts]
        tier_masks.sort(key=lambda wm: -wm[0])
        best_w, best_masks = tier_masks[0]
        for bits, run in run_of:
            for slot in _slots(bits):
                bit = 1 << slot
                total = 0.0
                for i in range(run):
                    if best_masks[i] & bit:
                        total += best_w
                        continue
                    for w, ms in tier_masks[1:]:
                        if ms[i] & bit:
                            total += w
                            break
                result[slot_pod[slot]] = total
        return result

    def holders(self, keys: Sequence[int]) -> list[dict[PodId, set[Tier]]]:
        out: list[dict[PodId, set[Tier]]] = []
        for k in keys:
            entry: dict[PodId, set[Tier]] = {}
            for tier, d in self._tiers.items():
                m = d.get(k, 0) & self._live
                for slot in _slots(m):
                    entry.setdefault(self._slot_pod[slot], set()).add(tier)
            out.append(entry)
        return out

    # --- engine map ------------------------------------------------------------------------

    def put_engine_map(self, pairs: Sequence[tuple[int, int]]) -> None:
        self._emap.update(pairs)
        self._after_engine_put()

    def _after_engine_put(self) -> None:
        if self._emap_sweep is None and len(self._emap) > 2 * self._nkeys + 65536:
            # Forget engine keys whose request key is no longer indexed (evicted or removed),
            # a bounded slice per call: a whole pass over ~10^5 entries would stall the shard
            # for tens of milliseconds (event-to-visible lag p99).
            self._emap_sweep = iter(list(self._emap))
        if self._emap_sweep is not None:
            self._prune_emap_step()

    def get_engine_map(self, engine_keys: Sequence[int]) -> list[int | None]:
        return lookup(self._emap, engine_keys)  # type: ignore[no-any-return]

    def forget_engine_keys(self, engine_keys: Sequence[int]) -> int:
        """Drop the engine keys whose request key no tier holds any more (the writer calls this
        after a removal, so the map shrinks with the index instead of waiting for a sweep)."""
        return forget_unindexed(self._emap, engine_keys, list(self._tiers.values()))  # type: ignore[no-any-return]

    def _prune_emap_step(self) -> None:
        assert self._emap_sweep is not None
        emap = self._emap
        dicts = list(self._tiers.values())
        one = dicts[0] if len(dicts) == 1 else None
        for n, e in enumerate(self._emap_sweep, 1):
            r = emap.get(e)
            if r is not None and (
                r not in one if one is not None else not any(r in d for d in dicts)
            ):
                del emap[e]
            if n >= _EMAP_PRUNE_BATCH:
                return
        self._emap_sweep = None
        if type(emap) is dict:  # deletions leave a dict's size: compact it (a C copy)
            self._emap = dict(emap)  # (a U64Map shrinks as it empties)

    # --- stats, snapshot -------------------------------------------------------------------

    def stats(self) -> IndexStats:
        pairs = 0
        mask_bytes = 0
        live = self._live
        for d in self._tiers.values():
            if type(d) is not dict:  # a C table counts in C, without an int per value; its
                pairs += d.pairs(live)  # type: ignore[attr-defined]  # masks: boxed_bytes
                continue
            for m in d.values():
                pairs += (m & live).bit_count()
                if m > 255:
                    mask_bytes += sys.getsizeof(m)
        # The tables' real size (pop + re-insert leaves dummies until the next resize), plus
        # the key int objects a dict holds (a C table holds none); the engine map likewise.
        key_bytes = sum(_map_bytes(d) for d in self._tiers.values())
        emap_bytes = _map_bytes(self._emap)
        return IndexStats(
            backend=self.name,
            keys=self._nkeys,
            pairs=pairs,
            pods=len(self._slot),
            evicted_keys=self._evicted,
            engine_map_entries=len(self._emap),
            bytes_estimate=key_bytes + mask_bytes + emap_bytes,
            per_tier={t: len(d) for t, d in self._tiers.items()},
        )

    def holder_keys(self, packed: bool = False) -> dict[str, dict[str, Any]]:
        """Holder → tier → the keys it holds (``packed``: as u64 little-endian bytes, no int
        object per pair): the tables inverted, in C (``slot_keys``)."""
        holders: dict[str, dict[str, Any]] = {}
        for tier, d in self._tiers.items():
            for slot, ks in slot_keys(d, self._live, packed).items():
                holders.setdefault(self._slot_pod[slot], {})[tier] = ks
        return holders

    def snapshot(self) -> bytes:
        return encode_snapshot(self.holder_keys(packed=True), self._emap.items())

    def restore(self, data: bytes) -> None:
        snap = decode_snapshot(data)
        self._reset()
        for pod, tier, keys in holder_keys(snap):  # v2: u64 buffers, read by or_bits in place
            self.add(PodId(pod), Tier(tier), keys)
        self._emap.update(engine_pairs(snap))

    def close(self) -> None:
        self._tiers.clear()
        self._emap.clear()


def _oldest(d: dict[int, int], n: int) -> list[tuple[int, int]]:
    """The first ``n`` items of a tier (a U64Dict reads them without listing the rest)."""
    oldest = getattr(d, "oldest", None)
    if oldest is not None:
        return oldest(n)  # type: ignore[no-any-return]
    return list(islice(d.items(), n))


def _map_bytes(d: dict[int, int]) -> int:
    """A dict's or C table's size plus, for a dict, its key int objects (its values are counted
    by the caller: they are shared small ints or masks); for a C table, the int objects of the
    values its slots cannot hold (``boxed_bytes``)."""
    size = sys.getsizeof(d)
    if type(d) is dict:
        return size + len(d) * _KEY_INT_BYTES
    return size + int(d.boxed_bytes())  # type: ignore[attr-defined]


def _or_all(*masks: int) -> int:
    m = 0
    for x in masks:
        m |= x
    return m


def _slots(bits: int) -> Iterator[int]:
    """Slot numbers of the set bits, lowest first."""
    while bits:
        low = bits & -bits
        yield low.bit_length() - 1
        bits ^= low


def _runs(levels: list[int]) -> list[tuple[int, int]]:
    """From a non-increasing chain of masks, (holders whose run is exactly r, r) for r ≥ 1.

    ``levels[j]`` holds the holders whose run is ≥ j; the chain only shrinks, so the places
    where it changes are found by bisection between equal ends.
    """
    n = len(levels) - 1
    if n < 1:
        return []
    out: list[tuple[int, int]] = [(levels[n], n)]
    stack = [(1, n)]  # invariant: find changes within levels[lo..hi]
    while stack:
        lo, hi = stack.pop()
        if levels[lo] == levels[hi]:
            continue
        if hi - lo == 1:
            out.append((levels[lo] & ~levels[hi], lo))
            continue
        mid = (lo + hi) // 2
        stack.append((lo, mid))
        stack.append((mid, hi))
    return out
