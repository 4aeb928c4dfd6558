"""``ChangePublisher``: a shard's end of the change stream.

After each actor call the shard hands the ops its ``Journal`` recorded (plus the positions and
pool gauges the call advanced) to ``publish``, which sends them as one seq-numbered
``ChangeMsg`` on a ZMQ PUB socket bound on the shard's node. When idle, a heartbeat thread
repeats the last seq every ``heartbeat_s`` (so a replica notices a lost message, or a dead
shard), and pokes the shard actor's ``tick`` about once a second (housekeeping in the actor's
own thread even with no calls).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from kvray.changes.journal import ChangeMsg, Op, change_encoder

_TICK_S = 1.0  # how often the shard's ``tick`` is sent while it lives


class ChangePublisher:
    """One shard's seq-numbered change stream.

    Args:
        shard_id: the publishing shard.
        stream: the stream id (the shard's incarnation; set ``stream`` when it changes).
        host: where to bind; None: do not publish (``publish`` then returns 0).
        heartbeat_s: idle heartbeat period.
    """

    def __init__(self, shard_id: int, stream: str, host: str | None, heartbeat_s: float) -> None:
        self.shard_id = shard_id
        self.stream = stream
        self.seq = 0
        self.bytes_sent = 0
        """Bytes of change messages sent (heartbeats included): the stream's bandwidth."""
        self.endpoint: str | None = None
        self._heartbeat_s = heartbeat_s
        self._sock: Any = None
        self._last = 0.0
        self._lock = threading.Lock()  # the heartbeat thread publishes too
        if host is None:
            return
        import zmq

        self._sock = zmq.Context.instance().socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 100_000)
        port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.endpoint = f"tcp://{host}:{port}"

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def publish(
        self, ops: list[Op], advanced: dict[str, int], pools: dict[str, tuple[int, int]]
    ) -> int:
        """Send what one call changed (nothing when it changed nothing); returns the seq
        holding it (0 when not publishing)."""
        if self._sock is None:
            return 0
        with self._lock:
            if not ops and not advanced and not pools:
                return self.seq
            self.seq += 1
            self._send(
                ChangeMsg(self.shard_id, self.stream, self.seq, ops, advanced, time.time(), pools)
            )
            return self.seq

    def _send(self, msg: ChangeMsg) -> None:
        """Publish one message (caller holds ``_lock``)."""
        data = change_encoder.encode(msg)
        self.bytes_sent += len(data)
        # copy=True: a zero-copy send (pyzmq does one above 64 KiB) hands the buffer to
        # pyzmq's garbage-collector thread, which takes the GIL to release it: 5.6 % of the
        # shards' busy samples at 16 pods (py-spy), against a memcpy of the message.
        self._sock.send(data, copy=True)
        self._last = time.monotonic()

    def start_heartbeat(self, poke: Callable[[], Any] | None) -> None:
        """Start the heartbeat thread; ``poke()`` (the actor's ``tick``, see
        ``actor_poke``) is called about once a second."""
        if self._sock is not None:
            threading.Thread(
                target=self._heartbeat_loop, args=(poke,), name="kvray-heartbeat", daemon=True
            ).start()

    def _heartbeat_loop(self, poke: Callable[[], Any] | None) -> None:
        every = self._heartbeat_s
        next_tick = time.monotonic() + _TICK_S
        while True:
            time.sleep(every)
            with self._lock:
                if time.monotonic() - self._last >= every:
                    self._send(ChangeMsg(self.shard_id, self.stream, self.seq, [], {}))
            if poke is None or time.monotonic() < next_tick:
                continue
            next_tick = time.monotonic() + _TICK_S
            try:
                poke()
            except Exception:  # not an actor, or it is shutting down: heartbeats only
                poke = None


def actor_poke(method: str) -> Callable[[], None]:
    """A poke that calls ``method`` on the current Ray actor (looked up on first use, from the
    heartbeat thread), one call in flight at most; outside an actor (unit tests drive
    ``tick`` themselves) the first call raises, which ends the pokes."""
    state: list[Any] = []  # [actor handle, pending ref or None]

    def poke() -> None:
        import ray

        if not state:
            me = ray.get_runtime_context().current_actor  # raises outside an actor
            state[:] = [me, None]
        me, pending = state
        if pending is not None:
            done, _ = ray.wait([pending], timeout=0)
            if not done:
                return
        state[1] = getattr(me, method).remote()

    return poke
