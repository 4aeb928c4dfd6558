"""The typed messages kvray's processes exchange (msgspec Structs: picklable, so Ray ships them
as they are, and encodable with msgpack where kvray sends them itself).

* ingestor → shard: ``BatchOp`` / ``ClearOp`` in ``IndexShard.apply``, answered by
  ``ApplyReply``;
* shard → controller: ``ShardSnapshot``;
* actor ``stats()`` / ``pods_info()`` answers: ``ShardStats``, ``IngestorStats``,
  ``ReplicaStats``, ``PodInfo`` (read by ``kvray.metrics``, ``kvray.cli`` and the client).

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
