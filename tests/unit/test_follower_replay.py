"""``StreamFollower`` asks a pod's replay socket again when an answer does not come in time
(a busy engine or a loaded host), resuming where the previous answer stopped. Real ZMQ: a
ROUTER on 127.0.0.1 that stays silent for the first request, like a pod too slow to answer."""

from __future__ import annotations

import threading

import zmq

from kvray.config import PodEndpoint
from kvray.core.events import WireBlockStored, encode_batch
from kvray.core.messages import BatchOp, Op
from kvray.core.sharding import Placement
from kvray.core.topics import REPLAY_END_SEQ
from kvray.ingest.follower import StreamFollower

TOPIC = b"kv@10.1.0.1@m"


class _Queue:
    """The follower's ``Links``, recording what it queues for shard 0."""

    def __init__(self) -> None:
        self.ops: list[Op] = []

    def queue(self, shard: int, op: Op) -> None:
        self.ops.append(op)

    def abandon_inflight(self, shard: int) -> None:
        pass

    def take_pending(self, shard: int) -> list[Op]:
        return []

    def positions(self, shard: int) -> tuple[str, dict[str, int]] | None:
        return None


def _payload(seq: int) -> bytes:
    ev = WireBlockStored([1000 + seq], None, list(range(16)), 16, None, None, None, [None])
    return encode_batch([ev], ts=0.0, data_parallel_rank=0)


def _silent_then_answering_router(
    silent: int, history: list[tuple[int, bytes]]
) -> tuple[str, threading.Thread, threading.Event]:
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("tcp://127.0.0.1:*")
    endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
    stop = threading.Event()

    def serve() -> None:
        seen = 0
        try:
            while not stop.is_set():
                if not router.poll(20):
                    continue
                ident, _, start_b = router.recv_multipart()
                seen += 1
                if seen <= silent:
                    continue  # too slow: the requester's timeout passes
                start = int.from_bytes(start_b, "big")
                for seq, payload in history:
                    if seq >= start:
                        router.send_multipart([ident, b"", TOPIC, seq.to_bytes(8, "big"), payload])
                router.send_multipart([ident, b"", b"", REPLAY_END_SEQ, b""])
        finally:
            router.close(linger=0)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return endpoint, t, stop


def _late_joined(silent: int, attempts: int) -> tuple[list[tuple[int, bool]], StreamFollower]:
    """A pod whose first message kvray sees is seq 3, behind a replay socket that ignores its
    first ``silent`` requests; the ops queued (seq, contiguous) and the follower."""
    history = [(s, _payload(s)) for s in range(4)]
    endpoint, thread, stop = _silent_then_answering_router(silent, history)
    try:
        links = _Queue()
        follower = StreamFollower(
            0, links, Placement(1), replay_timeout_s=0.2, replay_attempts=attempts
        )
        origin = PodEndpoint(endpoint="tcp://127.0.0.1:1", replay_endpoint=endpoint,
                             pod="10.1.0.1", model="m")  # fmt: skip
        follower.handle([TOPIC, (3).to_bytes(8, "big"), history[3][1]], origin)
        return [(op.seq, op.contiguous) for op in links.ops if isinstance(op, BatchOp)], follower
    finally:
        stop.set()
        thread.join(2)


def test_a_late_joined_pod_slow_to_answer_is_asked_again() -> None:
    """The pod answers the second replay request."""
    seqs, follower = _late_joined(silent=1, attempts=3)
    # 0 starts what kvray has of the pod (not contiguous); the rest follow it.
    assert seqs == [(0, False), (1, True), (2, True), (3, True)]
    assert follower.counters.replay_requests == 2
    assert follower.counters.seq_lost == 0


def test_a_pod_that_never_answers_is_counted_lost_after_the_attempts() -> None:
    seqs, follower = _late_joined(silent=10, attempts=2)
    assert seqs == [(3, False)]  # taken as it comes: nothing could heal [0, 3)
    assert follower.counters.replay_requests == 2
