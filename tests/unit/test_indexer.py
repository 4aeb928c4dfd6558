"""kvray.Indexer end to end on captured vLLM frames and on events built by kvray's encoder."""

from __future__ import annotations

import json
from typing import Any

import pytest

import kvray
from kvray.core.events import WireAllBlocksCleared, WireBlockRemoved, WireBlockStored, encode_batch
from kvray.core.hashing import BlockHasher
from kvray.core.keys import LoRA, MMFeature, extra_keys
from kvray.errors import MalformedFrame

from ..conftest import FIXTURES

EV = FIXTURES / "events"
LLAMA = "meta-llama/Llama-3.1-8B"


def _frames(name: str) -> list[bytes]:
    return [bytes.fromhex(h) for h in json.loads((EV / f"{name}.json").read_text())["frames_hex"]]


def _stored(name: str, i: int = -1) -> Any:
    ev = [e for e in json.loads((EV / f"{name}.json").read_text())["decoded"][1]]
    return [e for e in ev if e["type"] == "BlockStored"][i]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_captured_stream_default_case() -> None:
    ix = kvray.Indexer()
    p0 = _stored("A_default_000")["token_ids"]
    ix.apply(_frames("A_default_000"))
    assert ix.score_tokens(p0, LLAMA) == {"10.0.0.7": 4.0}
    assert ix.score_tokens(p0 + [1, 2, 3], LLAMA) == {"10.0.0.7": 4.0}
    assert ix.score_tokens(p0[:15], LLAMA) == {}  # shorter than a block: no keys, no scores
    assert ix.score_tokens(p0, "other-model") == {}  # model is part of the key space
    ix.apply(_frames("A_default_001"))  # 2 blocks after a 2-block prefix hit
    p1 = p0[:32] + _stored("A_default_001")["token_ids"]
    assert ix.score_tokens(p1, LLAMA) == {"10.0.0.7": 4.0}
    ix.apply(_frames("A_default_002"))  # evicts p0's last blocks and p1's 4th
    assert ix.score_tokens(p0, LLAMA) == {"10.0.0.7": 2.0}
    assert ix.score_tokens(p1, LLAMA) == {"10.0.0.7": 3.0}
    ix.apply(_frames("A_default_003"))
    ix.apply(_frames("A_default_004"))  # AllBlocksCleared
    assert ix.score_tokens(p0, LLAMA) == {}
    assert ix.hash_contract()["10.0.0.7"]["status"] == "ok"
    assert ix.hash_contract()["10.0.0.7"]["checked"] == 12


def test_engine_mode_matches_request_mode_on_captured_frames() -> None:
    req, eng = kvray.Indexer(), kvray.Indexer(keys="engine")
    for i in range(4):
        req.apply(_frames(f"A_default_{i:03d}"))
        eng.apply(_frames(f"A_default_{i:03d}"))
    for name in ("A_default_000", "A_default_002", "A_default_003"):
        toks = _stored(name)["token_ids"]
        assert req.score_tokens(toks, LLAMA) == eng.score_tokens(toks, LLAMA)


def test_unknown_hash_settings_still_score_and_are_reported() -> None:
    """Pods using sha256_cbor + seed 0 + LoRA + salt: request keys work, the contract is loud."""
    ix = kvray.Indexer()
    ix.apply(_frames("B_lora_salt_cbor_seed0_000"))
    toks = _stored("B_lora_salt_cbor_seed0_000")["token_ids"]
    topic = json.loads((EV / "B_lora_salt_cbor_seed0_000.json").read_text())["topic"]
    pod, model = topic.split("@")[1], topic.split("@", 2)[2]
    assert ix.score_tokens(toks, model, lora="sql-lora", cache_salt="tenant-a") == {pod: 4.0}
    assert ix.score_tokens(toks, model, lora="sql-lora") == {}  # salt differs on block 0
    assert ix.score_tokens(toks, model) == {}
    # sha256 (the default) cannot reproduce these; with the LoRA path known it is checked.
    ix2 = kvray.Indexer(lora_paths={"sql-lora": "/adapters/sql-lora"})
    ix2.apply(_frames("B_lora_salt_cbor_seed0_000"))
    assert ix2.hash_contract(pod)[pod]["status"] == "mismatch"
    assert "sha256" in ix2.hash_contract(pod)[pod]["last_mismatch"]
    ix3 = kvray.Indexer(
        hash_algo="sha256_cbor", hash_seed="0", lora_paths={"sql-lora": "/adapters/sql-lora"}
    )
    ix3.apply(_frames("B_lora_salt_cbor_seed0_000"))
    assert ix3.hash_contract(pod)[pod] | {"checked": 4} == {
        "status": "ok",
        "checked": 4,
        "mismatched": 0,
        "block_size_mismatch": 0,
        "last_mismatch": "",
    }
    eng = kvray.Indexer(
        keys="engine",
        hash_algo="sha256_cbor",
        hash_seed="0",
        lora_paths={"sql-lora": "/adapters/sql-lora"},
    )
    eng.apply(_frames("B_lora_salt_cbor_seed0_000"))
    assert eng.score_tokens(toks, model, lora="sql-lora", cache_salt="tenant-a") == {pod: 4.0}


def test_bytes_hashes_block_size_64() -> None:
    ix = kvray.Indexer(block_size=64)
    ix.apply(_frames("C_bytes_hashes_bs64_000"))
    toks = _stored("C_bytes_hashes_bs64_000")["token_ids"]
    (pod_model,) = [json.loads((EV / "C_bytes_hashes_bs64_000.json").read_text())["topic"]]
    model = pod_model.split("@", 2)[2]
    assert list(ix.score_tokens(toks, model).values()) == [3.0]
    assert ix.hash_contract()[pod_model.split("@")[1]]["status"] == "ok"
    ix16 = kvray.Indexer()
    ix16.apply(_frames("C_bytes_hashes_bs64_000"))
    assert ix16.hash_contract()[pod_model.split("@")[1]]["block_size_mismatch"] == 1


def test_dp_rank_and_empty_topic() -> None:
    with pytest.raises(MalformedFrame, match="empty topic"):
        kvray.Indexer().apply(_frames("D_dp1_empty_topic_000"))
    ix = kvray.Indexer(default_pod="10.0.0.9", default_model="m")
    ix.apply(_frames("D_dp1_empty_topic_000"))
    toks = _stored("D_dp1_empty_topic_000")["token_ids"]
    assert ix.score_tokens(toks, "m") == {"10.0.0.9#dp1": 2.0}
    ix.apply(_frames("D_dp1_empty_topic_001"))
    assert ix.score_tokens(toks, "m") == {}


def test_multimodal_blocks() -> None:
    ix = kvray.Indexer()
    ix.apply(_frames("E_mm_image_000"))
    toks = _stored("E_mm_image_000")["token_ids"]
    topic = json.loads((EV / "E_mm_image_000.json").read_text())["topic"]
    pod, model = topic.split("@")[1], topic.split("@", 2)[2]
    img = [MMFeature("img-abc123", 3, 20)]
    assert ix.score_tokens(toks, model, mm=img) == {pod: 2.0}
    assert ix.score_tokens(toks, model, mm=[MMFeature("img-other", 3, 20)]) == {}
    assert ix.hash_contract()[pod]["status"] == "ok"


def _msg(pod: str, seq: int, events: list[Any], dp: int = 0) -> list[bytes]:
    return [
        f"kv@{pod}@m".encode(),
        seq.to_bytes(8, "big"),
        encode_batch(events, ts=0.0, data_parallel_rank=dp),
    ]


def _store(
    tokens: list[int], parent: int | None = None, medium: str | None = None
) -> WireBlockStored:
    hashes = BlockHasher().event_keys(tokens)
    return WireBlockStored(hashes, parent, tokens, 16, None, medium, None)


def test_restart_clears_and_gap_is_counted() -> None:
    ix = kvray.Indexer()
    toks = list(range(64))
    ix.apply(_msg("p", 0, [_store(toks)]))
    ix.apply(_msg("p", 3, [_store(list(range(100, 132)))]))
    assert ix.counters.seq_gaps == 1 and ix.counters.seq_lost == 2
    assert ix.score_tokens(toks, "m") == {"p": 4.0}
    ix.apply(_msg("p", 0, [_store(toks[:16])]))  # seq back to 0: the pod restarted
    assert ix.counters.restarts == 1
    assert ix.score_tokens(toks, "m") == {"p": 1.0}


def test_unknown_parent_is_rejected_not_guessed() -> None:
    ix = kvray.Indexer()
    res = ix.apply(_msg("p", 0, [_store(list(range(32)), parent=12345)]))
    assert res.rejected == {"unknown_parent": 2}
    assert ix.pods() == [] or ix.score_tokens(list(range(32)), "m") == {}


def test_tiers_and_removal_by_medium() -> None:
    ix = kvray.Indexer()
    toks = list(range(48))
    ix.apply(_msg("p", 0, [_store(toks, medium="CPU"), _store(toks[:16])]))
    assert ix.score_tokens(toks, "m") == pytest.approx({"p": 1.0 + 0.8 + 0.8})
    hashes = BlockHasher().event_keys(toks)
    ix.apply(_msg("p", 1, [WireBlockRemoved(hashes[2:], "CPU")]))
    assert ix.score_tokens(toks, "m") == pytest.approx({"p": 1.8})
    ix.apply(_msg("p", 2, [WireAllBlocksCleared()]))
    assert ix.score_tokens(toks, "m") == {}


def test_speculative_entries_expire_with_injected_clock() -> None:
    clock = Clock()
    ix = kvray.Indexer(clock=clock, speculative_ttl_s=2.0)
    toks = list(range(64))
    ix.record_route("p", "m", toks)
    assert ix.score_tokens(toks, "m") == {"p": 4.0}
    ix.apply(_msg("p", 0, [_store(toks[:32])]))  # real events arrive for 2 blocks
    clock.t += 2.5
    assert ix.score_tokens(toks, "m") == {"p": 2.0}


def test_the_pods_events_supersede_speculative_entries() -> None:
    """A stored block confirms a speculative entry (the real tier holds it); a removed one
    refutes it at once instead of scoring for the rest of the TTL."""
    clock = Clock()
    ix = kvray.Indexer(clock=clock, speculative_ttl_s=60.0)
    toks = list(range(64))
    hashes = BlockHasher().event_keys(toks)
    ix.record_route("p", "m", toks)
    ix.apply(_msg("p", 0, [_store(toks[:32])]))  # the request ran: 2 blocks stored (new)
    assert ix.score_tokens(toks, "m") == {"p": 4.0}  # 2 real + 2 still speculative
    ix.apply(_msg("p", 1, [WireBlockRemoved(hashes[1:2], "GPU")]))  # block 1 evicted
    assert ix.score_tokens(toks, "m") == {"p": 1.0}
    ix.record_route("q", "m", toks)
    ix.apply(_msg("q", 0, [WireBlockRemoved(hashes[:1], "GPU")]))  # q no longer has block 0
    assert ix.score_tokens(toks, "m") == {"p": 1.0}
    # Recorded again: a fresh entry, no longer settled.
    ix.record_route("q", "m", toks)
    assert ix.score_tokens(toks, "m")["q"] == 4.0


def test_silent_pods_are_dropped() -> None:
    clock = Clock()
    ix = kvray.Indexer(clock=clock, pod_ttl_s=30.0)
    ix.apply(_msg("old", 0, [_store(list(range(16)))]))
    clock.t += 20
    ix.apply(_msg("new", 0, [_store(list(range(16)))]))
    clock.t += 15
    assert ix.drop_silent() == ["old"]
    assert ix.score_tokens(list(range(16)), "m") == {"new": 1.0}


def test_malformed_frames_are_counted_and_change_nothing() -> None:
    ix = kvray.Indexer()
    ix.apply(_msg("p", 0, [_store(list(range(16)))]))
    for bad in ([b"kv@p@m", b"\x00" * 8], [b"kv@p@m", (1).to_bytes(8, "big"), b"\x93\xc1"]):
        with pytest.raises(MalformedFrame):
            ix.apply(bad)
    assert ix.counters.malformed == {"frames": 1, "msgpack": 1}
    assert ix.score_tokens(list(range(16)), "m") == {"p": 1.0}


def test_extra_key_forms_agree_between_prompt_and_events() -> None:
    ek = extra_keys(2, 16, lora=LoRA("a"), cache_salt="s", form="event")
    assert ek == [["a", "s"], ["a"]]


def test_runs_of_removals_keep_event_order_semantics() -> None:
    ix = kvray.Indexer()
    a, b = list(range(16)), list(range(16, 32))
    ha, hb = BlockHasher().event_keys(a)[0], BlockHasher().event_keys(b)[0]
    ix.apply(_msg("p", 0, [_store(a), _store(b), _store(a, medium="CPU")]))
    # remove a (GPU), remove b (GPU), remove a (CPU), then store b again: b stays, a is gone
    ix.apply(
        _msg(
            "p",
            1,
            [
                WireBlockRemoved([ha], "GPU"),
                WireBlockRemoved([hb], "GPU"),
                WireBlockRemoved([ha], "CPU"),
                _store(b),
            ],
        )
    )
    assert ix.score_tokens(a, "m") == {}
    assert ix.score_tokens(b, "m") == {"p": 1.0}
    assert ix.counters.applied.removed_blocks == 3
