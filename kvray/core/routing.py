"""The routing decision: which candidate pod a prompt should go to, given kvray's index.

One function decides for every door kvray has (``POST /route``, ``Client.route``, the Serve
request router, the demo's kvray row). It estimates, per candidate, the work the request
would cost there, in KV blocks, and picks the cheapest::

    cost(p) = miss(p) · (1 + fullness · fill(p))  +  w · load(p)

* ``miss(p)``: blocks of the prompt ``p`` must prefill (its blocks minus ``p``'s cached
  prefix from the index, tier-weighted).
* ``fill(p)`` ∈ [0, 1]: how full ``p``'s KV pool is (``PoolGauges``: blocks held over the pool
  size learned from its events). New blocks on a full pool evict other prefixes, which later
  requests then miss; on a pool with room they cost nothing more.
* ``load(p)``: work queued on ``p``, in blocks: what the caller says (queued tokens / block
  size, ``w = load_weight``), or else kvray's own estimate, ``RecentLoad``: the work it
  recently sent ``p`` (blocks to prefill, plus ``request_blocks`` per request for its
  decode), decaying with a half-life (``w = self_load_weight``). Without it an idle fleet
  would send every new prefix to one pod, and a hot prefix would pin all its traffic on one
  pod however busy.

Costs within ``tie_blocks`` of the best are a tie, broken by rendezvous hashing of the prompt's
first block that no candidate holds (``tie_key``) with the pod id: the same prefix keeps going
to the same pod while different prefixes spread evenly, across router processes too (no shared
state needed). Hashing the divergence point rather than the first block matters: prompts that
share a header (every chat of a model starts with the same template tokens) would otherwise
all rank the pods alike and pile onto one.

Invariant: pure and deterministic given its inputs and the clock; no I/O.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import xxhash


@dataclass(slots=True, frozen=True)
class RoutingWeights:
    """How the cost's terms weigh against a block of prefill."""

    load_weight: float = 1.0
    """A block of the caller's queued work counts as this many blocks of prefill (1.0:
    estimated time to first token, as Dynamo's KV router weighs it)."""
    self_load_weight: float = 0.5
    """The same for kvray's own estimate (``RecentLoad``), used when the caller gives no load.
    Lower than 1: it counts what kvray routed recently, not what is still queued (a pod
    prefills a routed block in well under its half-life), so at full weight it would move
    requests off the pod caching them for load that is already gone."""
    fullness: float = 1.0
    """Extra cost of a new block on a full pool (× its fill fraction)."""
    half_life_s: float = 1.0
    """Half-life of ``RecentLoad``, kvray's own load estimate when the caller gives none."""
    tie_blocks: float = 0.5
    """Costs this close to the best are a tie (broken by rendezvous hashing)."""
    request_blocks: float = 16.0
    """Work every request brings besides its prefill (its decode), in blocks, for
    ``RecentLoad``: a cached prompt still keeps its pod busy. 16 blocks = 256 tokens."""


@dataclass(slots=True, frozen=True)
class Decision:
    """A routing decision and what it was based on."""

    pod: str
    reason: str
    """``cache`` (the chosen pod has the longest cached prefix), ``load`` (a pod with a
    shorter prefix won on load or fullness) or ``spread`` (no candidate has any of it)."""
    hit_blocks: float
    """The chosen pod's cached prefix (tier-weighted blocks)."""
    new_blocks: float
    """Blocks the chosen pod must prefill."""
    costs: dict[str, float] = field(default_factory=dict)


def rendezvous(first_key: int, pod: str) -> int:
    """Highest-random-weight of ``pod`` for a prompt whose tie key is ``first_key``."""
    return xxhash.xxh64_intdigest(pod.encode(), seed=first_key & 0xFFFFFFFFFFFFFFFF)


def tie_key(keys: Sequence[int], hits: Mapping[str, float]) -> int:
    """The key ties are hashed on: the prompt's first block that no candidate holds (its last
    block when some candidate holds them all; 0 for a prompt shorter than a block)."""
    if not keys:
        return 0
    held = int(max(hits.values(), default=0.0))
    return keys[min(max(held, 0), len(keys) - 1)]


class RecentLoad:
    """Blocks recently sent to each pod to prefill, decaying exponentially.

    Args:
        half_life_s: after this long a routed block counts half.
        clock: time source (injected in tests and simulations).
    """

    __slots__ = ("_clock", "_load", "_rate")

    def __init__(self, half_life_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        if half_life_s <= 0:
            raise ValueError("half_life_s must be > 0")
        self._rate = math.log(2) / half_life_s
        self._clock = clock
        self._load: dict[str, tuple[float, float]] = {}  # pod -> (value, at)

    def get(self, pod: str, now: float | None = None) -> float:
        got = self._load.get(pod)
        if got is None:
            return 0.0
        value, at = got
        t = self._clock() if now is None else now
        return value * math.exp(-self._rate * max(0.0, t - at))

    def add(self, pod: str, blocks: float, now: float | None = None) -> None:
        t = self._clock() if now is None else now
        self._load[pod] = (self.get(pod, t) + blocks, t)
        if len(self._load) > 4096:  # forget pods whose load decayed away
            self._load = {p: v for p, v in self._load.items() if self.get(p, t) > 1e-3}


class PoolGauges:
    """Each holder's KV pool, learned from its events: blocks held, and the pool's size.

    vLLM evicts a cached block only when it needs a free one, so the most blocks a pod has held
    by the time it evicts is its pool size (less the partial blocks of running requests).
    Before its first eviction a pod's size is unknown: it has room.
    """

    __slots__ = ("_dirty", "capacity", "held")

    def __init__(self) -> None:
        self.held: dict[str, int] = {}
        self.capacity: dict[str, int] = {}
        """Holders that evicted: the most blocks they ever held."""
        self._dirty: set[str] = set()

    def stored(self, holder: str, n: int) -> None:
        self.held[holder] = self.held.get(holder, 0) + n
        if holder in self.capacity and self.held[holder] > self.capacity[holder]:
            self.capacity[holder] = self.held[holder]
        self._dirty.add(holder)

    def removed(self, holder: str, n: int) -> None:
        held = self.held.get(holder, 0)
        if held > self.capacity.get(holder, 0):
            self.capacity[holder] = held
        self.held[holder] = max(0, held - n)
        self._dirty.add(holder)

    def cleared(self, holder: str) -> None:
        self.held.pop(holder, None)  # the pool keeps its size
        self._dirty.add(holder)

    def forget(self, holder: str) -> None:
        self.held.pop(holder, None)
        self.capacity.pop(holder, None)
        self._dirty.add(holder)

    def load(self, pools: Mapping[str, tuple[int, int] | list[int]]) -> None:
        """Replace the content with ``as_dict()``'s (a snapshot's)."""
        self.held = {h: int(v[0]) for h, v in pools.items() if v[0]}
        self.capacity = {h: int(v[1]) for h, v in pools.items() if v[1]}
        self._dirty.clear()

    def take_changes(self) -> dict[str, tuple[int, int]]:
        """``(held, capacity)`` of the holders changed since the last call."""
        if not self._dirty:
            return {}
        out = {h: self.get(h) for h in self._dirty}
        self._dirty = set()
        return out

    def get(self, holder: str) -> tuple[int, int]:
        """``(held, capacity)``; capacity 0 when not learned yet."""
        return self.held.get(holder, 0), self.capacity.get(holder, 0)

    def as_dict(self) -> dict[str, tuple[int, int]]:
        return {h: self.get(h) for h in set(self.held) | set(self.capacity)}


def fill_fractions(
    pools: Mapping[str, tuple[int, int]], candidates: Sequence[str]
) -> dict[str, float]:
    """How full each candidate's pool is, in [0, 1].

    A pod whose size is not learned yet is measured against the largest learned size among
    the candidates (a pod that just joined looks empty); with none learned, every pod is 0.
    """
    known = [pools[c][1] for c in candidates if c in pools and pools[c][1] > 0]
    ref = max(known) if known else 0
    out: dict[str, float] = {}
    for c in candidates:
        held, cap = pools.get(c, (0, 0))
        size = cap or ref
        out[c] = min(1.0, held / size) if size > 0 else 0.0
    return out


def decide(
    candidates: Sequence[str],
    hits: Mapping[str, float],
    n_blocks: int,
    first_key: int,
    load: Mapping[str, float],
    fill: Mapping[str, float] | None = None,
    weights: RoutingWeights = RoutingWeights(),  # noqa: B008 - frozen, shared
) -> Decision:
    """Pick the candidate with the lowest estimated cost (see the module docstring).

    Args:
        candidates: the pods to choose from (at least one).
        hits: cached prefix per pod, tier-weighted blocks (absent: 0).
        n_blocks: full blocks in the prompt.
        first_key: the key ties are hashed on (``tie_key``).
        load: queued work per pod, in blocks (absent: 0).
        fill: pool fill fraction per pod (absent: 0).
        weights: the cost's weights.

    Raises:
        ValueError: no candidates.
    """
    if not candidates:
        raise ValueError("no candidate pods")
    fill = fill or {}
    costs: dict[str, float] = {}
    for p in candidates:
        miss = max(0.0, n_blocks - hits.get(p, 0.0))
        costs[p] = miss * (1.0 + weights.fullness * fill.get(p, 0.0)) + (
            weights.load_weight * load.get(p, 0.0)
        )
    best = min(costs.values())
    tied = [p for p in candidates if costs[p] <= best + weights.tie_blocks]
    pod = tied[0] if len(tied) == 1 else max(tied, key=lambda p: rendezvous(first_key, p))
    hit = hits.get(pod, 0.0)
    top = max((hits.get(p, 0.0) for p in candidates), default=0.0)
    reason = "spread" if top <= 0 else ("cache" if hit >= top else "load")
    return Decision(pod, reason, hit, max(0.0, n_blocks - hit), costs)


class Decider:
    """``decide`` with kvray's own load estimate for callers that give none.

    Args:
        weights: the cost's weights (``half_life_s`` sets the estimate's decay).
        clock: time source.
    """

    def __init__(
        self,
        weights: RoutingWeights = RoutingWeights(),  # noqa: B008 - frozen, shared
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.weights = weights
        self.recent = RecentLoad(weights.half_life_s, clock)
        self._clock = clock
        self.decisions: dict[str, int] = {"cache": 0, "load": 0, "spread": 0}

    def choose(
        self,
        candidates: Sequence[str],
        hits: Mapping[str, float],
        keys: Sequence[int],
        *,
        load: Mapping[str, float] | None = None,
        load_unit: float = 1.0,
        pools: Mapping[str, tuple[int, int]] | None = None,
        load_weight: float | None = None,
    ) -> Decision:
        """Decide, then remember the decision's prefill work as load on the chosen pod.

        Args:
            candidates: the pods to choose from.
            hits: cached prefix per pod (kvray's scores).
            keys: the prompt's block keys.
            load: the caller's queued work per pod (None: kvray's own estimate).
            load_unit: ``load`` is in units of this many blocks (``1 / block_size`` when it
                counts tokens).
            pools: ``(held, capacity)`` per pod (``PoolGauges``), for fullness.
            load_weight: overrides ``weights.load_weight`` for the caller's ``load``.
        """
        now = self._clock()
        w = self.weights
        if load is None:
            lw = w.self_load_weight
            blocks = {p: self.recent.get(p, now) for p in candidates}
        else:
            lw = w.load_weight if load_weight is None else load_weight
            blocks = {p: float(load.get(p, 0.0)) * load_unit for p in candidates}
        if lw != w.load_weight:
            w = dataclasses.replace(w, load_weight=lw)
        fill = fill_fractions(pools, candidates) if pools else None
        held = {p: hits.get(p, 0.0) for p in candidates}
        d = decide(candidates, hits, len(keys), tie_key(keys, held), blocks, fill, w)
        self.recent.add(d.pod, d.new_blocks + self.weights.request_blocks, now)
        self.decisions[d.reason] += 1
        return d
