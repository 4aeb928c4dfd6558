"""Fuzz the frame/event decoder, the topic parser and the config loader with hostile input.

Run: ``python benchmarks/fuzz_decoder.py [--n 1000000] [--out benchmarks/results/fuzz.md]``.
Inputs: byte-level mutations of every captured vLLM frame (flip, insert, delete, truncate,
splice, integer-boundary patches), random msgpack documents, and random bytes. Every input must
either decode or raise ``MalformedFrame``; anything else is a crash, printed with its input.
Every batch that decodes is then applied through a shard's write path (``IndexWriter`` over a
``Journal`` over a ``MemoryIndex``, request keys: the C extension's loops when it is built),
which must never raise.

``--native`` fuzzes something else instead: every entry point of the C extension
(``kvray._speedups``) against its pure-Python twin in ``kvray.core.fast``, ``--n`` inputs
(random and mutated msgpack token arrays, random bytes, ints of every size and sign, bools,
dicts and the C tables), each required to give the same result or the same exception type;
the whole-frame path (``scan_frame``/``apply_frames``, whose twin is the general write path) on
captured vLLM frames, mutated or not: a frame the scan takes must decode to the same ts and
rank and leave the index, engine map, change-stream ops and pools as the general path does. It
prints one line and exits 1 on any mismatch; ``scripts/sanitize.sh`` runs it under
AddressSanitizer + UBSan.
"""

from __future__ import annotations

import argparse
import json
import pickle
import random
import sys
import time
from array import array
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).parent))
from _util import table, write_report  # noqa: E402

from kvray.changes.journal import Journal  # noqa: E402
from kvray.config import load_config  # noqa: E402
from kvray.core import fast  # noqa: E402
from kvray.core.apply import IndexWriter, ModelHashing  # noqa: E402
from kvray.core.events import EventDecoder, peek_rank  # noqa: E402
from kvray.core.index.memory import MemoryIndex  # noqa: E402
from kvray.core.messages import BatchOp  # noqa: E402
from kvray.core.ordering import OrderedApplier  # noqa: E402
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


# --- --native: the C entry points against their Python twins --------------------------------

_ERRORS = (ValueError, TypeError, OverflowError, KeyError)


def _outcome(fn: Any, *args: Any) -> tuple[str, Any]:
    try:
        return "ok", fn(*args)
    except _ERRORS as exc:
        return type(exc).__name__, None


def _sorted_lists(outcome: tuple[str, Any]) -> tuple[str, Any]:
    kind, value = outcome
    return kind, {k: sorted(v) for k, v in value.items()} if kind == "ok" else value


def _unpacked(outcome: tuple[str, Any]) -> tuple[str, Any]:
    kind, value = outcome
    if kind != "ok":
        return outcome
    return kind, {
        s: [int.from_bytes(b[i : i + 8], "little") for i in range(0, len(b), 8)]
        for s, b in value.items()
    }


def _any_int(rng: random.Random) -> Any:
    """Ints of every size and sign around the u64 boundaries, and bools."""
    return rng.choice(
        [
            lambda: rng.randrange(64),
            lambda: rng.getrandbits(64),
            lambda: (1 << rng.choice([31, 32, 62, 63, 64, 65])) + rng.randint(-2, 2),
            lambda: -rng.getrandbits(rng.randint(1, 70)) - 1,
            lambda: rng.getrandbits(rng.randint(65, 200)),
            lambda: rng.random() < 0.5,
        ]
    )()


def _token_array(rng: random.Random) -> bytes:
    """A msgpack array of tokens in varied int encodings (mostly valid)."""
    n = rng.choice([0, 1, 15, 16, 17, 32, 48, rng.randrange(100)])
    parts = []
    for _ in range(n):
        v = rng.randrange(2**32) if rng.random() < 0.97 else rng.choice([-1, 2**32, 2**40])
        form = rng.randrange(6)
        if form == 0 or not 0 <= v < 2**32:
            parts.append(msgspec.msgpack.encode(v))
        else:
            code, size = [(0xCC, 1), (0xCD, 2), (0xCE, 4), (0xCF, 8), (0xD3, 8)][form - 1]
            if v < 1 << (8 * size - (code == 0xD3)):
                parts.append(bytes([code]) + v.to_bytes(size, "big"))
            else:
                parts.append(msgspec.msgpack.encode(v))
    head = bytes([0x90 | n]) if n < 16 else b"\xdc" + n.to_bytes(2, "big")
    return head + b"".join(parts)


def _c_table(kind: str, d: dict[int, int], C: Any) -> Any:
    return dict(d) if kind == "dict" else getattr(C, kind)(d)


def _same_map(kind: str, a: Any, b: dict[int, int]) -> bool:
    """A C table (or the C call's dict) equals the twin's dict, order included where kept."""
    if kind == "U64Map":
        return sorted(a.items()) == sorted(b.items())
    return list(a.items()) == list(b.items())


def _frame_shard(fast_path: bool) -> OrderedApplier:
    hashing = ModelHashing(16)
    writer = IndexWriter(Journal(MemoryIndex()), lambda m: hashing, verify_hashes=False)
    dec = EventDecoder()
    return OrderedApplier(writer, dec.decode, decoder=dec if fast_path else None)


def _frame_state(app: OrderedApplier) -> Any:
    journal = app.writer.backend
    assert isinstance(journal, Journal) and isinstance(journal.backend, MemoryIndex)
    idx = journal.backend
    holders = {h: {t: sorted(k) for t, k in ts.items()} for h, ts in idx.holder_keys().items()}
    return holders, sorted(idx._emap.items()), journal.drain(), app.writer.pools.as_dict()


def _frame_case(rng: random.Random, C: Any, pool: list[bytes], frames: list[bytes]) -> str | None:
    """A vLLM frame, mutated or not: whatever ``scan_frame`` accepts must decode to the same
    ts and rank, and apply (in a run of the pod's frames) through ``apply_frames`` as through the
    decoder and ``apply_batch``."""
    base = rng.choice(frames)
    data = mutate(rng, base, pool) if rng.random() < 0.8 else base
    head = C.scan_frame(data, 64 * 2**20, 100_000, 1 << 20)
    try:
        batch = EventDecoder().decode(data)
    except MalformedFrame:
        batch = None
    if head is None:
        return None
    if batch is None or head != (batch.ts, batch.data_parallel_rank):
        return f"scan_frame({data!r}) = {head!r}, the decoder: {batch!r}"
    a, b = _frame_shard(True), _frame_shard(False)
    first = rng.choice(frames)  # the holder's first frame takes the general path: give it one
    after = rng.choice(frames)
    for app in (a, b):  # one call: a run of the pod's frames (``apply_frames``)
        app.apply([BatchOp("p", "m", 0, first), BatchOp("p", "m", 1, data),
                   BatchOp("p", "m", 2, after)])  # fmt: skip
    if _frame_state(a) != _frame_state(b):
        return f"apply_frames([{first!r}, {data!r}, {after!r}]) differs from the general path"
    return None


def _native_case(
    rng: random.Random, C: Any, pool: list[bytes], frames: list[bytes] | None = None
) -> str | None:
    """One random input through one group of C entry points; a description on mismatch."""
    py = fast.PYTHON
    group = rng.randrange(7 if frames else 6)
    if group == 6:
        assert frames is not None
        return _frame_case(rng, C, pool, frames)
    if group <= 1:  # msgpack token arrays: valid, mutated, or random bytes
        r = rng.random()
        raw = (
            _token_array(rng)
            if r < 0.4
            else mutate(rng, rng.choice(pool), pool)
            if r < 0.9
            else rng.randbytes(rng.randrange(40))
        )
        if rng.random() < 0.3:
            pool[rng.randrange(len(pool))] = raw  # mutations of mutations
        bs = rng.choice([1, 2, 3, 16, 16, 17, rng.randint(-1, 64), 2**24, 2**24 + 1])
        parent = _any_int(rng) if rng.random() < 0.2 else rng.getrandbits(64)
        for name, args in (("msgpack_u32_count", (raw,)), ("chain_msgpack", (raw, bs, parent))):
            a, b = _outcome(getattr(C, name), *args), _outcome(py[name], *args)
            if a != b:
                return f"{name}{args!r}: C {a} != Python {b}"
        return None
    if group == 2:  # chain_u32 over raw bytes; xor_u64 over ints, bools, bytes, junk
        data = rng.randbytes(rng.randrange(200))
        parent = _any_int(rng) if rng.random() < 0.2 else rng.getrandbits(64)
        args: tuple[Any, ...] = (data, rng.choice([1, 2, 16, rng.randint(-1, 40)]), parent)
        hashes = [
            rng.choice([_any_int(rng), None, 1.5])
            if rng.random() < 0.04
            else rng.choice([rng.getrandbits(64), rng.randbytes(rng.randrange(12))])
            for _ in range(rng.randrange(12))
        ]
        tag = _any_int(rng) if rng.random() < 0.2 else rng.getrandbits(64)
        for name, a_ in (("chain_u32", args), ("xor_u64", (hashes, tag))):
            a, b = _outcome(getattr(C, name), *a_), _outcome(py[name], *a_)
            if a != b:
                return f"{name}{a_!r}: C {a} != Python {b}"
        return None
    kind = rng.choice(["dict", "U64Map", "U64Dict"])
    if group <= 4:  # the bitmask and engine-map loops on a dict or a C table
        # Keys: a small range (collisions, long probe runs) and u64s; a dict also gets
        # negative and huge ints and bools (the C dict branch must match dict semantics).
        def key() -> int:
            if kind == "dict" and rng.random() < 0.2:
                return int(_any_int(rng))
            return rng.randrange(60) if rng.random() < 0.7 else rng.getrandbits(64)

        d = {key(): rng.getrandbits(rng.choice([1, 8, 70])) | 1 for _ in range(rng.randrange(40))}
        keys = [key() for _ in range(rng.randrange(40))]
        if rng.random() < 0.3 and all(type(k) is int and 0 <= k < 2**64 for k in keys):
            seq: Any = array("Q", keys)
        else:
            seq = keys
        bit = 1 << rng.randrange(70)
        clear = rng.choice([bit, rng.getrandbits(70), -1 if rng.random() < 0.05 else 0])
        recency = rng.random() < 0.5
        emap = {key(): rng.choice(keys) if keys else 0 for _ in range(rng.randrange(30))}
        other = {k: 1 for k in keys[:: rng.randint(1, 4)]}
        py_d, py_e, py_o = dict(d), dict(emap), dict(other)
        c_d, c_e, c_o = _c_table(kind, d, C), _c_table(kind, emap, C), _c_table(kind, other, C)
        engine = [key() for _ in range(len(keys))]
        calls = [
            ("or_bits", (c_d, seq, bit, recency), (py_d, seq, bit, recency)),
            ("lookup", (c_d, seq), (py_d, seq)),
            ("and_bits", (c_d, seq, ~bit), (py_d, seq, ~bit)),
            ("clear_slots", (c_d, clear), (py_d, clear)),
            (
                "add_engine",
                (c_d, c_e, keys, engine, bit, recency),
                (py_d, py_e, keys, engine, bit, recency),
            ),
            ("forget_unindexed", (c_e, seq, [c_d, c_o]), (py_e, seq, [py_d, py_o])),
            (
                "remove_engine",
                (c_d, c_e, engine, ~bit, [c_d, c_o]),
                (py_d, py_e, engine, ~bit, [py_d, py_o]),
            ),
        ]
        rng.shuffle(calls)
        # slot_keys: a U64Map has no order, so each slot's keys are compared as sets.
        a, b = _outcome(C.slot_keys, c_d, clear), _outcome(py["slot_keys"], py_d, clear)
        if _sorted_lists(a) != _sorted_lists(b):
            return f"slot_keys on {kind}: C {a} != Python {b}"
        a = _outcome(C.slot_keys, c_d, clear, True)
        b = _outcome(py["slot_keys"], py_d, clear, True)
        if _sorted_lists(_unpacked(a)) != _sorted_lists(_unpacked(b)):
            return f"slot_keys(packed) on {kind}: C {a} != Python {b}"
        for name, c_args, py_args in calls:
            a, b = _outcome(getattr(C, name), *c_args), _outcome(py[name], *py_args)
            if a != b:
                return f"{name} on {kind}: C {a} != Python {b}"
            if not (_same_map(kind, c_d, py_d) and _same_map(kind, c_e, py_e)):
                return f"{name} on {kind}: the maps differ after the call"
        return None
    # The tables' own operations against a dict model, with keys they cannot hold.
    kind = rng.choice(["U64Map", "U64Dict"])
    m: Any = getattr(C, kind)()
    model: dict[int, int] = {}

    def holds(k: Any) -> bool:
        return isinstance(k, int) and 0 <= k < 2**64

    for _ in range(rng.randrange(60)):
        op = rng.choice(["set", "set", "set", "del", "pop", "get", "in", "oldest", "update"])
        k: Any = rng.randrange(16) if rng.random() < 0.7 else _any_int(rng)
        if rng.random() < 0.05:
            k = rng.choice(["a", 1.0, None, (1,)])
        v: Any = _any_int(rng) if rng.random() < 0.95 else rng.choice([True, "x", 1.5])
        if op == "set":
            want = (
                ("TypeError" if not isinstance(k, int) else "OverflowError")
                if not holds(k)
                else ("TypeError" if type(v) is not int else "ok")
            )
            got = _outcome(m.__setitem__, k, v)[0]
            if want == "ok":
                model[k] = v
        elif op in ("del", "pop"):
            want = "ok" if holds(k) and k in model else "KeyError"
            got = _outcome(m.__delitem__ if op == "del" else m.pop, k)[0]
            if want == "ok":
                del model[k]
        elif op == "get":
            want = "ok"
            got = "ok" if m.get(k, -7) == (model.get(k, -7) if holds(k) else -7) else "differs"
        elif op == "in":
            want, got = "ok", "ok" if (k in m) == (holds(k) and k in model) else "differs"
        elif op == "oldest":
            n = rng.randrange(6)
            want = "ok"
            got = "ok" if kind == "U64Map" or m.oldest(n) == list(model.items())[:n] else "differs"
        else:  # grow past a resize, sometimes, then empty most of it (shrink, squeeze)
            big = rng.random() < 0.1
            pairs = [
                (rng.randrange(400) if big else rng.getrandbits(64), rng.randrange(9))
                for _ in range(rng.randrange(300 if big else 4))
            ]
            m.update(pairs)
            model.update(pairs)
            if big:
                for k in [k for k in model if rng.random() < 0.9]:
                    del m[k], model[k]
            want = got = "ok"
        if got != want or len(m) != len(model) or not _same_map(kind, m, model):
            return f"{kind}.{op}({k!r}, {v!r}): {got}, expected {want}"
    if not _same_map(kind, pickle.loads(pickle.dumps(m)), model):
        return f"{kind}: pickle round trip differs"
    return None


def fuzz_native(n: int, seed: int) -> int:
    """The C extension against its twins on ``n`` random inputs; one summary line."""
    C = fast._speedups
    if C is None:
        print("native fuzz: kvray._speedups is not built (or KVRAY_PURE_PYTHON is set)")
        return 2
    rng = random.Random(seed)
    frames = seeds()
    pool = [_token_array(rng) for _ in range(64)] + [b"\xdd\xff\xff\xff\xff\x01"] + frames
    mismatches = 0
    t0 = time.perf_counter()
    for _ in range(n):
        bad = _native_case(rng, C, pool, frames)
        if bad is not None:
            mismatches += 1
            if mismatches <= 10:
                print(f"MISMATCH {bad}", file=sys.stderr)
    dt = time.perf_counter() - t0
    print(
        f"native fuzz: {n:,} inputs, {mismatches} mismatches, {dt:.1f} s "
        f"(C extension {getattr(C, '__file__', '?')} against kvray.core.fast)"
    )
    return 1 if mismatches else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/fuzz.md")
    ap.add_argument(
        "--native",
        action="store_true",
        help="instead: the C extension's entry points against their Python twins (--n inputs); "
        "one summary line, exit 1 on a mismatch, no report file",
    )
    args = ap.parse_args()
    if args.native:
        return fuzz_native(args.n, args.seed)
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
