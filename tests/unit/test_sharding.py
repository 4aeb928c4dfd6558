"""Placement: hashed holders, pinned pods balanced across shards, ranks following their pod."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvray.config import Config, EventsConfig, PodEndpoint
from kvray.core.holders import base_pod
from kvray.core.sharding import Placement, shard_of


def test_shard_of_is_stable_and_in_range() -> None:
    got = [shard_of(f"10.0.0.{i}", 4) for i in range(64)]
    assert all(0 <= s < 4 for s in got)
    assert got == [shard_of(f"10.0.0.{i}", 4) for i in range(64)]
    assert len(set(got)) > 1
    with pytest.raises(ValueError, match="positive"):
        shard_of("x", 0)


def test_hash_alone_is_uneven_for_few_pods_and_pins_fix_it() -> None:
    pods = [f"pod{i}" for i in range(16)]
    hashed = Counter(shard_of(p, 4) for p in pods)
    assert max(hashed.values()) > 4  # the reason pins exist (7 / 4 / 3 / 2 for these names)
    placement = Placement.balanced(4, pods)
    assert Counter(placement.owner(p) for p in pods) == {0: 4, 1: 4, 2: 4, 3: 4}


@given(st.lists(st.text(min_size=1, max_size=12), unique=True, max_size=60), st.integers(1, 7))
def test_balanced_loads_differ_by_at_most_one(pods: list[str], n: int) -> None:
    placement = Placement.balanced(n, pods)
    loads = Counter(placement.owner(p) for p in pods)
    counts = [loads.get(i, 0) for i in range(n)]
    assert max(counts) - min(counts) <= 1
    # A pure function of its input: another process derives the same pins.
    assert Placement.balanced(n, pods).pins() == placement.pins()


def test_ranks_follow_their_pinned_pod_and_unpinned_holders_hash() -> None:
    placement = Placement(4, {"a": 2})
    assert placement.owner("a") == placement.owner("a#dp1") == placement.owner("a#dp7") == 2
    assert placement.owner("b#dp1") == shard_of("b#dp1", 4)
    assert placement.owner("b") == shard_of("b", 4)
    assert base_pod("a#dp3") == "a" and base_pod("a#dpx") == "a#dpx" and base_pod("a") == "a"


def test_place_is_idempotent_and_prefers_the_hash_among_the_least_loaded() -> None:
    placement = Placement(3)
    first = placement.place("x")
    assert first == shard_of("x", 3)  # every shard empty: the hash decides
    assert placement.place("x") == first  # already pinned: unchanged
    assert placement.pins() == {"x": first}
    with pytest.raises(ValueError, match="out of range"):
        placement.pin("y", 3)


def test_a_repin_moves_the_load() -> None:
    placement = Placement(2, {"a": 0, "b": 0})
    placement.pin("a", 1)
    assert placement.owner("a") == 1
    assert placement.place("c") in (0, 1)
    assert sorted(Counter(placement.pins().values()).values()) == [1, 2]


def test_config_pins_only_the_named_pods_shards_read() -> None:
    connect = [
        PodEndpoint(endpoint=f"tcp://10.0.0.{i}:5557", pod=f"p{i}" if i % 2 else None)
        for i in range(8)
    ]
    cfg = Config(num_shards=2, events=EventsConfig(connect=connect))
    assert set(cfg.placement().pins()) == {"p1", "p3", "p5", "p7"}
    assert sorted(Counter(cfg.placement().pins().values()).values()) == [2, 2]
    off = Config(num_shards=2, events=EventsConfig(connect=connect, shard_reads_named_pods=False))
    assert off.placement().pins() == {}
