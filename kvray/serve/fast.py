"""The fast HTTP path: a lean listener inside every Serve replica, next to Serve's own.

Measured on a 2-core machine (``benchmarks/results/dynamo.md``): Serve's HTTP handling alone,
even with direct ingress, costs ~0.9 ms per request (``/healthz``), and FastAPI's JSON +
pydantic parsing of a 16k-token body another ~0.9 ms, while Dynamo's whole 128-block query takes
~0.2 ms. So each replica also serves the same routes on its own uvicorn server (httptools,
uvloop when installed) with a raw ASGI app that decodes bodies with msgspec Structs
(``schemas.*Body``) and calls the very same ``_Ingress`` methods: same answers, same errors
(4xx with ``{"detail": ...}``), same bearer token and body limit. Serve still owns the replica:
placement, restarts, scaling, health checks, deployment handles and the FastAPI endpoint (with
``/docs``).

Ports: the listener takes the first free port from ``serve.fast_port`` up (one per replica, like
direct ingress); ``/healthz`` names the app and namespace so clients can find theirs.
"""

from __future__ import annotations

import hmac
import logging
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from kvray.errors import BadRequest, KvrayError
from kvray.metrics import CONTENT_TYPE
from kvray.serve.errors import error_response, oversized
from kvray.serve.schemas import RouteBody, ScoreChatBody, ScoreCompletionsBody, ScoreTokensBody

log = logging.getLogger("kvray.serve.fast")

_JSON = [(b"content-type", b"application/json")]
_encode = msgspec.json.Encoder().encode
_PORT_SPAN = 64

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


class _HTTPError(Exception):
    def __init__(self, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or []


class FastApp:
    """The raw ASGI app. ``ingress`` is the replica's ``_Ingress`` (its methods do the work)."""

    def __init__(self, ingress: Any, openapi: dict[str, Any]) -> None:
        self.ingress = ingress
        self.cfg = ingress.cfg
        self._openapi = _encode(openapi)
        token = self.cfg.auth_token
        self._auth = f"Bearer {token}".encode() if token else None
        self._decoders: dict[str, msgspec.json.Decoder[Any]] = {
            "/score_tokens": msgspec.json.Decoder(ScoreTokensBody),
            "/score_completions": msgspec.json.Decoder(ScoreCompletionsBody),
            "/score_chat_completions": msgspec.json.Decoder(ScoreChatBody),
            "/route": msgspec.json.Decoder(RouteBody),
        }
        self._post: dict[str, Callable[[Any], Awaitable[Any]]] = {
            "/score_tokens": ingress.score_tokens,
            "/score_completions": ingress.score_completions,
            "/score_chat_completions": ingress.score_chat,
            "/route": ingress.route,
        }
        self._get = {"/healthz", "/pods", "/metrics", "/openapi.json"}

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; websockets are not served
        try:
            status, body, headers = await self._handle(scope, receive)
        except _HTTPError as exc:
            status, body, headers = exc.status, _encode({"detail": exc.detail}), [*_JSON]
            headers += exc.headers
        except KvrayError as exc:
            status, detail = error_response(exc)
            body, headers = _encode({"detail": detail}), _JSON
        except Exception:
            log.exception("fast path: %s %s failed", scope.get("method"), scope.get("path"))
            status, body, headers = 500, _encode({"detail": "internal error"}), _JSON
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _handle(
        self, scope: dict[str, Any], receive: Receive
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        path: str = scope["path"]
        method: str = scope["method"]
        if path in self._post:
            if method != "POST":
                raise _HTTPError(405, "Method Not Allowed")
            self._check_auth(scope)
            raw = await self._body(scope, receive)
            try:
                req = self._decoders[path].decode(raw)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                raise _HTTPError(422, f"invalid request body: {exc}") from None
            resp = await self._post[path](req)
            return 200, _encode(resp.model_dump()), _JSON
        if path in self._get:
            if method not in ("GET", "HEAD"):
                raise _HTTPError(405, "Method Not Allowed")
            if path == "/healthz":
                ns = self.ingress.client.namespace
                return 200, _encode({"status": "ok", "app": "kvray", "namespace": ns}), _JSON
            if path == "/openapi.json":
                return 200, self._openapi, _JSON
            self._check_auth(scope)
            if path == "/pods":
                return 200, _encode((await self.ingress.pods()).model_dump()), _JSON
            text: bytes = await self.ingress.metrics()
            return 200, text, [(b"content-type", CONTENT_TYPE.encode())]
        raise _HTTPError(404, "Not Found")

    def _check_auth(self, scope: dict[str, Any]) -> None:
        if self._auth is None:
            return
        got = b""
        for k, v in scope["headers"]:
            if k == b"authorization":
                got = v
                break
        if not hmac.compare_digest(got, self._auth):
            raise _HTTPError(
                401, "missing or wrong bearer token", [(b"www-authenticate", b"Bearer")]
            )

    async def _body(self, scope: dict[str, Any], receive: Receive) -> bytes:
        limit = self.cfg.max_body_bytes
        for k, v in scope["headers"]:
            if k == b"content-length" and (why := oversized(v.decode("latin-1"), limit)):
                raise _HTTPError(413, why)
        parts: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise BadRequest("client disconnected")
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _HTTPError(413, f"body exceeds {limit} bytes")
            parts.append(chunk)
            if not msg.get("more_body"):
                return parts[0] if len(parts) == 1 else b"".join(parts)


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


def start_fast_http(ingress: Any, openapi: dict[str, Any]) -> int:
    """Serve ``FastApp`` on a daemon thread (its own event loop); returns the port."""
    import uvicorn

    cfg = ingress.cfg
    sock = _bind(cfg.host, cfg.fast_port)
    config = uvicorn.Config(
        FastApp(ingress, openapi),
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
            log.exception("fast HTTP listener stopped")
        finally:
            started.set()

    threading.Thread(target=run, name="kvray-fast-http", daemon=True).start()
    started.wait(10)
    port: int = sock.getsockname()[1]
    return port
