"""Pods' PUB sockets, bound as vLLM binds them, replaying the pre-encoded frames."""

from __future__ import annotations

import time
from typing import Any

import zmq

from benchmarks.dynamo.workload import MODEL, Frame


class BoundPublisher:
    """A pod's PUB socket, BOUND like vLLM's default ``tcp://*:5557`` (here an OS-chosen
    loopback port); sends pre-encoded batches as ``[topic, seq (8 B BE), payload]``."""

    def __init__(self, ctx: zmq.Context[Any], topic: str) -> None:
        self.sock = ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)  # never drop: both systems must see every batch
        self.mon = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.sock.bind("tcp://127.0.0.1:0")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.topic = topic.encode()
        self.seq = 0

    def wait_connected(self, timeout_s: float = 20.0) -> bool:
        return bool(self.mon.poll(int(timeout_s * 1000))) and bool(self.mon.recv_multipart())

    def send(self, payload: bytes) -> None:
        self.sock.send_multipart([self.topic, self.seq.to_bytes(8, "big"), payload], copy=False)
        self.seq += 1

    def close(self) -> None:
        self.sock.disable_monitor()
        self.mon.close(linger=0)
        self.sock.close(linger=0)


_ctx: zmq.Context[Any] | None = None


def make_publishers(pods: int) -> list[BoundPublisher]:
    global _ctx
    if _ctx is None:
        # A context of its own: 3 sockets a pod (the PUB, its monitor and the monitor's inproc
        # peer), and a phase may hold two sets; libzmq's default of 1,023 fits ~300 pods, and
        # the shared instance kept that default whatever was set on it.
        _ctx = zmq.Context()
        _ctx.set(zmq.MAX_SOCKETS, 32768)
    ctx = _ctx
    return [BoundPublisher(ctx, f"kv@pod{i}@{MODEL}") for i in range(pods)]


def wait_all(pubs: list[BoundPublisher]) -> None:
    for p in pubs:
        if not p.wait_connected():
            raise RuntimeError(f"no subscriber connected to {p.endpoint}")
    time.sleep(0.3)  # the SUBSCRIBE message follows the handshake


def send_all(pubs: list[BoundPublisher], frames: list[Frame]) -> float:
    t0 = time.perf_counter()
    for pod, payload, _, _ in frames:
        pubs[pod].send(payload)
    return time.perf_counter() - t0


def close_all(pubs: list[BoundPublisher]) -> None:
    for p in pubs:
        p.close()


def expected_seqs(pubs: list[BoundPublisher]) -> dict[str, int]:
    """Per pod that sent anything: how many batches (what ``wait_applied`` waits for)."""
    return {f"pod{i}": p.seq for i, p in enumerate(pubs) if p.seq}
