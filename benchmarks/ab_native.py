"""A/B in one run: the shard's tiers as ``U64Dict`` (C, dict order) against plain ``dict``.

Run: ``python benchmarks/ab_native.py [--reps 7] [--blocks 800000]
[--out benchmarks/results/native.md]``.

Issue 15 §4 keeps ``U64Dict`` (and the C paths that exist only for it) only if it is worth more
than 10 % on ingest or on memory per (block, pod) pair. Both arms run the shard's own write path
in this process: pre-decoded vLLM batches (the shard's ingest thread decodes before applying) go
through ``IndexWriter`` → ``Journal`` → ``MemoryIndex`` (recency on, as a shard's index), the
journal drained after every batch. Arm "U64Dict" is the code as shipped; arm "dict" is the same
code with ``kvray.core.index.memory.U64Dict`` replaced by ``dict`` for the run, so the tiers are
dicts and the C functions take their dict branches; arm "dict, Python loops" also replaces the
loops (``or_bits``, ``add_engine``, ...) with their pure-Python twins, i.e. what is left without
both ``U64Dict`` and the C dict branches. The engine map stays a ``U64Map`` in every arm.

Two scenarios: "grow" (the index only grows; no eviction) and "full" (``max_keys`` is half
of the distinct keys, so the LRU eviction, ``oldest(n)`` on a U64Dict and ``islice`` on a dict,
runs all along). Each repetition runs every arm, in alternating order; ingest is reported as
block-events per CPU second of this process (``time.process_time``; the machine is shared, so
wall time is shown too) and memory as tracemalloc's count of everything the index holds at the
end (a separate traced run), divided by the index's (block, pod) pairs.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _util import table, write_report  # noqa: E402

import kvray.core.index.memory as memory  # noqa: E402
from kvray.changes.journal import Journal  # noqa: E402
from kvray.config import IndexConfig  # noqa: E402
from kvray.core import fast  # noqa: E402
from kvray.core.apply import IndexWriter  # noqa: E402
from kvray.core.events import (  # noqa: E402
    EventBatch,
    EventDecoder,
    WireBlockRemoved,
    WireBlockStored,
    WireEvent,
    encode_batch,
)
from kvray.types import PodId  # noqa: E402

BLOCK = 16
PODS = 16
HOLDERS = 4  # pods that cache each document (~4 pods per block, as bench_core)
DOC_BLOCKS = 64


def make_stream(n_blocks: int, seed: int = 11) -> tuple[list[tuple[PodId, EventBatch]], int]:
    """vLLM-like batches from 16 pods: chains of 8-64 stored blocks (prefixes of shared
    documents, each document cached by 4 pods), and per-block ``BlockRemoved`` events for
    blocks a pod stored earlier (~30 % of batches). Returns the decoded batches and the
    number of distinct blocks."""
    rng = random.Random(seed)
    n_docs = max(1, n_blocks // (DOC_BLOCKS * 8))  # each block stored ~4x, removed ~1x
    docs = []
    for _ in range(n_docs):
        tokens = [rng.randrange(150_000) for _ in range(BLOCK * DOC_BLOCKS)]
        hashes = [rng.getrandbits(64) for _ in range(DOC_BLOCKS)]
        docs.append((tokens, hashes, rng.sample(range(PODS), HOLDERS)))
    held: list[list[int]] = [[] for _ in range(PODS)]  # engine hashes each pod stored
    dec = EventDecoder()
    out: list[tuple[PodId, EventBatch]] = []
    made = 0
    while made < n_blocks:
        tokens, hashes, holders = rng.choice(docs)
        pod = rng.choice(holders)
        n = rng.randint(8, DOC_BLOCKS)
        events: list[WireEvent] = []
        if held[pod] and rng.random() < 0.3:
            k = min(len(held[pod]), rng.randint(4, 32))
            start = rng.randrange(len(held[pod]) - k + 1)
            gone = held[pod][start : start + k]
            del held[pod][start : start + k]
            events += [WireBlockRemoved([h], "GPU") for h in gone]
        events.append(
            WireBlockStored(hashes[:n], None, tokens[: BLOCK * n], BLOCK, None, "GPU", None)
        )
        held[pod].extend(hashes[:n])
        payload = encode_batch(events, ts=0.0, data_parallel_rank=0)
        out.append((PodId(f"pod{pod}"), dec.decode(payload)))
        made += n
    return out, n_docs * DOC_BLOCKS


def run(
    stream: list[tuple[PodId, EventBatch]], max_keys: int, traced: bool
) -> tuple[float, float, float, Any]:
    """Apply the stream into a fresh shard write path; (cpu s, wall s, traced bytes, stats)."""
    gc.collect()
    if traced:
        tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0] if traced else 0
    index = memory.MemoryIndex(max_keys=max_keys)
    cfg = IndexConfig()
    writer = IndexWriter(Journal(index), cfg.hashing_lookup(), verify_hashes=False)
    journal: Journal = writer.backend  # type: ignore[assignment]
    c0, w0 = time.process_time(), time.perf_counter()
    for pod, batch in stream:
        writer.apply_batch(pod, "m", batch)
        journal.drain()
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    used = 0.0
    if traced:
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
    stats = index.stats()
    tier_types = {type(d).__name__ for d in index._tiers.values()}
    tables = sum(sys.getsizeof(d) for d in index._tiers.values())
    emap = sys.getsizeof(index._emap)
    del writer, journal, index
    return cpu, wall, used, (stats, tier_types, tables, emap)


_LOOPS = ("or_bits", "and_bits", "lookup", "forget_unindexed", "add_engine", "remove_engine")
SHIPPED: dict[str, Any] = {name: getattr(memory, name) for name in ("U64Dict", *_LOOPS)}
ARMS: dict[str, dict[str, Any]] = {
    "U64Dict": {},
    "dict": {"U64Dict": dict},
    "dict, Python loops": {"U64Dict": dict} | {n: fast.PYTHON[n] for n in _LOOPS},
}


def use(arm: str) -> None:
    """Patch ``kvray.core.index.memory`` for an arm (the shipped names, then the arm's)."""
    for name, value in (SHIPPED | ARMS[arm]).items():
        setattr(memory, name, value)


def spread(xs: list[float]) -> str:
    return f"{min(xs):,.{2 if max(xs) < 100 else 0}f}–{max(xs):,.{2 if max(xs) < 100 else 0}f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--blocks", type=int, default=800_000, help="block-events per run")
    ap.add_argument("--out", default="benchmarks/results/native.md")
    args = ap.parse_args()
    if not fast.COMPILED:
        print("ab_native: kvray._speedups is not built; nothing to compare", file=sys.stderr)
        return 2
    stream, distinct = make_stream(args.blocks)
    n_events = sum(len(b.events) for _, b in stream)
    scenarios = {"grow": 10 * distinct, "full": distinct // 2}
    # results[scenario][arm] = lists of (events/cpu s, events/wall s, bytes per pair)
    res: dict[str, dict[str, dict[str, list[float]]]] = {
        s: {a: {"cpu": [], "wall": [], "bpp": []} for a in ARMS} for s in scenarios
    }
    meta: dict[str, dict[str, Any]] = {s: {} for s in scenarios}
    t_start = time.perf_counter()
    try:
        for rep in range(args.reps):
            order = list(ARMS) if rep % 2 == 0 else list(reversed(ARMS))  # alternate
            for scen, max_keys in scenarios.items():
                for arm in order:
                    use(arm)
                    cpu, wall, _, info = run(stream, max_keys, traced=False)
                    r = res[scen][arm]
                    r["cpu"].append(args.blocks / cpu)
                    r["wall"].append(args.blocks / wall)
                    if rep < 3:  # memory is deterministic: three traced runs suffice
                        _, _, used, info = run(stream, max_keys, traced=True)
                        r["bpp"].append(used / info[0].pairs)
                    meta[scen][arm] = info
            print(f"rep {rep + 1}/{args.reps} done ({time.perf_counter() - t_start:.0f} s)")
    finally:
        use("U64Dict")

    rows = []
    verdict = []
    med = statistics.median
    for scen in scenarios:
        for arm, r in res[scen].items():
            st, types, tables, emap = meta[scen][arm]
            cpu_m, wall_m = [x / 1e6 for x in r["cpu"]], [x / 1e6 for x in r["wall"]]
            rows.append(
                [
                    scen,
                    arm,
                    "/".join(sorted(types)),
                    f"{med(cpu_m):.3f} M ({spread(cpu_m)})",
                    f"{med(wall_m):.3f} M ({spread(wall_m)})",
                    f"{med(r['bpp']):.1f} ({spread(r['bpp'])})",
                    f"{tables / st.pairs:.1f}",
                    f"{emap / st.pairs:.1f}",
                    f"{st.keys:,} / {st.pairs:,}",
                ]
            )
        a = res[scen]["U64Dict"]
        for other in [x for x in ARMS if x != "U64Dict"]:
            b = res[scen][other]
            # Paired ratios (same repetition, back to back) are less exposed to machine drift.
            paired = [x / y - 1 for x, y in zip(a["cpu"], b["cpu"], strict=True)]
            verdict.append(
                [
                    scen,
                    f"U64Dict vs {other}",
                    f"{(med(a['cpu']) / med(b['cpu']) - 1) * 100:+.1f} %",
                    f"{med(paired) * 100:+.1f} % ({min(paired) * 100:+.1f} … "
                    f"{max(paired) * 100:+.1f} %)",
                    f"{(1 - med(a['bpp']) / med(b['bpp'])) * 100:.1f} % less",
                ]
            )
    # The decision compares against the best alternative ("dict": the C loops' dict branches).
    wins = [
        scen
        for scen in scenarios
        if med(res[scen]["U64Dict"]["cpu"]) > 1.10 * med(res[scen]["dict"]["cpu"])
        or med(res[scen]["U64Dict"]["bpp"]) < med(res[scen]["dict"]["bpp"]) / 1.10
    ]
    decision = (
        f"**Keep `U64Dict`**: more than 10 % on ingest or on memory per pair against the best "
        f"alternative (dict tiers through the C loops) in: {', '.join(wins)}."
        if wins
        else "**Drop `U64Dict`**: no scenario shows more than 10 % on ingest or on memory."
    )
    text = write_report(
        args.out,
        "kvray native tables: U64Dict against dict (issue 15 §4 A/B)",
        [
            f"One run: {args.reps} repetitions × 2 scenarios × {len(ARMS)} arms, alternating "
            f"order; {args.blocks:,} block-events per run ({n_events:,} events in "
            f"{len(stream):,} batches, {PODS} pods, {HOLDERS} pods per document, {distinct:,} "
            f"distinct blocks); memory from {min(3, args.reps)} tracemalloc runs per arm. "
            f"Total {time.perf_counter() - t_start:.0f} s; C extension "
            f"`{getattr(fast._speedups, '__file__', '?')}`.\n\n"
            "Write path: pre-decoded batches → `IndexWriter` → `Journal` (drained per batch) → "
            "`MemoryIndex` (recency on), the engine map a `U64Map` in every arm. Arms: "
            "**U64Dict** as shipped; **dict**: tiers are dicts, which the C loops "
            "(`or_bits`, `add_engine`, ...) handle in their dict branches; **dict, Python "
            "loops**: tiers are dicts and the loops are the pure-Python twins (what is left "
            "with neither `U64Dict` nor the C loops' dict branches). "
            "Scenarios: grow: no eviction; full: `max_keys` = half the distinct blocks, so "
            "the LRU eviction runs. Ingest is block-events per CPU second of the process; "
            "memory is tracemalloc's count of everything the index holds at the end per "
            "(block, pod) pair; the tables' columns are `sys.getsizeof` per pair (a "
            "`U64Dict`/`U64Map`: its whole allocation; a dict: its table only, not the key "
            "ints, which the engine map's values share).",
            "## Per arm (median, min–max over repetitions)\n\n"
            + table(
                [
                    "scenario",
                    "arm",
                    "tier type",
                    "ingest, block-events / CPU s",
                    "ingest, block-events / wall s",
                    "B per (block, pod) pair (tracemalloc, whole index)",
                    "tiers' tables",
                    "engine map's table",
                    "keys / pairs at end",
                ],
                rows,
            ),
            "## U64Dict against the alternatives\n\n"
            + table(
                [
                    "scenario",
                    "comparison",
                    "ingest (ratio of medians)",
                    "ingest (median of paired ratios, min … max)",
                    "memory per pair",
                ],
                verdict,
            ),
            "## Decision (threshold: > 10 % on ingest or on memory per pair)\n\n" + decision,
        ],
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
