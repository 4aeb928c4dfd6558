"""Per-holder positions: apply each holder's batches in order, exactly once.

A shard tracks, per holder, the last seq it applied (its *position*). Positions make recovery
exact: an op whose seq is not the next one (after a shard restart restored an older snapshot)
is refused and reported as *behind*, and the sender replays the missing range from the pod
before sending more. A holder the shard knows nothing of (restarted without a snapshot, or not
in it) is behind at -1 unless the op starts its stream (seq 0) or says it is not contiguous
(the sender could not heal a gap). Duplicates (seq ≤ position) are skipped, so replays may
overlap freely.

``OrderedApplier`` is that rule around an ``IndexWriter``: plain Python, no Ray, no sockets.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from enum import Enum

from kvray.core.apply import ApplyResult, IndexWriter
from kvray.core.events import EventBatch, EventDecoder, FrameHead
from kvray.core.holders import base_pod, holder_id
from kvray.core.messages import BatchOp, ClearOp, Op
from kvray.core.stats import lag_histogram
from kvray.errors import MalformedFrame
from kvray.types import PodId

SILENCE_CHECK_S = 1.0
"""How often ``drop_silent`` looks for silent holders."""

READER_GAP_S = 5.0
"""A reader that calls again within this long was listening in between (ingestors call every
shard at least once a second); a longer gap is an outage, during which no pod was heard."""


class ListenClocks:
    """Per reader, the seconds it has been *listening*: a pod is silent only while the
    reader of its stream was there to hear it. A killed ingestor's pods are not silent, they
    are unheard; counting its restart as their silence (``pod_ttl_s``) would drop pods whose
    missed events the restarted ingestor is about to replay.

    Each call from a reader (``heard``) adds the time since its previous call when that gap
    is at most ``max_gap_s`` and came from the same life of the reader; a longer gap, or a
    call from a new life (``"name#life"``: a restarted ingestor, however quick its restart),
    adds nothing. Between calls a reader's clock stands
    still, so silence is counted only up to the reader's last call: a pod's expiry can come
    one reader call (≤ ~1 s) later than by the wall clock, never earlier.
    """

    def __init__(
        self, max_gap_s: float = READER_GAP_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._max_gap_s = max_gap_s
        self._clock = clock
        self._listened: dict[str, float] = {}
        self._last: dict[str, tuple[str, float]] = {}

    def heard(self, reader: str) -> float:
        """``reader`` (``"name"`` or ``"name#life"``) called now; returns the listening clock
        of its name."""
        name, _, life = reader.partition("#")
        now = self._clock()
        last = self._last.get(name)
        total = self._listened.get(name, 0.0)
        if last is not None and last[0] == life and now - last[1] <= self._max_gap_s:
            total += now - last[1]
        self._listened[name] = total
        self._last[name] = (life, now)
        return total

    def now(self, reader: str) -> float:
        """The listening clock of ``reader``'s name (as of its last call)."""
        return self._listened.get(reader.partition("#")[0], 0.0)


class Order(Enum):
    """What a holder's position says of an op's seq."""

    APPLY = "apply"
    DUPLICATE = "duplicate"
    """seq ≤ position: applied already (a replay overlapping what arrived)."""
    BEHIND = "behind"
    """seq is not position + 1 (or the holder is unknown and seq > 0): ask for the gap."""


def check_order(position: int | None, seq: int, contiguous: bool) -> Order:
    """The rule above, for one op of a holder at ``position`` (None: unknown here)."""
    if position is not None:
        if seq <= position:
            return Order.DUPLICATE
        if contiguous and seq != position + 1:
            return Order.BEHIND
        return Order.APPLY
    if contiguous and seq > 0:
        # Nothing of this holder here (restarted without a snapshot of it, or it was cleared)
        # but the sender says the op follows others: taking it would skip [0, seq) for good.
        return Order.BEHIND
    return Order.APPLY


def group_by_pod(ops: list[Op]) -> list[Op]:
    """``ops`` with each pod's ops together (pods in the order of their first op, each pod's
    own order kept), so a pod's batches reach the shard as runs that ``OrderedApplier``
    applies in one C call each.

    Pods publish independently: the order between two pods' messages in a reader's queue is
    an accident of arrival (a bound socket fair-queues its peers), and any interleaving is one
    the reader could have received. A reader of one socket per pod gets runs already; one
    bound socket that many pods connect to interleaves them."""
    if len(ops) < 3:
        return ops
    groups: dict[str, list[Op]] = {}
    for op in ops:
        pod = op.pod if isinstance(op, BatchOp) else base_pod(op.holder)
        group = groups.get(pod)
        if group is None:
            groups[pod] = [op]
        else:
            group.append(op)
    if len(groups) == 1 or len(groups) == len(ops):
        return ops
    return [op for group in groups.values() for op in group]


class OrderedApplier:
    """Applies ops to ``writer`` in per-holder order and keeps the positions.

    Args:
        writer: the shard's write path.
        decode: payload bytes → ``EventBatch`` (raises ``MalformedFrame``).
        decoder: the ``EventDecoder`` behind ``decode``, when there is one: frames in fast
            form are then applied from their bytes (``IndexWriter.apply_frames``) and decoded
            only when that declines.
        clock: wall clock, for the event-to-visible lag (publisher ts → applied here).
    """

    def __init__(
        self,
        writer: IndexWriter,
        decode: Callable[[bytes], EventBatch],
        *,
        decoder: EventDecoder | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.writer = writer
        self.decode = decode
        self._head = decoder.head if decoder is not None else None
        self._limits = decoder.limit_args if decoder is not None else (0, 0, 0)
        self.clock = clock
        self.positions: dict[str, int] = {}
        self.applied = ApplyResult()
        self.malformed: dict[str, int] = {}
        self.ops = 0
        self.apply_seconds = 0.0
        # Last 8192 batches; same-host wall clocks, so exact in the demo and benchmarks,
        # NTP-accurate across hosts.
        self.lags: deque[float] = deque(maxlen=8192)
        self.lag_hist = lag_histogram()  # cumulative, for /metrics
        self._advanced: dict[str, int] = {}
        self._silence_checked = time.monotonic()
        self.listening = ListenClocks()
        self._heard: dict[str, tuple[str, float]] = {}
        """Holder → (its reader, that reader's listening clock at the holder's last op), for
        holders read by a named reader (others' silence is the writer's wall clock)."""

    def apply(
        self, ops: Iterable[Op], reader: str | None = None
    ) -> tuple[ApplyResult, dict[str, int]]:
        """Apply ``ops`` in order; returns what was done and, per holder whose op did not
        follow its position, that position (an earlier refusal holds the holder's later ops
        back too, so order is kept). ``reader`` names the sender when it is another process
        (an ingestor): its holders' silence is counted only while it is listening
        (``ListenClocks``)."""
        t0 = time.perf_counter()
        heard = (reader, self.listening.heard(reader)) if reader is not None else None
        res = ApplyResult()
        behind: dict[str, int] = {}
        ops = ops if isinstance(ops, list) else list(ops)
        i = 0
        while i < len(ops):
            op = ops[i]
            i += 1
            if isinstance(op, ClearOp):
                self.clear(op.holder)
                res.cleared += 1
                continue
            batch = self._batch(op)
            if batch is None:
                continue
            holder = holder_id(op.pod, batch.data_parallel_rank)
            if holder in behind:
                continue
            order = check_order(self.positions.get(holder), op.seq, op.contiguous)
            if order is Order.DUPLICATE:
                res.reject("duplicate")
                continue
            if order is Order.BEHIND:
                behind[holder] = self.positions.get(holder, -1)
                res.reject("out_of_order")
                continue
            if isinstance(batch, FrameHead):
                run, heads = [op], [batch]
                i = self._extend_run(ops, i, run, heads)
                self._apply_run(holder, run, heads, res)
            else:
                self._apply_batch(holder, op, batch, res)
            if heard is not None:
                self._heard[holder] = heard
            elif self._heard:
                self._heard.pop(holder, None)
        self.applied.merge(res)
        self.ops += i
        self.apply_seconds += time.perf_counter() - t0
        return res, behind

    def _head_of(self, op: BatchOp) -> EventBatch | FrameHead | None:
        """What the reader decoded, else the payload's fast-form head (None: neither)."""
        batch: EventBatch | FrameHead | None = op.decoded
        if batch is None and self._head is not None:
            batch = self._head(op.payload)
        return batch

    def _batch(self, op: BatchOp) -> EventBatch | FrameHead | None:
        """The op's batch: decoded by the reader, or its fast-form head, or decoded here (None:
        malformed, counted)."""
        batch = self._head_of(op)
        if batch is None:
            try:
                batch = self.decode(op.payload)
            except MalformedFrame as exc:
                self.malformed[exc.reason] = self.malformed.get(exc.reason, 0) + 1
        return batch

    def _extend_run(self, ops: list[Op], i: int, run: list[BatchOp], heads: list[FrameHead]) -> int:
        """Add to ``run`` the fast-form ops from ``ops[i]`` on that continue it: the same pod,
        model and rank, each seq the next. A reader receives a pod's queued messages in a row,
        so a busy pod's batches arrive as such runs; one C call applies a run. Returns the
        index after the run."""
        first, head = run[0], heads[0]
        seq = first.seq
        while i < len(ops):
            op = ops[i]
            if (
                not isinstance(op, BatchOp)
                or op.seq != seq + 1
                or op.pod != first.pod
                or op.model != first.model
            ):
                break
            batch = self._head_of(op)
            if (
                not isinstance(batch, FrameHead)
                or batch.data_parallel_rank != head.data_parallel_rank
            ):
                break
            run.append(op)
            heads.append(batch)
            seq += 1
            i += 1
        return i

    def _apply_run(
        self, holder: PodId, run: list[BatchOp], heads: list[FrameHead], res: ApplyResult
    ) -> None:
        """Apply a run of a holder's fast-form batches in order: in C while the frames and
        the holder allow it, a frame it declines by the general path."""
        model = run[0].model
        # The scans the heads kept: the frames are not parsed again.
        frames = [
            h.scan if h.scan is not None else op.payload for op, h in zip(run, heads, strict=True)
        ]
        k = 0
        while k < len(run):
            k, done = self.writer.apply_frames(holder, model, frames, k, self._limits)
            res.merge(done)
            if k < len(run):  # declined, nothing changed: the general path
                res.merge(self.writer.apply_batch(holder, model, self.decode(run[k].payload)))
                k += 1
        self._advance(holder, run[-1].seq, heads)

    def _apply_batch(self, holder: PodId, op: BatchOp, batch: EventBatch, res: ApplyResult) -> None:
        res.merge(self.writer.apply_batch(holder, op.model, batch))
        self._advance(holder, op.seq, (batch,))

    def _advance(self, holder: PodId, seq: int, batches: Iterable[EventBatch | FrameHead]) -> None:
        """``holder`` applied up to ``seq``: its position, and the batches' lags."""
        self.positions[holder] = seq
        self._advanced[holder] = seq
        now = self.clock()
        for b in batches:
            if b.ts > 0:  # a zero ts is a publisher that does not stamp batches
                lag = now - b.ts
                self.lags.append(lag)
                self.lag_hist.observe(lag)

    def clear(self, holder: str) -> None:
        """Forget a holder: its blocks and its position."""
        self.writer.clear_holder(PodId(holder))
        self.positions.pop(holder, None)
        self._heard.pop(holder, None)

    def drop_silent(self, max_silence_s: float | None, *, force: bool = False) -> list[PodId]:
        """Clear holders not heard from for longer than ``max_silence_s`` (None: never);
        looked for at most every ``SILENCE_CHECK_S`` unless ``force``."""
        now = time.monotonic()
        if max_silence_s is None or (not force and now - self._silence_checked < SILENCE_CHECK_S):
            return []
        self._silence_checked = now
        gone = [h for h in self.writer.silent(max_silence_s) if self._unheard_for(h, max_silence_s)]
        self.writer.drop(gone)
        for holder in gone:
            self.positions.pop(holder, None)
            self._heard.pop(holder, None)
        return gone

    def _unheard_for(self, holder: str, max_silence_s: float) -> bool:
        """Wall-clock silent ``holder``: was its reader listening for that long too?"""
        heard = self._heard.get(holder)
        if heard is None:
            return True
        reader, at = heard
        return self.listening.now(reader) - at > max_silence_s

    def take_advanced(self) -> dict[str, int]:
        """Holder → position, for the holders advanced since the last call."""
        advanced, self._advanced = self._advanced, {}
        return advanced

    def restore(self, positions: dict[str, int], models: dict[str, str]) -> None:
        """Positions and models of a restored snapshot (the index itself is restored by the
        caller)."""
        self.positions = dict(positions)
        now = self.writer.clock()
        for holder, model in models.items():
            self.writer.models[PodId(holder)] = model
            self.writer.last_seen[PodId(holder)] = now

    def mine(self, pods: Iterable[str]) -> tuple[dict[str, int], dict[str, str]]:
        """Positions and models of the holders of ``pods`` (every rank)."""
        wanted = set(pods)
        positions = {h: s for h, s in self.positions.items() if base_pod(h) in wanted}
        models = {str(k): v for k, v in self.writer.models.items() if str(k) in positions}
        return positions, models
