"""The change stream that keeps read replicas of the index exact.

A shard applies events to its backend through a :class:`Journal`, which forwards every call and
records the mutations that change what ``score`` answers: ``add``, ``remove``, ``clear_pod``, the
keys the size bound evicted (as removes of the holders that held them) and resets (a restore).
After each actor call the shard publishes the recorded ops as one :class:`ChangeMsg` with the next
seq of its *stream*; a :class:`ReplicaIndex` applies them in order to a memory index holding the
union of every shard's holders, and asks for a snapshot when a seq is missing or the stream id
changed (the clone pattern: subscribe, snapshot at a seq, apply what follows).

Keys are the shard's stored keys (request keys by default), so the replica scores exactly like
the shards do: same keys, same tiers, same longest-prefix walk (``MemoryIndex.score``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import msgspec

from kvray.core.index.base import (
    SPECULATIVE,
    IndexBackend,
    IndexStats,
    SpeculativeEntries,
    engine_ops,
    held_op,
)
from kvray.core.index.memory import FrameApplied, MemoryIndex
from kvray.core.snapshot import decode_snapshot, pack_keys, packed, unpack_keys
from kvray.types import GPU, PodId, Tier

OP_ADD = 0
OP_REMOVE = 1
OP_CLEAR = 2
OP_RESET = 3
"""The shard's content was replaced (restore, rebuild): replicas take a new snapshot."""

Op = tuple[int, str, str, bytes, float]
"""``(op, holder, tier, keys, ttl_s)``; ``keys`` packed as u64 little-endian (``pack_keys``:
a replica then decodes one bytes object per op instead of an int per key); ``ttl_s`` > 0 only
for speculative adds."""


def packed_holders(backend: IndexBackend) -> dict[str, dict[str, bytes]]:
    """A backend's holders for a ``ReplicaSnapshot``: its own inversion where it has one
    (``MemoryIndex.holder_keys``), else its portable snapshot's."""
    if isinstance(backend, MemoryIndex):
        return backend.holder_keys(packed=True)
    holders = decode_snapshot(backend.snapshot()).holders  # v2: packed already
    return {h: {t: packed(ks) for t, ks in tiers.items()} for h, tiers in holders.items()}


_NO_KEYS = b""


class ChangeMsg(msgspec.Struct, array_like=True):
    """One publication of a shard: the ops of one actor call, or a heartbeat (no ops)."""

    shard: int
    stream: str
    """The shard's incarnation; a new one means a restarted shard (take a snapshot)."""
    seq: int
    """1, 2, ... within the stream; a heartbeat repeats the last seq and carries no ops."""
    ops: list[Op]
    positions: dict[str, int]
    """Holder → last applied event seq, for the holders this call advanced."""
    ts: float = 0.0
    """The shard's wall clock when it published (replicas measure their lag with it)."""
    pools: dict[str, tuple[int, int]] = msgspec.field(default_factory=dict)
    """Holder → ``(blocks held, learned pool size)``, for the holders this call changed."""


class ReplicaSnapshot(msgspec.Struct, array_like=True):
    """A shard's content at one seq of its stream (what a replica bootstraps from)."""

    shard: int
    stream: str
    seq: int
    holders: dict[str, dict[str, bytes]]
    """Holder → tier → its keys as ``pack_keys`` bytes (as in ``core.snapshot``'s version 2:
    lists of ints are an int object per pair on both sides, and at 1,024 pods × 48 M pairs
    the replica's process kept ~1.5 GB of their freed small-object arenas). No engine map
    (replicas do not resolve engine keys)."""
    positions: dict[str, int]
    pools: dict[str, tuple[int, int]] = msgspec.field(default_factory=dict)
    """Holder → ``(blocks held, learned pool size)`` (``core.routing.PoolGauges``)."""


change_encoder = msgspec.msgpack.Encoder()
change_decoder = msgspec.msgpack.Decoder(ChangeMsg)
snapshot_decoder = msgspec.msgpack.Decoder(ReplicaSnapshot)


class Journal:
    """An ``IndexBackend`` that forwards to ``backend`` and records the score-changing calls.

    Key lists are recorded by reference when they are lists (the write path builds a fresh one
    per call): callers must not mutate a list after passing it.
    """

    def __init__(self, backend: IndexBackend) -> None:
        self.backend = backend
        self.name = backend.name
        self._add_engine, self._remove_engine = engine_ops(backend)
        self._add_held = held_op(backend)
        self.ops: list[Op] = []
        self._ttl_s = 0.0
        if isinstance(backend, MemoryIndex):
            backend.evict_listener = self._evicted

    @contextmanager
    def speculative(self, ttl_s: float) -> Iterator[None]:
        """Speculative adds inside this block carry ``ttl_s`` (replicas expire them too)."""
        self._ttl_s = ttl_s
        try:
            yield
        finally:
            self._ttl_s = 0.0

    def drain(self) -> list[Op]:
        """The ops recorded since the last drain."""
        ops, self.ops = self.ops, []
        return ops

    def reset(self) -> None:
        """Record that the content was replaced wholesale."""
        self.ops.append((OP_RESET, "", "", _NO_KEYS, 0.0))

    def _evicted(self, pod: PodId, tier: Tier, keys: list[int]) -> None:
        self.ops.append((OP_REMOVE, pod, tier, pack_keys(keys), 0.0))

    # --- IndexBackend ----------------------------------------------------------------------

    def _added(self, pod: PodId, tier: Tier, keys: Sequence[int]) -> None:
        """Record an add (speculative ones carry their TTL, for the replicas to expire)."""
        ttl = self._ttl_s if tier == SPECULATIVE else 0.0
        self.ops.append((OP_ADD, pod, tier, pack_keys(keys), ttl))

    def add(self, pod: PodId, tier: Tier, keys: Sequence[int]) -> None:
        self.backend.add(pod, tier, keys)
        self._added(pod, tier, keys)

    def add_held(self, pod: PodId, tier: Tier, keys: Sequence[int]) -> list[int]:
        held = self._add_held(pod, tier, keys)
        self._added(pod, tier, keys)
        return held

    def remove(self, pod: PodId, tier: Tier, keys: Sequence[int]) -> None:
        self.backend.remove(pod, tier, keys)
        self.ops.append((OP_REMOVE, pod, tier, pack_keys(keys), 0.0))

    def clear_pod(self, pod: PodId) -> None:
        self.backend.clear_pod(pod)
        self.ops.append((OP_CLEAR, pod, "", _NO_KEYS, 0.0))

    def pods(self) -> list[PodId]:
        return self.backend.pods()

    def score(
        self,
        keys: Sequence[int],
        weights: Mapping[str, float],
        pods: Collection[str] | None = None,
    ) -> dict[PodId, float]:
        return self.backend.score(keys, weights, pods)

    def holders(self, keys: Sequence[int]) -> list[dict[PodId, set[Tier]]]:
        return self.backend.holders(keys)

    def put_engine_map(self, pairs: Sequence[tuple[int, int]]) -> None:
        self.backend.put_engine_map(pairs)

    def get_engine_map(self, engine_keys: Sequence[int]) -> list[int | None]:
        return self.backend.get_engine_map(engine_keys)

    def add_engine(self, pod: PodId, tier: Tier, keys: list[int], engine: list[int]) -> list[int]:
        held = self._add_engine(pod, tier, keys, engine)
        self._added(pod, tier, keys)
        return held

    def remove_engine(self, pod: PodId, tier: Tier, engine: Sequence[int]) -> tuple[list[int], int]:
        keys, unknown = self._remove_engine(pod, tier, engine)
        self.ops.append((OP_REMOVE, pod, tier, pack_keys(keys), 0.0))
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
    ) -> FrameApplied | None:
        """``MemoryIndex.apply_frames`` on the backend, its ops recorded (None: another
        backend)."""
        if not isinstance(self.backend, MemoryIndex):
            return None
        at = len(self.ops)
        done = self.backend.apply_frames(
            pod, payloads, start, tag, root, block_size, copies, limits
        )
        if done.ops:
            # Evictions the run caused were recorded during the call; the run came first.
            self.ops[at:at] = [
                (OP_ADD if kind == 0 else OP_REMOVE, pod, GPU, keys, 0.0) for kind, keys in done.ops
            ]
        return done

    def stats(self) -> IndexStats:
        return self.backend.stats()

    def snapshot(self) -> bytes:
        return self.backend.snapshot()

    def restore(self, data: bytes) -> None:
        self.backend.restore(data)
        self.reset()

    def close(self) -> None:
        self.backend.close()


class _ShardState:
    __slots__ = ("holders", "positions", "seq", "stream")

    def __init__(self) -> None:
        self.stream: str | None = None  # None: no snapshot loaded yet
        self.seq = 0
        self.holders: set[str] = set()
        self.positions: dict[str, int] = {}


class ReplicaIndex:
    """The union of every shard's content, kept by applying their change streams in order.

    Not thread-safe: the owner serialises ``apply``/``load`` against ``score`` (see
    ``kvray.changes.replica``).
    """

    def __init__(self, num_shards: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        # Bounded by the shards (their evictions arrive as removes): no LRU order to keep.
        self.index = MemoryIndex(max_keys=2**62, recency=False)
        self.shards = [_ShardState() for _ in range(num_shards)]
        self.clock = clock
        self._spec = SpeculativeEntries()
        self.pools: dict[str, tuple[int, int]] = {}
        """Holder → ``(blocks held, learned pool size)``, as its shard last said."""
        self.applied_msgs = 0
        self.snapshots_loaded = 0

    def live(self, shard: int) -> bool:
        """Whether ``shard``'s content has been loaded (then it is kept current by ``apply``)."""
        return self.shards[shard].stream is not None

    def seq(self, shard: int) -> tuple[str | None, int]:
        st = self.shards[shard]
        return st.stream, st.seq

    def positions(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for st in self.shards:
            out.update(st.positions)
        return out

    def apply(self, msg: ChangeMsg) -> bool:
        """Apply one message; False when a snapshot is needed (gap, new stream, reset)."""
        st = self.shards[msg.shard]
        if st.stream != msg.stream:
            return False
        if msg.seq <= st.seq:
            return True  # a heartbeat or a message the snapshot already holds
        if msg.seq != st.seq + 1 or not (msg.ops or msg.positions or msg.pools):
            # A gap; or a heartbeat announcing a seq we never received (heartbeats repeat
            # the last data seq, so one past ours means that data message was lost).
            return False
        idx = self.index
        ops, i, n = msg.ops, 0, len(msg.ops)
        while i < n:
            i = idx.apply_ops(ops, i, st.holders)  # bits set and cleared, in C
            if i >= n:
                break
            op, holder, tier, raw, ttl = ops[i]
            i += 1
            pod = PodId(holder)
            keys = unpack_keys(raw)
            if op == OP_ADD:
                idx.add(pod, Tier(tier), keys)
                st.holders.add(holder)
                if ttl > 0:
                    self._spec.push(self.clock() + ttl, pod, keys.tolist())
            elif op == OP_REMOVE:
                idx.remove(pod, Tier(tier), keys)
                if tier == SPECULATIVE:  # settled by the pod's events, or expired
                    self._spec.discard(pod, keys.tolist())
            elif op == OP_CLEAR:
                idx.clear_pod(pod)
                self._spec.forget(pod)
                st.holders.discard(holder)
                st.positions.pop(holder, None)
            else:  # OP_RESET
                st.stream = None
                return False
        st.positions.update(msg.positions)
        self.pools.update(msg.pools)
        st.seq = msg.seq
        self.applied_msgs += 1
        return True

    def load(self, snap: ReplicaSnapshot, speculative_ttl_s: float) -> None:
        """Replace ``snap.shard``'s holders with the snapshot's content."""
        st = self.shards[snap.shard]
        self.index.clear_pods([PodId(h) for h in st.holders])
        st.holders = set()
        now = self.clock()
        for holder, tiers in snap.holders.items():
            for tier, raw in tiers.items():
                keys = unpack_keys(raw)  # a u64 buffer: or_bits reads it without int objects
                self.index.add(PodId(holder), Tier(tier), keys)
                if tier == SPECULATIVE:  # the remaining TTL is unknown: grant a full one
                    self._spec.push(now + speculative_ttl_s, PodId(holder), keys.tolist())
            st.holders.add(holder)
        st.stream, st.seq, st.positions = snap.stream, snap.seq, dict(snap.positions)
        self.pools.update(snap.pools)
        self.snapshots_loaded += 1

    def forget(self, shard: int) -> None:
        """Mark a shard as needing a snapshot (its content stays until the snapshot replaces it)."""
        self.shards[shard].stream = None

    def expire(self) -> None:
        self._spec.expire(self.clock(), self.index)

    def score(
        self,
        keys: Sequence[int],
        weights: Mapping[str, float],
        pods: Collection[str] | None = None,
    ) -> dict[PodId, float]:
        if self._spec:
            self.expire()
        return self.index.score(keys, weights, pods)
