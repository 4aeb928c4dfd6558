"""The fast path takes the first free port from ``serve.fast_port`` (one per replica)."""

from __future__ import annotations

import socket

from kvray.serve.fast import _bind


def test_bind_skips_taken_ports() -> None:
    first = _bind("127.0.0.1", 0)  # any free port, then ask for it again: it is taken
    port = first.getsockname()[1]
    try:
        second = _bind("127.0.0.1", port)
        try:
            assert second.getsockname()[1] > port
            assert second.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        finally:
            second.close()
    finally:
        first.close()
