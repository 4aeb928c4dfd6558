"""Redis backend benchmarks: score latency of a 1024-block prompt, add/remove rates, memory.

Run: ``python benchmarks/bench_redis.py [--out benchmarks/results/redis.md] [--pairs 1000000]``.
Starts its own throwaway ``redis-server`` (unix socket, no persistence; ``--tcp`` for loopback
TCP instead) unless ``--redis-url`` points at an existing server, in which case it works under
a fresh prefix and deletes it afterwards. The fleet mirrors ``bench_core.py`` (1024-block
documents, each held by ~4 of 256 pods, added in batches of 32) so the two reports compare, plus
a shared-system-prompt fleet and a worst case where every pod holds the whole prompt.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).parent))
from _util import pct, table, write_report  # noqa: E402

from kvray.backends.redis import RedisBackend
from kvray.core.scoring import score_from_holders
from kvray.core.snapshot import encode_snapshot
from kvray.types import PodId, Tier

GPU, CPU = Tier("GPU"), Tier("CPU")
WEIGHTS = {"GPU": 1.0, "CPU": 0.8}
BATCH = 32
"""Blocks per add/remove call, like one engine step's events (same as bench_core)."""


# -- a private redis-server (tests/redis_server.py does the same for tests; benchmarks do not
#    import from tests) ------------------------------------------------------------------------


@contextmanager
def redis_server(tcp: bool) -> Iterator[str]:
    """Start ``redis-server`` on a unix socket (or a free loopback port); yield its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server not found on PATH (apt-get install redis-server), or --redis-url")
    workdir = Path(tempfile.mkdtemp(prefix="kvr-bench-"))
    sock = workdir / "redis.sock"
    port = 0
    if tcp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    url = f"redis://127.0.0.1:{port}/0" if tcp else f"unix://{sock}"
    log = (workdir / "redis.log").open("wb")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--unixsocket", str(sock)]
        + ["--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        client = redis.Redis.from_url(url, socket_timeout=1.0)
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                sys.exit(f"redis-server exited: {(workdir / 'redis.log').read_text()}")
            try:
                if (tcp or os.path.exists(sock)) and client.ping():
                    break
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                sys.exit("redis-server did not answer PING within 10 s")
            time.sleep(0.01)
        client.close()
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


# -- fleets ------------------------------------------------------------------------------------


def build_fleet(
    pairs: int, pods: int, per_block: int, doc_blocks: int, seed: int = 7
) -> list[tuple[list[int], list[int]]]:
    """Documents of ``doc_blocks`` keys, each held by ``per_block`` random pods (bench_core)."""
    rng = random.Random(seed)
    n_docs = max(1, pairs // (per_block * doc_blocks))
    return [
        ([rng.getrandbits(64) for _ in range(doc_blocks)], rng.sample(range(pods), per_block))
        for _ in range(n_docs)
    ]


def _add_batched(backend: RedisBackend, pod: PodId, tier: Tier, keys: Sequence[int]) -> int:
    for i in range(0, len(keys), BATCH):
        backend.add(pod, tier, keys[i : i + BATCH])
    return len(keys)


def timed(fn: Callable[[], object], runs: int) -> list[float]:
    """Seconds per call over ``runs`` calls (after 10 warm-up calls)."""
    for _ in range(10):
        fn()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _lat_row(name: str, lat: list[float], note: str = "") -> list[object]:
    return [
        name,
        len(lat),
        f"{pct(lat, 50) * 1e6:,.0f}",
        f"{pct(lat, 99) * 1e6:,.0f}",
        f"{sum(lat) / len(lat) * 1e6:,.0f}",
        note,
    ]


def _used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def run(url: str, pairs: int, pods: int, runs: int, *, cleanup: bool) -> list[str]:
    """All measurements against the server at ``url``; returns report sections.

    With ``cleanup``, everything written is deleted at the end (for a server we do not own).
    """
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    admin = redis.Redis.from_url(url, decode_responses=True)
    backend = RedisBackend(url, prefix=prefix, socket_timeout_s=30.0)
    worst = RedisBackend(url, prefix=f"{prefix}-worst", socket_timeout_s=30.0)
    names = [PodId(f"10.0.{i // 256}.{i % 256}") for i in range(pods)]
    rng = random.Random(3)
    try:
        # -- load: documents held by ~4 pods, batches of 32 ----------------------------------
        docs = build_fleet(pairs, pods, 4, 1024)
        mem0 = _used_memory(admin)
        t0 = time.perf_counter()
        n_add = 0
        for keys, holders in docs:
            for h in holders:
                n_add += _add_batched(backend, names[h], GPU, keys)
        t_add = time.perf_counter() - t0
        st = backend.stats()
        bytes_per_pair = (_used_memory(admin) - mem0) / max(1, st.pairs)

        t0 = time.perf_counter()
        n_rm = 0
        for keys, holders in docs[: max(1, len(docs) // 10)]:
            for i in range(0, len(keys), BATCH):
                backend.remove(names[holders[0]], GPU, keys[i : i + BATCH])
                n_rm += len(keys[i : i + BATCH])
            _add_batched(backend, names[holders[0]], GPU, keys)
        t_rm = time.perf_counter() - t0

        # -- a shared system prompt: every pod holds its first 128 blocks (a quarter of them
        #    in CPU), 32 pods continue into a shared document for 128..1024 blocks ----------
        shared = [rng.getrandbits(64) for _ in range(1024)]
        for i, name in enumerate(names):
            _add_batched(backend, name, CPU if i % 4 == 0 else GPU, shared[:128])
        for name in rng.sample(names, 32):
            _add_batched(backend, name, GPU, shared[: rng.randint(128, 1024)])
        filt = [str(n) for n in rng.sample(names, 16)]

        # -- worst case: every pod holds the whole prompt (separate prefix) -------------------
        for name in names:
            _add_batched(worst, name, GPU, shared)
        st = backend.stats()

        def doc_prompt() -> list[int]:
            return rng.choice(docs)[0]

        def half_prompt() -> list[int]:
            return doc_prompt()[:512] + [rng.getrandbits(64) for _ in range(512)]

        prompts = [doc_prompt() for _ in range(64)]
        halves = [half_prompt() for _ in range(64)]
        misses = [[rng.getrandbits(64) for _ in range(1024)] for _ in range(8)]

        nxt_p = itertools.cycle(prompts).__next__
        nxt_h = itertools.cycle(halves).__next__
        nxt_m = itertools.cycle(misses).__next__

        # Client-side scoring for comparison: fetch every block's holders (one script, one
        # round trip) and score in Python, with no early stop.
        def client_side() -> None:
            score_from_holders(backend.holders(nxt_p()), WEIGHTS)

        lat_rows = [
            _lat_row("full hit, ~4 holders", timed(lambda: backend.score(nxt_p(), WEIGHTS), runs)),
            _lat_row(
                "512-block hit, ~4 holders",
                timed(lambda: backend.score(nxt_h(), WEIGHTS), runs),
            ),
            _lat_row(
                "shared system prompt: 256 pods × 128 blocks, 32 pods longer",
                timed(lambda: backend.score(shared, WEIGHTS), runs),
            ),
            _lat_row(
                "same, restricted to 16 candidate pods",
                timed(lambda: backend.score(shared, WEIGHTS, filt), runs),
            ),
            _lat_row(
                "worst case: 256 pods × all 1024 blocks",
                timed(lambda: worst.score(shared, WEIGHTS), runs),
            ),
            _lat_row(
                "miss (block 0 unknown)", timed(lambda: backend.score(nxt_m(), WEIGHTS), runs)
            ),
            _lat_row(
                "for comparison: holders() of 1024 blocks + Python scoring, full hit",
                timed(client_side, runs),
                "not what score does",
            ),
        ]
        # Sanity: the Lua walk and the reference agree on the benchmark data.
        for p in prompts[:4] + [shared]:
            assert backend.score(p, WEIGHTS) == score_from_holders(backend.holders(p), WEIGHTS)

        version = admin.info("server")["redis_version"]
        transport = url.split("://", 1)[0]
        load_rows = [
            ["(block, pod, tier) entries", f"{st.pairs:,}"],
            ["distinct (key, tier) entries", f"{st.keys:,}"],
            ["pods", f"{st.pods:,}"],
            [f"add rate (batches of {BATCH})", f"{n_add / t_add / 1e3:,.0f} k block-events/s"],
            [f"add calls/s (batches of {BATCH})", f"{n_add / BATCH / t_add:,.0f}"],
            [
                f"remove rate (batches of {BATCH}; timed with the re-adds, as bench_core)",
                f"{n_rm / t_rm / 1e3:,.0f} k block-events/s",
            ],
            ["Redis memory (used_memory delta)", f"{bytes_per_pair:,.0f} B per entry"],
        ]
        return [
            f"redis-server {version} over `{transport}://` on the same host, redis-py "
            f"{redis.__version__}, {os.cpu_count()} CPUs; {pods} pods. Every `score` call is "
            "one round trip (one EVALSHA).",
            "## Index load\n\n" + table(["measure", "value"], load_rows),
            "## `score` of a 1024-block prompt (µs, client-side wall time)\n\n"
            + table(["scenario", "runs", "p50", "p99", "mean", "note"], lat_rows),
        ]
    finally:
        if cleanup:
            # An empty snapshot restored is a wipe of exactly this backend's keys.
            for b in (backend, worst):
                b.restore(encode_snapshot({}, []))
        backend.close()
        worst.close()
        admin.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/results/redis.md")
    ap.add_argument("--pairs", type=int, default=1_000_000)
    ap.add_argument("--pods", type=int, default=256)
    ap.add_argument("--runs", type=int, default=300, help="score calls per scenario (≥ 200)")
    ap.add_argument("--tcp", action="store_true", help="loopback TCP instead of a unix socket")
    ap.add_argument("--redis-url", help="use this server instead of starting one")
    args = ap.parse_args()
    if args.runs < 200:
        ap.error("--runs must be at least 200 for a meaningful p99")
    if args.redis_url:
        sections = run(args.redis_url, args.pairs, args.pods, args.runs, cleanup=True)
    else:
        with redis_server(args.tcp) as url:
            sections = run(url, args.pairs, args.pods, args.runs, cleanup=False)
    print(write_report(args.out, "kvray Redis backend benchmarks", sections))


if __name__ == "__main__":
    main()
