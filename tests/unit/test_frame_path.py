"""The whole-frame write path (``kvray._speedups.scan_frame`` / ``apply_frames``) against the
general one (``EventDecoder.decode`` + ``IndexWriter.apply_batch``).

The general path is the twin: the same frames go through an ``OrderedApplier`` with the frame
path and one without, and after every call the two shards must agree on everything a reader
or a restart sees: each holder's keys per tier, the engine map, the key count, the
change-stream ops (in order), the counts and rejections, the pool gauges, the copy counts
and the positions. The frames are drawn to hit what the C loop must get right (copies, runs
of removals split by medium spelling, unknown parents and removals, eviction) and what it
must leave to Python (other tiers, LoRA, clears, other block sizes, odd encodings).
"""

from __future__ import annotations

import random
from typing import Any

import msgspec
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from kvray.changes.journal import Journal
from kvray.core import fast
from kvray.core.apply import IndexWriter, ModelHashing
from kvray.core.events import EventDecoder, FrameHead, encode_batch
from kvray.core.hashing import BlockHasher
from kvray.core.index.memory import MemoryIndex
from kvray.core.messages import BatchOp, Op
from kvray.core.ordering import OrderedApplier, group_by_pod
from kvray.sim import SimPod
from kvray.types import PodId

needs_c = pytest.mark.skipif(not fast.COMPILED, reason="pure-Python run (no frame path)")

MODEL = "m"
BS = 4
enc = msgspec.msgpack.Encoder()


class Fleet:
    """Pods storing and evicting chains of blocks, publishing vLLM-shaped frames."""

    def __init__(self, rng: random.Random, pods: int = 4) -> None:
        self.rng = rng
        self.pods = [f"p{i}" for i in range(pods)]
        self.held: dict[str, list[int]] = {p: [] for p in self.pods}
        self.blocks: list[tuple[int | None, list[int], int]] = []  # (parent, tokens, hash)
        self.sent: list[dict[str, Any]] = []  # stores, to send again (vLLM does: copies)
        self.odd_frame = False

    def _block(self, parent: int | None, tokens: list[int]) -> int:
        data = (parent or 0).to_bytes(8, "little") + b"".join(
            t.to_bytes(4, "little") for t in tokens
        )
        return xxhash.xxh3_64_intdigest(data)

    def stored(self) -> dict[str, Any]:
        rng = self.rng
        if self.sent and rng.random() < 0.25:
            return dict(rng.choice(self.sent))
        if self.blocks and rng.random() < 0.7:  # continue or re-store a known chain
            parent, _, h = rng.choice(self.blocks)
            parent = h if rng.random() < 0.6 else parent
        else:
            parent = None if rng.random() < 0.8 else rng.getrandbits(64)  # unknown parent
        n = rng.randint(1, 5)
        hashes, tokens, prev = [], [], parent
        for _ in range(n):
            toks = [
                rng.choice([rng.randrange(128), rng.randrange(1 << 16), rng.randrange(1 << 20)])
                for _ in range(BS)
            ]
            if self.blocks and rng.random() < 0.3:  # the same content again: the same hash
                _, toks, _ = rng.choice(self.blocks)
            h = self._block(prev, toks)
            self.blocks.append((prev, toks, h))
            hashes.append(h)
            tokens.extend(toks)
            prev = h
        ev = {
            "type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent,
            "token_ids": tokens, "block_size": BS, "lora_id": None,
            "medium": rng.choice([None, "GPU", "GPU"]), "lora_name": None,
            "extra_keys": rng.choice([None, [None] * n]), "group_idx": rng.choice([None, 0]),
            "kv_cache_spec_kind": "full_attention",
        }  # fmt: skip
        self.sent.append(ev)
        return ev

    def removed(self, pod: str) -> dict[str, Any]:
        rng = self.rng
        held = self.held[pod]
        h = (
            held.pop(rng.randrange(len(held)))
            if held and rng.random() < 0.9
            else rng.getrandbits(64)
        )
        ev: dict[str, Any] = {"type": "BlockRemoved", "block_hashes": [h]}
        if rng.random() < 0.8:
            ev["medium"] = rng.choice([None, "GPU", "GPU", "GPU"])
        if rng.random() < 0.5:
            ev["group_idx"] = 0
        return ev

    def odd(self, ev: dict[str, Any], positional: bool) -> dict[str, Any] | list[Any]:
        """Now and then an event only the general path takes, or another encoding of one."""
        rng = self.rng
        if not self.odd_frame:
            return ev
        r = rng.random()
        if r < 0.03:
            return {"type": "AllBlocksCleared"}
        if r < 0.06:
            return {**ev, "medium": "CPU"}
        if r < 0.08 and ev["type"] == "BlockStored":
            return {**ev, "lora_name": "ad", "extra_keys": [["ad"]] * len(ev["block_hashes"])}
        if r < 0.10 and ev["type"] == "BlockStored":
            return {**ev, "block_size": BS * 2, "token_ids": ev["token_ids"] * 2}
        if positional or r < 0.11:  # vLLM <= 0.23's positional form (mixed: malformed)
            fields = (
                ["block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
                 "medium", "lora_name"]
                if ev["type"] == "BlockStored" else ["block_hashes", "medium"]
            )  # fmt: skip
            return [ev["type"], *[ev.get(f) for f in fields]]
        return ev

    def frame(self, pod: str | None = None) -> tuple[str, bytes]:
        rng = self.rng
        pod = pod or rng.choice(self.pods)
        events: list[Any] = []
        positional = rng.random() < 0.2
        self.odd_frame = rng.random() < 0.3
        for _ in range(rng.randint(1, 8)):
            if self.held[pod] and rng.random() < 0.5:
                ev = self.removed(pod)
            else:
                ev = self.stored()
                self.held[pod].extend(ev["block_hashes"])
            events.append(self.odd(ev, positional))
        rank = rng.choice([None, None, 0])
        return pod, enc.encode([rng.random() * 1e9, events, rank])


def shard(fast_path: bool, max_keys: int = 10**9) -> tuple[OrderedApplier, Journal, MemoryIndex]:
    """A shard's write path; the tests send ops as not contiguous, so a malformed frame (a
    gap the shard would have replayed) does not hold its pod's later frames back."""
    backend = MemoryIndex(max_keys=max_keys, evict_fraction=0.1)
    journal = Journal(backend)
    hashing = ModelHashing(block_size=BS, hasher=BlockHasher("sha256_cbor", "0", BS))
    writer = IndexWriter(journal, lambda m: hashing, verify_hashes=False)
    dec = EventDecoder()
    return OrderedApplier(writer, dec.decode, decoder=dec if fast_path else None), journal, backend


def state(app: OrderedApplier, journal: Journal, backend: MemoryIndex) -> dict[str, Any]:
    w = app.writer
    holders = backend.holder_keys()
    return {
        "holders": {h: {t: sorted(ks) for t, ks in ts.items()} for h, ts in holders.items()},
        "emap": sorted(backend._emap.items()),
        "keys": backend.stats().keys,
        "ops": journal.drain(),
        "applied": (app.applied.stored_blocks, app.applied.removed_blocks, app.applied.cleared),
        "rejected": dict(sorted(app.applied.rejected.items())),
        "pools": w.pools.as_dict(),
        "copies": {h: sorted(cs) for h, cs in w.copies().items()},
        "positions": dict(app.positions),
        "models": dict(w.models),
    }  # fmt: skip


@needs_c
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), max_keys=st.sampled_from([10**9, 40]))
def test_frame_path_matches_the_general_path(seed: int, max_keys: int) -> None:
    rng = random.Random(seed)
    fleet = Fleet(rng)
    a = shard(True, max_keys)
    b = shard(False, max_keys)
    seqs: dict[str, int] = {}
    taken = 0
    for _ in range(60):
        batch = []
        for _ in range(rng.randint(1, 4)):
            # Runs of a pod's frames, as a reader receives a busy pod's queued messages: the
            # applier takes a run in one call (``OrderedApplier._extend_run``).
            pod = None
            for _ in range(rng.choice([1, 1, 2, 5])):
                pod, payload = fleet.frame(pod)
                seqs[pod] = seqs.get(pod, -1) + 1
                batch.append((pod, seqs[pod], payload))
        ra, _ = a[0].apply([BatchOp(p, MODEL, s, f, False) for p, s, f in batch])
        rb, _ = b[0].apply([BatchOp(p, MODEL, s, f, False) for p, s, f in batch])
        sa, sb = state(*a), state(*b)
        if max_keys > 10**6:
            assert (ra.stored_blocks, ra.removed_blocks, ra.rejected) == (
                rb.stored_blocks, rb.removed_blocks, rb.rejected,
            )  # fmt: skip
            assert sa == sb
        else:  # the frame path checks the size bound per frame, the general one per event
            assert sa["positions"] == sb["positions"]
        taken += sum(EventDecoder().head(f) is not None for _, _, f in batch)
    assert taken > 0  # the frame path ran


@needs_c
def test_a_run_stops_at_a_duplicate_a_gap_or_another_holder() -> None:
    """Ops of one pod in a row are applied as a run only while each seq is the next one:
    a replayed duplicate inside the run is skipped, a gap holds the pod back (behind), and
    another pod's or rank's op starts its own run."""
    rng = random.Random(7)
    fleet = Fleet(rng, pods=2)
    a, b = shard(True), shard(False)
    frames: list[bytes] = []
    while len(frames) < 8:  # in fast form (a frame that is not ends a run anyway)
        f = fleet.frame("p0")[1]
        if EventDecoder().head(f) is not None:
            frames.append(f)
    other = fleet.frame("p1")[1]
    calls = [
        [(0, frames[0], False), (1, frames[1], True), (2, frames[2], True)],
        # a replay overlapping what arrived, then new ones, then another pod
        [(1, frames[1], True), (2, frames[2], True), (3, frames[3], True), (4, frames[4], True)],
        [(5, frames[5], True), (7, frames[7], True), (6, frames[6], True)],  # 7: a gap
    ]
    for n, ops in enumerate(calls):
        got = []
        for app, journal, backend in (a, b):
            batch = [BatchOp("p0", MODEL, s, f, c) for s, f, c in ops]
            batch.insert(2, BatchOp("p1", MODEL, n, other, False))
            res, behind = app.apply(batch)
            got.append((res.stored_blocks, res.removed_blocks, res.rejected, behind))
            got.append(state(app, journal, backend))
        assert got[0] == got[2] and got[1] == got[3]
        if n == 2:  # 7 is refused, and 6 after it waits for the replay of 6
            assert got[0][3] == {"p0": 5}
    assert a[0].positions["p0"] == 5
    assert a[0].applied.rejected["duplicate"] == 2


class _Capture:
    """A ``SimPod`` publisher that keeps each batch, encoded as vLLM does."""

    def __init__(self, pod: str, out: list[tuple[str, bytes]]) -> None:
        self.pod, self.out = pod, out

    def publish(self, events: list[Any], ts: float | None = None) -> int:
        self.out.append((self.pod, encode_batch(events, ts=1.0)))
        return len(self.out) - 1


@needs_c
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_pods_grouped_apply_as_they_arrived(seed: int) -> None:
    """An ingestor ships each pod's ops together (``group_by_pod``): real pods' streams (vLLM's
    block pool, shared prefixes, evictions) leave the shard exactly as in arrival order."""
    rng = random.Random(seed)
    sent: list[tuple[str, bytes]] = []
    pods = [
        SimPod(f"p{i}", MODEL, num_blocks=40, hasher=BlockHasher("sha256_cbor", "0", BS),
               publisher=_Capture(f"p{i}", sent))  # type: ignore[arg-type]
        for i in range(4)
    ]  # fmt: skip
    prefixes = [[rng.randrange(1000) for _ in range(BS * 3)] for _ in range(3)]
    for _ in range(120):
        tail = [rng.randrange(1000) for _ in range(BS * rng.randint(0, 4) + rng.randrange(BS))]
        rng.choice(pods).serve(rng.choice(prefixes) + tail)
    seqs: dict[str, int] = {}
    ops: list[Op] = []
    for pod, payload in sent:
        seqs[pod] = seqs.get(pod, -1) + 1
        ops.append(BatchOp(pod, MODEL, seqs[pod], payload))
    assert len(group_by_pod(ops[:32])) == 32 and group_by_pod(ops[:32]) != ops[:32]
    arrival, grouped = shard(True), shard(True)
    for i in range(0, len(ops), 32):
        arrival[0].apply(ops[i : i + 32])
        grouped[0].apply(group_by_pod(ops[i : i + 32]))
    a, g = state(*arrival), state(*grouped)
    del a["ops"], g["ops"]  # the same changes, in another order across pods
    assert a == g
    assert a["rejected"] == {}  # every parent known, every removal held: a consistent fleet


@needs_c
def test_eviction_keeps_the_change_stream_in_the_shard_order() -> None:
    """A frame that pushes the index over its bound records its own ops before the evictions
    it caused: a replica applying the stream ends with the shard's content."""
    from kvray.changes.journal import ChangeMsg, ReplicaIndex

    rng = random.Random(7)
    fleet = Fleet(rng)
    app, journal, backend = shard(True, max_keys=30)
    replica = ReplicaIndex(1)
    replica.load(backend_snapshot(journal), 5.0)
    seq = 1
    seqs: dict[str, int] = {}
    for _ in range(200):
        pod, payload = fleet.frame()
        seqs[pod] = seqs.get(pod, -1) + 1
        app.apply([BatchOp(pod, MODEL, seqs[pod], payload, False)])
        seq += 1
        assert replica.apply(ChangeMsg(0, "s", seq, journal.drain(), {pod: seqs[pod]}))
    got = {
        h: {t: sorted(k) for t, k in ts.items()} for h, ts in replica.index.holder_keys().items()
    }
    want = {h: {t: sorted(k) for t, k in ts.items()} for h, ts in backend.holder_keys().items()}
    assert backend.stats().evicted_keys > 0
    assert got == want


def backend_snapshot(journal: Journal) -> Any:
    from kvray.changes.journal import ReplicaSnapshot, packed_holders

    journal.drain()
    return ReplicaSnapshot(0, "s", 1, packed_holders(journal.backend), {})


@needs_c
@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), flips=st.integers(1, 4))
def test_a_frame_the_scan_takes_decodes_the_same(seed: int, flips: int) -> None:
    """Fast form is a subset of what the decoder takes: mutate frames at random; whatever
    ``scan_frame`` still accepts must decode, with the same ts and rank."""
    rng = random.Random(seed)
    fleet = Fleet(rng)
    _, payload = fleet.frame()
    data = bytearray(payload)
    for _ in range(flips):
        data[rng.randrange(len(data))] = rng.randrange(256)
    dec = EventDecoder()
    head = dec.head(bytes(data))
    if head is None:
        return
    batch = dec.decode(bytes(data))  # must not raise
    assert isinstance(head, FrameHead)
    assert (head.ts, head.data_parallel_rank) == (batch.ts, batch.data_parallel_rank)


@needs_c
def test_a_kept_scan_applies_as_its_bytes_do() -> None:
    """``apply_frames`` takes the scan a head kept in the payload's place: the same index as
    from the bytes, also when the scan was checked against other limits (then it parses the
    payload the scan holds), and a held bytearray cannot be resized under it."""
    rng = random.Random(11)
    fleet = Fleet(rng, pods=1)
    frames: list[bytes] = []
    while len(frames) < 12:
        f = fleet.frame("p0")[1]
        if EventDecoder().head(f) is not None:
            frames.append(f)
    lim = EventDecoder().limit_args
    other = (lim[0], lim[1] + 1, lim[2])
    got = []
    for way in ("bytes", "scan", "scan under other limits"):
        _, journal, backend = shard(True)
        writer = IndexWriter(journal, lambda m: ModelHashing(BS), verify_hashes=False)
        writer.apply_batch(PodId("p0"), MODEL, EventDecoder().decode(frames[0]))  # a slot
        items: list[Any] = list(frames[1:])
        if way != "bytes":
            items = [fast.scan_frame(f, *(lim if way == "scan" else other), True)[2] for f in items]
        stop, _ = writer.apply_frames(PodId("p0"), MODEL, items, 0, lim)
        assert stop == len(items)
        got.append((backend.holder_keys(), sorted(backend._emap.items()), journal.drain()))
    assert got[0] == got[1] == got[2]
    held = bytearray(frames[0])
    scan = fast.scan_frame(held, *lim, True)
    with pytest.raises(BufferError):
        held.extend(b"x")
    del scan
    held.extend(b"x")  # released with the scan


@needs_c
def test_what_the_scan_leaves_to_the_decoder() -> None:
    dec = EventDecoder()
    removed = {"type": "BlockRemoved", "block_hashes": [1], "medium": "GPU"}
    ok = enc.encode([1.5, [removed], None])
    assert dec.head(ok) == FrameHead(1.5, None)
    assert dec.head(enc.encode([1.5, [removed], 3])) == FrameHead(1.5, 3)
    for events in (
        [{"type": "AllBlocksCleared"}],
        [{**removed, "medium": "CPU"}],
        [{**removed, "block_hashes": [b"\x00" * 32]}],  # raw digests
        [{**removed, "block_hashes": []}],
        [{"block_hashes": [1], "type": "BlockRemoved"}],  # "type" not first
        [{**removed, "x": msgspec.msgpack.Ext(1, b"")}],  # an ext type
        [{"type": "BlockStored", "block_hashes": [1], "token_ids": [1, 2], "block_size": 4}],
        [{"type": "BlockStored", "block_hashes": [1], "block_size": 2}],  # no tokens
    ):
        assert dec.head(enc.encode([1.5, events, None])) is None, events
    assert dec.head(ok + b"\x00") is None  # trailing bytes
    assert dec.head(enc.encode([1, [removed], None])) is None  # an int ts
    assert dec.head(b"") is None


@needs_c
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_replica_apply_ops_matches_its_python_loop(seed: int) -> None:
    """A read replica applies a change stream's plain ops in one C call (``apply_ops``) and
    the rest (speculative entries, clears, new holders and tiers) in Python: it must end where
    the all-Python loop ends, message after message."""
    from kvray.changes.journal import ChangeMsg, ReplicaIndex

    rng = random.Random(seed)
    fleet = Fleet(rng)
    app, journal, backend = shard(True)
    fast_r, slow_r = ReplicaIndex(1), ReplicaIndex(1)
    slow_r.index.apply_ops = lambda ops, start, holders: start  # type: ignore[method-assign]
    for r in (fast_r, slow_r):
        r.load(backend_snapshot(journal), 5.0)
    seqs: dict[str, int] = {}
    for seq in range(2, 80):
        pod, payload = fleet.frame()
        seqs[pod] = seqs.get(pod, -1) + 1
        app.apply([BatchOp(pod, MODEL, seqs[pod], payload, False)])
        r = rng.random()
        if r < 0.1:  # a routed request's speculative entries
            with journal.speculative(5.0):
                app.writer.record_route(pod, [rng.getrandbits(64) for _ in range(3)])  # type: ignore[arg-type]
        elif r < 0.13:
            app.clear(rng.choice(fleet.pods))
        msg = ChangeMsg(0, "s", seq, journal.drain(), {pod: seqs[pod]})
        assert fast_r.apply(msg) and slow_r.apply(msg)
        got, want = fast_r.index.holder_keys(), slow_r.index.holder_keys()
        assert {h: {t: sorted(k) for t, k in ts.items()} for h, ts in got.items()} == {
            h: {t: sorted(k) for t, k in ts.items()} for h, ts in want.items()
        }
        assert fast_r.index.stats().keys == slow_r.index.stats().keys
        assert fast_r.shards[0].holders == slow_r.shards[0].holders
