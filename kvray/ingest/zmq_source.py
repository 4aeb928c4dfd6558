"""ZMQ SUB sockets for both topologies, and the DEALER side of vLLM's replay protocol.

* ``bind``: one SUB bound per endpoint; pods CONNECT to it (llm-d topology). ``tcp://host:0`` or
  ``tcp://host:*`` binds an OS-chosen port, reported by ``bound_endpoints`` (no guessed ports).
* ``connect``: one SUB connected to each pod that binds (vLLM's default ``tcp://*:5557``).

Every message is returned with the ``PodEndpoint`` it came from (for connected pods), so an empty
topic can be attributed to its configured pod id. ``zmq.ZMQError`` is mapped to ``ConfigError``
at setup (bad endpoint) and counted, never raised, while running.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from kvray.config import PodEndpoint
from kvray.core.fast import _impl
from kvray.core.topics import REPLAY_END_SEQ
from kvray.errors import ConfigError

log = logging.getLogger("kvray.ingestor")

_RCVHWM = 1_000_000  # messages buffered per socket while a shard recovers (default 1000 drops)


@dataclass(slots=True, frozen=True)
class Replayed:
    """One batch returned by a pod's replay socket."""

    topic: bytes
    seq: int
    payload: bytes


def _recv_message(sock: zmq.Socket[bytes]) -> list[bytes] | None:
    """One whole message if one is waiting, else None (pyzmq's calls: the path without the C
    extension).

    pyzmq's ``recv_multipart`` and ``getsockopt(EVENTS)`` each read socket options through an
    enum conversion (~2-5 us a call, three or four calls a message): on a busy stream that was
    most of a reader's receive cost. Frames received without copying say themselves whether
    more follow (``Frame.more``); one ``zmq.Again`` per socket and poll ends the read."""
    try:
        f = sock.recv(zmq.NOBLOCK, copy=False)
    except zmq.Again:
        return None
    frames = [f.bytes]
    while f.more:
        f = sock.recv(copy=False)
        frames.append(f.bytes)
    return frames


_ZMQ_FUNCS = (
    "zmq_msg_init", "zmq_msg_recv", "zmq_msg_data", "zmq_msg_size", "zmq_msg_more",
    "zmq_msg_close", "zmq_errno",
)  # fmt: skip


def _native_recv() -> Callable[[int, int], list[list[bytes]]] | None:
    """``kvray._speedups.recv_messages`` bound to the libzmq pyzmq loaded (its path from
    ``/proc/self/maps``; the functions' addresses through ctypes), or None: no extension, not
    Linux, or no libzmq found. About 3x cheaper a message than pyzmq's calls."""
    if _impl is None or not hasattr(_impl, "recv_messages"):
        return None
    try:
        with open("/proc/self/maps") as maps:
            path = next(
                (ln.split()[-1] for ln in maps if "libzmq" in ln and ln.split()[-1][:1] == "/"),
                None,
            )
        if path is None:
            return None
        lib = ctypes.CDLL(path)  # already loaded by pyzmq: the same copy
        _impl.zmq_api(*(ctypes.cast(getattr(lib, f), ctypes.c_void_p).value for f in _ZMQ_FUNCS))
    except (OSError, AttributeError, ValueError) as exc:
        log.info("libzmq's functions not found (%s): messages are read through pyzmq", exc)
        return None
    return _impl.recv_messages  # type: ignore[no-any-return]


_recv_messages = _native_recv()


class ZmqSource:
    """The sockets one ingestor reads."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]] | None = None) -> None:
        self._ctx = ctx or zmq.Context.instance()
        self._poller = zmq.Poller()
        self._origin: dict[zmq.Socket[bytes], PodEndpoint | None] = {}
        self._by_endpoint: dict[str, zmq.Socket[bytes]] = {}
        self.bound_endpoints: list[str] = []

    def _sub(self) -> zmq.Socket[bytes]:
        s = self._ctx.socket(zmq.SUB)
        s.setsockopt(zmq.SUBSCRIBE, b"")
        s.setsockopt(zmq.RCVHWM, _RCVHWM)
        s.setsockopt(zmq.LINGER, 0)
        return s

    def bind(self, endpoint: str) -> str:
        """Bind a SUB socket; returns the endpoint actually bound (port resolved)."""
        s = self._sub()
        try:
            s.bind(endpoint.replace(":0", ":*") if endpoint.endswith(":0") else endpoint)
        except zmq.ZMQError as exc:
            s.close()
            raise ConfigError(f"cannot bind event endpoint {endpoint!r}: {exc}") from exc
        resolved = s.getsockopt_string(zmq.LAST_ENDPOINT)
        self._poller.register(s, zmq.POLLIN)
        self._origin[s] = None
        self._by_endpoint[resolved] = s
        self.bound_endpoints.append(resolved)
        return resolved

    def connect(self, pod: PodEndpoint) -> None:
        """Subscribe to a pod that binds its PUB socket (idempotent per endpoint)."""
        if pod.endpoint in self._by_endpoint:
            return
        s = self._sub()
        try:
            s.connect(pod.endpoint)
        except zmq.ZMQError as exc:
            s.close()
            raise ConfigError(f"cannot connect to pod endpoint {pod.endpoint!r}: {exc}") from exc
        self._poller.register(s, zmq.POLLIN)
        self._origin[s] = pod
        self._by_endpoint[pod.endpoint] = s

    def disconnect(self, endpoint: str) -> bool:
        """Stop reading a connected pod; returns whether it was connected."""
        s = self._by_endpoint.pop(endpoint, None)
        if s is None:
            return False
        self._poller.unregister(s)
        self._origin.pop(s, None)
        s.close(linger=0)
        return True

    def poll(
        self, timeout_ms: int, max_messages: int = 4096
    ) -> list[tuple[list[bytes], PodEndpoint | None]]:
        """Messages ready within ``timeout_ms`` (at most ``max_messages``), in arrival order
        per socket."""
        out: list[tuple[list[bytes], PodEndpoint | None]] = []
        if not self._origin:  # zmq returns at once with nothing to poll: don't spin
            time.sleep(timeout_ms / 1000)
            return out
        ready = dict(self._poller.poll(timeout_ms))
        recv = _recv_messages
        for sock in ready:
            origin = self._origin.get(sock)  # type: ignore[call-overload]
            if recv is not None:
                try:
                    out.extend(
                        (frames, origin)
                        for frames in recv(sock.underlying, max_messages - len(out))
                    )  # type: ignore[union-attr]
                except OSError as exc:
                    raise zmq.ZMQError(exc.errno) from exc
                continue
            while len(out) < max_messages:
                frames = _recv_message(sock)  # type: ignore[arg-type]
                if frames is None:
                    break
                out.append((frames, origin))
        return out

    def close(self) -> None:
        """Close every socket (idempotent)."""
        for s in list(self._origin):
            s.close(linger=0)
        self._origin.clear()
        self._by_endpoint.clear()


def request_replay(
    endpoint: str,
    start_seq: int,
    *,
    timeout_s: float = 1.0,
    ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
) -> tuple[list[Replayed], bool]:
    """Ask a pod's replay ROUTER for every buffered batch with seq ≥ ``start_seq``.

    Uses a DEALER (a REQ would only get the first reply). Returns the batches in the order the
    pod sent them and whether the end marker arrived before the timeout.
    """
    ctx = ctx or zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    out: list[Replayed] = []
    try:
        s.connect(endpoint)
        s.send_multipart([b"", start_seq.to_bytes(8, "big")])
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not s.poll(int(left * 1000) + 1):
                return out, False
            frames = s.recv_multipart()
            if len(frames) != 4:
                continue  # not a replay reply: ignore it
            _, topic, seq_b, payload = frames
            if seq_b == REPLAY_END_SEQ:
                return out, True
            if len(seq_b) == 8:
                out.append(Replayed(topic, int.from_bytes(seq_b, "big"), payload))
    except zmq.ZMQError:
        return out, False
    finally:
        s.close(linger=0)
