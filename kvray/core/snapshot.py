"""The portable index snapshot: one msgpack document any backend can write and any can read.

Layout (msgpack map), version 2::

    {"v": 2,
     "holders": {pod: {tier: <u64 keys, little-endian bytes>}},
     "engine_map": <u64 engine key, u64 request key, ..., little-endian bytes>}

Version 1 (still read) had the same layout with msgpack int arrays: ``[key, ...]`` and
``[[engine_key, request_key], ...]``. Packed keys decode without an int object per pair (a
restored shard at 24 M pairs otherwise decoded 24 M ints before indexing them).

It is pod-oriented rather than slot-oriented so that a memory snapshot restores into Redis and
back, and so that a shard with a different slot layout (after a restart) can load it.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import chain

import msgspec

from kvray.errors import MalformedFrame

SNAPSHOT_VERSION = 2
_READABLE = (1, 2)
_BIG_ENDIAN = sys.byteorder == "big"


def pack_keys(keys: Iterable[int]) -> bytes:
    """Keys as u64 little-endian bytes (snapshots' and the change stream's key format)."""
    a = array("Q", keys)
    if _BIG_ENDIAN:
        a.byteswap()
    return a.tobytes()


def packed(keys: Sequence[int] | bytes) -> bytes:
    """Keys as ``pack_keys`` bytes; bytes are taken as packed already."""
    return keys if isinstance(keys, bytes) else pack_keys(keys)


def unpack_keys(raw: bytes) -> array[int]:
    """The keys of ``pack_keys`` bytes (an array: a ``Sequence[int]``)."""
    a = array("Q")
    a.frombytes(raw)
    if _BIG_ENDIAN:
        a.byteswap()
    return a


class Snapshot(msgspec.Struct, frozen=True):
    """The decoded snapshot document (read it with ``holder_keys`` and ``engine_pairs``,
    which take either version)."""

    v: int
    """Format version (1 or 2)."""
    holders: dict[str, dict[str, bytes | list[int]]]
    """holder → tier → keys: packed (v2) or ints (v1)."""
    engine_map: bytes | list[tuple[int, int]] = b""
    """(engine key, request key) pairs: packed, alternating (v2), or a list (v1)."""


def holder_keys(snap: Snapshot) -> Iterator[tuple[str, str, Sequence[int]]]:
    """``(holder, tier, keys)`` of a snapshot of either version (v2: an ``array('Q')``)."""
    for holder, tiers in snap.holders.items():
        for tier, keys in tiers.items():
            yield holder, tier, unpack_keys(keys) if isinstance(keys, bytes) else keys


def engine_pairs(snap: Snapshot) -> Iterable[tuple[int, int]]:
    """The ``(engine key, request key)`` pairs of a snapshot of either version."""
    if not isinstance(snap.engine_map, bytes):
        return snap.engine_map
    flat = unpack_keys(snap.engine_map)
    return zip(flat[0::2], flat[1::2], strict=True)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Snapshot)


def encode_snapshot(
    holders: Mapping[str, Mapping[str, Sequence[int] | bytes]],
    engine_map: Iterable[tuple[int, int]],
) -> bytes:
    """Encode a snapshot document (version 2: keys packed; ``holders`` may give them packed
    already, as ``pack_keys`` bytes)."""
    by_holder: dict[str, dict[str, bytes | list[int]]] = {
        h: {t: packed(ks) for t, ks in tiers.items()} for h, tiers in holders.items()
    }
    return _encoder.encode(
        Snapshot(
            v=SNAPSHOT_VERSION,
            holders=by_holder,
            engine_map=pack_keys(chain.from_iterable(engine_map)),
        )
    )


def decode_snapshot(data: bytes) -> Snapshot:
    """Decode a snapshot, raising ``MalformedFrame`` (reason ``snapshot``) when it is not one."""
    try:
        snap = _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MalformedFrame(f"not a kvray snapshot: {exc}", reason="snapshot") from exc
    if snap.v not in _READABLE:
        raise MalformedFrame(f"unsupported snapshot version {snap.v}", reason="snapshot")
    _check_packed(snap)
    return snap


def _check_packed(snap: Snapshot) -> None:
    """Packed keys come in whole u64s (engine pairs in whole pairs)."""
    for holder, tiers in snap.holders.items():
        for tier, keys in tiers.items():
            if isinstance(keys, bytes) and len(keys) % 8:
                raise MalformedFrame(
                    f"not a kvray snapshot: {holder}/{tier} keys are {len(keys)} bytes, "
                    "not a multiple of 8",
                    reason="snapshot",
                )
    if isinstance(snap.engine_map, bytes) and len(snap.engine_map) % 16:
        raise MalformedFrame(
            f"not a kvray snapshot: engine_map is {len(snap.engine_map)} bytes, "
            "not a multiple of 16",
            reason="snapshot",
        )
