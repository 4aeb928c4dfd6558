"""A KV-event publisher that behaves like vLLM's ``ZmqEventPublisher`` on the wire.

* PUB socket: BINDS when the endpoint contains ``*`` or ``::`` or is ``ipc://``/``inproc://``,
  otherwise CONNECTS (the subscriber binds) — vLLM's rule. ``tcp://127.0.0.1:0`` binds too here,
  so tests get an OS-chosen port (reported by ``endpoint``) instead of guessing free ports.
* Messages are ``[topic, seq (8 bytes BE, from 0 per publisher), msgpack batch]``.
* Replay: a ROUTER socket answers ``[b"", start_seq]`` with ``["", topic, seq, payload]`` for every
  buffered batch with seq ≥ start_seq, then ``["", "", 0xff×8, ""]``. The buffer is bounded
  (``buffer_steps``, vLLM default 10 000).

The replay socket is served by a daemon thread; ``close()`` stops it (idempotent).
"""

from __future__ import annotations

import threading
import time
from collections import deque

import zmq

from kvray.core.events import WireEvent, encode_batch
from kvray.core.topics import REPLAY_END_SEQ

_POLL_MS = 50  # replay thread wake-up period; bounds close() latency


def _binds(endpoint: str) -> bool:
    return (
        "*" in endpoint
        or "::" in endpoint
        or endpoint.startswith(("ipc://", "inproc://"))
        or endpoint.endswith(":0")
    )


class SimPublisher:
    """Publishes event batches like one vLLM engine process.

    Args:
        endpoint: PUB endpoint (bind or connect, see the module docstring).
        topic: frame 0 (``kv@<pod>@<model>``; may be empty).
        replay_endpoint: ROUTER endpoint to bind, or None for no replay.
        buffer_steps: batches kept for replay.
        data_parallel_rank: written into every batch.
        legacy: encode events as vLLM ≤ 0.23 positional arrays.
        ctx: ZMQ context (default: the process's shared instance).
    """

    def __init__(
        self,
        endpoint: str,
        topic: str,
        *,
        replay_endpoint: str | None = None,
        buffer_steps: int = 10_000,
        data_parallel_rank: int | None = 0,
        legacy: bool = False,
        ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        self._ctx = ctx or zmq.Context.instance()
        self.topic = topic.encode("utf-8")
        self.dp_rank = data_parallel_rank
        self.legacy = legacy
        self.seq = 0
        self.drop_next = 0  # test hook for the fleet: skip sending (not buffering) n batches
        # XPUB, not PUB: the same wire protocol for subscribers, and it hands over each
        # subscription message, so ``wait_connected`` knows when a subscriber will receive.
        self._pub = self._ctx.socket(zmq.XPUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.XPUB_VERBOSE, 1)  # every peer's subscription, not the first
        self._peers = 0
        self._pub.setsockopt(zmq.SNDHWM, 100_000)
        if _binds(endpoint):
            self._pub.bind(
                endpoint.replace("*", "127.0.0.1") if endpoint.startswith("tcp://*") else endpoint
            )
            self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            self._pub.connect(endpoint)
            self.endpoint = endpoint
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.replay_endpoint: str | None = None
        self._thread: threading.Thread | None = None
        if replay_endpoint is not None:
            router = self._ctx.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            router.bind(replay_endpoint)
            self.replay_endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
            self._thread = threading.Thread(
                target=self._serve_replay, args=(router,), name="sim-replay", daemon=True
            )
            self._thread.start()

    def wait_connected(self, peers: int = 1, timeout_s: float = 10.0) -> bool:
        """Block until ``peers`` subscriptions arrived (or the timeout).

        A publisher drops what it sends before a subscriber's subscription reached it (ZMQ's
        "slow joiner"; a loopback handshake can take ~0.5 s on a loaded machine), so tests
        and the simulator wait for the subscription itself rather than a guessed time.
        """
        deadline = time.monotonic() + timeout_s
        while self._peers < peers:
            left = deadline - time.monotonic()
            if left <= 0 or not self._pub.poll(int(left * 1000) + 1):
                return False
            msg = self._pub.recv()
            if msg[:1] == b"\x01":  # subscribe (b"\x00": unsubscribe)
                self._peers += 1
        return True

    def publish(self, events: list[WireEvent], ts: float | None = None) -> int:
        """Send one batch; returns its seq."""
        payload = encode_batch(
            events,
            ts=time.time() if ts is None else ts,
            data_parallel_rank=self.dp_rank,
            legacy=self.legacy,
        )
        with self._lock:
            seq = self.seq
            self.seq += 1
            self._buffer.append((seq, payload))
        if self.drop_next > 0:
            self.drop_next -= 1  # lost on the wire, still in the replay buffer (like a HWM drop)
            return seq
        self._pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload], copy=False)
        return seq

    def history(self) -> list[list[bytes]]:
        """Every buffered message as the 3 frames sent (or dropped), oldest first."""
        with self._lock:
            return [[self.topic, s.to_bytes(8, "big"), p] for s, p in self._buffer]

    def _serve_replay(self, router: zmq.Socket[bytes]) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(_POLL_MS):
                    continue
                frames = router.recv_multipart()
                if len(frames) != 3 or len(frames[2]) != 8:
                    continue  # [identity, b"", start_seq] expected; ignore anything else
                ident, start = frames[0], int.from_bytes(frames[2], "big")
                with self._lock:
                    batch = [(s, p) for s, p in self._buffer if s >= start]
                for s, p in batch:
                    router.send_multipart([ident, b"", self.topic, s.to_bytes(8, "big"), p])
                router.send_multipart([ident, b"", b"", REPLAY_END_SEQ, b""])
        finally:
            router.close(linger=0)

    def close(self) -> None:
        """Stop the replay thread and close the sockets (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self._pub.close(linger=0)
