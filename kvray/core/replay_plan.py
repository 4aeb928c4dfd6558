"""Replay planning for a pod reader: what to ask a pod's replay socket, and what to keep of it.

An ingestor follows streams ``(pod, rank)`` and hands their batches to the shards owning the
holders. When it cannot show a shard a contiguous run (a seq gap, a shard that restarted or
reported a holder *behind*, its own restart) it asks the pod's replay ROUTER for the missing
range. The decisions are here, as plain functions over positions and seqs (no Ray, no sockets):

* ``first_contact``: the first message of a stream after the reader (re)started;
* ``take_replayed``: which of a pod's replayed batches fill ``[start, stop)`` of one rank;
* ``recovery_plan``: which streams a recovering shard must be replayed, from where;
* ``catch_up_plan``: what a restarted reader replays before reading live traffic;
* ``ReplaySockets``: where each pod's (and rank's) replay socket is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from kvray.core.holders import holder_id, parse_holder
from kvray.errors import MalformedFrame

OPEN = 2**63
"""An open-ended replay range's stop ("everything the pod still has")."""

Stream = tuple[str, int]
"""``(pod, data-parallel rank)``: one publisher process."""


def offset_port(endpoint: str, offset: int) -> str:
    """``tcp://host:port`` with ``port + offset`` (vLLM's data-parallel port rule)."""
    head, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit() or not endpoint.startswith("tcp://"):
        return endpoint
    return f"{head}:{int(port) + offset}"


class ReplaySockets:
    """Pod (or endpoint) → its replay ROUTER endpoint; rank r's socket is at port + r."""

    def __init__(self) -> None:
        self.by_pod: dict[str, str] = {}

    def learn(self, endpoint: str, replay: str | None, pod: str | None) -> None:
        """A pod kvray connects to, with its configured replay socket (if any)."""
        if replay and pod:
            self.by_pod[pod] = replay
        if replay:
            self.by_pod.setdefault(endpoint, replay)

    def register(self, pod: str, replay: str) -> None:
        self.by_pod[pod] = replay

    def forget(self, pod: str) -> None:
        self.by_pod.pop(pod, None)

    def for_stream(self, pod: str, origin_replay: str | None, rank: int = 0) -> str | None:
        """The replay socket of ``pod``'s rank: the one configured for the endpoint the
        message came from (per rank already), else the pod's, offset by the rank."""
        if origin_replay:
            return origin_replay
        ep = self.by_pod.get(pod)
        if ep is not None and rank:
            ep = offset_port(ep, rank)
        return ep


@dataclass(frozen=True, slots=True)
class FirstContact:
    """What to do with the first message of a stream this reader sees."""

    clear: bool = False
    """The publisher restarted while the reader was away: clear the holder first."""
    replay_from: int | None = None
    """Replay ``[replay_from, seq)`` first (a gap since the shard's position)."""
    replay_buffer: bool = False
    """Replay what the pod still buffers before ``seq`` (a pod joined late)."""
    contiguous: bool = False
    """Whether the op follows the shard's position, when no replay is planned (a replay
    planned decides it: contiguous when it completes)."""


def first_contact(
    seq: int, known: int | None, origin_replays: bool, replay_known: bool
) -> FirstContact:
    """Plan the first message ``seq`` of a stream.

    Args:
        known: the shard's position for the holder, when this reader learned it (restart).
        origin_replays: the endpoint the message came from has a replay socket configured.
        replay_known: some replay socket is known for the stream.
    """
    if known is not None:  # this reader restarted: where did the shard stop?
        if seq <= known:
            return FirstContact(clear=True)
        if seq > known + 1:
            return FirstContact(replay_from=known + 1)
        return FirstContact(contiguous=True)
    if seq > 0 and origin_replays:
        # A pod kvray subscribed to while it was already publishing (added at runtime, e.g. a
        # Serve replica the router registered): what it published before is in its buffer.
        return FirstContact(replay_buffer=True)
    # Where the shard stopped is unknown here (the reader restarted without reading it, or
    # the stream moved): the shard knows, and refuses the op as behind when it misses
    # [its position + 1, seq), which is replayed then. Without a replay socket nothing could
    # heal it: take the op as it comes.
    return FirstContact(contiguous=replay_known)


class ReplayTake(NamedTuple):
    batches: list[tuple[int, bytes, bool]]
    """``(seq, payload, contiguous)`` to queue, in order."""
    last: int | None
    """The last seq queued when the range is complete (``start - 1`` if the pod had
    nothing), None when something is missing."""
    missing: int
    """Seqs known missing (for a closed range)."""
    malformed: list[MalformedFrame]


def take_replayed(
    records: Iterable[tuple[int, bytes]],
    rank: int,
    start: int | None,
    stop: int,
    complete: bool,
    rank_of: Callable[[bytes], int | None],
) -> ReplayTake:
    """Keep, of a pod's replay answer, the batches of ``rank`` filling ``[start, stop)``.

    ``start`` None: from the oldest batch the pod still buffers (a stream kvray joined late,
    whose earlier batches the shard never had: the first one is not contiguous). ``stop``
    ``OPEN``: everything, complete only if the pod's end marker arrived (``complete``).
    """
    out: list[tuple[int, bytes, bool]] = []
    bad: list[MalformedFrame] = []
    expected = start
    for seq, payload in records:
        if (expected is not None and seq < expected) or seq >= stop:
            continue
        try:
            r_rank = rank_of(payload)
        except MalformedFrame as exc:
            bad.append(exc)
            continue
        if (r_rank or 0) != rank:
            continue
        contiguous = expected is not None
        if expected is None:
            expected = seq  # the oldest batch the pod still holds
        if seq != expected:
            break  # the pod's buffer no longer holds [expected, seq)
        out.append((seq, payload, contiguous))
        expected = seq + 1
    if expected is None:  # nothing before ``stop``
        expected = 0 if start is None else start
    if stop == OPEN:
        return ReplayTake(out, expected - 1 if complete else None, 0, bad)
    if expected < stop:
        return ReplayTake(out, None, stop - expected, bad)
    return ReplayTake(out, expected - 1, 0, bad)


@dataclass(slots=True)
class Recovery:
    """A stream a recovering shard must be replayed: ``[start, stop)``."""

    stream: Stream
    start: int
    stop: int
    holder: str = field(default="")


def recovery_plan(
    streams: Mapping[Stream, int], positions: Mapping[str, int], owned: Callable[[str], bool]
) -> list[Recovery]:
    """Per stream whose holder the shard owns (``owned``): replay from the shard's position
    + 1 (0 when it has none) up to the next seq this reader expects, if anything is missing."""
    out = []
    for (pod, rank), nxt in streams.items():
        holder = holder_id(pod, rank)
        if not owned(holder):
            continue
        start = positions.get(holder, -1) + 1
        if start < nxt:
            out.append(Recovery((pod, rank), start, nxt, holder))
    return out


def catch_up_plan(known: Mapping[str, int]) -> list[tuple[str, Stream, int]]:
    """``(holder, stream, first seq to replay)`` for each holder whose position a restarted
    reader learned from the shards."""
    out = []
    for holder, pos in known.items():
        pod, rank = parse_holder(holder)
        out.append((holder, (pod, rank), pos + 1))
    return out
