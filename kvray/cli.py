"""The ``kvray`` command: argument parsing and wiring only (serve, status, score, demo, bench).

Every sub-command has ``--help``; errors print one readable line (``kvray: error: ...``) and exit
with status 2 (usage/config) or 1 (runtime).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from kvray._env import apply_local_defaults
from kvray.errors import KvrayError


def _ray_init(address: str | None) -> None:
    apply_local_defaults()
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": "WARNING",
    }
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(object_store_memory=256 * 2**20, **kwargs)


def cmd_serve(args: argparse.Namespace) -> int:
    from kvray.config import load_config
    from kvray.serve.app import APP_NAME, deploy

    cfg = load_config(args.config)
    if not cfg.events.bind and not cfg.events.connect:
        print(
            "kvray: warning: no event endpoints configured (events.bind / events.connect)",
            file=sys.stderr,
        )
    _ray_init(args.address)
    print(
        f"kvray: starting {cfg.num_shards} shards, {cfg.num_ingestors} ingestors, "
        f"{cfg.num_tokenizers} tokenizers in namespace {cfg.namespace!r} as the Serve "
        f"application {APP_NAME!r} ...",
        flush=True,
    )
    base = deploy(cfg)  # the same application a Serve config deploys (kvray.serve.app)
    import kvray

    info = kvray.connect(cfg.namespace, replica=False).endpoints
    for i, eps in enumerate(info):
        for ep in eps:
            print(f"kvray: ingestor {i} listening for KV events on {ep}")
    for pod in cfg.events.connect:
        print(f"kvray: subscribed to pod {pod.pod or ''} at {pod.endpoint}")
    print(f"kvray: HTTP API at {base} (OpenAPI docs at {base}/docs)", flush=True)
    if args.detach:
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("kvray: stopping", file=sys.stderr)
        _stop(cfg.namespace)
    return 0


def _stop(namespace: str) -> bool:
    """Delete the Serve application (its KvrayRuntime stops the actors), then make sure no
    actor of the namespace is left (a runtime started outside Serve, or a crashed owner)."""
    from ray import serve

    from kvray import runtime
    from kvray.serve.app import APP_NAME

    found = False
    try:
        apps = serve.status().applications
    except Exception:  # Serve is not running on this cluster
        apps = {}
    if APP_NAME in apps:
        serve.delete(APP_NAME)
        found = True
    return runtime.stop(namespace) or found


def cmd_stop(args: argparse.Namespace) -> int:
    _ray_init(args.address or "auto")
    if _stop(args.namespace):
        print(f"kvray: stopped kvray in namespace {args.namespace!r}")
        return 0
    print(f"kvray: nothing runs in namespace {args.namespace!r}", file=sys.stderr)
    return 1


def cmd_status(args: argparse.Namespace) -> int:
    import kvray

    _ray_init(args.address or "auto")
    client = kvray.connect(args.namespace)
    stats = client.stats()
    pods = client.pods()
    ctl = client.controller_status()
    if args.json:
        doc = {"stats": msgspec.to_builtins(stats), "pods": pods, "controller": ctl}
        print(json.dumps(doc, indent=2, default=str))
        return 0
    ages = ctl["snapshot_ages_s"]
    print(
        f"controller: {'restarted' if ctl['restarted'] else 'up'}, {ctl['pods']} pods added, "
        f"{ctl['replay_sockets']} replay sockets, snapshot age "
        + (f"{max(ages.values()):.1f} s" if ages else "- (none yet)")
    )
    print(f"{'shard':>5} {'pods':>5} {'keys':>10} {'pairs':>10} {'stored':>10} {'removed':>10}")
    for s in stats.shards:
        print(
            f"{s.shard:>5} {s.pods:>5} {s.keys:>10} {s.pairs:>10} "
            f"{s.stored_blocks:>10} {s.removed_blocks:>10}"
        )
    for ing in stats.ingestors:
        print(
            f"ingestor {ing.ingestor}: {ing.messages} messages, {ing.seq_gaps} gaps, "
            f"{ing.replayed} replayed, {ing.seq_lost} lost, malformed {ing.malformed}"
        )
    print(f"\n{'pod':<28} {'shard':>5} {'last seq':>9} {'idle s':>8}  hash contract  model")
    for p in pods:
        print(
            f"{p['pod']:<28} {p['shard']:>5} {p['last_seq']!s:>9} {p['idle_s']:>8.1f}  "
            f"{p['hash_contract']['status']:<13}  {p['model']}"
        )
    return 0


def cmd_pods(args: argparse.Namespace) -> int:
    import kvray

    _ray_init(args.address or "auto")
    client = kvray.connect(args.namespace, replica=False)
    if args.action == "add":
        client.add_pod(args.endpoint, args.replay, args.pod, args.model)
        print(f"kvray: reading pod {args.pod or args.endpoint} at {args.endpoint}")
    elif args.action == "remove":
        client.remove_pod(args.pod)
        print(f"kvray: removed pod {args.pod}")
    else:
        print(json.dumps(client.pods(), indent=2, default=str))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    import kvray

    _ray_init(args.address or "auto")
    client = kvray.connect(args.namespace)
    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    pods = args.pods.split(",") if args.pods else None
    scores = client.score_prompt(prompt, args.model, pods=pods, lora=args.lora)
    print(json.dumps(scores, indent=2))
    return 0


def cmd_demo(argv: list[str]) -> int:
    from kvray.demo import run_demo

    return run_demo(argv)


def cmd_bench(args: argparse.Namespace) -> int:
    import runpy

    root = Path(__file__).resolve().parent.parent / "benchmarks"
    script = root / f"bench_{args.which}.py"
    if not script.exists():
        raise KvrayError(f"no benchmark {args.which!r} (looked for {script})")
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvray", description="KV-cache-aware routing index for vLLM.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="start kvray (actors + HTTP API) on a Ray cluster")
    s.add_argument("--config", help="kvray.yaml (default: built-in defaults + KVRAY_* env)")
    s.add_argument("--address", help="Ray cluster address (default: start a local cluster)")
    s.add_argument("--detach", action="store_true", help="return once deployed")
    s.set_defaults(fn=cmd_serve)
    sp = sub.add_parser("stop", help="stop kvray: its Serve application and every actor")
    sp.add_argument("--namespace", default="kvray")
    sp.add_argument("--address", help="Ray cluster address (default: auto)")
    sp.set_defaults(fn=cmd_stop)
    st = sub.add_parser("status", help="pods, shards and lag of a running kvray")
    st.add_argument("--namespace", default="kvray")
    st.add_argument("--address", help="Ray cluster address (default: auto)")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(fn=cmd_status)
    pd = sub.add_parser("pods", help="register, remove or list pods (no config edit, no restart)")
    pd_sub = pd.add_subparsers(dest="action", required=True)
    pa = pd_sub.add_parser("add", help="read a pod that binds its KV-event PUB socket")
    pa.add_argument("endpoint", help="the pod's PUB endpoint, e.g. tcp://10.0.0.7:5557")
    pa.add_argument("--pod", required=True, help="the pod's id (its topic's <pod>)")
    pa.add_argument("--model", help="served model (when the topic is empty)")
    pa.add_argument("--replay", help="the pod's replay ROUTER endpoint")
    pr = pd_sub.add_parser("remove", help="forget a pod: its streams and its blocks")
    pr.add_argument("pod")
    pl = pd_sub.add_parser("list", help="every pod kvray holds blocks of")
    for sp_ in (pa, pr, pl):
        sp_.add_argument("--namespace", default="kvray")
        sp_.add_argument("--address", help="Ray cluster address (default: auto)")
    pd.set_defaults(fn=cmd_pods)
    sc = sub.add_parser("score", help="score one prompt against a running kvray")
    sc.add_argument("prompt", help="prompt text, or - to read stdin")
    sc.add_argument("--model", required=True)
    sc.add_argument("--pods", help="comma-separated pod filter")
    sc.add_argument("--lora")
    sc.add_argument("--namespace", default="kvray")
    sc.add_argument("--address", help="Ray cluster address (default: auto)")
    sc.set_defaults(fn=cmd_score)
    sub.add_parser(
        "demo", help="simulated fleet + kvray + workload + results table", add_help=False
    )
    b = sub.add_parser("bench", help="run a benchmark from benchmarks/ (core, redis, ...)")
    b.add_argument("which", help="benchmark name, e.g. core")
    b.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        return cmd_demo(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args))
    except KvrayError as exc:
        print(f"kvray: error: {exc}", file=sys.stderr)
        return 2
    except ConnectionError as exc:
        print(f"kvray: error: cannot reach the Ray cluster: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
