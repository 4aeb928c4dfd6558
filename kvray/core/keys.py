"""Prompt → block keys, in both keying modes of spec §4, and vLLM's per-block extra keys.

* **Request keys** (kvray's default): ``r_i = xxh3_64(tokens_i ‖ extra_i, seed=r_{i-1})`` with
  ``r_{-1} = xxh3_64(model)``. Tokens are packed as little-endian u32, extras as msgpack of vLLM's
  UNTAGGED published form (``["sql-lora", "tenant-a"]``, ``[["img", 3]]``), so the same key is
  computed from a pod's ``BlockStored`` (which carries ``token_ids`` and ``extra_keys``) and from a
  prompt, whatever hash algorithm or seed the pod uses.
* **Engine keys**: the u64 a pod publishes (``hashing.BlockHasher``), XOR-ed with a per-model tag
  so that equal prompts for different models never share a key (vLLM's hash has no model).

Invariant: keys are u64 ints; a model's key space never overlaps another's except by 2^-64 luck.
"""

from __future__ import annotations

import functools
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import xxhash

from kvray.core.fast import chain_u32
from kvray.errors import MalformedFrame

_xxh64 = xxhash.xxh3_64_intdigest
_pack = msgspec.msgpack.Encoder().encode


@dataclass(slots=True, frozen=True)
class LoRA:
    """A LoRA adapter as vLLM hashes it: name (published) and path (only in the tagged hash)."""

    name: str
    path: str = ""


@dataclass(slots=True, frozen=True)
class MMFeature:
    """One multimodal item: its content identifier and token span in the prompt."""

    identifier: str
    offset: int
    length: int


@functools.lru_cache(maxsize=1024)
def model_root(model: str) -> int:
    """The chain seed of a model's request keys."""
    return _xxh64(model.encode("utf-8"))


@functools.lru_cache(maxsize=1024)
def model_tag(model: str) -> int:
    """The 64-bit tag XOR-ed into a model's engine keys (distinct from ``model_root``)."""
    return _xxh64(b"engine\x00" + model.encode("utf-8"))


def extra_keys(
    num_blocks: int,
    block_size: int,
    *,
    lora: LoRA | None = None,
    cache_salt: str | None = None,
    mm: Sequence[MMFeature] = (),
    prompt_embeds: Sequence[bytes] | None = None,
    form: str = "tagged",
) -> list[Any]:
    """vLLM's extra keys for each full block, in hash order (LoRA, multimodal, salt, embeds).

    Args:
        num_blocks: number of full blocks.
        block_size: tokens per block.
        lora: the adapter, on every block.
        cache_salt: on the first block only.
        mm: items overlapping a block contribute their offset relative to the block start
            (negative when the item began in an earlier block).
        prompt_embeds: one digest per block, when prompts are embeddings.
        form: ``"tagged"`` (vLLM ≥ 0.24 hash input: tuple of tagged tuples), ``"untagged"``
            (vLLM ≤ 0.23 hash input: tuple of bare values) or ``"event"`` (the lists vLLM
            ≥ 0.24 publishes in ``BlockStored.extra_keys``).

    Returns:
        one entry per block: ``None`` when the block has no extra keys.
    """
    if form not in ("tagged", "untagged", "event"):
        raise ValueError(f"unknown extra-key form {form!r}")
    tagged = form == "tagged"
    as_event = form == "event"
    out: list[Any] = []
    for b in range(num_blocks):
        start, end = b * block_size, (b + 1) * block_size
        keys: list[Any] = []
        if lora is not None:
            keys.append(("lora", lora.name, lora.path) if tagged else lora.name)
        for item in mm:
            if item.offset < end and start < item.offset + item.length:
                rel = item.offset - start
                if tagged:
                    keys.append(("mm", item.identifier, rel))
                else:
                    keys.append([item.identifier, rel] if as_event else (item.identifier, rel))
        if cache_salt is not None and b == 0:
            keys.append(("cache_salt", cache_salt) if tagged else cache_salt)
        if prompt_embeds is not None:
            keys.append(("prompt_embeds", prompt_embeds[b]) if tagged else prompt_embeds[b])
        if not keys:
            out.append(None)
        else:
            out.append(keys if as_event else tuple(keys))
    return out


def pack_tokens(tokens: Sequence[int]) -> bytes:
    """Tokens as little-endian u32 bytes; ``MalformedFrame`` for ids outside [0, 2^32)."""
    try:
        return array("I", tokens).tobytes()
    except (OverflowError, TypeError) as exc:
        raise MalformedFrame(f"token ids must be u32 ints: {exc}", reason="schema") from exc


def request_keys(
    tokens: Sequence[int] | bytes,
    block_size: int,
    parent: int,
    extras: Sequence[Any] | None = None,
) -> list[int]:
    """kvray request keys for every FULL block of ``tokens``.

    Args:
        tokens: token ids, or their ``pack_tokens`` bytes.
        block_size: tokens per block.
        parent: the key before ``tokens[0]``: ``model_root(model)`` at token 0.
        extras: per block, the untagged published extra keys (lists) or None.
    """
    data = tokens if isinstance(tokens, bytes) else pack_tokens(tokens)
    if not extras:
        return chain_u32(data, block_size, parent)  # type: ignore[no-any-return]
    step = 4 * block_size
    n = len(data) // step
    view = memoryview(data)
    out: list[int] = []
    append = out.append
    key = parent
    for i, off in enumerate(range(0, n * step, step)):
        extra = extras[i] if i < len(extras) else None
        chunk = (
            view[off : off + step]
            if extra is None
            else bytes(view[off : off + step]) + _pack(extra)
        )
        key = _xxh64(chunk, key)
        append(key)
    return out
