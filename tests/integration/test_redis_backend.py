"""Redis-specific behaviour of ``RedisBackend`` against a real ``redis-server``.

The backend contract shared with the memory backends lives in the unit contract suite; this
module checks what only Redis has: round trips, agreement of the Lua scorer with the reference
scorer, authentication, outages, snapshots across prefixes, prefix isolation and key TTLs.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.connection import UnixDomainSocketConnection

from kvray.backends.redis import RedisBackend
from kvray.core.index.base import IndexBackend
from kvray.core.scoring import score_from_holders
from kvray.core.snapshot import decode_snapshot, encode_snapshot, holder_keys
from kvray.errors import BackendUnavailable, MalformedFrame
from kvray.types import PodId, Tier
from tests.redis_server import RedisServerInfo, redis_server_binary, start_redis_server

pytestmark = [
    pytest.mark.redis,
    pytest.mark.skipif(
        redis_server_binary() is None,
        reason="redis-server binary not on PATH (Debian/Ubuntu: apt-get install redis-server)",
    ),
]

GPU, CPU, SPEC, STORAGE = Tier("GPU"), Tier("CPU"), Tier("SPECULATIVE"), Tier("STORAGE")
WEIGHTS = {"GPU": 1.0, "CPU": 0.8}

Model = dict[int, dict[PodId, set[Tier]]]
"""A reference index: key → holder → tiers."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServerInfo]:
    with start_redis_server(tmp_path_factory.mktemp("redis")) as info:
        yield info


@pytest.fixture
def make_backend(server: RedisServerInfo) -> Iterator[Callable[..., RedisBackend]]:
    """Backends on the shared server, each under its own fresh prefix unless one is given."""
    made: list[RedisBackend] = []

    def make(**kwargs: Any) -> RedisBackend:
        kwargs.setdefault("prefix", f"t-{uuid.uuid4().hex[:12]}")
        backend = RedisBackend(server.url, **kwargs)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


@pytest.fixture
def backend(make_backend: Callable[..., RedisBackend]) -> RedisBackend:
    return make_backend()


def _model_view(model: Model, keys: list[int]) -> list[dict[PodId, set[Tier]]]:
    return [{p: set(ts) for p, ts in model.get(k, {}).items() if ts} for k in keys]


# -- basics --------------------------------------------------------------------------------------


def test_is_an_index_backend(backend: RedisBackend) -> None:
    assert isinstance(backend, IndexBackend)
    assert backend.name == "redis"


def test_add_remove_holders_and_stats(backend: RedisBackend) -> None:
    a, b = PodId("a"), PodId("b")
    backend.add(a, GPU, [1, 2, 3])
    backend.add(a, CPU, [1])
    backend.add(b, GPU, [1, 2])
    backend.add(b, GPU, [1, 2])  # idempotent
    assert backend.holders([1, 2, 3, 4]) == [
        {a: {GPU, CPU}, b: {GPU}},
        {a: {GPU}, b: {GPU}},
        {a: {GPU}},
        {},
    ]
    assert backend.pods() == [a, b]
    st_ = backend.stats()
    assert (st_.backend, st_.keys, st_.pairs, st_.pods) == ("redis", 4, 6, 2)
    assert st_.per_tier == {"GPU": 3, "CPU": 1}
    assert backend.score([1, 2, 3], WEIGHTS) == {a: 3.0, b: 2.0}

    backend.remove(a, GPU, [1, 9])
    assert backend.holders([1]) == [{a: {CPU}, b: {GPU}}]
    assert backend.score([1, 2, 3], WEIGHTS) == {a: 0.8 + 1.0 + 1.0, b: 2.0}
    backend.clear_pod(a)
    assert backend.holders([1, 2, 3]) == [{b: {GPU}}, {b: {GPU}}, {}]
    assert backend.pods() == [b]
    st_ = backend.stats()
    assert (st_.keys, st_.pairs, st_.pods, st_.per_tier) == (2, 2, 1, {"GPU": 2})
    backend.remove(b, GPU, [1, 2])
    assert backend.stats().keys == 0
    assert backend.pods() == [b]  # removing every key does not forget the holder


def test_add_with_no_keys_registers_the_holder(backend: RedisBackend) -> None:
    backend.add(PodId("idle"), GPU, [])
    assert backend.pods() == [PodId("idle")]


def test_u64_extremes_round_trip(backend: RedisBackend) -> None:
    keys = [0, 1, 2**63, 2**64 - 1]
    backend.add(PodId("p"), GPU, keys)
    assert backend.holders(keys) == [{PodId("p"): {GPU}}] * 4
    assert backend.score(keys, WEIGHTS) == {PodId("p"): 4.0}
    backend.put_engine_map([(2**64 - 1, 0), (0, 2**64 - 1)])
    assert backend.get_engine_map([2**64 - 1, 0, 5]) == [0, 2**64 - 1, None]


def test_keys_must_be_u64(backend: RedisBackend) -> None:
    for call in (
        lambda: backend.add(PodId("a"), GPU, [-1]),
        lambda: backend.remove(PodId("a"), GPU, [2**64]),
        lambda: backend.score([1, -5], WEIGHTS),
        lambda: backend.holders([2**70]),
    ):
        with pytest.raises(ValueError):
            call()
    assert backend.pods() == []


def test_cleared_slot_is_reused_clean(backend: RedisBackend, server: RedisServerInfo) -> None:
    a, b, c = PodId("a"), PodId("b"), PodId("c")
    backend.add(a, GPU, [1, 2, 3])
    backend.add(a, CPU, [4])
    backend.add(b, GPU, [1])
    backend.clear_pod(a)
    backend.add(c, CPU, [2])  # takes a's freed slot
    admin = server.client()
    try:
        assert admin.hget(f"{backend._prefix}:slot", "c") == "0"
    finally:
        admin.close()
    assert backend.holders([1, 2, 3, 4]) == [{b: {GPU}}, {c: {CPU}}, {}, {}]
    assert backend.score([1, 2], WEIGHTS) == {b: 1.0}
    assert backend.score([2], WEIGHTS) == {c: 0.8}
    assert backend.pods() == [b, c]
    st_ = backend.stats()
    assert (st_.keys, st_.pairs, st_.per_tier) == (2, 2, {"GPU": 1, "CPU": 1})


def test_wide_fleet(backend: RedisBackend) -> None:
    # 600 holders: bitmaps several bytes wide, and filters longer than one HMGET slice.
    prompt = list(range(100, 164))
    model: Model = {}
    for i in range(600):
        pod, tier = PodId(f"10.0.{i // 256}.{i % 256}"), (GPU, CPU)[i % 2]
        held = prompt[: (i * 7) % 65]
        backend.add(pod, tier, held)
        for k in held:
            model.setdefault(k, {}).setdefault(pod, set()).add(tier)
    view = _model_view(model, prompt)
    everyone = [f"10.0.{i // 256}.{i % 256}" for i in range(600)]
    everyone += [f"ghost{i}" for i in range(1500)]
    for pods in (None, everyone, everyone[::7]):
        assert backend.score(prompt, WEIGHTS, pods) == score_from_holders(view, WEIGHTS, pods)
    assert backend.holders(prompt) == view


def test_engine_map(backend: RedisBackend) -> None:
    assert backend.get_engine_map([1, 2]) == [None, None]
    backend.put_engine_map([(1, 10), (2, 20)])
    backend.put_engine_map([(2, 21)])
    assert backend.get_engine_map([2, 1, 3]) == [21, 10, None]
    assert backend.stats().engine_map_entries == 2


def test_reserved_separators_rejected(backend: RedisBackend) -> None:
    with pytest.raises(ValueError):
        backend.add(PodId("a\x1fb"), GPU, [1])
    with pytest.raises(ValueError):
        backend.add(PodId("a"), Tier("G\x1ePU"), [1])
    backend.add(PodId("a"), GPU, [1])
    # A filter naming the counter field of the block hash must not match it.
    assert backend.score([1], WEIGHTS, pods=["\x1eGPU"]) == {}
    backend.remove(PodId("a\x1fb"), GPU, [1])  # nothing by that name: a no-op
    backend.clear_pod(PodId("a\x1fb"))
    assert backend.holders([1]) == [{PodId("a"): {GPU}}]


# -- round trips ------------------------------------------------------------------------------


class _CountingConnection(UnixDomainSocketConnection):
    """Counts writes to the socket: every round trip starts with exactly one."""

    sends = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).sends += 1
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]


def _commandstats(client: redis.Redis) -> dict[str, int]:
    info = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in info.items()}


def test_score_is_one_round_trip_and_stops_early(server: RedisServerInfo) -> None:
    pool = redis.ConnectionPool(
        connection_class=_CountingConnection, path=server.unix_socket, decode_responses=True
    )
    client = redis.Redis(connection_pool=pool)
    admin = server.client()
    backend = RedisBackend(client=client, prefix=f"rt-{uuid.uuid4().hex[:8]}")
    try:
        prompt = list(range(10_000, 10_000 + 1024))
        for i in range(64):
            # Pod i holds the first 8 * (i + 1) blocks; pod 63 holds all 512 of the first half.
            backend.add(PodId(f"pod{i}"), GPU if i % 2 else CPU, prompt[: 8 * (i + 1)])
        backend.add(PodId("full"), GPU, prompt)
        backend.score(prompt, WEIGHTS)  # warm the connection and the script cache

        def count(call: Callable[[], object]) -> tuple[int, dict[str, int]]:
            before, _CountingConnection.sends = _commandstats(admin), 0
            call()
            after = _commandstats(admin)
            delta = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
            delta.pop("info", None)
            return _CountingConnection.sends, delta

        sends, delta = count(lambda: backend.score(prompt, WEIGHTS))
        assert sends == 1
        assert delta["evalsha"] == 1
        # Blocks are fetched in a few growing MGET batches, not one command per block.
        full_walk = delta["mget"]
        assert 1 < full_walk <= 16

        backend.clear_pod(PodId("full"))
        sends, delta = count(lambda: backend.score(prompt, WEIGHTS))
        assert sends == 1
        # Nobody holds block 512: the walk stops there and fetches fewer batches.
        assert delta["mget"] < full_walk

        sends, delta = count(lambda: backend.score(prompt, WEIGHTS, pods=["pod0", "pod1"]))
        assert sends == 1
        assert delta["mget"] <= 3  # pod1 holds 16 blocks; batches of 1, 4, 16 cover them

        sends, delta = count(lambda: backend.score(list(range(1024)), WEIGHTS))
        assert (sends, delta["evalsha"], delta["mget"]) == (1, 1, 1)  # a miss: block 0 only

        calls = (
            lambda: backend.add(PodId("x"), GPU, list(range(5000))),
            lambda: backend.remove(PodId("x"), GPU, list(range(5000))),
            lambda: backend.holders(prompt),
            lambda: backend.put_engine_map([(i, i + 1) for i in range(1000)]),
            lambda: backend.get_engine_map(list(range(1000))),
            lambda: backend.stats(),
            lambda: backend.clear_pod(PodId("pod3")),
        )
        for call in calls:
            call()  # a script's first run on a server may cost a NOSCRIPT miss
        for call in calls:
            assert count(call)[0] == 1
    finally:
        backend.close()
        client.close()
        admin.close()


def test_score_survives_a_flushed_script_cache(
    backend: RedisBackend, server: RedisServerInfo
) -> None:
    backend.add(PodId("a"), GPU, [1, 2])
    assert backend.score([1, 2], WEIGHTS) == {PodId("a"): 2.0}
    admin = server.client()
    try:
        admin.script_flush()
    finally:
        admin.close()
    assert backend.score([1, 2], WEIGHTS) == {PodId("a"): 2.0}
    backend.add(PodId("a"), CPU, [3])
    assert backend.holders([3]) == [{PodId("a"): {CPU}}]


# -- agreement with the reference scorer -------------------------------------------------------

_pods = st.sampled_from(["p0", "p1", "p2", "p3", "p4#dp1"]).map(PodId)
_tiers = st.sampled_from([GPU, CPU, SPEC, STORAGE])
_keys = st.one_of(st.integers(0, 11), st.sampled_from([2**64 - 1, 2**63 + 5]))
# Prompts share prefixes, so runs of consecutive keys are what makes scores long; random lists
# add holes, duplicates and u64 extremes.
_runs = st.builds(
    lambda start, n: list(range(start, start + n)), st.integers(0, 3), st.integers(0, 10)
)
_key_lists = st.one_of(_runs, st.lists(_keys, max_size=10))
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), _pods, _tiers, _key_lists),
        st.tuples(st.just("remove"), _pods, _tiers, st.lists(_keys, max_size=6)),
        st.tuples(st.just("clear"), _pods, st.just(GPU), st.just([])),
    ),
    max_size=25,
)
_weights = st.dictionaries(
    st.sampled_from(["GPU", "CPU", "SPECULATIVE", "STORAGE", "DISK"]),
    st.floats(-2.0, 4.0, allow_nan=False, allow_infinity=False),
)
_filters = st.one_of(
    st.none(), st.lists(st.sampled_from(["p0", "p1", "p2", "p3", "p4#dp1", "ghost"]))
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    ops=_ops,
    queries=st.lists(st.tuples(_key_lists, _weights, _filters), min_size=1, max_size=4),
)
def test_score_matches_reference(
    make_backend: Callable[..., RedisBackend],
    ops: list[tuple[str, PodId, Tier, list[int]]],
    queries: list[tuple[list[int], dict[str, float], list[str] | None]],
) -> None:
    backend = make_backend()
    try:
        _check_against_model(backend, ops, queries)
    finally:
        backend.close()


def _check_against_model(
    backend: RedisBackend,
    ops: list[tuple[str, PodId, Tier, list[int]]],
    queries: list[tuple[list[int], dict[str, float], list[str] | None]],
) -> None:
    model: Model = {}
    for op, pod, tier, keys in ops:
        if op == "add":
            backend.add(pod, tier, keys)
            for k in keys:
                model.setdefault(k, {}).setdefault(pod, set()).add(tier)
        elif op == "remove":
            backend.remove(pod, tier, keys)
            for k in keys:
                model.get(k, {}).get(pod, set()).discard(tier)
        else:
            backend.clear_pod(pod)
            for holders in model.values():
                holders.pop(pod, None)
    for keys, weights, pods in queries:
        expected = score_from_holders(_model_view(model, keys), weights, pods)
        assert backend.score(keys, weights, pods) == expected
    all_keys = sorted(model)
    assert backend.holders(all_keys) == _model_view(model, all_keys)
    stats = backend.stats()
    assert stats.pairs == sum(len(ts) for h in model.values() for ts in h.values())
    assert stats.keys == len({(k, t) for k, h in model.items() for ts in h.values() for t in ts})


def test_score_matches_reference_on_a_long_prompt(backend: RedisBackend) -> None:
    prompt = list(range(1, 1025))
    model: Model = {}
    for i in range(40):
        pod, tier = PodId(f"pod{i}"), (GPU, CPU, STORAGE)[i % 3]
        held = prompt[: 25 * i] + prompt[25 * i + 1 :: 3]  # a hole, then scattered blocks
        backend.add(pod, tier, held)
        for k in held:
            model.setdefault(k, {}).setdefault(pod, set()).add(tier)
    view = _model_view(model, prompt)
    for pods in (None, ["pod3", "pod39", "ghost"], []):
        assert backend.score(prompt, WEIGHTS, pods) == score_from_holders(view, WEIGHTS, pods)
    assert backend.score([], WEIGHTS) == {}


# -- authentication and outages ----------------------------------------------------------------


def test_password_protected_server(tmp_path: Path) -> None:
    with start_redis_server(tmp_path, password="s3cret", tcp=True) as srv:
        assert srv.port is not None
        good = [
            RedisBackend(srv.url, password="s3cret"),
            RedisBackend(f"{srv.url}?password=s3cret"),
            RedisBackend(f"redis://:s3cret@127.0.0.1:{srv.port}/0"),
            RedisBackend(srv.tcp_url, password="s3cret"),
        ]
        for b in good:
            b.add(PodId("a"), GPU, [1])
            assert b.score([1], WEIGHTS) == {PodId("a"): 1.0}
            b.close()
        for bad in (
            RedisBackend(srv.url, password="wrong"),
            RedisBackend(srv.url),
            RedisBackend(srv.tcp_url, password="wrong"),
        ):
            with pytest.raises(BackendUnavailable) as exc_info:
                bad.score([1], WEIGHTS)
            assert isinstance(exc_info.value.__cause__, redis.RedisError)
            assert "s3cret" not in str(exc_info.value)
            bad.close()


def _every_call(backend: RedisBackend, snap: bytes) -> list[Callable[[], object]]:
    p = PodId("a")
    return [
        lambda: backend.add(p, GPU, [1]),
        lambda: backend.add(p, GPU, []),
        lambda: backend.remove(p, GPU, [1]),
        lambda: backend.clear_pod(p),
        lambda: backend.pods(),
        lambda: backend.score([1, 2], WEIGHTS),
        lambda: backend.score([1], WEIGHTS, pods=["a"]),
        lambda: backend.holders([1]),
        lambda: backend.put_engine_map([(1, 2)]),
        lambda: backend.get_engine_map([1]),
        lambda: backend.stats(),
        lambda: backend.snapshot(),
        lambda: backend.restore(snap),
        lambda: backend.ping(),
    ]


def test_killed_server_raises_backend_unavailable(tmp_path: Path) -> None:
    with start_redis_server(tmp_path, tcp=True) as srv:
        backends = [
            RedisBackend(srv.url, socket_timeout_s=0.5),
            RedisBackend(srv.tcp_url, socket_timeout_s=0.5),
        ]
        for b in backends:
            b.add(PodId("a"), GPU, [1, 2])
            assert b.score([1, 2], WEIGHTS) == {PodId("a"): 2.0}
        snap = backends[0].snapshot()
        srv.process.kill()
        srv.process.wait()
        for b in backends:
            for call in _every_call(b, snap):
                started = time.monotonic()
                with pytest.raises(BackendUnavailable) as exc_info:
                    call()
                assert isinstance(exc_info.value.__cause__, redis.RedisError | OSError)
                assert time.monotonic() - started < 15.0  # fails, does not hang (0.5 s timeout)
            b.close()


def test_survives_a_server_restart() -> None:
    # A short private directory, so both servers get the same socket path (and URL).
    workdir = Path(tempfile.mkdtemp(prefix="kvr-"))
    try:
        with start_redis_server(workdir) as srv:
            url = srv.url
            backend = RedisBackend(url)
            backend.add(PodId("a"), GPU, [1])
            assert backend.score([1], WEIGHTS) == {PodId("a"): 1.0}
        with pytest.raises(BackendUnavailable):
            backend.pods()
        with start_redis_server(workdir) as srv:
            assert srv.url == url
            # The pooled connection is dead and the script cache empty: both recover.
            assert backend.score([1], WEIGHTS) == {}
            backend.add(PodId("a"), GPU, [1])
            assert backend.score([1], WEIGHTS) == {PodId("a"): 1.0}
            backend.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_unreachable_server_at_construction(tmp_path: Path) -> None:
    # Construction does not connect: a router may start before its Redis does.
    backend = RedisBackend(f"unix://{tmp_path}/absent.sock", socket_timeout_s=0.2)
    with pytest.raises(BackendUnavailable):
        backend.pods()
    backend.close()


def test_closed_backend_raises(server: RedisServerInfo) -> None:
    client = server.client()
    backend = RedisBackend(client=client, prefix=f"c-{uuid.uuid4().hex[:8]}")
    backend.add(PodId("a"), GPU, [1])
    backend.close()
    for call in _every_call(backend, encode_snapshot({}, [])):
        with pytest.raises(BackendUnavailable):
            call()
    assert client.ping()  # an injected client belongs to its owner
    client.close()


def test_config_errors(server: RedisServerInfo) -> None:
    from kvray.errors import ConfigError

    with pytest.raises(ConfigError):
        RedisBackend("http://example.com")
    with pytest.raises(ConfigError):
        RedisBackend(server.url, key_ttl_s=0)
    with pytest.raises(ConfigError):
        RedisBackend(server.url, prefix="")
    raw = redis.Redis(unix_socket_path=server.unix_socket)  # returns bytes
    with pytest.raises(ConfigError):
        RedisBackend(client=raw)
    raw.close()


# -- snapshots and prefixes --------------------------------------------------------------------


def _fill(backend: RedisBackend) -> None:
    for i in range(12):
        pod = PodId(f"pod{i}" if i % 4 else f"node-{i}#dp1")
        backend.add(pod, GPU, list(range(i, i + 50)))
        backend.add(pod, CPU, list(range(i * 7, i * 7 + 20)))
        if i % 3 == 0:
            backend.add(pod, SPEC, [2**64 - 1 - i, 5])
    backend.remove(PodId("pod1"), GPU, list(range(10, 20)))
    backend.clear_pod(PodId("pod2"))
    backend.put_engine_map([(2**64 - 1 - i, i) for i in range(30)])


def _holder_lists(data: bytes) -> dict[str, dict[str, list[int]]]:
    out: dict[str, dict[str, list[int]]] = {}
    for h, t, ks in holder_keys(decode_snapshot(data)):
        out.setdefault(h, {})[t] = list(ks)
    return out


def test_snapshot_restores_into_a_fresh_prefix(make_backend: Callable[..., RedisBackend]) -> None:
    src, dst = make_backend(), make_backend()
    _fill(src)
    dst.add(PodId("stale"), GPU, [1, 2, 999_999])  # restore must replace this
    dst.put_engine_map([(123, 456)])
    data = src.snapshot()
    dst.restore(data)

    keys = sorted({k for _h, _t, ks in holder_keys(decode_snapshot(data)) for k in ks})
    keys += [999_999, 123]
    assert dst.holders(keys) == src.holders(keys)
    assert dst.pods() == src.pods()
    assert dst.stats() == src.stats()
    assert dst.get_engine_map([123, 2**64 - 1]) == [None, 0]
    assert dst.snapshot() == data
    prompt = list(range(60))
    for pods in (None, ["pod5", "pod7"]):
        assert dst.score(prompt, WEIGHTS, pods) == src.score(prompt, WEIGHTS, pods)


def test_restore_of_a_foreign_snapshot(backend: RedisBackend) -> None:
    data = encode_snapshot(
        {"a": {"GPU": [1, 2, 3], "CPU": [1]}, "b": {"CPU": [1, 2]}, "idle": {}}, [(7, 8)]
    )
    backend.restore(data)
    assert backend.score([1, 2, 3], WEIGHTS) == {PodId("a"): 3.0, PodId("b"): 1.6}
    assert backend.pods() == [PodId("a"), PodId("b"), PodId("idle")]
    assert backend.get_engine_map([7]) == [8]
    assert _holder_lists(backend.snapshot()) == {
        "a": {"GPU": [1, 2, 3], "CPU": [1]},
        "b": {"CPU": [1, 2]},
    }


def test_large_restore_in_bounded_round_trips(backend: RedisBackend) -> None:
    big = {f"pod{i}": {"GPU": list(range(i, 2**20, 25)), "CPU": [7, 8]} for i in range(3)}
    backend.add(PodId("old"), GPU, list(range(50_000)))
    backend.restore(encode_snapshot(big, [(i, i) for i in range(10_000)]))
    st_ = backend.stats()
    n_gpu = sum(len(h["GPU"]) for h in big.values())
    assert (st_.pairs, st_.pods, st_.engine_map_entries) == (n_gpu + 6, 3, 10_000)
    assert backend.holders([0, 1, 2, 25, 50_001]) == [
        {PodId("pod0"): {GPU}},
        {PodId("pod1"): {GPU}},
        {PodId("pod2"): {GPU}},
        {PodId("pod0"): {GPU}},
        {PodId("pod1"): {GPU}},
    ]
    assert _holder_lists(backend.snapshot()) == {
        p: {"CPU": [7, 8], "GPU": ks["GPU"]} for p, ks in big.items()
    }
    backend.restore(encode_snapshot({"new": {"GPU": [0]}}, []))  # wipes in several trips
    assert backend.holders([0, 1, 25, 7]) == [{PodId("new"): {GPU}}, {}, {}, {}]
    st_ = backend.stats()
    assert (st_.keys, st_.pairs, st_.pods, st_.engine_map_entries) == (1, 1, 1, 0)


def test_malformed_snapshot_leaves_the_index_alone(backend: RedisBackend) -> None:
    backend.add(PodId("a"), GPU, [1])
    with pytest.raises(MalformedFrame):
        backend.restore(b"\x00not msgpack")
    assert backend.holders([1]) == [{PodId("a"): {GPU}}]


def test_prefixes_are_isolated(make_backend: Callable[..., RedisBackend]) -> None:
    a, b = make_backend(prefix="tenant"), make_backend(prefix="tenant2")
    c = make_backend(prefix="tenant")  # a second reader of the same index
    a.add(PodId("p"), GPU, [1, 2, 3])
    b.add(PodId("p"), CPU, [1, 2])
    a.put_engine_map([(1, 100)])
    assert c.score([1, 2, 3], WEIGHTS) == {PodId("p"): 3.0}
    assert b.score([1, 2, 3], WEIGHTS) == {PodId("p"): 1.6}
    assert b.get_engine_map([1]) == [None]
    assert c.get_engine_map([1]) == [100]

    a.clear_pod(PodId("p"))
    assert b.holders([1]) == [{PodId("p"): {CPU}}]
    b.add(PodId("q"), GPU, [9])
    a.restore(encode_snapshot({"r": {"GPU": [1]}}, []))
    assert b.pods() == [PodId("p"), PodId("q")]
    assert b.stats().pairs == 3
    assert a.pods() == [PodId("r")]
    assert a.stats().pairs == 1
    b.restore(encode_snapshot({}, []))
    assert a.holders([1]) == [{PodId("r"): {GPU}}]
    assert b.stats().pairs == 0


# -- TTL ---------------------------------------------------------------------------------------


def test_key_ttl_expires_blocks(
    make_backend: Callable[..., RedisBackend], server: RedisServerInfo
) -> None:
    # Long enough that no stall expires the keys before they are checked; expiry is waited for.
    backend = make_backend(key_ttl_s=2.0)
    backend.add(PodId("a"), GPU, [1, 2])
    admin = server.client()
    try:
        prefix = backend._prefix
        ttl_ms = admin.pttl(f"{prefix}:b:{1:016x}:GPU")
        assert 0 < ttl_ms <= 2000
        assert admin.ttl(f"{prefix}:pod:a") == -1  # holder bookkeeping never expires
        assert admin.ttl(f"{prefix}:slot") == -1
    finally:
        admin.close()
    assert backend.score([1, 2], WEIGHTS) == {PodId("a"): 2.0}
    deadline = time.monotonic() + 20.0
    while backend.holders([1, 2]) != [{}, {}]:
        assert time.monotonic() < deadline, "block keys never expired"
        time.sleep(0.05)
    assert backend.score([1, 2], WEIGHTS) == {}
    assert _holder_lists(backend.snapshot()) == {}
    # The holder can re-add, remove and be cleared normally afterwards.
    backend.add(PodId("a"), CPU, [1])
    assert backend.score([1], WEIGHTS) == {PodId("a"): 0.8}
    backend.clear_pod(PodId("a"))
    assert backend.holders([1]) == [{}]
    assert backend.stats().pairs == 0
