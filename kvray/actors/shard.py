"""``IndexShard``: one backend holding the blocks of the holders that hash to this shard.

A shard is a backend plus forwarding: ops from readers go through ``core.ordering`` (per-holder
positions: exactly-once, in order, *behind* when a range is missing) into the ``IndexWriter``,
whose backend is wrapped in a ``changes.Journal``; after each call the recorded changes go out
on the shard's change stream (``changes.publisher``) for read replicas. Pods the shard owns and
reads itself are ``OwnPods``. On (re)start the shard restores the controller's latest snapshot
of it, if any; a shared backend that lost its content (``core.epoch``) is rebuilt the same way.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

import kvray.backends  # noqa: F401  (registers the Redis backend)
from kvray._env import freeze_heap
from kvray._proc import node_ip, pin_malloc_thresholds, release_memory
from kvray.actors._locking import locked
from kvray.actors.naming import ask_controller, in_wait_group
from kvray.actors.own_pods import OwnPods
from kvray.actors.shard_status import pods_info, shard_stats
from kvray.changes.journal import Journal, ReplicaSnapshot, change_encoder, packed_holders
from kvray.changes.publisher import ChangePublisher, actor_poke
from kvray.config import Config, PodEndpoint
from kvray.core import fast
from kvray.core.apply import IndexWriter
from kvray.core.epoch import EpochGuard
from kvray.core.events import EventDecoder
from kvray.core.index.memory import MemoryIndex
from kvray.core.index.registry import create_backend
from kvray.core.messages import ApplyReply, IngestorStats, Op, PodInfo, ShardSnapshot, ShardStats
from kvray.core.ordering import OrderedApplier
from kvray.errors import BackendUnavailable
from kvray.types import PodId

log = logging.getLogger("kvray.shard")

_TRIM_S = 30.0  # how often freed heap is returned to the OS (when idle)
_IDLE_S = 2.0  # no apply call for this long: the shard is idle
_F = TypeVar("_F", bound=Callable[..., Any])


def _guarded(fn: _F) -> _F:
    """Check the backend's epoch first; remember an outage (the content may be gone after
    it); publish what the call changed, whatever happened."""

    @functools.wraps(fn)
    def wrapper(self: IndexShard, *args: Any, **kwargs: Any) -> Any:
        try:
            if self.epoch.lost():
                self._rebuild()
            return fn(self, *args, **kwargs)
        except BackendUnavailable:
            self.epoch.down = True
            raise
        finally:
            self._publish()

    return wrapper  # type: ignore[return-value]


class IndexShard:
    """The shard actor's body (wrapped with ``ray.remote`` by ``kvray.runtime``)."""

    def __init__(self, shard_id: int, config: dict[str, Any], restore: bool = True) -> None:
        pin_malloc_thresholds()  # bursts' buffers go back to the OS (see there)
        self._lock = threading.RLock()
        self.shard_id = shard_id
        self.config = cfg = Config.model_validate(config)
        opts = cfg.index.backend_options()
        if cfg.index.backend == "redis":
            opts["prefix"] = f"{cfg.index.redis_prefix}:s{shard_id}"
        self.backend = create_backend(cfg.index.backend, **opts)
        if shard_id == 0 and not fast.COMPILED:
            log.warning(
                "kvray._speedups is not built (no C compiler at install?): the write path runs "
                "in pure Python, about 1.5-2x slower to ingest"
            )
        self.journal = Journal(self.backend)
        self.writer = IndexWriter(
            self.journal, cfg.index.hashing_lookup(), key_mode=cfg.index.keys,
            verify_hashes=cfg.index.verify_hashes, verify_blocks=cfg.index.verify_blocks,
            speculative_ttl_s=cfg.index.speculative_ttl_s,
        )  # fmt: skip
        self.decoder = EventDecoder()
        self.applier = OrderedApplier(self.writer, self.decoder.decode, decoder=self.decoder)
        self.restored_from_snapshot = False
        self.rebuilds = 0
        self.incarnation = uuid.uuid4().hex  # changes on every (re)start: readers resync
        self.changes = ChangePublisher(
            shard_id, self.incarnation, (cfg.replica.host or node_ip()) if cfg.replicas_on()
            else None, cfg.replica.heartbeat_s,
        )  # fmt: skip
        self.own = OwnPods(
            shard_id, cfg, self.apply, self.get_positions,
            lambda: EventDecoder(self.decoder.limits).decode_lazy,  # its own: decoders keep state
        )  # fmt: skip
        self._last_trim = time.monotonic()
        self._last_apply = 0.0
        self._writes = 0
        if restore:
            self._restore_from_controller()
        self.journal.drain()  # replicas start from a snapshot, not from the restore's ops
        self.changes.start_heartbeat(actor_poke("tick"))
        self.own.resubscribe(self.applier, restore)
        self.epoch = EpochGuard(self.backend)
        self.epoch.mark()
        freeze_heap()  # the collector stops walking Ray's start-up heap (see freeze_heap)

    def _rebuild(self) -> None:
        """The backend lost our content: rebuild like a restarted shard (latest snapshot, new
        incarnation so the readers replay from its positions)."""
        log.warning("shard %d: backend lost its content; rebuilding", self.shard_id)
        self.applier.positions = {}
        self.journal.restore(MemoryIndex().snapshot())  # start from empty, then restore
        self.writer.load_copies({})
        self._restore_from_controller()
        self.incarnation = self.changes.stream = uuid.uuid4().hex
        self.rebuilds += 1
        self.epoch.rebuilt()

    def _restore_from_controller(self) -> None:
        data = ask_controller(self.config.namespace, "latest_snapshot", self.shard_id)
        if data:  # none (or no controller: a standalone shard): start empty
            self.restore(data)
            self.restored_from_snapshot = True

    def _publish(self) -> int:
        """Publish what the journal recorded since the last call; returns the stream seq.
        Every call that changed something counts in ``_writes`` (``snapshot_if_changed``)."""
        ops = self.journal.drain()
        advanced = self.applier.take_advanced()
        pools = self.writer.pools.take_changes()
        if ops or advanced or pools:
            self._writes += 1
        if not self.changes.enabled:
            return 0
        return self.changes.publish(ops, advanced, pools)

    def _maybe_drop_silent(self) -> None:
        self.applier.drop_silent(self.config.index.pod_ttl_s)

    # --- write path ------------------------------------------------------------------------

    @locked
    @_guarded
    def apply(self, ops: list[Op], reader: str | None = None) -> ApplyReply:
        """Apply ops in order (``core.ordering``); ``behind`` names holders needing a replay.
        ``reader``: the sending ingestor; its pods' silence counts only while it calls
        (``core.ordering.ListenClocks``).

        Raises:
            BackendUnavailable: the backend is down; ops from the failing one on are not
                applied (positions say where to resume).
        """
        self._last_apply = time.monotonic()
        res, behind = self.applier.apply(ops, reader)
        self._maybe_drop_silent()
        return ApplyReply(
            res.stored_blocks, res.removed_blocks, res.cleared, res.rejected, behind,
            self.incarnation,
        )  # fmt: skip

    @locked
    def clear_pod(self, holder: str) -> tuple[str, int]:
        """Forget a holder (operator action or pod removal); returns ``(stream, seq)``."""
        self.applier.clear(holder)
        return self.incarnation, self._publish()

    @locked
    def record_route(
        self, holder: str, keys: list[int], ttl_s: float | None = None
    ) -> tuple[str, int]:
        """Speculative entries for ``holder`` (short TTL); returns the change stream's
        ``(stream, seq)`` holding them (replicas wait for it: read-your-writes)."""
        ttl = self.writer.speculative_ttl_s if ttl_s is None else ttl_s
        with self.journal.speculative(ttl):
            self.writer.record_route(PodId(holder), keys, ttl)
        return self.incarnation, self._publish()

    @locked
    @_guarded
    def score(self, keys: list[int], pods: list[str] | None = None) -> dict[str, float]:
        """Longest-prefix scores of this shard's holders."""
        self._maybe_drop_silent()
        scores = self.writer.score(keys, self.config.index.tier_weights, pods)
        return {str(p): s for p, s in scores.items()}

    @locked
    def restore(self, data: bytes) -> None:
        snap = msgspec.msgpack.decode(data, type=ShardSnapshot)
        self.journal.restore(snap.index)
        self.applier.restore(snap.positions, snap.models)
        self.writer.pools.load(snap.pools)
        self.writer.load_copies(snap.copies)
        self._publish()

    # --- pods this shard reads itself (forwarded to ``OwnPods``) -----------------------------

    def subscribe(self, pod: PodEndpoint) -> None:
        """Read a named binding pod this shard owns (``Controller.add_pod``) in this process."""
        self.own.add(pod)

    def register_replay(self, pod: str, replay_endpoint: str) -> None:
        self.own.register_replay(pod, replay_endpoint)

    def forget_pod(self, pod: str) -> int:
        """Stop tracking a removed pod's streams here (see ``Ingestor.forget_pod``)."""
        return self.own.forget(pod)

    def ingest_progress(self) -> tuple[int, int, int]:
        return self.own.progress()

    @in_wait_group  # blocks: not in the default group, which runs one call at a time
    def ingest_wait(self, want: dict[str, int], timeout_s: float = 1.0) -> dict[str, int] | None:
        """``Ingestor.wait_streams`` of the pods this shard reads itself."""
        return self.own.wait_streams(want, timeout_s)

    def ingest_stats(self) -> IngestorStats | None:
        return self.own.stats()

    # --- read-only answers ------------------------------------------------------------------

    @locked
    def get_positions(self, reader: str | None = None) -> tuple[str, dict[str, int]]:
        """This incarnation's id and the last applied seq per holder (an idle ``reader``
        asks every second: it is still listening)."""
        if reader is not None:
            self.applier.listening.heard(reader)
        return self.incarnation, dict(self.applier.positions)

    @locked
    def pools(self) -> dict[str, tuple[int, int]]:
        """Holder → ``(blocks held, learned pool size)`` (0: not learned yet)."""
        return self.writer.pools.as_dict()

    @locked
    def pods_info(self) -> list[PodInfo]:
        """Per holder: model, last seq, seconds since last event, hash-contract status."""
        return pods_info(self.shard_id, self.applier)

    @locked
    def stats(self) -> ShardStats:
        return shard_stats(
            self.shard_id, self.backend, self.config.index.backend, self.applier,
            restored_from_snapshot=self.restored_from_snapshot, rebuilds=self.rebuilds,
            change_bytes=self.changes.bytes_sent,
        )  # fmt: skip

    @locked
    def snapshot(self) -> bytes:
        """Index + positions, restorable by ``restore`` (also after a restart)."""
        models = {str(k): v for k, v in self.writer.models.items()}
        return msgspec.msgpack.encode(ShardSnapshot(
            self.backend.snapshot(), dict(self.applier.positions), models,
            self.writer.pools.as_dict(), self.writer.copies(),
        ))  # fmt: skip

    @locked
    def snapshot_if_changed(
        self, since: tuple[str, int] | None
    ) -> tuple[tuple[str, int], bytes | None]:
        """``(version, snapshot)``, or ``(version, None)`` when nothing changed since the
        snapshot taken at version ``since`` (the controller keeps that one: an idle shard is
        not copied again every interval, which at tens of millions of pairs takes seconds
        under the write lock). A version is ``(incarnation, writes)``: a restarted or rebuilt
        shard never matches an older one."""
        version = (self.incarnation, self._writes)
        if since is not None and tuple(since) == version:
            return version, None
        return version, self.snapshot()

    @locked
    def lags(self) -> tuple[int, list[float]]:
        """Lags observed so far (count) and the last 8192, oldest first (read-only)."""
        return self.applier.lag_hist.count, list(self.applier.lags)

    def ping(self) -> int:
        return self.shard_id

    def node_id(self) -> str:
        """The Ray node this shard runs on (placement checks)."""
        import ray

        return str(ray.get_runtime_context().get_node_id())

    def release_memory(self) -> int:
        return release_memory()  # freed heap back to the OS; returns the RSS change

    # --- change stream (read replicas) -----------------------------------------------------

    @locked
    def tick(self) -> int:
        """Housekeeping between calls: speculative expiry, silent pods (published as usual),
        and, when idle, freed heap back to the OS at most every ``_TRIM_S`` (``malloc_trim``
        can take tens of milliseconds on a large heap: never while events flow)."""
        if self.writer._spec:
            self.writer.expire()
        self._maybe_drop_silent()
        now = time.monotonic()
        if now - self._last_trim >= _TRIM_S and now - self._last_apply >= _IDLE_S:
            self._last_trim = now
            self.release_memory()
        return self._publish()

    def replica_endpoint(self) -> tuple[str | None, str]:
        """Where this shard publishes its changes, and its stream id."""
        return self.changes.endpoint, self.incarnation

    @locked
    def replica_snapshot(self) -> bytes:
        """This shard's content at the current seq of its stream (replica bootstrap)."""
        seq = self._publish()  # everything applied so far is at or before ``seq``
        return change_encoder.encode(ReplicaSnapshot(
            self.shard_id, self.incarnation, seq, packed_holders(self.backend),
            dict(self.applier.positions), self.writer.pools.as_dict(),
        ))  # fmt: skip

    @locked
    def replica_seq(self) -> tuple[str, int]:
        """The stream id and the seq of the last published change."""
        return self.incarnation, self._publish()
