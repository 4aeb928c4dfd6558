"""The index backend contract: which holder has which block key, in which tier.

Every backend (in-memory LRU, byte-budgeted, Redis) implements :class:`IndexBackend`, and one
contract test suite (``tests/unit/test_index_contract.py``) runs against all of them. Keys are
u64 ints already namespaced by model (see ``core.keys``); the backend never interprets them.

Semantics every backend keeps:

* ``add``/``remove`` are idempotent per (key, holder, tier).
* ``clear_pod`` makes the holder hold nothing, in every tier, at once (O(1) amortised in the
  memory backends).
* ``score`` is the longest consecutive prefix of ``keys`` held by each holder, summed with the
  weight of the best tier the holder has for each block (spec §5); holders lacking block 0 are
  absent, not 0.
* The engine map (engine key → request key) lives in the backend so that it is shared by every
  reader of the same backend (e.g. two kvray deployments on one Redis); it may forget entries
  whose request key is no longer indexed.
"""

from __future__ import annotations

import functools
import heapq
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from kvray.types import GPU, PodId, Tier

SPECULATIVE = Tier("SPECULATIVE")
"""The tier holding speculative entries recorded by ``record_route`` (short TTL)."""

DEFAULT_TIER_WEIGHTS: Mapping[str, float] = {"GPU": 1.0, "CPU": 0.8}
"""llm-d's defaults; a tier missing from the mapping weighs 1.0."""


class SpeculativeEntries:
    """Speculative entries: who holds which keys until when.

    A key recorded again for the same holder lives until its latest deadline (an earlier
    record's expiry does not cut it short). ``discard`` drops keys the holder's own events
    settled: a stored block confirms the entry (the real tier holds it now), a removed one
    refutes it; either way the speculative entry must not outlive the truth.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, PodId, Sequence[int]]] = []
        self._due: dict[PodId, dict[int, float]] = {}  # holder -> key -> latest deadline
        self._n = 0  # tie-breaker: equal deadlines pop in insertion order

    def __bool__(self) -> bool:
        return bool(self._heap)

    def holds(self, holder: PodId) -> bool:
        """Whether ``holder`` has live speculative keys."""
        return holder in self._due

    def push(self, deadline: float, holder: PodId, keys: Sequence[int]) -> None:
        due = self._due.setdefault(holder, {})
        for k in keys:
            due[k] = deadline
        self._n += 1
        heapq.heappush(self._heap, (deadline, self._n, holder, keys))

    def discard(self, holder: PodId, keys: Sequence[int]) -> list[int]:
        """Forget ``keys`` of ``holder``; returns those that were speculative (for the caller
        to remove from the backend's speculative tier)."""
        due = self._due.get(holder)
        if not due:
            return []
        gone = [k for k in keys if due.pop(k, None) is not None]
        if not due:
            del self._due[holder]
        return gone

    def forget(self, holder: PodId) -> None:
        """Drop every entry of ``holder`` (its content was cleared)."""
        self._due.pop(holder, None)

    def expire(self, now: float, backend: IndexBackend) -> int:
        """Remove the keys due at ``now`` from ``backend``'s speculative tier; returns how
        many holders had keys expire."""
        n = 0
        while self._heap and self._heap[0][0] <= now:
            _, _, holder, keys = heapq.heappop(self._heap)
            due = self._due.get(holder)
            if not due:
                continue  # discarded or cleared since
            gone = [k for k in keys if due.get(k, math.inf) <= now]
            if not gone:
                continue  # recorded again later, or settled by events
            for k in gone:
                del due[k]
            if not due:
                del self._due[holder]
            backend.remove(holder, SPECULATIVE, gone)
            n += 1
        return n


AddEngine = Callable[[PodId, Tier, list[int], list[int]], list[int]]
"""``(pod, tier, keys, engine)``: store ``keys`` for ``pod`` and map ``engine[i]`` → ``keys[i]``;
returns the positions of the keys ``pod`` already held in ``tier`` (see ``ReportsHeld``)."""
AddHeld = Callable[[PodId, Tier, Sequence[int]], list[int]]
"""``(pod, tier, keys)``: ``add``, returning the positions of the keys ``pod`` already held."""
RemoveEngine = Callable[[PodId, Tier, Sequence[int]], tuple[list[int], int]]
"""``(pod, tier, engine)``: resolve engine keys, remove ``pod`` from those blocks, let the backend
forget engine keys nobody needs; returns (the request keys resolved, how many were unknown)."""


@runtime_checkable
class FusedEngineOps(Protocol):
    """Optional capability: store and remove with engine keys in one pass (the memory
    backends, the journal)."""

    def add_engine(self, pod: PodId, tier: Tier, keys: list[int], engine: list[int]) -> list[int]:
        """``add_held`` of ``keys`` and engine key → key for each pair; returns the positions
        of the keys ``pod`` already held in ``tier``."""
        ...

    def remove_engine(self, pod: PodId, tier: Tier, engine: Sequence[int]) -> tuple[list[int], int]:
        """Resolve ``engine`` keys, ``remove`` them; returns (keys removed, unknown count)."""
        ...


@runtime_checkable
class ReportsHeld(Protocol):
    """Optional capability: an ``add`` that says which keys the holder already held.

    vLLM does not de-duplicate blocks: a recomputed block is stored a second time under the same
    hash, and each copy's eviction publishes its own ``BlockRemoved``. The writer counts the
    extra copies from these positions so that the first removal does not drop a block the pod
    still serves. A backend without this capability cannot tell, and the writer then drops the
    block at the first removal (under-reporting it until it is stored again)."""

    def add_held(self, pod: PodId, tier: Tier, keys: Sequence[int]) -> list[int]:
        """``add``; returns the positions ``i`` of the keys ``pod`` already held in ``tier``
        (in order; a key listed twice counts as held the second time)."""
        ...


@runtime_checkable
class ForgetsEngineKeys(Protocol):
    """Optional capability: drop engine keys whose request key nobody holds any more."""

    def forget_engine_keys(self, engine_keys: Sequence[int]) -> int: ...


@runtime_checkable
class EpochMarked(Protocol):
    """Optional capability of shared backends (Redis) that can lose their content while a
    shard lives on: a token written at start tells, after an outage, whether it survived."""

    def set_epoch(self, token: str) -> None: ...

    def get_epoch(self) -> str | None: ...


def held_op(backend: IndexBackend) -> AddHeld:
    """The backend's ``add_held`` when it has one, else its ``add`` reporting nothing held."""
    if isinstance(backend, ReportsHeld):
        return backend.add_held
    return functools.partial(_add_reporting_nothing, backend)


def _add_reporting_nothing(
    backend: IndexBackend, pod: PodId, tier: Tier, keys: Sequence[int]
) -> list[int]:
    backend.add(pod, tier, keys)
    return []


def engine_ops(backend: IndexBackend) -> tuple[AddEngine, RemoveEngine]:
    """The backend's one-pass ``add_engine``/``remove_engine`` when it has them
    (``FusedEngineOps``), else the same through its ``IndexBackend`` methods."""
    if isinstance(backend, FusedEngineOps):
        return backend.add_engine, backend.remove_engine
    return (
        functools.partial(add_engine_generic, backend),
        functools.partial(remove_engine_generic, backend),
    )


def add_engine_generic(
    backend: IndexBackend, pod: PodId, tier: Tier, keys: list[int], engine: list[int]
) -> list[int]:
    """``add_engine`` through the ``IndexBackend`` methods (and ``add_held`` when it has it)."""
    held = held_op(backend)(pod, tier, keys)
    backend.put_engine_map(list(zip(engine, keys, strict=True)))
    return held


def remove_engine_generic(
    backend: IndexBackend, pod: PodId, tier: Tier, engine: Sequence[int]
) -> tuple[list[int], int]:
    """``remove_engine`` through the ``IndexBackend`` methods (and an optional
    ``forget_engine_keys``: a shared Redis keeps its map)."""
    keys = [k for k in backend.get_engine_map(engine) if k is not None]
    backend.remove(pod, tier, keys)
    if isinstance(backend, ForgetsEngineKeys):
        backend.forget_engine_keys(engine)  # blocks nobody holds now: drop their engine keys
    return keys, len(engine) - len(keys)


def normalize_tier(medium: str | None) -> Tier:
    """Map an event's ``medium`` to a tier name: nil means GPU; names are upper-cased."""
    if not medium:
        return GPU
    return Tier(medium.upper())


def tier_weight(weights: Mapping[str, float], tier: str) -> float:
    """The weight of ``tier`` (1.0 when the mapping does not name it)."""
    return weights.get(tier, 1.0)


@dataclass(slots=True)
class IndexStats:
    """A backend's size and activity, as plain data (``kvray.metrics`` publishes it)."""

    backend: str
    """Registry name of the backend."""
    keys: int = 0
    """Distinct (key, tier) entries held."""
    pairs: int = 0
    """(block key, holder, tier) triples held; the denominator of bytes per pair."""
    pods: int = 0
    """Holders with a slot (holding, or cleared but not yet swept)."""
    evicted_keys: int = 0
    """Keys dropped by the size bound since start."""
    engine_map_entries: int = 0
    """Entries in the engine key → request key map."""
    bytes_estimate: int = 0
    """Estimated bytes held by the index structures (0 when unknown, e.g. Redis)."""
    per_tier: dict[str, int] = field(default_factory=dict)
    """Keys per tier."""


@runtime_checkable
class IndexBackend(Protocol):
    """Where block keys live. All methods are synchronous and must not raise on unknown pods."""

    name: str

    def add(self, pod: PodId, tier: Tier, keys: Sequence[int]) -> None:
        """Record that ``pod`` holds ``keys`` in ``tier``."""
        ...

    def remove(self, pod: PodId, tier: Tier, keys: Sequence[int]) -> None:
        """Record that ``pod`` no longer holds ``keys`` in ``tier``."""
        ...

    def clear_pod(self, pod: PodId) -> None:
        """Forget everything ``pod`` holds, in every tier."""
        ...

    def pods(self) -> list[PodId]:
        """Holders that currently hold at least one key (or were added and not cleared)."""
        ...

    def score(
        self,
        keys: Sequence[int],
        weights: Mapping[str, float],
        pods: Collection[str] | None = None,
    ) -> dict[PodId, float]:
        """Longest-consecutive-prefix score per holder (spec §5), restricted to ``pods``."""
        ...

    def holders(self, keys: Sequence[int]) -> list[dict[PodId, set[Tier]]]:
        """For each key, which holders hold it in which tiers (slow path; tests and tools)."""
        ...

    def put_engine_map(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Remember engine key → request key for each pair."""
        ...

    def get_engine_map(self, engine_keys: Sequence[int]) -> list[int | None]:
        """Resolve engine keys to request keys; ``None`` where unknown."""
        ...

    def stats(self) -> IndexStats:
        """Sizes and counters."""
        ...

    def snapshot(self) -> bytes:
        """Serialise the whole index in the portable snapshot format (see ``core.snapshot``)."""
        ...

    def restore(self, data: bytes) -> None:
        """Replace the index content with a snapshot taken by any backend."""
        ...

    def close(self) -> None:
        """Release resources (connections); the backend is unusable afterwards."""
        ...
