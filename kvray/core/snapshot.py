"""The portable index snapshot: one msgpack document any backend can write and any can read.

Layout (msgpack map)::

    {"v": 1,
     "holders": {pod: {tier: [key, ...]}},      # u64 keys per (holder, tier)
     "engine_map": [[engine_key, request_key], ...]}

It is pod-oriented rather than slot-oriented so that a memory snapshot restores into Redis and
back, and so that a shard with a different slot layout (after a restart) can load it.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from kvray.errors import MalformedFrame

SNAPSHOT_VERSION = 1


class Snapshot(msgspec.Struct, frozen=True):
    """The decoded snapshot document."""

    v: int
    """Format version (1)."""
    holders: dict[str, dict[str, list[int]]]
    """holder → tier → keys."""
    engine_map: list[tuple[int, int]] = []
    """(engine key, request key) pairs."""


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Snapshot)


def encode_snapshot(
    holders: dict[str, dict[str, list[int]]], engine_map: Iterable[tuple[int, int]]
) -> bytes:
    """Encode a snapshot document."""
    return _encoder.encode(
        Snapshot(v=SNAPSHOT_VERSION, holders=holders, engine_map=list(engine_map))
    )


def decode_snapshot(data: bytes) -> Snapshot:
    """Decode a snapshot, raising ``MalformedFrame`` (reason ``snapshot``) when it is not one."""
    try:
        snap = _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MalformedFrame(f"not a kvray snapshot: {exc}", reason="snapshot") from exc
    if snap.v != SNAPSHOT_VERSION:
        raise MalformedFrame(f"unsupported snapshot version {snap.v}", reason="snapshot")
    return snap
