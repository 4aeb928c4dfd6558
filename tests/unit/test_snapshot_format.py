"""The portable snapshot: version 2 packs keys as u64 bytes; version 1 (int arrays) still reads."""

from __future__ import annotations

import msgspec
import pytest

from kvray.core.index.budget import BudgetIndex
from kvray.core.index.memory import MemoryIndex
from kvray.core.snapshot import decode_snapshot, encode_snapshot, engine_pairs, holder_keys
from kvray.errors import MalformedFrame
from kvray.types import GPU, PodId, Tier

W = {"GPU": 1.0, "CPU": 0.5}
BIG = 2**64 - 1


def _filled() -> MemoryIndex:
    m = MemoryIndex()
    m.add_engine(PodId("a"), GPU, [1, 2, 3, BIG], [11, 12, 13, 14])
    m.add(PodId("b"), GPU, [1, 2])
    m.add(PodId("b"), Tier("CPU"), [3])
    return m


def test_v2_packs_keys_and_round_trips() -> None:
    src = _filled()
    data = src.snapshot()
    snap = decode_snapshot(data)
    assert snap.v == 2
    assert all(isinstance(ks, bytes) for tiers in snap.holders.values() for ks in tiers.values())
    assert isinstance(snap.engine_map, bytes)
    assert sorted((h, t, sorted(ks)) for h, t, ks in holder_keys(snap)) == [
        ("a", "GPU", [1, 2, 3, BIG]),
        ("b", "CPU", [3]),
        ("b", "GPU", [1, 2]),
    ]
    assert sorted(engine_pairs(snap)) == [(11, 1), (12, 2), (13, 3), (14, BIG)]
    for dst in (MemoryIndex(), BudgetIndex(2**30)):
        dst.restore(data)
        assert dst.score([1, 2, 3, BIG], W) == src.score([1, 2, 3, BIG], W)
        assert dst.get_engine_map([11, 14, 99]) == [1, BIG, None]


def test_version_1_documents_still_restore() -> None:
    v1 = msgspec.msgpack.encode(
        {"v": 1, "holders": {"a": {"GPU": [1, 2, BIG]}, "idle": {}}, "engine_map": [[7, 1]]}
    )
    dst = MemoryIndex()
    dst.restore(v1)
    assert dst.score([1, 2, BIG], W) == {PodId("a"): 3.0}
    assert dst.get_engine_map([7]) == [1]
    # and it writes version 2 back, with the same content
    again = MemoryIndex()
    again.restore(dst.snapshot())
    assert again.score([1, 2, BIG], W) == {PodId("a"): 3.0}


@pytest.mark.parametrize(
    "doc",
    [
        {"v": 2, "holders": {"a": {"GPU": b"\x01" * 12}}, "engine_map": b""},
        {"v": 2, "holders": {}, "engine_map": b"\x00" * 24},
        {"v": 3, "holders": {}, "engine_map": b""},
    ],
)
def test_malformed_packed_snapshots_are_refused(doc: dict[str, object]) -> None:
    m = _filled()
    with pytest.raises(MalformedFrame) as err:
        m.restore(msgspec.msgpack.encode(doc))
    assert err.value.reason == "snapshot"
    assert m.score([1, 2], W) == {PodId("a"): 2.0, PodId("b"): 2.0}  # left alone


def test_encoding_is_the_documented_layout() -> None:
    data = encode_snapshot({"p": {"GPU": [1, 2]}}, [(5, 6)])
    raw = msgspec.msgpack.decode(data)
    assert raw == {
        "v": 2,
        "holders": {"p": {"GPU": (1).to_bytes(8, "little") + (2).to_bytes(8, "little")}},
        "engine_map": (5).to_bytes(8, "little") + (6).to_bytes(8, "little"),
    }
