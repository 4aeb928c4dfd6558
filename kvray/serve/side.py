"""An opt-in second listener for an ingress replica (``serve.side_port``, off by default).

It serves the very same handler (``Ingress.__call__``: same routes, schemas, token, limits,
metrics) on a uvicorn server of its own, in a daemon thread of the replica, so a request skips
Serve's own per-request work. Measured here (``benchmarks/results/dynamo.md``): a no-op Serve
deployment with direct ingress already costs 0.8 ms for a 128-block body, 2.7× NVIDIA Dynamo's
whole query at 16 pods; a raw listener answers the same query in ~0.3 ms. The price: Serve does
not see these requests (no ``max_ongoing_requests``, no autoscaling signal, no Serve request
metrics), and clients must find a port per replica (``Ingress.side_url``). Use it where
per-query latency at small fleets matters more than those.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from starlette.requests import Request

log = logging.getLogger("kvray.serve.side")

_PORT_SPAN = 64


class _Asgi:
    """ASGI → ``handler(Request) -> Response``."""

    def __init__(self, handler: Any) -> None:
        self.handler = handler

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; websockets are not served
        response = await self.handler(Request(scope, receive))
        await response(scope, receive, send)


def _bind(host: str, first_port: int) -> socket.socket:
    """A listening socket on the first free port from ``first_port`` (0: any free port)."""
    last: OSError | None = None
    ports = [0] if first_port == 0 else range(first_port, first_port + _PORT_SPAN)
    for port in ports:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        try:
            sock.bind((host, port))
            sock.listen(1024)
            sock.set_inheritable(True)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    raise OSError(f"no free port in {first_port}..{first_port + _PORT_SPAN - 1}: {last}")


def start_side_listener(handler: Any, host: str, first_port: int) -> int:
    """Serve ``handler`` on a daemon thread with its own event loop; returns the port."""
    import uvicorn

    sock = _bind(host, first_port)
    config = uvicorn.Config(
        _Asgi(handler),
        lifespan="off",
        log_level="warning",
        access_log=False,
        http="httptools",
        loop="auto",
        timeout_keep_alive=75,
    )
    server = uvicorn.Server(config)
    started = threading.Event()

    def run() -> None:
        started.set()
        try:
            server.run(sockets=[sock])  # not the main thread: uvicorn installs no signal handlers
        except Exception:
            log.exception("side listener stopped")

    threading.Thread(target=run, name="kvray-side-http", daemon=True).start()
    started.wait(10)
    port: int = sock.getsockname()[1]
    return port
