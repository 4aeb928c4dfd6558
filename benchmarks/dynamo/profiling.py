"""kvray under py-spy: a second, identical run sampled while ingesting and while answering
HTTP queries, summarised by where the busy samples are."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from benchmarks._util import table
from benchmarks.dynamo import REPO_ROOT
from benchmarks.dynamo.kvray_side import (
    KVRAY,
    attach_pods,
    ingest_synced,
    kvray_runtime,
    kvray_stop,
    ray_processes,
)
from benchmarks.dynamo.measure import Http, timed
from benchmarks.dynamo.publish import BoundPublisher, close_all
from benchmarks.dynamo.workload import MODEL, Stream

Stacks = Counter[tuple[str, ...]]


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

    def stop(self) -> dict[str, Stacks]:
        for p in self.procs:
            p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return {name: _read_stacks(path) for name, path in self.files.items()}


def _read_stacks(path: Path) -> Stacks:
    """py-spy's raw output, busy samples only."""
    stacks: Stacks = Counter()
    if path.exists():
        for line in path.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            if stack and n.isdigit():
                frames = tuple(_frame(f) for f in stack.split(";"))
                if not any(x in frames[-1] for x in _IDLE):
                    stacks[frames] += int(n)
    return stacks


def _frame(f: str) -> str:
    """``func (path/to/file.py:123)`` → ``func (file.py)`` with a short package path."""
    func, _, loc = f.partition(" (")
    path = loc.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", f"{REPO_ROOT}/"):
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


def summarize(stacks: Stacks, top: int = 8) -> tuple[int, list[list[str]]]:
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


Rules = list[tuple[str, list[str]]]

# (label, substrings): a sample goes to the first label one of whose substrings appears in a
# frame, frames scanned from the innermost out; "Ray core worker" is C++ time billed to the
# main loop itself (a leaf ``Worker.main_loop``).
_CORE = ("Ray core worker (C++, leaf `Worker.main_loop`)", ["Worker.main_loop"])
SHARD_RULES: Rules = [
    (
        "in-shard ingest: ZMQ receive, topic/seq/rank parse",
        ["recv_multipart", "ZmqSource.", "StreamFollower.handle", "parse_frames", "parse_topic"]
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
    _CORE,
]
INGESTOR_RULES: Rules = [
    ("ZMQ receive (`recv_multipart`, poll)", ["recv_multipart", "Poller.poll", "ZmqSource.poll"]),
    (
        "Ray: submitting `apply` calls (task submit; ops > 100 KiB go via the object store)",
        ["_actor_method_call", "Pickler", "serializ"],
    ),
    ("Ray: reaping results (`ray.wait`/`ray.get`)", ["ray.wait", "wait (ray", "get_objects"]),
    ("parse topic/seq/rank (`_handle`)", ["_handle", "parse_", "peek_rank", "SeqTracker"]),
    (
        "`Ingestor.progress`/`streams` (the benchmark's `wait_applied` polling)",
        ["Ingestor.progress", "Ingestor.streams"],
    ),
    ("rest of the loop", ["Ingestor."]),
    _CORE,
]
REPLICA_RULES: Rules = [
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
    _CORE,
]


def categorize(stacks: Stacks, rules: Rules) -> list[list[str]]:
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


def _spied_run(
    stream: Stream, rounds: int, ns: str, tmp: Path
) -> tuple[float, dict[str, Stacks], dict[str, Stacks]]:
    """kvray deployed again, ingesting and then answering 1024-block HTTP queries under
    py-spy: (ingest seconds, ingest stacks by process, query stacks by process)."""
    _, client, base = kvray_runtime(ns)
    pubs: list[BoundPublisher] = []
    try:
        roles = ray_processes()
        pids = {f"shard{i}": p.pid for i, p in enumerate(roles.get("IndexShard", []))}
        pids["ingestor"] = roles["Ingestor"][0].pid
        pids["replica"] = roles["ServeReplica"][0].pid
        pubs = attach_pods(client, stream.pods)
        spy = Spy(pids, tmp, f"ingest{stream.pods}")
        t0 = time.perf_counter()
        ingest_synced(client, pubs, stream)
        ingest_s = time.perf_counter() - t0
        ingest = spy.stop()
        # Query path over HTTP: the Serve replica and the shards.
        h = Http(base)
        bodies = [
            json.dumps({"model": MODEL, "token_ids": p}).encode() for p in stream.queries[1024]
        ]
        spy = Spy({"replica": pids["replica"]}, tmp, f"http{stream.pods}")
        timed(lambda b: h.post("/score_tokens", b), bodies, rounds)
        return ingest_s, ingest, spy.stop()
    finally:
        close_all(pubs)
        kvray_stop(ns)


def _merged(d: dict[str, Stacks], prefix: str) -> Stacks:
    c: Stacks = Counter()
    for k, v in d.items():
        if k.startswith(prefix):
            c.update(v)
    return c


def profile_kvray(stream: Stream, rounds: int, ns: str, tmp: Path) -> str:
    """A second kvray run under py-spy; returns the markdown of its profile tables."""
    ingest_s, ingest, q_http = _spied_run(stream, rounds, ns, tmp)
    parts = [
        f"#### py-spy, {stream.pods} pods (250 Hz, busy samples only; "
        f"ingest took {ingest_s:.2f} s under sampling)"
    ]
    tops = []
    for title, stacks, rules in (
        (
            f"ingest: {KVRAY.shards} shard actors (merged; they read their pods themselves)",
            _merged(ingest, "shard"),
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
            + table(["where the busy samples are", "share"], cats)
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
