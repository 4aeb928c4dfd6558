"""Change streams: a ReplicaIndex fed by Journals scores exactly like the shards it follows."""

from __future__ import annotations

import random

import pytest

from kvray.changes.journal import (
    OP_RESET,
    ChangeMsg,
    Journal,
    ReplicaIndex,
    ReplicaSnapshot,
    change_decoder,
    change_encoder,
    packed_holders,
    snapshot_decoder,
    unpack_keys,
)
from kvray.core.index.base import SPECULATIVE, IndexBackend
from kvray.core.index.budget import BudgetIndex
from kvray.core.index.memory import MemoryIndex
from kvray.types import GPU, PodId, Tier

W = {"GPU": 1.0, "CPU": 0.8, "SPECULATIVE": 0.5}


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Shard:
    """A backend behind a Journal, publishing like IndexShard does (through the wire codec)."""

    def __init__(self, shard_id: int, backend: IndexBackend) -> None:
        self.id = shard_id
        self.backend = backend
        self.journal = Journal(backend)
        self.seq = 0
        self.stream = f"s{shard_id}"

    def publish(self) -> ChangeMsg | None:
        ops = self.journal.drain()
        if not ops:
            return None
        self.seq += 1
        raw = change_encoder.encode(ChangeMsg(self.id, self.stream, self.seq, ops, {}))
        return change_decoder.decode(raw)

    def snapshot(self) -> ReplicaSnapshot:
        raw = change_encoder.encode(
            ReplicaSnapshot(self.id, self.stream, self.seq, packed_holders(self.backend), {})
        )
        return snapshot_decoder.decode(raw)


def _chain(rng: random.Random, n: int) -> list[int]:
    base = rng.randrange(40)  # few distinct chains: prefixes are shared across pods
    return [base * 1000 + i for i in range(n)]


def _mutate(rng: random.Random, shard: Shard, pods: list[str]) -> None:
    j = shard.journal
    pod = PodId(rng.choice(pods))
    r = rng.random()
    tier = Tier(rng.choice(["GPU", "GPU", "CPU"]))
    if r < 0.6:
        j.add(pod, tier, _chain(rng, rng.randrange(1, 30)))
    elif r < 0.9:
        keys = _chain(rng, rng.randrange(1, 30))
        j.remove(pod, tier, keys[rng.randrange(len(keys)) :])
    elif r < 0.95:
        j.clear_pod(pod)
    else:
        with j.speculative(5.0):
            j.add(pod, SPECULATIVE, _chain(rng, 8))


@pytest.mark.parametrize(
    "make",
    [lambda: MemoryIndex(max_keys=300, evict_fraction=0.05), lambda: BudgetIndex(40_000)],
    ids=["memory-lru", "budget"],
)
def test_replica_tracks_two_evicting_shards_exactly(make: object) -> None:
    rng = random.Random(7)
    shards = [Shard(0, make()), Shard(1, make())]  # type: ignore[operator]
    pods = [[f"a{i}" for i in range(4)], [f"b{i}" for i in range(4)]]
    rep = ReplicaIndex(2)
    for s in shards:
        rep.load(s.snapshot(), 5.0)
    for step in range(1500):
        s = shards[rng.randrange(2)]
        _mutate(rng, s, pods[s.id])
        msg = s.publish()
        if msg is not None:
            assert rep.apply(msg)
        if step % 50 == 0:
            for _ in range(20):
                q = _chain(rng, 30)
                want: dict[PodId, float] = {}
                for sh in shards:
                    want.update(sh.backend.score(q, W))
                assert rep.score(q, W) == want
    # The bound really evicted (and the replica followed, or the scores above would differ).
    assert all(sh.backend.stats().evicted_keys > 0 for sh in shards)


def test_gap_new_stream_and_reset_ask_for_a_snapshot() -> None:
    s = Shard(0, MemoryIndex())
    rep = ReplicaIndex(1)
    first = ChangeMsg(0, "s0", 1, [], {})
    assert not rep.apply(first)  # nothing loaded yet
    rep.load(s.snapshot(), 5.0)
    s.journal.add(PodId("p"), GPU, [1, 2, 3])
    m1 = s.publish()
    s.journal.add(PodId("p"), GPU, [4])
    m2 = s.publish()
    assert m1 is not None and m2 is not None
    assert not rep.apply(m2)  # seq 2 before seq 1: a gap
    # A heartbeat announcing seq 1 (which did not arrive) is a gap too, not an empty step.
    assert not rep.apply(ChangeMsg(0, "s0", 1, [], {}))
    assert rep.apply(m1) and rep.apply(m2) and rep.apply(m1)  # in order; a repeat is skipped
    assert rep.score([1, 2, 3, 4], W) == {"p": 4.0}
    assert not rep.apply(ChangeMsg(0, "other", 3, [], {}))  # a restarted shard
    s.journal.restore(MemoryIndex().snapshot())
    m3 = s.publish()
    assert m3 is not None and m3.ops[-1][0] == OP_RESET
    assert not rep.apply(m3) and not rep.live(0)
    rep.load(s.snapshot(), 5.0)
    assert rep.live(0) and rep.score([1, 2, 3, 4], W) == {}


def test_speculative_entries_expire_in_the_replica_on_their_own() -> None:
    clock = Clock()
    s = Shard(0, MemoryIndex())
    rep = ReplicaIndex(1, clock=clock)
    rep.load(s.snapshot(), 5.0)
    with s.journal.speculative(2.0):
        s.journal.add(PodId("p"), SPECULATIVE, [1, 2])
    msg = s.publish()
    assert msg is not None and rep.apply(msg)
    assert rep.score([1, 2], W) == {"p": 1.0}  # 2 blocks at weight 0.5
    clock.t = 2.5  # the shard has not sent its remove (no event arrived): the replica expires
    assert rep.score([1, 2], W) == {}


def test_snapshot_replaces_only_that_shards_holders() -> None:
    a, b = Shard(0, MemoryIndex()), Shard(1, MemoryIndex())
    rep = ReplicaIndex(2)
    b.journal.add(PodId("b"), GPU, [1, 2])
    a.journal.add(PodId("a"), GPU, [1])
    rep.load(a.snapshot(), 5.0)
    rep.load(b.snapshot(), 5.0)
    a.journal.clear_pod(PodId("a"))
    a.journal.add(PodId("a2"), GPU, [1, 2, 3])
    a.publish()  # lost on the way: the replica re-snapshots shard 0
    rep.load(a.snapshot(), 5.0)
    assert rep.score([1, 2, 3], W) == {"a2": 3.0, "b": 2.0}
    assert rep.positions() == {}


@pytest.mark.parametrize("recency", [True, False])
def test_clear_pods_at_once_equals_one_by_one_and_frees_the_slots(recency: bool) -> None:
    rng = random.Random(7)
    pods = [PodId(f"p{i}") for i in range(300)]
    bulk, single = MemoryIndex(recency=recency), MemoryIndex(recency=recency, sweep_batch=7)
    for _ in range(2_000):
        pod, tier = rng.choice(pods), Tier(rng.choice(["GPU", "CPU"]))
        keys = _chain(rng, rng.randrange(1, 30))
        bulk.add(pod, tier, keys)
        single.add(pod, tier, keys)
    gone = rng.sample(pods, 200)
    bulk.clear_pods(gone)
    for pod in gone:
        single.clear_pod(pod)
    keys = sorted({k for d in bulk._tiers.values() for k in d} | set(range(40_000)))
    assert bulk.holders(keys) == single.holders(keys)
    assert not any(set(h) & set(gone) for h in bulk.holders(keys))
    assert bulk.stats().keys == sum(len(d) for d in bulk._tiers.values())
    # The cleared holders' slots are free now: as many new holders need no wider masks.
    width = bulk._next_slot
    for i in range(200):
        bulk.add(PodId(f"new{i}"), GPU, _chain(rng, 5))
    assert bulk._next_slot == width
    assert max(m.bit_length() for d in bulk._tiers.values() for m in d.values()) <= width


def test_replica_snapshots_carry_packed_holders_from_any_backend() -> None:
    """A replica snapshot holds each holder's keys as u64 bytes, the same through a backend's
    own inversion (MemoryIndex) and through the portable snapshot (any other backend)."""
    idx = MemoryIndex()
    idx.add_engine(PodId("a"), GPU, [1, 2, 3], [11, 12, 13])
    idx.add(PodId("b"), Tier("CPU"), [2**64 - 1])
    own, portable = packed_holders(idx), packed_holders(Journal(idx))
    assert own == portable
    assert {h: {t: list(unpack_keys(r)) for t, r in ts.items()} for h, ts in own.items()} == {
        "a": {"GPU": [1, 2, 3]},
        "b": {"CPU": [2**64 - 1]},
    }
    rep = ReplicaIndex(1)
    rep.load(snapshot_decoder.decode(change_encoder.encode(ReplicaSnapshot(0, "s", 4, own, {}))), 5)
    assert rep.score([1, 2, 3], W) == {"a": 3.0}
    assert rep.score([2**64 - 1], W) == {"b": 0.8}
