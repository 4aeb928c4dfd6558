"""A holder's second copy of a block: vLLM stores a recomputed block again under the same hash
and publishes one ``BlockRemoved`` per copy; the index drops the block at the last one."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from kvray.core.apply import IndexWriter, KeyMode, ModelHashing
from kvray.core.events import (
    EventDecoder,
    WireAllBlocksCleared,
    WireBlockRemoved,
    WireBlockStored,
    WireEvent,
    encode_batch,
)
from kvray.core.hashing import BlockHasher, event_key
from kvray.core.index.base import IndexBackend
from kvray.core.index.budget import BudgetIndex
from kvray.core.index.memory import MemoryIndex
from kvray.sim.pod import SimPod
from kvray.types import PodId

BS = 16
POD = PodId("pod")
W = {"GPU": 1.0}
HASHER = BlockHasher(block_size=BS)
BACKENDS: dict[str, Callable[[], IndexBackend]] = {
    "memory": lambda: MemoryIndex(max_keys=100_000),
    "budget": lambda: BudgetIndex(budget_bytes=64 * 2**20),
}


class _Capture:
    def __init__(self) -> None:
        self.batches: list[list[Any]] = []

    def publish(self, events: list[Any]) -> None:
        self.batches.append(list(events))


def _writer(backend: str, key_mode: KeyMode = "request") -> IndexWriter:
    return IndexWriter(BACKENDS[backend](), lambda _m: ModelHashing(BS, HASHER), key_mode=key_mode)


def _apply(w: IndexWriter, events: Sequence[WireEvent]) -> None:
    batch = EventDecoder().decode(encode_batch(list(events), ts=0.0))
    res = w.apply_batch(POD, "m", batch)
    assert not res.rejected, res.rejected


def _stored(tokens: list[int], parent: bytes | None = None) -> WireBlockStored:
    """The ``BlockStored`` of ``tokens``' blocks chained on the block whose digest is
    ``parent``."""
    digests = HASHER.hashes(tokens, None, parent)
    return WireBlockStored(
        block_hashes=[event_key(d) for d in digests],
        parent_block_hash=None if parent is None else event_key(parent),
        token_ids=tokens,
        block_size=BS,
        lora_id=None,
        medium=None,
        lora_name=None,
    )


def _score(w: IndexWriter, tokens: list[int]) -> float:
    return w.score(w.keyer.block_keys(tokens, "m"), W).get(POD, 0.0)


@pytest.mark.parametrize("key_mode", ["request", "engine"])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_the_last_copys_removal_drops_the_block(backend: str, key_mode: KeyMode) -> None:
    w = _writer(backend, key_mode)
    tokens = list(range(2 * BS))
    first, second = HASHER.hashes(tokens)
    _apply(w, [_stored(tokens)])
    _apply(w, [_stored(tokens[BS:], parent=first)])  # the second block again: 2 copies
    _apply(w, [WireBlockRemoved(block_hashes=[event_key(second)], medium=None)])
    assert _score(w, tokens) == 2.0  # one copy left
    # ...a child stored on top of it is still placed (its parent is known)
    child = list(range(100, 100 + BS))
    _apply(w, [_stored(child, parent=second)])
    assert _score(w, tokens + child) == 3.0
    _apply(w, [WireBlockRemoved(block_hashes=[event_key(second)], medium=None)])
    assert _score(w, tokens) == 1.0  # the last copy went
    # Copies do not survive a clear: one store, one removal.
    _apply(w, [_stored(tokens), _stored(tokens[BS:], parent=first), WireAllBlocksCleared()])
    _apply(w, [_stored(tokens), WireBlockRemoved(block_hashes=[event_key(second)], medium=None)])
    assert _score(w, tokens) == 1.0


def test_copies_survive_a_snapshot() -> None:
    w = _writer("memory")
    tokens = list(range(BS))
    (key,) = (event_key(d) for d in HASHER.hashes(tokens))
    _apply(w, [_stored(tokens), _stored(tokens), _stored(tokens)])  # 3 copies
    restored = _writer("memory")
    restored.backend.restore(w.backend.snapshot())
    restored.load_copies(w.copies())
    assert [(t, c) for t, _, c in restored.copies()["pod"]] == [("GPU", 2)]
    for left in (1.0, 1.0, 0.0):
        _apply(restored, [WireBlockRemoved(block_hashes=[key], medium=None)])
        assert _score(restored, tokens) == left


def _prompts(rng: random.Random, n: int) -> list[list[int]]:
    """Shared heads, many block-aligned (a fully cached aligned prompt recomputes its last
    block: vLLM's duplicate copies)."""
    heads = [[rng.randrange(9000) for _ in range(BS * rng.randint(1, 3))] for _ in range(5)]
    out = []
    for _ in range(n):
        tail = [rng.randrange(9000) for _ in range(BS * rng.randint(0, 3) + rng.choice([0, 5]))]
        out.append(rng.choice(heads) + tail)
        if rng.random() < 0.3:
            out.append(out[-1])  # the same prompt again
    return out


@pytest.mark.parametrize("key_mode", ["request", "engine"])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_index_follows_a_pod_that_stores_duplicates(backend: str, key_mode: KeyMode) -> None:
    """Every request's batch applied, then every prompt seen so far scores exactly the run of
    leading blocks the pod's cache holds (SimPod is vLLM's block pool, duplicates included)."""
    rng = random.Random(7)
    cap = _Capture()
    pod = SimPod(POD, "m", num_blocks=24, hasher=HASHER)
    pod.publisher = cap  # type: ignore[assignment]
    w = _writer(backend, key_mode)
    seen: list[list[int]] = []
    dup_removals = 0
    for tokens in _prompts(rng, 150):
        pod.serve(tokens)
        events = cap.batches.pop() if cap.batches else []
        _apply(w, events)
        cached = pod.cached_keys()
        dup_removals += sum(
            k in cached
            for ev in events
            if isinstance(ev, WireBlockRemoved)
            for k in ev.block_hashes
        )
        seen.append(tokens)
        for p in seen[-40:]:
            run = 0
            for d in HASHER.hashes(p):
                if event_key(d) not in cached:
                    break
                run += 1
            assert _score(w, p) == run, (len(seen), p[:3])
    assert dup_removals > 0  # the stream did exercise removals of a copy


def test_hash_checks_stop_after_verify_blocks_per_pod_run() -> None:
    """The contract check re-hashes ``verify_blocks`` blocks per run of a pod, then stops (a
    pod's hash settings cannot change until it restarts); a restart arms it again. An event
    is cut to what is left of the budget: exactly ``verify_blocks`` blocks a run."""
    w = IndexWriter(MemoryIndex(), lambda _m: ModelHashing(BS, HASHER), verify_blocks=3)
    for i in range(4):  # 4 chains of 2 blocks: 2 blocks of the first, 1 of the second
        _apply(w, [_stored(list(range(1000 * i, 1000 * i + 2 * BS)))])
    assert w.contract("pod")["pod"]["checked"] == 3
    w.clear_holder(POD)
    _apply(w, [_stored(list(range(9000, 9000 + 2 * BS)))])
    assert w.contract("pod")["pod"]["checked"] == 5
    # verify_blocks=0: every block, as before.
    every = IndexWriter(MemoryIndex(), lambda _m: ModelHashing(BS, HASHER), verify_blocks=0)
    for i in range(4):
        _apply(every, [_stored(list(range(1000 * i, 1000 * i + 2 * BS)))])
    assert every.contract("pod")["pod"]["checked"] == 8
