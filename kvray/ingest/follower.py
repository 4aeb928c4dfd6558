"""``StreamFollower``: one pod reader's streams — seq checks, replays, shard recovery.

Per stream ``(pod, rank)`` a message is in order, a gap (replay from the pod's ROUTER when
known, else counted lost), a restart (a ``ClearOp`` first) or the first one seen (see
``core.replay_plan.first_contact``); ops then queue for the shard owning the holder
(``ShardLinks``). When a shard reports a holder behind, restarted, or a call failed, the follower
replays the missing range from the pod and resends. The decisions are ``core.replay_plan``'s;
this class does the I/O (the ``fetch`` callable asks a pod's replay socket).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from kvray.config import PodEndpoint
from kvray.core.events import EventBatch, FrameHead, peek_rank
from kvray.core.holders import holder_id
from kvray.core.messages import ApplyReply, BatchOp, ClearOp, IngestorStats, Op
from kvray.core.replay_plan import (
    OPEN,
    ReplaySockets,
    Stream,
    catch_up_plan,
    first_contact,
    recovery_plan,
    take_replayed,
)
from kvray.core.sequencing import SeqTracker, Verdict
from kvray.core.sharding import Placement
from kvray.core.topics import parse_frames, parse_topic
from kvray.errors import BackendUnavailable, MalformedFrame
from kvray.ingest.zmq_source import request_replay

log = logging.getLogger("kvray.ingestor")

_BACKEND_RETRY_S = 0.5  # pause before resending to a shard whose backend is unavailable


class Links(Protocol):
    """What the follower needs of ``actors.shipping.ShardLinks``."""

    def queue(self, shard: int, op: Op) -> None: ...
    def abandon_inflight(self, shard: int) -> None: ...
    def take_pending(self, shard: int) -> list[Op]: ...
    def positions(self, shard: int) -> tuple[str, dict[str, int]] | None: ...


class StreamFollower:
    """Follows the streams of the pods one reader receives.

    Args:
        reader_id: for logs.
        links: where ops go.
        fetch: ``(endpoint, start_seq, timeout_s=...)`` → ``(replayed batches, complete)``;
            None: ``ingest.zmq_source.request_replay``.
        decode: in a shard, its decoder's ``decode_lazy`` (the reader reads the rank once; a
            frame in fast form stays bytes, the shard applies it from them); None in an
            ingestor actor, which only peeks the rank (the owning shard decodes).
        local_shard: the shard the reader runs in (its ops carry the decoded batch).
    """

    def __init__(
        self, reader_id: int, links: Links, placement: Placement, *,
        replay_timeout_s: float, replay_attempts: int = 3,
        fetch: Callable[..., tuple[list[Any], bool]] | None = None,
        decode: Callable[[bytes], EventBatch | FrameHead] | None = None,
        local_shard: int | None = None,
        log_interval_s: float = 10.0,
    ) -> None:  # fmt: skip
        self.id = reader_id
        self.links = links
        self.placement = placement
        self.fetch = fetch
        self.replay_timeout_s = replay_timeout_s
        self.replay_attempts = max(1, replay_attempts)
        self.decode = decode
        self.local_shard = local_shard
        self.replay = ReplaySockets()
        self.seq = SeqTracker()
        self.streams_model: dict[Stream, str] = {}
        self.counters = IngestorStats(ingestor=reader_id)
        self.known_positions: dict[str, int] = {}
        """Where each holder stopped, learned at a restart: first messages are checked
        against it (``first_contact``) and catch-up replays from it."""
        self.known_models: dict[str, str] = {}
        self._log_interval_s = log_interval_s
        self._last_log: dict[str, float] = {}
        self._incarnations: dict[int, str] = {}
        # Per stream, the seqs catch-up replayed ``(first, last)``: live copies of them that
        # were already buffered in the SUB socket are duplicates, not a restarted pod.
        self._caught_up: dict[Stream, tuple[int, int]] = {}
        # Holders whose missing range no replay could heal: their next op is sent as not
        # contiguous, so the shard takes it (the loss is counted in ``seq_lost``).
        self._unhealed: set[str] = set()

    def forget_pod(self, pod: str) -> int:
        """Stop tracking a removed pod's streams (all ranks); returns how many were dropped."""
        gone = [st for st in self.seq.streams() if st[0] == pod]
        for st in gone:
            self.seq.forget(st)
            self.streams_model.pop(st, None)
        self.replay.forget(pod)
        return len(gone)

    def idle_answer(self, shard: int, incarnation: str, positions: dict[str, int]) -> None:
        """An idle shard's positions: recover it if it restarted meanwhile."""
        known = self._incarnations.setdefault(shard, incarnation)
        if known != incarnation:
            self.recover(shard, positions)

    def catch_up(self) -> None:
        """After a restart: replay, from each holder's last applied seq, what the pods sent
        while this ingestor was down (for pods whose replay socket is known)."""
        for holder, stream, start in catch_up_plan(self.known_positions):
            if self.replay.for_stream(stream[0], None, stream[1]) is None:
                continue
            self.streams_model[stream] = self.known_models.get(holder, "")
            got = self._replay(stream, start, OPEN, None, count_missing=False)
            if got is not None:
                self.seq.observe(stream, got)
                del self.known_positions[holder]
                if got >= start:
                    self._caught_up[stream] = (start, got)

    def handle(self, frames: list[bytes], origin: PodEndpoint | None) -> None:
        self.counters.messages += 1
        pod_hint = origin.pod if origin and origin.pod else "?"
        try:
            topic_s, seq, payload = parse_frames(frames)
            topic = parse_topic(
                topic_s,
                default_pod=origin.pod if origin else None,
                default_model=origin.model if origin else None,
            )
            pod_hint = topic.pod
            batch = self.decode(payload) if self.decode is not None else None
            rank = (batch.data_parallel_rank if batch else peek_rank(payload)) or 0
        except MalformedFrame as exc:
            self._malformed(pod_hint, exc)
            return
        stream = (topic.pod, rank)
        self.streams_model[stream] = topic.model
        if self._caught_up and (window := self._caught_up.get(stream)) is not None:
            if window[0] <= seq <= window[1]:
                return  # received live while catch-up replayed it: queued already
            del self._caught_up[stream]
        holder = holder_id(topic.pod, rank)
        shard = self.placement.owner(holder)
        contiguous = self._check_seq(stream, holder, seq, shard, origin)
        if holder in self._unhealed and contiguous:
            self._unhealed.discard(holder)
            contiguous = False
        local = shard == self.local_shard
        op = BatchOp(topic.pod, topic.model, seq, payload, contiguous, batch if local else None)
        self.links.queue(shard, op)

    def _check_seq(
        self, stream: Stream, holder: str, seq: int, shard: int, origin: PodEndpoint | None
    ) -> bool:
        """Observe ``seq``; replay or clear as needed. Returns whether the op is contiguous."""
        verdict = self.seq.observe(stream, seq)
        if verdict.verdict is Verdict.GAP:
            self.counters.seq_gaps += 1
            return self._replay(stream, verdict.missing_from, seq, origin) is not None
        if verdict.verdict is Verdict.RESTART:
            self.counters.restarts += 1
            self.links.queue(shard, ClearOp(holder))
            return True
        if verdict.verdict is not Verdict.FIRST:
            return True
        origin_replay = origin.replay_endpoint if origin else None
        plan = first_contact(
            seq, self.known_positions.pop(holder, None), bool(origin_replay),
            self.replay.for_stream(stream[0], origin_replay, stream[1]) is not None,
        )  # fmt: skip
        if plan.clear:
            self.counters.restarts += 1
            self.links.queue(shard, ClearOp(holder))
        elif plan.replay_from is not None:
            self.counters.seq_gaps += 1
            return self._replay(stream, plan.replay_from, seq, origin) is not None
        elif plan.replay_buffer:
            return self._replay(stream, None, seq, origin, count_missing=False) is not None
        return plan.contiguous

    def _malformed(self, pod: str, exc: MalformedFrame) -> None:
        m = self.counters.malformed
        m[exc.reason] = m.get(exc.reason, 0) + 1
        now = time.monotonic()
        if now - self._last_log.get(pod, -1e9) >= self._log_interval_s:
            self._last_log[pod] = now
            log.warning("ingestor %d: malformed message from %s skipped: %s", self.id, pod, exc)

    def _replay(
        self, stream: Stream, start: int | None, stop: int, origin: PodEndpoint | None,
        *, count_missing: bool = True,
    ) -> int | None:  # fmt: skip
        """Fetch ``[start, stop)`` of a stream from its pod and queue it (``take_replayed``);
        returns the last seq queued when the range is complete, else None (counted lost
        unless ``count_missing`` is False, for open-ended catch-up requests)."""
        pod, rank = stream
        first = 0 if start is None else start
        ep = self.replay.for_stream(pod, origin.replay_endpoint if origin else None, rank)
        if ep is None:
            if count_missing:
                self.counters.seq_lost += stop - first
            return None
        records, complete = self._fetch(ep, pod, first, stop)
        take = take_replayed(records, rank, start, stop, complete, peek_rank)
        for exc in take.malformed:
            self._malformed(pod, exc)
        model = self.streams_model.get(stream, "")
        shard = self.placement.owner(holder_id(pod, rank))
        for seq, payload, contiguous in take.batches:
            self.links.queue(shard, BatchOp(pod, model, seq, payload, contiguous))
        self.counters.replayed += len(take.batches)
        if count_missing:
            self.counters.seq_lost += take.missing
        return take.last

    def _fetch(
        self, ep: str, pod: str, first: int, stop: int
    ) -> tuple[list[tuple[int, bytes]], bool]:
        """Ask ``ep`` for seqs ≥ ``first`` until ``stop`` is covered or its end marker came;
        a pod slow to answer (busy engine, loaded host) is asked again from the last seq it
        sent, up to ``replay_attempts`` times. Returns ``(seq, payload)`` in seq order."""
        fetch = self.fetch or request_replay
        got: dict[int, bytes] = {}
        nxt = first
        for attempt in range(self.replay_attempts):
            self.counters.replay_requests += 1
            part, complete = fetch(ep, nxt, timeout_s=self.replay_timeout_s)
            for r in part:
                got.setdefault(r.seq, r.payload)
            if complete:
                return sorted(got.items()), True
            if part:
                nxt = max(nxt, part[-1].seq + 1)
            if stop != OPEN and nxt >= stop:
                return sorted(got.items()), False
            log.warning(
                "ingestor %d: replay from %s (%s) unanswered after %.1f s (attempt %d of %d)",
                self.id, pod, ep, self.replay_timeout_s, attempt + 1, self.replay_attempts,
            )  # fmt: skip
        return sorted(got.items()), False

    # --- shard answers ---------------------------------------------------------------------

    def failed(self, shard: int, exc: Exception) -> None:
        self.counters.shard_failures += 1
        log.warning("ingestor %d: shard %d call failed (%s); recovering", self.id, shard, exc)
        if isinstance(exc, BackendUnavailable):
            time.sleep(_BACKEND_RETRY_S)  # Redis is down: don't spin; ZMQ buffers meanwhile
        self.recover(shard)

    def applied(self, shard: int, res: ApplyReply) -> None:
        self.counters.stored += res.stored
        self.counters.removed += res.removed
        known = self._incarnations.setdefault(shard, res.incarnation)
        if res.behind or known != res.incarnation:
            self.recover(shard, res.behind)

    def recover(self, shard: int, behind: dict[str, int] | None = None) -> None:
        """Bring ``shard`` back in step: replay each of its streams from its position."""
        self.counters.recoveries += 1
        self.links.abandon_inflight(shard)  # they may fail the same way; replay covers them
        got = self.links.positions(shard)
        positions: dict[str, int] = {}
        if got is not None:
            self._incarnations[shard], positions = got
        positions.update(behind or {})
        pending = self.links.take_pending(shard)
        unhealed: set[str] = set()
        owned = lambda h: self.placement.owner(h) == shard  # noqa: E731
        for r in recovery_plan(self.seq.streams(), positions, owned):
            if self._replay(r.stream, r.start, r.stop, None) is not None:
                continue
            # The pod no longer has [start, stop). A shard that knows nothing of the holder
            # (restarted empty) takes what the pod still buffers, from its oldest batch.
            if r.start == 0 and self._replay(r.stream, None, r.stop, None) is not None:
                continue
            unhealed.add(r.holder)
        # Ops queued before the failure come after the replayed range; duplicates are skipped.
        # The first one of a holder whose range could not be healed is taken as it comes.
        for op in pending:
            if unhealed and isinstance(op, BatchOp) and op.contiguous:
                h = holder_id(op.pod, self._op_rank(op))
                if h in unhealed:
                    unhealed.discard(h)
                    op.contiguous = False
            self.links.queue(shard, op)
        self._unhealed |= unhealed

    @staticmethod
    def _op_rank(op: BatchOp) -> int:
        """The data-parallel rank of a queued op (decoded already, or peeked)."""
        if op.decoded is not None:
            return int(op.decoded.data_parallel_rank or 0)
        try:
            return int(peek_rank(op.payload) or 0)
        except MalformedFrame:
            return 0
