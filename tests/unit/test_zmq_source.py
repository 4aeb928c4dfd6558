"""ZmqSource: with nothing to read it waits instead of spinning (zmq's poll returns at once);
its C receive path reads what pyzmq reads."""

from __future__ import annotations

import time

import pytest
import zmq

from kvray.ingest import zmq_source
from kvray.ingest.zmq_source import ZmqSource


def test_poll_without_sockets_waits_for_its_timeout() -> None:
    src = ZmqSource()
    t0 = time.process_time()
    w0 = time.monotonic()
    n = 0
    while time.monotonic() - w0 < 0.2:
        assert src.poll(10) == []
        n += 1
    # 10 ms per call: ~20 calls in 0.2 s, not the tens of thousands a busy loop makes.
    assert n <= 25
    assert time.process_time() - t0 < 0.1
    src.close()


def _sub_pub() -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://127.0.0.1:{port}")
    return sub, pub


def _wait_sync(sub: zmq.Socket[bytes], pub: zmq.Socket[bytes]) -> None:
    """Until the subscription is in place (a PUB drops what it sends before)."""
    for _ in range(200):
        pub.send(b"sync")
        if sub.poll(20):
            while sub.poll(50):
                sub.recv_multipart()
            return
    raise AssertionError("the subscription never came up")


@pytest.mark.skipif(zmq_source._recv_messages is None, reason="no C extension or libzmq")
def test_native_receive_reads_what_pyzmq_reads() -> None:
    """``recv_messages`` (libzmq's calls from C) against pyzmq's frame-by-frame receive."""
    sent = [
        [b"kv@p@m", (7).to_bytes(8, "big"), b"\x93" + bytes(range(256)) * 40],
        [b"", b"", b""],
        [b"only"],
        [b"a", b"b", b"c", b"d", b"e"],
    ] * 5
    got: dict[str, list[list[bytes]]] = {}
    for way in ("native", "pyzmq"):
        sub, pub = _sub_pub()
        _wait_sync(sub, pub)
        for msg in sent:
            pub.send_multipart(msg)
        assert sub.poll(2000)
        time.sleep(0.2)  # all of them queued
        out: list[list[bytes]] = []
        if way == "native":
            assert zmq_source._recv_messages is not None
            out += zmq_source._recv_messages(sub.underlying, 7)  # at most 7
            assert len(out) == 7
            out += zmq_source._recv_messages(sub.underlying, 1000)
            assert zmq_source._recv_messages(sub.underlying, 1000) == []  # nothing waits
        else:
            while (frames := zmq_source._recv_message(sub)) is not None:
                out.append(frames)
        got[way] = out
        sub.close()
        pub.close()
    assert got["native"] == got["pyzmq"] == sent


@pytest.mark.skipif(zmq_source._recv_messages is None, reason="no C extension or libzmq")
def test_native_receive_raises_what_libzmq_says() -> None:
    pub = zmq.Context.instance().socket(zmq.PUB)  # cannot receive: ENOTSUP
    try:
        assert zmq_source._recv_messages is not None
        with pytest.raises(OSError):
            zmq_source._recv_messages(pub.underlying, 10)
    finally:
        pub.close(linger=0)
