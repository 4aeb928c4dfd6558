"""Score prompts with an in-process ``kvray.Indexer`` fed real vLLM frames (no Ray, no sockets).

The frames are the ones captured from vLLM 0.33's own ZMQ publisher in
``tests/fixtures/events/A_default_*.json`` (pod ``10.0.0.7``, ``meta-llama/Llama-3.1-8B``, block
size 16, ``sha256``). Each message is applied as it would arrive from a SUB socket, and after each
one every prompt seen so far is scored, so you can watch the index follow the pod's cache:
stores, a prefix hit, LRU evictions, then ``AllBlocksCleared``.

The prompts are rebuilt from the events themselves: a ``BlockStored`` carries its blocks' token
ids and its parent block's hash, so a prompt is its parent chain's tokens plus its own.

Run from the repository root::

    python examples/in_process.py            # a table
    python examples/in_process.py --json     # one JSON object per applied message
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import kvray

REPO = Path(__file__).resolve().parent.parent
DEFAULT_EVENTS = REPO / "tests" / "fixtures" / "events"


def load_capture(events_dir: Path, case: str) -> list[dict[str, Any]]:
    """The captured messages of ``case`` in publish order (``<case>_000.json``, ...)."""
    files = sorted(events_dir.glob(f"{case}_[0-9][0-9][0-9].json"))
    if not files:
        raise FileNotFoundError(f"no {case}_NNN.json captures in {events_dir}")
    return [json.loads(f.read_text()) for f in files]


def prompts_of(message: dict[str, Any], chains: dict[int, list[int]]) -> list[list[int]]:
    """The full prompts whose new blocks a captured message stores.

    Args:
        message: one capture (its ``decoded`` field is the batch as vLLM encoded it).
        chains: engine block hash -> the prompt tokens up to and including that block;
            updated in place.
    """
    out = []
    for ev in message["decoded"][1]:
        if ev["type"] != "BlockStored":
            continue
        parent = ev["parent_block_hash"]
        tokens = list(chains.get(parent, [])) if parent is not None else []
        size = ev["block_size"]
        for i, h in enumerate(ev["block_hashes"]):
            tokens += ev["token_ids"][i * size : (i + 1) * size]
            chains[h] = list(tokens)
        out.append(tokens)
    return out


def run(events_dir: Path, case: str) -> list[dict[str, Any]]:
    """Apply every captured message of ``case``; returns one record per message."""
    ix = kvray.Indexer()  # vLLM's defaults: block size 16, sha256, request keys
    bs = ix.config.default_model.block_size
    chains: dict[int, list[int]] = {}
    prompts: list[list[int]] = []
    records = []
    for message in load_capture(events_dir, case):
        frames = [bytes.fromhex(h) for h in message["frames_hex"]]
        result = ix.apply(frames)  # [topic, seq, payload], exactly as received from ZMQ
        prompts += prompts_of(message, chains)
        model = message["topic"].split("@", 2)[2]
        records.append(
            {
                "seq": message["seq"],
                "events": [e["type"] for e in message["decoded"][1]],
                "stored_blocks": result.stored_blocks,
                "removed_blocks": result.removed_blocks,
                "scores": [
                    {"prompt": i, "blocks": len(p) // bs, "scores": ix.score_tokens(p, model)}
                    for i, p in enumerate(prompts)
                ],
                "hash_contract": ix.hash_contract(),
            }
        )
    return records


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="in_process.py",
        description="Feed captured vLLM KV-event frames to an in-process kvray.Indexer and "
        "print each prompt's per-pod score after every message.",
    )
    p.add_argument(
        "--events-dir",
        type=Path,
        default=DEFAULT_EVENTS,
        help="directory of captured frames (default: tests/fixtures/events in this repo)",
    )
    p.add_argument("--case", default="A_default", help="capture name prefix (default A_default)")
    p.add_argument("--json", action="store_true", help="one JSON object per applied message")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        records = run(args.events_dir, args.case)
    except (FileNotFoundError, kvray.KvrayError) as exc:
        print(f"in_process.py: error: {exc}", file=sys.stderr)
        return 2
    for rec in records:
        if args.json:
            print(json.dumps(rec, sort_keys=True))
            continue
        print(
            f"seq {rec['seq']}: {', '.join(rec['events'])} "
            f"(+{rec['stored_blocks']} / -{rec['removed_blocks']} blocks)"
        )
        for s in rec["scores"]:
            print(f"  prompt {s['prompt']} ({s['blocks']} blocks): {s['scores']}")
    if not args.json and records:
        for pod, c in sorted(records[-1]["hash_contract"].items()):
            print(f"hash contract of {pod}: {c['status']} ({c['checked']} blocks re-hashed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
