"""One real vLLM pod's prefix cache, driven the way vLLM's scheduler drives it (test helper).

``VllmPod`` wraps vLLM's own ``KVCacheManager`` (v1 engine core: ``BlockPool`` with KV cache
events on, one full-attention KV cache group) and serves requests one at a time, each to
completion as a ``max_tokens=1`` request is: ``get_computed_blocks`` (the prefix-cache lookup,
capped at ``num_tokens - 1``), ``allocate_slots`` for the whole prompt (evicts, then caches the
full blocks), ``free`` (blocks go back to the free queue tail first), then ``take_events``.

Block hashes come from vLLM's own request block hasher and ``hash_block_tokens`` (SHA-256 with
the default pickle serialisation unless told otherwise), so they are the digests a real pod
publishes. Importing this module needs vLLM (and torch); tests import it behind
``pytest.importorskip("vllm")``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVCacheEvent
from vllm.lora.request import LoRARequest
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.request import Request


@dataclass(slots=True)
class VllmServe:
    """What one request did on the real cache manager."""

    prompt_tokens: int
    hit_blocks: int
    """Leading blocks served from the prefix cache, as vLLM counts them (``num_computed``)."""
    events: list[KVCacheEvent] = field(default_factory=list)
    """This request's ``BlockStored``/``BlockRemoved`` events, in emission order."""

    @property
    def removed(self) -> list[int]:
        return [h for e in self.events if isinstance(e, BlockRemoved) for h in e.block_hashes]

    @property
    def stored(self) -> list[int]:
        return [h for e in self.events if isinstance(e, BlockStored) for h in e.block_hashes]


class VllmPod:
    """A real vLLM ``KVCacheManager`` as one pod (serial requests, no connector, no spec decode).

    Args:
        num_blocks: the pool size, vLLM's ``num_gpu_blocks`` (block 0 is the null block, so
            ``num_blocks - 1`` blocks hold KV).
        block_size: tokens per block (``--block-size``; also the hash block size).
        hash_algo: ``--prefix-caching-hash-algo``.
        max_model_len: longest prompt accepted.
    """

    def __init__(
        self,
        num_blocks: int,
        *,
        block_size: int = 16,
        hash_algo: str = "sha256",
        max_model_len: int = 1 << 20,
    ) -> None:
        hash_fn = get_hash_fn_by_name(hash_algo)
        init_none_hash(hash_fn)  # process-global in vLLM; sha256 → H("vllm-none-hash")
        self.block_size = block_size
        self._block_hasher = get_request_block_hasher(block_size, hash_fn)
        spec = FullAttentionSpec(
            block_size=block_size, num_kv_heads=1, head_size=1, dtype=torch.float16
        )
        config = KVCacheConfig(
            num_blocks=num_blocks,
            kv_cache_tensors=[],
            kv_cache_groups=[KVCacheGroupSpec(["model.layers.0.self_attn"], spec)],
        )
        self.manager = KVCacheManager(
            config,
            max_model_len=max_model_len,
            scheduler_block_size=block_size,
            hash_block_size=block_size,
            enable_caching=True,
            enable_kv_cache_events=True,
        )
        self._ids = itertools.count()
        self._lora_ids: dict[tuple[str, str], int] = {}

    def _lora(self, lora: Any) -> LoRARequest | None:
        if lora is None:
            return None
        key = (lora.name, lora.path)
        lora_id = self._lora_ids.setdefault(key, len(self._lora_ids) + 1)
        return LoRARequest(lora.name, lora_id, lora.path)

    def request(self, tokens: Sequence[int], lora: Any = None) -> Request:
        """A vLLM ``Request`` for ``tokens`` (block hashes computed by vLLM's hasher)."""
        return Request(
            request_id=f"req-{next(self._ids)}",
            prompt_token_ids=list(tokens),
            sampling_params=SamplingParams(max_tokens=1),
            pooling_params=None,
            lora_request=self._lora(lora),
            block_hasher=self._block_hasher,
        )

    def serve(self, tokens: Sequence[int], lora: Any = None) -> VllmServe:
        """Prefill ``tokens`` to completion, free the request, return hits and events.

        Args:
            tokens: the prompt (at least one token).
            lora: a ``kvray.core.keys.LoRA`` (anything with ``name`` and ``path``), or None.

        Raises:
            RuntimeError: the prompt needs more blocks than the pool has (vLLM would leave it
                waiting forever).
        """
        req = self.request(tokens, lora)
        mgr = self.manager
        computed, num_computed, _ = mgr.get_computed_blocks(req)
        new = mgr.allocate_slots(
            req,
            req.num_tokens - num_computed,
            num_new_computed_tokens=num_computed,
            new_computed_blocks=computed,
        )
        if new is None:
            raise RuntimeError(f"{len(tokens)} tokens do not fit the pool")
        req.num_computed_tokens = req.num_tokens
        mgr.free(req)
        return VllmServe(len(tokens), num_computed // self.block_size, mgr.take_events())

    def cached_keys(self) -> set[int]:
        """Event keys (u64) of every block hash in the prefix cache now."""
        pool = self.manager.block_pool
        return {
            int.from_bytes(bytes(key)[:-4], "big") & ((1 << 64) - 1)
            for key in pool.cached_block_hash_to_block._cache
        }

    def cached_copies(self) -> int:
        """Physical blocks holding a cached hash (vLLM does not de-duplicate)."""
        pool = self.manager.block_pool
        return sum(b.block_hash is not None for b in pool.blocks)
