"""One contract, three backends: memory, budget and Redis (a real redis-server process)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvray.core.index.base import SPECULATIVE, IndexBackend
from kvray.core.index.budget import BudgetIndex
from kvray.core.index.memory import MemoryIndex
from kvray.core.scoring import score_from_holders
from kvray.types import PodId, Tier

W = {"GPU": 1.0, "CPU": 0.8}
GPU, CPU = Tier("GPU"), Tier("CPU")
A, B, C = PodId("a"), PodId("b"), PodId("c")


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tests.redis_server import redis_server_binary, start_redis_server

    if redis_server_binary() is None:
        pytest.skip("no redis-server binary on PATH (apt-get install redis-server)")
    with start_redis_server(tmp_path_factory.mktemp("redis")) as info:
        yield info.url


_counter = iter(range(10**9))


@pytest.fixture(params=["memory", "budget", "redis"])
def backend(request: pytest.FixtureRequest) -> Iterator[IndexBackend]:
    if request.param == "memory":
        b: IndexBackend = MemoryIndex(max_keys=100_000, sweep_batch=2)
    elif request.param == "budget":
        b = BudgetIndex(budget_bytes=64 * 2**20)
    else:
        from kvray.backends.redis import RedisBackend

        url = request.getfixturevalue("redis_url")
        b = RedisBackend(url, prefix=f"t{next(_counter)}")
    yield b
    b.close()


def test_spec_example(backend: IndexBackend) -> None:
    keys = [10, 11, 12, 13, 14]
    backend.add(A, GPU, keys[:4])
    backend.add(B, GPU, keys[:2])
    backend.add(C, GPU, keys[3:])
    assert backend.score(keys, W) == {"a": 4.0, "b": 2.0}
    assert backend.score(keys, W, pods=["b", "c", "zz"]) == {"b": 2.0}
    assert backend.score([], W) == {}


def test_best_tier_per_block(backend: IndexBackend) -> None:
    backend.add(A, CPU, [1, 2, 3])
    backend.add(A, GPU, [2])
    backend.add(B, Tier("STORAGE"), [1, 2])
    assert backend.score([1, 2, 3], W) == pytest.approx({"a": 0.8 + 1.0 + 0.8, "b": 2.0})


def test_remove_and_idempotence(backend: IndexBackend) -> None:
    backend.add(A, GPU, [1, 2, 3])
    backend.add(A, GPU, [1, 2, 3])
    backend.remove(A, GPU, [2, 2, 99])
    backend.remove(PodId("nobody"), GPU, [1])
    assert backend.score([1, 2, 3], W) == {"a": 1.0}
    backend.remove(A, CPU, [1])
    assert backend.score([1], W) == {"a": 1.0}


def test_clear_pod_then_reuse(backend: IndexBackend) -> None:
    backend.add(A, GPU, [1, 2])
    backend.add(B, GPU, [1, 2])
    backend.clear_pod(A)
    assert backend.score([1, 2], W) == {"b": 2.0}
    backend.add(A, GPU, [1])
    backend.add(PodId("d"), GPU, [1, 2])
    assert backend.score([1, 2], W) == {"a": 1.0, "b": 2.0, "d": 2.0}
    backend.clear_pod(PodId("never-seen"))


def test_add_held_reports_the_keys_already_held(backend: IndexBackend) -> None:
    """The positions the writer counts as second copies: held by this holder, in this tier."""
    from kvray.core.index.base import held_op

    add_held = held_op(backend)
    assert add_held(A, GPU, [1, 2, 3]) == []
    backend.add(B, GPU, [4])
    backend.add(A, CPU, [4])
    # 2 and 3 are A's in GPU; 4 is B's (GPU) and A's in CPU only; 1 repeats within the call.
    assert add_held(A, GPU, [4, 2, 5, 3, 5]) == [1, 3, 4]
    assert backend.score([1, 2, 3, 4], W) == {"a": 4.0}
    backend.remove(A, GPU, [2])
    assert add_held(A, GPU, [2]) == []


def test_engine_map(backend: IndexBackend) -> None:
    backend.add(A, GPU, [500])
    backend.put_engine_map([(1, 500), (2, 501)])
    assert backend.get_engine_map([1, 3]) == [500, None]


def test_holders_and_stats(backend: IndexBackend) -> None:
    backend.add(A, GPU, [1, 2])
    backend.add(A, SPECULATIVE, [2])
    backend.add(B, CPU, [2])
    assert backend.holders([1, 2, 3]) == [{"a": {GPU}}, {"a": {GPU, SPECULATIVE}, "b": {CPU}}, {}]
    st_ = backend.stats()
    assert st_.pairs == 4
    assert st_.pods >= 2


def test_snapshot_roundtrip_across_backends(backend: IndexBackend) -> None:
    backend.add(A, GPU, [1, 2, 3])
    backend.add(B, CPU, [1])
    backend.put_engine_map([(9, 1)])
    other = MemoryIndex()
    other.restore(backend.snapshot())
    assert other.holders([1, 2, 3]) == backend.holders([1, 2, 3])
    assert other.get_engine_map([9]) == [1]
    backend.restore(other.snapshot())
    assert backend.score([1, 2, 3], W) == {"a": 3.0, "b": 0.8}


ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "remove", "clear"]),
        st.sampled_from([A, B, C]),
        st.sampled_from([GPU, CPU]),
        st.lists(st.integers(0, 12), max_size=8),
    ),
    max_size=25,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=ops, n=st.integers(0, 13), filt=st.none() | st.lists(st.sampled_from(["a", "b", "c", "x"]))
)
def test_score_matches_reference(
    backend: IndexBackend, ops: list, n: int, filt: list | None
) -> None:
    backend.restore(MemoryIndex().snapshot())  # empty, whatever earlier examples left
    for op, pod, tier, keys in ops:
        if op == "add":
            backend.add(pod, tier, keys)
        elif op == "remove":
            backend.remove(pod, tier, keys)
        else:
            backend.clear_pod(pod)
    keys = list(range(n))
    want = score_from_holders(backend.holders(keys), W, filt)
    assert backend.score(keys, W, filt) == pytest.approx(want)


def test_memory_lru_bound_evicts_oldest() -> None:
    idx = MemoryIndex(max_keys=100, evict_fraction=0.1)
    idx.add(A, GPU, range(100))
    idx.add(A, GPU, [0])  # touch: 0 becomes the most recent
    idx.add(A, GPU, [1000])
    st_ = idx.stats()
    assert st_.keys <= 100 and st_.evicted_keys == 10
    assert idx.holders([0, 1, 10, 11, 1000]) == [{A: {GPU}}, {}, {}, {A: {GPU}}, {A: {GPU}}]


def test_budget_bound_prefers_keys_with_fewer_holders() -> None:
    idx = BudgetIndex(budget_bytes=100 * 72, window=64)
    idx.add(A, GPU, range(50))
    idx.add(B, GPU, range(0, 50, 2))  # even keys have 2 holders
    idx.add(C, GPU, range(1000, 1060))
    assert idx.stats().bytes_estimate <= 100 * 72
    held = idx.holders(list(range(50)))
    # Every evicted old key is one held by a single pod; the shared (even) keys all survived.
    evicted = [k for k, h in enumerate(held) if not h]
    assert evicted and all(k % 2 == 1 for k in evicted)


def test_memory_clear_is_swept_then_slot_reused() -> None:
    idx = MemoryIndex(sweep_batch=10)
    idx.add(A, GPU, range(100))
    idx.clear_pod(A)
    assert idx.score(list(range(100)), W) == {}
    for _ in range(20):
        idx.add(B, GPU, [5000])
    assert idx.stats().keys == 1  # A's 100 keys swept out
    idx.add(PodId("new"), GPU, [1])
    assert idx.holders([1]) == [{PodId("new"): {GPU}}]
