"""Regression tests for issue 15 §3: after a reader restarts, the index must be exact again.

The fault benchmark (``benchmarks/bench_faults.py``) found three ways a restart left a shard
wrong for good, none of them counted anywhere:

* an ingestor that restarted without learning where the shard stopped (the controller was
  down) sent each stream's first live batch as "not contiguous"; the shard, which knew its
  position, took it and skipped the batches the ingestor missed while down. Their removals
  were lost: the pod with the smallest pool stayed credited with chains it had evicted;
* catch-up after a restart replayed up to the pod's newest batch while live copies of the
  same batches waited in the SUB socket; they looked like a restarted pod (seq below the
  expected one), and the holder was cleared;
* a shard with no position for a holder (restarted without a snapshot) took a contiguous
  batch at any seq, so the batches before it were never replayed.

The tests run the real ``IndexShard`` and ``Ingestor`` classes in-process (the shard reading
its pod itself, no Ray), with a simulated vLLM pod publishing real ZMQ frames.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvray.actors.shard import IndexShard
from kvray.config import Config, PodEndpoint, ReplicaConfig
from kvray.core.events import WireBlockStored, encode_batch
from kvray.core.messages import BatchOp
from kvray.ingest import follower as follower_mod
from kvray.sim import SimPod, SimPublisher

MODEL = "m"
POD = "10.77.0.1"


@pytest.fixture
def shard() -> Iterator[IndexShard]:
    cfg = Config(namespace="kvray-it-recovery", num_shards=1, replica=ReplicaConfig(enabled=False))
    s = IndexShard(0, cfg.model_dump(), restore=False)
    yield s
    s.own.stop()


@pytest.fixture
def pod() -> Iterator[SimPod]:
    pub = SimPublisher(
        "tcp://127.0.0.1:0", f"kv@{POD}@{MODEL}", replay_endpoint="tcp://127.0.0.1:0"
    )
    yield SimPod(POD, MODEL, num_blocks=12, publisher=pub)  # a small pool: evicts all the time
    pub.close()


def _prompts(n: int = 40, seed: int = 3) -> list[list[int]]:
    rng = random.Random(seed)
    heads = [[rng.randrange(9000) for _ in range(16)] for _ in range(4)]
    # A third block-aligned: a fully cached aligned prompt recomputes its last block (a second
    # copy, whose removal must not drop the block).
    return [
        rng.choice(heads)
        + [rng.randrange(9000) for _ in range(16 * rng.randint(1, 3) + rng.choice((0, 5, 5)))]
        for _ in range(n)
    ]


def _wait(pred: Callable[[], bool], timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def _applied_all(shard: IndexShard, pod: SimPod) -> bool:
    assert pod.publisher is not None
    return shard.get_positions()[1].get(POD) == pod.publisher.seq - 1


def _exact(shard: IndexShard, pod: SimPod, prompts: list[list[int]]) -> bool:
    for p in prompts:
        want = {POD: float(n)} if (n := pod.cached_prefix_blocks(p)) else {}
        if shard.score(shard.writer.keyer.block_keys(p, MODEL), [POD]) != want:
            return False
    return True


def _first_life(shard: IndexShard, pod: SimPod, prompts: list[list[int]]) -> None:
    """The shard reads the pod (its replay socket registered, as for a connecting pod)."""
    assert pod.publisher is not None
    ing = shard.own.start()
    ing.register_replay(POD, pod.publisher.replay_endpoint)  # type: ignore[arg-type]
    ing.add_pod(PodEndpoint(endpoint=pod.publisher.endpoint, pod=POD, model=MODEL))
    assert pod.publisher.wait_connected()
    for p in prompts:
        pod.serve(p)
    assert _wait(lambda: _applied_all(shard, pod))
    assert _exact(shard, pod, prompts)


def _reader_dies(shard: IndexShard) -> None:
    assert shard.own.reader is not None
    shard.own.stop()


def test_restarted_reader_without_positions_replays_what_it_missed(
    shard: IndexShard, pod: SimPod
) -> None:
    """The issue's divergence: removals published while the reader was down were lost."""
    prompts = _prompts()
    _first_life(shard, pod, prompts[:15])
    _reader_dies(shard)
    for p in prompts[15:30]:  # published while nobody reads: evictions of earlier chains
        pod.serve(p)
    # The reader comes back knowing nothing of where the shard stopped (no catch-up).
    assert pod.publisher is not None
    ing = shard.own.start()
    ing.register_replay(POD, pod.publisher.replay_endpoint)  # type: ignore[arg-type]
    ing.add_pod(PodEndpoint(endpoint=pod.publisher.endpoint, pod=POD, model=MODEL))
    assert pod.publisher.wait_connected(peers=2)
    for p in prompts[30:]:
        pod.serve(p)
    assert _wait(lambda: _applied_all(shard, pod))
    assert _wait(lambda: _exact(shard, pod, prompts)), "the missed batches were skipped"


def test_catch_up_does_not_mistake_live_copies_for_a_restarted_pod(
    shard: IndexShard, pod: SimPod, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Live batches received while catch-up replays the same seqs are duplicates."""
    prompts = _prompts(seed=4)
    _first_life(shard, pod, prompts[:15])
    spec = {"endpoint": pod.publisher.endpoint, "replay_endpoint": None, "pod": POD,  # type: ignore[union-attr]
            "model": MODEL}  # fmt: skip
    _reader_dies(shard)
    for p in prompts[15:25]:
        pod.serve(p)
    real = follower_mod.request_replay  # type: ignore[attr-defined]
    calls = 0

    def replay_after_live_traffic(*args: Any, **kwargs: Any) -> Any:
        # Catch-up asks the pod while the pod keeps publishing to the reconnected socket:
        # the batches below reach the SUB socket AND the replay answer.
        nonlocal calls
        calls += 1
        if calls == 1:
            assert pod.publisher is not None and pod.publisher.wait_connected(peers=2)
            for p in prompts[25:30]:
                pod.serve(p)
            time.sleep(0.2)
        return real(*args, **kwargs)

    monkeypatch.setattr(follower_mod, "request_replay", replay_after_live_traffic)
    shard.own.replay_hints[POD] = pod.publisher.replay_endpoint  # type: ignore[union-attr,assignment]
    # A restarted shard's reader: catch-up first.
    ing = shard.own.start(shard.applier, resume=[spec])
    assert _wait(lambda: calls >= 1)
    for p in prompts[30:]:
        pod.serve(p)
    assert _wait(lambda: _applied_all(shard, pod))
    assert _wait(lambda: _exact(shard, pod, prompts)), "the holder was cleared"
    assert ing.stats().restarts == 0


def test_a_restored_shard_keeps_the_pods_second_copies(shard: IndexShard, pod: SimPod) -> None:
    """vLLM stores a recomputed block again; the copy count goes into the shard's snapshot, so
    a restarted shard also keeps the block until the pod removes its last copy."""
    p = list(range(4000, 4064))  # 4 blocks, block-aligned: served twice, block 4 has 2 copies
    q = p + list(range(5000, 5019))
    _first_life(shard, pod, [p, p, q])
    copies = shard.writer.copies()
    assert [c for _, _, c in copies[POD]] == [1]
    restarted = IndexShard(0, shard.config.model_dump(), restore=False)
    restarted.restore(shard.snapshot())
    assert restarted.writer.copies() == copies
    # The pod evicts one copy of block 4 (a long prompt): both shards still score it.
    long = list(range(6000, 6000 + 5 * 16 + 5))  # 6 blocks: evicts exactly that copy
    pod.serve(long)
    assert _wait(lambda: _applied_all(shard, pod))
    assert pod.cached_prefix_blocks(q) == 5
    assert _exact(shard, pod, [p, q, long])
    assert shard.writer.copies() == {}
    # The restarted shard gets the same batch (a replay from its snapshot's position).
    after = restarted.get_positions()[1][POD]
    batch = [op for op in _replayed(pod, shard.get_positions()[1][POD]) if op.seq > after]
    assert len(batch) == 1 and restarted.apply(batch).behind == {}
    assert _exact(restarted, pod, [p, q, long])


def _replayed(pod: SimPod, upto: int) -> list[BatchOp]:
    """The pod's batches up to seq ``upto``, as its replay socket would send them."""
    assert pod.publisher is not None
    return [
        BatchOp(POD, MODEL, seq, payload)
        for _, raw_seq, payload in pod.publisher.history()
        if (seq := int.from_bytes(raw_seq, "big")) <= upto
    ]


def _stored(seq_tokens: int) -> bytes:
    toks = list(range(seq_tokens, seq_tokens + 16))
    return encode_batch([WireBlockStored([seq_tokens + 1], None, toks, 16, None, "GPU", None,
                                         [None])], ts=0.0)  # fmt: skip


def test_shard_without_a_position_asks_for_the_start_of_a_contiguous_stream(
    shard: IndexShard,
) -> None:
    """A contiguous batch past seq 0 of a holder the shard knows nothing of is ``behind``
    at -1 (replay from the start); seq 0 and a batch marked not contiguous are taken."""
    res = shard.apply([BatchOp("a", MODEL, 5, _stored(100), True)])
    assert res.behind == {"a": -1} and shard.get_positions()[1] == {}
    res = shard.apply([BatchOp("a", MODEL, 0, _stored(100), True)])
    assert res.behind == {} and shard.get_positions()[1] == {"a": 0}
    res = shard.apply([BatchOp("b", MODEL, 7, _stored(200), False)])
    assert res.behind == {} and shard.get_positions()[1]["b"] == 7
