"""The write path's inner loops: the C extension ``kvray._speedups`` or its pure-Python twins.

A shard spends most of its time in a handful of loops: hashing each block's tokens into a chained
request key, turning published hashes into u64 engine keys, and setting or clearing one holder's
bit in a dict of bitmasks. ``kvray._speedups`` (``kvray/_ext/speedups.c``, built by ``pip
install`` when a C compiler is present) runs them without the interpreter, and reads a
``BlockStored``'s tokens straight from the msgpack bytes instead of building an int per token.
Every function below has a Python twin with the same results (``tests/unit/test_fast.py``
compares them on random input); ``COMPILED`` says which ones are in use, and setting
``KVRAY_PURE_PYTHON=1`` forces the twins (to compare, or to debug).

Invariant: for every input, the compiled and the Python function return the same value or both
raise (``ValueError`` for malformed msgpack, ``TypeError``/``OverflowError`` for bad ints).
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import msgspec
import xxhash

_xxh64 = xxhash.xxh3_64_intdigest


def py_msgpack_u32_count(raw: bytes | memoryview) -> int:
    """The length of a msgpack array of ints in [0, 2^32); ``ValueError`` otherwise."""
    return len(_py_tokens(raw))


_U32 = Annotated[int, msgspec.Meta(ge=0, lt=1 << 32)]
_tokens_decoder = msgspec.msgpack.Decoder(list[_U32])


def _py_tokens(raw: bytes | memoryview) -> list[int]:
    try:
        return _tokens_decoder.decode(raw)  # type: ignore[no-any-return]
    except msgspec.ValidationError as exc:
        raise ValueError(f"token_ids is not an array of ints in [0, 2^32): {exc}") from exc
    except msgspec.DecodeError as exc:
        raise ValueError(f"token_ids is not valid msgpack: {exc}") from exc


def py_chain_u32(data: bytes | memoryview, block_size: int, parent: int) -> list[int]:
    """Request keys of every full block of little-endian u32 tokens (seed chain from parent)."""
    _check_chain(block_size, parent)
    step = 4 * block_size
    view = memoryview(data).cast("B")
    out: list[int] = []
    append = out.append
    key = parent
    for off in range(0, len(view) // step * step, step):
        key = _xxh64(view[off : off + step], key)
        append(key)
    return out


def py_chain_msgpack(raw: bytes | memoryview, block_size: int, parent: int) -> list[int]:
    """``chain_u32`` over a raw msgpack array of tokens."""
    _check_chain(block_size, parent)
    tokens = _py_tokens(raw)
    return py_chain_u32(array("I", tokens).tobytes(), block_size, parent)


def _check_chain(block_size: int, parent: int) -> None:
    if not 1 <= block_size <= 1 << 24:
        raise ValueError(f"block_size must be in [1, 2^24], got {block_size}")
    _check_u64(parent)


def _check_u64(v: object) -> int:
    if not isinstance(v, int):
        raise TypeError(f"expected an int, got {type(v).__name__}")
    if not 0 <= v < 1 << 64:
        raise OverflowError(f"{v} is not a u64")
    return v


def py_or_bits(
    d: dict[int, int],
    keys: Sequence[int],
    bit: int,
    recency: bool,
    held: list[int] | None = None,
) -> int:
    """``d[k] = d.get(k, 0) | bit`` for every key (recency: also move k to the end); new keys.

    ``held``: when a list, the position of every key whose mask already had ``bit`` is
    appended to it (a holder storing a block it holds: a second copy)."""
    before = len(d)
    if held is not None:
        for i, k in enumerate(keys):
            old = d.pop(k, 0) if recency else d.get(k, 0)
            if old & bit:
                held.append(i)
            d[k] = old | bit
        return len(d) - before
    if recency:
        pop = d.pop
        for k in keys:
            d[k] = pop(k, 0) | bit
    else:
        get = d.get
        for k in keys:
            d[k] = get(k, 0) | bit
    return len(d) - before


def py_and_bits(d: dict[int, int], keys: Sequence[int], keep: int) -> int:
    """``d[k] &= keep`` for the keys present, deleting zeroed keys; returns how many went."""
    return sum(_clear(d, k, keep) for k in keys)


def _clear(d: dict[int, int], k: int, keep: int) -> bool:
    """``d[k] &= keep`` when k is present; True when that deleted k."""
    m = d.get(k)
    if m is None:
        return False
    m &= keep
    if m:
        d[k] = m
        return False
    del d[k]
    return True


def py_lookup(d: dict[int, int], keys: Sequence[int]) -> list[int | None]:
    """``[d.get(k) for k in keys]``."""
    get = d.get
    return [get(k) for k in keys]


def py_forget_unindexed(
    emap: dict[int, int], engine_keys: Sequence[int], tiers: Sequence[dict[int, int]]
) -> int:
    """Delete ``emap[e]`` for each engine key whose request key no tier holds; how many went."""
    deleted = 0
    for e in engine_keys:
        r = emap.get(e)
        if r is not None and not _indexed(r, tiers):
            del emap[e]
            deleted += 1
    return deleted


def _indexed(r: int, tiers: Sequence[dict[int, int]]) -> bool:
    return any(r in d for d in tiers)


def py_add_engine(
    d: dict[int, int],
    emap: dict[int, int],
    keys: list[int],
    engine: list[int],
    bit: int,
    recency: bool,
    held: list[int] | None = None,
) -> int:
    """``or_bits(d, keys, bit, recency, held)``, then ``emap[engine[i]] = keys[i]``; new keys
    in d."""
    if len(keys) != len(engine):
        raise ValueError("add_engine(): keys and engine differ in length")
    added = py_or_bits(d, keys, bit, recency, held)
    emap.update(zip(engine, keys, strict=True))
    return added


def py_remove_engine(
    d: dict[int, int],
    emap: dict[int, int],
    engine: Sequence[int],
    keep: int,
    tiers: Sequence[dict[int, int]],
) -> tuple[list[int], int, int]:
    """Resolve each engine key, clear ``keep``'s complement in ``d``, and forget engine keys
    whose request key no tier holds; returns (request keys resolved, unknown, deleted from d)."""
    keys: list[int] = []
    unknown = deleted = 0
    for e in engine:
        r = emap.get(e)
        if r is None:
            unknown += 1
            continue
        keys.append(r)
        deleted += _clear(d, r, keep)
        if not _indexed(r, tiers):
            del emap[e]
    return keys, unknown, deleted


def py_xor_u64(hashes: Sequence[int | bytes], tag: int) -> list[int]:
    """Published hashes as u64 (raw digests: their last 8 bytes, big-endian) XOR ``tag``."""
    _check_u64(tag)
    out: list[int] = []
    for h in hashes:
        v = int.from_bytes(h[-8:], "big") if isinstance(h, bytes) else _check_u64(h)
        out.append(v ^ tag)
    return out


def py_slot_keys(d: dict[int, int], live: int, packed: bool = False) -> dict[int, Any]:
    """Slot → the keys whose mask in ``d`` has that slot's bit, within ``live`` (keys in
    ``d``'s order): the index inverted (snapshots). ``packed``: each slot's keys as bytes,
    u64 little-endian."""
    if live < 0:
        raise TypeError("slot_keys: live must be a non-negative int")
    out: dict[int, list[int]] = {}
    for k, m in d.items():
        _check_u64(k)
        if not isinstance(m, int) or m < 0:
            raise ValueError("slot_keys: masks must be non-negative ints")
        bits = m & live
        while bits:
            low = bits & -bits
            out.setdefault(low.bit_length() - 1, []).append(k)
            bits ^= low
    if packed:
        return {s: b"".join(k.to_bytes(8, "little") for k in ks) for s, ks in out.items()}
    return out


def py_clear_slots(d: dict[int, int], clear: int) -> int:
    """Clear the bits of ``clear`` from every mask in ``d``, deleting keys whose mask becomes
    0; returns how many were deleted (one pass per key: a read replica dropping a shard's
    holders)."""
    if not isinstance(clear, int) or clear < 0:
        raise TypeError("clear_slots: clear must be a non-negative int")
    dead: list[int] = []
    for k, m in list(d.items()):
        x = m & clear
        if x:
            m ^= x
            if m:
                d[k] = m
            else:
                dead.append(k)
    for k in dead:
        del d[k]
    return len(dead)


PYTHON: dict[str, Any] = {
    "msgpack_u32_count": py_msgpack_u32_count,
    "chain_u32": py_chain_u32,
    "chain_msgpack": py_chain_msgpack,
    "or_bits": py_or_bits,
    "and_bits": py_and_bits,
    "lookup": py_lookup,
    "forget_unindexed": py_forget_unindexed,
    "add_engine": py_add_engine,
    "remove_engine": py_remove_engine,
    "xor_u64": py_xor_u64,
    "slot_keys": py_slot_keys,
    "clear_slots": py_clear_slots,
    "U64Map": dict,
    "U64Dict": dict,
}

_speedups: Any
if os.environ.get("KVRAY_PURE_PYTHON", "") not in ("", "0"):
    _speedups = None
else:
    try:
        from kvray import _speedups  # type: ignore[attr-defined, no-redef]
    except ImportError:  # built without a C compiler: the twins below do the same, slower
        _speedups = None

COMPILED: bool = _speedups is not None
"""True when the C extension is in use."""

_impl: Any = _speedups

msgpack_u32_count = _impl.msgpack_u32_count if _impl else py_msgpack_u32_count
chain_u32 = _impl.chain_u32 if _impl else py_chain_u32
chain_msgpack = _impl.chain_msgpack if _impl else py_chain_msgpack
or_bits = _impl.or_bits if _impl else py_or_bits
and_bits = _impl.and_bits if _impl else py_and_bits
lookup = _impl.lookup if _impl else py_lookup
forget_unindexed = _impl.forget_unindexed if _impl else py_forget_unindexed
add_engine = _impl.add_engine if _impl else py_add_engine
remove_engine = _impl.remove_engine if _impl else py_remove_engine
xor_u64 = _impl.xor_u64 if _impl else py_xor_u64
slot_keys = _impl.slot_keys if _impl else py_slot_keys
clear_slots = _impl.clear_slots if _impl else py_clear_slots

U64Map: Callable[[], dict[int, int]] = _impl.U64Map if _impl else dict
"""A table of u64 keys to int values for the index (engine map, unordered tiers).

Compiled, ``kvray._speedups.U64Map``: open addressing in C, one 16-byte slot per entry and no
int object per key (a dict keyed by ints holds a ~42-byte entry plus a 32–36-byte key object,
and its lookups touch both). It has the dict operations the index uses (``len``, ``[]``,
``in``, ``del``, ``get``, ``pop``, ``update``, ``clear``; ``keys``/``values``/``items`` as lists)
and no order. Without the extension it is ``dict``. The functions above accept either."""


def U64Values() -> dict[int, int]:  # noqa: N802 (a table type's constructor)
    """A ``U64Map`` whose values are u64s too (the engine map: engine key → request key): each
    value is kept in its slot, so no int object is held for any (a plain ``U64Map`` keeps ints
    below 2**63 in the slot and holds an object for the other half of uniform u64s). Without
    the extension it is ``dict``."""
    return _impl.U64Map(u64_values=True) if _impl else {}


U64Dict: Callable[[], dict[int, int]] = _impl.U64Dict if _impl else dict
"""The same with a dict's order (new keys last, assignment keeps a key's place, ``or_bits`` with
recency moves it last), for tiers evicted oldest first: CPython's compact-dict layout for u64
keys (entries in order, an index of entry numbers), ~32 bytes per key instead of ~78, plus
``oldest(n)``. Without the extension it is ``dict``."""

scan_frame: Callable[..., tuple[Any, ...] | None] | None = _impl.scan_frame if _impl else None
"""``scan_frame(payload, max_payload, max_events, max_blocks[, keep])``: a batch's
``(ts, rank)`` when it is in *fast form* (what pods publish: stores with their tokens, removals,
GPU tier, no LoRA or extra keys; the exact rules are in ``kvray/_ext/speedups.c``), else None.
With ``keep``, ``(ts, rank, scan)``: ``apply_frames`` takes the scan in the payload's place and
does not parse the frame again. C only: None without the extension."""

apply_frames: Callable[..., tuple[Any, ...]] | None = _impl.apply_frames if _impl else None
"""Apply a run of one holder's fast-form frames to a memory index in one call, up to the first
that is not in fast form (``MemoryIndex.apply_frames`` wraps it). C only. Its twin is the
general path itself, ``EventDecoder.decode`` + ``IndexWriter.apply_batch``:
``tests/unit/test_frame_path.py`` applies the same frames both ways and compares the indexes,
the change-stream ops and the counts."""

apply_ops: Callable[..., tuple[int, int, int]] | None = _impl.apply_ops if _impl else None
"""A read replica's change-stream ops in one call, until one needs more than a bit set or
cleared (``MemoryIndex.apply_ops`` wraps it). C only. Its twin is ``ReplicaIndex.apply``'s own
loop: ``tests/unit/test_frame_path.py`` follows the same stream both ways."""
