"""A simulated vLLM pod: a finite prefix cache with LRU eviction that emits vLLM's events.

For each request, ``serve(tokens)`` hashes the prompt's full blocks with vLLM's algorithm, counts
the leading blocks already cached (what vLLM reports as ``cached_tokens``), touches them, stores the
new blocks (evicting least recently used ones when full: one ``BlockRemoved`` per block, as vLLM
does) and publishes the step's events as one batch: removals first, then one ``BlockStored`` whose
``parent_block_hash`` is the block before the first new one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from kvray.core.events import WireAllBlocksCleared, WireBlockRemoved, WireBlockStored, WireEvent
from kvray.core.hashing import BlockHasher, event_key
from kvray.core.keys import LoRA, extra_keys
from kvray.sim.publisher import SimPublisher


@dataclass(slots=True)
class ServeResult:
    """What one request did on the pod."""

    prompt_tokens: int
    cached_tokens: int
    """Tokens served from the prefix cache (leading full blocks already cached)."""
    new_blocks: int
    evicted_blocks: int


class SimPod:
    """One simulated vLLM engine.

    Args:
        pod_id: the pod id (part of the topic).
        model: served model name.
        num_blocks: cache capacity in blocks.
        hasher: algorithm, seed and block size the pod hashes with.
        publisher: where events go (None: no events, e.g. an oracle's mirror).
    """

    def __init__(
        self,
        pod_id: str,
        model: str,
        *,
        num_blocks: int = 4096,
        hasher: BlockHasher | None = None,
        publisher: SimPublisher | None = None,
        medium: str = "GPU",
    ) -> None:
        self.pod_id = pod_id
        self.model = model
        self.num_blocks = num_blocks
        self.hasher = hasher or BlockHasher()
        self.block_size = self.hasher.block_size
        self.publisher = publisher
        self.medium = medium
        self._cache: OrderedDict[int, None] = OrderedDict()  # u64 event key → LRU order

    def serve(self, tokens: Sequence[int], *, lora: LoRA | None = None) -> ServeResult:
        """Run one request's prefill through the cache; publish its events."""
        n = len(tokens) // self.block_size
        tagged = extra_keys(n, self.block_size, lora=lora) if lora else None
        keys = [event_key(d) for d in self.hasher.hashes(tokens, tagged)]
        hit = 0
        for k in keys:
            if k not in self._cache:
                break
            self._cache.move_to_end(k)
            hit += 1
        new = keys[hit:]
        events: list[WireEvent] = []
        removed: list[int] = []
        protect = set(keys)
        while new and len(self._cache) + len(new) > self.num_blocks:
            victim = next((k for k in self._cache if k not in protect), None)
            if victim is None:
                new = new[: max(0, self.num_blocks - len(self._cache))]
                break
            del self._cache[victim]
            removed.append(victim)
            events.append(WireBlockRemoved([victim], self.medium, group_idx=0))
        for k in new:
            self._cache[k] = None
        if new:
            start = hit * self.block_size
            ek = (
                extra_keys(n, self.block_size, lora=lora, form="event")[hit : hit + len(new)]
                if lora
                else [None] * len(new)
            )
            events.append(
                WireBlockStored(
                    block_hashes=list(new),
                    parent_block_hash=keys[hit - 1] if hit else None,
                    token_ids=list(tokens[start : start + len(new) * self.block_size]),
                    block_size=self.block_size,
                    lora_id=None,
                    medium=self.medium,
                    lora_name=lora.name if lora else None,
                    extra_keys=ek,
                    group_idx=0,
                    kv_cache_spec_kind="full_attention",
                )
            )
        if events and self.publisher is not None:
            self.publisher.publish(events)
        return ServeResult(len(tokens), hit * self.block_size, len(new), len(removed))

    def reset(self) -> None:
        """``reset_prefix_cache``: drop everything, publish ``AllBlocksCleared``."""
        self._cache.clear()
        if self.publisher is not None:
            self.publisher.publish([WireAllBlocksCleared()])

    def cached_prefix_blocks(self, tokens: Sequence[int], lora: LoRA | None = None) -> int:
        """Leading blocks of ``tokens`` in the cache now (ground truth; no side effects)."""
        n = len(tokens) // self.block_size
        tagged = extra_keys(n, self.block_size, lora=lora) if lora else None
        hit = 0
        for d in self.hasher.hashes(tokens, tagged):
            if event_key(d) not in self._cache:
                break
            hit += 1
        return hit

    @property
    def cached_blocks(self) -> int:
        return len(self._cache)
