"""Publish vLLM-format KV events to a running kvray, as a vLLM pod would (a wire-level smoke test).

A simulated pod (``kvray.sim``: a finite prefix cache with LRU eviction, vLLM's block hashing,
real ``[topic, seq, msgpack batch]`` frames) serves some requests and publishes each step's events
to kvray's bound SUB endpoint (the llm-d topology: the pod connects, kvray binds). Use it to check
a deployment end to end before pointing real vLLM pods at it.

Requests are either prompts (``--prompt``, tokenized with ``--tokenizer``; by default the Qwen3
tokenizer that kvray's dependencies ship) or synthetic token ids (``--requests``,
``--prompt-tokens``, ``--shared-prefix-tokens``, ``--seed``).

ZMQ drops what a PUB socket has not sent when it closes, so before exiting the publisher either
polls kvray's ``GET /pods`` until the pod's last applied seq is the last one it sent (``--url``),
or lingers ``--linger-s`` seconds.

Example::

    python examples/publish_events.py --endpoint tcp://10.0.0.2:5557 --pod 10.0.0.7 \\
        --model Qwen/Qwen3-8B --prompt "You are a helpful assistant." --url http://10.0.0.2:30000

Prints one JSON object: ``{"pod", "model", "endpoint", "batches", "confirmed", "requests"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from typing import Any

import httpx

from kvray.core.hashing import BlockHasher
from kvray.core.holders import holder_id
from kvray.core.topics import format_topic
from kvray.sim import SimPod, SimPublisher


def synthetic_requests(
    n: int, tokens: int, shared: int, seed: int, vocab: int = 32_000
) -> list[list[int]]:
    """``n`` prompts of ``tokens`` token ids whose first ``shared`` tokens are common."""
    rng = random.Random(seed)
    prefix = [rng.randrange(vocab) for _ in range(shared)]
    return [prefix + [rng.randrange(vocab) for _ in range(tokens - shared)] for _ in range(n)]


def tokenize(prompts: Sequence[str], tokenizer: str | None) -> list[list[int]]:
    """Token ids of each prompt, as vLLM computes them for a completion request."""
    from kvray.tokenization import find_bundled_qwen3, load_tokenizer

    tok = load_tokenizer(tokenizer or find_bundled_qwen3())
    return [tok.encode(p) for p in prompts]


def wait_applied(
    url: str, holder: str, last_seq: int, timeout_s: float, headers: dict[str, str]
) -> bool:
    """Poll kvray's ``GET /pods`` until ``holder``'s last applied seq reaches ``last_seq``."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=url, headers=headers, timeout=5.0) as http:
        while time.monotonic() < deadline:
            try:
                r = http.get("/pods")
                r.raise_for_status()
                for p in r.json()["pods"]:
                    if p["pod"] == holder and (p["last_seq"] or 0) >= last_seq:
                        return True
            except httpx.HTTPError:
                pass  # not up yet, or a transient error: poll again
            time.sleep(0.05)
    return False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="publish_events.py",
        description="Send vLLM-format KV events from a simulated pod to a running kvray's "
        "bound endpoint.",
    )
    p.add_argument(
        "--endpoint", required=True, help="kvray's bound SUB endpoint, e.g. tcp://10.0.0.2:5557"
    )
    p.add_argument("--pod", default="10.0.0.7", help="pod id in the topic (default 10.0.0.7)")
    p.add_argument("--model", default="qwen3", help="served model name in the topic")
    p.add_argument(
        "--replay-endpoint",
        help="bind a replay ROUTER here (e.g. tcp://127.0.0.1:5558); kvray needs it in "
        "events.replay to heal gaps",
    )
    p.add_argument("--dp-rank", type=int, default=0, help="data-parallel rank written in batches")
    p.add_argument("--block-size", type=int, default=16, help="tokens per block (vLLM default)")
    p.add_argument(
        "--hash-algo",
        default="sha256",
        choices=["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"],
        help="the pod's --prefix-caching-hash-algo",
    )
    p.add_argument("--hash-seed", help="the pod's PYTHONHASHSEED (default: unset)")
    p.add_argument("--num-blocks", type=int, default=4096, help="the pod's cache size, blocks")
    p.add_argument("--legacy", action="store_true", help="vLLM <= 0.23 positional-array events")
    p.add_argument("--prompt", action="append", default=[], help="a prompt to serve (repeatable)")
    p.add_argument("--tokenizer", help="tokenizer dir or hub name for --prompt")
    p.add_argument("--requests", type=int, default=4, help="synthetic requests (no --prompt)")
    p.add_argument("--prompt-tokens", type=int, default=256, help="synthetic prompt length")
    p.add_argument(
        "--shared-prefix-tokens", type=int, default=128, help="synthetic shared prefix length"
    )
    p.add_argument("--seed", type=int, default=0, help="synthetic token seed")
    p.add_argument(
        "--connect-timeout", type=float, default=10.0, help="wait this long for kvray's socket"
    )
    p.add_argument("--url", help="kvray's HTTP base URL: confirm the events were applied")
    p.add_argument(
        "--auth-token",
        default=os.environ.get("KVRAY_SERVE__AUTH_TOKEN"),
        help="bearer token for --url (default: $KVRAY_SERVE__AUTH_TOKEN)",
    )
    p.add_argument("--confirm-timeout", type=float, default=30.0, help="seconds, with --url")
    p.add_argument("--linger-s", type=float, default=1.0, help="wait before closing (no --url)")
    p.add_argument("--show-tokens", action="store_true", help="include token ids in the output")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if "*" in args.endpoint or "::" in args.endpoint or args.endpoint.endswith(":0"):
        print(
            "publish_events.py: error: --endpoint must be kvray's bound address "
            "(e.g. tcp://10.0.0.2:5557): a pod with '*' would bind instead of connecting",
            file=sys.stderr,
        )
        return 2
    if args.prompt:
        requests = tokenize(args.prompt, args.tokenizer)
    else:
        requests = synthetic_requests(
            args.requests, args.prompt_tokens, args.shared_prefix_tokens, args.seed
        )
    pub = SimPublisher(
        args.endpoint,
        format_topic(args.pod, args.model),
        replay_endpoint=args.replay_endpoint,
        data_parallel_rank=args.dp_rank,
        legacy=args.legacy,
    )
    try:
        if not pub.wait_connected(timeout_s=args.connect_timeout):
            print(
                f"publish_events.py: error: no subscriber at {args.endpoint} after "
                f"{args.connect_timeout} s (is kvray bound there?)",
                file=sys.stderr,
            )
            return 1
        hasher = BlockHasher(args.hash_algo, args.hash_seed, args.block_size)
        pod = SimPod(args.pod, args.model, num_blocks=args.num_blocks, hasher=hasher, publisher=pub)
        served: list[dict[str, Any]] = []
        for tokens in requests:
            res = pod.serve(tokens)
            item: dict[str, Any] = {
                "tokens": res.prompt_tokens,
                "cached_tokens": res.cached_tokens,
                "new_blocks": res.new_blocks,
                "evicted_blocks": res.evicted_blocks,
            }
            if args.show_tokens:
                item["token_ids"] = list(tokens)
            served.append(item)
        confirmed = None
        if args.url and pub.seq:
            headers = {"Authorization": f"Bearer {args.auth_token}"} if args.auth_token else {}
            holder = holder_id(args.pod, args.dp_rank)
            confirmed = wait_applied(args.url, holder, pub.seq - 1, args.confirm_timeout, headers)
        elif pub.seq:
            time.sleep(args.linger_s)  # nothing to poll: give ZMQ time to flush before close
    finally:
        pub.close()
    print(
        json.dumps(
            {
                "pod": args.pod,
                "model": args.model,
                "endpoint": args.endpoint,
                "replay_endpoint": pub.replay_endpoint,
                "batches": pub.seq,
                "confirmed": confirmed,
                "requests": served,
            },
            sort_keys=True,
        )
    )
    return 0 if confirmed is not False else 1


if __name__ == "__main__":
    sys.exit(main())
