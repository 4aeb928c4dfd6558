"""ZmqSource with nothing to read waits instead of spinning (zmq's poll returns at once)."""

from __future__ import annotations

import time

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
