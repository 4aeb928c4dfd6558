"""Differential test: kvray's simulated pod (``SimPod``) against vLLM's real ``KVCacheManager``.

Both serve the same seeded request stream, one request at a time, on a pool small enough that
blocks are evicted all the time. After every request they must agree on the cache hit (blocks
served from the prefix cache, as vLLM counts them), the set of cached block hashes, and the
events (every ``BlockRemoved`` and ``BlockStored``, in order).

The workload is shaped like real traffic: tenants with 48-block system prompts, multi-turn chats
that grow turn by turn, shared documents quoted by several tenants, exact resends (block-aligned
prompts that are fully cached), a LoRA tenant and a few prompts shorter than a block.

Needs vLLM (``vllm==0.33.0`` and a torch it imports with); skipped otherwise.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from kvray.core.events import WireBlockRemoved, WireBlockStored
from kvray.core.hashing import BlockHasher, event_key
from kvray.core.keys import LoRA, extra_keys
from kvray.sim.pod import SimPod

pytest.importorskip(
    "vllm.v1.core.kv_cache_manager",
    reason="vLLM (vllm==0.33.0 with torch) is not installed: no real KVCacheManager to diff",
)

from tests.vllm_pod import VllmPod  # noqa: E402  (needs vllm)

BS = 16
SYSTEM_BLOCKS = 48
ADAPTER = LoRA("support-ft", "/adapters/support-ft")


@dataclass(slots=True)
class Req:
    tokens: list[int]
    lora: LoRA | None = None
    kind: str = "chat"


def _words(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, 150_000) for _ in range(n)]


def workload(seed: int, n: int) -> Iterator[Req]:
    """``n`` requests: chats on per-tenant system prompts, shared documents, resends, LoRA."""
    rng = random.Random(seed)
    tenants = [_words(rng, SYSTEM_BLOCKS * BS + rng.randrange(0, BS)) for _ in range(4)]
    docs = [_words(rng, rng.randrange(8, 40) * BS + rng.randrange(0, BS)) for _ in range(5)]
    chats: list[tuple[int, list[int], LoRA | None]] = []  # (tenant, history, adapter)
    last: Req | None = None
    last_chat: list[int] | None = None  # the history of the chat ``last`` belongs to
    follow: list[int] | None = None  # a chat whose next turn comes right after a retry
    for _ in range(n):
        r = rng.random()
        if last is not None and r < 0.08:  # a client retry: the exact same prompt again
            follow = last_chat if last.kind == "chat" and rng.random() < 0.7 else None
            yield last
            continue
        last_chat = None
        pending, follow = follow, None
        if pending is not None:
            r = 1.0  # the chat goes on
        if r < 0.10:  # a tiny prompt: no full block at all
            last = Req(_words(rng, rng.randrange(1, BS)), kind="tiny")
        elif r < 0.25:  # RAG: system prompt, a shared document, a question
            t = rng.randrange(len(tenants))
            q = _words(rng, rng.randrange(5, 60))
            last = Req(tenants[t] + rng.choice(docs) + q, kind="rag")
        elif r < 0.32:  # a block-aligned prompt (the full-hit cap shows on its resend)
            t = rng.randrange(len(tenants))
            body = tenants[t] + _words(rng, rng.randrange(1, 6) * BS)
            last = Req(body[: len(body) // BS * BS], kind="aligned")
        else:  # a chat turn: a new chat or the next turn of a live one
            live = [j for j, c in enumerate(chats) if c[1] is pending]
            if live:
                i = live[0]
            elif not chats or rng.random() < 0.3 or len(chats) < 3:
                t = rng.randrange(len(tenants))
                lora = ADAPTER if t == 3 and rng.random() < 0.5 else None
                chats.append((t, list(tenants[t]), lora))
                if len(chats) > 12:
                    chats.pop(0)
                i = rng.randrange(len(chats))
            else:
                i = rng.randrange(len(chats))
            t, hist, lora = chats[i]
            last_chat = hist
            turn = rng.randrange(10, 90)
            if rng.random() < 0.3:  # the turn ends on a block boundary
                turn += -(len(hist) + turn) % BS
            hist += _words(rng, turn)  # the user's turn
            last = Req(list(hist), lora, "chat")
            hist += _words(rng, rng.randrange(20, 200))  # the reply, part of the next prompt
            if len(hist) > 150 * BS:  # the chat ends
                chats.pop(i)
        yield last


def _norm_vllm(events: list[Any]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for e in events:
        name = type(e).__name__
        if name == "BlockRemoved":
            out.append(("removed", tuple(e.block_hashes)))
        elif name == "BlockStored":
            ek = [list(k) if k is not None else None for k in e.extra_keys or []]
            out.append(
                ("stored", tuple(e.block_hashes), e.parent_block_hash, tuple(e.token_ids),
                 e.lora_name, repr(ek))
            )  # fmt: skip
        else:
            out.append((name,))
    return out


def _norm_sim(events: list[Any]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for e in events:
        if isinstance(e, WireBlockRemoved):
            out.append(("removed", tuple(e.block_hashes)))
        elif isinstance(e, WireBlockStored):
            ek = [list(k) if k is not None else None for k in e.extra_keys or []]
            out.append(
                ("stored", tuple(e.block_hashes), e.parent_block_hash, tuple(e.token_ids),
                 e.lora_name, repr(ek))
            )  # fmt: skip
        else:
            out.append((type(e).__name__,))
    return out


class _Capture:
    """A stand-in publisher: keeps each published batch."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []

    def publish(self, events: list[Any]) -> None:
        self.batches.append(list(events))


@dataclass(slots=True)
class Divergence:
    index: int
    kind: str
    what: str
    detail: str


def run_diff(seed: int, n: int, num_blocks: int, stop_after: int = 1) -> dict[str, Any]:
    """Serve the same stream on both pods; return the divergences found and some counts."""
    real = VllmPod(num_blocks, block_size=BS)
    cap = _Capture()
    sim = SimPod("sim", "m", num_blocks=num_blocks, hasher=BlockHasher(block_size=BS))
    sim.publisher = cap  # type: ignore[assignment]
    found: list[Divergence] = []
    removed = stored = hits = 0
    dup_stores = 0  # BlockStored for a hash already cached (a second copy)
    dup_removals = 0  # BlockRemoved for a hash that stays cached (another copy holds it)
    for i, req in enumerate(workload(seed, n)):
        before = real.cached_keys()
        want = real.serve(req.tokens, req.lora)
        got = sim.serve(req.tokens, lora=req.lora)
        sim_events = cap.batches.pop() if cap.batches else []
        assert not cap.batches, "one batch per request at most"
        removed += len(want.removed)
        stored += len(want.stored)
        hits += want.hit_blocks
        cached = real.cached_keys()
        dup_stores += sum(k in before for k in want.stored)
        dup_removals += sum(k in cached for k in want.removed)
        checks = [
            ("hit blocks", want.hit_blocks, got.cached_tokens // BS),
            ("cached set", cached, sim.cached_keys()),
            ("cached copies", real.cached_copies(), len(sim._key_of)),
            ("events", _norm_vllm(want.events), _norm_sim(sim_events)),
            ("removed", len(want.removed), got.evicted_blocks),
            ("stored", len(want.stored), got.new_blocks),
        ]
        for what, w, g in checks:
            if w != g:
                if isinstance(w, set) and isinstance(g, set):
                    detail = f"only vLLM {len(w - g)}, only sim {len(g - w)}"
                else:
                    detail = f"vLLM {w!r:.300} / sim {g!r:.300}"
                found.append(Divergence(i, req.kind, what, detail))
        if len(found) >= stop_after:
            break
    return {
        "divergences": found,
        "requests": i + 1,
        "removed": removed,
        "stored": stored,
        "hit_blocks": hits,
        "dup_stores": dup_stores,
        "dup_removals": dup_removals,
    }


def test_sim_pod_matches_vllm_kv_cache_manager() -> None:
    res = run_diff(seed=7, n=400, num_blocks=240)
    assert not res["divergences"], res["divergences"][:5]
    assert res["requests"] == 400
    assert res["removed"] > 2000  # heavy eviction: the pool turns over many times
    assert res["dup_stores"] > 0  # fully cached aligned prompts stored a second copy
    assert res["hit_blocks"] > 0


def test_workload_exercises_the_edge_cases() -> None:
    reqs = list(workload(7, 400))
    kinds = {r.kind for r in reqs}
    assert {"chat", "rag", "aligned", "tiny"} <= kinds
    assert any(r.lora is not None for r in reqs)
    assert any(len(r.tokens) % BS == 0 for r in reqs)
    assert max(len(r.tokens) for r in reqs) < 239 * BS  # every prompt fits the pool


def test_lora_blocks_hash_alike() -> None:
    """kvray's LoRA extra keys give vLLM's digests (else the diff above compares nothing)."""
    tokens = list(range(40))
    real = VllmPod(16, block_size=BS)
    want = real.serve(tokens, ADAPTER).stored
    keys = extra_keys(len(tokens) // BS, BS, lora=ADAPTER)
    assert want == [event_key(d) for d in BlockHasher(block_size=BS).hashes(tokens, keys)]


def test_a_second_copy_outlives_its_removal_event() -> None:
    """vLLM does not de-duplicate: evicting one copy of a hash publishes ``BlockRemoved`` while
    another copy still serves it. SimPod reproduces this (so kvray is tested against it)."""
    p = list(range(4000, 4064))  # 4 blocks, block-aligned
    q = p + list(range(5000, 5019))  # p plus one full block and a partial one
    steps = [p, p, q, list(range(6000, 6000 + 9 * BS + 5)), q]
    real = VllmPod(16, block_size=BS)
    cap = _Capture()
    sim = SimPod("sim", "m", num_blocks=16, hasher=BlockHasher(block_size=BS))
    sim.publisher = cap  # type: ignore[assignment]
    got = []
    for tokens in steps:
        want = real.serve(tokens)
        res = sim.serve(tokens)
        assert _norm_vllm(want.events) == _norm_sim(cap.batches.pop() if cap.batches else [])
        assert real.cached_keys() == sim.cached_keys()
        got.append((want.hit_blocks, res.cached_tokens // BS, want.removed))
    assert [(h, s) for h, s, _ in got] == [(0, 0), (3, 3), (4, 4), (0, 0), (5, 5)]
    (gone,) = got[3][2]  # the copy stored by the resend: its hash is still cached...
    assert gone == event_key(BlockHasher(block_size=BS).hashes(p)[3])
    assert gone in sim.cached_keys()  # ...and the last request hit it
