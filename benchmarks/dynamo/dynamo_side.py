"""NVIDIA Dynamo's standalone indexer: found, started, fed, queried and measured.

Its phases run in a subprocess of their own (``--dynamo-phase`` / ``--repro-phase``), inside
``unshare -n`` when possible: Dynamo's HTTP server binds 0.0.0.0.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from benchmarks.dynamo import REPO_ROOT
from benchmarks.dynamo.measure import (
    Http,
    Proc,
    cpu_s,
    foreign_cpu,
    foreign_delta,
    free_port,
    rss,
    rss_anon,
    timed,
)
from benchmarks.dynamo.publish import (
    BoundPublisher,
    close_all,
    make_publishers,
    send_all,
    wait_all,
)
from benchmarks.dynamo.workload import BLOCK, MODEL, SIZES, Stream
from kvray.core.events import encode_batch

PYTHON_ENV = "KVRAY_DYNAMO_PYTHON"
INSTALL = "python3 -m venv <dir> && <dir>/bin/pip install ai-dynamo-runtime==1.6.1"
# The peer's interpreter runs outside this repository's tree: a cwd holding this package (also
# named ``dynamo``) would shadow Dynamo's own namespace package for ``python -m dynamo.indexer``.
_CWD = tempfile.gettempdir()


# --- finding the peer ------------------------------------------------------------------------


def has_indexer(python: str) -> bool:
    """Whether ``python -m dynamo.indexer`` would find the module."""
    probe = "import importlib.util as u, sys; sys.exit(u.find_spec('dynamo.indexer') is None)"
    try:
        r = subprocess.run([python, "-c", probe], cwd=_CWD, capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def find_dynamo_python(flag: str | None) -> str:
    """Dynamo's interpreter: ``--dynamo-python``, else ``$KVRAY_DYNAMO_PYTHON``, else the first
    of this interpreter, ``python3`` on PATH and a ``dynamo-venv`` next to (or in) the
    repository whose ``dynamo.indexer`` imports. Raises ``SystemExit`` saying how to install it."""
    given, source = (flag, "--dynamo-python") if flag else (os.environ.get(PYTHON_ENV), PYTHON_ENV)
    if given:
        if has_indexer(given):
            return given
        raise SystemExit(
            f"{given} (from {source}) cannot import dynamo.indexer. Install Dynamo's indexer "
            f"in a venv of its own: {INSTALL}, then point --dynamo-python or {PYTHON_ENV} at "
            "<dir>/bin/python."
        )
    candidates = [sys.executable, shutil.which("python3")]
    candidates += [str(d / "dynamo-venv" / "bin" / "python") for d in (REPO_ROOT.parent, REPO_ROOT)]
    tried = list(dict.fromkeys(c for c in candidates if c))
    for python in tried:
        if Path(python).exists() and has_indexer(python):
            return python
    raise SystemExit(
        "NVIDIA Dynamo's indexer (python -m dynamo.indexer, PyPI ai-dynamo-runtime) was not "
        f"found (tried {', '.join(tried)}). Install it: {INSTALL}; then pass "
        f"--dynamo-python <dir>/bin/python or set {PYTHON_ENV}=<dir>/bin/python."
    )


def dynamo_version(python: str) -> str:
    out = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('ai-dynamo-runtime'))"],
        capture_output=True,
        text=True,
        cwd=_CWD,
    )
    return out.stdout.strip() or "?"


# --- talking to it ---------------------------------------------------------------------------


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


def start_indexer(
    python: str, threads: int, log: IO[str] | int
) -> tuple[subprocess.Popen[bytes], Http]:
    port = free_port()
    proc = subprocess.Popen(
        [python, "-m", "dynamo.indexer", "--port", str(port), "--block-size", str(BLOCK)]
        + ["--threads", str(threads)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=_CWD,
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


def stop_indexer(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def register(c: Http, pubs: list[BoundPublisher]) -> None:
    """``POST /register`` each publisher as a worker; returns once all are connected."""
    for i, pub in enumerate(pubs):
        body = {
            "instance_id": i,
            "endpoint": pub.endpoint,
            "model_name": MODEL,
            "block_size": BLOCK,
        }
        c.post("/register", json.dumps(body).encode())
    wait_all(pubs)


def query(c: Http, body: bytes) -> dict[str, int]:
    """Dynamo's answer as pod → matched blocks (it answers tokens)."""
    ans = c.post("/query", body)
    return {
        f"pod{inst}": sum(ranks.values()) // BLOCK
        for inst, ranks in ans["scores"].items()
        if sum(ranks.values())
    }


def netns_available() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None and bool(shutil.which("ip"))


def phase_cmd(*args: str, netns: bool) -> list[str]:
    """This package run again (hidden phase flags), inside ``unshare -n`` when ``netns``."""
    cmd = [sys.executable, "-m", "benchmarks.dynamo", *args]
    return ["unshare", "-n", *cmd] if netns else cmd


# --- the measured phase ----------------------------------------------------------------------


def _ingest(
    c: Http, ps: Proc, stream: Stream, pubs: list[BoundPublisher], root: int
) -> tuple[dict[str, Any], dict[tuple[int, str], float], float]:
    """Send the stream and wait until Dynamo's applied counters add up to it: the ingest
    measures, the foreign-CPU baseline and the phase's start (both taken before sending)."""
    res: dict[str, Any] = {}
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
    return res, foreign0, wall0


def _queries(c: Http, stream: Stream, rounds: int, res: dict[str, Any]) -> bytes:
    """Scores and latencies per size; returns the first body of the last size."""
    res["scores"] = {}
    res["lat"] = {}
    for size in SIZES:
        bodies = [
            json.dumps({"token_ids": p, "model_name": MODEL}).encode() for p in stream.queries[size]
        ]
        res["scores"][size] = [query(c, b) for b in bodies]  # also the warm-up
        res["lat"][size] = timed(lambda b: query(c, b), bodies, rounds)
    return bodies[0]


def _example(c: Http, body: bytes) -> dict[str, Any]:
    """Dynamo's raw answer to ``body``, trimmed to 2 instances and 4 scores."""
    ex: dict[str, Any] = c.post("/query", body)
    ex["instances"] = dict(list(ex.get("instances", {}).items())[:2])
    ex["scores"] = dict(list(ex["scores"].items())[:4])
    return ex


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
    try:
        ps = Proc(proc.pid)
        rss_idle = rss([ps])
        pubs = make_publishers(stream.pods)
        register(c, pubs)
        workers = json.loads(c.get("/workers"))
        workers_active = sum(w.get("status") == "active" for w in workers)
        time.sleep(0.5)
        res, foreign0, wall0 = _ingest(c, ps, stream, pubs, data["root_pid"])
        res["rss_idle"], res["workers_active"] = rss_idle, workers_active
        first = _queries(c, stream, data["rounds"], res)
        res["foreign_cpu_s"] = foreign_delta(foreign0, data["root_pid"])
        res["phase_wall_s"] = time.perf_counter() - wall0
        res["example_answer"] = _example(c, first)
    finally:
        close_all(pubs)
        stop_indexer(proc)
        log.close()
    with open(out_path, "w") as f:
        json.dump(res, f)


def run_dynamo(stream: Stream, python: str, rounds: int, tmp: Path, threads: int) -> dict[str, Any]:
    """One measured Dynamo phase (its own subprocess) with ``--threads threads``."""
    netns = netns_available()
    tag = f"{stream.pods}-{threads}"
    data_path, out_path = tmp / f"dyn{tag}.pkl", tmp / f"dyn{tag}.json"
    log = tmp / f"dynamo_indexer_{tag}.log"
    with open(data_path, "wb") as f:
        pickle.dump(
            {
                "stream": stream,
                "netns": netns,
                "python": python,
                "threads": threads,
                "root_pid": os.getpid(),
                "rounds": rounds,
                "log": str(log),
            },
            f,
        )
    cmd = phase_cmd("--dynamo-phase", str(data_path), str(out_path), netns=netns)
    subprocess.run(cmd, check=True, cwd=REPO_ROOT)
    with open(out_path) as f:
        res: dict[str, Any] = json.load(f)
    res["netns"] = netns
    res["threads_flag"] = threads
    res["scores"] = {int(k): v for k, v in res["scores"].items()}
    res["lat"] = {int(k): v for k, v in res["lat"].items()}
    return res


# --- the over-count reproduction -------------------------------------------------------------

# (pod, (first block, end block)) in send order; pod 0 is A, pod 1 is B.
_REPRO_SEGMENTS: tuple[tuple[int, tuple[int, int]], ...] = (
    (1, (0, 5)),
    (0, (0, 5)),
    (1, (5, 31)),
    (0, (5, 46)),
    (1, (31, 33)),
    (0, (46, 100)),
    (1, (33, 81)),
)


class _Repro:
    """The repro's 100-block path, its events, and sending them one at a time."""

    def __init__(self, c: Http, pubs: list[BoundPublisher]) -> None:
        from kvray.core.hashing import BlockHasher

        self.c, self.pubs, self.sent = c, pubs, 0
        self.rng = random.Random(5)
        self.path = [self.rng.randrange(150_000) for _ in range(100 * BLOCK)]
        self.hasher = BlockHasher()
        self.keys = self.hasher.event_keys(self.path)

    def seg(self, a: int, b: int) -> Any:
        from kvray.core.events import WireBlockStored

        extra = [self.rng.randrange(150_000) for _ in range(3 * BLOCK)]
        toks = self.path[a * BLOCK : b * BLOCK] + extra
        ks: list[int | bytes] = [*self.hasher.event_keys(self.path[: a * BLOCK] + toks)[a:]]
        parent = self.keys[a - 1] if a else None
        return WireBlockStored(ks, parent, toks, BLOCK, None, "GPU", None)

    def send(self, pod: int, ev: Any) -> None:
        self.pubs[pod].send(encode_batch([ev], ts=0.0))
        self.sent += 1
        deadline = time.monotonic() + 10
        while sum(_applied(self.c.get("/metrics")).values()) < self.sent:
            if time.monotonic() > deadline:
                raise RuntimeError("dynamo did not apply the repro events")
            time.sleep(0.01)

    def query(self) -> dict[str, int]:
        body = json.dumps({"token_ids": self.path, "model_name": MODEL}).encode()
        ans = self.c.post("/query", body)["scores"]
        return {"AB"[int(k)]: sum(v.values()) // BLOCK for k, v in sorted(ans.items())}


def repro_phase(python: str, threads: int, netns: bool) -> dict[str, Any]:
    """8 events that make Dynamo's multi-threaded indexer credit pod B with pod A's blocks.

    Path of 100 blocks. B stores 0-4, 5-30, 31-32, 33-80; A stores 0-4, 5-45, 46-99; each
    stored event also carries 3 private blocks after its path segment (a request's own tail),
    and the events interleave as in ``_REPRO_SEGMENTS``. Then A evicts block 70. Right answer:
    A 70, B 81.
    """
    from kvray.core.events import WireBlockRemoved

    if netns:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    proc, c = start_indexer(python, threads, subprocess.DEVNULL)
    pubs = make_publishers(2)
    try:
        register(c, pubs)
        r = _Repro(c, pubs)
        for pod, (lo, hi) in _REPRO_SEGMENTS:
            r.send(pod, r.seg(lo, hi))
        before = r.query()
        r.send(0, WireBlockRemoved([r.keys[70]], "GPU"))
        return {"threads": threads, "before": before, "after": r.query()}
    finally:
        close_all(pubs)
        proc.terminate()
        proc.wait(10)


def run_repro(python: str, threads: int) -> dict[str, Any]:
    """``repro_phase`` in its own subprocess (network namespace when possible)."""
    netns = netns_available()
    args = ("--dynamo-python", python, "--repro-phase", str(threads), "1" if netns else "0")
    out = subprocess.run(
        phase_cmd(*args, netns=netns), check=True, capture_output=True, text=True, cwd=REPO_ROOT
    ).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]
