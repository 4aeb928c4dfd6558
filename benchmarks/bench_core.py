"""Core benchmarks (issue: the core): hashing, in-process apply rate, scoring latency, memory.

Run: ``python benchmarks/bench_core.py [--out benchmarks/results/core.md] [--pairs 1000000]``.
Targets: hashing ≥ a straightforward serialise+digest loop; apply ≥ 1 M block-events/s;
1024-block query vs 256 pods at 1 M pairs p50 ≤ 200 µs, p99 ≤ 1 ms; ≤ 100 B per pair.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import pickle
import random
import sys
import time
import tracemalloc
from pathlib import Path

import cbor2
import xxhash

sys.path.insert(0, str(Path(__file__).parent))
from _util import pct, table, write_report  # noqa: E402

from kvray.core.events import EventDecoder, WireBlockRemoved, WireBlockStored, encode_batch
from kvray.core.hashing import BlockHasher, none_hash
from kvray.core.index.memory import MemoryIndex
from kvray.core.keys import model_root, request_keys
from kvray.indexer import Indexer
from kvray.types import PodId, Tier

GPU = Tier("GPU")


def bench_hashing(tokens_n: int = 32768) -> list[list[object]]:
    rng = random.Random(1)
    tokens = [rng.randrange(150_000) for _ in range(tokens_n)]
    rows: list[list[object]] = []
    ser = {
        "sha256": lambda o: pickle.dumps(o, protocol=5),
        "sha256_cbor": lambda o: cbor2.dumps(o, canonical=True),
        "xxhash": lambda o: pickle.dumps(o, protocol=5),
        "xxhash_cbor": lambda o: cbor2.dumps(o, canonical=True),
    }
    dig = {
        "sha256": lambda b: hashlib.sha256(b).digest(),
        "sha256_cbor": lambda b: hashlib.sha256(b).digest(),
        "xxhash": xxhash.xxh3_128_digest,
        "xxhash_cbor": xxhash.xxh3_128_digest,
    }
    for algo in ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor"):
        hasher = BlockHasher(algo, "0", 16)  # type: ignore[arg-type]
        none = none_hash(algo, "0")

        def baseline(algo: str = algo, none: bytes = none) -> None:
            prev = none
            for i in range(0, len(tokens) - 15, 16):
                prev = dig[algo](ser[algo]((prev, tuple(tokens[i : i + 16]), None)))

        t_base = _best(baseline)
        t_ours = _best(lambda h=hasher: h.hashes(tokens))
        rows.append(
            [
                algo,
                f"{tokens_n / t_base / 1e6:.2f}",
                f"{tokens_n / t_ours / 1e6:.2f}",
                f"{t_base / t_ours:.2f}x",
            ]
        )
    t_req = _best(lambda: request_keys(tokens, 16, model_root("m")))
    rows.append(["kvray request keys (xxh3-64)", "-", f"{tokens_n / t_req / 1e6:.2f}", "-"])
    return rows


def _best(fn: object, reps: int = 5) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - t)
    return best


def build_fleet(pairs: int, pods: int, per_block: int, doc_blocks: int, seed: int = 7):  # type: ignore[no-untyped-def]
    """Documents of ``doc_blocks`` chained keys, each held by ``per_block`` random pods."""
    rng = random.Random(seed)
    docs = []
    n_docs = max(1, pairs // (per_block * doc_blocks))
    for _ in range(n_docs):
        keys = [rng.getrandbits(64) for _ in range(doc_blocks)]
        holders = rng.sample(range(pods), per_block)
        docs.append((keys, holders))
    return docs


def bench_index(
    pairs: int, pods: int = 256, per_block: int = 4
) -> tuple[list[list[object]], list[list[object]]]:
    docs = build_fleet(pairs, pods, per_block, 1024)
    names = [PodId(f"10.0.{i // 256}.{i % 256}") for i in range(pods)]
    # -- memory per pair (tracemalloc counts every allocation the index makes)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    idx = MemoryIndex(max_keys=50_000_000)
    t0 = time.perf_counter()
    n_events = 0
    for keys, holders in docs:
        for h in holders:
            for i in range(0, len(keys), 32):  # batches of 32 blocks, like engine steps
                idx.add(names[h], GPU, keys[i : i + 32])
                n_events += len(keys[i : i + 32])
    t_add = time.perf_counter() - t0
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    st = idx.stats()
    # -- removals
    t0 = time.perf_counter()
    removed = 0
    for keys, holders in docs[: max(1, len(docs) // 10)]:
        for i in range(0, len(keys), 32):
            idx.remove(names[holders[0]], GPU, keys[i : i + 32])
            removed += len(keys[i : i + 32])
        idx.add(names[holders[0]], GPU, keys)
    t_rm = time.perf_counter() - t0
    # -- scoring a 1024-block prompt (fully cached on ~per_block pods)
    weights = {"GPU": 1.0}
    lat = []
    rng = random.Random(3)
    for _ in range(300):
        keys, _h = rng.choice(docs)
        t = time.perf_counter()
        idx.score(keys, weights)
        lat.append(time.perf_counter() - t)
    lat_miss = []
    for _ in range(300):
        keys, _h = rng.choice(docs)
        q = keys[:512] + [rng.getrandbits(64) for _ in range(512)]
        t = time.perf_counter()
        idx.score(q, weights)
        lat_miss.append(time.perf_counter() - t)
    rows = [
        ["(block, pod) pairs", f"{st.pairs:,}", ""],
        ["distinct keys", f"{st.keys:,}", ""],
        ["add rate (batches of 32)", f"{n_events / t_add / 1e6:.2f} M block-events/s", "≥ 1 M/s"],
        ["remove rate", f"{removed / t_rm / 1e6:.2f} M block-events/s", ""],
        ["memory (tracemalloc)", f"{used / st.pairs:.1f} B per pair", "≤ 100 B"],
        ["memory (index's own estimate)", f"{st.bytes_estimate / st.pairs:.1f} B per pair", ""],
        ["score 1024 blocks, full hit p50", f"{pct(lat, 50) * 1e6:.0f} µs", "≤ 200 µs"],
        ["score 1024 blocks, full hit p99", f"{pct(lat, 99) * 1e6:.0f} µs", "≤ 1 ms"],
        ["score 1024 blocks, 512 hit p50", f"{pct(lat_miss, 50) * 1e6:.0f} µs", ""],
    ]
    return rows, [[len(docs), per_block]]


def bench_apply(n_blocks: int = 300_000, pods: int = 16) -> list[list[object]]:
    """Full write path: frames → decode → request keys (xxh3) → index, incl. removals."""
    rng = random.Random(5)
    msgs = []
    seqs = [0] * pods
    made = 0
    while made < n_blocks:
        p = rng.randrange(pods)
        n = rng.randint(16, 64)
        toks = [rng.randrange(150_000) for _ in range(16 * n)]
        hashes = [rng.getrandbits(64) for _ in range(n)]
        events = [WireBlockStored(hashes, None, toks, 16, None, "GPU", None, [None] * n)]
        if rng.random() < 0.3:
            events.append(WireBlockRemoved(hashes[: n // 2], "GPU"))
        payload = encode_batch(events, ts=time.time(), data_parallel_rank=0)
        msgs.append([f"kv@pod{p}@m".encode(), seqs[p].to_bytes(8, "big"), payload])
        seqs[p] += 1
        made += n
    rows = []
    for verify in (False, True):
        ix = Indexer(verify_hashes=verify)
        t0 = time.perf_counter()
        for m in msgs:
            ix.apply(m)
        dt = time.perf_counter() - t0
        rows.append(
            [
                f"Indexer.apply(frames), verify_hashes={verify}",
                f"{made / dt / 1e6:.2f} M block-events/s",
            ]
        )
    dec = EventDecoder()
    t0 = time.perf_counter()
    for m in msgs:
        dec.decode(m[2])
    rows.append(["decode only", f"{made / (time.perf_counter() - t0) / 1e6:.2f} M block-events/s"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/results/core.md")
    ap.add_argument("--pairs", type=int, default=1_000_000)
    args = ap.parse_args()
    sections = []
    h = bench_hashing()
    sections.append(
        "## Hashing a 32k-token prompt, block size 16 (M tokens/s)\n\n"
        + table(["algorithm", "straightforward loop", "kvray", "speed-up"], h)
    )
    rows, _ = bench_index(args.pairs)
    sections.append(
        f"## In-process index, 256 pods, ~4 pods per block, {args.pairs:,} pairs\n\n"
        + table(["measure", "value", "target"], rows)
    )
    sections.append(
        "## Write path from ZMQ frames (16 pods, 16–64 blocks per event)\n\n"
        + table(["path", "rate"], bench_apply())
    )
    print(write_report(args.out, "kvray core benchmarks", sections))


if __name__ == "__main__":
    main()
