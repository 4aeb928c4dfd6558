"""``Ingestor``: reads pods' ZMQ streams, checks sequence numbers, ships ops to owning shards.

One daemon thread runs the loop: poll sockets → parse topic/seq/rank (the payload is decoded by
the shard, which spreads CPU) → per stream ``(pod, rank)``: in order / gap (replay from the pod's
ROUTER when known, else counted lost) / restart (a ``clear`` op first) → queue per shard → ship
when ``flush_messages`` are queued or ``flush_interval_s`` passed, with at most ``max_inflight``
calls per shard in flight (backpressure: the loop waits, ZMQ buffers).

Per-holder order holds because one ingestor reads a pod and Ray runs one caller's calls to an
actor in submission order. When a shard reports a holder ``behind`` (it restarted from an older
snapshot) or a call fails, the ingestor replays the missing range from the pod and resends.

Malformed messages are counted by reason and logged once per pod per ``log_interval_s``.

The same class also runs *inside* a shard (``IndexShard.subscribe``) for pods that bind their
PUB socket and are named when added: the shard then reads its own pods, and the batches of its
own holders are applied by a direct call (``local``) instead of a Ray call carrying the payload
bytes through the object store. Such pods are pinned to the shard reading them, every
data-parallel rank included (``core.sharding.Placement``); holders of other shards still go to
their shard by Ray call.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

from kvray.config import Config, PodEndpoint
from kvray.core.events import EventBatch, peek_rank
from kvray.core.sequencing import SeqTracker, Verdict
from kvray.core.sharding import shard_of
from kvray.core.topics import parse_frames, parse_topic
from kvray.errors import BackendUnavailable, MalformedFrame
from kvray.ingest.zmq_source import ZmqSource, request_replay
from kvray.types import holder_id

log = logging.getLogger("kvray.ingestor")

_POLL_MS = 2  # the loop's poll timeout: bounds flush latency at low rates
_RESYNC_S = 1.0  # how often idle shards' positions are compared with the streams
_BACKEND_RETRY_S = 0.5  # pause before resending to a shard whose backend is unavailable
_OPEN = 2**63  # an open-ended replay range ("everything the pod still has")


def offset_port(endpoint: str, offset: int) -> str:
    """``tcp://host:port`` with ``port + offset`` (vLLM's data-parallel port rule)."""
    head, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit() or not endpoint.startswith("tcp://"):
        return endpoint
    return f"{head}:{int(port) + offset}"


@dataclass
class LocalShard:
    """The shard an in-shard ingestor applies to directly (no Ray call)."""

    shard_id: int
    apply: Callable[[list[tuple[Any, ...]]], dict[str, Any]]
    get_positions: Callable[[], tuple[str, dict[str, int]]]
    positions: dict[str, int]
    """Where each holder stopped (the restored snapshot's positions): catch-up starts there."""
    models: dict[str, str]
    pods: list[dict[str, Any]]
    """``PodEndpoint`` documents to read from the start (their replay sockets serve catch-up)."""
    replay: dict[str, str]
    """Known replay sockets by pod (``register_replay``)."""
    decode: Callable[[bytes], EventBatch]
    """The shard's decoder: the ingest thread decodes each batch once (it needs the rank)."""


class _ShardHandles:
    """Shard actor handles by shard id, looked up on first use (an in-shard ingestor starts
    while its sibling shards may still be starting); ``None`` for the local shard."""

    def __init__(self, names: list[str], namespace: str, local_id: int | None) -> None:
        self._names = names
        self._ns = namespace
        self._local_id = local_id
        self._handles: list[Any] = [None] * len(names)

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, i: int) -> Any:
        if i == self._local_id:
            return None
        if self._handles[i] is None:
            self._handles[i] = ray.get_actor(self._names[i], namespace=self._ns)
        return self._handles[i]

    def __iter__(self) -> Any:
        return (self[i] for i in range(len(self._names)))


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
        self.id = ingestor_id
        self.config = Config.model_validate(config)
        ns = self.config.namespace
        self.local = local
        self.shards = _ShardHandles(shard_names, ns, local.shard_id if local else None)
        ev = self.config.events
        self.source = ZmqSource()
        self.replay_endpoints: dict[str, str] = {}
        self._known_models: dict[str, str] = {}
        self.placement = self.config.placement()
        if local is not None:  # in a shard: its pods are added by subscribe(); no binds
            self._known_models.update(local.models)
            self._known_positions = dict(local.positions)
            self.replay_endpoints.update(local.replay)
            for spec in local.pods:
                self._connect(PodEndpoint.model_validate(spec))
                if spec.get("pod"):
                    self.placement.pin(spec["pod"], local.shard_id)
        else:
            # After a restart, rebind the ports this ingestor had (pods keep connecting to
            # them) and learn where each holder stopped, so the first message of every stream
            # is checked against the shard instead of being taken on faith.
            previous, self._known_positions = self._previous_life(ns)
            for ep in previous or self.owned_binds(self.config, ingestor_id):
                self.source.bind(ep)
            for pod in ev.connect:
                if pod.pod and ev.shard_reads_named_pods:
                    continue  # its shard reads it (IndexShard._resubscribe)
                if self.owner_of(pod.endpoint, self.config.num_ingestors) == ingestor_id:
                    self._connect(pod)
        self.seq = SeqTracker()
        self.streams_model: dict[tuple[str, int], str] = {}
        self._pending: list[list[tuple[Any, ...]]] = [[] for _ in self.shards]
        self._pending_since = [0.0] * len(self.shards)
        self._inflight: list[deque[tuple[Any, list[tuple[Any, ...]]]]] = [
            deque() for _ in self.shards
        ]
        self.counters: dict[str, Any] = {
            "messages": 0,
            "malformed": {},
            "seq_gaps": 0,
            "seq_lost": 0,
            "replayed": 0,
            "replay_requests": 0,
            "restarts": 0,
            "shard_calls": 0,
            "shard_failures": 0,
            "recoveries": 0,
            "stored": 0,
            "removed": 0,
        }
        self._log_interval_s = log_interval_s
        self._last_log: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._last_resync = time.monotonic()
        self._incarnations: dict[int, str] = {}
        self._resync_refs: list[tuple[int, Any]] = []
        self._received_total = 0
        self._shipped_upto = 0
        # Per stream, the seqs catch-up replayed ``(first, last)``: live copies of them that
        # were already buffered in the SUB socket are duplicates, not a restarted pod.
        self._caught_up: dict[tuple[str, int], tuple[int, int]] = {}
        # Holders whose missing range no replay could heal: their next op is sent as not
        # contiguous, so the shard takes it (the loss is counted in ``seq_lost``).
        self._unhealed: set[str] = set()
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
        from kvray.actors.naming import CONTROLLER

        try:
            ctl = ray.get_actor(CONTROLLER, namespace=ns)
            mem = ray.get(ctl.ingestor_memory.remote(self.id), timeout=30)
        except Exception:  # no controller (standalone), or it does not answer
            mem = {"endpoints": [], "pods": [], "replay": {}, "pins": {}}
        self.replay_endpoints.update(mem["replay"])
        self.placement.update(mem.get("pins", {}))
        for pod in mem["pods"]:
            self._connect(PodEndpoint.model_validate(pod))
        positions: dict[str, int] = {}
        try:
            for part in ray.get([s.pods_info.remote() for s in self.shards], timeout=30):
                for info in part:
                    if info["last_seq"] is not None:
                        positions[info["pod"]] = info["last_seq"]
                        self._known_models[info["pod"]] = info["model"] or ""
        except Exception:
            positions = {}
        return mem["endpoints"], positions

    def _catch_up(self) -> None:
        """After a restart: replay, from each holder's last applied seq, what the pods sent
        while this ingestor was down (for pods whose replay socket is known)."""
        for holder, pos in list(self._known_positions.items()):
            pod, _, rank_s = holder.partition("#dp")
            rank = int(rank_s) if rank_s.isdigit() else 0
            if self._replay_endpoint(pod, None, rank) is None:
                continue
            stream = (pod, rank)
            self.streams_model[stream] = self._known_models.get(holder, "")
            got = self._replay(stream, pos + 1, _OPEN, None, count_missing=False)
            if got is not None:
                self.seq.observe(stream, got)
                del self._known_positions[holder]
                if got > pos:
                    self._caught_up[stream] = (pos + 1, got)

    # --- control (actor methods) -----------------------------------------------------------

    def node_id(self) -> str:
        """The Ray node this actor runs on (placement checks, fault tests)."""
        return str(ray.get_runtime_context().get_node_id())

    def endpoints(self) -> list[str]:
        """The endpoints this ingestor's SUB sockets are bound to (ports resolved)."""
        return list(self.source.bound_endpoints)

    def add_pod(
        self,
        endpoint: str,
        replay_endpoint: str | None = None,
        pod: str | None = None,
        model: str | None = None,
    ) -> None:
        """Start reading a pod that binds its PUB socket (in a shard: pinned to it)."""
        with self._lock:
            if self.local is not None and pod:
                self.placement.pin(pod, self.local.shard_id)
            self._connect(
                PodEndpoint(
                    endpoint=endpoint, replay_endpoint=replay_endpoint, pod=pod, model=model
                )
            )

    def pin(self, pod: str, shard: int) -> None:
        """Route every rank of ``pod`` to ``shard`` (``Controller.add_pod`` decided it)."""
        with self._lock:
            self.placement.pin(pod, shard)

    def register_replay(self, pod: str, replay_endpoint: str) -> None:
        """Tell the ingestor where a (connecting) pod's replay ROUTER is."""
        self.replay_endpoints[pod] = replay_endpoint

    def forget_pod(self, pod: str) -> int:
        """Stop tracking a removed pod's streams (all ranks); returns how many were dropped."""
        with self._lock:
            gone = [st for st in self.seq.streams() if st[0] == pod]
            for st in gone:
                self.seq.forget(st)
                self.streams_model.pop(st, None)
            self.replay_endpoints.pop(pod, None)
            return len(gone)

    def _connect(self, pod: PodEndpoint) -> None:
        self.source.connect(pod)
        if pod.replay_endpoint and pod.pod:
            self.replay_endpoints[pod.pod] = pod.replay_endpoint
        if pod.replay_endpoint:
            self.replay_endpoints.setdefault(pod.endpoint, pod.replay_endpoint)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            out = dict(self.counters)
            out["malformed"] = dict(self.counters["malformed"])
            out["streams"] = len(self.seq.streams())
            out["ingestor"] = self.id
            return out

    def streams(self) -> dict[str, int]:
        """Next expected seq per stream ``"<pod>#<rank>"``."""
        return {f"{p}#{r}": s for (p, r), s in self.seq.streams().items()}

    def progress(self) -> tuple[int, int, int]:
        """(messages received, received messages fully shipped, calls in flight): a caller
        waits for everything received so far by polling until shipped reaches it with no
        call in flight (``Client.sync``)."""
        return self._received_total, self._shipped_upto, sum(map(len, self._inflight))

    def stop(self) -> None:
        """Stop the loop and close sockets (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=5)
        self.source.close()

    # --- the loop --------------------------------------------------------------------------

    def _run(self) -> None:
        if self._known_positions:
            with self._lock:
                try:
                    self._catch_up()
                except Exception:
                    log.exception("ingestor %d: catch-up after restart failed", self.id)
        while not self._stop.is_set():
            try:
                with self._lock:
                    msgs = self.source.poll(_POLL_MS)
                    for frames, origin in msgs:
                        self._handle(frames, origin)
                    self._received_total += len(msgs)
                    self._flush(force=False)
                    self._reap()
                    if time.monotonic() - self._last_resync >= _RESYNC_S:
                        self._resync()
                    self._resync_collect()
                    if not any(self._pending):
                        self._shipped_upto = self._received_total
            except Exception:  # the loop must not die; log and back off briefly
                log.exception("ingestor %d loop error", self.id)
                time.sleep(0.1)

    def _handle(self, frames: list[bytes], origin: PodEndpoint | None) -> None:
        self.counters["messages"] += 1
        pod_hint = origin.pod if origin and origin.pod else "?"
        try:
            topic_s, seq, payload = parse_frames(frames)
            topic = parse_topic(
                topic_s,
                default_pod=origin.pod if origin else None,
                default_model=origin.model if origin else None,
            )
            pod_hint = topic.pod
            if self.local is not None:  # in a shard: decode once, here, and hand it over
                batch: EventBatch | None = self.local.decode(payload)
                rank = batch.data_parallel_rank  # type: ignore[union-attr]
            else:  # the owning shard decodes; the stream only needs the rank
                batch = None
                rank = peek_rank(payload)
        except MalformedFrame as exc:
            self._malformed(pod_hint, exc)
            return
        stream = (topic.pod, rank or 0)
        self.streams_model[stream] = topic.model
        if self._caught_up:
            window = self._caught_up.get(stream)
            if window is not None:
                if window[0] <= seq <= window[1]:
                    return  # received live while catch-up replayed it: queued already
                del self._caught_up[stream]
        verdict = self.seq.observe(stream, seq)
        shard = self.placement.owner(holder_id(topic.pod, rank))
        contiguous = True
        if verdict.verdict is Verdict.GAP:
            self.counters["seq_gaps"] += 1
            if self._replay(stream, verdict.missing_from, seq, origin) is None:
                contiguous = False
        elif verdict.verdict is Verdict.RESTART:
            self.counters["restarts"] += 1
            self._queue(shard, ("clear", holder_id(topic.pod, rank)))
        elif verdict.verdict is Verdict.FIRST:
            contiguous = False
            known = self._known_positions.pop(holder_id(topic.pod, rank), None)
            if known is not None:  # this ingestor restarted: where did the shard stop?
                if seq <= known:
                    self.counters["restarts"] += 1
                    self._queue(shard, ("clear", holder_id(topic.pod, rank)))
                elif seq > known + 1:
                    self.counters["seq_gaps"] += 1
                    contiguous = self._replay(stream, known + 1, seq, origin) is not None
                else:
                    contiguous = True
            elif seq > 0 and origin is not None and origin.replay_endpoint:
                # A pod kvray subscribed to while it was already publishing (added at runtime,
                # e.g. a Serve replica the router registered): what it published before is in
                # its replay buffer.
                got = self._replay(stream, None, seq, origin, count_missing=False)
                contiguous = got is not None
            else:
                # Where the shard stopped is unknown here (this ingestor restarted without
                # reading it, or the stream moved): the shard knows, and refuses the op as
                # ``behind`` when it misses [its position + 1, seq), which is replayed then.
                # Without a replay socket nothing could heal it: take the op as it comes.
                contiguous = self._replay_endpoint(topic.pod, origin, rank or 0) is not None
        if self._unhealed and contiguous:
            h = holder_id(topic.pod, rank)
            if h in self._unhealed:
                self._unhealed.discard(h)
                contiguous = False
        op: tuple[Any, ...] = ("batch", topic.pod, topic.model, seq, payload, contiguous)
        if batch is not None and self.local is not None and shard == self.local.shard_id:
            op += (batch,)  # decoded already (IndexShard._apply uses it)
        self._queue(shard, op)

    def _malformed(self, pod: str, exc: MalformedFrame) -> None:
        m = self.counters["malformed"]
        m[exc.reason] = m.get(exc.reason, 0) + 1
        now = time.monotonic()
        if now - self._last_log.get(pod, -1e9) >= self._log_interval_s:
            self._last_log[pod] = now
            log.warning("ingestor %d: malformed message from %s skipped: %s", self.id, pod, exc)

    def _replay_endpoint(self, pod: str, origin: PodEndpoint | None, rank: int = 0) -> str | None:
        if origin is not None and origin.replay_endpoint:
            return origin.replay_endpoint  # configured per endpoint, so per rank already
        ep = self.replay_endpoints.get(pod)
        if ep is not None and rank:
            ep = offset_port(ep, rank)  # vLLM adds the DP rank to the replay port too
        return ep

    def _replay(
        self,
        stream: tuple[str, int],
        start: int | None,
        stop: int,
        origin: PodEndpoint | None,
        *,
        count_missing: bool = True,
    ) -> int | None:
        """Fetch ``[start, stop)`` of a stream from its pod and queue it; ``start`` None: from
        the oldest batch the pod still buffers (a stream kvray joined late, whose earlier
        batches the shard never had: the first one queued is not contiguous).

        Returns the last seq queued when the range is complete (``start - 1`` if the pod had
        nothing), None when something is missing (counted lost unless ``count_missing`` is
        False, for open-ended catch-up requests).
        """
        pod, rank = stream
        first = 0 if start is None else start
        ep = self._replay_endpoint(pod, origin, rank)
        if ep is None:
            if count_missing:
                self.counters["seq_lost"] += stop - first
            return None
        self.counters["replay_requests"] += 1
        got, complete = request_replay(ep, first, timeout_s=self.config.events.replay_timeout_s)
        model = self.streams_model.get(stream, "")
        shard = self.placement.owner(holder_id(pod, rank))
        expected = start
        for r in got:
            if (expected is not None and r.seq < expected) or r.seq >= stop:
                continue
            try:
                r_rank = peek_rank(r.payload)
            except MalformedFrame as exc:
                self._malformed(pod, exc)
                continue
            if (r_rank or 0) != rank:
                continue
            contiguous = expected is not None
            if expected is None:
                expected = r.seq  # the oldest batch the pod still holds
            if r.seq != expected:
                break  # the pod's buffer no longer holds [expected, r.seq)
            self._queue(shard, ("batch", pod, model, r.seq, r.payload, contiguous))
            self.counters["replayed"] += 1
            expected = r.seq + 1
        if expected is None:  # nothing before ``stop``
            expected = first
        if stop == _OPEN:  # catch-up: complete only if the pod's end marker arrived
            return expected - 1 if complete else None
        if expected < stop:
            if count_missing:
                self.counters["seq_lost"] += stop - expected
            return None
        return expected - 1

    # --- shipping --------------------------------------------------------------------------

    def _queue(self, shard: int, op: tuple[Any, ...]) -> None:
        if not self._pending[shard]:
            self._pending_since[shard] = time.monotonic()
        self._pending[shard].append(op)
        if len(self._pending[shard]) >= self.config.events.flush_messages:
            self._ship(shard)

    def _flush(self, force: bool) -> None:
        now = time.monotonic()
        interval = self.config.events.flush_interval_s
        for i, ops in enumerate(self._pending):
            if ops and (force or now - self._pending_since[i] >= interval):
                self._ship(i)

    def _ship(self, shard: int) -> None:
        ops = self._pending[shard]
        self._pending[shard] = []
        if self.local is not None and shard == self.local.shard_id:
            self.counters["shard_calls"] += 1
            try:
                res = self.local.apply(ops)
            except Exception as exc:
                self._failed(shard, exc)
                return
            self._applied(shard, res)
            return
        inflight = self._inflight[shard]
        while len(inflight) >= self.config.events.max_inflight:
            self._settle(shard, block=True)
        inflight.append((self.shards[shard].apply.remote(ops), ops))
        self.counters["shard_calls"] += 1

    def _reap(self) -> None:
        for i in range(len(self.shards)):
            while self._inflight[i] and self._settle(i, block=False):
                pass

    def _settle(self, shard: int, *, block: bool) -> bool:
        """Collect the oldest call to ``shard``; recover on failure. False if not done yet."""
        ref, ops = self._inflight[shard][0]
        if not block:
            ready, _ = ray.wait([ref], timeout=0)
            if not ready:
                return False
        self._inflight[shard].popleft()
        try:
            res = ray.get(ref)
        except Exception as exc:  # the shard died, restarted or its backend is down
            self._failed(shard, exc)
            return True
        self._applied(shard, res)
        return True

    def _failed(self, shard: int, exc: Exception) -> None:
        self.counters["shard_failures"] += 1
        log.warning("ingestor %d: shard %d call failed (%s); recovering", self.id, shard, exc)
        if isinstance(exc, BackendUnavailable):
            time.sleep(_BACKEND_RETRY_S)  # Redis is down: don't spin; ZMQ buffers meanwhile
        self._recover(shard)

    def _applied(self, shard: int, res: dict[str, Any]) -> None:
        self.counters["stored"] += res["stored"]
        self.counters["removed"] += res["removed"]
        known = self._incarnations.setdefault(shard, res["incarnation"])
        if res["behind"] or known != res["incarnation"]:
            self._recover(shard, res["behind"])

    def _resync(self) -> None:
        """Catch a shard that restarted while idle: compare its incarnation with the one we
        know. Asks now and reads the answers on later loop turns (never blocks the loop)."""
        self._last_resync = time.monotonic()
        if not self._resync_refs:
            self._resync_refs = [
                (i, handle.get_positions.remote())
                for i, handle in enumerate(self.shards)
                if handle is not None and not self._pending[i] and not self._inflight[i]
            ]

    def _resync_collect(self) -> None:
        if not self._resync_refs:
            return
        ready, _ = ray.wait([r for _, r in self._resync_refs], num_returns=1, timeout=0)
        if not ready:
            if time.monotonic() - self._last_resync > 30:  # a shard that never answers
                self._resync_refs = []
            return
        left = []
        for i, ref in self._resync_refs:
            if ref not in ready:
                left.append((i, ref))
                continue
            try:
                incarnation, positions = ray.get(ref)
            except Exception:
                continue
            known = self._incarnations.setdefault(i, incarnation)
            busy = self._pending[i] or self._inflight[i]
            if known != incarnation and not busy:  # the shard restarted while idle
                self._recover(i, positions)
        self._resync_refs = left

    def _recover(self, shard: int, behind: dict[str, int] | None = None) -> None:
        """Bring ``shard`` back in step: replay each of its streams from its position."""
        self.counters["recoveries"] += 1
        # Drain the other calls to this shard first: they may fail the same way.
        while self._inflight[shard]:
            ref, _ = self._inflight[shard].popleft()
            with contextlib.suppress(Exception):
                ray.get(ref)
        positions: dict[str, int] = {}
        for _ in range(60):  # a restarting actor answers once it is alive again
            try:
                handle = self.shards[shard]
                if handle is None:
                    assert self.local is not None
                    incarnation, positions = self.local.get_positions()
                else:
                    incarnation, positions = ray.get(handle.get_positions.remote(), timeout=30)
                self._incarnations[shard] = incarnation
                break
            except Exception:
                time.sleep(0.5)
        if behind:
            positions.update(behind)
        pending, self._pending[shard] = self._pending[shard], []
        unhealed: set[str] = set()
        for (pod, rank), nxt in self.seq.streams().items():
            holder = holder_id(pod, rank)
            if self.placement.owner(holder) != shard:
                continue
            start = positions.get(holder, -1) + 1
            if start >= nxt or self._replay((pod, rank), start, nxt, None) is not None:
                continue
            # The pod no longer has [start, nxt). A shard that knows nothing of the holder
            # (restarted empty) takes what the pod still buffers, from its oldest batch.
            if start == 0 and self._replay((pod, rank), None, nxt, None) is not None:
                continue
            unhealed.add(holder)
        # Ops queued before the failure come after the replayed range; duplicates are skipped.
        # The first one of a holder whose range could not be healed is taken as it comes.
        for op in pending:
            if unhealed and op[0] == "batch" and op[5]:
                h = holder_id(op[1], _rank_of(op))
                if h in unhealed:
                    unhealed.discard(h)
                    op = (*op[:5], False, *op[6:])
            self._queue(shard, op)
        self._unhealed |= unhealed


def _rank_of(op: tuple[Any, ...]) -> int:
    """The data-parallel rank of a queued ``batch`` op (decoded already, or peeked)."""
    if len(op) > 6:
        return int(op[6].data_parallel_rank or 0)
    try:
        return int(peek_rank(op[4]) or 0)
    except MalformedFrame:
        return 0
