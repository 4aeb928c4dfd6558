"""kvray's one HTTP door: the Serve deployment's own ``__call__``, msgspec in and out.

Routes: ``POST /score_completions``, ``POST /score_chat_completions``, ``POST /score_tokens``,
``POST /route``; ``GET /pods``, ``POST /pods`` (register a pod), ``DELETE /pods/{pod}``
(forget one); ``/healthz``, ``/metrics``, ``/openapi.json``, ``/docs``.
With direct ingress (``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``) each replica serves HTTP itself
(ports 30000+), so a request costs Serve's ASGI hop plus this handler: the body is read once,
decoded and validated by a cached ``msgspec.json.Decoder`` of the route's Struct
(``kvray.serve.schemas``), and the answer encoded by a cached ``msgspec.json.Encoder``. No
FastAPI, no pydantic on the request path; the OpenAPI document is built from the same Structs.

A bearer token (``serve.auth_token``), when set, guards every route but ``/healthz`` (401 with
``WWW-Authenticate: Bearer``). Bodies above ``serve.max_body_bytes`` get 413 (by their
``Content-Length`` before reading, else while reading). Errors are ``{"detail": ...}``: a body
that is not JSON or does not match the schema is a 422 naming the field; ``BadRequest`` (e.g.
an unknown model's tokenizer), ``ConfigError`` and ``MalformedFrame`` are 400; an unreachable
backend is 503. Bad input never gets a 5xx.

Python callers inside Ray use the deployment handle with JSON-shaped dicts, one method per route:
``serve.get_app_handle("kvray").score_chat_dict.remote({...}).result()``.

This class carries no Serve decorator: ``kvray.serve.app`` wraps it
(``serve.deployment(...)(Ingress)``), and tests may build it around a fake client.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from kvray._env import freeze_heap
from kvray.config import ServeConfig
from kvray.errors import BadRequest
from kvray.metrics import CONTENT_TYPE, ServeMetrics, render
from kvray.serve import schemas as s
from kvray.serve.errors import exception_response, oversized

if TYPE_CHECKING:
    from kvray.client import Client

log = logging.getLogger("kvray.serve")

APP_NAME = "kvray"
JSON = "application/json"
VERSION = "0.1.0"
MAX_DEPTH = 64
"""Deepest nesting of chat messages, tools and template kwargs (they travel to a tokenizer actor
and its template; far deeper input would exhaust the recursion limit there: a 400 here)."""
_Req = TypeVar("_Req", bound=msgspec.Struct)


class _HTTPError(Exception):
    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers


class Ingress:
    """The HTTP (and deployment-handle) front of a kvray deployment in Ray namespace
    ``namespace``; ``serve_config`` is a ``ServeConfig`` as a dict.

    With ``config_fingerprint`` the replica first waits until the deployment in ``namespace``
    runs that configuration (``kvray.serve.app.wait_for_runtime``); ``runtime`` is the handle
    of the application's ``KvrayRuntime`` deployment (kept so the application owns it).
    ``client`` is for tests: a ready client (or a stand-in) instead of connecting.
    """

    def __init__(
        self,
        namespace: str,
        serve_config: dict[str, Any],
        config_fingerprint: str | None = None,
        runtime: Any = None,
        *,
        client: Client | None = None,
    ) -> None:
        self.cfg = ServeConfig.model_validate(serve_config)
        self.namespace = namespace
        self.runtime = runtime
        connect = client is None
        if config_fingerprint is not None:
            from kvray.serve.app import wait_for_runtime

            wait_for_runtime(namespace, config_fingerprint)
        if client is None:  # a Serve replica: a process of kvray's own
            from kvray._proc import pin_malloc_thresholds
            from kvray.client import connect_when_ready

            pin_malloc_thresholds()  # the change stream's bursts go back to the OS

            client = connect_when_ready(namespace)
        self.client: Client = client
        self.metrics = ServeMetrics(_replica_id())
        self._encode = msgspec.json.Encoder().encode
        token = self.cfg.auth_token
        self._token = f"Bearer {token}".encode() if token else None
        dec = msgspec.json.Decoder
        self._post: dict[str, tuple[msgspec.json.Decoder[Any], Callable[[Any], Awaitable[Any]]]]
        self._add_pod = dec(s.AddPod)
        self._post = {
            "/score_completions": (dec(s.ScoreCompletions), self.score_completions),
            "/score_chat_completions": (dec(s.ScoreChat), self.score_chat),
            "/score_tokens": (dec(s.ScoreTokens), self.score_tokens),
            "/route": (dec(s.Route), self.route),
        }
        self._get: dict[str, Callable[[], Awaitable[Response]]] = {
            "/healthz": self._healthz,
            "/pods": self._pods,
            "/metrics": self._metrics,
            "/openapi.json": self._openapi,
            "/docs": self._docs,
        }
        health = s.HealthResponse(status="ok", app=APP_NAME, namespace=namespace)
        self._health_body = self._encode(health)
        self._openapi_body = self._encode(self.openapi())
        self._docs_body = _docs_html(self.openapi()).encode()
        self.side_port: int | None = None
        if self.cfg.side_port is not None:  # opt-in: kvray.serve.side
            from kvray.serve.side import start_side_listener

            try:
                self.side_port = start_side_listener(self, self.cfg.host, self.cfg.side_port)
            except OSError as exc:  # no free port: Serve's door only
                log.warning("side listener off: %s", exc)
        if connect:
            freeze_heap()  # the replica's change-stream thread allocates fast (see freeze_heap)

    def side_url(self) -> str | None:
        """This replica's opt-in side listener (``serve.side_port``), None when off."""
        if self.side_port is None:
            return None
        host = self.cfg.host
        if host in ("0.0.0.0", "::"):
            import ray

            host = ray.util.get_node_ip_address()
        return f"http://{host}:{self.side_port}"

    # --- HTTP ---------------------------------------------------------------------------------

    async def __call__(self, request: Request) -> Response:
        """Answer one HTTP request (Serve calls this for every path under the route prefix)."""
        t0 = time.perf_counter()
        scope = request.scope
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        if root and path.startswith(root):  # uvicorn puts the root path in "path" too
            path = path[len(root) :] or "/"
        try:
            resp = await self._dispatch(request, scope, path)
        except Exception as exc:
            resp = self._error(exc, scope, path)
        known = path in self._post or path in self._get  # unknown paths share one label
        self.metrics.observe(path if known else "other", time.perf_counter() - t0, resp.status_code)
        return resp

    async def _dispatch(
        self, request: Request, scope: MutableMapping[str, Any], path: str
    ) -> Response:
        method = scope["method"]
        if path == "/pods" and method == "POST":
            raw = await self._body(request, self._admit(scope))
            return Response(self._encode(await self.add_pod(_decode(self._add_pod, raw))),
                            media_type=JSON)  # fmt: skip
        if path.startswith("/pods/"):
            if method != "DELETE":
                raise _HTTPError(405, "Method Not Allowed", {"Allow": "DELETE"})
            self._admit(scope)
            pod = urllib.parse.unquote(path[len("/pods/") :])
            return Response(self._encode(await self.remove_pod(pod)), media_type=JSON)
        post = self._post.get(path)
        if post is not None:
            if scope["method"] != "POST":
                raise _HTTPError(405, "Method Not Allowed", {"Allow": "POST"})
            length = self._admit(scope)
            raw = await self._body(request, length)
            decoder, handler = post
            return Response(self._encode(await handler(_decode(decoder, raw))), media_type=JSON)
        get = self._get.get(path)
        if get is None:
            raise _HTTPError(404, "Not Found")
        if scope["method"] not in ("GET", "HEAD"):
            allow = "GET, HEAD, POST" if path == "/pods" else "GET, HEAD"
            raise _HTTPError(405, "Method Not Allowed", {"Allow": allow})
        if path != "/healthz":
            self._admit(scope)
        return await get()

    def _admit(self, scope: MutableMapping[str, Any]) -> bytes | None:
        """Check the bearer token; returns the ``Content-Length`` header (None: absent)."""
        auth = length = None
        for k, v in scope["headers"]:
            if k == b"authorization":
                auth = v
            elif k == b"content-length":
                length = v
        if self._token is not None and not hmac.compare_digest(auth or b"", self._token):
            raise _HTTPError(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
        return length

    async def _body(self, request: Request, length: bytes | None) -> bytes:
        limit = self.cfg.max_body_bytes
        if length is not None:
            why = oversized(length.decode("latin-1"), limit)
            if why is not None:
                raise _HTTPError(413, why)
            body = await request.body()
        else:  # chunked: stop reading at the limit
            parts: list[bytes] = []
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _HTTPError(413, f"body exceeds {limit} bytes")
                parts.append(chunk)
            body = b"".join(parts)
        if len(body) > limit:
            raise _HTTPError(413, f"body of {len(body)} bytes exceeds {limit}")
        return body

    def _error(self, exc: Exception, scope: MutableMapping[str, Any], path: str) -> Response:
        headers = None
        if isinstance(exc, _HTTPError):
            status, detail, headers = exc.status, exc.detail, exc.headers
        else:
            mapped = exception_response(exc)
            if mapped is None:
                log.error("%s %s failed", scope.get("method"), path[:200], exc_info=exc)
                mapped = 500, "internal error"
            status, detail = mapped
        body = self._encode(s.ErrorResponse(detail=detail))
        return Response(body, status_code=status, headers=headers, media_type=JSON)

    async def _healthz(self) -> Response:
        return Response(self._health_body, media_type=JSON)

    async def _pods(self) -> Response:
        return Response(self._encode(await self.pods()), media_type=JSON)

    async def _metrics(self) -> Response:
        if self.client.replica is not None:
            self.metrics.index = self.client.replica.stats()
        text = render(await self.client.stats_async(), self.metrics)
        return Response(text, media_type=CONTENT_TYPE)

    async def _openapi(self) -> Response:
        return Response(self._openapi_body, media_type=JSON)

    async def _docs(self) -> Response:
        return Response(self._docs_body, media_type="text/html; charset=utf-8")

    # --- the routes' work (Structs in, Structs out) -------------------------------------------

    async def score_tokens(self, req: s.ScoreTokens) -> s.ScoreResponse:
        self._check_pods(req.pods)  # token ids are range-checked by the schema (TokenId)
        return await self._score(req.model, req.token_ids, req.pods, req.lora, req.cache_salt)

    async def score_completions(self, req: s.ScoreCompletions) -> s.ScoreResponse:
        self._check_pods(req.pods)
        if req.suffix is not None:
            raise BadRequest("suffix (fill-in-the-middle) is not supported: it changes the prompt")
        if req.prompt_embeds is not None:
            raise BadRequest("prompt_embeds is not supported: kvray scores token ids")
        tokens: Sequence[int]
        if isinstance(req.prompt, str):
            self._check_prompt(req.prompt)
            tokens = await self._tokenize(req.prompt, req.model, req.add_special_tokens)
        else:
            tokens = req.prompt
        tokens = _truncate(tokens, req.truncate_prompt_tokens, req.truncation_side)
        return await self._score(req.model, tokens, req.pods, req.lora, req.cache_salt)

    async def score_chat(self, req: s.ScoreChat) -> s.ScoreResponse:
        self._check_pods(req.pods)
        self._check_messages(req.messages)
        if req.continue_final_message:
            raise BadRequest("continue_final_message=true is not supported (the chat is scored "
                             "as rendered without it)")  # fmt: skip
        if req.add_special_tokens:
            raise BadRequest("add_special_tokens=true is not supported for chats")
        if req.chat_template is not None:
            raise BadRequest("chat_template is not supported: kvray renders the model's own")
        if req.documents is not None:
            raise BadRequest("documents is not supported: kvray cannot render them")
        _check_depth(req.messages, "messages")
        _check_depth(req.tools, "tools")
        _check_depth(req.chat_template_kwargs, "chat_template_kwargs")
        kwargs = req.chat_template_kwargs
        if req.reasoning_effort is not None:  # as vLLM: a template variable, + enable_thinking
            given = kwargs or {}
            kwargs = {**given, "reasoning_effort": req.reasoning_effort}
            if "enable_thinking" not in given:
                kwargs["enable_thinking"] = req.reasoning_effort != "none"
        tokens: Sequence[int] = await self.client.tokenize_chat_async(
            req.messages,
            req.model,
            tools=req.tools,
            add_generation_prompt=req.add_generation_prompt,
            chat_template_kwargs=kwargs,
        )
        tokens = _truncate(tokens, req.truncate_prompt_tokens, req.truncation_side)
        return await self._score(req.model, tokens, req.pods, req.lora, req.cache_salt)

    async def route(self, req: s.Route) -> s.RouteResponse:
        self._check_pods(req.pods)
        given = [x is not None for x in (req.prompt, req.token_ids, req.messages)]
        if sum(given) != 1:
            raise BadRequest("give exactly one of prompt, token_ids or messages")
        if req.prompt is not None:
            self._check_prompt(req.prompt)
            tokens = await self.client.tokenize_async(req.prompt, req.model)
        elif req.messages is not None:
            self._check_messages(req.messages)
            _check_depth(req.messages, "messages")
            tokens = await self.client.tokenize_chat_async(req.messages, req.model)
        else:
            tokens = req.token_ids or []
        keys = self.client.keyer.block_keys(
            tokens, req.model, lora=req.lora, cache_salt=req.cache_salt
        )
        d, scores = await self.client.route_keys_async(
            req.pods, keys, req.model, load=req.load, load_weight=req.load_weight,
            record=req.record,
        )  # fmt: skip
        self.metrics.observe_route(len(keys), int(d.hit_blocks))
        return s.RouteResponse(
            pod=d.pod, scores=scores, blocks=len(keys), reason=d.reason, hit_blocks=d.hit_blocks
        )

    async def add_pod(self, req: s.AddPod) -> s.PodChange:
        """Subscribe to a pod (no config edit, no restart; survives kvray's restarts)."""
        await asyncio.to_thread(
            self.client.add_pod, req.endpoint, req.replay_endpoint, req.pod, req.model
        )
        return s.PodChange(action="added", endpoint=req.endpoint, pod=req.pod)

    async def remove_pod(self, pod: str) -> s.PodChange:
        """Forget a pod: its streams and its blocks."""
        if not pod or len(pod) > s.MAX_POD_ID or "#" in pod or pod.strip() != pod:
            raise BadRequest("pod: a pod id (1-256 characters, no '#', no surrounding spaces)")
        await asyncio.to_thread(self.client.remove_pod, pod)
        return s.PodChange(action="removed", pod=pod)

    async def pods(self) -> s.PodsResponse:
        return msgspec.convert({"pods": await self.client.pods_async()}, s.PodsResponse)

    async def _score(
        self,
        model: str,
        tokens: Sequence[int],
        pods: list[str] | None,
        lora: str | None,
        cache_salt: str | None,
    ) -> s.ScoreResponse:
        keys = self.client.keyer.block_keys(tokens, model, lora=lora, cache_salt=cache_salt)
        scores = await self.client.score_keys_async(keys, pods)
        return s.ScoreResponse(model=model, scores=scores, blocks=len(keys), tokens=len(tokens))

    async def _tokenize(self, prompt: str, model: str, add_special_tokens: bool) -> list[int]:
        out: list[int] = await self.client.tokenize_async(
            prompt, model, add_special_tokens=add_special_tokens
        )
        return out

    def _check_pods(self, pods: list[str] | None) -> None:
        if pods is not None and len(pods) > self.cfg.max_pods_per_request:
            raise BadRequest(
                f"{len(pods)} pods in the request; at most {self.cfg.max_pods_per_request}"
            )

    def _check_prompt(self, prompt: str) -> None:
        if len(prompt) > self.cfg.max_prompt_chars:
            raise BadRequest(
                f"prompt of {len(prompt)} characters; at most {self.cfg.max_prompt_chars}"
            )

    def _check_messages(self, messages: list[dict[str, Any]]) -> None:
        if len(messages) > self.cfg.max_messages:
            raise BadRequest(f"{len(messages)} messages; at most {self.cfg.max_messages}")

    # --- deployment-handle entry points (JSON-shaped dicts in and out) ------------------------

    async def score_tokens_dict(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /score_tokens`` for Python callers (errors: ``BadRequest`` naming the field)."""
        return _builtins(await self.score_tokens(_convert(body, s.ScoreTokens)))

    async def score_completions_dict(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /score_completions`` for Python callers."""
        return _builtins(await self.score_completions(_convert(body, s.ScoreCompletions)))

    async def score_chat_dict(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /score_chat_completions`` for Python callers."""
        return _builtins(await self.score_chat(_convert(body, s.ScoreChat)))

    async def route_dict(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /route`` for Python callers."""
        return _builtins(await self.route(_convert(body, s.Route)))

    async def pods_dict(self) -> dict[str, Any]:
        """``GET /pods`` for Python callers."""
        return _builtins(await self.pods())

    # --- OpenAPI ------------------------------------------------------------------------------

    def openapi(self) -> dict[str, Any]:
        """The OpenAPI 3.1 document of every route, built from the msgspec Structs."""
        (refs, components) = msgspec.json.schema_components(
            (*s.REQUESTS, *s.RESPONSES), ref_template="#/components/schemas/{name}"
        )
        ref = dict(zip((*s.REQUESTS, *s.RESPONSES), refs, strict=True))
        for struct in s.REQUESTS:  # a Struct's own fields first, then the inherited ignored ones
            props = components[struct.__name__]["properties"]
            if "messages" in props:  # what a message must hold to render
                for alt in props["messages"].get("anyOf", [props["messages"]]):
                    if alt.get("type") == "array":
                        alt["items"] = s.MESSAGE_SCHEMA
            own = [f for f in struct.__annotations__ if f in props]
            components[struct.__name__]["properties"] = {
                **{f: props[f] for f in own},
                **{f: v for f, v in props.items() if f not in own},
            }
        secured = self.cfg.auth_token is not None

        def err(description: str) -> dict[str, Any]:
            return {"description": description, "content": {JSON: {"schema": ref[s.ErrorResponse]}}}

        def op(op_id: str, summary: str, ok: dict[str, Any], body: Any = None) -> dict[str, Any]:
            out: dict[str, Any] = {"operationId": op_id, "summary": summary}
            if body is not None:
                out["requestBody"] = {"required": True, "content": {JSON: {"schema": ref[body]}}}
            responses: dict[str, Any] = {"200": ok}
            if body is not None:
                responses["400"] = err("The request is invalid (e.g. an unknown model).")
            if secured and op_id != "healthz":
                out["security"] = [{"bearer": []}]
                responses["401"] = err("Missing or wrong bearer token.")
            if body is not None:
                responses["413"] = err("Body too large.")
                responses["422"] = err("The body is not JSON or does not match the schema.")
                responses["503"] = err("kvray's backend is unavailable.")
            out["responses"] = responses
            return out

        def json_ok(struct: type[msgspec.Struct], what: str) -> dict[str, Any]:
            return {"description": what, "content": {JSON: {"schema": ref[struct]}}}

        score = json_ok(s.ScoreResponse, "Score per pod.")
        paths: dict[str, Any] = {
            "/score_completions": {
                "post": op(
                    "score_completions",
                    "Score a completion prompt (an OpenAI completion request) per pod",
                    score,
                    s.ScoreCompletions,
                )  # fmt: skip
            },
            "/score_chat_completions": {
                "post": op(
                    "score_chat_completions",
                    "Score a chat (an OpenAI chat completion request) per pod",
                    score,
                    s.ScoreChat,
                )  # fmt: skip
            },
            "/score_tokens": {
                "post": op("score_tokens", "Score token ids per pod", score, s.ScoreTokens)
            },
            "/route": {
                "post": op(
                    "route",
                    "Pick a pod among candidates and record the choice",
                    json_ok(s.RouteResponse, "The chosen pod."),
                    s.Route,
                )
            },
            "/pods": {
                "get": op("pods", "Pods", json_ok(s.PodsResponse, "Every holder.")),
                "post": op(
                    "add_pod",
                    "Register a pod (kvray subscribes to its events)",
                    json_ok(s.PodChange, "Subscribed."),
                    s.AddPod,
                ),  # fmt: skip
            },
            "/pods/{pod}": {
                "delete": {
                    **op(
                        "remove_pod",
                        "Forget a pod: its streams and its blocks",
                        json_ok(s.PodChange, "Forgotten."),
                    ),  # fmt: skip
                    "parameters": [
                        {
                            "name": "pod",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "minLength": 1, "maxLength": s.MAX_POD_ID},
                        }
                    ],  # fmt: skip
                }
            },
            "/healthz": {"get": op("healthz", "Liveness", json_ok(s.HealthResponse, "Alive."))},
            "/metrics": {
                "get": op(
                    "metrics",
                    "Prometheus metrics",
                    {
                        "description": "Prometheus text exposition.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                )
            },
            "/openapi.json": {
                "get": op(
                    "openapi",
                    "This document",
                    {"description": "OpenAPI 3.1.", "content": {JSON: {"schema": {}}}},
                )
            },
            "/docs": {
                "get": op(
                    "docs",
                    "API documentation (HTML)",
                    {
                        "description": "Swagger UI.",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    },
                )
            },
        }
        doc: dict[str, Any] = {
            "openapi": "3.1.0",
            "info": {
                "title": APP_NAME,
                "version": VERSION,
                "description": "KV-cache-aware scoring for vLLM fleets: which pod already holds "
                "a prompt's prefix.",
            },
            "paths": paths,
            "components": {"schemas": components},
        }
        if secured:
            doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        return doc


def _replica_id() -> str:
    """This Serve replica's unique id, or ``"local"`` outside a replica."""
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # RayServeException: not inside a replica
        return "local"


def _convert(body: Any, struct: type[_Req]) -> _Req:
    try:
        return msgspec.convert(body, struct)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid request: {exc}") from None
    except RecursionError:
        raise BadRequest("invalid request: nested too deeply") from None


def _builtins(out: msgspec.Struct) -> dict[str, Any]:
    d: dict[str, Any] = msgspec.to_builtins(out)
    return d


def _decode(decoder: msgspec.json.Decoder[Any], raw: bytes) -> Any:
    """A request body as its Struct, or a 422 naming what is wrong."""
    try:
        return decoder.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise _HTTPError(422, f"invalid request body: {exc}") from None
    except RecursionError:
        raise _HTTPError(422, "invalid request body: nested too deeply") from None


def _check_depth(value: Any, field: str) -> None:
    """``BadRequest`` when lists and objects in ``value`` nest deeper than ``MAX_DEPTH``."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            children: Any = v.values()
        elif isinstance(v, list):
            children = v
        else:
            continue
        if depth > MAX_DEPTH:
            raise BadRequest(f"{field} nests lists or objects deeper than {MAX_DEPTH} levels")
        stack.extend((c, depth + 1) for c in children)


def _truncate(tokens: Sequence[int], keep: int | None, side: str | None) -> Sequence[int]:
    """``truncate_prompt_tokens`` as vLLM applies it to a generating model's prompt (left,
    i.e. keep the last tokens, unless ``truncation_side`` says "right")."""
    if keep is None or keep >= len(tokens):
        return tokens
    if keep < 0:
        raise BadRequest(
            "truncate_prompt_tokens=-1 (the model's context length) is not supported: kvray "
            "does not know it; give the number of tokens"
        )
    if keep == 0:
        return []
    return tokens[:keep] if side == "right" else tokens[-keep:]


def _docs_html(spec: dict[str, Any]) -> str:
    """A Swagger UI page for ``openapi.json`` (from a CDN), with a plain list of the routes."""
    import html

    rows = "".join(
        f"<li><code>{m.upper()} {html.escape(p)}</code>: {html.escape(o['summary'])}</li>"
        for p, ops in spec["paths"].items()
        for m, o in ops.items()
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>kvray API</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css">
</head><body>
<div id="swagger-ui"><h1>kvray API</h1><p>OpenAPI: <a href="openapi.json">openapi.json</a></p>
<ul>{rows}</ul></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({{url: "openapi.json", dom_id: "#swagger-ui"}});</script>
</body></html>
"""
