"""Routing policies the simulator compares on one trace and one fleet.

Invariant: a policy decides from its ``RouteContext`` alone (plus what it remembers of its own
past decisions); it never reads or changes a pod, so every policy can be replayed offline on the
same trace and the comparison is fair.

Policies, and what each needs in the context (``Policy.needs``):

==================  ==================  ================================================
name                needs               decision
==================  ==================  ================================================
``random``          -                   uniform choice (seeded)
``round-robin``     -                   next pod in turn
``least-loaded``    loads               least outstanding prefill work
``approx-prefix``   loads               Ray Serve LLM's ``PrefixCacheAffinityRouter``: a prefix
                                        tree of its own past routing decisions, a match-rate
                                        threshold and a load-imbalance fallback
``kvray``           scores, loads       longest cached prefix per kvray's index
``oracle``          truth, loads        longest cached prefix per the pods themselves
==================  ==================  ================================================

``kvray`` and ``oracle`` take a ``load_weight`` (see ``blend``): 0 is pure cache affinity, 1
picks the pod with the least estimated time to first token, larger values balance load harder.
Exact ties go to the less loaded pod, then to the pod routed to least recently.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Need = Literal["loads", "scores", "truth"]
POLICY_NAMES = ("kvray", "oracle", "approx-prefix", "least-loaded", "round-robin", "random")


@dataclass(slots=True, frozen=True)
class RouteContext:
    """Everything a policy may look at to route one request."""

    t: float
    """Arrival time (simulated seconds)."""
    tokens: Sequence[int]
    """The prompt's token ids."""
    pods: tuple[str, ...]
    """Candidate pods, in index order."""
    block_size: int
    """Tokens per KV block on the pods."""
    lora: str | None = None
    """LoRA adapter, or None for the base model."""
    loads: Mapping[str, float] = field(default_factory=dict)
    """Outstanding prefill tokens per pod (absent: 0)."""
    queue_lens: Mapping[str, int] = field(default_factory=dict)
    """Requests still prefilling per pod (absent: 0)."""
    scores: Mapping[str, float] | None = None
    """kvray's scores: cached leading blocks per pod, tier-weighted (absent: 0)."""
    truth: Mapping[str, int] | None = None
    """Ground truth: cached leading blocks per pod."""

    @property
    def n_blocks(self) -> int:
        """Full blocks in the prompt (what a prefix cache can hold of it)."""
        return len(self.tokens) // self.block_size


class Policy(ABC):
    """A routing policy: ``choose`` a pod, then learn from the decision in ``routed``."""

    name: str = "policy"
    needs: frozenset[Need] = frozenset()

    @abstractmethod
    def choose(self, ctx: RouteContext) -> str:
        """The pod to send the request to (one of ``ctx.pods``)."""

    def routed(self, ctx: RouteContext, pod: str) -> None:  # noqa: B027 - optional hook
        """Called after ``choose`` with the pod the request went to (default: nothing)."""

    def predicted_blocks(self, ctx: RouteContext, pod: str) -> float | None:
        """Blocks the policy believes ``pod`` has cached for this prompt (None: no belief).

        Called after ``choose`` and before ``routed``.
        """
        return None


class _Rotation:
    """Tie-break: among equally good pods, the least loaded, then the one routed to least
    recently (never-used pods first, by index).

    Without the rotation, an idle fleet (every load 0, no cached prefix anywhere) would send
    every new prefix to the same pod and leave others unused; a real router breaks such ties
    at random or in turn.
    """

    __slots__ = ("_last", "_n")

    def __init__(self) -> None:
        self._last: dict[str, int] = {}
        self._n = 0

    def pick(self, tied: Sequence[str], ctx: RouteContext) -> str:
        return min(
            tied,
            key=lambda p: (ctx.loads.get(p, 0.0), ctx.queue_lens.get(p, 0), self._last.get(p, -1)),
        )

    def note(self, pod: str) -> None:
        self._n += 1
        self._last[pod] = self._n


class RandomPolicy(Policy):
    """Uniformly random (seeded, so runs repeat)."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def choose(self, ctx: RouteContext) -> str:
        return ctx.pods[self._rng.randrange(len(ctx.pods))]


class RoundRobinPolicy(Policy):
    """Each pod in turn."""

    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, ctx: RouteContext) -> str:
        pod = ctx.pods[self._next % len(ctx.pods)]
        self._next += 1
        return pod


class LeastLoadedPolicy(Policy):
    """Least outstanding prefill work (then fewest queued requests, then in turn)."""

    name = "least-loaded"
    needs = frozenset({"loads"})

    def __init__(self) -> None:
        self._ties = _Rotation()

    def choose(self, ctx: RouteContext) -> str:
        return self._ties.pick(ctx.pods, ctx)

    def routed(self, ctx: RouteContext, pod: str) -> None:
        self._ties.note(pod)


def blend(
    cached_blocks: Mapping[str, float],
    loads: Mapping[str, float],
    pods: Sequence[str],
    *,
    n_blocks: int,
    prompt_tokens: int,
    load_weight: float,
) -> dict[str, float]:
    """Each pod's value: cached share of the prompt minus ``load_weight`` x normalised load.

    Load is normalised by the prompt's own size (outstanding prefill tokens / prompt tokens),
    which puts both terms in the same unit, "prefills of this prompt": with ``load_weight=1``
    the best pod is the one with the least estimated time to first token (wait for the queue,
    then prefill the uncached rest); 0 ignores load; above 1 load counts more than cache.

    Args:
        cached_blocks: leading blocks cached per pod (absent: 0).
        loads: outstanding prefill tokens per pod (absent: 0).
        pods: the candidates.
        n_blocks: full blocks in the prompt.
        prompt_tokens: tokens in the prompt.
        load_weight: how much load counts against cache affinity.

    Returns:
        pod -> value; higher is better.
    """
    denom_blocks = max(n_blocks, 1)
    denom_tokens = max(prompt_tokens, 1)
    return {
        p: cached_blocks.get(p, 0.0) / denom_blocks - load_weight * loads.get(p, 0.0) / denom_tokens
        for p in pods
    }


class PrefixPolicy(Policy):
    """Longest cached prefix, from kvray's scores or from ground truth, optionally load-aware.

    Args:
        source: ``"scores"`` (kvray's index) or ``"truth"`` (the pods: the oracle).
        load_weight: see ``blend``.
        name: display name (default: ``kvray``/``oracle``, with ``+load=<w>`` when w != 0).
    """

    def __init__(
        self,
        source: Literal["scores", "truth"] = "scores",
        *,
        load_weight: float = 0.0,
        name: str | None = None,
    ) -> None:
        if load_weight < 0:
            raise ValueError("load_weight must be >= 0")
        self.source = source
        self.load_weight = load_weight
        base = "kvray" if source == "scores" else "oracle"
        self.name = name or (base if load_weight == 0 else f"{base}+load={load_weight:g}")
        self.needs = frozenset({source, "loads"})
        self._ties = _Rotation()

    def _cached(self, ctx: RouteContext) -> Mapping[str, float]:
        got = ctx.scores if self.source == "scores" else ctx.truth
        if got is None:
            raise ValueError(f"policy {self.name!r} needs {self.source!r} in the context")
        return got

    def choose(self, ctx: RouteContext) -> str:
        values = blend(
            self._cached(ctx), ctx.loads, ctx.pods,
            n_blocks=ctx.n_blocks, prompt_tokens=len(ctx.tokens), load_weight=self.load_weight,
        )  # fmt: skip
        best = max(values.values())
        # Exact ties only (equal cache hits, or no hits anywhere): see _Rotation.
        return self._ties.pick([p for p in ctx.pods if values[p] == best], ctx)

    def routed(self, ctx: RouteContext, pod: str) -> None:
        self._ties.note(pod)

    def predicted_blocks(self, ctx: RouteContext, pod: str) -> float | None:
        return float(self._cached(ctx).get(pod, 0.0))


def _ray_prefix_tree() -> Any:
    """Ray Serve LLM's ``PrefixTree`` class (imported late: it pulls in Ray Serve)."""
    from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_tree import PrefixTree

    return PrefixTree


def tokens_as_text(tokens: Sequence[int]) -> str:
    """One character per token id, so a character tree matches token prefixes exactly."""
    return "".join(map(chr, tokens))


class ApproxPrefixPolicy(Policy):
    """Ray Serve LLM's ``PrefixCacheAffinityRouter`` decision, replayed offline.

    Uses Ray's own ``PrefixTree`` (``ray.llm._internal.serve.routing_policies.prefix_aware``)
    in-process, and follows ``PrefixCacheAffinityRouter._prefix_match_best_replicas``:

    1. a power-of-two-choices pick is drawn first as the fallback;
    2. if the spread of queue lengths exceeds ``imbalanced_threshold``: the fallback;
    3. else match the prompt against the tree (its own past routing decisions, never the pods'
       caches): match rate < ``match_rate_threshold`` -> the tenants holding the fewest
       characters; else the pods that hold the longest match;
    4. among those, the one with the shortest queue (the first one, on ties).

    After routing, the prompt is inserted for the chosen pod. With eviction on, every
    ``eviction_interval_s`` simulated seconds each pod's share of the tree is cut back to
    ``eviction_target_chars`` once it exceeds ``eviction_threshold_chars`` (Ray's loop).

    Prompts are token ids here, so the tree gets one character per token; match rates are
    the same ratios Ray computes on text. The tree runs in-process, not in Ray's
    ``PrefixTreeActor``, so its routing latency leaves out two actor round trips.

    Args:
        seed: seed of the power-of-two fallback's draws.
        match_rate_threshold: Ray's default 0.1.
        imbalanced_threshold: Ray's default: infinite (never imbalanced).
        eviction_threshold_chars: None: no eviction (Ray's default ``do_eviction=False``).
        eviction_target_chars: default 90% of the threshold (Ray's 360k of 400k).
        eviction_interval_s: Ray's default 10 s, in simulated time.
    """

    name = "approx-prefix"
    needs = frozenset({"loads"})

    def __init__(
        self,
        pods: Sequence[str],
        *,
        seed: int = 0,
        match_rate_threshold: float = 0.1,
        imbalanced_threshold: float = math.inf,
        eviction_threshold_chars: int | None = None,
        eviction_target_chars: int | None = None,
        eviction_interval_s: float = 10.0,
    ) -> None:
        self.tree = _ray_prefix_tree()()
        self.tree.add_tenants(list(pods), 0.0)
        self._rng = random.Random(seed)
        self.match_rate_threshold = match_rate_threshold
        self.imbalanced_threshold = imbalanced_threshold
        self.eviction_threshold_chars = eviction_threshold_chars
        self.eviction_target_chars = (
            eviction_target_chars
            if eviction_target_chars is not None or eviction_threshold_chars is None
            else int(eviction_threshold_chars * 0.9)
        )
        self.eviction_interval_s = eviction_interval_s
        self._next_eviction_t = eviction_interval_s
        self._last: tuple[RouteContext | None, str] = (None, "")

    def _text_of(self, ctx: RouteContext) -> str:
        # choose() and routed() see the same context: convert its prompt once. Holding the
        # context (compared with `is`, not by id()) keeps its identity from being reused.
        if self._last[0] is not ctx:
            self._last = (ctx, tokens_as_text(ctx.tokens))
        return self._last[1]

    def _power_of_two(self, ctx: RouteContext) -> str:
        pods = ctx.pods
        if len(pods) == 1:
            return pods[0]
        i = self._rng.randrange(len(pods))
        j = self._rng.randrange(len(pods) - 1)
        j += j >= i
        a, b = pods[i], pods[j]
        return b if ctx.queue_lens.get(b, 0) < ctx.queue_lens.get(a, 0) else a

    def choose(self, ctx: RouteContext) -> str:
        fallback = self._power_of_two(ctx)
        qlens = [ctx.queue_lens.get(p, 0) for p in ctx.pods]
        if max(qlens) - min(qlens) > self.imbalanced_threshold:
            return fallback
        text = self._text_of(ctx)
        matched, tenants = self.tree.prefix_match(text, list(ctx.pods))
        rate = len(matched) / len(text) if text else 0.0
        chosen = self.tree.get_smallest_tenants() if rate < self.match_rate_threshold else tenants
        cands: list[str] = [p for p in (chosen or []) if p in ctx.pods]
        if not cands:
            return fallback
        return min(cands, key=lambda p: ctx.queue_lens.get(p, 0))

    def predicted_blocks(self, ctx: RouteContext, pod: str) -> float | None:
        """What the tree believes ``pod`` holds of this prompt, in full blocks (call before
        ``routed``, which inserts the prompt)."""
        matched, _ = self.tree.prefix_match(self._text_of(ctx), [pod])
        return float(len(matched) // ctx.block_size)

    def routed(self, ctx: RouteContext, pod: str) -> None:
        self.tree.insert(self._text_of(ctx), pod, ctx.t)
        if self.eviction_threshold_chars is None or ctx.t < self._next_eviction_t:
            return
        self._next_eviction_t = ctx.t + self.eviction_interval_s
        target = self.eviction_target_chars or 0
        for tenant, chars in list(self.tree.tenant_to_char_count.items()):
            if chars > self.eviction_threshold_chars:
                self.tree.evict_tenant_by_lru(tenant, chars - target)


def make_policy(
    name: str,
    pods: Sequence[str],
    *,
    seed: int = 0,
    load_weight: float = 0.0,
    approx: Mapping[str, Any] | None = None,
) -> Policy:
    """A policy by name (``POLICY_NAMES``).

    Args:
        name: which policy.
        pods: the fleet's pods (the approximate router registers them as tenants).
        seed: for the random and approximate policies.
        load_weight: for ``kvray`` and ``oracle``.
        approx: keyword options of ``ApproxPrefixPolicy``.

    Raises:
        ValueError: unknown name.
    """
    if name == "kvray":
        return PrefixPolicy("scores", load_weight=load_weight)
    if name == "oracle":
        return PrefixPolicy("truth", load_weight=load_weight)
    if name == "approx-prefix":
        return ApproxPrefixPolicy(pods, seed=seed, **dict(approx or {}))
    if name == "least-loaded":
        return LeastLoadedPolicy()
    if name == "round-robin":
        return RoundRobinPolicy()
    if name == "random":
        return RandomPolicy(seed)
    raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICY_NAMES)}")
