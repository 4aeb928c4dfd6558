"""The typed messages kvray's processes exchange (msgspec Structs: picklable, so Ray ships them
as they are, and encodable with msgpack where kvray sends them itself).

* ingestor → shard: ``BatchOp`` / ``ClearOp`` in ``IndexShard.apply``, answered by
  ``ApplyReply``;
* shard → controller: ``ShardSnapshot``;
* actor ``stats()`` / ``pods_info()`` answers: ``ShardStats``, ``IngestorStats``,
  ``ReplicaStats``, ``PodInfo``, gathered by the client as ``ClusterStats`` and read by
  ``kvray.metrics`` and ``kvray.cli``.

The change stream's messages (``ChangeMsg``, ``ReplicaSnapshot``) live with the stream, in
``kvray.changes.journal``.
"""

from __future__ import annotations

from typing import Any

import msgspec


class BatchOp(msgspec.Struct):
    """One ZMQ message of a pod's stream, for the shard owning its holder."""

    pod: str
    model: str
    seq: int
    payload: bytes
    contiguous: bool = True
    """False: the sender could not heal a gap before it; the shard takes it whatever its
    position (see ``core.ordering``)."""
    decoded: Any = None
    """The decoded ``EventBatch`` when the reader runs in the shard's own process (never
    shipped between processes: such ops are applied by a direct call)."""


class ClearOp(msgspec.Struct):
    """Forget a holder (its publisher restarted)."""

    holder: str


Op = BatchOp | ClearOp


class ApplyReply(msgspec.Struct):
    """What ``IndexShard.apply`` did with a list of ops."""

    stored: int
    removed: int
    cleared: int
    rejected: dict[str, int]
    behind: dict[str, int]
    """Holder → the shard's position, for holders whose op did not follow it: replay from
    position + 1 (-1: from the start)."""
    incarnation: str


class ShardSnapshot(msgspec.Struct):
    """What a shard needs to come back: its index and per-holder positions."""

    index: bytes
    positions: dict[str, int]
    models: dict[str, str]
    pools: dict[str, tuple[int, int]] = msgspec.field(default_factory=dict)
    copies: dict[str, list[tuple[str, int, int]]] = msgspec.field(default_factory=dict)
    """Holder → (tier, engine key, extra copies) of blocks held more than once."""


class PodInfo(msgspec.Struct, kw_only=True):
    """One holder as its shard sees it (``IndexShard.pods_info``; ``GET /pods`` serves it)."""

    pod: str
    shard: int
    model: str | None
    last_seq: int | None
    """The last applied event seq (None: cleared, or only speculative entries)."""
    idle_s: float
    hash_contract: dict[str, Any]
    blocks: int = 0
    pool_blocks: int | None = None


class ShardStats(msgspec.Struct, kw_only=True):
    """``IndexShard.stats()``: the index's size and the write path's counters."""

    shard: int
    backend: str = ""
    backend_up: bool = True
    keys: int = 0
    pairs: int = 0
    pods: int = 0
    evicted_keys: int = 0
    bytes_estimate: int = 0
    stored_blocks: int = 0
    removed_blocks: int = 0
    cleared: int = 0
    rejected: dict[str, int] = msgspec.field(default_factory=dict)
    malformed: dict[str, int] = msgspec.field(default_factory=dict)
    ops: int = 0
    apply_seconds: float = 0.0
    restored_from_snapshot: bool = False
    rebuilds: int = 0
    rss_bytes: int = 0
    rss_anon_bytes: int = 0
    lag_p50_s: float = 0.0
    lag_p99_s: float = 0.0
    lag_hist: dict[str, Any] | None = None
    """``core.stats.Histogram.state()`` of event-to-visible lags."""
    hash_mismatched_pods: int = 0
    write_path: str = ""
    change_bytes: int = 0
    """Bytes this shard incarnation sent on its change stream (what each replica receives)."""


class IngestorStats(msgspec.Struct, kw_only=True):
    """A pod reader's counters (``Ingestor.stats()``; ``ingestor`` is ``"shard<i>"`` for a
    shard reading its own pods)."""

    ingestor: int | str
    messages: int = 0
    malformed: dict[str, int] = msgspec.field(default_factory=dict)
    seq_gaps: int = 0
    seq_lost: int = 0
    replayed: int = 0
    replay_requests: int = 0
    restarts: int = 0
    shard_calls: int = 0
    shard_failures: int = 0
    recoveries: int = 0
    stored: int = 0
    removed: int = 0
    streams: int = 0


class ReplicaStats(msgspec.Struct, kw_only=True):
    """A read replica's size and follower counters (``Replica.stats()``)."""

    live_shards: int = 0
    shards: int = 0
    keys: int = 0
    pairs: int = 0
    bytes_estimate: int = 0
    applied_msgs: int = 0
    snapshots_loaded: int = 0
    resyncs: int = 0
    malformed: int = 0
    cpu_s: float = 0.0
    lag_p50_s: float = 0.0
    lag_p99_s: float = 0.0
    lag_hist: dict[str, Any] | None = None


class ClusterStats(msgspec.Struct, kw_only=True):
    """``Client.stats()``: every actor's stats, what ``kvray.metrics`` renders."""

    shards: list[ShardStats] = msgspec.field(default_factory=list)
    ingestors: list[IngestorStats] = msgspec.field(default_factory=list)
    """Ingestor actors, then shards reading their own pods."""
    tokenizers: list[dict[str, Any]] = msgspec.field(default_factory=list)
    """``TokenizerActor.stats()`` documents (per model counters)."""
