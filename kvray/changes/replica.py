"""``Replica``: an in-process, exact copy of the whole index, for schedulers and Serve replicas.

A query answered by the shards costs one Ray actor call per shard (~0.7 ms each on a small
machine), more than the whole prefix walk. A replica answers it in the caller's process instead:
a background thread subscribes (ZMQ SUB) to every shard's change stream, loads each shard's
snapshot once (``IndexShard.replica_snapshot``), then applies the shards' ``ChangeMsg`` ops in
seq order to a ``changes.journal.ReplicaIndex``. A missing seq, a new stream (restarted shard) or a
reset makes it take that shard's snapshot again; a shard silent for ``max(1 s, 20 heartbeats)``
is looked up again (it may have moved) and stops counting as live until it is back.

Freshness: a change is visible here one ZMQ hop after the shard applied it (sub-millisecond on
one node). ``wait_for`` gives read-your-writes: shard mutators return ``(stream, seq)`` and
``Client.record_keys``, ``remove_pod`` and ``kvray.sim.applied.wait_applied`` wait for the
replica to reach it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

from kvray.changes.journal import (
    ChangeMsg,
    ReplicaIndex,
    change_decoder,
    snapshot_decoder,
)
from kvray.config import Config
from kvray.core.messages import ReplicaStats
from kvray.core.stats import lag_histogram, quantile

log = logging.getLogger("kvray.replica")

_DRAIN = 256  # messages applied per lock hold: queries wait at most one such batch
_RESOLVE_RETRY_S = 1.0


class Replica:
    """Keeps a ``ReplicaIndex`` current from the shards' change streams (background thread).

    Args:
        shards: the shard actor handles, in shard-id order.
        config: the deployment's config (tier weights, speculative TTL, heartbeat).
    """

    def __init__(self, shards: Sequence[Any], config: Config) -> None:
        self._shards = list(shards)
        self._weights = dict(config.index.tier_weights)
        self._spec_ttl = config.index.speculative_ttl_s
        self._silence_s = max(1.0, 20 * config.replica.heartbeat_s)
        self.index = ReplicaIndex(len(self._shards))
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self.malformed = 0
        self.resyncs = 0
        self.cpu_s = 0.0  # CPU time of the follower thread (what following the shards costs)
        # Shard publish → applied here, last 4096 change messages (same-host clocks: exact on
        # one node, NTP-accurate across nodes).
        self.lags: deque[float] = deque(maxlen=4096)
        self.lag_hist = lag_histogram()  # cumulative, for /metrics
        self._thread = threading.Thread(target=self._run, name="kvray-replica", daemon=True)
        self._thread.start()

    # --- reads -----------------------------------------------------------------------------

    def ready(self, shards: Iterable[int] | None = None) -> bool:
        """Whether every shard (or those named) is loaded and being followed."""
        ids = range(len(self._shards)) if shards is None else shards
        return all(self.index.live(i) for i in ids)

    def wait_ready(self, timeout_s: float) -> bool:
        return self._wait(self.ready, timeout_s)

    def _wait(self, done: Callable[[], bool], timeout_s: float) -> bool:
        """Block until ``done()`` (re-checked whenever the follower applied something)."""
        with self._cond:
            self._cond.wait_for(lambda: done() or self._stop.is_set(), timeout_s)
            return done()

    def score(self, keys: Sequence[int], pods: Collection[str] | None = None) -> dict[str, float]:
        """Longest-prefix scores of every holder (or ``pods``), as the shards would answer."""
        with self._cond:
            scores = self.index.score(keys, self._weights, pods)
        return {str(p): s for p, s in scores.items()}

    def pools(self) -> dict[str, tuple[int, int]]:
        """Holder → ``(blocks held, learned pool size)`` (``core.routing.PoolGauges``)."""
        with self._cond:
            return dict(self.index.pools)

    def positions(self) -> dict[str, int]:
        """Holder → last event seq reflected here."""
        with self._cond:
            return self.index.positions()

    def reached(self, targets: dict[int, tuple[str, int]]) -> bool:
        """Whether each shard's stream is at or past ``(stream, seq)``."""
        for shard, (stream, seq) in targets.items():
            have_stream, have_seq = self.index.seq(shard)
            if have_stream != stream or have_seq < seq:
                return False
        return True

    def wait_for(self, targets: dict[int, tuple[str, int]], timeout_s: float) -> bool:
        """Block until ``reached(targets)`` (read-your-writes after a shard call)."""
        return self._wait(lambda: self.reached(targets), timeout_s)

    async def wait_for_async(self, targets: dict[int, tuple[str, int]], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.reached(targets):
            if time.monotonic() > deadline or self._stop.is_set():
                return False
            await asyncio.sleep(0.0005)
        return True

    def stats(self) -> ReplicaStats:
        with self._cond:
            st = self.index.index.stats()
            return ReplicaStats(
                live_shards=sum(self.index.live(i) for i in range(len(self._shards))),
                shards=len(self._shards),
                keys=st.keys,
                pairs=st.pairs,
                bytes_estimate=st.bytes_estimate,
                applied_msgs=self.index.applied_msgs,
                snapshots_loaded=self.index.snapshots_loaded,
                resyncs=self.resyncs,
                malformed=self.malformed,
                cpu_s=self.cpu_s,
                lag_p50_s=quantile(self.lags, 0.50),
                lag_p99_s=quantile(self.lags, 0.99),
                lag_hist=self.lag_hist.state(),
            )

    def close(self) -> None:
        """Stop following the shards (the copy stays as it is)."""
        self._stop.set()
        self._thread.join(timeout=5)

    def stop_soon(self) -> None:
        """Ask the follower thread to stop, without waiting for it."""
        self._stop.set()

    # --- the follower thread ---------------------------------------------------------------

    def _run(self) -> None:
        import ray
        import zmq

        sub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 0)  # never drop silently: a gap costs a snapshot
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        n = len(self._shards)
        endpoints: list[str | None] = [None] * n
        heard = [0.0] * n  # 0: nothing heard from this endpoint yet
        to_resolve = set(range(n))
        next_resolve = 0.0
        pending: dict[int, tuple[Any, list[ChangeMsg]]] = {}  # snapshot ref, buffered msgs

        def want_snapshot(i: int, buffered: list[ChangeMsg]) -> None:
            pending[i] = (self._shards[i].replica_snapshot.remote(), buffered)

        try:
            while not self._stop.is_set():
                if not ray.is_initialized():
                    # The owner shut Ray down without closing us: any Ray call from here would
                    # auto-connect this process to whichever cluster it finds.
                    log.debug("replica: Ray was shut down; the follower stops")
                    break
                now = time.monotonic()
                if to_resolve and now >= next_resolve:
                    ids = sorted(to_resolve)
                    try:
                        found = ray.get(
                            [self._shards[i].replica_endpoint.remote() for i in ids], timeout=10
                        )
                    except Exception as exc:  # a shard restarting: try again shortly
                        log.debug("replica: shard lookup failed: %s", exc)
                        next_resolve = now + _RESOLVE_RETRY_S
                        continue
                    for i, (endpoint, _stream) in zip(ids, found, strict=True):
                        if endpoint is None:
                            raise RuntimeError(f"shard {i} does not publish changes")
                        old = endpoints[i]
                        if endpoint != old:
                            if old is not None:
                                sub.disconnect(old)
                            sub.connect(endpoint)
                            endpoints[i] = endpoint
                        heard[i] = 0.0
                        to_resolve.discard(i)
                    continue
                if sub.poll(10):
                    self._drain(sub, heard, pending, want_snapshot)
                if self._finish_snapshots(pending, want_snapshot):
                    # A load takes seconds at millions of pairs, and nothing was drained
                    # meanwhile: this thread was busy, not the shards silent. Without the grace
                    # every shard looked silent after each long load and was loaded again.
                    after = time.monotonic()
                    heard[:] = [after if h else 0.0 for h in heard]
                self.cpu_s = time.thread_time()
                now = time.monotonic()
                for i in range(n):
                    if i in to_resolve or i in pending:
                        continue
                    if heard[i] and now - heard[i] > self._silence_s:
                        log.debug("replica: shard %d silent; looking it up again", i)
                        with self._cond:
                            self.index.forget(i)
                        to_resolve.add(i)
        except Exception:  # the owner sees ready() go false and falls back to the shards
            log.exception("replica follower stopped")
            with self._cond:
                for i in range(n):
                    self.index.forget(i)
        finally:
            sub.close(0)
            with self._cond:
                self._cond.notify_all()

    def _drain(
        self,
        sub: Any,
        heard: list[float],
        pending: dict[int, tuple[Any, list[ChangeMsg]]],
        want_snapshot: Any,
    ) -> None:
        import zmq

        now = time.monotonic()
        with self._cond:
            for _ in range(_DRAIN):
                try:
                    raw = sub.recv(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                try:
                    msg = change_decoder.decode(raw.buffer)
                except Exception:
                    self.malformed += 1
                    continue
                i = msg.shard
                if not 0 <= i < len(heard):
                    self.malformed += 1
                    continue
                heard[i] = now
                if i in pending:
                    pending[i][1].append(msg)
                elif self.index.apply(msg):
                    if msg.ops and msg.ts > 0:
                        lag = time.time() - msg.ts
                        self.lags.append(lag)
                        self.lag_hist.observe(lag)
                else:
                    # First contact (the subscription is live: a snapshot now misses nothing),
                    # a gap, a new stream or a reset.
                    if self.index.live(i):
                        self.resyncs += 1
                    self.index.forget(i)
                    want_snapshot(i, [msg])
            self._cond.notify_all()

    def _finish_snapshots(
        self, pending: dict[int, tuple[Any, list[ChangeMsg]]], want_snapshot: Any
    ) -> bool:
        """Load the snapshots that arrived; whether any was loaded."""
        import ray

        loaded = False
        for i in list(pending):
            ref, buffered = pending[i]
            done, _ = ray.wait([ref], timeout=0)
            if not done:
                continue
            del pending[i]
            try:
                snap = snapshot_decoder.decode(ray.get(ref))
            except Exception as exc:  # the shard died meanwhile: wait for its next message
                log.debug("replica: snapshot of shard %d failed: %s", i, exc)
                continue
            with self._cond:
                self.index.load(snap, self._spec_ttl)
                for msg in buffered:
                    if not self.index.apply(msg):
                        self.index.forget(i)
                        want_snapshot(i, [])
                        break
                self._cond.notify_all()
            loaded = True
        return loaded
