"""A request scheduler that asks kvray over HTTP which pod holds a prompt's prefix, and picks one.

This is what an llm-d-style scheduler does with kvray's scores (spec §5):

1. ``POST /score_completions`` (or ``/score_tokens`` for token ids) with the candidate pods;
2. normalise over the candidates: a pod without a score gets 0, the others
   ``(s - min) / (max - min)``, or 1.0 each when all present scores are equal;
3. pick the candidate with the best ``normalised score - load_weight * normalised load``; ties go
   to the lighter pod, then to the candidate order;
4. optionally (``--record``) tell kvray where the request went (``POST /route`` with the chosen pod
   as the only candidate), so the next request with the same prefix finds it before the pod's own
   ``BlockStored`` events arrive.

Example::

    python examples/http_scheduler.py --url http://127.0.0.1:31000 --model Qwen/Qwen3-8B \\
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


def pick(
    candidates: Sequence[str],
    scores: Mapping[str, float],
    load: Mapping[str, float] | None = None,
    load_weight: float = 0.0,
) -> tuple[str, str, dict[str, float]]:
    """Choose a pod; returns ``(pod, reason, normalised scores)``.

    ``reason`` is ``cache`` when the pod holds the longest prefix, ``load`` when the load term
    changed the choice, and ``fallback`` when no candidate holds any of the prompt.
    """
    norm = normalize(candidates, scores)
    loads = {c: float((load or {}).get(c, 0.0)) for c in candidates}
    lmax = max(loads.values(), default=0.0)
    lnorm = {c: (v / lmax if lmax > 0 else 0.0) for c, v in loads.items()}
    order = {c: i for i, c in enumerate(candidates)}
    best = max(candidates, key=lambda c: (norm[c] - load_weight * lnorm[c], -lnorm[c], -order[c]))
    if not any(c in scores for c in candidates):
        return best, "fallback", norm
    top = max(scores.get(c, 0.0) for c in candidates)
    return best, "cache" if scores.get(best, 0.0) == top else "load", norm


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
    load_weight: float = 0.0,
    record: bool = False,
) -> dict[str, Any]:
    """Score one request over HTTP and choose a pod for it."""
    body: dict[str, Any] = {"model": model}
    if token_ids is not None:
        path, body["token_ids"] = "/score_tokens", token_ids
    else:
        path, body["prompt"] = "/score_completions", prompt
    r = http.post(path, json={**body, "pods": candidates})
    r.raise_for_status()
    scored = r.json()
    pod, reason, norm = pick(candidates, scored["scores"], load, load_weight)
    if record and scored["blocks"]:
        route = {k: v for k, v in body.items() if k != "model"}
        rr = http.post("/route", json={"model": model, "pods": [pod], "record": True, **route})
        rr.raise_for_status()
    return {
        "pod": pod,
        "reason": reason,
        "scores": scored["scores"],
        "normalized": norm,
        "blocks": scored["blocks"],
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
    p.add_argument("--load", help="current load per pod, e.g. 10.0.0.7=12,10.0.0.8=3")
    p.add_argument("--load-weight", type=float, default=0.0, help="weight of the load term")
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
