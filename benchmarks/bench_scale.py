"""kvray at scale, deployed as ``kvray serve`` deploys it: ``python benchmarks/bench_scale.py``.

For each point (pods × live (block, pod) pairs) a fresh kvray (its defaults: 2 shards, one
ingestor, hash checks, snapshots every 10 s, the Serve application with its read replica, plus
this process's ``kvray.connect()`` client and its replica) ingests a synthetic vLLM stream and
is measured:

* ingest: block-events/s from the first frame sent to every batch applied and visible to the
  ``connect()`` replica;
* memory per live pair, per copy: the private heap growth (RssAnon) of each kvray process
  (shards, controller, ingestor, Serve replicas) and of this process (the ``connect()``
  replica, after ``malloc_trim``), measured after a snapshot cycle, and their sum;
* queries of 128 and 1,024 blocks, p50/p99, through ``connect()`` and over HTTP;
* event-to-visible lag at half the sustained rate: pods evict and store again the tail of a
  chain they hold (the cache ends as it was), batches stamped when sent, lag taken when the
  owning shard has applied them (p50/p99 over every batch);
* exactness: every query's per-pod scores against the ground truth of the stream (after the
  churn);
* recovery: a shard killed (Ray restarts it from the controller's snapshot) until it holds its
  pairs again; a new ``connect()`` client until its replica is ready.

The stream is the shape the issue measured Dynamo with: 256 distinct chains of up to 1,024
blocks in 8 groups that share a 32-block prefix; each pod holds some of them (a pod holding two
chains of a group stores the shared prefix once, as vLLM's prefix cache does). Block hashes are
vLLM's (sha256_cbor, computed once per distinct block), every batch a real vLLM 0.33 frame with
``BlockStored`` events of 128 blocks (a chunked prefill's step). All pods publish through one
socket connected to kvray's bound central endpoint (the topic names the pod), the topology a
fleet of thousands uses. Not measured here yet: a multi-node cluster (docs/scaling.md).

``--check`` (CI runs a small point) exits 1 on any wrong score or rejected batch.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import sys
import time
from dataclasses import dataclass
from math import nan
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root

for _k, _v in {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    "HF_HUB_OFFLINE": "1",
}.items():
    os.environ.setdefault(_k, _v)

import zmq  # noqa: E402

from benchmarks._util import init_local_ray, pct, table, write_report  # noqa: E402
from benchmarks.dynamo.kvray_side import (  # noqa: E402
    KVRAY,
    kvray_runtime,
    kvray_stop,
    ray_processes,
)
from benchmarks.dynamo.measure import (  # noqa: E402
    Http,
    Proc,
    rss_anon,
    timed,
    trimmed_self_anon,
)
from kvray.core.events import WireBlockRemoved, WireBlockStored, encode_batch  # noqa: E402
from kvray.core.hashing import BlockHasher  # noqa: E402

BLOCK = 16
MODEL = "m"
CHAINS, CHAIN_MAX, GROUPS, SHARED = 256, 1024, 8, 32
STEP = 128  # blocks per BlockStored (one chunked-prefill step)
SIZES = (128, 1024)


# --- the stream ---------------------------------------------------------------------------------


class Corpus:
    """256 chains of 1,024 blocks (8 groups sharing a 32-block prefix), hashed once."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(seed)
        hasher = BlockHasher(block_size=BLOCK)
        shared = [[rng.randrange(150_000) for _ in range(SHARED * BLOCK)] for _ in range(GROUPS)]
        self.tokens: list[list[int]] = []
        self.keys: list[list[int]] = []
        for c in range(CHAINS):
            toks = shared[c % GROUPS] + [
                rng.randrange(150_000) for _ in range((CHAIN_MAX - SHARED) * BLOCK)
            ]
            self.tokens.append(toks)
            self.keys.append(hasher.event_keys(toks))
        self._payloads: dict[tuple[int, int, int], bytes] = {}

    def payload(self, chain: int, start: int, length: int) -> tuple[bytes, int]:
        """The batch storing blocks ``start..length-1`` of ``chain`` (parent: block start-1)."""
        key = (chain, start, length)
        p = self._payloads.get(key)
        if p is None:
            keys, toks = self.keys[chain], self.tokens[chain]
            events = []
            for s in range(start, length, STEP):
                e = min(length, s + STEP)
                events.append(
                    WireBlockStored(
                        block_hashes=list(keys[s:e]),
                        parent_block_hash=keys[s - 1] if s else None,
                        token_ids=toks[s * BLOCK : e * BLOCK],
                        block_size=BLOCK,
                        lora_id=None,
                        medium="GPU",
                        lora_name=None,
                    )
                )
            p = self._payloads[key] = encode_batch(events, ts=0.0)  # type: ignore[arg-type]
        return p, length - start

    def churn(self, chain: int, length: int) -> tuple[bytes, bytes, int]:
        """Evict the last ≤ ``STEP`` blocks of ``chain``'s first ``length`` and store them
        again: two batches that leave the pod's cache as it was."""
        k = min(STEP, length)
        keys, toks = self.keys[chain], self.tokens[chain]
        gone = encode_batch([WireBlockRemoved(list(keys[length - k : length]), "GPU")], ts=0.0)
        back = encode_batch(
            [
                WireBlockStored(
                    block_hashes=list(keys[length - k : length]),
                    parent_block_hash=keys[length - k - 1] if length > k else None,
                    token_ids=toks[(length - k) * BLOCK : length * BLOCK],
                    block_size=BLOCK,
                    lora_id=None,
                    medium="GPU",
                    lora_name=None,
                )
            ],
            ts=0.0,
        )  # type: ignore[list-item]
        return gone, back, k


def _stamped(payload: bytes) -> bytes:
    """``payload`` (a vLLM batch ``[ts, events, rank]`` encoded with ts 0.0) stamped now."""
    assert payload[:2] == b"\x93\xcb"  # fixarray(3), float64 ts first
    return payload[:2] + struct.pack(">d", time.time()) + payload[10:]


@dataclass
class Stream:
    pods: int
    length: int
    """Blocks per chain held (the first ``length`` of each)."""
    holdings: list[list[int]]
    """Per pod, the chains it holds."""
    frames: list[tuple[int, bytes, int]]
    """(pod, payload, block-events), in send order (pods interleaved)."""
    pairs: int


def build(corpus: Corpus, pods: int, pairs: int, seed: int) -> Stream:
    """Each pod holds ``m`` chains' first ``length`` blocks, ~``pairs`` pairs in all."""
    rng = random.Random(seed)
    per_pod = max(1, pairs // pods)
    length = min(CHAIN_MAX, per_pod)
    m = max(1, per_pod // length)
    holdings = [rng.sample(range(CHAINS), m) for _ in range(pods)]
    per_pod_frames: list[list[tuple[int, bytes, int]]] = []
    live = 0
    for pod, chains in enumerate(holdings):
        groups: set[int] = set()
        out = []
        for c in chains:
            start = SHARED if c % GROUPS in groups and length > SHARED else 0
            groups.add(c % GROUPS)
            payload, n = corpus.payload(c, start, length)
            out.append((pod, payload, n))
            live += n
        per_pod_frames.append(out)
    frames = [f for rnd in zip(*per_pod_frames, strict=True) for f in rnd]
    return Stream(pods, length, holdings, frames, live)


def queries(corpus: Corpus, n: int, seed: int) -> dict[int, list[tuple[int, list[int]]]]:
    """Per size: ``(chain, prompt)``, the prompt being the chain's first ``size`` blocks."""
    rng = random.Random(seed)
    return {
        size: [
            (c, corpus.tokens[c][: size * BLOCK]) for c in (rng.randrange(CHAINS) for _ in range(n))
        ]
        for size in SIZES
    }


def truth(s: Stream, chain: int, size: int) -> dict[str, float]:
    """Per pod: leading blocks of ``chain``'s first ``size`` blocks it holds, from the stream's
    holdings (not from kvray): the chain itself, else the group's shared prefix, else none."""
    want: dict[str, float] = {}
    group = chain % GROUPS
    for pod, chains in enumerate(s.holdings):
        if chain in chains:
            run = min(size, s.length)
        elif any(c % GROUPS == group for c in chains):
            run = min(size, s.length, SHARED)
        else:
            continue
        want[f"pod{pod}"] = float(run)
    return want


# --- measuring ----------------------------------------------------------------------------------


def _send(endpoint: str, s: Stream) -> dict[str, int]:
    """Publish every frame through one XPUB connected to kvray's bound endpoint; returns
    once ZMQ has handed every frame over (a 5 s linger dropped the tail of a 50 M-pair
    stream: ~3 GB queued at once)."""
    sock = _xpub(endpoint)
    sock.setsockopt(zmq.LINGER, -1)
    seqs = [0] * s.pods
    topics = _topics(s.pods)
    for pod, payload, _ in s.frames:
        sock.send_multipart([topics[pod], seqs[pod].to_bytes(8, "big"), payload], copy=False)
        seqs[pod] += 1
    sock.close()
    return {f"pod{i}": n for i, n in enumerate(seqs) if n}


def _topics(pods: int) -> list[bytes]:
    """Each pod's ZMQ topic (the topic names the pod: all share one socket)."""
    return [f"kv@pod{i}@{MODEL}".encode() for i in range(pods)]


def _xpub(endpoint: str) -> zmq.Socket[Any]:
    """An XPUB connected to kvray's bound endpoint, once kvray has subscribed."""
    sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.XPUB)
    sock.setsockopt(zmq.LINGER, 5000)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.XPUB_VERBOSE, 1)
    sock.connect(endpoint)
    if not sock.poll(20_000, zmq.POLLIN):
        raise RuntimeError(f"kvray did not subscribe at {endpoint}")
    sock.recv()
    return sock


def _churn(
    endpoint: str, corpus: Corpus, s: Stream, seqs: dict[str, int], rate: float, seconds: float
) -> int:
    """Publish evict-and-store-again batch pairs, stamped at send, at ``rate`` block-events/s
    for ``seconds`` (pods and chains round-robin); advances ``seqs``; returns block-events."""
    sock = _xpub(endpoint)
    cycles = [(pod, *corpus.churn(chains[0], s.length)) for pod, chains in enumerate(s.holdings)]
    topics = _topics(s.pods)
    sent, t0, i = 0, time.perf_counter(), 0
    while (elapsed := time.perf_counter() - t0) < seconds:
        ahead = sent / rate - elapsed
        if ahead > 0:
            time.sleep(ahead)
        pod, gone, back, k = cycles[i % len(cycles)]
        name = f"pod{pod}"
        for payload in (gone, back):
            seq = seqs[name]
            sock.send_multipart([topics[pod], seq.to_bytes(8, "big"), _stamped(payload)])
            seqs[name] = seq + 1
        sent += 2 * k
        i += 1
    sock.close()
    return sent


def _nodes_of_actors() -> dict[str, list[str]]:
    """Live actor class → the nodes its actors run on (the GCS's actor table)."""
    from ray._private import state

    out: dict[str, list[str]] = {}
    for info in state.actors(actor_state_name="ALIVE").values():
        name = str(info.get("ActorClassName", "")).split(":")[0]
        node = (info.get("Address") or {}).get("NodeID")
        if node:
            out.setdefault(name, []).append(str(node))
    return out


def _between_nodes(client: Any, s: Stream, ingest_bytes: dict[int, int]) -> dict[str, Any]:
    """Where kvray's actors run and the bytes that cross nodes per block-event: each pod's
    batches from the ingestor to its shard when they are on different nodes, and each shard's
    change stream to every read replica on another node (the Serve replicas, this driver's
    ``connect()`` replica)."""
    import ray

    placed = _nodes_of_actors()
    shard_nodes = ray.get([sh.node_id.remote() for sh in client.shards])
    ing_node = ray.get(client.ingestors[0].node_id.remote())
    readers = placed.get("ServeReplica", []) + [ray.get_runtime_context().get_node_id()]
    st = client.stats()
    to_shards = sum(b for i, b in ingest_bytes.items() if shard_nodes[i] != ing_node)
    changes = sum(
        x.change_bytes * sum(1 for r in readers if r != shard_nodes[x.shard]) for x in st.shards
    )
    return {
        "nodes": len({*shard_nodes, ing_node, *readers}),
        "shard_nodes": len(set(shard_nodes)),
        "reader_nodes": len(set(readers)),
        "ingest_between_nodes_B": to_shards,
        "changes_between_nodes_B": changes,
        "between_nodes_B_per_event": (to_shards + changes) / max(1, s.pairs),
    }


def _anon(roles: dict[str, list[Proc]]) -> dict[str, int]:
    return {r: rss_anon(ps) for r, ps in roles.items() if r != "ray-system"}


def run_point(
    corpus: Corpus, pods: int, pairs: int, n_queries: int, seed: int, lag_seconds: float = 10.0
) -> dict[str, Any]:
    import ray

    import kvray
    from kvray.sim.applied import wait_applied

    s = build(corpus, pods, pairs, seed)
    qs = queries(corpus, n_queries, seed + 1)
    want = {size: [truth(s, c, size) for c, _ in qs[size]] for size in SIZES}
    prompts = {size: [p for _, p in qs[size]] for size in SIZES}
    res: dict[str, Any] = {"pods": pods, "pairs": s.pairs, "chain_blocks": s.length}
    ns = f"kvray-scale-{pods}-{pairs}"
    cfg, client, base = kvray_runtime(ns)
    try:
        roles = ray_processes()
        anon0, self0 = _anon(roles), trimmed_self_anon()
        t0 = time.perf_counter()
        expect = _send(client.endpoints[0][0], s)
        if not wait_applied(client, expect, timeout_s=1800):
            raise RuntimeError("kvray did not apply the stream in 30 min")
        res["ingest_s"] = time.perf_counter() - t0
        res["ingest_rate"] = s.pairs / res["ingest_s"]
        done = time.monotonic()
        res["snapshot_wait_s"] = _until(lambda: _snapshotted_since(client, done))
        ray.get([sh.release_memory.remote() for sh in client.shards])
        anon1 = _anon(roles)
        res["anon_delta"] = {r: anon1[r] - anon0.get(r, 0) for r in anon1}
        res["anon_delta"]["connect() replica"] = trimmed_self_anon() - self0
        st = client.stats()
        res["shard_pairs"] = sum(x.pairs for x in st.shards)
        res["change_bytes"] = sum(x.change_bytes for x in st.shards)
        res["shard_bytes_estimate"] = sum(x.bytes_estimate for x in st.shards)
        rep = client.replica.stats() if client.replica is not None else None
        res["replica_bytes_estimate"] = rep.bytes_estimate if rep else 0
        res["rejected"] = {k: v for x in st.shards for k, v in x.rejected.items()}
        placement = cfg.placement()
        per_shard: dict[int, int] = {}
        for pod, payload, _ in s.frames:
            i = placement.owner(f"pod{pod}")
            per_shard[i] = per_shard.get(i, 0) + len(payload)
        res["placement"] = _between_nodes(client, s, per_shard)
        # Event-to-visible lag at half the sustained rate: batches stamped when sent, the lag
        # taken when the owning shard has applied them (queryable through the shards).
        counts0 = [c for c, _ in ray.get([sh.lags.remote() for sh in client.shards])]
        churned = _churn(
            client.endpoints[0][0], corpus, s, expect, res["ingest_rate"] / 2, lag_seconds
        )
        if not wait_applied(client, expect, timeout_s=600):
            raise RuntimeError("kvray did not apply the churn")
        lags: list[float] = []
        for c0, (c1, last) in zip(
            counts0, ray.get([sh.lags.remote() for sh in client.shards]), strict=True
        ):
            lags += last[len(last) - min(len(last), c1 - c0) :]
        res["lag_rate"] = churned / lag_seconds
        res["lag_ms"] = (pct(lags, 50) * 1e3, pct(lags, 99) * 1e3) if lags else (nan, nan)
        res["lag_batches"] = len(lags)
        # Queries: exactness, then latency.
        h = Http(base)
        wrong = 0
        for size in SIZES:
            bodies = [json.dumps({"model": MODEL, "token_ids": p}).encode() for p in prompts[size]]
            for p, b, w in zip(prompts[size], bodies, want[size], strict=True):
                got = client.score_tokens(p, MODEL)
                got_http = {k: v for k, v in h.post("/score_tokens", b)["scores"].items() if v}
                wrong += (got != w) + (got_http != w)
            lat_c = timed(lambda p: client.score_tokens(p, MODEL), prompts[size], 3)
            lat_h = timed(lambda b: h.post("/score_tokens", b), bodies, 3)
            res[f"q{size}_connect"] = (pct(lat_c, 50) * 1e3, pct(lat_c, 99) * 1e3)
            res[f"q{size}_http"] = (pct(lat_h, 50) * 1e3, pct(lat_h, 99) * 1e3)
        res["wrong"] = wrong
        res["checked"] = 2 * len(SIZES) * n_queries
        # Recovery: a shard killed (restored from the controller's snapshot), a new replica.
        # The stream's pods have no replay socket: the snapshot must be the shard's last state
        # (one pulled mid-churn would miss what was stored after it, for good).
        ray.get(client.controller.snapshot_now.remote())
        before = _pairs(client.shards[0])
        old = _incarnation(client.shards[0])
        ray.kill(client.shards[0], no_restart=False)
        # The kill is asynchronous: the old process may still answer; wait for the new one.
        res["shard_recovery_s"] = _until(
            lambda: (
                _incarnation(client.shards[0]) not in (None, old)
                and _pairs(client.shards[0]) == before
            )
        )
        t0 = time.perf_counter()
        fresh = kvray.connect(ns)
        res["replica_start_s"] = time.perf_counter() - t0
        fresh.close()
    finally:
        kvray_stop(ns)
    return res


def _snapshotted_since(client: Any, t: float) -> bool:
    """Whether the controller holds a snapshot of every shard taken after ``t``."""
    ages = client.controller_status().get("snapshot_ages_s") or {}
    vals = list(ages.values()) if isinstance(ages, dict) else list(ages)
    now = time.monotonic()
    return bool(vals) and all(a is not None and now - a > t for a in vals)


def _pairs(shard: Any) -> int | None:
    import ray

    try:
        return int(ray.get(shard.stats.remote(), timeout=5).pairs)
    except Exception:  # still restarting
        return None


def _incarnation(shard: Any) -> str | None:
    import ray

    try:
        return str(ray.get(shard.replica_endpoint.remote(), timeout=5)[1])
    except Exception:  # still restarting
        return None


def _until(pred: Any, timeout_s: float = 600.0) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if pred():
            return time.perf_counter() - t0
        time.sleep(0.05)
    return float("nan")


# --- report -------------------------------------------------------------------------------------


def render(points: list[dict[str, Any]], args: argparse.Namespace) -> str:
    roles = ["IndexShard", "Controller", "Ingestor", "ServeReplica", "connect() replica"]
    rows = []
    for r in points:
        per = {k: r["anon_delta"].get(k, 0) / r["pairs"] for k in roles}
        total = sum(max(0.0, v) for v in per.values())
        rows.append(
            [
                f"{r['pods']:,}",
                f"{r['pairs']:,}",
                f"{r['ingest_rate'] / 1e3:,.0f} k",
                *(f"{per[k]:.0f}" for k in roles),
                f"**{total:.0f}**",
                "{:.2f} / {:.2f}".format(*r["q128_connect"]),
                "{:.2f} / {:.2f}".format(*r["q1024_connect"]),
                "{:.2f} / {:.2f}".format(*r["q128_http"]),
                "{:.2f} / {:.2f}".format(*r["q1024_http"]),
                "{:.1f} / {:.1f}".format(*r["lag_ms"]) + f" @ {r['lag_rate'] / 1e3:,.0f} k/s",
                f"{r['change_bytes'] / r['pairs']:.1f}",
                f"{r['placement']['nodes']} / {r['placement']['between_nodes_B_per_event']:.1f}",
                f"{r['wrong']} of {r['checked']}",
                f"{r['shard_recovery_s']:.1f}",
                f"{r['replica_start_s']:.1f}",
            ]
        )
    headers = [
        "pods", "live pairs", "ingest (block-events/s)",
        *(f"B/pair {k}" for k in roles), "B/pair all copies",
        "128 p50/p99 ms connect()", "1024 p50/p99 ms connect()",
        "128 p50/p99 ms HTTP", "1024 p50/p99 ms HTTP",
        "lag p50/p99 ms @ half rate", "change stream B/block-event",
        "nodes / B between nodes per block-event", "wrong scores",
        "shard recovery s", "new replica s",
    ]  # fmt: skip
    setup = (
        f"Command: `python benchmarks/bench_scale.py {' '.join(sys.argv[1:])}`. kvray as `kvray "
        "serve` deploys it (defaults: 2 shards, 1 ingestor, hash checks on, snapshots every "
        "10 s, the Serve application with direct ingress), plus this process's `kvray.connect()`"
        " client. Memory: RssAnon growth per process role from before the stream to after a "
        "snapshot cycle (shards `malloc_trim`med); 'all copies' sums them. Stream: 256 chains "
        "of ≤ 1,024 blocks in 8 groups sharing a 32-block prefix, real vLLM hashes and frames, "
        "all pods through kvray's bound central socket. Machine: 2 cores"
        + (
            f"; {args.nodes} Ray nodes on it (`ray.cluster_utils.Cluster`, one raylet and object "
            "store each). 'B between nodes' is what crosses nodes per block-event: batches from "
            "the ingestor to shards on other nodes, and change streams to read replicas on "
            "other nodes."
            if args.nodes > 1
            else "; one Ray node."
        )
    )
    return "\n\n".join(["## Results", setup, table(headers, rows), plot(points, args.out)])


def plot(points: list[dict[str, Any]], out: str) -> str:
    """Curves next to the report (``scale.png``): each measure against the point."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "PNG skipped: matplotlib is not importable."
    labels = [f"{r['pods']:,} pods\n{r['pairs'] / 1e6:.1f} M" for r in points]
    x = range(len(points))
    roles = ["IndexShard", "Controller", "Ingestor", "ServeReplica", "connect() replica"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    ax.plot(x, [r["ingest_rate"] / 1e3 for r in points], "o-")
    ax.set_title("ingest, k block-events/s")
    ax = axes[0][1]
    bottom = [0.0] * len(points)
    for role in roles:
        vals = [max(0.0, r["anon_delta"].get(role, 0) / r["pairs"]) for r in points]
        ax.bar(x, vals, bottom=bottom, label=role)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_title("memory, B per live pair (RssAnon, every copy)")
    ax.legend(fontsize=7)
    ax = axes[1][0]
    for key, name in (("q1024_connect", "connect()"), ("q1024_http", "HTTP")):
        ax.plot(x, [r[key][0] for r in points], "o-", label=f"{name} p50")
        ax.plot(x, [r[key][1] for r in points], "o--", label=f"{name} p99")
    ax.set_title("1,024-block query, ms")
    ax.legend(fontsize=7)
    ax = axes[1][1]
    ax.plot(x, [r["lag_ms"][0] for r in points], "o-", label="p50")
    ax.plot(x, [r["lag_ms"][1] for r in points], "o--", label="p99")
    ax.set_title("event-to-visible lag at half the ingest rate, ms")
    ax.legend(fontsize=7)
    for a in axes.flat:
        a.set_xticks(list(x), labels, fontsize=7)
    fig.tight_layout()
    png = Path(out).with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return f"![curves]({png.name})"


def start_nodes(n: int) -> Any:
    """A head and ``n - 1`` worker nodes on this machine, each a raylet with its own object
    store (as ``ray start`` on three hosts, minus the network)."""
    import ray
    from ray.cluster_utils import Cluster

    store = 256 * 2**20
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "object_store_memory": store, "include_dashboard": False},
    )
    for _ in range(n - 1):
        cluster.add_node(num_cpus=2, object_store_memory=store)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
    return cluster


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", default="16:1e6,1024:1e6,4096:1e6,1024:1e7,4096:1e7",
                    help="pods:pairs points, comma-separated")  # fmt: skip
    ap.add_argument("--queries", type=int, default=30, help="prompts per size")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/scale.md")
    ap.add_argument("--json", default=None)
    ap.add_argument("--lag-seconds", type=float, default=10.0,
                    help="how long the half-rate churn that measures the lag runs")  # fmt: skip
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if any score was wrong or any batch rejected (CI)")  # fmt: skip
    ap.add_argument("--nodes", type=int, default=1,
                    help="Ray nodes on this machine (ray.cluster_utils.Cluster)")  # fmt: skip
    args = ap.parse_args(argv)
    cluster = start_nodes(args.nodes) if args.nodes > 1 else None
    if cluster is None:
        init_local_ray()
    # The fleet's pods connect to kvray (the llm-d topology): kvray binds its central socket.
    KVRAY.events = {"bind": ["tcp://127.0.0.1:0"]}
    t0 = time.perf_counter()
    corpus = Corpus(args.seed)
    print(f"corpus: {CHAINS} chains hashed in {time.perf_counter() - t0:.1f} s", flush=True)
    points = []
    for spec in args.points.split(","):
        pods_s, pairs_s = spec.split(":")
        r = run_point(
            corpus, int(pods_s), int(float(pairs_s)), args.queries, args.seed, args.lag_seconds
        )
        points.append(r)
        print(json.dumps(r, default=str), flush=True)
    text = write_report(args.out, "kvray at scale", [render(points, args)])
    if args.json:
        Path(args.json).write_text(json.dumps(points, indent=1, default=str))
    print(text)
    bad = [r for r in points if r["wrong"] or r["rejected"]]
    if args.check and bad:
        sys.exit(f"wrong scores or rejected batches: {[(r['pods'], r['pairs']) for r in bad]}")
    if cluster is not None:
        import ray

        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
