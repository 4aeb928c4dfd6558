"""A scheduler hosted on Ray that routes requests with ``kvray.connect()`` (no HTTP in the path).

``Scheduler`` is an async Ray actor. For each request it tokenizes the prompt with kvray's
tokenizer pool (or takes token ids), computes the prompt's block keys locally, fans the score out
to kvray's shards, picks the candidate with the best normalised score (minus a load term: the
requests it routed and that are not completed yet), and records the choice as a speculative entry
so the next request with the same prefix meets it before the pod's own events arrive.

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
    """Routes requests among ``candidates`` by cached prefix, then by in-flight load.

    Args:
        namespace: Ray namespace of the kvray deployment.
        candidates: pod ids this scheduler may route to.
        load_weight: weight of the normalised in-flight load against the normalised score.
        record: record each choice in kvray (speculative entries, short TTL).
    """

    def __init__(
        self,
        namespace: str,
        candidates: list[str],
        load_weight: float = 0.0,
        record: bool = True,
    ) -> None:
        self.client = kvray.connect(namespace)
        self.candidates = list(candidates)
        self.load_weight = load_weight
        self.record = record
        self.inflight = {c: 0 for c in candidates}

    async def route(
        self, model: str, prompt: str | None = None, token_ids: list[int] | None = None
    ) -> dict[str, Any]:
        """Choose a pod for one request."""
        if token_ids is None:
            token_ids = await self.client.tokenize_async(prompt or "", model)
        keys = self.client.block_keys(token_ids, model)
        scores = await self.client.score_keys_async(keys, self.candidates)
        norm = normalize(self.candidates, scores)
        lmax = max(self.inflight.values(), default=0)
        order = {c: i for i, c in enumerate(self.candidates)}

        def value(c: str) -> tuple[float, float, int]:
            load = self.inflight[c] / lmax if lmax else 0.0
            return (norm[c] - self.load_weight * load, -load, -order[c])

        pod = max(self.candidates, key=value)
        if not scores:
            reason = "fallback"
        else:
            reason = "cache" if scores.get(pod) == max(scores.values()) else "load"
        if self.record and keys:
            await self.client.record_route_async(pod, keys)
        self.inflight[pod] += 1
        return {
            "pod": pod,
            "reason": reason,
            "scores": scores,
            "normalized": norm,
            "blocks": len(keys),
        }

    def complete(self, pod: str) -> None:
        """A request routed to ``pod`` finished (lowers its load)."""
        self.inflight[pod] = max(0, self.inflight.get(pod, 0) - 1)


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
    p.add_argument("--load-weight", type=float, default=0.0, help="weight of the load term")
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
