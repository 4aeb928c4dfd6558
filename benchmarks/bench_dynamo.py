"""Head to head with NVIDIA Dynamo's standalone KV indexer (``python -m dynamo.indexer``).

Run: ``python benchmarks/bench_dynamo.py [--out benchmarks/results/dynamo.md] [--pods 16,256]
[--blocks N]``. Needs ``ai-dynamo-runtime`` (the ``bench`` extra); by default its interpreter is
looked up in ``/work/dynamo-venv`` (``--dynamo-python``), a separate venv, because the peer runs
as its own process anyway.

For each pod count, in ONE run:

1. Simulated vLLM pods (``kvray.sim.SimPod``: real prefix-cache LRU, real sha256 block hashes,
   real vLLM 0.33 msgpack frames) serve a shared-prefix workload; every pod's batches are
   pre-encoded once. Each system then gets FRESH publishers that BIND (vLLM's default topology)
   and is told to connect to them (Dynamo: ``POST /register``; kvray: ``client.add_pod``); the
   same frames are sent in the same order. Dynamo runs first, then kvray.
2. Both answer the same prompts (128- and 1024-block); per query and pod the matched blocks must
   agree (Dynamo answers tokens: divided by the block size). Each answer is also checked against
   the ground truth of the simulated caches, which says who is right when they differ.
3. Ingest rate (first frame sent → everything applied, i.e. queryable), CPU seconds per 1 M
   block-events (the peer's process; kvray's Ray processes), memory per (block, pod) pair (RSS
   deltas; kvray also its shards' ``bytes_estimate``), query p50/p99: Dynamo HTTP ``/query`` vs
   kvray HTTP ``/score_tokens`` and ``kvray.connect().score_tokens``.
4. kvray is profiled with py-spy on a second, identical run (so sampling does not distort the
   numbers above): ingestor + shards while ingesting, shards + Serve replica + the driver while
   querying.

Dynamo's HTTP server always binds 0.0.0.0 (no host option), so its whole phase runs in a private
network namespace (``unshare -n``, loopback only) when this runs as root; otherwise it runs on
the host and the report says so.

Other people's work on a shared machine: before each system's phase the script waits for
processes outside its own tree to go quiet (``--quiet-wait``), records their CPU during the
phase, and redoes a disturbed phase (``--retries``). Linux only (reads ``/proc``). Findings and
proposed changes: ``docs/dynamo.md``.

Targets (kvray/Dynamo): ingest ≥ 0.5×; memory per pair ≤ 1.0×; ``kvray.connect()`` query p50
≤ 1.0× Dynamo's HTTP p50; kvray HTTP p50 ≤ 3×; zero disagreements.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import pickle
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from kvray._env import apply_local_defaults  # noqa: E402  (before ray is imported)

apply_local_defaults()
for k, v in {
    # Direct-ingress replicas listen from port 30000 up by default, where other kvray
    # deployments on a shared machine (and their HTTP fuzzers) listen too: use a range of our
    # own so nobody else's traffic reaches the endpoint being measured.
    "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": "45310",
    "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": "45330",
    "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": "45330",
    "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": "45350",
}.items():
    os.environ.setdefault(k, v)

import numpy as np  # noqa: E402
import zmq  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _util import init_local_ray, pct, table, write_report  # noqa: E402

from kvray.core import fast  # noqa: E402
from kvray.core.events import WireEvent, encode_batch  # noqa: E402
from kvray.sim import SimPod  # noqa: E402

BLOCK = 16
MODEL = "m"
SIZES = (128, 1024)  # query prompt lengths in blocks
DEFAULT_DYNAMO_PY = "/work/dynamo-venv/bin/python"


# --- the event stream ------------------------------------------------------------------------


class _Capture:
    """Stands in for a ``SimPublisher``: keeps each batch the pod publishes, pre-encoded."""

    def __init__(self, pod: int, out: list[tuple[int, bytes, int, int]]) -> None:
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
    frames: list[tuple[int, bytes, int, int]]
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


def build_stream(pods: int, block_events: int, queries: int, seed: int = 7) -> Stream:
    """Simulated pods serve shared-prefix requests until ``block_events`` are published.

    4 system prompts × 64 documents (65 % short: 16–240 blocks, 35 % long: 700–1100 blocks),
    Zipf popularity; each document has a home set of a quarter of the pods and a request goes to
    one of them; a request is a document prefix (30–100 %) plus a private tail (0–32 blocks and
    a partial block). Cache capacity per pod: a quarter of its share of the stream (≥ 2048
    blocks), so pods fill up and evict (one ``BlockRemoved`` per block, as vLLM does).
    """
    t0 = time.perf_counter()
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)

    def tokens(nblocks: int, extra: int = 0) -> list[int]:
        return nrng.integers(0, 150_000, nblocks * BLOCK + extra).tolist()  # type: ignore[no-any-return]

    systems = [tokens(rng.randint(8, 64)) for _ in range(4)]
    docs = []
    for i in range(64):
        body = rng.randint(16, 240) if rng.random() < 0.65 else rng.randint(700, 1100)
        docs.append(systems[i % 4] + tokens(body))
    weights = [1.0 / (r + 1) for r in range(len(docs))]
    home = [rng.sample(range(pods), max(1, pods // 4)) for _ in docs]
    capacity = max(2048, block_events // (4 * pods))
    frames: list[tuple[int, bytes, int, int]] = []
    sims = [
        SimPod(f"pod{i}", MODEL, num_blocks=capacity, publisher=_Capture(i, frames))  # type: ignore[arg-type]
        for i in range(pods)
    ]
    recent: list[list[int]] = []
    made = 0
    requests = 0
    stored = removed = 0
    while made < block_events:
        d = rng.choices(range(len(docs)), weights)[0]
        doc = docs[d]
        cut = int(len(doc) // BLOCK * rng.uniform(0.3, 1.0)) * BLOCK
        prompt = doc[:cut] + tokens(rng.randint(0, 32), rng.randint(0, 15))
        res = sims[rng.choice(home[d])].serve(prompt)
        stored += res.new_blocks
        removed += res.evicted_blocks
        made = stored + removed
        requests += 1
        recent.append(prompt)
        if len(recent) > 400:
            del recent[:200]
    qs: dict[int, list[list[int]]] = {}
    truth: dict[int, list[dict[str, int]]] = {}
    hasher = sims[0].hasher
    for size in SIZES:
        want = size * BLOCK
        long_docs = [i for i, doc in enumerate(docs) if len(doc) >= want] or list(range(len(docs)))
        out = []
        for q in range(queries):
            if q % 2 == 0:  # a document prefix (shared by many pods)
                pool = long_docs if size > 256 else list(range(len(docs)))
                base = docs[rng.choices(pool, [weights[i] for i in pool])[0]]
            else:  # a recent request (its private tail is cached by one pod)
                base = rng.choice(recent)
            p = list(base[:want])
            if len(p) < want:
                p += tokens(0, want - len(p))
            out.append(p)
        qs[size] = out
        per_query = []
        cached = {pod.pod_id: pod.cached_keys() for pod in sims}
        for p in out:
            keys = hasher.event_keys(p)
            row = {}
            for pod in sims:
                # Ground truth from the simulated cache itself.
                cache = cached[pod.pod_id]
                n = 0
                for key in keys:
                    if key not in cache:
                        break
                    n += 1
                if n:
                    row[pod.pod_id] = n
            per_query.append(row)
        truth[size] = per_query
    return Stream(
        pods=pods,
        capacity=capacity,
        frames=frames,
        queries=qs,
        truth=truth,
        requests=requests,
        live_pairs=sum(s.cached_blocks for s in sims),
        stored_blocks=stored,
        removed_blocks=removed,
        events=sum(f[2] for f in frames),
        gen_s=time.perf_counter() - t0,
    )


# --- publishing ------------------------------------------------------------------------------


class BoundPublisher:
    """A pod's PUB socket, BOUND like vLLM's default ``tcp://*:5557`` (here an OS-chosen
    loopback port); sends pre-encoded batches as ``[topic, seq (8 B BE), payload]``."""

    def __init__(self, ctx: zmq.Context[Any], topic: str) -> None:
        self.sock = ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)  # never drop: both systems must see every batch
        self.mon = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.sock.bind("tcp://127.0.0.1:0")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.topic = topic.encode()
        self.seq = 0

    def wait_connected(self, timeout_s: float = 20.0) -> bool:
        return bool(self.mon.poll(int(timeout_s * 1000))) and bool(self.mon.recv_multipart())

    def send(self, payload: bytes) -> None:
        self.sock.send_multipart([self.topic, self.seq.to_bytes(8, "big"), payload], copy=False)
        self.seq += 1

    def close(self) -> None:
        self.sock.disable_monitor()
        self.mon.close(linger=0)
        self.sock.close(linger=0)


def make_publishers(pods: int) -> list[BoundPublisher]:
    ctx = zmq.Context.instance()
    ctx.setsockopt(zmq.MAX_SOCKETS, 4096)
    return [BoundPublisher(ctx, f"kv@pod{i}@{MODEL}") for i in range(pods)]


def wait_all(pubs: list[BoundPublisher]) -> None:
    for p in pubs:
        if not p.wait_connected():
            raise RuntimeError(f"no subscriber connected to {p.endpoint}")
    time.sleep(0.3)  # the SUBSCRIBE message follows the handshake


def send_all(pubs: list[BoundPublisher], frames: list[tuple[int, bytes, int, int]]) -> float:
    t0 = time.perf_counter()
    for pod, payload, _, _ in frames:
        pubs[pod].send(payload)
    return time.perf_counter() - t0


# --- measuring helpers -----------------------------------------------------------------------


_TICK = os.sysconf("SC_CLK_TCK")


class Proc:
    """The few facts about a process the benchmark needs, read from /proc (Linux only)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def stat(self) -> list[str]:
        """/proc/<pid>/stat fields from field 3 (state) on: field N is at index N - 3."""
        raw = Path(f"/proc/{self.pid}/stat").read_text()
        return raw[raw.rindex(")") + 2 :].split()

    def cpu_s(self) -> float:
        f = self.stat()
        return (int(f[11]) + int(f[12])) / _TICK  # utime + stime

    def status(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return 0

    def cmdline(self) -> str:
        return Path(f"/proc/{self.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


def _all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def descendants(root: int) -> list[Proc]:
    """Every process below ``root`` (children, their children, ...)."""
    kids: dict[int, list[int]] = {}
    for pid in _all_pids():
        with contextlib.suppress(OSError, ValueError, IndexError):
            kids.setdefault(int(Proc(pid).stat()[1]), []).append(pid)
    out, todo = [], [root]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(Proc(c))
            todo.append(c)
    return out


def cpu_s(procs: list[Proc]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += p.cpu_s()
    return total


def rss(procs: list[Proc]) -> int:
    total = 0
    for p in procs:
        with contextlib.suppress(OSError, ValueError):
            total += p.status("VmRSS") * 1024
    return total


def rss_anon(procs: list[Proc]) -> int:
    """Private anonymous resident memory (``RssAnon``): the heap, without shared pages such as
    Ray's plasma store mapped into a worker, which plain RSS counts too."""
    total = 0
    for p in procs:
        with contextlib.suppress(OSError, ValueError):
            total += p.status("RssAnon") * 1024
    return total


def foreign_cpu(root: int) -> dict[tuple[int, str], float]:
    """CPU seconds so far of every process outside ``root``'s tree (other people's work)."""
    mine = {root} | {p.pid for p in descendants(root)}
    out: dict[tuple[int, str], float] = {}
    for pid in _all_pids():
        if pid in mine:
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            f = Proc(pid).stat()
            out[(pid, f[19])] = (int(f[11]) + int(f[12])) / _TICK  # key: pid + start time
    return out


def foreign_delta(before: dict[tuple[int, str], float], root: int) -> float:
    """CPU seconds used outside ``root``'s tree since ``before`` (processes that started and
    ended in between are missed)."""
    after = foreign_cpu(root)
    return sum(max(0.0, v - before.get(k, 0.0)) for k, v in after.items())


def wait_quiet(max_wait_s: float, limit: float = 0.15, window_s: float = 3.0) -> str:
    """Wait (up to ``max_wait_s``) until other people's processes use < ``limit`` cores over a
    ``window_s`` window, so they do not distort the next phase; returns what happened."""
    t0 = time.monotonic()
    while True:
        before = foreign_cpu(os.getpid())
        time.sleep(window_s)
        used = foreign_delta(before, os.getpid()) / window_s
        waited = time.monotonic() - t0
        if used < limit:
            return (
                f"quiet after {waited:.0f} s ({used:.2f} cores used by others, 1-minute "
                f"load {load1():.2f})"
            )
        if waited >= max_wait_s:
            return f"NOT quiet after {waited:.0f} s ({used:.2f} cores used by others)"
        print(f"waiting for a quiet machine: others use {used:.2f} cores", flush=True)
        time.sleep(10)


class Http:
    """One keep-alive HTTP/1.1 connection; the same client for both systems."""

    def __init__(self, base: str) -> None:
        host, port = base.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=60)

    def post(self, path: str, body: bytes) -> Any:
        self.conn.request("POST", path, body, {"Content-Type": "application/json"})
        r = self.conn.getresponse()
        data = r.read()
        if not 200 <= r.status < 300:
            raise RuntimeError(f"POST {path}: {r.status} {data[:300]!r}")
        return json.loads(data)

    def get(self, path: str) -> str:
        self.conn.request("GET", path)
        r = self.conn.getresponse()
        return r.read().decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def timed(fn: Any, items: list[Any], rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        for it in items:
            t = time.perf_counter()
            fn(it)
            out.append(time.perf_counter() - t)
    return out


# --- Dynamo ----------------------------------------------------------------------------------


def _applied(metrics: str) -> dict[str, float]:
    """``dynamo_kvrouter_kv_cache_events_applied`` by "event_type/status"."""
    out: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith("dynamo_kvrouter_kv_cache_events_applied{"):
            labels, _, value = line.rpartition(" ")
            et = labels.split('event_type="')[1].split('"')[0]
            st = labels.split('status="')[1].split('"')[0]
            if float(value):
                out[f"{et}/{st}"] = float(value)
    return out


def dynamo_phase(data_path: str, out_path: str) -> None:
    """Everything Dynamo: start it, register the pods, ingest, query. Runs in a subprocess
    (inside ``unshare -n`` when possible: Dynamo's HTTP server binds 0.0.0.0)."""
    with open(data_path, "rb") as f:
        data = pickle.load(f)
    stream: Stream = data["stream"]
    if data["netns"]:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    log = open(data["log"], "w")  # noqa: SIM115
    proc, c = start_indexer(data["python"], data["threads"], log)
    pubs: list[BoundPublisher] = []
    res: dict[str, Any] = {}
    try:
        ps = Proc(proc.pid)
        res["rss_idle"] = rss([ps])
        pubs = make_publishers(stream.pods)
        for i, pub in enumerate(pubs):
            body = {
                "instance_id": i,
                "endpoint": pub.endpoint,
                "model_name": MODEL,
                "block_size": BLOCK,
            }
            c.post("/register", json.dumps(body).encode())
        wait_all(pubs)
        workers = json.loads(c.get("/workers"))
        res["workers_active"] = sum(w.get("status") == "active" for w in workers)
        time.sleep(0.5)
        root = data["root_pid"]
        foreign0, wall0 = foreign_cpu(root), time.perf_counter()
        rss0, anon0, cpu0 = rss([ps]), rss_anon([ps]), cpu_s([ps])
        t0 = time.perf_counter()
        res["publish_s"] = send_all(pubs, stream.frames)
        last, stalled_since = -1.0, time.monotonic()
        while True:
            applied = _applied(c.get("/metrics"))
            total = sum(applied.values())
            if total >= stream.events:
                break
            if total != last:
                last, stalled_since = total, time.monotonic()
            elif time.monotonic() - stalled_since > 10:
                res["stalled"] = True
                break
            time.sleep(0.005)
        res["ingest_s"] = time.perf_counter() - t0
        res["cpu_s"] = cpu_s([ps]) - cpu0
        res["rss_delta"] = rss([ps]) - rss0
        time.sleep(1.0)
        res["rss_delta_1s"] = rss([ps]) - rss0
        res["anon_delta"] = rss_anon([ps]) - anon0
        res["applied"] = _applied(c.get("/metrics"))
        res["threads"] = ps.status("Threads")

        def query(body: bytes) -> dict[str, int]:
            ans = c.post("/query", body)
            return {
                f"pod{inst}": sum(ranks.values()) // BLOCK
                for inst, ranks in ans["scores"].items()
                if sum(ranks.values())
            }

        res["scores"] = {}
        res["lat"] = {}
        for size in SIZES:
            bodies = [
                json.dumps({"token_ids": p, "model_name": MODEL}).encode()
                for p in stream.queries[size]
            ]
            res["scores"][size] = [query(b) for b in bodies]  # also the warm-up
            res["lat"][size] = timed(query, bodies, data["rounds"])
        res["foreign_cpu_s"] = foreign_delta(foreign0, root)
        res["phase_wall_s"] = time.perf_counter() - wall0
        res["example_answer"] = c.post("/query", bodies[0])
        res["example_answer"]["instances"] = dict(
            list(res["example_answer"].get("instances", {}).items())[:2]
        )
        res["example_answer"]["scores"] = dict(list(res["example_answer"]["scores"].items())[:4])
    finally:
        for p in pubs:
            p.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    with open(out_path, "w") as f:
        json.dump(res, f)


def start_indexer(python: str, threads: int, log: Any) -> tuple[subprocess.Popen[bytes], Http]:
    port = free_port()
    proc = subprocess.Popen(
        [python, "-m", "dynamo.indexer", "--port", str(port), "--block-size", str(BLOCK)]
        + ["--threads", str(threads)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            c = Http(f"http://127.0.0.1:{port}")
            c.get("/health")
            return proc, c
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("dynamo.indexer did not come up") from None
            time.sleep(0.1)


def repro_phase(python: str, threads: int, netns: bool) -> dict[str, Any]:
    """8 events that make Dynamo's multi-threaded indexer credit pod B with pod A's blocks.

    Path of 100 blocks. B stores 0-4, 5-30, 31-32, 33-80; A stores 0-4, 5-45, 46-99; each
    stored event also carries 3 private blocks after its path segment (a request's own tail),
    and the events interleave as listed in the code. Then A evicts block 70. Right answer:
    A 70, B 81.
    """
    from kvray.core.events import WireBlockRemoved, WireBlockStored
    from kvray.core.hashing import BlockHasher

    if netns:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    proc, c = start_indexer(python, threads, subprocess.DEVNULL)
    pubs = make_publishers(2)
    try:
        for i, pub in enumerate(pubs):
            body = {"instance_id": i, "endpoint": pub.endpoint, "model_name": MODEL}
            c.post("/register", json.dumps({**body, "block_size": BLOCK}).encode())
        wait_all(pubs)
        rng = random.Random(5)
        path = [rng.randrange(150_000) for _ in range(100 * BLOCK)]
        hasher = BlockHasher()
        keys = hasher.event_keys(path)

        def seg(a: int, b: int) -> WireBlockStored:
            toks = path[a * BLOCK : b * BLOCK] + [rng.randrange(150_000) for _ in range(3 * BLOCK)]
            ks = hasher.event_keys(path[: a * BLOCK] + toks)[a:]
            return WireBlockStored(ks, keys[a - 1] if a else None, toks, BLOCK, None, "GPU", None)

        sent = [0]

        def send(pod: int, ev: Any) -> None:
            pubs[pod].send(encode_batch([ev], ts=0.0))
            sent[0] += 1
            deadline = time.monotonic() + 10
            while sum(_applied(c.get("/metrics")).values()) < sent[0]:
                if time.monotonic() > deadline:
                    raise RuntimeError("dynamo did not apply the repro events")
                time.sleep(0.01)

        def query() -> dict[str, int]:
            body = json.dumps({"token_ids": path, "model_name": MODEL}).encode()
            ans = c.post("/query", body)["scores"]
            return {"AB"[int(k)]: sum(v.values()) // BLOCK for k, v in sorted(ans.items())}

        a, b = 0, 1
        for pod, (lo, hi) in (
            (b, (0, 5)),
            (a, (0, 5)),
            (b, (5, 31)),
            (a, (5, 46)),
            (b, (31, 33)),
            (a, (46, 100)),
            (b, (33, 81)),
        ):
            send(pod, seg(lo, hi))
        before = query()
        send(a, WireBlockRemoved([keys[70]], "GPU"))
        return {"threads": threads, "before": before, "after": query()}
    finally:
        for p in pubs:
            p.close()
        proc.terminate()
        proc.wait(10)


def run_dynamo(stream: Stream, args: argparse.Namespace, tmp: Path, threads: int) -> dict[str, Any]:
    netns = os.geteuid() == 0 and shutil.which("unshare") is not None and shutil.which("ip")
    tag = f"{stream.pods}-{threads}"
    data_path, out_path = tmp / f"dyn{tag}.pkl", tmp / f"dyn{tag}.json"
    log = tmp / f"dynamo_indexer_{tag}.log"
    with open(data_path, "wb") as f:
        pickle.dump(
            {
                "stream": stream,
                "netns": bool(netns),
                "python": args.dynamo_python,
                "threads": threads,
                "root_pid": os.getpid(),
                "rounds": args.rounds,
                "log": str(log),
            },
            f,
        )
    cmd = [sys.executable, __file__, "--dynamo-phase", str(data_path), str(out_path)]
    if netns:
        cmd = ["unshare", "-n", *cmd]
    subprocess.run(cmd, check=True)
    with open(out_path) as f:
        res: dict[str, Any] = json.load(f)
    res["netns"] = bool(netns)
    res["threads_flag"] = threads
    res["scores"] = {int(k): v for k, v in res["scores"].items()}
    res["lat"] = {int(k): v for k, v in res["lat"].items()}
    return res


def run_repro(args: argparse.Namespace, threads: int) -> dict[str, Any]:
    netns = os.geteuid() == 0 and shutil.which("unshare") is not None and shutil.which("ip")
    cmd = [sys.executable, __file__, "--dynamo-python", args.dynamo_python]
    cmd += ["--repro-phase", str(threads), "1" if netns else "0"]
    if netns:
        cmd = ["unshare", "-n", *cmd]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def dynamo_version(python: str) -> str:
    out = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('ai-dynamo-runtime'))"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() or "?"


# --- kvray -----------------------------------------------------------------------------------


def ray_processes() -> dict[str, list[Proc]]:
    """This driver's Ray processes by role (actors are named by their process title)."""
    roles: dict[str, list[Proc]] = {}
    for p in descendants(os.getpid()):
        try:
            cmd = p.cmdline()
        except OSError:
            continue
        if cmd.startswith("py-spy"):
            continue
        role = "ray-system"
        for name in ("IndexShard", "Ingestor", "Controller", "TokenizerActor", "ServeReplica"):
            if cmd.startswith(f"ray::{name}"):
                role = name
        roles.setdefault(role, []).append(p)
    return roles


KVRAY_SHARDS = 2  # kvray's default num_shards (what `kvray serve` starts)
KVRAY_EVENTS: dict[str, Any] = {}  # EventsConfig overrides (--kvray-flush-messages)


def kvray_runtime(ns: str) -> tuple[Any, Any, str]:
    from kvray import connect
    from kvray.config import Config, EventsConfig, ServeConfig
    from kvray.serve.app import deploy

    # What `kvray serve` and the Serve config deploy: kvray's defaults (shards, hash checks,
    # snapshots every 10 s), the one Serve application; only the namespace and Serve's proxy
    # port (unused with direct ingress) are this benchmark's.
    cfg = Config(
        namespace=ns,
        num_shards=KVRAY_SHARDS,
        events=EventsConfig(**KVRAY_EVENTS),
        serve=ServeConfig(port=free_port()),
    )
    base = deploy(cfg)
    client = connect(ns)
    return cfg, client, base


def kvray_stop(ns: str) -> None:
    from kvray import runtime
    from kvray.serve.app import stop_http

    try:
        stop_http()  # the application's KvrayRuntime stops the actors
    finally:
        runtime.stop(ns)  # and anything it left


def run_kvray(stream: Stream, args: argparse.Namespace, ns: str) -> dict[str, Any]:
    res: dict[str, Any] = {}
    _, client, base = kvray_runtime(ns)
    pubs: list[BoundPublisher] = []
    try:
        roles = ray_processes()
        shards = roles.get("IndexShard", [])
        actors = [p for r, ps in roles.items() if r != "ray-system" for p in ps]
        system = roles.get("ray-system", [])
        res["processes"] = {r: len(ps) for r, ps in roles.items()}
        pubs = make_publishers(stream.pods)
        for i, pub in enumerate(pubs):
            client.add_pod(pub.endpoint, None, f"pod{i}", MODEL)
        wait_all(pubs)
        time.sleep(0.5)
        foreign0, wall0 = foreign_cpu(os.getpid()), time.perf_counter()
        rss0, ing_rss0 = rss(shards), rss(roles.get("Ingestor", []))
        anon0 = rss_anon(shards)
        cpu0 = {r: cpu_s(ps) for r, ps in roles.items()}
        rep_cpu0 = client.replica.stats()["cpu_s"] if client.replica is not None else 0.0
        t0 = time.perf_counter()
        res["publish_s"] = send_all(pubs, stream.frames)
        expect = {f"pod{i}": p.seq for i, p in enumerate(pubs) if p.seq}
        if not client.sync(expect, timeout_s=900):
            raise RuntimeError("kvray did not apply the stream within 900 s")
        res["ingest_s"] = time.perf_counter() - t0
        res["cpu_by_role"] = {r: cpu_s(ps) - cpu0[r] for r, ps in roles.items()}
        if client.replica is not None:  # the connect() replica's thread in this process
            res["cpu_by_role"]["connect() replica"] = client.replica.stats()["cpu_s"] - rep_cpu0
        res["cpu_actors_s"] = sum(v for r, v in res["cpu_by_role"].items() if r != "ray-system")
        res["cpu_s"] = sum(res["cpu_by_role"].values())
        res["rss_delta"] = rss(shards) - rss0
        res["ingestor_rss_delta"] = rss(roles.get("Ingestor", [])) - ing_rss0
        time.sleep(1.0)
        res["rss_delta_1s"] = rss(shards) - rss0
        # Shards read their pods themselves: the ZMQ messages buffered while they caught up
        # were freed but stay resident until glibc returns them (shards trim every 30 s).
        res["anon_delta_untrimmed"] = rss_anon(shards) - anon0
        import ray

        ray.get([s.release_memory.remote() for s in client.shards])
        res["anon_delta"] = rss_anon(shards) - anon0
        st = client.stats()
        res["pairs"] = sum(s["pairs"] for s in st["shards"])
        res["keys"] = sum(s["keys"] for s in st["shards"])
        res["bytes_estimate"] = sum(s["bytes_estimate"] for s in st["shards"])
        rep = client.replica.stats() if client.replica is not None else {}
        res["replica_bytes_estimate"] = rep.get("bytes_estimate", 0)
        res["replica_pairs"] = rep.get("pairs", 0)
        res["stored"] = sum(s["stored_blocks"] for s in st["shards"])
        res["removed"] = sum(s["removed_blocks"] for s in st["shards"])
        rej: Counter[str] = Counter()
        for s in st["shards"]:
            rej.update(s["rejected"])
        res["rejected"] = dict(rej)
        # Where the shards' time went: inside IndexShard.apply (decode + keys + index) vs the
        # rest of their CPU (Ray's per-call work: receiving and unpickling the ops, replying).
        res["apply_s"] = sum(s["apply_seconds"] for s in st["shards"])
        res["shard_ops"] = sum(s["ops"] for s in st["shards"])
        res["ingestor_stats"] = {
            k: sum(i[k] for i in st["ingestors"]) for k in ("messages", "shard_calls")
        }
        res["ingestor_actor_messages"] = sum(
            i["messages"] for i in st["ingestors"] if not str(i["ingestor"]).startswith("shard")
        )
        del actors, system

        def connect_q(p: list[int]) -> dict[str, int]:
            return {k: round(v) for k, v in client.score_tokens(p, MODEL).items() if v}

        h = Http(base)

        def http_q(body: bytes) -> dict[str, int]:
            return {k: round(v) for k, v in h.post("/score_tokens", body)["scores"].items() if v}

        res["scores"], res["scores_http"], res["lat_connect"], res["lat_http"] = {}, {}, {}, {}
        for size in SIZES:
            prompts = stream.queries[size]
            bodies = [json.dumps({"model": MODEL, "token_ids": p}).encode() for p in prompts]
            res["scores"][size] = [connect_q(p) for p in prompts]
            res["scores_http"][size] = [http_q(b) for b in bodies]
            res["lat_connect"][size] = timed(connect_q, prompts, args.rounds)
            res["lat_http"][size] = timed(http_q, bodies, args.rounds)
        res["lat_http_noop"] = noop_door(stream, args.rounds)
        res["breakdown"] = query_breakdown(client, stream, args.rounds)
        res["foreign_cpu_s"] = foreign_delta(foreign0, os.getpid())
        res["phase_wall_s"] = time.perf_counter() - wall0
    finally:
        for p in pubs:
            p.close()
        kvray_stop(ns)
    return res


def noop_door(stream: Stream, rounds: int) -> dict[int, list[float]]:
    """Latency of a no-op Serve deployment receiving the same ``/score_tokens`` bodies: a plain
    Starlette ``__call__`` that reads and msgspec-decodes the body (the floor of Serve's door
    with direct ingress: what kvray's handler adds is the difference)."""
    import msgspec
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    @serve.deployment(name="NoopDoor", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0})
    class NoopDoor:
        async def __call__(self, request: Request) -> Response:
            if request.method == "GET":
                return Response(b'{"app": "noop-door-up"}', media_type="application/json")
            msgspec.json.decode(await request.body())
            return Response(b'{"scores": {}}', media_type="application/json")

    serve.run(NoopDoor.bind(), name="noop-door", route_prefix="/noop-door")
    try:
        base = None
        deadline = time.monotonic() + 60
        while base is None and time.monotonic() < deadline:
            low = int(os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "30000"))
            for port in range(low, low + 16):
                try:
                    h = Http(f"http://127.0.0.1:{port}")
                    if '"noop-door-up"' in h.get("/noop-door"):
                        base = f"http://127.0.0.1:{port}"
                        break
                except OSError:
                    continue
            time.sleep(0.2)
        if base is None:
            return {}
        h = Http(base)
        out = {}
        for size in SIZES:
            bodies = [
                json.dumps({"model": MODEL, "token_ids": p}).encode() for p in stream.queries[size]
            ]
            out[size] = timed(lambda b: h.post("/noop-door", b), bodies, rounds)
        return out
    finally:
        serve.delete("noop-door")


def query_breakdown(client: Any, stream: Stream, rounds: int) -> dict[int, dict[str, float]]:
    """p50 (ms) of the pieces of ``kvray.connect().score_tokens``, per prompt size."""
    import ray

    @ray.remote(num_cpus=0)
    class Noop:
        def score(self, keys: list[int], pods: list[str] | None = None) -> dict[str, float]:
            return {}

    from kvray import connect

    noop = Noop.remote()  # type: ignore[attr-defined]
    ray.get(noop.score.remote([1]))
    shard0 = client.shards[0]
    direct = connect(client.namespace, replica=False)
    out: dict[int, dict[str, float]] = {}
    for size in SIZES:
        prompts = stream.queries[size]
        keys = [client.block_keys(p, MODEL) for p in prompts]
        row = {
            "keys": timed(lambda p: client.block_keys(p, MODEL), prompts, rounds),
            "noop": timed(lambda k: ray.get(noop.score.remote(k, None)), keys, rounds),
            "one_shard": timed(lambda k: ray.get(shard0.score.remote(k, None)), keys, rounds),
            "fan_out": timed(lambda k: direct.score_keys(k), keys, rounds),
            "replica": timed(lambda k: client.score_keys(k), keys, rounds),
            "total": timed(lambda p: client.score_tokens(p, MODEL), prompts, rounds),
        }
        out[size] = {k: ms(v, 50) for k, v in row.items()}
    ray.kill(noop)
    return out


# --- profiling kvray -------------------------------------------------------------------------


class Spy:
    """``py-spy record`` on some PIDs (raw collapsed stacks), stopped with SIGINT."""

    def __init__(self, pids: dict[str, int], tmp: Path, tag: str, rate: int = 250) -> None:
        self.files: dict[str, Path] = {}
        self.procs = []
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(exe).exists():
            raise FileNotFoundError("py-spy is not installed (pip install py-spy)")
        for name, pid in pids.items():
            out = tmp / f"spy-{tag}-{name}.txt"
            self.files[name] = out
            self.procs.append(
                subprocess.Popen(
                    [exe, "record", "--pid", str(pid), "--format", "raw", "--rate", str(rate)]
                    # Not --native: it cannot tell idle threads from busy ones (tried).
                    + ["--output", str(out), "--nonblocking"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        time.sleep(1.0)  # attach

    def stop(self) -> dict[str, Counter[tuple[str, ...]]]:
        for p in self.procs:
            p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        out: dict[str, Counter[tuple[str, ...]]] = {}
        for name, path in self.files.items():
            stacks: Counter[tuple[str, ...]] = Counter()
            if path.exists():
                for line in path.read_text().splitlines():
                    stack, _, n = line.rpartition(" ")
                    if stack and n.isdigit():
                        frames = tuple(_frame(f) for f in stack.split(";"))
                        if not any(x in frames[-1] for x in _IDLE):
                            stacks[frames] += int(n)
            out[name] = stacks
        return out


def _frame(f: str) -> str:
    """``func (path/to/file.py:123)`` → ``func (file.py)`` with a short package path."""
    func, _, loc = f.partition(" (")
    path = loc.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{func} ({path})"


# Leaf frames that are a thread waiting (py-spy cannot always tell a sleeping thread from a
# running one): zmq/selectors polls, condition waits, and kvray's own sleeping loops (the
# shard's heartbeat thread, an ingest loop with no socket).
_IDLE = (
    "poll (zmq",
    "_poll (",
    "wait (threading",
    "select (selectors",
    "sleep",
    "_heartbeat_loop (kvray",
    "ZmqSource.poll (kvray",
)


def summarize(stacks: Counter[tuple[str, ...]], top: int = 8) -> tuple[int, list[list[str]]]:
    """Busy samples and the top functions by self and inclusive share."""
    total = sum(stacks.values())
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    for st, n in stacks.items():
        self_c[st[-1]] += n
        for f in set(st):
            incl[f] += n
    rows = []
    for f, n in self_c.most_common(top):
        rows.append([f"`{f}`", f"{100 * n / total:.1f} %", f"{100 * incl[f] / total:.1f} %"])
    return total, rows


# (label, substrings): a sample goes to the first label one of whose substrings appears in a
# frame, frames scanned from the innermost out; "Ray core worker" is C++ time billed to the
# main loop itself (a leaf ``Worker.main_loop``).
SHARD_RULES = [
    (
        "in-shard ingest: ZMQ receive, topic/seq/rank parse",
        ["recv_multipart", "ZmqSource.", "Ingestor._handle", "parse_frames", "parse_topic"]
        + ["peek_rank", "SeqTracker"],
    ),
    ("msgpack decode (`EventDecoder.decode`)", ["EventDecoder.decode"]),
    ("change stream: journal, encode, publish", ["Journal.", "_publish", "_send (kvray"]),
    ("request keys (`request_keys`, xxh64)", ["request_keys"]),
    ("engine map put/get/prune", ["engine_map", "_prune_emap"]),
    ("index score (`MemoryIndex.score`, `_runs`)", ["MemoryIndex.score", "_runs ("]),
    ("index add/remove/evict/sweep (`MemoryIndex`)", ["MemoryIndex."]),
    ("rest of `IndexShard.apply` / `score`", ["IndexShard.", "IndexWriter."]),
    ("Ray: unpickling call arguments", ["deserializ", "_deserialize"]),
    ("Ray: serializing replies", ["serializ", "packb"]),
    ("Ray core worker (C++, leaf `Worker.main_loop`)", ["Worker.main_loop"]),
]
INGESTOR_RULES = [
    ("ZMQ receive (`recv_multipart`, poll)", ["recv_multipart", "Poller.poll", "ZmqSource.poll"]),
    (
        "Ray: submitting `apply` calls (task submit; ops > 100 KiB go via the object store)",
        ["_actor_method_call", "Pickler", "serializ"],
    ),
    ("Ray: reaping results (`ray.wait`/`ray.get`)", ["ray.wait", "wait (ray", "get_objects"]),
    ("parse topic/seq/rank (`_handle`)", ["_handle", "parse_", "peek_rank", "SeqTracker"]),
    (
        "`Ingestor.progress`/`streams` (the benchmark's `client.sync` polling)",
        ["Ingestor.progress", "Ingestor.streams"],
    ),
    ("rest of the loop", ["Ingestor."]),
    ("Ray core worker (C++, leaf `Worker.main_loop`)", ["Worker.main_loop"]),
]
REPLICA_RULES = [
    (
        "prefix walk on the local replica (`MemoryIndex.score`)",
        ["MemoryIndex.score", "_runs (", "ReplicaIndex.score", "Replica.score"],
    ),
    (
        "read replica: decode + apply the change stream",
        ["Replica._drain", "ReplicaIndex.", "_finish_snapshots", "change_decoder"],
    ),
    ("JSON parse of the body", ["json/", "JSONDecoder", "_json"]),
    ("FastAPI/pydantic validation", ["pydantic", "request_body_to_args", "fastapi/dependencies"]),
    ("`_check_tokens` (token range loop)", ["_check_tokens"]),
    ("block keys (`Keyer.block_keys`)", ["block_keys", "request_keys"]),
    ("Ray: calling the shards (submit + await)", ["_actor_method_call", "ray/actor", "ObjectRef"]),
    ("response model / serialization", ["ScoreResponse", "jsonable", "serialize_response"]),
    ("uvicorn/starlette/asyncio plumbing", ["uvicorn", "starlette", "asyncio", "anyio"]),
    ("Ray Serve replica plumbing", ["ray/serve"]),
    ("Ray core worker (C++, leaf `Worker.main_loop`)", ["Worker.main_loop"]),
]


def categorize(
    stacks: Counter[tuple[str, ...]], rules: list[tuple[str, list[str]]]
) -> list[list[str]]:
    total = sum(stacks.values()) or 1
    got: Counter[str] = Counter()
    for st, n in stacks.items():
        label = "other"
        for f in reversed(st):
            hit = next((lab for lab, subs in rules if any(x in f for x in subs)), None)
            if hit is not None:
                label = hit
                break
        got[label] += n
    return [[lab, f"{100 * n / total:.1f} %"] for lab, n in got.most_common()]


def profile_kvray(stream: Stream, args: argparse.Namespace, ns: str, tmp: Path) -> str:
    """A second kvray run under py-spy; returns the markdown of its profile tables."""
    _, client, base = kvray_runtime(ns)
    pubs: list[BoundPublisher] = []
    try:
        roles = ray_processes()
        pids = {f"shard{i}": p.pid for i, p in enumerate(roles.get("IndexShard", []))}
        pids["ingestor"] = roles["Ingestor"][0].pid
        pids["replica"] = roles["ServeReplica"][0].pid
        pubs = make_publishers(stream.pods)
        for i, pub in enumerate(pubs):
            client.add_pod(pub.endpoint, None, f"pod{i}", MODEL)
        wait_all(pubs)
        spy = Spy(pids, tmp, f"ingest{stream.pods}")
        t0 = time.perf_counter()
        send_all(pubs, stream.frames)
        expect = {f"pod{i}": p.seq for i, p in enumerate(pubs) if p.seq}
        assert client.sync(expect, timeout_s=900)
        ingest_s = time.perf_counter() - t0
        ingest = spy.stop()
        # Query path over HTTP: the Serve replica and the shards.
        h = Http(base)
        bodies = [
            json.dumps({"model": MODEL, "token_ids": p}).encode() for p in stream.queries[1024]
        ]
        spy = Spy({"replica": pids["replica"]}, tmp, f"http{stream.pods}")
        timed(lambda b: h.post("/score_tokens", b), bodies, args.rounds)
        q_http = spy.stop()
    finally:
        for p in pubs:
            p.close()
        kvray_stop(ns)

    def merged(d: dict[str, Counter[tuple[str, ...]]], prefix: str) -> Counter[tuple[str, ...]]:
        c: Counter[tuple[str, ...]] = Counter()
        for k, v in d.items():
            if k.startswith(prefix):
                c.update(v)
        return c

    parts = [
        f"#### py-spy, {stream.pods} pods (250 Hz, busy samples only; "
        f"ingest took {ingest_s:.2f} s under sampling)"
    ]
    tops = []
    for title, stacks, rules in (
        (
            f"ingest: {KVRAY_SHARDS} shard actors (merged; they read their pods themselves)",
            merged(ingest, "shard"),
            SHARD_RULES,
        ),
        (
            "ingest: the Serve replica (following the change stream)",
            ingest.get("replica", Counter()),
            REPLICA_RULES,
        ),
        (
            "ingest: ingestor actor (no pod of its own here)",
            ingest.get("ingestor", Counter()),
            INGESTOR_RULES,
        ),
        (
            "query 1024 blocks over HTTP: Serve replica (fast path, local replica)",
            q_http.get("replica", Counter()),
            REPLICA_RULES,
        ),
    ):
        total, rows = summarize(stacks, top=6)
        cats = categorize(stacks, rules)
        tops.append(
            f"{title.split(': ', 1)[1]}: "
            + ", ".join(f"{lab} {share}" for lab, share in cats[:3] if lab != "other")
        )
        parts.append(
            f"**{title}** — {total} busy samples\n\n"
            + table(["where the busy samples are", "share"], categorize(stacks, rules))
            + "\n\n"
            + table(["top functions (leaf frame)", "self", "inclusive"], rows)
        )
    summary = (
        "**What dominates (busy samples).** Ingest — "
        + "; ".join(tops[:3])
        + ". Query over HTTP — "
        + "; ".join(tops[3:])
        + "."
    )
    return summary + "\n\n" + "\n\n".join(parts)


# --- report ----------------------------------------------------------------------------------


def compare(
    stream: Stream, dyn: dict[str, Any], kv: dict[str, Any]
) -> tuple[int, int, list[str], dict[str, int]]:
    """(queries compared, disagreeing queries, examples, causes)."""
    n = bad = 0
    examples: list[str] = []
    causes: Counter[str] = Counter()
    for size in SIZES:
        for q, (d, k, t) in enumerate(
            zip(dyn["scores"][size], kv["scores"][size], stream.truth[size], strict=True)
        ):
            n += 1
            if kv["scores_http"][size][q] != k:
                causes["kvray HTTP != kvray.connect()"] += 1
            if d == k:
                if k != t:
                    causes["both differ from the simulated caches"] += 1
                continue
            bad += 1
            for pod in sorted(set(d) | set(k), key=lambda s: int(s[3:])):
                dv, kv_, tv = d.get(pod, 0), k.get(pod, 0), t.get(pod, 0)
                if dv == kv_:
                    continue
                who = "kvray" if kv_ == tv else "Dynamo" if dv == tv else "neither"
                causes[f"{who} matches the simulated cache"] += 1
                if len(examples) < 8:
                    examples.append(
                        f"{size}-block query {q}, {pod}: kvray {kv_}, Dynamo {dv}, "
                        f"simulated cache {tv} blocks"
                    )
    return n, bad, examples, dict(causes)


def ms(xs: list[float], p: float) -> float:
    return pct(xs, p) * 1e3


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median ingest time (the tables report it whole), with every run's
    ingest time attached."""
    chosen = dict(sorted(runs, key=lambda r: r["ingest_s"])[len(runs) // 2])
    chosen["ingest_runs"] = [r["ingest_s"] for r in runs]
    return chosen


def _runs_line(be: int, dyn: dict[str, Any], kv: dict[str, Any]) -> list[str]:
    d_runs, k_runs = dyn.get("ingest_runs", []), kv.get("ingest_runs", [])
    if len(d_runs) < 2:
        return []
    rates = ", ".join(
        f"{be / d / 1e3:,.0f} k / {be / k / 1e3:,.0f} k = {d / k:.2f}"
        for d, k in zip(d_runs, k_runs, strict=True)
    )
    return [
        f"- ingest over {len(d_runs)} alternating runs of each system (Dynamo / kvray, "
        f"block-events/s = ratio, in run order): {rates}; the tables use each system's median "
        "run (all its measures from that run)."
    ]


def render(
    results: list[tuple[Stream, dict[str, Any], dict[str, Any]]],
    profiles: list[str],
    args: argparse.Namespace,
    meta: dict[str, Any],
) -> tuple[str, list[dict[str, Any]]]:
    sections = []
    targets_rows = []
    ratios_for_png = []
    prof_parts: list[str] = []
    sections.append(
        "Setup: Dynamo `ai-dynamo-runtime` "
        f"{meta['dynamo_version']} (`python -m dynamo.indexer --block-size {BLOCK} --threads "
        f"{str(args.dynamo_threads).split(',')[0]}`, pods registered with `POST /register`, "
        "queried with `POST /query`, ingestion complete when the sum of "
        "`dynamo_kvrouter_kv_cache_events_applied` reaches the events sent); kvray: "
        f"{KVRAY_SHARDS} shards, 1 ingestor, request keys, hash checks on (defaults), write path "
        + ("compiled (`kvray._speedups`)" if fast.COMPILED else "pure Python (no C extension)")
        + (f", flush_messages {KVRAY_EVENTS['flush_messages']}" if KVRAY_EVENTS else "")
        + ", pods added with `client.add_pod`, complete "
        "when `client.sync(expect)` returns; HTTP `POST /score_tokens` (Ray Serve, direct "
        "ingress). Same pre-encoded vLLM 0.33 frames from binding PUB sockets, same order, "
        "same prompts, same keep-alive HTTP client (bodies pre-encoded). "
        f"Machine: {os.cpu_count()} cores; 1-minute load before the run {meta['load_before']}, "
        f"after {meta['load_after']}. "
        + (
            "Dynamo ran in a private network namespace (its HTTP server binds 0.0.0.0)."
            if all(d["netns"] for _, d, _ in results)
            else "Dynamo ran on the host network (no `unshare`): its HTTP port was on 0.0.0.0."
        )
    )
    for stream, dyn, kv in results:
        n, bad, examples, causes = compare(stream, dyn, kv)
        be = stream.block_events
        d_rate = be / dyn["ingest_s"]
        k_rate = be / kv["ingest_s"]
        d_cpu = dyn["cpu_s"] / be * 1e6
        k_cpu = kv["cpu_s"] / be * 1e6
        k_cpu_act = kv["cpu_actors_s"] / be * 1e6
        pairs = stream.live_pairs
        d_mem = dyn["anon_delta"] / pairs
        k_mem = kv["anon_delta"] / pairs
        d_rss = dyn["rss_delta_1s"] / pairs
        k_rss = kv["rss_delta_1s"] / pairs
        k_est = kv["bytes_estimate"] / pairs
        rows = [
            [
                "ingest, block-events/s (first frame sent → all applied)",
                f"{k_rate / 1e3:,.0f} k",
                f"{d_rate / 1e3:,.0f} k",
                f"{k_rate / d_rate:.2f}",
            ],
            [
                "CPU s per 1 M block-events (kvray: its Ray processes + the connect() "
                "replica thread / actors only)",
                f"{k_cpu:.2f} / {k_cpu_act:.2f}",
                f"{d_cpu:.2f}",
                f"{k_cpu / d_cpu:.2f} / {k_cpu_act / d_cpu:.2f}",
            ],
            [
                "memory per live (block, pod) pair: private heap growth, RssAnon delta "
                f"(kvray: the {KVRAY_SHARDS} shard processes)",
                f"{k_mem:.1f} B",
                f"{d_mem:.1f} B",
                f"{k_mem / d_mem:.2f}" if d_mem > 0 else "n/a",
            ],
            [
                "memory per pair: RSS delta (also counts shared pages, e.g. Ray's object store)",
                f"{k_rss:.1f} B",
                f"{d_rss:.1f} B",
                f"{k_rss / d_rss:.2f}" if d_rss > 0 else "n/a",
            ],
            [
                "memory per pair: kvray shards' own `bytes_estimate` vs Dynamo's RssAnon delta",
                f"{k_est:.1f} B",
                f"{d_mem:.1f} B",
                f"{k_est / d_mem:.2f}" if d_mem > 0 else "n/a",
            ],
        ]
        for size in SIZES:
            dl = dyn["lat"][size]
            for label, key in (("kvray.connect()", "lat_connect"), ("kvray HTTP", "lat_http")):
                kl = kv[key][size]
                rows.append(
                    [
                        f"query {size} blocks p50 / p99 (ms): {label} vs Dynamo HTTP",
                        f"{ms(kl, 50):.2f} / {ms(kl, 99):.2f}",
                        f"{ms(dl, 50):.2f} / {ms(dl, 99):.2f}",
                        f"{ms(kl, 50) / ms(dl, 50):.2f} / {ms(kl, 99) / ms(dl, 99):.2f}",
                    ]
                )
        rows.append(
            [
                f"queries whose per-pod blocks disagree (Dynamo --threads {dyn['threads_flag']})",
                f"{bad} of {n}",
                "",
                "",
            ]
        )
        alt_lines = []
        for alt in dyn.get("alt", []):
            an, abad, _, acauses = compare(stream, alt, kv)
            rows.append(
                [
                    f"… same with Dynamo --threads {alt['threads_flag']} (its ingest: "
                    f"{be / alt['ingest_s'] / 1e3:,.0f} k block-events/s)",
                    f"{abad} of {an}",
                    "",
                    "",
                ]
            )
            applied_alt = ", ".join(f"{k} {int(v):,}" for k, v in sorted(alt["applied"].items()))
            alt_lines.append(
                f"- Dynamo --threads {alt['threads_flag']}: applied {applied_alt}; "
                + ("; ".join(f"{k}: {v}" for k, v in acauses.items()) or "no disagreement")
                + "."
            )
        applied = ", ".join(f"{k} {int(v):,}" for k, v in sorted(dyn["applied"].items()))
        rej = ", ".join(f"{k} {v:,}" for k, v in sorted(kv["rejected"].items())) or "none"
        detail = [
            f"- stream: {stream.requests:,} requests on {stream.pods} simulated pods "
            f"(capacity {stream.capacity:,} blocks each) → {len(stream.frames):,} batches, "
            f"{stream.events:,} events, {be:,} block-events ({stream.stored_blocks:,} stored, "
            f"{stream.removed_blocks:,} removed); {pairs:,} (block, pod) pairs live at the end "
            f"(kvray's shards count {kv['pairs']:,} pairs in {kv['keys']:,} keys).",
            f"- publishing alone took {dyn['publish_s']:.2f} s (Dynamo run) / "
            f"{kv['publish_s']:.2f} s (kvray run); ingest {dyn['ingest_s']:.2f} s / "
            f"{kv['ingest_s']:.2f} s.",
            *_runs_line(be, dyn, kv),
            *(
                [
                    "- Serve's door against its floor: kvray `/score_tokens` p50 "
                    + " / ".join(f"{ms(kv['lat_http'][z], 50):.3f}" for z in SIZES)
                    + " ms, a no-op Serve deployment (Starlette `__call__`, msgspec decode of "
                    "the same bodies, direct ingress) "
                    + " / ".join(f"{ms(kv['lat_http_noop'][z], 50):.3f}" for z in SIZES)
                    + f" ms ({' / '.join(str(z) for z in SIZES)} blocks)."
                ]
                if kv.get("lat_http_noop")
                else []
            ),
            f"- Dynamo applied: {applied}"
            + (" (STALLED)" if dyn.get("stalled") else "")
            + f"; kvray rejected: {rej}.",
            f"- CPU during ingest: Dynamo {dyn['cpu_s']:.2f} s ({dyn['threads']} threads); "
            "kvray "
            + ", ".join(f"{r} {v:.2f} s" for r, v in sorted(kv["cpu_by_role"].items()))
            + ".",
            f"- RssAnon deltas: Dynamo {dyn['anon_delta'] / 2**20:.1f} MiB, kvray shards "
            f"{kv['anon_delta'] / 2**20:.1f} MiB after `release_memory` (malloc_trim; "
            f"{kv.get('anon_delta_untrimmed', 0) / 2**20:.1f} MiB before it: freed ZMQ buffers "
            "still resident). "
            f"RSS deltas: Dynamo {dyn['rss_delta'] / 2**20:.1f} MiB at completion, "
            f"{dyn['rss_delta_1s'] / 2**20:.1f} MiB 1 s later; kvray shards "
            f"{kv['rss_delta'] / 2**20:.1f} / {kv['rss_delta_1s'] / 2**20:.1f} MiB (ingestor "
            f"{kv['ingestor_rss_delta'] / 2**20:.1f} MiB, not counted); shards' "
            f"`bytes_estimate` {kv['bytes_estimate'] / 2**20:.1f} MiB; each read replica "
            f"(`kvray.connect()`, every Serve replica) holds another "
            f"{kv.get('replica_bytes_estimate', 0) / 2**20:.1f} MiB "
            f"({kv.get('replica_bytes_estimate', 0) / max(stream.live_pairs, 1):.1f} B per "
            f"pair, {kv.get('replica_pairs', 0):,} pairs).",
            f"- other work on the machine (CPU s of processes outside this benchmark, "
            f"measured over each system's ingest + query phase): "
            f"{dyn['foreign_cpu_s']:.2f} s in {dyn['phase_wall_s']:.1f} s (Dynamo phase), "
            f"{kv['foreign_cpu_s']:.2f} s in {kv['phase_wall_s']:.1f} s (kvray phase); "
            f"before them: {dyn.get('quiet', '?')} / {kv.get('quiet', '?')}; attempt "
            f"{dyn.get('attempt', 1)} / {kv.get('attempt', 1)} kept.",
            f"- latency samples: {len(dyn['lat'][SIZES[0]])} per size and path "
            f"({len(stream.queries[SIZES[0]])} prompts × {args.rounds} rounds).",
        ]
        if causes:
            detail.append(
                "- agreement detail: " + "; ".join(f"{k}: {v}" for k, v in causes.items())
            )
        detail += [f"  - {e}" for e in examples]
        detail += alt_lines
        sections.append(
            f"## {stream.pods} pods\n\n"
            + table(["measure", "kvray", "Dynamo", "kvray/Dynamo"], rows)
            + "\n\n"
            + "\n".join(detail)
        )
        p50 = {
            key: ms(kv[key][1024], 50) / ms(dyn["lat"][1024], 50)
            for key in ("lat_connect", "lat_http")
        }
        p50_128 = {
            key: ms(kv[key][128], 50) / ms(dyn["lat"][128], 50)
            for key in ("lat_connect", "lat_http")
        }
        checks = [
            ("ingest ≥ 0.5× Dynamo", k_rate / d_rate, k_rate / d_rate >= 0.5),
            (
                "memory per pair ≤ 1.0× (RssAnon)",
                k_mem / d_mem if d_mem > 0 else float("nan"),
                d_mem > 0 and k_mem / d_mem <= 1.0,
            ),
            (
                "memory per pair ≤ 1.0× (bytes_estimate)",
                k_est / d_mem if d_mem > 0 else float("nan"),
                d_mem > 0 and k_est / d_mem <= 1.0,
            ),
            (
                "connect() p50 ≤ 1.0× Dynamo HTTP (128 blocks)",
                p50_128["lat_connect"],
                p50_128["lat_connect"] <= 1.0,
            ),
            (
                "connect() p50 ≤ 1.0× Dynamo HTTP (1024 blocks)",
                p50["lat_connect"],
                p50["lat_connect"] <= 1.0,
            ),
            (
                "kvray HTTP p50 ≤ 3× Dynamo HTTP (128 blocks)",
                p50_128["lat_http"],
                p50_128["lat_http"] <= 3.0,
            ),
            (
                "kvray HTTP p50 ≤ 3× Dynamo HTTP (1024 blocks)",
                p50["lat_http"],
                p50["lat_http"] <= 3.0,
            ),
            ("zero disagreements", float(bad), bad == 0),
        ]
        for name, val, ok in checks:
            targets_rows.append(
                [f"{stream.pods} pods", name, f"{val:.2f}", "pass" if ok else "**FAIL**"]
            )
        prof = [f"### {stream.pods} pods"]
        shard_cpu = kv["cpu_by_role"].get("IndexShard", 0.0)
        ing_cpu = kv["cpu_by_role"].get("Ingestor", 0.0)
        ist = kv["ingestor_stats"]
        prof.append(
            f"Ingest accounting (unprofiled run): the {KVRAY_SHARDS} shards, which read their "
            f"pods themselves, used {shard_cpu:.2f} CPU s ({ist['messages']:,} messages "
            f"received, applied in {ist['shard_calls']:,} local calls; wall time inside "
            f"`IndexShard.apply` — decode, keys, index, change stream — {kv['apply_s']:.2f} s, "
            "which includes waiting for one of the 2 cores). Following the change stream cost "
            f"the Serve replica {kv['cpu_by_role'].get('ServeReplica', 0.0):.2f} s and the "
            f"benchmark's `kvray.connect()` replica thread "
            f"{kv['cpu_by_role'].get('connect() replica', 0.0):.2f} s (counted in kvray's CPU "
            f"above). The ingestor actor ({kv.get('ingestor_actor_messages', 0):,} messages: "
            f"no pod of its own here) used {ing_cpu:.2f} s; Ray's system processes (raylet, "
            f"GCS, Serve, ...) {kv['cpu_by_role'].get('ray-system', 0.0):.2f} s; Dynamo's "
            f"whole process {dyn['cpu_s']:.2f} s."
        )
        brows = []
        for size in SIZES:
            b = kv["breakdown"][size]
            brows.append(
                [
                    f"{size}",
                    f"{b['keys']:.3f}",
                    f"{b['noop']:.3f}",
                    f"{b['one_shard']:.3f}",
                    f"{b['fan_out']:.3f}",
                    f"{b['replica']:.3f}",
                    f"{b['total']:.3f}",
                    f"{ms(kv['lat_http'][size], 50):.3f}",
                    f"{ms(dyn['lat'][size], 50):.3f}",
                ]
            )
        prof.append(
            "Query path, p50 in ms (unprofiled run): `block_keys` on the client; a no-op Ray "
            "actor call carrying the same keys (the floor of any actor call); one shard's "
            f"`score`; the {KVRAY_SHARDS}-shard fan-out `score_keys` (a client without a replica);"
            " `score_keys` on the client's in-process replica (what `kvray.connect()` does by "
            "default); all of `score_tokens`; "
            "kvray HTTP; "
            "Dynamo HTTP.\n\n"
            + table(
                [
                    "blocks",
                    "block_keys",
                    "no-op actor call",
                    "1 shard score",
                    f"{KVRAY_SHARDS}-shard fan-out",
                    "replica score_keys",
                    "score_tokens",
                    "kvray HTTP",
                    "Dynamo HTTP",
                ],
                brows,
            )
        )
        b1, b2 = kv["breakdown"][SIZES[0]], kv["breakdown"][SIZES[-1]]
        d1, d2 = ms(dyn["lat"][SIZES[0]], 50), ms(dyn["lat"][SIZES[-1]], 50)
        prof.append(
            "**What dominates the query path.** A no-op Ray actor call alone takes "
            f"{b1['noop']:.2f} / {b2['noop']:.2f} ms ({SIZES[0]} / {SIZES[-1]} blocks), "
            f"{b1['noop'] / d1:.1f}× / {b2['noop'] / d2:.1f}× Dynamo's whole HTTP query, and "
            f"the {KVRAY_SHARDS}-shard fan-out {b1['fan_out']:.2f} / {b2['fan_out']:.2f} ms: "
            "that is why queries go to the in-process replica, where the prefix walk takes "
            f"{b1['replica']:.3f} / {b2['replica']:.3f} ms and computing the keys is "
            f"{100 * b1['keys'] / b1['total']:.0f} % / {100 * b2['keys'] / b2['total']:.0f} % "
            "of `score_tokens`. HTTP (the replica's fast path) adds "
            f"{ms(kv['lat_http'][SIZES[0]], 50) - b1['total']:.2f} / "
            f"{ms(kv['lat_http'][SIZES[-1]], 50) - b2['total']:.2f} ms on top of it (uvicorn, "
            "msgspec parsing, the response; see below)."
        )
        prof_parts.append("\n\n".join(prof))
        ratios_for_png.append(
            {
                "pods": stream.pods,
                "ingest rate": k_rate / d_rate,
                "CPU / M events": k_cpu / d_cpu,
                "mem/pair (RssAnon)": k_mem / d_mem if d_mem > 0 else 0.0,
                "mem/pair (estimate)": k_est / d_mem if d_mem > 0 else 0.0,
                "connect p50 128": p50_128["lat_connect"],
                "connect p50 1024": p50["lat_connect"],
                "HTTP p50 128": p50_128["lat_http"],
                "HTTP p50 1024": p50["lat_http"],
            }
        )
    sections.insert(
        1,
        "## Targets (kvray/Dynamo)\n\n"
        + table(["pods", "target", "value", "result"], targets_rows),
    )
    for i, spied in enumerate(profiles):
        prof_parts[i] += "\n\n" + spied
    sections.append(
        "## Profile (kvray)\n\n" + meta.get("profile_intro", "") + "\n\n" + "\n\n".join(prof_parts)
    )
    if meta.get("repro"):
        lines = [
            "## Dynamo's over-count, reduced to 8 events\n",
            "Greedy minimisation of the disagreeing events gave this shape (run by the "
            "benchmark itself, `repro_phase`): a 100-block path; pod B stores blocks 0-4, "
            "5-30, 31-32, 33-80 and pod A stores 0-4, 5-45, 46-99 in interleaved `BlockStored` "
            "events (each also carrying 3 private blocks after its path segment, as a "
            "request's own tail does); then A evicts block 70. Right answer: A 70, B 81.\n",
        ]
        for r in meta["repro"]:
            lines.append(
                f"- `--threads {r['threads']}`: before the eviction {r['before']}, after it "
                f"{r['after']}"
                + (" — **B credited with A's blocks**" if r["after"].get("B") != 81 else " — right")
            )
        sections.append("\n".join(lines))
    if meta.get("example"):
        sections.append(
            "## Dynamo's answer, as observed (first prompt, trimmed)\n\n```json\n"
            + json.dumps(meta["example"], indent=None)[:1200]
            + "\n```"
        )
    return "\n\n".join(sections), ratios_for_png


def plot(ratios: list[dict[str, Any]], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "PNG skipped: matplotlib is not importable."
    labels = [k for k in ratios[0] if k != "pods"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(ratios)
    for i, r in enumerate(ratios):
        xs = [j + i * width for j in range(len(labels))]
        ax.bar(xs, [r[k] for k in labels], width, label=f"{r['pods']} pods")
        for x, k in zip(xs, labels, strict=True):
            ax.annotate(f"{r[k]:.2f}", (x, r[k]), ha="center", va="bottom", fontsize=7)
    targets = {
        "ingest rate": 0.5,
        "mem/pair (RssAnon)": 1.0,
        "mem/pair (estimate)": 1.0,
        "connect p50 128": 1.0,
        "connect p50 1024": 1.0,
        "HTTP p50 128": 3.0,
        "HTTP p50 1024": 3.0,
    }
    for j, k in enumerate(labels):
        if k in targets:
            ax.hlines(targets[k], j - width / 2, j + width * (len(ratios) - 0.5), colors="red")
    ax.plot([], [], color="red", label="target")
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xticks([j + width * (len(ratios) - 1) / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, rotation=20, ha="right")
    ax.set_ylabel("kvray / Dynamo (log)")
    ax.set_title("kvray vs Dynamo standalone indexer (ingest: higher is better; rest: lower)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def measured(run: Any, args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Run a system's phase on a quiet machine; redo it (up to ``--retries`` times) when other
    people's processes used more than 0.25 cores during it, keeping the least disturbed."""
    best: dict[str, Any] | None = None
    for attempt in range(1 + args.retries):
        quiet = wait_quiet(args.quiet_wait) if args.quiet_wait else "not checked"
        res: dict[str, Any] = run()
        res["quiet"] = quiet
        res["attempt"] = attempt + 1
        share = res["foreign_cpu_s"] / max(res["phase_wall_s"], 1e-9)
        if best is None or share < best["foreign_cpu_s"] / max(best["phase_wall_s"], 1e-9):
            best = res
        if share <= 0.25:
            break
        print(f"{name} phase disturbed (others used {share:.2f} cores): again", flush=True)
    assert best is not None
    return best


def load1() -> float:
    return os.getloadavg()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/dynamo.md")
    ap.add_argument("--png", default=None, help="default: --out with .png")
    ap.add_argument("--pods", default="16,256", help="comma-separated pod counts")
    ap.add_argument("--blocks", type=int, default=1_000_000, help="block-events per pod count")
    ap.add_argument("--queries", type=int, default=100, help="prompts per size (128, 1024)")
    ap.add_argument("--rounds", type=int, default=3, help="timed passes over the prompts")
    ap.add_argument("--dynamo-python", default=DEFAULT_DYNAMO_PY)
    ap.add_argument(
        "--dynamo-threads",
        default="4,1",
        help="dynamo.indexer --threads; the first is measured, the others are only checked "
        "for agreement and ingest rate",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="ingest each system this many times, alternating; the tables use each one's median",
    )
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=900,
        help="before each system's phase, wait up to this many seconds for other processes "
        "to use < 0.15 cores (0: do not wait)",
    )
    ap.add_argument(
        "--retries",
        type=int,
        default=2,
        help="redo a system's phase when others used > 0.25 cores during it",
    )
    ap.add_argument(
        "--kvray-shards",
        type=int,
        default=2,
        help="kvray num_shards (default: kvray's own default)",
    )
    ap.add_argument(
        "--kvray-flush-messages", type=int, default=None, help="kvray events.flush_messages"
    )
    ap.add_argument("--dynamo-phase", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--repro-phase", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dynamo_phase:
        dynamo_phase(*args.dynamo_phase)
        return
    if args.repro_phase:
        threads, netns = int(args.repro_phase[0]), args.repro_phase[1] == "1"
        print(json.dumps(repro_phase(args.dynamo_python, threads, netns)))
        return
    if not Path(args.dynamo_python).exists():
        sys.exit(
            f"{args.dynamo_python} not found: python3 -m venv /work/dynamo-venv && "
            "/work/dynamo-venv/bin/pip install ai-dynamo-runtime (or pass --dynamo-python)"
        )
    import ray

    global KVRAY_SHARDS
    KVRAY_SHARDS = args.kvray_shards
    if args.kvray_flush_messages:
        KVRAY_EVENTS["flush_messages"] = args.kvray_flush_messages
    meta: dict[str, Any] = {
        "dynamo_version": dynamo_version(args.dynamo_python),
        "load_before": f"{load1():.2f}",
    }
    init_local_ray()  # always a fresh cluster of our own, never one someone else started here
    results = []
    profiles = []
    with tempfile.TemporaryDirectory(prefix="bench_dynamo_") as td:
        tmp = Path(td)
        for pods in [int(x) for x in args.pods.split(",")]:
            stream = build_stream(pods, args.blocks, args.queries)
            print(
                f"[{pods} pods] stream: {stream.block_events:,} block-events in "
                f"{len(stream.frames):,} batches ({stream.gen_s:.1f} s to generate)",
                flush=True,
            )
            threads = [int(x) for x in str(args.dynamo_threads).split(",")]
            # The systems alternate, --repeat times each: run-to-run noise on a shared VM is
            # ±15 %, and alternating exposes both to the same drift.
            dyns, kvs = [], []
            for r in range(args.repeat):
                run_d = partial(run_dynamo, stream, args, tmp, threads[0])
                dyns.append(measured(run_d, args, "Dynamo"))
                print(f"[{pods} pods] Dynamo: ingest {dyns[-1]['ingest_s']:.2f} s", flush=True)
                run_k = partial(run_kvray, stream, args, f"benchdyn{pods}r{r}")
                kvs.append(measured(run_k, args, "kvray"))
                print(f"[{pods} pods] kvray: ingest {kvs[-1]['ingest_s']:.2f} s", flush=True)
            dyn, kv = median_run(dyns), median_run(kvs)
            meta["example"] = dyn.get("example_answer")
            # Other --threads values: agreement and ingest rate only (the table uses the first).
            dyn["alt"] = [run_dynamo(stream, args, tmp, t) for t in threads[1:]]
            results.append((stream, dyn, kv))
            if not args.no_profile:
                try:
                    profiles.append(profile_kvray(stream, args, f"benchdynp{pods}", tmp))
                except FileNotFoundError as exc:
                    profiles.append(f"py-spy tables skipped: {exc}.")
                print(f"[{pods} pods] profiled", flush=True)
    ray.shutdown()
    meta["repro"] = [run_repro(args, int(t)) for t in str(args.dynamo_threads).split(",")]
    meta["load_after"] = f"{load1():.2f}"
    meta["profile_intro"] = (
        "Accounting and the query breakdown come from the measured run; the py-spy tables from "
        "a second kvray run of the same stream with py-spy attached. 'self' = samples whose "
        "innermost frame is the function (C code such as msgspec, xxhash or "
        "Ray's core worker is billed to the Python frame that called it: `Worker.main_loop` "
        "self time is Ray's C++ core worker); 'inclusive' = samples with the function anywhere "
        "on the stack. Idle threads are excluded. Interpretation and proposed changes: "
        "`docs/dynamo.md`."
    )
    png = Path(args.png) if args.png else Path(args.out).with_suffix(".png")
    body, ratios = render(results, profiles, args, meta)
    note = plot(ratios, png)
    if note:
        body += "\n\n" + note
    text = write_report(args.out, "kvray vs NVIDIA Dynamo's standalone KV indexer", [body])
    print(text)


if __name__ == "__main__":
    main()
