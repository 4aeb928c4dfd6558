"""Head to head with NVIDIA Dynamo's standalone KV indexer (``python -m dynamo.indexer``).

Run: ``python benchmarks/bench_dynamo.py [--out benchmarks/results/dynamo.md] [--pods 16,256]
[--blocks N]`` (or ``python -m benchmarks.dynamo`` from the repository root). Needs
``ai-dynamo-runtime`` (the ``bench`` extra). Its interpreter is, in order: ``--dynamo-python``,
else ``$KVRAY_DYNAMO_PYTHON``, else the first of this interpreter, ``python3`` on ``PATH`` and
a ``dynamo-venv`` next to the repository that can import ``dynamo.indexer``. A separate venv
is fine because the peer runs as its own process anyway:
``python3 -m venv <dir> && <dir>/bin/pip install ai-dynamo-runtime==1.6.1``.

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

Targets (kvray/Dynamo): ingest ≥ 1.0× (issue 16); memory per pair ≤ 1.0×; ``kvray.connect()``
query p50 ≤ 1.0× Dynamo's HTTP p50; kvray HTTP p50 ≤ 3×; kvray's
scores equal the simulated caches' on every query (Dynamo's disagreements are reported, not a
target: when the two differ the simulated caches say who is right).

Modules: ``workload`` (the event stream and prompts), ``publish`` (binding PUB sockets),
``measure`` (/proc CPU and memory, timing, quiet-machine checks), ``dynamo_side`` and
``kvray_side`` (each system started and measured), ``profiling`` (py-spy on kvray),
``report`` (markdown and PNG), ``cli`` (arguments and the run).
"""

from __future__ import annotations

import os
from pathlib import Path

from kvray._env import apply_local_defaults

# Before anything imports ray (every module of this package is imported after this one).
apply_local_defaults()
for _k, _v in {
    # Direct-ingress replicas listen from port 30000 up by default, where other kvray
    # deployments on a shared machine (and their HTTP fuzzers) listen too: use a range of our
    # own so nobody else's traffic reaches the endpoint being measured.
    "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": "45310",
    "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": "45330",
    "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": "45330",
    "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": "45350",
}.items():
    os.environ.setdefault(_k, _v)

REPO_ROOT = Path(__file__).resolve().parents[2]
