"""kvray deployed the way ``kvray serve`` deploys it, fed the same frames, queried and measured
(plus Serve's door against a no-op deployment and the pieces of a ``score_tokens`` call)."""

from __future__ import annotations

import http.client
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgspec

from benchmarks.dynamo.measure import (
    Http,
    Proc,
    cpu_s,
    descendants,
    foreign_cpu,
    foreign_delta,
    free_port,
    ms,
    rss,
    rss_anon,
    timed,
    trimmed_self_anon,
)
from benchmarks.dynamo.publish import (
    BoundPublisher,
    close_all,
    expected_seqs,
    make_publishers,
    send_all,
    wait_all,
)
from benchmarks.dynamo.workload import MODEL, SIZES, Stream


@dataclass
class KvrayOptions:
    shards: int = 2
    """kvray's default num_shards (what ``kvray serve`` starts); ``--kvray-shards``."""
    events: dict[str, Any] = field(default_factory=dict)
    """EventsConfig overrides (``--kvray-flush-messages``)."""


KVRAY = KvrayOptions()
ROLES = ("IndexShard", "Ingestor", "Controller", "TokenizerActor", "ServeReplica")


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
        for name in ROLES:
            if cmd.startswith(f"ray::{name}"):
                role = name
        roles.setdefault(role, []).append(p)
    return roles


def kvray_runtime(ns: str) -> tuple[Any, Any, str]:
    from kvray import connect
    from kvray.config import Config, EventsConfig, ServeConfig
    from kvray.serve.app import deploy

    # What `kvray serve` and the Serve config deploy: kvray's defaults (shards, hash checks,
    # snapshots every 10 s), the one Serve application; only the namespace and Serve's proxy
    # port (unused with direct ingress) are this benchmark's.
    cfg = Config(
        namespace=ns,
        num_shards=KVRAY.shards,
        events=EventsConfig(**KVRAY.events),
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


def attach_pods(client: Any, pods: int) -> list[BoundPublisher]:
    """Fresh bound publishers, added to kvray as named pods; returns once all are connected."""
    pubs = make_publishers(pods)
    for i, pub in enumerate(pubs):
        client.add_pod(pub.endpoint, None, f"pod{i}", MODEL)
    wait_all(pubs)
    return pubs


def ingest_synced(client: Any, pubs: list[BoundPublisher], stream: Stream) -> float:
    """Send the stream and wait until kvray applied it; returns the publishing time."""
    publish_s = send_all(pubs, stream.frames)
    from kvray.sim.applied import wait_applied

    if not wait_applied(client, expected_seqs(pubs), timeout_s=900):
        raise RuntimeError("kvray did not apply the stream within 900 s")
    return publish_s


def _ingest(
    client: Any, roles: dict[str, list[Proc]], pubs: list[BoundPublisher], stream: Stream
) -> dict[str, Any]:
    """Ingest rate, CPU by role and the shards' memory growth."""
    res: dict[str, Any] = {}
    shards, ingestor = roles.get("IndexShard", []), roles.get("Ingestor", [])
    rss0, ing_rss0, anon0 = rss(shards), rss(ingestor), rss_anon(shards)
    # Every kvray process (issue 16 counts all copies): each actor role, and this process,
    # which holds the connect() client's read replica (and the publishers' sockets).
    kinds = [r for r in roles if r != "ray-system"]
    anon_roles0 = {r: rss_anon(roles[r]) for r in kinds}
    self0 = trimmed_self_anon()  # trimmed at both ends: its delta is what the stream left
    cpu0 = {r: cpu_s(ps) for r, ps in roles.items()}
    rep_cpu0 = client.replica.stats().cpu_s if client.replica is not None else 0.0
    t0 = time.perf_counter()
    res["publish_s"] = ingest_synced(client, pubs, stream)
    res["ingest_s"] = time.perf_counter() - t0
    res["cpu_by_role"] = {r: cpu_s(ps) - cpu0[r] for r, ps in roles.items()}
    if client.replica is not None:  # the connect() replica's thread in this process
        res["cpu_by_role"]["connect() replica"] = client.replica.stats().cpu_s - rep_cpu0
    res["cpu_actors_s"] = sum(v for r, v in res["cpu_by_role"].items() if r != "ray-system")
    res["cpu_s"] = sum(res["cpu_by_role"].values())
    res["rss_delta"] = rss(shards) - rss0
    res["ingestor_rss_delta"] = rss(ingestor) - ing_rss0
    time.sleep(1.0)
    res["rss_delta_1s"] = rss(shards) - rss0
    # Shards read their pods themselves: the ZMQ messages buffered while they caught up
    # were freed but stay resident until glibc returns them (shards trim every 30 s).
    res["anon_delta_untrimmed"] = rss_anon(shards) - anon0
    import ray

    ray.get([s.release_memory.remote() for s in client.shards])
    res["anon_delta"] = rss_anon(shards) - anon0
    res["anon_by_role"] = {r: rss_anon(roles[r]) - anon_roles0[r] for r in kinds}
    res["anon_by_role"]["connect() replica (this process)"] = trimmed_self_anon() - self0
    res["anon_all"] = sum(res["anon_by_role"].values())
    return res


def _stats(client: Any) -> dict[str, Any]:
    """What the shards, the client's replica and the ingestors say about the ingest."""
    st = msgspec.to_builtins(client.stats())
    shards = st["shards"]
    rep = msgspec.to_builtins(client.replica.stats()) if client.replica is not None else {}
    rej: Counter[str] = Counter()
    for s in shards:
        rej.update(s["rejected"])
    return {
        "pairs": sum(s["pairs"] for s in shards),
        "keys": sum(s["keys"] for s in shards),
        "bytes_estimate": sum(s["bytes_estimate"] for s in shards),
        "replica_bytes_estimate": rep.get("bytes_estimate", 0),
        "replica_pairs": rep.get("pairs", 0),
        "stored": sum(s["stored_blocks"] for s in shards),
        "removed": sum(s["removed_blocks"] for s in shards),
        "rejected": dict(rej),
        # Where the shards' time went: inside IndexShard.apply (decode + keys + index) vs the
        # rest of their CPU (Ray's per-call work: receiving and unpickling the ops, replying).
        "apply_s": sum(s["apply_seconds"] for s in shards),
        "shard_ops": sum(s["ops"] for s in shards),
        "ingestor_stats": {
            k: sum(i[k] for i in st["ingestors"]) for k in ("messages", "shard_calls")
        },
        "ingestor_actor_messages": sum(
            i["messages"] for i in st["ingestors"] if not str(i["ingestor"]).startswith("shard")
        ),
    }


def _queries(client: Any, base: str, stream: Stream, rounds: int) -> dict[str, Any]:
    """Scores and latencies per size, through ``kvray.connect()`` and over HTTP."""

    def connect_q(p: list[int]) -> dict[str, int]:
        return {k: round(v) for k, v in client.score_tokens(p, MODEL).items() if v}

    h = Http(base)

    def http_q(body: bytes) -> dict[str, int]:
        return {k: round(v) for k, v in h.post("/score_tokens", body)["scores"].items() if v}

    res: dict[str, Any] = {"scores": {}, "scores_http": {}, "lat_connect": {}, "lat_http": {}}
    for size in SIZES:
        prompts = stream.queries[size]
        bodies = [json.dumps({"model": MODEL, "token_ids": p}).encode() for p in prompts]
        res["scores"][size] = [connect_q(p) for p in prompts]
        res["scores_http"][size] = [http_q(b) for b in bodies]
        res["lat_connect"][size] = timed(connect_q, prompts, rounds)
        res["lat_http"][size] = timed(http_q, bodies, rounds)
    return res


def run_kvray(stream: Stream, rounds: int, ns: str) -> dict[str, Any]:
    """One measured kvray phase in namespace ``ns`` (deployed, fed, queried, stopped)."""
    res: dict[str, Any] = {}
    _, client, base = kvray_runtime(ns)
    pubs: list[BoundPublisher] = []
    try:
        roles = ray_processes()
        res["processes"] = {r: len(ps) for r, ps in roles.items()}
        pubs = attach_pods(client, stream.pods)
        time.sleep(0.5)
        foreign0, wall0 = foreign_cpu(os.getpid()), time.perf_counter()
        res.update(_ingest(client, roles, pubs, stream))
        res.update(_stats(client))
        res.update(_queries(client, base, stream, rounds))
        res["lat_http_noop"] = noop_door(stream, rounds)
        res["breakdown"] = query_breakdown(client, stream, rounds)
        res["foreign_cpu_s"] = foreign_delta(foreign0, os.getpid())
        res["phase_wall_s"] = time.perf_counter() - wall0
    finally:
        close_all(pubs)
        kvray_stop(ns)
    return res


def find_door(path: str, marker: str, timeout_s: float = 60.0) -> str | None:
    """The direct-ingress listener (ports from ``RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT`` up,
    as ``kvray.serve.app.find_http`` probes them) whose ``GET path`` answer has ``marker``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        low = int(os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "30000"))
        for port in range(low, low + 16):
            try:
                if marker in Http(f"http://127.0.0.1:{port}").get(path):
                    return f"http://127.0.0.1:{port}"
            except (OSError, http.client.HTTPException):  # closed, or not HTTP (Serve's gRPC)
                continue
        time.sleep(0.2)
    return None


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

    serve.run(NoopDoor.bind(), name="noop-door", route_prefix="/noop-door")  # type: ignore[attr-defined]
    try:
        base = find_door("/noop-door", '"noop-door-up"')
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
