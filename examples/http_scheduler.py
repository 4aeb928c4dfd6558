"""A request scheduler that asks kvray over HTTP where to send a request.

``POST /route`` with the candidate pods and the prompt (text or token ids). kvray keys the
prompt, looks up each candidate's cached prefix and picks the pod with the least estimated work
(``kvray.core.routing``): the blocks it must prefill, made dearer on a full KV pool, plus the
work queued there (``--load``, in tokens, or kvray's own estimate from its recent decisions).
Prompts nobody has cached are spread by rendezvous hashing of their first block. ``--record``
records the choice as a speculative entry, so the next request with the same prefix finds it
before the pod's own ``BlockStored`` events arrive. The output also shows the candidates'
scores normalised as an llm-d scheduler would (spec §5).

Example::

    python examples/http_scheduler.py --url http://127.0.0.1:30000 --model Qwen/Qwen3-8B \\
        --candidates 10.0.0.7,10.0.0.8 --prompt "You are a helpful assistant. ..." --record

Prints one JSON object: ``{"pod", "reason", "scores", "normalized", "blocks"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from kvray.core.scoring import normalize_scores


def normalize(candidates: Sequence[str], scores: Mapping[str, float]) -> dict[str, float]:
    """Min-max normalise the candidates' scores (spec §5); candidates without a score get 0.0."""
    return normalize_scores(scores, candidates)


def _parse_load(text: str | None) -> dict[str, float]:
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        pod, sep, value = item.rpartition("=")
        if not sep or not pod:
            raise ValueError(f"--load expects pod=number[,pod=number...], got {item!r}")
        out[pod] = float(value)
    return out


def schedule(
    http: httpx.Client,
    model: str,
    candidates: list[str],
    *,
    prompt: str | None = None,
    token_ids: list[int] | None = None,
    load: Mapping[str, float] | None = None,
    load_weight: float | None = None,
    record: bool = False,
) -> dict[str, Any]:
    """Ask kvray to route one request (``POST /route``): kvray's one decision function weighs
    each candidate's cached prefix against its queued work (``load``, in tokens, or kvray's own
    estimate) and its KV pool's fullness, and spreads prompts nobody has cached."""
    body: dict[str, Any] = {"model": model, "pods": candidates, "record": record}
    if token_ids is not None:
        body["token_ids"] = token_ids
    else:
        body["prompt"] = prompt
    if load:
        body["load"] = dict(load)
    if load_weight is not None:
        body["load_weight"] = load_weight
    r = http.post("/route", json=body)
    r.raise_for_status()
    out = r.json()
    return {
        "pod": out["pod"],
        "reason": out["reason"],
        "scores": out["scores"],
        "normalized": normalize(candidates, out["scores"]),
        "blocks": out["blocks"],
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="http_scheduler.py",
        description="Score a request against kvray's HTTP API and pick the pod that already "
        "caches most of its prefix.",
    )
    p.add_argument("--url", required=True, help="kvray base URL (what `kvray serve` prints)")
    p.add_argument("--model", required=True, help="served model name")
    p.add_argument("--candidates", required=True, help="comma-separated candidate pod ids")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="completion prompt text (tokenized by kvray)")
    what.add_argument("--token-ids", help="comma-separated prompt token ids")
    p.add_argument(
        "--load",
        help="queued tokens per pod, e.g. 10.0.0.7=1200,10.0.0.8=300 (default: kvray's "
        "own estimate)",
    )
    p.add_argument(
        "--load-weight", type=float, default=None,
        help="a queued token counts as this many tokens of prefill (default: the deployment's)",
    )  # fmt: skip
    p.add_argument("--record", action="store_true", help="record the choice in kvray (/route)")
    p.add_argument(
        "--auth-token",
        default=os.environ.get("KVRAY_SERVE__AUTH_TOKEN"),
        help="bearer token (default: $KVRAY_SERVE__AUTH_TOKEN)",
    )
    p.add_argument("--timeout", type=float, default=10.0, help="HTTP timeout, seconds")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    candidates = [c for c in args.candidates.split(",") if c]
    try:
        load = _parse_load(args.load)
        tokens = [int(t) for t in args.token_ids.split(",")] if args.token_ids else None
    except ValueError as exc:
        print(f"http_scheduler.py: error: {exc}", file=sys.stderr)
        return 2
    if not candidates:
        print("http_scheduler.py: error: --candidates is empty", file=sys.stderr)
        return 2
    headers = {"Authorization": f"Bearer {args.auth_token}"} if args.auth_token else {}
    try:
        with httpx.Client(base_url=args.url, headers=headers, timeout=args.timeout) as http:
            out = schedule(
                http,
                args.model,
                candidates,
                prompt=args.prompt,
                token_ids=tokens,
                load=load,
                load_weight=args.load_weight,
                record=args.record,
            )
    except httpx.HTTPStatusError as exc:
        print(
            f"http_scheduler.py: error: {exc.response.status_code} from {exc.request.url}: "
            f"{exc.response.text}",
            file=sys.stderr,
        )
        return 1
    except httpx.HTTPError as exc:
        print(f"http_scheduler.py: error: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
