"""A scheduler hosted on Ray that routes requests with ``kvray.connect()`` (no HTTP in the path).

``Scheduler`` is an async Ray actor. For each request it tokenizes the prompt with kvray's
tokenizer pool (or takes token ids), computes the prompt's block keys locally and lets kvray's
one decision function pick the pod (``Client.route_keys_async``, ``kvray.core.routing``: cached
prefix against queued work and pool fullness, cold prompts spread). With ``--load-weight`` it
passes its own in-flight prompt tokens per pod as the load; without, kvray's own estimate is
used. The choice is recorded as a speculative entry so the next request with the same prefix
meets it before the pod's own events arrive.

Run it against a running kvray (``kvray serve --config kvray.yaml``)::

    python examples/ray_scheduler.py --address auto --namespace kvray --model Qwen/Qwen3-8B \\
        --candidates 10.0.0.7,10.0.0.8 --prompt "You are a helpful assistant. ..."

Prints one JSON object per request: ``{"pod", "reason", "scores", "normalized", "blocks"}``.
If Ray is already initialised in the calling process (a test, a notebook), that cluster is used.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import ray

import kvray


def normalize(candidates: Sequence[str], scores: dict[str, float]) -> dict[str, float]:
    """Min-max normalise the candidates' scores (spec §5); no score -> 0.0."""
    present = [scores[c] for c in candidates if c in scores]
    lo, hi = (min(present), max(present)) if present else (0.0, 0.0)
    return {
        c: 0.0 if c not in scores else 1.0 if hi == lo else (scores[c] - lo) / (hi - lo)
        for c in candidates
    }


@ray.remote(num_cpus=0)
class Scheduler:
    """Routes requests among ``candidates`` with kvray's routing decision.

    Args:
        namespace: Ray namespace of the kvray deployment.
        candidates: pod ids this scheduler may route to.
        load_weight: when set, its in-flight prompt tokens per pod are the load, weighed so
            (a queued token counts as this many tokens of prefill); None: kvray's estimate.
        record: record each choice in kvray (speculative entries, short TTL).
    """

    def __init__(
        self,
        namespace: str,
        candidates: list[str],
        load_weight: float | None = None,
        record: bool = True,
    ) -> None:
        self.client = kvray.connect(namespace)
        self.candidates = list(candidates)
        self.load_weight = load_weight
        self.record = record
        self.inflight: dict[str, list[int]] = {c: [] for c in candidates}

    async def route(
        self, model: str, prompt: str | None = None, token_ids: list[int] | None = None
    ) -> dict[str, Any]:
        """Choose a pod for one request."""
        if token_ids is None:
            token_ids = await self.client.tokenize_async(prompt or "", model)
        keys = self.client.block_keys(token_ids, model)
        load = None
        if self.load_weight is not None:
            load = {c: float(sum(v)) for c, v in self.inflight.items()}
        d, scores = await self.client.route_keys_async(
            self.candidates, keys, model, load=load, load_weight=self.load_weight,
            record=self.record,
        )  # fmt: skip
        self.inflight[d.pod].append(len(token_ids))
        return {
            "pod": d.pod,
            "reason": d.reason,
            "scores": scores,
            "normalized": normalize(self.candidates, scores),
            "blocks": len(keys),
        }

    def complete(self, pod: str) -> None:
        """A request routed to ``pod`` finished (lowers its load)."""
        if self.inflight.get(pod):
            self.inflight[pod].pop(0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ray_scheduler.py",
        description="Route requests from a Ray actor with kvray.connect(): score each prompt's "
        "cached prefix per pod and pick one.",
    )
    p.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    p.add_argument("--namespace", default="kvray", help="kvray's Ray namespace (default: kvray)")
    p.add_argument("--model", required=True, help="served model name")
    p.add_argument("--candidates", required=True, help="comma-separated candidate pod ids")
    p.add_argument("--prompt", action="append", default=[], help="a prompt to route (repeatable)")
    p.add_argument(
        "--token-ids",
        action="append",
        default=[],
        help="comma-separated token ids of a request to route (repeatable)",
    )
    p.add_argument(
        "--load-weight", type=float, default=None,
        help="use this scheduler's in-flight prompt tokens as the load, weighed so (default: "
        "kvray's own load estimate)",
    )  # fmt: skip
    p.add_argument("--no-record", action="store_true", help="do not record choices in kvray")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    candidates = [c for c in args.candidates.split(",") if c]
    requests: list[dict[str, Any]] = [{"prompt": p} for p in args.prompt]
    try:
        requests += [{"token_ids": [int(t) for t in s.split(",")]} for s in args.token_ids]
    except ValueError as exc:
        print(f"ray_scheduler.py: error: bad --token-ids: {exc}", file=sys.stderr)
        return 2
    if not candidates or not requests:
        print(
            "ray_scheduler.py: error: need --candidates and a --prompt or --token-ids",
            file=sys.stderr,
        )
        return 2
    started = not ray.is_initialized()
    if started:
        ray.init(address=args.address, log_to_driver=False, logging_level="WARNING")
    sched = Scheduler.remote(  # type: ignore[attr-defined]
        args.namespace, candidates, args.load_weight, not args.no_record
    )
    try:
        for req in requests:
            print(json.dumps(ray.get(sched.route.remote(args.model, **req)), sort_keys=True))
    except ray.exceptions.RayError as exc:
        print(f"ray_scheduler.py: error: {exc}", file=sys.stderr)
        return 1
    finally:
        ray.kill(sched)
        if started:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
