"""``IndexShard``: one backend holding the blocks of the holders that hash to this shard.

The shard applies ops from ingestors IN ORDER per holder and tracks, per holder, the last seq it
applied (its *position*). Positions make recovery exact: an op whose seq is not the next one
(after a shard restart restored an older snapshot) is refused and reported as ``behind``, and the
ingestor replays the missing range from the pod before sending more. A holder the shard knows
nothing of (restarted without a snapshot, or not in it) is ``behind`` at -1 unless the op starts
its stream (seq 0) or says it is not contiguous (the sender could not heal a gap). Duplicates
(seq ≤ position) are skipped, so replays may overlap freely.

On (re)start the shard restores the controller's latest snapshot of it, if any.

Read replicas: every change to the backend goes through a ``core.journal.Journal``; after each
call the shard publishes the recorded ops as one ``ChangeMsg`` on its ZMQ PUB socket (and a
heartbeat every ``replica.heartbeat_s`` when idle, from a ``tick`` it sends itself), so
``kvray.replica.Replica`` instances in schedulers and Serve replicas stay exact without a call
per query.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from kvray._env import freeze_heap
from kvray.config import Config
from kvray.core import fast
from kvray.core.apply import ApplyResult, IndexWriter
from kvray.core.events import EventDecoder
from kvray.core.index.base import IndexStats
from kvray.core.index.memory import MemoryIndex
from kvray.core.index.registry import create_backend
from kvray.core.journal import ChangeMsg, Journal, ReplicaSnapshot, change_encoder
from kvray.core.stats import lag_histogram, quantile
from kvray.errors import BackendUnavailable, MalformedFrame
from kvray.types import PodId, holder_id

if TYPE_CHECKING:
    from kvray.actors.ingestor import Ingestor

log = logging.getLogger("kvray.shard")

_EPOCH_CHECK_S = 1.0  # also catch a backend that restarted empty between two of our calls
_TICK_S = 1.0  # housekeeping between calls (speculative expiry, silent pods)
_TRIM_S = 30.0  # how often freed heap is returned to the OS (when idle)
_IDLE_S = 2.0  # no apply call for this long: the shard is idle

Op = tuple[Any, ...]
"""``("batch", pod, model, seq, payload, contiguous)`` or ``("clear", holder)``."""


_F = TypeVar("_F", bound=Callable[..., Any])


def _locked(fn: _F) -> _F:
    """Run the method under the shard's lock (its in-process ingestor applies from a thread)."""

    @functools.wraps(fn)
    def wrapper(self: IndexShard, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return fn(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class ShardSnapshot(msgspec.Struct):
    """What a shard needs to come back: its index and per-holder positions."""

    index: bytes
    positions: dict[str, int]
    models: dict[str, str]
    pools: dict[str, tuple[int, int]] = msgspec.field(default_factory=dict)


class IndexShard:
    """The shard actor's body (wrapped with ``ray.remote`` by ``kvray.runtime``)."""

    def __init__(self, shard_id: int, config: dict[str, Any], restore: bool = True) -> None:
        self._lock = threading.RLock()
        self._ingest: Ingestor | None = None  # reads this shard's own pods (``subscribe``)
        self._replay_hints: dict[str, str] = {}
        self.shard_id = shard_id
        self.config = Config.model_validate(config)
        ic = self.config.index
        opts = ic.backend_options()
        if ic.backend == "redis":
            opts["prefix"] = f"{ic.redis_prefix}:s{shard_id}"
        self.backend = create_backend(ic.backend, **opts)
        if shard_id == 0 and not fast.COMPILED:
            log.warning(
                "kvray._speedups is not built (no C compiler at install?): the write path runs "
                "in pure Python, about 1.5-2x slower to ingest"
            )
        self.journal = Journal(self.backend)
        self.writer = IndexWriter(
            self.journal,
            ic.hashing_lookup(),
            key_mode=ic.keys,
            verify_hashes=ic.verify_hashes,
            speculative_ttl_s=ic.speculative_ttl_s,
        )
        self.decoder = EventDecoder()
        self.positions: dict[str, int] = {}
        self.applied = ApplyResult()
        self.malformed: dict[str, int] = {}
        self.ops = 0
        self.apply_seconds = 0.0
        self.restored_from_snapshot = False
        self.rebuilds = 0
        # Event-to-visible lag (publisher ts → applied here), last 8192 batches; same-host
        # wall clocks, so it is exact in the demo and benchmarks, NTP-accurate across hosts.
        self.lags: deque[float] = deque(maxlen=8192)
        self.lag_hist = lag_histogram()  # cumulative, for /metrics
        self.incarnation = uuid.uuid4().hex  # changes on every (re)start: ingestors resync
        self._last_silence_check = time.monotonic()
        self._pub: Any = None  # zmq PUB socket of the change stream (None: not publishing)
        self._pub_endpoint: str | None = None
        self._pub_seq = 0
        self._last_pub = 0.0
        self._advanced: dict[str, int] = {}
        self._pub_lock = threading.Lock()  # the heartbeat thread publishes too
        self._last_trim = time.monotonic()
        self._last_apply = 0.0
        if restore:
            self._restore_from_controller()
        self.journal.drain()  # replicas start from a snapshot, not from the restore's ops
        if self.config.replicas_on():
            self._start_change_stream()
        self._resubscribe(restore)
        # Shared backends (Redis) can lose their content while this shard lives on; a mark
        # written now tells, after an outage, whether the content survived.
        self._backend_down = False
        self._epoch_checked = time.monotonic()
        self._epoch = uuid.uuid4().hex
        self._mark_epoch()
        freeze_heap()  # the collector stops walking Ray's start-up heap (see freeze_heap)

    def _mark_epoch(self) -> None:
        set_epoch = getattr(self.backend, "set_epoch", None)
        if set_epoch is not None:
            try:
                set_epoch(self._epoch)
            except BackendUnavailable:
                self._backend_down = True

    def _check_backend(self) -> None:
        """After an outage: if the backend lost our content, rebuild like a restarted shard
        (latest snapshot, new incarnation so the ingestors replay from its positions)."""
        get_epoch = getattr(self.backend, "get_epoch", None)
        now = time.monotonic()
        if not self._backend_down and (
            get_epoch is None or now - self._epoch_checked < _EPOCH_CHECK_S
        ):
            return
        self._epoch_checked = now
        if get_epoch is None:
            self._backend_down = False
            return
        if get_epoch() != self._epoch:  # raises BackendUnavailable while still down
            log.warning("shard %d: backend lost its content; rebuilding", self.shard_id)
            self.positions = {}
            self.journal.restore(MemoryIndex().snapshot())  # start from empty, then restore
            self._restore_from_controller()
            self.incarnation = uuid.uuid4().hex
            self.rebuilds += 1
            set_epoch = getattr(self.backend, "set_epoch", None)
            if set_epoch is not None:
                set_epoch(self._epoch)
        self._backend_down = False

    def _restore_from_controller(self) -> None:
        try:
            import ray

            from kvray.actors.naming import CONTROLLER

            ctl = ray.get_actor(CONTROLLER, namespace=self.config.namespace)
            data: bytes | None = ray.get(ctl.latest_snapshot.remote(self.shard_id), timeout=30)
        except Exception:  # no controller (standalone shard) or it is gone: start empty
            return
        if data:
            self.restore(data)
            self.restored_from_snapshot = True

    # --- write path ------------------------------------------------------------------------

    @_locked
    def apply(self, ops: list[Op]) -> dict[str, Any]:
        """Apply ops in order. Returns counts and, in ``behind``, holders needing a replay.

        Raises:
            BackendUnavailable: the backend is down; ops from the failing one on are not
                applied (positions say where to resume).
        """
        try:
            self._check_backend()
            return self._apply(ops)
        except BackendUnavailable:
            self._backend_down = True
            raise
        finally:
            self._publish()

    def _apply(self, ops: list[Op]) -> dict[str, Any]:
        t0 = time.perf_counter()
        self._last_apply = time.monotonic()
        res = ApplyResult()
        behind: dict[str, int] = {}
        for op in ops:
            if op[0] == "clear":
                holder = PodId(op[1])
                self.writer.clear_holder(holder)
                self.positions.pop(holder, None)
                res.cleared += 1
                continue
            _, pod, model, seq, payload, contiguous, *decoded = op
            if decoded:  # by this shard's own ingest thread
                batch = decoded[0]
            else:
                try:
                    batch = self.decoder.decode(payload)
                except MalformedFrame as exc:
                    self.malformed[exc.reason] = self.malformed.get(exc.reason, 0) + 1
                    continue
            holder = holder_id(pod, batch.data_parallel_rank)
            if holder in behind:
                continue  # an earlier op of this holder was refused: keep order
            pos = self.positions.get(holder)
            if pos is not None:
                if seq <= pos:
                    res.reject("duplicate")
                    continue
                if contiguous and seq != pos + 1:
                    behind[holder] = pos
                    res.reject("out_of_order")
                    continue
            elif contiguous and seq > 0:
                # Nothing of this holder here (restarted without a snapshot of it, or it was
                # cleared) but the sender says the op follows others: taking it would skip
                # [0, seq) for good. Ask for them (position -1: replay from the start).
                behind[holder] = -1
                res.reject("out_of_order")
                continue
            res.merge(self.writer.apply_batch(holder, model, batch))
            self.positions[holder] = seq
            self._advanced[holder] = seq
            if batch.ts > 0:  # a zero ts is a publisher that does not stamp batches
                lag = time.time() - batch.ts
                self.lags.append(lag)
                self.lag_hist.observe(lag)
        self.applied.merge(res)
        self.ops += len(ops)
        self.apply_seconds += time.perf_counter() - t0
        self._maybe_drop_silent()
        return {
            "stored": res.stored_blocks,
            "removed": res.removed_blocks,
            "cleared": res.cleared,
            "rejected": res.rejected,
            "behind": behind,
            "incarnation": self.incarnation,
        }

    def _maybe_drop_silent(self) -> None:
        ttl = self.config.index.pod_ttl_s
        now = time.monotonic()
        if ttl is None or now - self._last_silence_check < 1.0:
            return
        self._last_silence_check = now
        for holder in self.writer.drop_silent(ttl):
            self.positions.pop(holder, None)

    @_locked
    def clear_pod(self, holder: str) -> tuple[str, int]:
        """Forget a holder (operator action or pod removal); returns ``(stream, seq)``."""
        self.writer.clear_holder(PodId(holder))
        self.positions.pop(holder, None)
        return self.incarnation, self._publish()

    @_locked
    def record_route(
        self, holder: str, keys: list[int], ttl_s: float | None = None
    ) -> tuple[str, int]:
        """Speculative entries for ``holder`` (short TTL); returns the change stream's
        ``(stream, seq)`` holding them (replicas wait for it: read-your-writes)."""
        ttl = self.writer.speculative_ttl_s if ttl_s is None else ttl_s
        with self.journal.speculative(ttl):
            self.writer.record_route(PodId(holder), keys, ttl)
        return self.incarnation, self._publish()

    # --- read path -------------------------------------------------------------------------

    @_locked
    def score(self, keys: list[int], pods: list[str] | None = None) -> dict[str, float]:
        """Longest-prefix scores of this shard's holders."""
        try:
            self._check_backend()
            self._maybe_drop_silent()
            scores = self.writer.score(keys, self.config.index.tier_weights, pods)
        except BackendUnavailable:  # remember the outage: the content may be gone after it
            self._backend_down = True
            raise
        finally:
            self._publish()
        return {str(p): s for p, s in scores.items()}

    # --- reading its own pods (no ingestor hop) --------------------------------------------

    def subscribe(
        self,
        endpoint: str,
        replay_endpoint: str | None = None,
        pod: str | None = None,
        model: str | None = None,
    ) -> None:
        """Read a binding pod's PUB socket in this process (``Controller.add_pod`` sends the
        named pods this shard owns here): its batches skip the ingestor and the Ray call."""
        self._ingestor().add_pod(endpoint, replay_endpoint, pod, model)

    def register_replay(self, pod: str, replay_endpoint: str) -> None:
        self._replay_hints[pod] = replay_endpoint
        if self._ingest is not None:
            self._ingest.register_replay(pod, replay_endpoint)

    def forget_pod(self, pod: str) -> int:
        """Stop tracking a removed pod's streams here (see ``Ingestor.forget_pod``)."""
        return self._ingest.forget_pod(pod) if self._ingest is not None else 0

    def ingest_streams(self) -> dict[str, int]:
        return self._ingest.streams() if self._ingest is not None else {}

    def ingest_progress(self) -> tuple[int, int, int]:
        return self._ingest.progress() if self._ingest is not None else (0, 0, 0)

    def ingest_stats(self) -> dict[str, Any] | None:
        return self._ingest.stats() if self._ingest is not None else None

    def _ingestor(self, resume: list[dict[str, Any]] | None = None) -> Ingestor:
        """The in-process ingestor; ``resume``: pods (``PodEndpoint`` documents) whose streams
        continue from this shard's positions (after a restart: catch up by replay from where
        each holder stopped)."""
        if self._ingest is None:
            from kvray.actors.ingestor import Ingestor, LocalShard
            from kvray.actors.naming import shard_name

            with self._lock:
                resumed = {p["pod"] for p in resume or ()}
                mine = {
                    h: seq for h, seq in self.positions.items() if h.partition("#dp")[0] in resumed
                }
                local = LocalShard(
                    self.shard_id,
                    self.apply,
                    self.get_positions,
                    mine,
                    {str(k): v for k, v in self.writer.models.items() if str(k) in mine},
                    list(resume or ()),
                    dict(self._replay_hints),
                    EventDecoder(self.decoder.limits).decode,  # its own: decoders keep state
                )
            names = [shard_name(i) for i in range(self.config.num_shards)]
            self._ingest = Ingestor(
                -1 - self.shard_id, self.config.model_dump(), names, local=local
            )
        return self._ingest

    def _resubscribe(self, restarted: bool) -> None:
        """Read the named pods of ``events.connect`` this shard owns and, after a restart,
        again the pods the controller sent here (they continue from the restored positions)."""
        ev = self.config.events
        if not ev.shard_reads_named_pods:
            return
        mem: dict[str, Any] = {"pods": [], "replay": {}}
        placement = self.config.placement()
        for spec in ev.connect:
            if spec.pod and placement.owner(spec.pod) == self.shard_id:
                mem["pods"].append(spec.model_dump())
        if restarted:
            try:
                import ray

                from kvray.actors.naming import CONTROLLER

                ctl = ray.get_actor(CONTROLLER, namespace=self.config.namespace)
                got = ray.get(ctl.shard_memory.remote(self.shard_id), timeout=30)
                mem["pods"] += got["pods"]
                mem["replay"] = got["replay"]
            except Exception:  # no controller (standalone shard) or it is gone
                pass
        self._replay_hints.update(mem["replay"])
        if not mem["pods"]:
            return
        self._ingestor(resume=mem["pods"])

    # --- change stream (read replicas) -----------------------------------------------------

    def _start_change_stream(self) -> None:
        import zmq

        host = self.config.replica.host or _node_ip()
        self._pub = zmq.Context.instance().socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.SNDHWM, 100_000)
        port = self._pub.bind_to_random_port(f"tcp://{host}")
        self._pub_endpoint = f"tcp://{host}:{port}"
        threading.Thread(target=self._heartbeat_loop, name="kvray-heartbeat", daemon=True).start()

    def _heartbeat_loop(self) -> None:
        """Announce the stream position when idle (every ``replica.heartbeat_s``), and send
        ``tick`` to this actor about once a second (one in flight at most), so speculative
        expiry and silent-pod drops happen in the actor's own thread even with no calls."""
        try:
            import ray

            me = ray.get_runtime_context().current_actor
        except Exception:  # not running as an actor (unit tests drive tick() themselves)
            me = None
        every = self.config.replica.heartbeat_s
        pending = None
        next_tick = time.monotonic() + _TICK_S
        while True:
            time.sleep(every)
            with self._pub_lock:
                if time.monotonic() - self._last_pub >= every:
                    self._send(ChangeMsg(self.shard_id, self.incarnation, self._pub_seq, [], {}))
            if me is None or time.monotonic() < next_tick:
                continue
            next_tick = time.monotonic() + _TICK_S
            if pending is not None:
                done, _ = ray.wait([pending], timeout=0)
                if not done:
                    continue
            try:
                pending = me.tick.remote()
            except Exception:  # the actor is shutting down
                return

    def _send(self, msg: ChangeMsg) -> None:
        """Publish one message (caller holds ``_pub_lock``)."""
        self._pub.send(change_encoder.encode(msg), copy=False)
        self._last_pub = time.monotonic()

    def _publish(self) -> int:
        """Publish what the journal recorded since the last call; returns the stream seq."""
        ops = self.journal.drain()
        if self._pub is None:
            return 0
        advanced, self._advanced = self._advanced, {}
        pools = self.writer.pools.take_changes()
        with self._pub_lock:
            if not ops and not advanced and not pools:
                return self._pub_seq
            self._pub_seq += 1
            msg = ChangeMsg(
                self.shard_id, self.incarnation, self._pub_seq, ops, advanced, time.time(), pools
            )
            self._send(msg)
            return self._pub_seq

    @_locked
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
        return self._pub_endpoint, self.incarnation

    @_locked
    def replica_snapshot(self) -> bytes:
        """This shard's content at the current seq of its stream (replica bootstrap)."""
        seq = self._publish()  # everything applied so far is at or before ``seq``
        return change_encoder.encode(
            ReplicaSnapshot(
                self.shard_id,
                self.incarnation,
                seq,
                self.backend.snapshot(),
                dict(self.positions),
                self.writer.pools.as_dict(),
            )
        )

    @_locked
    def replica_seq(self) -> tuple[str, int]:
        """The stream id and the seq of the last published change."""
        return self.incarnation, self._publish()

    def release_memory(self) -> int:
        """Return freed heap pages to the OS (glibc ``malloc_trim``): bursts of buffered
        messages leave freed-but-resident arenas behind. Returns the RSS change in bytes."""
        before = _rss_bytes()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        return _rss_bytes() - before

    def reset_lags(self) -> None:
        """Forget recorded lags (benchmarks measure phases separately)."""
        self.lags.clear()

    def ping(self) -> int:
        return self.shard_id

    def node_id(self) -> str:
        """The Ray node this shard runs on (placement checks)."""
        import ray

        return str(ray.get_runtime_context().get_node_id())

    @_locked
    def get_positions(self) -> tuple[str, dict[str, int]]:
        """This incarnation's id and the last applied seq per holder."""
        return self.incarnation, dict(self.positions)

    @_locked
    def pools(self) -> dict[str, tuple[int, int]]:
        """Holder → ``(blocks held, learned pool size)`` (0: not learned yet)."""
        return self.writer.pools.as_dict()

    @_locked
    def pods_info(self) -> list[dict[str, Any]]:
        """Per holder: model, last seq, seconds since last event, hash-contract status."""
        now = self.writer.clock()
        contracts = self.writer.contract()
        out = []
        for holder in set(self.writer.last_seen) | set(self.positions):
            held, pool_size = self.writer.pools.get(holder)
            out.append(
                {
                    "pod": holder,
                    "shard": self.shard_id,
                    "model": self.writer.models.get(PodId(holder)),
                    "last_seq": self.positions.get(holder),
                    "idle_s": round(now - self.writer.last_seen.get(PodId(holder), now), 3),
                    "hash_contract": contracts.get(holder, {"status": "unchecked"}),
                    "blocks": held,
                    "pool_blocks": pool_size or None,
                }
            )
        return sorted(out, key=lambda d: d["pod"])

    @_locked
    def stats(self) -> dict[str, Any]:
        try:
            st = self.backend.stats()
            up = True
        except BackendUnavailable:  # stats must answer while the backend is down
            st = IndexStats(backend=self.config.index.backend)
            up = False
        return {
            "backend_up": up,
            "shard": self.shard_id,
            "backend": st.backend,
            "keys": st.keys,
            "pairs": st.pairs,
            "pods": st.pods,
            "evicted_keys": st.evicted_keys,
            "bytes_estimate": st.bytes_estimate,
            "stored_blocks": self.applied.stored_blocks,
            "removed_blocks": self.applied.removed_blocks,
            "cleared": self.applied.cleared,
            "rejected": dict(self.applied.rejected),
            "malformed": dict(self.malformed),
            "ops": self.ops,
            "apply_seconds": self.apply_seconds,
            "restored_from_snapshot": self.restored_from_snapshot,
            "rebuilds": self.rebuilds,
            "rss_bytes": _rss_bytes(),
            "rss_anon_bytes": _rss_anon_bytes(),
            "lag_p50_s": quantile(self.lags, 0.50),
            "lag_p99_s": quantile(self.lags, 0.99),
            "lag_hist": self.lag_hist.state(),
            "hash_mismatched_pods": sum(
                1 for c in self.writer.contracts.values() if c.status == "mismatch"
            ),
            "write_path": "compiled" if fast.COMPILED else "python",
        }

    # --- snapshot --------------------------------------------------------------------------

    @_locked
    def snapshot(self) -> bytes:
        """Index + positions, restorable by ``restore`` (also after a restart)."""
        return msgspec.msgpack.encode(
            ShardSnapshot(
                self.backend.snapshot(),
                dict(self.positions),
                {str(k): v for k, v in self.writer.models.items()},
                self.writer.pools.as_dict(),
            )
        )

    @_locked
    def restore(self, data: bytes) -> None:
        snap = msgspec.msgpack.decode(data, type=ShardSnapshot)
        self.journal.restore(snap.index)
        self.positions = dict(snap.positions)
        self.writer.pools.load(snap.pools)
        now = self.writer.clock()
        for holder, model in snap.models.items():
            self.writer.models[PodId(holder)] = model
            self.writer.last_seen[PodId(holder)] = now
        self._publish()


def _node_ip() -> str:
    try:
        import ray

        return str(ray.util.get_node_ip_address())
    except Exception:
        return "127.0.0.1"


def _rss_bytes() -> int:
    """This process's resident set size (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _rss_anon_bytes() -> int:
    """Private (anonymous) resident memory: the heap, without mapped files or Ray's shared
    object-store pages, which plain RSS also counts once touched (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
