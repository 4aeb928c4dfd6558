"""A simulated vLLM pod: vLLM's prefix cache (block pool and free queue) emitting vLLM's events.

``serve(tokens)`` runs one request to completion the way vLLM's v1 scheduler and
``KVCacheManager`` do for a request that generates one token, and publishes the step's events.
The model is block-exact against vLLM 0.33.0 for requests served one at a time (checked by
``tests/integration/test_sim_vs_vllm.py`` against the real ``KVCacheManager``):

* **Pool.** ``num_blocks`` is vLLM's ``num_gpu_blocks``. Block 0 is vLLM's null block, so
  ``num_blocks - 1`` blocks hold KV. A running request holds ``ceil(len(tokens) / block_size)``
  blocks: its full blocks and the partial tail, which is never cached.
* **Lookup.** The hit is the run of leading full blocks whose hash is cached, capped at
  ``(len(tokens) - 1) // block_size`` blocks: vLLM recomputes at least the last token, so a
  block-aligned prompt that is fully cached hits one block less and recomputes its last block.
* **Eviction.** Free blocks wait in one queue; new blocks are taken from its front, and taking
  a cached block evicts it (one ``BlockRemoved`` each, in that order). Hit blocks leave the
  queue while the request runs. When the request finishes its blocks go back in REVERSE order:
  cached ones to the back of the queue (so a chain's tail is evicted before its root), the
  uncached partial tail to the front (reused first).
* **No de-duplication.** Recomputing the last block of a fully cached prompt stores a second
  block under the same hash (and publishes ``BlockStored`` for it again). The hash stays cached
  until its last copy is evicted, but each copy's eviction publishes a ``BlockRemoved``: an index
  fed these events may drop a hash the pod still serves, as with a real vLLM pod.
* **Events.** One batch per request: the ``BlockRemoved`` events, then one ``BlockStored`` for
  the newly cached full blocks whose ``parent_block_hash`` is the block before the first one.

Not modelled: concurrent requests (blocks shared while running), chunked prefill (vLLM publishes
one batch per scheduler step, so a long prompt's removals and stores may be split over several
batches), caching of generated tokens, and ``BlockStored.lora_id`` (vLLM's integer adapter id;
a ``LoRA`` here has none, so it is published as None). A prompt longer than the pool (vLLM
cannot schedule it) is served as its first ``(num_blocks - 1) * block_size`` tokens.
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
    """Tokens served from the prefix cache, as vLLM reports them: leading cached full blocks,
    at most ``(prompt_tokens - 1) // block_size`` of them."""
    new_blocks: int
    """Full blocks cached by this request (one ``BlockStored`` hash each)."""
    evicted_blocks: int
    """Cached blocks evicted to make room (one ``BlockRemoved`` each)."""


class SimPod:
    """One simulated vLLM engine (see the module docstring for the exact cache model).

    Args:
        pod_id: the pod id (part of the topic).
        model: served model name.
        num_blocks: KV cache pool size in blocks, as vLLM's ``num_gpu_blocks`` (includes the
            null block: ``num_blocks - 1`` blocks hold KV). At least 2.
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
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is the null block): {num_blocks}")
        self.pod_id = pod_id
        self.model = model
        self.num_blocks = num_blocks
        self.hasher = hasher or BlockHasher()
        self.block_size = self.hasher.block_size
        self.publisher = publisher
        self.medium = medium
        # vLLM's free queue of block ids (front = reused next); blocks 1.. (0 is the null block).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self._key_of: dict[int, int] = {}  # block id -> the hash (u64 event key) it caches
        self._blocks_of: dict[int, dict[int, None]] = {}  # hash -> its blocks, oldest first

    @property
    def capacity(self) -> int:
        """Blocks that hold KV: ``num_blocks - 1``."""
        return self.num_blocks - 1

    def serve(self, tokens: Sequence[int], *, lora: LoRA | None = None) -> ServeResult:
        """Run one request (prefill, one token, finish) through the cache; publish its events."""
        bs = self.block_size
        prompt_tokens = len(tokens)
        if len(tokens) > self.capacity * bs:
            tokens = tokens[: self.capacity * bs]  # vLLM could never schedule it
        if not tokens:
            return ServeResult(prompt_tokens, 0, 0, 0)
        n = len(tokens) // bs
        tagged = extra_keys(n, bs, lora=lora) if lora else None
        keys = [event_key(d) for d in self.hasher.hashes(tokens, tagged)]
        # Lookup, capped so that at least the last token is computed.
        held: list[int] = []
        for k in keys[: (len(tokens) - 1) // bs]:
            blocks = self._blocks_of.get(k)
            if blocks is None:
                break
            held.append(next(iter(blocks)))
        hit = len(held)
        for b in held:  # touch: running requests' blocks are not in the free queue
            del self._free[b]
        # Allocate the rest of the prompt (partial tail included) from the queue's front.
        removed: list[int] = []
        for _ in range(-(-len(tokens) // bs) - hit):
            b = self._free.popitem(last=False)[0]
            if b in self._key_of:
                k = self._key_of.pop(b)
                copies = self._blocks_of[k]
                del copies[b]
                if not copies:
                    del self._blocks_of[k]
                removed.append(k)
            held.append(b)
        new = keys[hit:]
        for b, k in zip(held[hit:], new, strict=False):  # cache the new full blocks
            self._key_of[b] = k
            self._blocks_of.setdefault(k, {})[b] = None
        # Finish: free in reverse; cached blocks to the back, uncached ones to the front.
        front: list[int] = []
        for b in reversed(held):
            if b in self._key_of:
                self._free[b] = None
            else:
                front.append(b)
        for b in reversed(front):
            self._free[b] = None
            self._free.move_to_end(b, last=False)
        self._publish(tokens, keys, hit, removed, lora)
        return ServeResult(prompt_tokens, hit * bs, len(new), len(removed))

    def _publish(
        self,
        tokens: Sequence[int],
        keys: list[int],
        hit: int,
        removed: list[int],
        lora: LoRA | None,
    ) -> None:
        if self.publisher is None:
            return
        events: list[WireEvent] = [WireBlockRemoved([k], self.medium, group_idx=0) for k in removed]
        new = keys[hit:]
        if new:
            bs = self.block_size
            start = hit * bs
            ek = (
                extra_keys(len(keys), bs, lora=lora, form="event")[hit:]
                if lora
                else [None] * len(new)
            )
            events.append(
                WireBlockStored(
                    block_hashes=list(new),
                    parent_block_hash=keys[hit - 1] if hit else None,
                    token_ids=list(tokens[start : start + len(new) * bs]),
                    block_size=bs,
                    lora_id=None,
                    medium=self.medium,
                    lora_name=lora.name if lora else None,
                    extra_keys=ek,
                    group_idx=0,
                    kv_cache_spec_kind="full_attention",
                )
            )
        if events:
            self.publisher.publish(events)

    def reset(self) -> None:
        """``reset_prefix_cache``: drop every hash, publish ``AllBlocksCleared``."""
        self._key_of.clear()
        self._blocks_of.clear()
        if self.publisher is not None:
            self.publisher.publish([WireAllBlocksCleared()])

    def cached_prefix_blocks(self, tokens: Sequence[int], lora: LoRA | None = None) -> int:
        """Leading full blocks of ``tokens`` whose hash is cached now (no side effects).

        Not capped: for a block-aligned, fully cached prompt this is one more than ``serve``
        would report as hit.
        """
        n = len(tokens) // self.block_size
        tagged = extra_keys(n, self.block_size, lora=lora) if lora else None
        hit = 0
        for d in self.hasher.hashes(tokens, tagged):
            if event_key(d) not in self._blocks_of:
                break
            hit += 1
        return hit

    def cached_keys(self) -> set[int]:
        """The cached hashes (u64 event keys), each once however many blocks hold it."""
        return set(self._blocks_of)

    @property
    def cached_blocks(self) -> int:
        """Distinct hashes cached now (what a perfect index of this pod would hold)."""
        return len(self._blocks_of)
