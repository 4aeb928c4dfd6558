"""Soak: many pods publishing while schedulers score over HTTP; bounded, then checked exactly.

Run: ``python benchmarks/soak.py [--minutes 5] [--pods 32] [--out benchmarks/results/soak.md]``
(default ≤ 10 min; longer by flag). Pods are simulated vLLM engines with finite caches (so the
key count is bounded and memory must stay flat); a publishing thread drives them at full speed,
scoring threads hit ``/score_tokens``. Every 10 s the shards' RSS and key counts are sampled.
At the end the index is compared with the ground truth of what every pod holds.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from pathlib import Path

from kvray._env import apply_local_defaults  # noqa: E402  (before ray is imported)

apply_local_defaults()

import httpx  # noqa: E402
import msgspec  # noqa: E402
import ray  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _util import init_local_ray, pct, table, write_report  # noqa: E402

import kvray  # noqa: E402
from kvray import runtime  # noqa: E402
from kvray.config import Config, EventsConfig  # noqa: E402
from kvray.serve.app import start_http, stop_http  # noqa: E402
from kvray.sim import SimPod, SimPublisher  # noqa: E402
from kvray.sim.applied import wait_applied  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--pods", type=int, default=32)
    ap.add_argument("--cache-blocks", type=int, default=2048)
    ap.add_argument("--scorers", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/soak.md")
    args = ap.parse_args()
    init_local_ray()
    cfg = Config(namespace="soak", num_shards=2, events=EventsConfig(bind=["tcp://127.0.0.1:0"]))
    runtime.start(cfg, snapshot_interval_s=60)
    client = kvray.connect("soak")
    base = start_http(cfg)
    pods = []
    for i in range(args.pods):
        pub = SimPublisher(
            client.endpoints[0][0],
            f"kv@10.50.{i // 256}.{i % 256}@m",
            replay_endpoint="tcp://127.0.0.1:0",
        )
        pods.append(
            SimPod(
                pub.topic.decode().split("@")[1], "m", num_blocks=args.cache_blocks, publisher=pub
            )
        )
    for pod in pods:
        assert pod.publisher is not None and pod.publisher.wait_connected()
        client.register_replay(pod.pod_id, pod.publisher.replay_endpoint or "")
    rng = random.Random(1)
    docs = [[rng.randrange(150_000) for _ in range(rng.randint(256, 2048))] for _ in range(400)]
    stop = threading.Event()
    lat: list[float] = []
    errors = {"http": 0}

    def score_loop(seed: int) -> None:
        r = random.Random(seed)
        with httpx.Client(timeout=10) as http:
            while not stop.is_set():
                doc = r.choice(docs)
                t = time.perf_counter()
                resp = http.post(f"{base}/score_tokens", json={"model": "m", "token_ids": doc})
                lat.append(time.perf_counter() - t)
                if resp.status_code != 200:
                    errors["http"] += 1

    scorers = [
        threading.Thread(target=score_loop, args=(s,), daemon=True) for s in range(args.scorers)
    ]
    for t in scorers:
        t.start()
    samples: list[list[object]] = []
    t0 = time.monotonic()
    end = t0 + args.minutes * 60
    next_sample = t0
    requests = 0
    while time.monotonic() < end:
        pod = rng.choice(pods)
        doc = rng.choice(docs)
        pod.serve(doc[: rng.randint(64, len(doc))])
        requests += 1
        if time.monotonic() >= next_sample:
            st = msgspec.to_builtins(client.stats())
            samples.append(
                [
                    f"{time.monotonic() - t0:.0f}",
                    f"{sum(s['rss_bytes'] for s in st['shards']) / 2**20:.0f}",
                    f"{sum(s['rss_anon_bytes'] for s in st['shards']) / 2**20:.0f}",
                    f"{sum(s['keys'] for s in st['shards']):,}",
                    f"{sum(s['stored_blocks'] + s['removed_blocks'] for s in st['shards']):,}",
                    f"{client.replica.stats().keys:,}" if client.replica else "-",
                ]
            )
            next_sample += 10
    stop.set()
    for t in scorers:
        t.join()
    assert wait_applied(
        client, {p.pod_id: p.publisher.seq for p in pods if p.publisher}, timeout_s=120
    )
    elapsed = time.monotonic() - t0
    st = msgspec.to_builtins(client.stats())
    applied = sum(s["stored_blocks"] + s["removed_blocks"] for s in st["shards"])
    # Exact final check: kvray's score per pod == blocks each pod really holds, for every doc.
    mismatches = 0
    names = [p.pod_id for p in pods]
    for doc in docs:
        want = {p.pod_id: float(n) for p in pods if (n := p.cached_prefix_blocks(doc))}
        if client.score_tokens(doc, "m", pods=names) != want:
            mismatches += 1
    ing = st["ingestors"][0]
    rows = [
        ["duration", f"{elapsed:.0f} s"],
        ["pod requests simulated", f"{requests:,}"],
        ["block events applied", f"{applied:,} ({applied / elapsed / 1e3:.1f} k/s)"],
        ["HTTP scoring requests", f"{len(lat):,}, errors {errors['http']}"],
        ["HTTP scoring p50 / p99", f"{pct(lat, 50) * 1e3:.2f} / {pct(lat, 99) * 1e3:.2f} ms"],
        [
            "seq gaps / lost / malformed",
            f"{ing['seq_gaps']} / {ing['seq_lost']} / {ing['malformed']}",
        ],
        ["final index vs ground truth", f"{len(docs) - mismatches}/{len(docs)} prompts exact"],
    ]
    if client.replica is not None:
        rs = msgspec.to_builtins(client.replica.stats())
        rows.append(
            [
                "kvray.connect() read replica (scored the final check)",
                f"{rs['keys']:,} keys, {rs['applied_msgs']:,} change messages applied, "
                f"{rs['snapshots_loaded']} snapshots loaded, {rs['resyncs']} resyncs, "
                f"{rs['cpu_s']:.1f} CPU s",
            ]
        )
    for pod in pods:
        if pod.publisher is not None:
            pod.publisher.close()
    stop_http()
    runtime.stop("soak")
    ray.shutdown()
    print(
        write_report(
            args.out,
            "kvray soak",
            [
                f"{args.pods} pods × {args.cache_blocks}-block caches, "
                f"{args.scorers} HTTP scorers\n\n" + table(["measure", "value"], rows),
                "## Memory over time (2 shards)\n\n"
                + table(
                    [
                        "t (s)",
                        "shard RSS (MiB)",
                        "of which RssAnon",
                        "keys",
                        "block events",
                        "replica keys",
                    ],
                    samples,
                ),
            ],
        )
    )
    return 0 if mismatches == 0 and errors["http"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
