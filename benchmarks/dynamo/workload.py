"""The event stream both systems ingest and the prompts both answer, with their ground truth."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import numpy as np

from kvray.core.events import WireEvent, encode_batch
from kvray.sim import SimPod

BLOCK = 16
MODEL = "m"
SIZES = (128, 1024)  # query prompt lengths in blocks

Frame = tuple[int, bytes, int, int]
"""(pod, payload, events in it, block-events in it)."""


class _Capture:
    """Stands in for a ``SimPublisher``: keeps each batch the pod publishes, pre-encoded."""

    def __init__(self, pod: int, out: list[Frame]) -> None:
        self.pod = pod
        self.out = out

    def publish(self, events: list[WireEvent], ts: float | None = None) -> int:
        blocks = sum(len(getattr(e, "block_hashes", ())) for e in events)
        # ts = 0: "not stamped" (kvray skips its lag metric; Dynamo ignores ts).
        self.out.append((self.pod, encode_batch(events, ts=0.0), len(events), blocks))
        return len(self.out) - 1


@dataclass
class Stream:
    pods: int
    capacity: int
    frames: list[Frame]
    """(pod, payload, events in it, block-events in it), in send order."""
    queries: dict[int, list[list[int]]]
    truth: dict[int, list[dict[str, int]]]
    """Per size, per query: pod → cached prefix blocks in the simulated caches (ground truth)."""
    requests: int
    live_pairs: int
    stored_blocks: int = 0
    removed_blocks: int = 0
    events: int = 0
    gen_s: float = 0.0
    block_events: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.block_events = self.stored_blocks + self.removed_blocks


class _Rand:
    """The two seeded generators (``random`` for choices, numpy for token ids)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.nrng = np.random.default_rng(seed)

    def tokens(self, nblocks: int, extra: int = 0) -> list[int]:
        return self.nrng.integers(0, 150_000, nblocks * BLOCK + extra).tolist()  # type: ignore[no-any-return]


@dataclass
class _Corpus:
    docs: list[list[int]]
    weights: list[float]
    home: list[list[int]]
    """Per document: the pods that serve it."""


@dataclass
class _Served:
    recent: list[list[int]]
    requests: int
    stored: int
    removed: int


def _corpus(g: _Rand, pods: int) -> _Corpus:
    """4 system prompts × 64 documents, Zipf weights, a home quarter of the pods each."""
    rng = g.rng
    systems = [g.tokens(rng.randint(8, 64)) for _ in range(4)]
    docs = []
    for i in range(64):
        body = rng.randint(16, 240) if rng.random() < 0.65 else rng.randint(700, 1100)
        docs.append(systems[i % 4] + g.tokens(body))
    weights = [1.0 / (r + 1) for r in range(len(docs))]
    home = [rng.sample(range(pods), max(1, pods // 4)) for _ in docs]
    return _Corpus(docs, weights, home)


def _serve(g: _Rand, sims: list[SimPod], c: _Corpus, block_events: int) -> _Served:
    """Requests (a document prefix plus a private tail) until ``block_events`` are published."""
    rng = g.rng
    recent: list[list[int]] = []
    made = requests = stored = removed = 0
    while made < block_events:
        d = rng.choices(range(len(c.docs)), c.weights)[0]
        doc = c.docs[d]
        cut = int(len(doc) // BLOCK * rng.uniform(0.3, 1.0)) * BLOCK
        prompt = doc[:cut] + g.tokens(rng.randint(0, 32), rng.randint(0, 15))
        res = sims[rng.choice(c.home[d])].serve(prompt)
        stored += res.new_blocks
        removed += res.evicted_blocks
        made = stored + removed
        requests += 1
        recent.append(prompt)
        if len(recent) > 400:
            del recent[:200]
    return _Served(recent, requests, stored, removed)


def _prompts(
    g: _Rand, c: _Corpus, recent: list[list[int]], size: int, queries: int
) -> list[list[int]]:
    """Half document prefixes (shared by many pods), half recent requests (one pod's tail)."""
    rng = g.rng
    want = size * BLOCK
    long_docs = [i for i, doc in enumerate(c.docs) if len(doc) >= want] or list(range(len(c.docs)))
    out = []
    for q in range(queries):
        if q % 2 == 0:  # a document prefix (shared by many pods)
            pool = long_docs if size > 256 else list(range(len(c.docs)))
            base = c.docs[rng.choices(pool, [c.weights[i] for i in pool])[0]]
        else:  # a recent request (its private tail is cached by one pod)
            base = rng.choice(recent)
        p = list(base[:want])
        if len(p) < want:
            p += g.tokens(0, want - len(p))
        out.append(p)
    return out


def _truth(sims: list[SimPod], prompts: list[list[int]]) -> list[dict[str, int]]:
    """Per prompt: pod → cached prefix blocks, from the simulated caches themselves."""
    hasher = sims[0].hasher
    per_query = []
    cached = {pod.pod_id: pod.cached_keys() for pod in sims}
    for p in prompts:
        keys = hasher.event_keys(p)
        row = {}
        for pod in sims:
            cache = cached[pod.pod_id]
            n = 0
            for key in keys:
                if key not in cache:
                    break
                n += 1
            if n:
                row[pod.pod_id] = n
        per_query.append(row)
    return per_query


def build_stream(pods: int, block_events: int, queries: int, seed: int = 7) -> Stream:
    """Simulated pods serve shared-prefix requests until ``block_events`` are published.

    4 system prompts × 64 documents (65 % short: 16–240 blocks, 35 % long: 700–1100 blocks),
    Zipf popularity; each document has a home set of a quarter of the pods and a request goes to
    one of them; a request is a document prefix (30–100 %) plus a private tail (0–32 blocks and
    a partial block). Cache capacity per pod: a quarter of its share of the stream (≥ 2048
    blocks), so pods fill up and evict (one ``BlockRemoved`` per block, as vLLM does).
    """
    t0 = time.perf_counter()
    g = _Rand(seed)
    corpus = _corpus(g, pods)
    capacity = max(2048, block_events // (4 * pods))
    frames: list[Frame] = []
    sims = [
        SimPod(f"pod{i}", MODEL, num_blocks=capacity, publisher=_Capture(i, frames))  # type: ignore[arg-type]
        for i in range(pods)
    ]
    served = _serve(g, sims, corpus, block_events)
    qs: dict[int, list[list[int]]] = {}
    truth: dict[int, list[dict[str, int]]] = {}
    for size in SIZES:
        qs[size] = _prompts(g, corpus, served.recent, size, queries)
        truth[size] = _truth(sims, qs[size])
    return Stream(
        pods=pods,
        capacity=capacity,
        frames=frames,
        queries=qs,
        truth=truth,
        requests=served.requests,
        live_pairs=sum(s.cached_blocks for s in sims),
        stored_blocks=served.stored,
        removed_blocks=served.removed,
        events=sum(f[2] for f in frames),
        gen_s=time.perf_counter() - t0,
    )
