"""``Ingestor``: reads pods' ZMQ streams, checks sequence numbers, ships ops to owning shards.

One daemon thread runs the loop: poll sockets → parse topic/seq/rank (the payload is decoded by
the shard, which spreads CPU) → per stream ``(pod, rank)``: in order / gap (replay from the pod's
ROUTER when known, else counted lost) / restart (a ``ClearOp`` first) → queue per shard
(``actors.shipping``). When a shard reports a holder behind (it restarted from an older
snapshot) or a call fails, the ingestor replays the missing range from the pod and resends. The
decisions are ``core.replay_plan``'s; this class does the I/O.

Malformed messages are counted by reason and logged once per pod per ``log_interval_s``.

The same class also runs *inside* a shard (``IndexShard.subscribe``) for pods that bind their
PUB socket and are named when added (``LocalShard``): the shard then reads its own pods and
applies its own holders' batches by a direct call. Such pods are pinned to the shard reading
them, every data-parallel rank included (``core.sharding.Placement``).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

import msgspec
import ray

from kvray._proc import pin_malloc_thresholds, release_memory
from kvray.actors.naming import ask_controller, in_wait_group, ingestor_name, shard_name
from kvray.actors.shipping import LocalShard, ShardLinks
from kvray.config import Config, PodEndpoint
from kvray.core.messages import IngestorStats
from kvray.core.sharding import shard_of
from kvray.ingest.follower import StreamFollower
from kvray.ingest.zmq_source import ZmqSource

__all__ = ["Ingestor", "LocalShard"]

log = logging.getLogger("kvray.ingestor")

_POLL_MS = 2  # the loop's poll timeout with ops to ship: bounds flush latency at low rates
_IDLE_POLL_MS = 10
"""The poll timeout with nothing to ship or collect: a message still wakes the loop at once,
and an idle reader (an ingestor with no pod of its own, the default with named pods) does not
spend ~8 % of a core turning its loop 500 times a second. The poll holds the actor's lock, so
this also bounds how long a control call waits."""
_RESYNC_S = 1.0  # how often idle shards' positions are compared with the streams
_TRIM_IDLE_S = 2.0  # no message for this long after a burst: return freed heap to the OS


class _Waiter:
    """One ``Ingestor.wait_streams`` call: the streams it waits for, released by the loop."""

    def __init__(self, want: dict[str, int]) -> None:
        self.want = want
        self.keys: dict[str, tuple[str, int]] = {}
        for name in want:
            pod, _, rank = name.rpartition("#")
            self.keys[name] = (pod, int(rank)) if pod and rank.isdigit() else (name, 0)
        self.done = threading.Event()
        self.streams: dict[str, int] = {}


class Ingestor:
    """The ingestor actor's body (wrapped with ``ray.remote`` by ``kvray.runtime``)."""

    def __init__(
        self,
        ingestor_id: int,
        config: dict[str, Any],
        shard_names: list[str],
        log_interval_s: float = 10.0,
        local: LocalShard | None = None,
    ) -> None:
        pin_malloc_thresholds()  # bursts' buffers go back to the OS (see there)
        self.id = ingestor_id
        self.config = cfg = Config.model_validate(config)
        ev = cfg.events
        self.local = local
        self._lock = threading.Lock()
        self.links = ShardLinks(
            shard_names, cfg.namespace, local, flush_messages=ev.flush_messages,
            flush_interval_s=ev.flush_interval_s, max_inflight=ev.max_inflight,
            on_reply=lambda i, r: self.follow.applied(i, r),
            on_failure=lambda i, e: self.follow.failed(i, e),
            # "#life": a restart, however quick, is an outage to the shards' ListenClocks.
            reader=(shard_name(local.shard_id) if local else ingestor_name(ingestor_id))
            + f"#{uuid.uuid4().hex[:12]}",
        )  # fmt: skip
        self.placement = cfg.placement()
        self.follow = StreamFollower(
            ingestor_id, self.links, self.placement,
            replay_timeout_s=ev.replay_timeout_s, replay_attempts=ev.replay_attempts,
            log_interval_s=log_interval_s,
            decode=local.decode if local else None, local_shard=local.shard_id if local else None,
        )  # fmt: skip
        self.source = ZmqSource()
        if local is not None:  # in a shard: its pods are added by subscribe(); no binds
            self.follow.known_models.update(local.models)
            self.follow.known_positions = dict(local.positions)
            self.follow.replay.by_pod.update(local.replay)
            for spec in local.pods:
                self.add_pod(PodEndpoint.model_validate(spec))
        else:
            # After a restart, rebind the ports this ingestor had (pods keep connecting to
            # them) and learn where each holder stopped, so the first message of every stream
            # is checked against the shard instead of being taken on faith.
            previous, self.follow.known_positions = self._previous_life(cfg.namespace)
            for ep in previous or self.owned_binds(cfg, ingestor_id):
                self.source.bind(ep)
            for pod in ev.connect:
                if pod.pod and ev.shard_reads_named_pods:
                    continue  # its shard reads it (OwnPods.resubscribe)
                if self.owner_of(pod.endpoint, cfg.num_ingestors) == ingestor_id:
                    self._connect(pod)
        self._stop = threading.Event()
        self._last_resync = time.monotonic()
        self._received_total = 0
        self._trimmed_at = 0  # _received_total when freed heap was last returned to the OS
        self._last_msg = time.monotonic()
        self._shipped_upto = 0
        self._waiters: list[_Waiter] = []  # wait_streams calls, checked by the loop
        self._thread = threading.Thread(target=self._run, name="kvray-ingest", daemon=True)
        self._thread.start()

    @staticmethod
    def owned_binds(config: Config, ingestor_id: int) -> list[str]:
        """The bind endpoints ingestor ``ingestor_id`` owns (round-robin: one socket, one
        owner, so several ingestors never fight over a port)."""
        n = config.num_ingestors
        return [ep for j, ep in enumerate(config.events.bind) if j % n == ingestor_id]

    @staticmethod
    def owner_of(endpoint: str, num_ingestors: int) -> int:
        """The ingestor that connects to a binding pod's endpoint (stable hash)."""
        return shard_of(endpoint, num_ingestors)

    def _previous_life(self, ns: str) -> tuple[list[str], dict[str, int]]:
        """What the controller and shards remember: bound endpoints, registered pods and
        replay sockets, and each holder's last applied seq and model."""
        mem = ask_controller(ns, "ingestor_memory", self.id) or {
            "endpoints": [],
            "pods": [],
            "replay": {},
            "pins": {},
        }  # no controller (standalone), or it does not answer
        self.follow.replay.by_pod.update(mem["replay"])
        self.placement.update(mem.get("pins", {}))
        for pod in mem["pods"]:
            self._connect(PodEndpoint.model_validate(pod))
        positions: dict[str, int] = {}
        try:
            for part in ray.get([s.pods_info.remote() for s in self.links.handles], timeout=30):
                for info in part:
                    if info.last_seq is not None:
                        positions[info.pod] = info.last_seq
                        self.follow.known_models[info.pod] = info.model or ""
        except Exception:
            positions = {}
        return mem["endpoints"], positions

    # --- control (actor methods) -----------------------------------------------------------

    def node_id(self) -> str:
        """The Ray node this actor runs on (placement checks, fault tests)."""
        return str(ray.get_runtime_context().get_node_id())

    def endpoints(self) -> list[str]:
        """The endpoints this ingestor's SUB sockets are bound to (ports resolved)."""
        return list(self.source.bound_endpoints)

    def add_pod(self, pod: PodEndpoint) -> None:
        """Start reading a pod that binds its PUB socket (in a shard: pinned to it)."""
        with self._lock:
            if self.local is not None and pod.pod:
                self.placement.pin(pod.pod, self.local.shard_id)
            self._connect(pod)

    def pin(self, pod: str, shard: int) -> None:
        """Route every rank of ``pod`` to ``shard`` (``Controller.add_pod`` decided it)."""
        with self._lock:
            self.placement.pin(pod, shard)

    def register_replay(self, pod: str, replay_endpoint: str) -> None:
        """Tell the ingestor where a (connecting) pod's replay ROUTER is."""
        self.follow.replay.register(pod, replay_endpoint)

    def forget_pod(self, pod: str) -> int:
        """Stop tracking a removed pod's streams (all ranks); returns how many were dropped."""
        with self._lock:
            return self.follow.forget_pod(pod)

    def _connect(self, pod: PodEndpoint) -> None:
        self.source.connect(pod)
        self.follow.replay.learn(pod.endpoint, pod.replay_endpoint, pod.pod)

    def stats(self) -> IngestorStats:
        with self._lock:
            return msgspec.structs.replace(
                self.follow.counters, malformed=dict(self.follow.counters.malformed),
                shard_calls=self.links.calls, streams=len(self.follow.seq.streams()),
            )  # fmt: skip

    @in_wait_group  # blocks: in threads of its own
    def wait_streams(self, want: dict[str, int], timeout_s: float = 1.0) -> dict[str, int] | None:
        """Block until the streams of ``want`` (``"<pod>#<rank>"`` → the next seq its publisher
        will use) that this reader has seen, at least one, have reached their seqs and all it
        received is shipped; returns those streams' next seqs, or None after ``timeout_s``
        (this reader has seen none of them, or they are not there yet). The loop checks after
        each turn, so the answer comes as the stream completes (``kvray.sim.wait_applied``)."""
        w = _Waiter(want)
        self._waiters.append(w)
        try:
            return w.streams if w.done.wait(timeout_s) else None
        finally:
            self._waiters.remove(w)

    def _check_waiters(self) -> None:
        """Release the ``wait_streams`` calls whose streams are complete (loop thread)."""
        if self._shipped_upto < self._received_total or self.links.in_flight():
            return
        seen = self.follow.seq.streams()
        for w in list(self._waiters):
            mine = {name: seen[st] for name, st in w.keys.items() if st in seen}
            if mine and all(v >= w.want[name] for name, v in mine.items()):
                w.streams = mine
                w.done.set()

    def progress(self) -> tuple[int, int, int]:
        """(messages received, received messages fully shipped, calls in flight): a caller
        waits for everything received so far by polling until shipped reaches it with no
        call in flight (``tests.helpers.sync``)."""
        return self._received_total, self._shipped_upto, self.links.in_flight()

    def stop(self) -> None:
        """Stop the loop and close sockets (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=5)
        self.source.close()

    # --- the loop --------------------------------------------------------------------------

    def _idle_after_burst(self) -> bool:
        """Messages arrived since the last trim and none for ``_TRIM_IDLE_S``: a burst's ZMQ
        and decode buffers were freed but stay resident until glibc is told (``malloc_trim``
        costs milliseconds on a small heap; never while messages flow)."""
        return (
            self._received_total > self._trimmed_at
            and time.monotonic() - self._last_msg >= _TRIM_IDLE_S
        )

    def _run(self) -> None:
        if self.follow.known_positions:
            with self._lock:
                try:
                    self.follow.catch_up()
                except Exception:
                    log.exception("ingestor %d: catch-up after restart failed", self.id)
        while not self._stop.is_set():
            try:
                with self._lock:
                    idle = not any(self.links.pending) and not self.links.in_flight()
                    msgs = self.source.poll(_IDLE_POLL_MS if idle else _POLL_MS)
                    for frames, origin in msgs:
                        self.follow.handle(frames, origin)
                    self._received_total += len(msgs)
                    if msgs:
                        self._last_msg = time.monotonic()
                    elif self._idle_after_burst():
                        self._trimmed_at = self._received_total
                        release_memory()
                    self.links.flush(force=False)
                    self.links.reap()
                    if time.monotonic() - self._last_resync >= _RESYNC_S:
                        self._last_resync = time.monotonic()
                        self.links.ask_idle_positions()
                    for shard, incarnation, positions in self.links.idle_answers():
                        if not self.links.busy(shard):
                            self.follow.idle_answer(shard, incarnation, positions)
                    if not any(self.links.pending):
                        self._shipped_upto = self._received_total
                    if self._waiters:
                        self._check_waiters()
            except Exception:  # the loop must not die; log and back off briefly
                log.exception("ingestor %d loop error", self.id)
                time.sleep(0.1)
