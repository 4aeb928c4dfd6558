"""Fuzz the frame/event decoder, the topic parser and the config loader with hostile input.

Run: ``python benchmarks/fuzz_decoder.py [--n 1000000] [--out benchmarks/results/fuzz.md]``.
Inputs: byte-level mutations of every captured vLLM frame (flip, insert, delete, truncate,
splice, integer-boundary patches), random msgpack documents, and random bytes. Every input must
either decode or raise ``MalformedFrame``; anything else is a crash, printed with its input.
Every batch that decodes is then applied through a shard's write path (``IndexWriter`` over a
``Journal`` over a ``MemoryIndex``, request keys: the C extension's loops when it is built),
which must never raise.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).parent))
from _util import table, write_report  # noqa: E402

from kvray.config import load_config  # noqa: E402
from kvray.core import fast  # noqa: E402
from kvray.core.apply import IndexWriter, ModelHashing  # noqa: E402
from kvray.core.events import EventDecoder, peek_rank  # noqa: E402
from kvray.core.index.memory import MemoryIndex  # noqa: E402
from kvray.core.journal import Journal  # noqa: E402
from kvray.core.topics import parse_frames, parse_topic  # noqa: E402
from kvray.errors import ConfigError, MalformedFrame  # noqa: E402
from kvray.types import PodId  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BOUNDARY = [
    b"\x00",
    b"\x7f",
    b"\x80",
    b"\xff",
    b"\xcc\xff",
    b"\xcd\xff\xff",
    b"\xce\xff\xff\xff\xff",
    b"\xcf" + b"\xff" * 8,
    b"\xd3" + b"\x80" + b"\x00" * 7,
    b"\xdc\xff\xff",
    b"\xdd\xff\xff\xff\xff",
    b"\xde\xff\xff",
    b"\xc4\xff",
    b"\xc0",
    b"\xc3",
    b"\xcb",
]


def seeds() -> list[bytes]:
    out = []
    for p in sorted((ROOT / "tests" / "fixtures" / "events").glob("*.payload.msgpack")):
        out.append(p.read_bytes())
    return out


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        pos = rng.randrange(len(b) + 1) if b else 0
        if op == 0 and b:
            b[min(pos, len(b) - 1)] = rng.randrange(256)
        elif op == 1:
            b[pos:pos] = rng.choice(BOUNDARY)
        elif op == 2 and b:
            del b[pos : pos + rng.randint(1, 16)]
        elif op == 3:
            b = b[: rng.randrange(len(b) + 1)]
        elif op == 4:
            other = rng.choice(pool)
            b[pos:] = other[rng.randrange(len(other) + 1) :]
        elif op == 5 and b:
            b[min(pos, len(b) - 1)] ^= 1 << rng.randrange(8)
        else:
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return bytes(b)


def random_doc(rng: random.Random, depth: int = 0) -> object:
    kinds = ["int", "neg", "big", "str", "bytes", "float", "nil", "bool"]
    if depth < 4:
        kinds += ["list", "map", "event"]
    k = rng.choice(kinds)
    if k == "int":
        return rng.randrange(2**16)
    if k == "neg":
        return -rng.randrange(2**40)
    if k == "big":
        return rng.randrange(2**64)
    if k == "str":
        return rng.choice(["BlockStored", "BlockRemoved", "AllBlocksCleared", "type", "", "x"])
    if k == "bytes":
        return rng.randbytes(rng.randrange(40))
    if k == "float":
        return rng.random() * 1e10
    if k == "nil":
        return None
    if k == "bool":
        return rng.random() < 0.5
    if k == "list":
        return [random_doc(rng, depth + 1) for _ in range(rng.randrange(5))]
    if k == "map":
        return {
            rng.choice(
                ["type", "ts", "events", "block_hashes", "token_ids", "block_size"]
            ): random_doc(rng, depth + 1)
            for _ in range(rng.randrange(5))
        }
    return {
        "type": rng.choice(["BlockStored", "BlockRemoved", "AllBlocksCleared"]),
        "block_hashes": [rng.randrange(2**64) for _ in range(rng.randrange(4))],
        "token_ids": [rng.randrange(2**17) for _ in range(rng.choice([0, 16, 15, 32]))],
        "block_size": rng.choice([16, 0, -1, 64]),
        "parent_block_hash": None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/fuzz.md")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    pool = seeds()
    dec = EventDecoder()
    writer = IndexWriter(Journal(MemoryIndex(max_keys=50_000)), lambda m: ModelHashing(16))
    reasons: Counter[str] = Counter()
    applied: Counter[str] = Counter()
    crashes = 0
    t0 = time.perf_counter()
    for i in range(args.n):
        r = i % 10
        if r < 7:
            data = mutate(rng, rng.choice(pool), pool)
        elif r < 9:
            data = msgspec.msgpack.encode(
                [rng.random(), [random_doc(rng) for _ in range(3)], random_doc(rng)]
            )
        else:
            data = rng.randbytes(rng.randrange(64))
        try:
            batch = dec.decode(data)
            peek_rank(data)
            reasons["decoded"] += 1
            res = writer.apply_batch(PodId(f"p{i % 8}"), "m", batch)
            applied["stored"] += res.stored_blocks
            applied["removed"] += res.removed_blocks
            applied.update(res.rejected)
            writer.backend.drain()  # type: ignore[attr-defined]
        except MalformedFrame as exc:
            reasons[exc.reason] += 1
        except Exception as exc:  # a crash: the one outcome that must never happen
            crashes += 1
            print(f"CRASH {type(exc).__name__}: {exc} on {data.hex()}", file=sys.stderr)
    dt = time.perf_counter() - t0
    # Frames and topics.
    frame_crashes = 0
    topics = 0
    real_topics = [b"kv@10.0.0.7@meta-llama/Llama-3.1-8B", b"", b"kv@p:8000@org/m@v2"]
    for _ in range(args.n // 10):
        if rng.random() < 0.5:  # mutated real topics and seq frames
            frames = [
                mutate(rng, rng.choice(real_topics), real_topics),
                mutate(rng, (rng.randrange(2**64)).to_bytes(8, "big"), [b"\x00" * 8]),
                rng.choice(pool),
            ]
        else:
            frames = [
                rng.randbytes(rng.randrange(24)) for _ in range(rng.choice([1, 2, 3, 3, 3, 4]))
            ]
        try:
            t, _, _ = parse_frames(frames)
            parse_topic(t)
            topics += 1
        except MalformedFrame:
            pass
        except Exception as exc:
            frame_crashes += 1
            print(f"CRASH frames {type(exc).__name__}: {exc}", file=sys.stderr)
    # Config loader: random YAML-ish documents.
    cfg_crashes = 0
    tmp = Path("/tmp/kvray-fuzz.yaml")
    for _ in range(2000):
        doc = {
            rng.choice(["num_shards", "index", "events", "serve", "namespace", "x"]): random_doc(
                rng
            )
            for _ in range(rng.randrange(4))
        }
        tmp.write_text(json.dumps(doc, default=str))
        try:
            load_config(tmp, env={})
        except ConfigError:
            pass
        except Exception as exc:
            cfg_crashes += 1
            print(f"CRASH config {type(exc).__name__}: {exc}", file=sys.stderr)
    rows = [[k, f"{v:,}"] for k, v in sorted(reasons.items())]
    text = write_report(
        args.out,
        "kvray fuzzing",
        [
            f"## Decoder: {args.n:,} inputs in {dt:.1f} s ({args.n / dt / 1e3:.0f} k/s), "
            f"crashes: {crashes}\n\n" + table(["outcome (MalformedFrame reason)", "inputs"], rows),
            "## Write path on every decoded batch "
            f"({'compiled' if fast.COMPILED else 'pure Python'}), crashes included above\n\n"
            + table(
                ["blocks (applied, or rejected by reason)", "count"],
                [[k, f"{v:,}"] for k, v in sorted(applied.items())],
            ),
            f"## Frames + topic parser: {args.n // 10:,} inputs, {topics:,} parsed, crashes: "
            f"{frame_crashes}",
            f"## Config loader: 2,000 random documents, crashes: {cfg_crashes}",
        ],
    )
    print(text)
    return 1 if crashes or frame_crashes or cfg_crashes else 0


if __name__ == "__main__":
    sys.exit(main())
