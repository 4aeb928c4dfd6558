"""kvray's router against Ray's own inside Ray Serve LLM, through the real OpenAI endpoint.

One seeded workload (tenants with long system prompts, multi-turn chats, shared documents, a
LoRA adapter; :mod:`kvray.sim.chat_workload`) is replayed through ``/v1/chat/completions`` of
a Serve LLM app (``build_openai_app``: ``OpenAiIngress`` -> ``LLMServer`` replicas) whose engines
are kvray's CPU stand-in (:mod:`kvray.serve.llm_engine`: vLLM's block pool and hashing, real
ZMQ KV events, prefill time per uncached token, decode time per token). It is run with each
router, at each replica count and each ingress replica count:

* ``kvray``: :class:`kvray.serve.router.KvrayRequestRouter` (kvray started with its defaults;
  the router registers each replica's KV-events endpoint with kvray, nothing is wired by hand);
* ``prefix_cache_affinity``: Ray's ``PrefixCacheAffinityRouter``;
* ``kv_aware``: Ray's ``KVAwareRouter`` as ``build_openai_app`` wires it;
* ``power_of_two``: Serve's default router.

Reported per router and configuration: hit rate (cached / prompt tokens, as vLLM counts them in
``usage``), its fraction of an oracle that sees every cache (the same requests, in the same
order, on the same pools, each sent to the pod with the longest cached prefix), TTFT p50/p99
(the stand-in's: waiting for the replica's prefill queue + prefill), routing overhead per request
p50/p99 (time in ``choose_replicas``, measured the same way for every router) and fallbacks.

Run it in the Serve LLM environment (``bash scripts/llm_env.sh``, see docs/serve-llm.md)::

    .venv-llm/bin/python examples/serve_llm.py --json serve_llm.json

Every router sees the same requests; each run's prompts start with a run-specific salt, so every
run starts with cold caches (the previous runs' blocks are never asked for again and are the
first evicted, as from an empty pool). The ``LLMServer`` deployment has a fixed Serve version:
a router or replica-count change is applied to the running replicas (Serve reconfigures them),
and only the ingress restarts, with the new router; each run checks that the configured router
is the one that routed.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import functools
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

for _k, _v in {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_k, _v)

import ray  # noqa: E402
from ray import serve  # noqa: E402

NS = "kvray-serve-llm"
MODEL = "qwen3"
LEDGER = "kvray-serve-llm-ledger"
ROUTERS = ("kvray", "prefix_cache_affinity", "kv_aware", "power_of_two")
SERVE_LOGGING = {"enable_access_log": False, "log_level": "WARNING"}


# --- the app ------------------------------------------------------------------------------------


def llm_app(
    router: str, replicas: int, ingress: int, args: argparse.Namespace, store: AdapterStore
) -> Any:
    """The Serve LLM app: the documented recipe (docs/serve-llm.md) with the router under test."""
    from ray.serve.llm import build_openai_app

    from kvray.serve.llm_bench import TIMED, keep_llm_servers, stand_in_config

    kwargs: dict[str, Any] = {"ledger": LEDGER, "ledger_namespace": NS}
    if router == "kvray":
        kwargs |= {"namespace": NS, "model": MODEL}
    engine = {
        "num_blocks": args.num_blocks,
        "prefill_s_per_token": args.prefill_us / 1e6,
        "decode_s_per_token": args.decode_ms / 1e3,
        "ledger": LEDGER,
        "ledger_namespace": NS,
    }
    cfg = stand_in_config(
        MODEL,
        router=TIMED[router],
        router_kwargs=kwargs,
        replicas=replicas,
        engine=engine,
        lora_path=store.path,
        env=store.env,
    )
    app = build_openai_app(
        {
            "llm_configs": [cfg],
            "ingress_deployment_config": {
                "num_replicas": ingress,
                "max_ongoing_requests": 256,
                "ray_actor_options": {"num_cpus": 0},
            },
        }
    )
    # Router and replica-count changes reconfigure the LLMServer replicas instead of
    # restarting them (the ingress restarts with the new router).
    return keep_llm_servers(app, "stand-in")


class AdapterStore:
    """Where Serve LLM finds LoRA adapters: ``dynamic_lora_loading_path`` must be S3, GCS or
    Azure, so an S3-compatible server (moto's, from PyPI) runs on 127.0.0.1 for the run and
    holds one adapter directory (the stand-in engine loads no weights, only its config)."""

    BUCKET = "kvray-loras"

    def __init__(self, adapter: str) -> None:
        import shutil
        import socket
        import subprocess

        exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
        if not Path(exe).exists():
            raise RuntimeError("moto_server not found: bash scripts/llm_env.sh installs it")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.proc = subprocess.Popen(
            [exe, "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.env = {
            "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "kvray",
            "AWS_SECRET_ACCESS_KEY": "kvray",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
        }
        os.environ.update(self.env)  # Ray's workers inherit the driver's environment
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL_S3"])
        deadline = time.monotonic() + 30
        while True:
            try:
                s3.create_bucket(Bucket=self.BUCKET)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        s3.put_object(
            Bucket=self.BUCKET,
            Key=f"{adapter}/adapter_config.json",
            Body=json.dumps({"max_length": 32768, "r": 8}).encode(),
        )
        self.path = f"s3://{self.BUCKET}"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def drop_prefix_trees() -> None:
    """Kill ``PrefixCacheAffinityRouter``'s prefix-tree actors, so that the next run starts
    with a fresh tree as on a fresh cluster. Ray 2.60 creates one detached actor per
    deployment (namespace ``serve::<app>::<deployment>``) that outlives the deployment's
    replicas until ``serve.shutdown()``; a redeployed app's routers would share the old tree,
    whose dead replicas make matching prompts fail with ``KeyError``."""
    st = serve.status().applications.get("llm")
    for name in st.deployments if st is not None else ():
        with contextlib.suppress(ValueError):  # no tree: this deployment had another router
            ray.kill(ray.get_actor("LlmPrefixTreeActor", namespace=f"serve::llm::{name}"))


def wait_ready(base: str, replicas: int, run: int, timeout_s: float = 300.0) -> None:
    """Every replica is up, and every router has seen every replica's routing stats."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = serve.status().applications.get("llm")
        deps = st.deployments if st is not None else {}
        running = [d for d in deps.values() if str(d.status).endswith("HEALTHY")]
        if st is not None and str(st.status).endswith("RUNNING") and len(running) == len(deps):
            try:
                if httpx.get(f"{base}/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
        time.sleep(0.25)
    else:
        raise TimeoutError(f"Serve LLM app not ready in {timeout_s:.0f} s")

    # Replicas report routing stats every second; the warm-up requests (shorter than a block,
    # so they cache nothing) let every router see every replica's stats. They differ from run
    # to run, so that no warm-up prompt can match what an earlier run left in a router's state
    # (``drop_prefix_trees`` removes the one case found: PCA's tree of dead replicas).
    def hello(i: int) -> None:
        body = {
            "model": MODEL,
            "max_tokens": 1,
            "messages": [{"role": "user", "content": f"hi {run}.{i}"}],
        }
        for _ in range(5):  # a replica Serve just declared ready may still be settling
            try:
                if httpx.post(f"{base}/v1/chat/completions", timeout=20, json=body).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise TimeoutError("the app answers no warm-up request")

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(hello, range(2 * replicas)))  # re-raises a warm-up's TimeoutError
    time.sleep(2.0)  # routing stats refreshed (every 1 s); the routers report the warm-up's counts


async def replay(base: str, requests: list[Any], concurrency: int) -> list[dict[str, Any]]:
    """Send every request at its arrival time (open loop); the client-side outcome of each."""
    import httpx

    out: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        t0 = time.perf_counter()

        async def one(r: Any) -> None:
            await asyncio.sleep(max(0.0, r.at_s - (time.perf_counter() - t0)))
            s = time.perf_counter()
            ok, usage, err = False, {}, None
            try:
                resp = await http.post(f"{base}/v1/chat/completions", json=r.body)
                if resp.status_code == 200:
                    ok, usage = True, resp.json().get("usage") or {}
                else:
                    err = f"{resp.status_code} {resp.text[:200]}"
            except (httpx.HTTPError, ValueError) as exc:  # no answer, or not JSON
                ok, err = False, repr(exc)
            out.append(
                {
                    "i": r.i,
                    "ok": ok,
                    "latency_s": time.perf_counter() - s,
                    "usage": usage,
                    "error": err,
                }
            )

        await asyncio.gather(*(one(r) for r in requests))
    return out


# --- the oracle ---------------------------------------------------------------------------------


@functools.cache
def _tokenizer() -> Any:
    from kvray.tokenization.hf import find_bundled_qwen3, load_tokenizer

    return load_tokenizer(find_bundled_qwen3())


def tokenize_all(requests: list[Any]) -> list[tuple[list[int], str | None]]:
    """Each request's prompt tokens, as the stand-in engine renders them, and its adapter."""
    tok = _tokenizer()
    return [
        (tok.encode_chat(r.body["messages"]), r.body["model"] if r.body["model"] != MODEL else None)
        for r in requests
    ]


def oracle_hit_rate(requests: list[Any], pods: int, num_blocks: int, seed: int) -> float:
    """Hit rate of routing each request to the pod with the longest cached prefix (ties at
    random), on simulated vLLM pools of the same size, in arrival order."""
    from kvray.core.keys import LoRA
    from kvray.sim.pod import SimPod

    rng = random.Random(seed)
    fleet = [SimPod(f"oracle-{i}", MODEL, num_blocks=num_blocks) for i in range(pods)]
    cached = total = 0
    for tokens, adapter in tokenize_all(requests):
        lora = LoRA(adapter) if adapter else None
        hits = [p.cached_prefix_blocks(tokens, lora) for p in fleet]
        best = max(hits)
        pod = rng.choice([p for p, h in zip(fleet, hits, strict=True) if h == best])
        res = pod.serve(tokens, lora=lora)
        cached += res.cached_tokens
        total += res.prompt_tokens
    return cached / total if total else 0.0


# --- one run and the report ---------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def summarize(
    rows: list[dict[str, Any]],
    client: list[dict[str, Any]],
    overheads: list[float],
    tokenize: list[float],
    fallbacks: dict[str, int],
    oracle: float,
    replicas: int,
) -> dict[str, Any]:
    prompt = sum(r["prompt_tokens"] for r in rows)
    cached = sum(r["cached_tokens"] for r in rows)
    hit = cached / prompt if prompt else 0.0
    ttft = [r["ttft_s"] for r in rows]
    per_pod: dict[str, int] = {}
    for r in rows:
        per_pod[r["pod"]] = per_pod.get(r["pod"], 0) + 1
    counts = list(per_pod.values()) + [0] * max(0, replicas - len(per_pod))
    mean = statistics.fmean(counts) if counts else 0.0
    return {
        "hit_rate": round(hit, 4),
        "oracle_hit_rate": round(oracle, 4),
        "oracle_fraction": round(hit / oracle, 4) if oracle else None,
        "ttft_p50_s": round(pct(ttft, 0.5), 4),
        "ttft_p99_s": round(pct(ttft, 0.99), 4),
        "overhead_p50_ms": round(pct(overheads, 0.5) * 1e3, 3),
        "overhead_p99_ms": round(pct(overheads, 0.99) * 1e3, 3),
        # kvray's router tokenizes inside choose_replicas (Serve LLM's OpenAI ingress forwards no
        # token ids); the rest is the routing itself.
        "tokenize_p50_ms": round(pct(tokenize, 0.5) * 1e3, 3),
        "routing_only_p50_ms": round(
            pct([o - t for o, t in zip(overheads, tokenize, strict=False)], 0.5) * 1e3, 3
        ),
        "fallbacks": sum(fallbacks.values()),
        "fallback_reasons": fallbacks,
        "requests": len(client),
        "errors": sum(not c["ok"] for c in client),
        "error_sample": next((c["error"] for c in client if not c["ok"]), None),
        "latency_p50_s": round(pct([c["latency_s"] for c in client], 0.5), 4),
        "load_cv": round(statistics.pstdev(counts) / mean, 3) if mean else None,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from kvray import runtime
    from kvray.config import Config
    from kvray.sim.chat_workload import ChatWorkloadConfig, generate
    from kvray.tokenization.hf import find_bundled_qwen3

    routers = [r.strip() for r in args.routers.split(",")]
    sizes = [int(x) for x in args.replicas.split(",")]
    ingresses = [int(x) for x in args.ingress.split(",")]
    wl = ChatWorkloadConfig(seed=args.seed, requests=args.requests, rate_rps=args.rate, model=MODEL)
    store = AdapterStore(wl.adapter)  # before ray.init: the workers inherit its environment
    ray.init(
        include_dashboard=False,
        log_to_driver=False,
        logging_level="WARNING",
        object_store_memory=256 * 2**20,
        namespace=NS,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": args.port}, logging_config=SERVE_LOGGING)
    tokenizer = str(find_bundled_qwen3())
    runtime.start(
        Config.model_validate(
            {  # kvray with its defaults, told where Qwen3's tokenizer is
                "namespace": NS,
                "index": {"models": {MODEL: {"tokenizer": tokenizer}}},
            }
        )
    )
    from kvray.serve.llm_bench import TIMED, Ledger

    ledger = Ledger.options(name=LEDGER, namespace=NS).remote()
    base = f"http://127.0.0.1:{args.port}"
    # Configuration by configuration, every router in turn: what else runs on the machine at
    # the time weighs on all routers alike.
    plan = [(r, i) for r in sizes for i in ingresses]
    results: dict[str, dict[str, Any]] = {}
    t_start = time.monotonic()
    background = concurrent.futures.ThreadPoolExecutor(1)
    try:
        runs = [(r, i, router) for r, i in plan for router in routers]
        for n, (replicas, ingress, router) in enumerate(runs):
            key = f"{replicas}x{ingress}"
            t0 = time.monotonic()
            salt = f"[run {n:03d}]"  # the same length for every run: the same token counts
            requests = generate(wl, salt=salt)
            # The oracle (tokenizing included) is computed in this process while Serve deploys
            # in others (it needs only the requests), not while the run is measured.
            oracle_rate = background.submit(
                oracle_hit_rate, requests, replicas, args.num_blocks, args.seed
            )
            try:
                serve.run(
                    llm_app(router, replicas, ingress, args, store),
                    name="llm",
                    route_prefix="/",
                    logging_config=SERVE_LOGGING,
                )
                wait_ready(base, replicas, n)
                oracle_value = oracle_rate.result()
                t_ready = time.monotonic()
                ray.get(ledger.take.remote())  # drop the warm-up's rows
                ray.get(ledger.routers.remote())
                client = asyncio.run(replay(base, requests, args.concurrency))
                t_replayed = time.monotonic()
                time.sleep(1.0)  # the last fire-and-forget rows
                rows, overheads, tokenize, fallbacks = ray.get(ledger.take.remote())
                routed = ray.get(ledger.routers.remote())
                if routed != [TIMED[router].__name__]:
                    raise RuntimeError(f"configured {TIMED[router].__name__}, routed by {routed}")
                s = summarize(rows, client, overheads, tokenize, fallbacks, oracle_value,
                              replicas)  # fmt: skip
                s["replicas"], s["ingress_replicas"] = replicas, ingress
                s["seconds"] = round(time.monotonic() - t0, 1)
                s["deploy_s"] = round(t_ready - t0, 1)  # serve.run, warm-up (and the oracle)
                s["replay_s"] = round(t_replayed - t_ready, 1)
                results.setdefault(router, {})[key] = s
                print(
                    f"{router:>22} {key:>6}: hit {s['hit_rate']:.3f} "
                    f"({s['oracle_fraction'] or 0:.1%} of oracle {s['oracle_hit_rate']:.3f}), "
                    f"TTFT p50/p99 {s['ttft_p50_s'] * 1e3:.0f}/{s['ttft_p99_s'] * 1e3:.0f} ms, "
                    f"overhead p50/p99 {s['overhead_p50_ms']:.2f}/{s['overhead_p99_ms']:.2f} ms "
                    f"(tokenizing p50 {s['tokenize_p50_ms']:.2f}), "
                    f"fallbacks {s['fallbacks']}, errors {s['errors']}, load CV {s['load_cv']} "
                    f"[{s['seconds']} s: deploy {s['deploy_s']}, replay {s['replay_s']}]",
                    flush=True,
                )
            except Exception as exc:  # one configuration failing does not lose the others
                print(f"{router:>22} {key:>6}: FAILED {exc!r}", flush=True)
                results.setdefault(router, {})[key] = {"failed": repr(exc)[:500]}
            finally:
                drop_prefix_trees()
    finally:
        background.shutdown(wait=False, cancel_futures=True)
        serve.delete("llm")
        runtime.stop(NS)
        store.close()
    largest = f"{max(sizes)}x{max(ingresses)}"
    return {
        "largest": largest,
        "routers": {r: {**v[largest], "configs": v} for r, v in results.items() if largest in v},
        "workload": {
            "seed": args.seed,
            "requests": args.requests,
            "rate_rps": args.rate,
            "num_blocks": args.num_blocks,
            "prefill_us_per_token": args.prefill_us,
            "decode_ms_per_token": args.decode_ms,
        },
        "seconds": round(time.monotonic() - t_start, 1),
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        "| router | replicas × ingress | hit rate | of oracle | TTFT p50 / p99 (ms) | "
        "overhead p50 / p99 (ms) | of which tokenizing, p50 (ms) | fallbacks | load CV |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for router, r in result["routers"].items():
        for key, s in r["configs"].items():
            if "failed" in s:
                lines.append(f"| {router} | {key.replace('x', ' × ')} | failed: {s['failed']} |"
                             " | | | | | |")  # fmt: skip
                continue
            lines.append(
                f"| {router} | {key.replace('x', ' × ')} | {s['hit_rate']:.3f} | "
                f"{(s['oracle_fraction'] or 0) * 100:.1f} % | "
                f"{s['ttft_p50_s'] * 1e3:.0f} / {s['ttft_p99_s'] * 1e3:.0f} | "
                f"{s['overhead_p50_ms']:.2f} / {s['overhead_p99_ms']:.2f} | "
                f"{s['tokenize_p50_ms']:.2f} | {s['fallbacks']} | "
                f"{s['load_cv']} |"
            )
    return "\n".join(lines)


def report(result: dict[str, Any], argv: list[str]) -> str:
    """The markdown report: what ran, on what, and the table."""
    import platform

    w = result["workload"]
    return "\n".join([
        "# Serve LLM: kvray's router against Ray's, through the OpenAI endpoint",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M:%S')} · Python {platform.python_version()} · "
        f"{os.cpu_count()} cores · `examples/serve_llm.py {' '.join(argv)}` · "
        f"{result['seconds']:.0f} s in all",
        "",
        f"Workload: seed {w['seed']}, {w['requests']} requests at {w['rate_rps']} /s (Poisson) "
        f"per run; stand-in engines with {w['num_blocks']}-block pools, prefill "
        f"{w['prefill_us_per_token']} µs per uncached token, decode {w['decode_ms_per_token']} ms "
        "per output token. Columns: see docs/serve-llm.md.",
        "",
        table(result),
        "",
    ])  # fmt: skip


def plot(result: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    routers = list(result["routers"])
    configs = list(next(iter(result["routers"].values()))["configs"])
    paths = []
    for metric, label, scale in (
        ("oracle_fraction", "hit rate, fraction of oracle", 1.0),
        ("ttft_p99_s", "TTFT p99 (ms)", 1e3),
        ("overhead_p50_ms", "routing overhead p50 (ms)", 1.0),
    ):
        fig, ax = plt.subplots(figsize=(8, 4))
        width = 0.8 / len(routers)
        for k, router in enumerate(routers):
            vals = [
                (result["routers"][router]["configs"].get(c, {}).get(metric) or 0) * scale
                for c in configs
            ]
            ax.bar([i + k * width for i in range(len(configs))], vals, width, label=router)
        ax.set_xticks([i + width * (len(routers) - 1) / 2 for i in range(len(configs))])
        ax.set_xticklabels([c.replace("x", " replicas × ") + " ingress" for c in configs])
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"serve_llm_{metric}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--routers", default=",".join(ROUTERS), help="comma-separated, of: " + ", ".join(ROUTERS)
    )
    p.add_argument("--replicas", default="4,16", help="LLMServer replica counts")
    p.add_argument("--ingress", default="1,2", help="OpenAiIngress replica counts")
    p.add_argument("--requests", type=int, default=240)
    p.add_argument("--rate", type=float, default=16.0, help="arrivals per second (Poisson)")
    p.add_argument("--concurrency", type=int, default=64, help="client connections")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-blocks", type=int, default=512, help="each replica's KV pool (blocks)")
    p.add_argument("--prefill-us", type=float, default=50.0, help="prefill µs per uncached token")
    p.add_argument("--decode-ms", type=float, default=10.0, help="decode ms per output token")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--out", type=Path, default=Path("."), help="directory for the PNG plots")
    p.add_argument("--md", type=Path, help="write a markdown report here")
    args = p.parse_args(argv)
    unknown = set(args.routers.split(",")) - set(ROUTERS)
    if unknown:
        p.error(f"unknown routers: {sorted(unknown)}")
    result = run(args)
    print(table(result))
    args.out.mkdir(parents=True, exist_ok=True)
    for path in plot(result, args.out):
        print(f"wrote {path}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    if args.md:
        args.md.write_text(report(result, argv if argv is not None else sys.argv[1:]))
        print(f"wrote {args.md}")
    print(f"done in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
