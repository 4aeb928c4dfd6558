"""The C extension ``kvray._speedups`` against its pure-Python twins (``kvray.core.fast``).

Each property draws inputs (valid and not) and requires both implementations to return the same
value, or both to raise the same exception type. The compiled module must be present: CI builds
it; only ``KVRAY_PURE_PYTHON=1`` (a deliberate pure run) lets these tests pass without it.
"""

from __future__ import annotations

import os
import pickle
import struct
import sys
from array import array
from typing import Any

import msgspec
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from kvray.core import fast

if not fast.COMPILED and os.environ.get("KVRAY_PURE_PYTHON", "") in ("", "0"):
    pytest.fail(
        "kvray._speedups is not built (no C compiler at install?): reinstall with gcc present, "
        "or set KVRAY_PURE_PYTHON=1 to run the pure-Python twins on purpose",
        pytrace=False,
    )

C: Any = fast._speedups
needs_c = pytest.mark.skipif(C is None, reason="pure-Python run (KVRAY_PURE_PYTHON=1)")

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
some_ints = st.integers(-(2**70), 2**70)


TABLES = st.sampled_from(["dict", "U64Map", "U64Dict"])


def same(name: str, *args: Any, table: str = "dict") -> Any:
    """Call both implementations; equal results or the same exception type. ``table``: what the
    C call gets each dict as (``U64Map``/``U64Dict``; the Python twin keeps the dict)."""
    py = fast.PYTHON[name]
    c = getattr(C, name)

    def run(fn: Any, fresh: list[Any]) -> tuple[str, Any]:
        try:
            return "ok", fn(*fresh)
        except (ValueError, TypeError, OverflowError) as exc:
            return type(exc).__name__, None

    def copy(a: Any, to: str = "dict") -> Any:
        if isinstance(a, list) and a and all(isinstance(x, dict) for x in a):
            return [copy(x, to) for x in a]  # tiers
        if not isinstance(a, dict):
            return a
        return dict(a) if to == "dict" else getattr(C, to)(a)

    py_args = [copy(a) for a in args]
    c_args = [copy(a, table) for a in args]
    got_py, got_c = run(py, py_args), run(c, c_args)
    assert got_c == got_py, (name, args)
    # Mutated dicts must end equal too, in the same order (dict order is LRU order; a U64Dict
    # keeps it, a U64Map has none).
    for a, b in zip(py_args, c_args, strict=True):
        if isinstance(a, dict):
            if table == "U64Map":
                assert sorted(a.items()) == sorted(b.items())
            else:
                assert list(a.items()) == list(b.items())
    return got_py[1]


def _mp_int(v: int, form: int) -> bytes:
    """``v`` in one of msgpack's integer encodings (several are legal for the same value)."""
    if form == 0 or not 0 <= v < 128:
        return msgspec.msgpack.encode(v)
    codes = [(0xCC, "B"), (0xCD, ">H"), (0xCE, ">I"), (0xCF, ">Q"), (0xD2, ">i"), (0xD3, ">q")]
    code, fmt = codes[form % len(codes)]
    try:
        return bytes([code]) + struct.pack(fmt, v)
    except struct.error:
        return msgspec.msgpack.encode(v)


@st.composite
def token_arrays(draw: st.DrawFn) -> bytes:
    """msgpack arrays of tokens: mostly valid, in varied int encodings; sometimes broken."""
    tokens = draw(st.lists(st.one_of(u32, st.integers(-5, 2**33)), max_size=70))
    body = b"".join(_mp_int(t, draw(st.integers(0, 6))) for t in tokens)
    n = len(tokens)
    head = bytes([0x90 | n]) if n < 16 else b"\xdc" + n.to_bytes(2, "big")
    raw = head + body
    match draw(st.integers(0, 9)):
        case 0:
            return raw[: draw(st.integers(0, len(raw)))]  # truncated
        case 1:
            return raw + b"\x01"  # trailing bytes
        case 2:
            return msgspec.msgpack.encode(draw(st.one_of(st.none(), st.text(), st.floats())))
        case 3:
            return msgspec.msgpack.encode([draw(st.floats(allow_nan=False)), 1])
        case _:
            return raw


@settings(max_examples=400, deadline=None)
@given(raw=token_arrays(), block_size=st.sampled_from([1, 2, 3, 16]), parent=u64)
@needs_c
def test_msgpack_tokens_agree(raw: bytes, block_size: int, parent: int) -> None:
    n = same("msgpack_u32_count", raw)
    keys = same("chain_msgpack", raw, block_size, parent)
    if n is not None and keys is not None:
        assert len(keys) == n // block_size


@settings(max_examples=300, deadline=None)
@given(tokens=st.lists(u32, max_size=100), block_size=st.integers(1, 20), parent=u64)
@needs_c
def test_chain_is_xxh3_seeded_chain(tokens: list[int], block_size: int, parent: int) -> None:
    data = array("I", tokens).tobytes()
    keys = same("chain_u32", data, block_size, parent)
    assert same("chain_msgpack", msgspec.msgpack.encode(tokens), block_size, parent) == keys
    want, key = [], parent
    for i in range(len(tokens) // block_size):
        key = xxhash.xxh3_64_intdigest(data[4 * block_size * i : 4 * block_size * (i + 1)], key)
        want.append(key)
    assert keys == want


@needs_c
@pytest.mark.parametrize(
    "args",
    [
        (b"", 0, 1),
        (b"", -1, 1),
        (b"", 2**25, 1),
        (b"", 16, -1),
        (b"", 16, 2**64),
        (b"", 16, "x"),
        (b"", "16", 1),
        ("text", 16, 1),
    ],
)
def test_chain_rejects_bad_arguments(args: tuple[Any, ...]) -> None:
    assert same("chain_u32", *args) is None
    assert same("chain_msgpack", *args) is None


class _Int(int):
    """An int subclass: the C side reads its value (as ``isinstance(v, int)`` does)."""


# The edges of get_u64 (public-API conversion): sizes and signs around 2**63 / 2**64, bools,
# subclasses, and things that are not ints.
EDGE_INTS: list[Any] = [
    0,
    1,
    True,
    False,
    2**30,
    2**32,
    2**63 - 1,
    2**63,
    2**64 - 1,
    2**64,
    2**64 + 1,
    2**200,
    -1,
    -(2**63),
    -(2**64),
    -(2**200),
    _Int(7),
    _Int(2**64 - 1),
    _Int(2**64),
    _Int(-3),
    1.0,
    "1",
    None,
]


@needs_c
@pytest.mark.parametrize("v", EDGE_INTS, ids=repr)
def test_u64_conversion_edges_agree(v: Any) -> None:
    same("xor_u64", [v], 5)
    same("xor_u64", [2**64 - 1, 3], v)
    same("chain_u32", b"\x01\x00\x00\x00" * 4, 2, v)
    same("chain_msgpack", msgspec.msgpack.encode([1, 2, 3, 4]), 2, v)
    # A C table holds exactly the u64 keys (a bool is its int), raises as dict cannot for others.
    m, holds = C.U64Map(), isinstance(v, int) and 0 <= v < 2**64
    if holds:
        m[v] = 1
        assert m[int(v)] == 1 and v in m and list(m) == [int(v)]
    else:
        with pytest.raises(TypeError if not isinstance(v, int) else OverflowError):
            m[v] = 1
        assert v not in m and m.get(v) is None and len(m) == 0


@needs_c
@pytest.mark.parametrize(
    "head", [b"\xdd\xff\xff\xff\xff", b"\xdd\x7f\xff\xff\xff", b"\xdc\xff\xff"]
)
def test_array_count_longer_than_the_bytes_is_rejected_before_allocating(head: bytes) -> None:
    """A 5-byte header may claim 2^32 tokens: that must be a ValueError, not a 32 GB malloc."""
    for raw in (head, head + b"\x01" * 40):
        assert same("msgpack_u32_count", raw) is None
        assert same("chain_msgpack", raw, 1, 0) is None


# Where a table value's representation changes (kept in the slot's word below 2**63 and for a
# single bit at any slot, an int object otherwise), and either side of it.
EDGES = [0, 1, 2**62 - 1, 2**62, 2**63 - 1, 2**63, 2**63 + 1, 2**63 | 1, 2**64 - 1, 2**64]
EDGES += [2**64 + 1, 2**64 | 2**63, 2**200, 2**200 + 1]
bits = st.one_of(st.integers(0, 130), st.integers(0, 3000)).map(lambda s: 1 << s)
# a few holders' bits, at slots of any width (kept as a set of slots in the word when they fit)
few_bits = st.lists(st.one_of(st.integers(0, 140), st.integers(0, 20000)), min_size=1, max_size=9)
masks = st.one_of(
    st.integers(0, 2**80),
    st.integers(0, 2**64 - 1),
    bits,
    st.sampled_from(EDGES),
    few_bits.map(lambda ss: sum(1 << s for s in set(ss))),
)
mask_dicts = st.dictionaries(st.integers(0, 40), masks, max_size=30)
key_lists = st.lists(st.integers(0, 50), max_size=30)


@settings(max_examples=300, deadline=None)
@given(
    d=mask_dicts,
    keys=key_lists,
    bit=bits,
    recency=st.booleans(),
    packed=st.booleans(),
    table=TABLES,
)
@needs_c
def test_bitmask_updates_agree(
    d: dict[int, int], keys: list[int], bit: int, recency: bool, packed: bool, table: str
) -> None:
    seq: Any = array("Q", keys) if packed else keys
    same("or_bits", d, seq, bit, recency, table=table)
    same("and_bits", d, seq, ~bit, table=table)
    same("lookup", d, keys, table=table)
    tiers = [{k: 1 for k in keys[::2]}, {k: 1 for k in keys[1::3]}]
    emap = {k: v % 45 for k, v in d.items()}
    same("forget_unindexed", emap, keys, tiers, table=table)


@settings(max_examples=300, deadline=None)
@given(
    d=mask_dicts,
    keys=key_lists,
    bit=bits,
    recency=st.booleans(),
    table=TABLES,
    fused=st.booleans(),
)
@needs_c
def test_held_positions_agree(
    d: dict[int, int], keys: list[int], bit: int, recency: bool, table: str, fused: bool
) -> None:
    """``held``: the positions whose key already had the bit (a key repeated in the list is
    held the second time), in both implementations, by definition."""
    want: list[int] = []
    seen = {k for k, m in d.items() if m & bit}
    for i, k in enumerate(keys):
        if k in seen:
            want.append(i)
        seen.add(k)
    py_held: list[int] = []
    c_held: list[int] = []
    py_d: Any = dict(d)
    c_d: Any = dict(d) if table == "dict" else getattr(C, table)(d)
    if fused:
        engine = [k + 1000 for k in keys]
        fast.py_add_engine(py_d, {}, list(keys), engine, bit, recency, py_held)
        C.add_engine(c_d, C.U64Map(), list(keys), engine, bit, recency, c_held)
    else:
        fast.py_or_bits(py_d, keys, bit, recency, py_held)
        C.or_bits(c_d, keys, bit, recency, c_held)
    assert py_held == c_held == want
    assert sorted(c_d.items()) == sorted(py_d.items())
    with pytest.raises(TypeError):
        C.or_bits(c_d, keys, bit, recency, ())  # held must be a list or None


@settings(max_examples=300, deadline=None)
@given(d=mask_dicts, clear=st.one_of(st.just(2**600 - 1), st.integers(0, 2**300)), table=TABLES)
@needs_c
def test_clear_slots_agree(d: dict[int, int], clear: int, table: str) -> None:
    """Every mask without ``clear``'s bits, masks it empties deleted, by definition, in both
    implementations, and in a table the survivors keep their order."""
    want = {k: m & ~clear for k, m in d.items() if m & ~clear or not m & clear}
    py_d = dict(d)
    c_d = dict(d) if table == "dict" else getattr(C, table)(d)
    assert fast.py_clear_slots(py_d, clear) == C.clear_slots(c_d, clear) == len(d) - len(want)
    assert py_d == want
    assert sorted(c_d.items()) == sorted(want.items())
    if table != "U64Map":
        assert list(c_d.keys()) == list(want)
    with pytest.raises(TypeError):
        C.clear_slots(c_d, -1)
    with pytest.raises(TypeError):
        fast.py_clear_slots(py_d, -1)


@settings(max_examples=300, deadline=None)
@given(d=mask_dicts, live=st.one_of(st.just(2**600 - 1), st.integers(0, 2**300)), table=TABLES)
@needs_c
def test_slot_keys_agree(d: dict[int, int], live: int, table: str) -> None:
    """The index inverted (slot → keys with its bit), by definition, in both implementations,
    in the table's order."""
    want: dict[int, list[int]] = {}
    for k, m in d.items():
        for slot in range((m & live).bit_length()):
            if (m & live) >> slot & 1:
                want.setdefault(slot, []).append(k)
    py = fast.py_slot_keys(dict(d), live)
    c = C.slot_keys(dict(d) if table == "dict" else getattr(C, table)(d), live)
    assert {s: sorted(ks) for s, ks in c.items()} == {s: sorted(ks) for s, ks in want.items()}
    assert py == want
    if table != "U64Map":  # a U64Map has no order
        assert c == want
    # packed: the same keys, as u64 little-endian bytes
    c_packed = C.slot_keys(dict(d) if table == "dict" else getattr(C, table)(d), live, True)
    py_packed = fast.py_slot_keys(dict(d), live, True)

    def unpacked(out: dict[int, bytes]) -> dict[int, list[int]]:
        return {
            s: sorted(int.from_bytes(b[i : i + 8], "little") for i in range(0, len(b), 8))
            for s, b in out.items()
        }

    assert unpacked(c_packed) == unpacked(py_packed) == {s: sorted(ks) for s, ks in want.items()}
    if table != "U64Map":
        assert c_packed == py_packed
    if table != "dict":  # a table counts its (key, holder) pairs in C
        pairs = sum((m & live).bit_count() for m in d.values())
        assert getattr(C, table)(d).pairs(live) == pairs == sum(map(len, want.values()))
    with pytest.raises(TypeError):
        C.slot_keys(d, -1)
    with pytest.raises(TypeError):
        C.slot_keys(d, 1, True, None)


@settings(max_examples=300, deadline=None)
@given(
    hashes=st.lists(st.one_of(u64, some_ints, st.binary(max_size=40), st.none()), max_size=20),
    tag=st.one_of(u64, some_ints),
)
@needs_c
def test_xor_u64_agrees(hashes: list[Any], tag: int) -> None:
    same("xor_u64", hashes, tag)


@needs_c
def test_bad_containers_raise_not_crash() -> None:
    for name, args in [
        ("or_bits", ([], [1], 1, True)),
        ("and_bits", ({}, 5, 1)),
        ("lookup", ({}, None)),
        ("forget_unindexed", ({}, [1], [[]])),
        ("or_bits", ({}, [[1]], 1, False)),  # unhashable key
        ("and_bits", ({1: "x"}, [1], 1)),  # a mask that is not an int
    ]:
        with pytest.raises((TypeError, ValueError)):
            getattr(C, name)(*args)


@settings(max_examples=300, deadline=None)
@given(
    d=mask_dicts,
    emap=st.dictionaries(st.integers(100, 140), st.integers(0, 45), max_size=30),
    other=st.dictionaries(st.integers(0, 40), st.just(1), max_size=10),
    engine=st.lists(st.integers(100, 150), max_size=30),
    keys=key_lists,
    bit=bits,
    recency=st.booleans(),
    packed=st.booleans(),
    table=TABLES,
)
@needs_c
def test_fused_engine_paths_agree(
    d: dict[int, int],
    emap: dict[int, int],
    other: dict[int, int],
    engine: list[int],
    keys: list[int],
    bit: int,
    recency: bool,
    packed: bool,
    table: str,
) -> None:
    n = min(len(engine), len(keys))
    same("add_engine", d, emap, keys[:n], engine[:n], bit, recency, table=table)
    # The shard's layout: tiers U64Dicts (recency order), the engine map a U64Map.
    py_d, py_e = dict(d), dict(emap)
    c_d: Any = dict(d) if table == "dict" else C.U64Dict(d)
    c_e: Any = dict(emap) if table == "dict" else C.U64Map(emap)
    seq: Any = array("Q", engine) if packed else engine
    got_py = fast.py_remove_engine(py_d, py_e, seq, ~bit, [py_d, other])
    got_c = C.remove_engine(c_d, c_e, seq, ~bit, [c_d, other])
    assert got_c == got_py
    assert list(c_d.items()) == list(py_d.items()) and sorted(c_e.items()) == sorted(py_e.items())
    with pytest.raises((TypeError, ValueError)):
        C.add_engine(d, emap, [1], [], 1, True)
    with pytest.raises(TypeError):
        C.remove_engine(d, emap, engine, ~bit, [None])


# --- U64Map: the C table behaves as a dict of u64 → int ------------------------------------------

ops = st.lists(
    st.tuples(
        st.sampled_from(["set", "set", "del", "pop", "get", "in"]),
        st.one_of(st.integers(0, 300), u64),  # a small range: collisions, long probe runs
        st.one_of(
            st.integers(-(2**70), 2**70),
            masks,
            st.sampled_from(EDGES).map(lambda v: -v),
        ),
    ),
    max_size=400,
)


@settings(max_examples=300, deadline=None)
@given(steps=ops, kind=st.sampled_from(["U64Map", "U64Dict"]))
@needs_c
def test_tables_behave_as_a_dict(steps: list[tuple[str, int, int]], kind: str) -> None:
    m, d = getattr(C, kind)(), {}
    for op, k, v in steps:
        if op == "set":
            m[k] = v
            d[k] = v
        elif op == "del":
            if k in d:
                del d[k]
                del m[k]
            else:
                with pytest.raises(KeyError):
                    del m[k]
        elif op == "pop":
            assert m.pop(k, None) == d.pop(k, None)
        elif op == "get":
            assert m.get(k) == d.get(k) and m.get(k, -1) == d.get(k, -1)
        else:
            assert (k in m) == (k in d)
        assert len(m) == len(d)
    assert sorted(m.items()) == sorted(d.items())
    assert sorted(m) == sorted(m.keys()) == sorted(d)
    assert sorted(m.values()) == sorted(d.values())
    assert all(m[k] == v for k, v in d.items())
    if kind == "U64Dict":  # a dict's order too
        assert m.items() == list(d.items()) and list(m) == list(d)
        assert m.oldest(3) == list(d.items())[:3] and m.oldest(0) == []


@settings(max_examples=200, deadline=None)
@given(
    rounds=st.lists(
        st.tuples(st.lists(st.integers(0, 2000), max_size=60), st.integers(0, 8), st.booleans()),
        max_size=40,
    )
)
@needs_c
def test_u64dict_keeps_lru_order_through_growth_and_squeezes(
    rounds: list[tuple[list[int], int, bool]],
) -> None:
    """The shard's use: re-stores move keys to the end, removals punch holes, eviction reads
    the front; the order must stay the dict's through every resize and squeeze."""
    m, d = C.U64Dict(), {}
    for keys, slot, remove in rounds:
        bit = 1 << slot
        if remove:
            assert C.and_bits(m, keys, ~bit) == fast.py_and_bits(d, keys, ~bit)
        else:
            assert C.or_bits(m, keys, bit, True) == fast.py_or_bits(d, keys, bit, True)
        assert m.items() == list(d.items())
        victims = m.oldest(5)
        assert victims == list(d.items())[:5]
        for k, _ in victims[:2]:
            del m[k]
            del d[k]
    assert m.items() == list(d.items())


@settings(max_examples=200, deadline=None)
@given(
    d=mask_dicts,
    steps=st.lists(
        st.tuples(
            st.sampled_from([0, 1]), st.sampled_from([0, 5, 62, 63, 64, 65, 130, 700]), key_lists
        ),
        max_size=12,
    ),
    kind=st.sampled_from(["U64Map", "U64Dict"]),
)
@needs_c
def test_apply_ops_at_every_slot_width(
    d: dict[int, int], steps: list[tuple[int, int, list[int]]], kind: str
) -> None:
    """A replica's ops OR a holder's bit in and clear it, whatever the slot (bits below 63, at
    63 and beyond a u64 are kept differently), as a dict does by definition."""
    t = getattr(C, kind)(d)
    want, holders = dict(d), set()
    ops = []
    for op, slot, keys in steps:
        ops.append((op, f"h{slot}", "GPU", array("Q", keys).tobytes(), 0.0))
        bit = 1 << slot
        for k in keys:
            if op == 0:
                want[k] = want.get(k, 0) | bit
            elif k in want and not (m := want[k] & ~bit):
                del want[k]
            elif k in want:
                want[k] = m
        holders |= {f"h{slot}"} if op == 0 else set()
    got_holders: set[str] = set()
    slots = {f"h{s}": s for s in (0, 5, 62, 63, 64, 65, 130, 700)}
    assert C.apply_ops(ops, 0, {"GPU": t}, slots, got_holders)[0] == len(ops)
    assert sorted(t.items()) == sorted(want.items())
    assert got_holders == holders


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["set", "set", "del", "pop", "get", "in"]),
            st.one_of(st.integers(0, 300), u64),
            st.one_of(u64, st.sampled_from([v for v in EDGES if v < 2**64])),
        ),
        max_size=300,
    ),
    xk=st.one_of(st.just(True), st.integers(1, 2**64 - 1)),
)
@needs_c
def test_u64_values_table_behaves_as_a_dict(steps: list[tuple[str, int, int]], xk: Any) -> None:
    """The engine map's table (u64 values kept in their slots) is a dict of u64 → u64: also
    when a value equals the word it is stored against (``u64_values=<int>`` sets that word; the
    table picks another and re-encodes what it holds)."""
    m, d = C.U64Map(u64_values=xk), {}
    if xk is not True:
        steps = [("set", 7, xk), *steps, ("set", 8, xk)]
    for op, k, v in steps:
        if op == "set":
            m[k] = d[k] = v
        elif op == "del" and k in d:
            del m[k], d[k]
        elif op == "pop":
            assert m.pop(k, None) == d.pop(k, None)
        elif op == "get":
            assert m.get(k) == d.get(k)
        else:
            assert (k in m) == (k in d)
    assert sorted(m.items()) == sorted(d.items()) and len(m) == len(d)
    assert m.boxed_bytes() == 0
    again = pickle.loads(pickle.dumps(m))
    assert sorted(again.items()) == sorted(d.items()) and again.boxed_bytes() == 0


@needs_c
def test_u64_values_table_takes_u64s_only_and_no_masks() -> None:
    m = C.U64Map({1: 2**64 - 1}, u64_values=True)
    for bad in (-1, 2**64, "x", 1.0):
        with pytest.raises((OverflowError, TypeError)):
            m[2] = bad
    assert m.items() == [(1, 2**64 - 1)]
    for call in (
        lambda: C.or_bits(m, [1], 1, False),
        lambda: C.and_bits(m, [1], ~1),
        lambda: C.clear_slots(m, 1),
        lambda: C.slot_keys(m, 1),
        lambda: m.pairs(1),
        lambda: C.apply_ops([(0, "a", "GPU", b"\0" * 8, 0.0)], 0, {"GPU": m}, {"a": 0}, set()),
    ):
        with pytest.raises(TypeError, match="u64 values"):
            call()
    assert m.items() == [(1, 2**64 - 1)]


@pytest.mark.parametrize("kind", ["U64Map", "U64Dict"])
@needs_c
def test_masks_and_request_keys_need_no_int_objects(kind: str) -> None:
    """Values below 2**63 and the bits of a few holders (5 at slots below 2,048, 2 at any slot
    below 2**29) are kept in the table's own slots; only other ints are held as objects
    (``boxed_bytes`` counts them)."""
    word = [0, 1, 2**62, 2**63 - 1] + [1 << s for s in range(0, 600, 7)]
    few = [k for k, v in enumerate(word) if v.bit_count() <= 2]  # a bit or two
    word += [2**63 + 1 + 2**9, 2**64 + 1 + 2**33, 2**200 + 2**3 + 2**40, 2**64 | 2 ** (1 << 19)]
    # more than 8 bits, negative, or a slot too wide for the set's share of the word
    objects = [2**64 - 1, 2**63 + 2**62 - 1, -1, -(2**70), sum(1 << s for s in range(64, 73))]
    objects += [1 | 2 | 2 ** (1 << 19)]
    m = getattr(C, kind)((k, v) for k, v in enumerate(word))
    assert m.boxed_bytes() == 0
    assert [m[k] for k in range(len(word))] == word
    for k, v in enumerate(objects, len(word)):
        m[k] = v
    assert m.boxed_bytes() == sum(sys.getsizeof(v) for v in objects)
    m2 = dict(m.items())
    high = [1 << s for s in range(500, 503)]
    for bit in high:  # up to 5 holders below slot 2,048: still in the word
        C.or_bits(m, few, bit, False)
    assert m.boxed_bytes() == sum(sys.getsizeof(v) for v in objects)
    assert all(m[k] == m2[k] | sum(high) for k in few)
    C.or_bits(m, few, 1 << 3000, False)  # one more, at a slot too wide for 5 or 6: objects
    assert m.boxed_bytes() > sum(sys.getsizeof(v) for v in objects)
    for bit in [*high, 1 << 3000]:  # back to what they were: in the word
        C.and_bits(m, few, ~bit)
    assert m.boxed_bytes() == sum(sys.getsizeof(v) for v in objects)
    assert all(m[k] == m2[k] for k in m2 if k)
    assert 0 not in m  # 0 | bit & ~bit: emptied, deleted


@pytest.mark.parametrize("kind", ["U64Map", "U64Dict"])
@needs_c
def test_tables_grow_shrink_and_keep_every_key(kind: str) -> None:
    import pickle
    import random
    import sys

    rng = random.Random(7)
    keys = [rng.randrange(2**64) for _ in range(50_000)] + list(range(1000))
    m, d = getattr(C, kind)(), {}
    for i, k in enumerate(keys):
        m[k] = d[k] = i
    assert len(m) == len(d) and all(m[k] == d[k] for k in keys[::97])
    assert sys.getsizeof(m) < sys.getsizeof(d)  # 16 B a slot, no key objects besides
    full = sys.getsizeof(m)
    for k in keys[: len(keys) - 100]:
        del m[k]
        del d[k]
    assert sys.getsizeof(m) < full / 8  # it shrank as it emptied
    assert sorted(m.items()) == sorted(d.items())
    if kind == "U64Dict":
        assert m.items() == list(d.items())
    assert dict(pickle.loads(pickle.dumps(m))) == d
    m.update({1: 2})
    m.update([(3, 4)])
    assert m[1] == 2 and m[3] == 4
    m.clear()
    assert len(m) == 0 and m.get(1) is None


@needs_c
def test_u64map_rejects_what_it_cannot_hold() -> None:
    m = C.U64Map()
    with pytest.raises(OverflowError):
        m[-1] = 1
    with pytest.raises(OverflowError):
        m[2**64] = 1
    with pytest.raises(TypeError):
        m["a"] = 1
    with pytest.raises(TypeError):
        m[1] = "not an int"
    with pytest.raises(TypeError):
        m[1] = True  # exactly int: no subclasses
    # Keys it cannot hold are simply absent, as in a dict.
    assert -1 not in m and "a" not in m and m.get(2**64, 5) == 5
    with pytest.raises(KeyError):
        m[(1, 2)]
    with pytest.raises(ValueError):  # as dict([(1, 2, 3)])
        C.U64Map([(1, 2, 3)])
    with pytest.raises(TypeError):
        C.or_bits(m, [1], "x", False)  # the mask must be an int
    with pytest.raises(TypeError):
        C.or_bits(C.U64Dict(), [1], "x", True)
    with pytest.raises(TypeError):
        C.U64Dict()[1] = 1.5


@needs_c
@pytest.mark.parametrize("table", ["U64Map", "U64Dict"])
def test_tables_hash_with_their_own_seed(table: str) -> None:
    """Two tables with the same keys lay them out differently: one filled from another's
    hash-ordered items (a snapshot's engine map) does not inherit its probe order, which made
    such a fill quadratic. Content and lookups are unaffected."""
    src = C.U64Map({k * 7919: k for k in range(1, 50_001)})
    a, b = getattr(C, table)(src.items()), getattr(C, table)(src.items())
    assert sorted(a.items()) == sorted(b.items()) == sorted(src.items())
    assert all(a[k] == b[k] == src[k] for k in (7919, 7919 * 25_000, 7919 * 50_000))
    if table == "U64Map":  # unordered: the layout is the iteration order
        assert list(a.keys()) != list(b.keys())
        assert list(a.keys()) != list(src.keys())
    else:  # ordered: insertion order, whatever the seed
        assert list(a.keys()) == list(b.keys()) == list(src.keys())
