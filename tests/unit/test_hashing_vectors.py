"""Every hash vector real vLLM 0.33 produced, reproduced byte for byte."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kvray.core.hashing import BlockHasher, coarsen, event_key, hash_block, none_hash, serialize
from kvray.core.keys import LoRA, MMFeature, extra_keys
from kvray.errors import ConfigError

from ..conftest import FIXTURES

DATA = json.loads((FIXTURES / "block_hashes.json").read_text())


def _tuplify(x: Any) -> Any:
    if isinstance(x, list):
        return tuple(_tuplify(v) for v in x)
    return x


def _cases(kind: str) -> list[Any]:
    out = []
    for run in DATA["runs"]:
        for algo, spec in run["algos"].items():
            for case in spec.get(kind, []):
                out.append(pytest.param(run["pythonhashseed"], algo, spec, case, id=case["id"]))
    return out


def _algos() -> list[Any]:
    return [
        pytest.param(run["pythonhashseed"], algo, spec, id=f"{algo}/seed={run['pythonhashseed']}")
        for run in DATA["runs"]
        for algo, spec in run["algos"].items()
    ]


def test_vectors_cover_every_algorithm() -> None:
    assert len(_cases("request_cases")) + len(_cases("direct_cases")) >= 300
    seen = {algo for run in DATA["runs"] for algo, s in run["algos"].items() if s["request_cases"]}
    assert seen == {"sha256", "sha256_cbor", "xxhash", "xxhash_cbor"}


@pytest.mark.parametrize(("seed", "algo", "spec"), _algos())
def test_none_hash(seed: str | None, algo: str, spec: dict[str, Any]) -> None:
    if not spec["reproducible"]:
        with pytest.raises(ConfigError, match="random NONE_HASH"):
            none_hash(algo, seed)
        return
    assert none_hash(algo, seed).hex() == spec["none_hash_hex"]
    assert event_key(none_hash(algo, seed)) == spec["none_hash_u64"]


@pytest.mark.parametrize(("seed", "algo", "spec", "case"), _cases("request_cases"))
def test_request_case(
    seed: str | None, algo: str, spec: dict[str, Any], case: dict[str, Any]
) -> None:
    hasher = BlockHasher(algo, seed, case["block_size"])  # type: ignore[arg-type]
    n = case["num_full_blocks"]
    lora = LoRA(case["lora"]["name"], case["lora"]["path"]) if case["lora"] else None
    mm = [MMFeature(f["identifier"], f["offset"], f["length"]) for f in case["mm_features"] or []]
    tagged = extra_keys(
        n, case["block_size"], lora=lora, cache_salt=case["cache_salt"], mm=mm, form="tagged"
    )
    assert [list(map(list, e)) if e else None for e in tagged] == case["extra_keys_per_block"]
    event_form = extra_keys(
        n, case["block_size"], lora=lora, cache_salt=case["cache_salt"], mm=mm, form="event"
    )
    if case["event_extra_keys"] is not None:
        assert event_form == case["event_extra_keys"]
    has_extra = any(e is not None for e in tagged)
    digests = hasher.hashes(case["token_ids"], tagged if has_extra else None)
    assert [d.hex() for d in digests] == case["block_hashes_hex"]
    assert (
        hasher.event_keys(case["token_ids"], tagged if has_extra else None)
        == case["block_hashes_u64"]
    )
    assert len(digests) == case["num_tokens"] // case["block_size"]


@pytest.mark.parametrize(("seed", "algo", "spec", "case"), _cases("direct_cases"))
def test_direct_case_bytes(
    seed: str | None, algo: str, spec: dict[str, Any], case: dict[str, Any]
) -> None:
    parent = bytes.fromhex(case["parent_block_hash_hex"]) if case["parent_block_hash_hex"] else None
    if case["parent_block_hash_hex"] == "":
        parent = b""
    extra = _tuplify(case["extra_keys"])
    none = none_hash(algo, seed)
    payload = ((parent or none), tuple(case["token_ids"]), extra)
    assert serialize(algo, payload).hex() == case["serialized_payload"]["hex"]
    digest = hash_block(algo, parent, case["token_ids"], extra, none)
    assert digest.hex() == case["block_hash_hex"]
    assert event_key(digest) == case["block_hash_u64"]


@pytest.mark.parametrize(
    ("seed", "algo", "spec"), [p for p in _algos() if p.values[2].get("block_size_view_case")]
)
def test_block_size_view(seed: str | None, algo: str, spec: dict[str, Any]) -> None:
    case = spec["block_size_view_case"]
    fine = BlockHasher(algo, seed, case["hash_block_size"])  # type: ignore[arg-type]
    digests = fine.hashes(case["token_ids"])
    assert [d.hex() for d in digests] == case["hashes16_hex"]
    ratio = case["target_block_size"] // case["hash_block_size"]
    assert [d.hex() for d in coarsen(digests, ratio)] == case["view64_hex"]


def test_untagged_legacy_form_differs_only_with_extras() -> None:
    hasher = BlockHasher("sha256", None, 16)
    tokens = list(range(32))
    tagged = extra_keys(2, 16, lora=LoRA("a", "/p"), form="tagged")
    untagged = extra_keys(2, 16, lora=LoRA("a", "/p"), form="untagged")
    assert untagged == [("a",), ("a",)]
    assert hasher.hashes(tokens, tagged) != hasher.hashes(tokens, untagged)
    assert hasher.hashes(tokens, None) == hasher.hashes(tokens, [None, None])


def test_bad_algorithm_and_block_size() -> None:
    with pytest.raises(ConfigError, match="unknown hash algorithm"):
        BlockHasher("md5", None, 16)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="block_size"):
        BlockHasher("sha256", None, 0)
