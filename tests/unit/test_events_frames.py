"""Every ZMQ message captured from real vLLM decodes to what its manifest says."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from kvray.core.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventDecoder,
    WireAllBlocksCleared,
    WireBlockRemoved,
    WireBlockStored,
    encode_batch,
)
from kvray.core.topics import REPLAY_END_SEQ, parse_frames, parse_topic

from ..conftest import FIXTURES

EVENTS = FIXTURES / "events"
LIVE = sorted(p for p in EVENTS.glob("*_[0-9][0-9][0-9].json") if "replay" not in p.name)
REPLAY = sorted(EVENTS.glob("*_replay_*.json"))
TYPES = {
    "BlockStored": BlockStored,
    "BlockRemoved": BlockRemoved,
    "AllBlocksCleared": AllBlocksCleared,
}


def _unhex(x: Any) -> Any:
    if isinstance(x, dict) and set(x) == {"bytes_hex"}:
        return bytes.fromhex(x["bytes_hex"])
    if isinstance(x, list):
        return [_unhex(v) for v in x]
    if isinstance(x, dict):
        return {k: _unhex(v) for k, v in x.items()}
    return x


def _check_batch(frames: list[bytes], decoded: list[Any], topic: str, seq: int) -> None:
    topic_s, seq_n, payload = parse_frames(frames)
    assert topic_s == topic
    assert seq_n == seq
    batch = EventDecoder().decode(payload)
    ts, events, dp = _unhex(decoded)
    assert batch.ts == ts
    assert batch.data_parallel_rank == dp
    assert len(batch.events) == len(events)
    for got, want in zip(batch.events, events, strict=True):
        assert isinstance(got, TYPES[want["type"]])
        for field, value in want.items():
            if field != "type" and field in got.__struct_fields__:
                assert getattr(got, field) == value, field


def test_all_fixtures_present() -> None:
    assert len(LIVE) == 10 and len(REPLAY) == 4


@pytest.mark.parametrize("path", LIVE, ids=lambda p: p.stem)
def test_live_frame(path: Any) -> None:
    msg = json.loads(path.read_text())
    frames = [bytes.fromhex(h) for h in msg["frames_hex"]]
    assert frames[2] == (EVENTS / f"{path.stem}.payload.msgpack").read_bytes()
    _check_batch(frames, msg["decoded"], msg["topic"], msg["seq"])


@pytest.mark.parametrize("path", REPLAY, ids=lambda p: p.stem)
def test_replay_reply(path: Any) -> None:
    msg = json.loads(path.read_text())
    raw = [bytes.fromhex(h) for h in msg["raw_frames_hex_as_received_by_dealer"]]
    assert raw[0] == b""
    if raw[2] == REPLAY_END_SEQ:
        assert raw[1] == b"" and raw[3] == b""
        return
    _check_batch(raw[1:], msg["decoded"], msg["topic"], msg["seq"])


@pytest.mark.parametrize("manifest", sorted(EVENTS.glob("*_manifest.json")), ids=lambda p: p.stem)
def test_manifest_batches_and_reencoding(manifest: Any) -> None:
    """Decoding then re-encoding with kvray's wire Structs gives vLLM's exact bytes."""
    doc = json.loads(manifest.read_text())
    dec = EventDecoder()
    wire = {"BlockStored": WireBlockStored, "BlockRemoved": WireBlockRemoved}
    for b in doc["batches"]:
        payload = bytes.fromhex(b["payload_hex"])
        batch = dec.decode(payload)
        ts, events, dp = msgspec.msgpack.decode(payload)
        assert batch.ts == ts and batch.data_parallel_rank == dp
        rebuilt: list[Any] = []
        for e in events:
            kind = e.pop("type")
            rebuilt.append(wire[kind](**e) if kind in wire else WireAllBlocksCleared())
        assert encode_batch(rebuilt, ts=ts, data_parallel_rank=dp) == payload


def test_topic_parsing() -> None:
    t = parse_topic("kv@10.0.0.7@meta-llama/Llama-3.1-8B")
    assert (t.pod, t.model) == ("10.0.0.7", "meta-llama/Llama-3.1-8B")
    assert parse_topic("kv@10.0.0.7:8000@org/m@v2").model == "org/m@v2"
    assert parse_topic("", default_pod="p", default_model="m").pod == "p"


def test_legacy_array_events_decode_to_the_same_content() -> None:
    stored = WireBlockStored([1, 2], None, list(range(32)), 16, None, None, None, [None, None])
    removed = WireBlockRemoved([2], "CPU")
    payload = encode_batch([stored, removed, WireAllBlocksCleared()], ts=1.5, legacy=True)
    batch = EventDecoder().decode(payload)
    assert [type(e).__mro__[1] for e in batch.events] == [
        BlockStored,
        BlockRemoved,
        AllBlocksCleared,
    ]
    assert batch.events[0].token_ids == list(range(32))
    assert batch.events[1].medium == "CPU"


def test_map_batch_and_unknown_fields() -> None:
    ev = {
        "type": "BlockStored",
        "block_hashes": [7],
        "parent_block_hash": None,
        "token_ids": list(range(16)),
        "block_size": 16,
        "brand_new_field": {"x": 1},
    }
    payload = msgspec.msgpack.encode({"ts": 2.0, "events": [ev], "data_parallel_rank": None})
    batch = EventDecoder().decode(payload)
    assert batch.events[0].block_hashes == [7]
    assert batch.data_parallel_rank is None
