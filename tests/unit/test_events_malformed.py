"""Hostile bytes raise MalformedFrame with a reason and a message; nothing else escapes."""

from __future__ import annotations

import contextlib
import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvray.core.events import DecodeLimits, EventDecoder
from kvray.core.topics import parse_frames, parse_topic
from kvray.errors import MalformedFrame

from ..conftest import FIXTURES

GOOD = bytes.fromhex(
    json.loads((FIXTURES / "events" / "A_default_000.json").read_text())["frames_hex"][2]
)
SEQ0 = (0).to_bytes(8, "big")


def _ev(**kw: object) -> bytes:
    base = {
        "type": "BlockStored",
        "block_hashes": [1],
        "parent_block_hash": None,
        "token_ids": list(range(16)),
        "block_size": 16,
    }
    base.update(kw)
    return msgspec.msgpack.encode([1.0, [base], 0])


@pytest.mark.parametrize(
    ("payload", "reason", "words"),
    [
        (GOOD[: len(GOOD) // 2], "msgpack", "invalid msgpack"),
        (b"", "msgpack", "empty"),
        (b"\xc1", "msgpack", "not a msgpack array"),
        (msgspec.msgpack.encode([1.0, [{"type": "Bogus"}], 0]), "schema", "Bogus"),
        (_ev(block_hashes="nope"), "schema", "block_hashes"),
        (_ev(block_size=0), "schema", "block_size"),
        (_ev(token_ids=list(range(15))), "token_count", "15 token_ids"),
        (_ev(block_hashes=[-1]), "schema", "not a vLLM event batch"),
        (_ev(extra_keys=[None, None]), "schema", "extra_keys"),
        (msgspec.msgpack.encode(["ts", [], 0]), "schema", "ts"),
        (msgspec.msgpack.encode(42), "msgpack", "not a msgpack array"),
    ],
)
def test_bad_payloads(payload: bytes, reason: str, words: str) -> None:
    with pytest.raises(MalformedFrame, match=words) as info:
        EventDecoder().decode(payload)
    assert info.value.reason == reason


def test_size_limits() -> None:
    dec = EventDecoder(DecodeLimits(max_payload_bytes=100, max_events=2, max_blocks_per_event=3))
    with pytest.raises(MalformedFrame, match="exceeds 100") as info:
        dec.decode(GOOD)
    assert info.value.reason == "size"
    many = msgspec.msgpack.encode([1.0, [{"type": "AllBlocksCleared"}] * 3, 0])
    with pytest.raises(MalformedFrame, match="3 events"):
        dec.decode(many)
    big = _ev(block_hashes=[1, 2, 3, 4], token_ids=list(range(64)))
    with pytest.raises(MalformedFrame, match="4 blocks"):
        EventDecoder(DecodeLimits(max_blocks_per_event=3)).decode(big)


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([b"kv@p@m", SEQ0], "frames"),
        ([b"kv@p@m", SEQ0, GOOD, b""], "frames"),
        ([b"\xff\xfe", SEQ0, GOOD], "topic"),
        ([b"kv@p@m", b"\x00", GOOD], "seq"),
        ("not frames", "frames"),
        ([b"kv@p@m", SEQ0, 5], "frames"),
    ],
)
def test_bad_frames(frames: object, reason: str) -> None:
    with pytest.raises(MalformedFrame) as info:
        parse_frames(frames)  # type: ignore[arg-type]
    assert info.value.reason == reason


@pytest.mark.parametrize("topic", ["kv@only", "xx@p@m", "kv@@m", "kv@p@", "", "plain"])
def test_bad_topics(topic: str) -> None:
    with pytest.raises(MalformedFrame, match="topic") as info:
        parse_topic(topic)
    assert info.value.reason == "topic"


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_escape(data: bytes) -> None:
    with contextlib.suppress(MalformedFrame):
        EventDecoder().decode(data)


@settings(max_examples=400, deadline=None)
@given(st.integers(0, len(GOOD) - 1), st.integers(0, 255))
def test_mutated_real_frame_never_escapes(pos: int, byte: int) -> None:
    data = bytearray(GOOD)
    data[pos] = byte
    with contextlib.suppress(MalformedFrame):
        EventDecoder().decode(bytes(data))
