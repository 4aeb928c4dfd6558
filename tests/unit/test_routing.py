"""The routing decision (``kvray.core.routing``): cache affinity, spreading, load, fullness."""

from __future__ import annotations

import random
import statistics

import pytest

from kvray.core.index.base import SPECULATIVE, SpeculativeEntries
from kvray.core.index.memory import MemoryIndex
from kvray.core.routing import (
    Decider,
    PoolGauges,
    RecentLoad,
    RoutingWeights,
    decide,
    fill_fractions,
)
from kvray.types import PodId

PODS = ["a", "b", "c", "d"]


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_cold_prompts_spread_and_the_same_prefix_stays_together() -> None:
    rng = random.Random(1)
    firsts = [rng.getrandbits(64) for _ in range(400)]
    picks = [decide(PODS, {}, 8, k, {}).pod for k in firsts]
    counts = [picks.count(p) for p in PODS]
    assert min(counts) >= 70, counts  # rendezvous: ~100 each
    assert all(decide(PODS, {}, 8, k, {}).pod == p for k, p in zip(firsts, picks, strict=True))
    assert decide(PODS, {}, 8, firsts[0], {}).reason == "spread"


def test_the_longest_cached_prefix_wins_over_moderate_load() -> None:
    d = decide(PODS, {"b": 40.0, "c": 8.0}, 48, 7, {"b": 20.0})
    assert (d.pod, d.reason, d.hit_blocks, d.new_blocks) == ("b", "cache", 40.0, 8.0)


def test_heavy_queued_work_moves_a_request_off_its_cached_pod() -> None:
    d = decide(PODS, {"b": 40.0}, 48, 7, {"b": 100.0})
    assert d.reason == "load" and d.pod != "b"
    # With load weighing nothing, the cache wins again.
    assert decide(PODS, {"b": 40.0}, 48, 7, {"b": 100.0}, weights=RoutingWeights(0.0)).pod == "b"


def test_new_blocks_prefer_a_pool_with_room() -> None:
    fill = {"a": 1.0, "b": 1.0, "c": 0.2, "d": 1.0}
    d = decide(PODS, {}, 32, 7, {}, fill)
    assert d.pod == "c"
    # A prefix cached on a full pod still goes there: hits cost nothing to place.
    assert decide(PODS, {"a": 32.0}, 32, 7, {}, fill).pod == "a"


def test_decider_spreads_distinct_prefixes_by_its_own_load() -> None:
    clock = Clock()
    dec = Decider(RoutingWeights(half_life_s=2.0), clock)
    rng = random.Random(2)
    work = dict.fromkeys(PODS, 0.0)
    for _ in range(200):
        keys = [rng.getrandbits(64) for _ in range(rng.randint(4, 40))]
        d = dec.choose(PODS, {}, keys)
        work[d.pod] += len(keys)
        clock.t += 0.01
    # Balanced by work, not only by count: far more even than random placement.
    assert max(work.values()) / min(work.values()) < 1.3, work
    assert dec.decisions["spread"] == 200


def test_caller_load_is_in_tokens_and_replaces_the_estimate() -> None:
    dec = Decider(RoutingWeights(), Clock())
    keys = list(range(1, 9))  # 8 blocks
    # 16-token blocks: 200 queued tokens on "a" = 12.5 blocks, more than a's 8 cached.
    d = dec.choose(["a", "b"], {"a": 8.0}, keys, load={"a": 200.0}, load_unit=1 / 16)
    assert d.pod == "b"
    d = dec.choose(["a", "b"], {"a": 8.0}, keys, load={"a": 100.0}, load_unit=1 / 16)
    assert d.pod == "a"
    with pytest.raises(ValueError):
        decide([], {}, 1, 0, {})


def test_recent_load_halves_every_half_life() -> None:
    clock = Clock()
    rl = RecentLoad(2.0, clock)
    rl.add("a", 8.0)
    clock.t += 2.0
    assert rl.get("a") == pytest.approx(4.0)
    rl.add("a", 4.0)
    clock.t += 4.0
    assert rl.get("a") == pytest.approx(2.0)
    assert rl.get("nobody") == 0.0


def test_pool_gauges_learn_the_pool_size_from_the_first_eviction() -> None:
    g = PoolGauges()
    g.stored("p", 100)
    assert g.get("p") == (100, 0)  # never evicted: size unknown
    g.stored("p", 140)
    g.removed("p", 10)  # evicting with 240 held: the pool holds 240
    assert g.get("p") == (230, 240)
    g.stored("p", 10)
    assert g.get("p") == (240, 240)
    assert g.take_changes() == {"p": (240, 240)}
    assert g.take_changes() == {}
    g.cleared("p")  # a reset empties the pool but keeps its size
    assert g.get("p") == (0, 240)
    g.stored("q", 60)  # a pod that never evicted is measured against the known size
    fill = fill_fractions(g.as_dict(), ["p", "q", "r"])
    assert fill == {"p": 0.0, "q": 0.25, "r": 0.0}
    assert fill_fractions({"q": (60, 0)}, ["q"]) == {"q": 0.0}


def test_speculative_entries_live_until_their_latest_deadline_and_can_be_settled() -> None:
    ix = MemoryIndex()
    spec = SpeculativeEntries()
    a = PodId("a")
    ix.add(a, SPECULATIVE, [1, 2, 3])
    spec.push(10.0, a, [1, 2, 3])
    ix.add(a, SPECULATIVE, [2])
    spec.push(20.0, a, [2])  # recorded again: lives until 20
    assert spec.discard(a, [3, 99]) == [3]  # the pod's event settled key 3
    ix.remove(a, SPECULATIVE, [3])
    spec.expire(10.0, ix)
    assert ix.holders([1, 2, 3]) == [{}, {a: {SPECULATIVE}}, {}]
    spec.expire(20.0, ix)
    assert ix.holders([2]) == [{}]
    assert not spec.holds(a)


def test_cost_is_an_estimate_of_work_in_blocks() -> None:
    d = decide(["a", "b"], {"a": 3.0}, 10, 5, {"a": 2.0, "b": 0.0}, {"a": 0.5, "b": 0.0})
    assert d.costs == {"a": pytest.approx(7 * 1.5 + 2.0), "b": pytest.approx(10.0)}
    assert statistics.mean(d.costs.values()) > 0


def test_cold_prompts_sharing_a_header_still_spread() -> None:
    """Every chat of a model starts with the same template tokens: when every pod holds that
    header, ties are hashed on the first block past it, so different tenants spread (hashing
    the first block would rank the pods alike for all of them) and one tenant stays put."""
    from kvray.core.routing import Decider, tie_key

    pods = [f"p{i}" for i in range(4)]
    header = [11, 12]  # two shared blocks, held everywhere
    tenants = [[*header, 1000 + t, 2000 + t, 3000 + t] for t in range(40)]
    hits = {p: 2.0 for p in pods}
    assert tie_key(tenants[0], hits) == 1000 and tie_key(tenants[0], {}) == 11
    assert tie_key([5], {"p0": 9.0}) == 5 and tie_key([], hits) == 0
    dec = Decider()
    chosen = [dec.choose(pods, hits, keys, load={}).pod for keys in tenants]
    assert len(set(chosen)) == 4  # spread (all four pods: p < 4 * 0.75**40)
    assert all(
        dec.choose(pods, hits, keys, load={}).pod == c
        for keys, c in zip(tenants, chosen, strict=True)
    )  # and stable
