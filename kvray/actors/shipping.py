"""``ShardLinks``: how a pod reader ships ops to the shards (its only Ray calls on the hot path).

Ops queue per shard and go as one ``apply`` call when ``flush_messages`` are queued or
``flush_interval_s`` passed, with at most ``max_inflight`` calls per shard in flight
(backpressure: the reader waits, ZMQ buffers). Per-holder order holds because one reader reads
a pod and Ray runs one caller's calls to an actor in submission order. A reader running inside
a shard (``LocalShard``) applies that shard's ops by a direct call instead.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import ray

from kvray.core.events import EventBatch, FrameHead
from kvray.core.messages import ApplyReply, Op
from kvray.core.ordering import group_by_pod


@dataclass
class LocalShard:
    """The shard an in-shard reader applies to directly (no Ray call)."""

    shard_id: int
    apply: Callable[[list[Op]], ApplyReply]
    get_positions: Callable[[], tuple[str, dict[str, int]]]
    positions: dict[str, int]
    """Where each holder stopped (the restored snapshot's positions): catch-up starts there."""
    models: dict[str, str]
    pods: list[dict[str, Any]]
    """``PodEndpoint`` documents to read from the start (their replay sockets serve catch-up)."""
    replay: dict[str, str]
    """Known replay sockets by pod (``register_replay``)."""
    decode: Callable[[bytes], EventBatch | FrameHead]
    """The shard's decoder: the reader reads each batch's rank once (a fast-form batch is
    left in its bytes: ``EventDecoder.decode_lazy``)."""


class _ShardHandles:
    """Shard actor handles by shard id, looked up on first use (an in-shard reader starts
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

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(len(self._names)))


class ShardLinks:
    """Per-shard op queues and in-flight ``apply`` calls.

    Args:
        names: shard actor names, by shard id.
        on_reply: ``(shard, ApplyReply)`` for every call that returned.
        on_failure: ``(shard, exception)`` for every call that failed.
        reader: this reader's name, sent with every call (``IndexShard.apply``).
    """

    def __init__(
        self,
        names: list[str],
        namespace: str,
        local: LocalShard | None,
        *,
        flush_messages: int,
        flush_interval_s: float,
        max_inflight: int,
        on_reply: Callable[[int, ApplyReply], None],
        on_failure: Callable[[int, Exception], None],
        reader: str | None = None,
    ) -> None:
        self.local = local
        self.reader = reader
        """Named in every call to a shard actor (its pods' silence counts while it calls)."""
        self.handles = _ShardHandles(names, namespace, local.shard_id if local else None)
        n = len(names)
        self.pending: list[list[Op]] = [[] for _ in range(n)]
        self._since = [0.0] * n
        self.inflight: list[deque[tuple[Any, list[Op]]]] = [deque() for _ in range(n)]
        self._flush_messages = flush_messages
        self._flush_interval_s = flush_interval_s
        self._max_inflight = max_inflight
        self._on_reply = on_reply
        self._on_failure = on_failure
        self.calls = 0
        self._resync_refs: list[tuple[int, Any]] = []
        self._resync_at = 0.0

    def __len__(self) -> int:
        return len(self.pending)

    def queue(self, shard: int, op: Op) -> None:
        if not self.pending[shard]:
            self._since[shard] = time.monotonic()
        self.pending[shard].append(op)
        if len(self.pending[shard]) >= self._flush_messages:
            self.ship(shard)

    def flush(self, force: bool) -> None:
        now = time.monotonic()
        for i, ops in enumerate(self.pending):
            if ops and (force or now - self._since[i] >= self._flush_interval_s):
                self.ship(i)

    def ship(self, shard: int) -> None:
        ops = self.pending[shard]
        self.pending[shard] = []
        self.calls += 1
        if self.local is not None and shard == self.local.shard_id:
            try:
                reply = self.local.apply(ops)
            except Exception as exc:
                self._on_failure(shard, exc)
                return
            self._on_reply(shard, reply)
            return
        inflight = self.inflight[shard]
        while len(inflight) >= self._max_inflight:
            self._settle(shard, block=True)
        ops = group_by_pod(ops)  # a bound socket interleaves its pods: send them as runs
        inflight.append((self.handles[shard].apply.remote(ops, self.reader), ops))

    def reap(self) -> None:
        """Collect every finished call (never blocks)."""
        for i in range(len(self.pending)):
            while self.inflight[i] and self._settle(i, block=False):
                pass

    def _settle(self, shard: int, *, block: bool) -> bool:
        """Collect the oldest call to ``shard``. False if not done yet."""
        ref, _ = self.inflight[shard][0]
        if not block:
            ready, _ = ray.wait([ref], timeout=0)
            if not ready:
                return False
        self.inflight[shard].popleft()
        try:
            reply = ray.get(ref)
        except Exception as exc:  # the shard died, restarted or its backend is down
            self._on_failure(shard, exc)
            return True
        self._on_reply(shard, reply)
        return True

    def busy(self, shard: int) -> bool:
        return bool(self.pending[shard] or self.inflight[shard])

    def in_flight(self) -> int:
        return sum(map(len, self.inflight))

    def abandon_inflight(self, shard: int) -> None:
        """Wait out the calls in flight to ``shard``, ignoring their results (a recovery
        replays what they carried)."""
        while self.inflight[shard]:
            ref, _ = self.inflight[shard].popleft()
            with contextlib.suppress(Exception):
                ray.get(ref)

    def take_pending(self, shard: int) -> list[Op]:
        ops, self.pending[shard] = self.pending[shard], []
        return ops

    def positions(self, shard: int) -> tuple[str, dict[str, int]] | None:
        """The shard's incarnation and positions, waiting up to ~30 s for a restarting actor;
        None if it never answered."""
        for _ in range(60):
            try:
                handle = self.handles[shard]
                if handle is None:
                    assert self.local is not None
                    return self.local.get_positions()
                return ray.get(handle.get_positions.remote(self.reader), timeout=30)  # type: ignore[no-any-return]
            except Exception:
                time.sleep(0.5)
        return None

    # --- idle shards: did one restart? (asked now, answers read on later loop turns) -------

    def ask_idle_positions(self) -> None:
        if not self._resync_refs:
            self._resync_at = time.monotonic()
            self._resync_refs = [
                (i, handle.get_positions.remote(self.reader))
                for i, handle in enumerate(self.handles)
                if handle is not None and not self.busy(i)
            ]

    def idle_answers(self) -> list[tuple[int, str, dict[str, int]]]:
        """``(shard, incarnation, positions)`` of the answers that arrived (never blocks)."""
        if not self._resync_refs:
            return []
        ready, _ = ray.wait([r for _, r in self._resync_refs], num_returns=1, timeout=0)
        if not ready:
            if time.monotonic() - self._resync_at > 30:  # a shard that never answers
                self._resync_refs = []
            return []
        out, left = [], []
        for i, ref in self._resync_refs:
            if ref not in ready:
                left.append((i, ref))
                continue
            with contextlib.suppress(Exception):
                incarnation, positions = ray.get(ref)
                out.append((i, incarnation, positions))
        self._resync_refs = left
        return out
