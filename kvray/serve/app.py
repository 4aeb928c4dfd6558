"""The Ray Serve HTTP ingress: tokenize → keys → fan-out score → merge, with 4xx for bad input.

Routes: ``POST /score_completions``, ``POST /score_chat_completions``, ``POST /score_tokens``,
``POST /route``, ``GET /pods``, ``GET /healthz``, ``GET /metrics``. A bearer token, when
configured, is required on every route but ``/healthz``. Bodies above ``max_body_bytes`` get 413.
Error mapping: ``BadRequest``, ``ConfigError``, ``MalformedFrame`` → 400;
``BackendUnavailable`` → 503;
pydantic validation → 422 (FastAPI's, naming the field).

No ``from __future__ import annotations`` here: Serve's class-based views and FastAPI resolve
route annotations at runtime, and postponed (string) annotations break that resolution.

The deployment is also reachable from Python inside Ray: ``serve.get_app_handle("kvray")`` and
call ``.score_tokens.remote({...})`` etc. with the same JSON-shaped dicts.
"""

import hmac
import logging
import os
import time
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from kvray._env import freeze_heap
from kvray.config import Config, ServeConfig, load_config
from kvray.errors import BadRequest, ConfigError, KvrayError
from kvray.metrics import CONTENT_TYPE, LatencyHistogram, render
from kvray.serve.errors import error_response, oversized
from kvray.serve.schemas import (
    ErrorResponse,
    PodsResponse,
    RouteRequest,
    RouteResponse,
    ScoreChatRequest,
    ScoreCompletionsRequest,
    ScoreResponse,
    ScoreTokensRequest,
)

APP_NAME = "kvray"

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "The request is invalid."},
    401: {"model": ErrorResponse, "description": "Missing or wrong bearer token."},
    413: {"model": ErrorResponse, "description": "Body too large."},
    503: {"model": ErrorResponse, "description": "The index backend is unavailable."},
}


class _Ingress:
    """Shared logic of the deployment (kept free of Serve decorators for direct tests)."""

    def __init__(self, namespace: str, serve_config: dict[str, Any]) -> None:
        from kvray.client import connect

        self.cfg = ServeConfig.model_validate(serve_config)
        self.client = connect(namespace)
        self.latency = LatencyHistogram()

    def _limits(self, pods: list[str] | None, prompt: str | None = None) -> None:
        if pods is not None and len(pods) > self.cfg.max_pods_per_request:
            raise BadRequest(
                f"{len(pods)} pods in the request; at most {self.cfg.max_pods_per_request}"
            )
        if prompt is not None and len(prompt) > self.cfg.max_prompt_chars:
            raise BadRequest(
                f"prompt of {len(prompt)} characters; at most {self.cfg.max_prompt_chars}"
            )

    async def _score(
        self,
        model: str,
        tokens: list[int],
        pods: list[str] | None,
        lora: str | None,
        cache_salt: str | None = None,
    ) -> ScoreResponse:
        keys = self.client.keyer.block_keys(tokens, model, lora=lora, cache_salt=cache_salt)
        scores = await self.client.score_keys_async(keys, pods)
        return ScoreResponse(model=model, scores=scores, blocks=len(keys), tokens=len(tokens))

    async def score_completions(self, req: ScoreCompletionsRequest) -> ScoreResponse:
        self._limits(req.pods, req.prompt)
        t0 = time.perf_counter()
        tokens = await self.client.tokenize_async(req.prompt, req.model)
        out = await self._score(req.model, tokens, req.pods, req.lora, req.cache_salt)
        self.latency.observe(time.perf_counter() - t0)
        return out

    async def score_chat(self, req: ScoreChatRequest) -> ScoreResponse:
        self._limits(req.pods)
        if len(req.messages) > self.cfg.max_messages:
            raise BadRequest(f"{len(req.messages)} messages; at most {self.cfg.max_messages}")
        t0 = time.perf_counter()
        tokens = await self.client.tokenize_chat_async(
            req.messages,
            req.model,
            tools=req.tools,
            add_generation_prompt=req.add_generation_prompt,
            chat_template_kwargs=req.chat_template_kwargs,
        )
        out = await self._score(req.model, tokens, req.pods, req.lora)
        self.latency.observe(time.perf_counter() - t0)
        return out

    async def score_tokens(self, req: ScoreTokensRequest) -> ScoreResponse:
        self._limits(req.pods)  # token ids are range-checked by the schema (TokenId)
        t0 = time.perf_counter()
        out = await self._score(req.model, req.token_ids, req.pods, req.lora, req.cache_salt)
        self.latency.observe(time.perf_counter() - t0)
        return out

    async def route(self, req: RouteRequest) -> RouteResponse:
        self._limits(req.pods, req.prompt)
        given = [x is not None for x in (req.prompt, req.token_ids, req.messages)]
        if sum(given) != 1:
            raise BadRequest("give exactly one of prompt, token_ids or messages")
        if req.prompt is not None:
            tokens = await self.client.tokenize_async(req.prompt, req.model)
        elif req.messages is not None:
            tokens = await self.client.tokenize_chat_async(req.messages, req.model)
        else:
            tokens = list(req.token_ids or [])
        keys = self.client.keyer.block_keys(
            tokens, req.model, lora=req.lora, cache_salt=req.cache_salt
        )
        d, scores = await self.client.route_keys_async(
            req.pods, keys, req.model, load=req.load, load_weight=req.load_weight,
            record=req.record,
        )  # fmt: skip
        return RouteResponse(
            pod=d.pod, scores=scores, blocks=len(keys), reason=d.reason, hit_blocks=d.hit_blocks
        )

    async def pods(self) -> PodsResponse:
        return PodsResponse.model_validate({"pods": await self.client.pods_async()})

    async def metrics(self) -> bytes:
        stats = await self.client.stats_async()
        serve_stats: dict[str, Any] = {
            "score_buckets": self.latency.buckets(),
            "score_sum": self.latency.total,
        }
        if self.client.replica is not None:
            serve_stats["replica"] = self.client.replica.stats()
        return render(stats, serve_stats)


def _auth(cfg: ServeConfig) -> Any:
    token = cfg.auth_token

    async def check(request: Request) -> None:
        if not token:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
            raise HTTPException(
                401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"}
            )

    return check


def make_app(serve_config: dict[str, Any]) -> tuple[FastAPI, Any]:
    """A fresh FastAPI app and the Serve deployment class serving it (no Ray needed)."""
    cfg = ServeConfig.model_validate(serve_config)
    auth = Depends(_auth(cfg))
    app = FastAPI(
        title="kvray",
        version="0.1.0",
        description="KV-cache-aware scoring for vLLM fleets: which pod already holds a "
        "prompt's prefix.",
    )

    @app.middleware("http")
    async def _limit_body(request: Request, call_next: Any) -> Any:
        why = oversized(request.headers.get("content-length"), cfg.max_body_bytes)
        if why is not None:
            return JSONResponse({"detail": why}, status_code=413)
        return await call_next(request)

    @app.exception_handler(KvrayError)
    async def _kvray_error(request: Request, exc: KvrayError) -> JSONResponse:
        status, detail = error_response(exc)
        return JSONResponse({"detail": detail}, status_code=status)

    @serve.deployment(
        name="KvrayIngress",
        max_ongoing_requests=64,
        ray_actor_options={"num_cpus": 0},
    )
    @serve.ingress(app)
    class KvrayIngress(_Ingress):
        def __init__(
            self,
            namespace: str,
            serve_config: dict[str, Any],
            config_fingerprint: str | None = None,
            runtime: Any = None,
        ) -> None:
            if config_fingerprint is not None:
                wait_for_runtime(namespace, config_fingerprint)
            super().__init__(namespace, serve_config)
            self.fast_port: int | None = None
            if self.cfg.fast_port is not None:
                from kvray.serve.fast import start_fast_http

                try:
                    self.fast_port = start_fast_http(self, app.openapi())
                except OSError as exc:  # no free port: serve through Serve's endpoint only
                    logging.getLogger("kvray.serve").warning("fast HTTP path off: %s", exc)
            freeze_heap()  # the replica's change-stream thread allocates fast (see freeze_heap)

        @app.get("/healthz", summary="Liveness")
        async def healthz(self) -> dict[str, str]:
            return {"status": "ok", "app": APP_NAME, "namespace": self.client.namespace}

        @app.post(
            "/score_completions",
            response_model=ScoreResponse,
            responses=_ERRORS,
            dependencies=[auth],
            summary="Score a completion prompt per pod",
        )
        async def http_score_completions(self, req: ScoreCompletionsRequest) -> ScoreResponse:
            return await self.score_completions(req)

        @app.post(
            "/score_chat_completions",
            response_model=ScoreResponse,
            responses=_ERRORS,
            dependencies=[auth],
            summary="Score a chat conversation per pod",
        )
        async def http_score_chat(self, req: ScoreChatRequest) -> ScoreResponse:
            return await self.score_chat(req)

        @app.post(
            "/score_tokens",
            response_model=ScoreResponse,
            responses=_ERRORS,
            dependencies=[auth],
            summary="Score token ids per pod",
        )
        async def http_score_tokens(self, req: ScoreTokensRequest) -> ScoreResponse:
            return await self.score_tokens(req)

        @app.post(
            "/route",
            response_model=RouteResponse,
            responses=_ERRORS,
            dependencies=[auth],
            summary="Pick a pod among candidates and record the choice",
        )
        async def http_route(self, req: RouteRequest) -> RouteResponse:
            return await self.route(req)

        @app.get("/pods", response_model=PodsResponse, dependencies=[auth], summary="Pods")
        async def http_pods(self) -> PodsResponse:
            return await self.pods()

        @app.get("/metrics", dependencies=[auth], summary="Prometheus metrics")
        async def http_metrics(self) -> Response:
            return Response(await self.metrics(), media_type=CONTENT_TYPE)

        def fast_url(self) -> str | None:
            """This replica's fast-path URL (its node's address when listening on all)."""
            if self.fast_port is None:
                return None
            host = self.cfg.host
            if host in ("0.0.0.0", "::"):
                import ray

                host = ray.util.get_node_ip_address()
            return f"http://{host}:{self.fast_port}"

        # Deployment-handle entry points (dicts in, dicts out) for Python callers inside Ray.
        async def score_tokens_dict(self, body: dict[str, Any]) -> dict[str, Any]:
            return (await self.score_tokens(ScoreTokensRequest.model_validate(body))).model_dump()

        async def score_completions_dict(self, body: dict[str, Any]) -> dict[str, Any]:
            req = ScoreCompletionsRequest.model_validate(body)
            return (await self.score_completions(req)).model_dump()

        async def route_dict(self, body: dict[str, Any]) -> dict[str, Any]:
            return (await self.route(RouteRequest.model_validate(body))).model_dump()

    return app, KvrayIngress


def build_ingress(
    namespace: str,
    serve_config: dict[str, Any],
    *,
    config_fingerprint: str | None = None,
    runtime: Any = None,
) -> Any:
    """The ingress deployment bound to a kvray deployment's namespace and HTTP settings
    (replicas, autoscaling and ``max_ongoing_requests`` from ``serve_config``)."""
    cfg = ServeConfig.model_validate(serve_config)
    _, deployment = make_app(serve_config)
    scale: dict[str, Any] = (
        {"autoscaling_config": cfg.autoscaling}
        if cfg.autoscaling
        else {"num_replicas": cfg.replicas}
    )
    return deployment.options(max_ongoing_requests=cfg.max_ongoing_requests, **scale).bind(
        namespace, serve_config, config_fingerprint, runtime
    )


@serve.deployment(
    name="KvrayRuntime",
    num_replicas=1,
    max_ongoing_requests=8,
    ray_actor_options={"num_cpus": 0},
)
class KvrayRuntime:
    """Owns kvray's actors for a Serve application.

    Its ``user_config`` is kvray's configuration: Serve calls ``reconfigure`` when the replica
    starts and whenever the application is redeployed with another configuration, and the
    actors are started, adopted or replaced to match (``runtime.ensure``). Deleting the
    application (``serve delete``, ``kvray stop``) shuts the replica down, and ``__del__``
    stops the actors, unless a newer replica (a rolling update) took them over.
    """

    def __init__(self) -> None:
        import uuid

        self.owner = uuid.uuid4().hex
        self.namespace: str | None = None
        self.last = ""

    def reconfigure(self, config: dict[str, Any]) -> None:
        from kvray import runtime

        cfg = Config.model_validate(config)
        if self.namespace is not None and self.namespace != cfg.namespace:
            runtime.release(self.namespace, self.owner)  # moved to another namespace
        self.last = runtime.ensure(cfg, self.owner)
        self.namespace = cfg.namespace
        logging.getLogger("kvray.serve").warning(
            "kvray runtime %s in namespace %r", self.last, cfg.namespace
        )

    def status(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "last": self.last, "owner": self.owner}

    def __del__(self) -> None:
        if self.namespace is not None:
            from kvray import runtime

            runtime.release(self.namespace, self.owner)


def wait_for_runtime(namespace: str, config_fingerprint: str, timeout_s: float = 300.0) -> None:
    """Block until the deployment in ``namespace`` runs the configuration with this
    fingerprint (a redeploy replaces it: an ingress must not attach to the old one)."""
    from kvray import runtime

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            current = runtime.running_config(namespace)
        except Exception:  # the controller is being replaced
            current = None
        if current is not None and runtime.fingerprint(current) == config_fingerprint:
            return
        if time.monotonic() > deadline:
            raise ConfigError(
                f"no kvray deployment with this configuration came up in namespace "
                f"{namespace!r} within {timeout_s:.0f} s"
            )
        time.sleep(0.2)


_ARGS = ("config", "config_path", "namespace", "serve")


def config_from_args(args: dict[str, Any]) -> Config | None:
    """kvray's configuration from a Serve application's ``args`` (``KVRAY_*`` environment
    overrides applied): ``config`` (inline) or ``config_path`` (a kvray.yaml on the nodes).
    None for the attach form (``namespace`` + ``serve`` only)."""
    unknown = sorted(set(args) - set(_ARGS))
    if unknown:
        raise ConfigError(f"unknown application args {unknown}; known: {', '.join(_ARGS)}")
    if "config" in args and "config_path" in args:
        raise ConfigError("give either args.config or args.config_path, not both")
    if "config_path" in args:
        return load_config(str(args["config_path"]))
    if "config" in args:
        return load_config(doc=dict(args["config"] or {}))
    return None


def app_builder(args: dict[str, Any]) -> Any:
    """Serve application builder: ``import_path: kvray.serve.app:app_builder``.

    With ``args.config`` (kvray's configuration inline) or ``args.config_path``, the
    application brings all of kvray up: ``KvrayRuntime`` starts (or adopts, or reconciles)
    the controller, shards, ingestors and tokenizers, and the ingress serves HTTP once they
    run this configuration. ``serve delete`` tears it all down. The attach form
    (``args.namespace`` + ``args.serve`` only) serves HTTP for actors started elsewhere.
    """
    cfg = config_from_args(args)
    if cfg is None:
        namespace = str(args.get("namespace", "kvray"))
        serve_cfg = ServeConfig.model_validate(args.get("serve") or {})
        return build_ingress(namespace, serve_cfg.model_dump())
    from kvray import runtime

    owner = KvrayRuntime.options(user_config=cfg.model_dump(mode="json")).bind()  # type: ignore[attr-defined]
    return build_ingress(
        cfg.namespace,
        cfg.serve.model_dump(),
        config_fingerprint=runtime.fingerprint(cfg),
        runtime=owner,
    )


def deploy(config: Config, *, timeout_s: float = 300.0) -> str:
    """Run kvray as one Serve application (what ``kvray serve`` does); returns the HTTP URL."""
    s = config.serve
    serve.start(
        http_options={"host": s.host, "port": s.port},
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
    )
    serve.run(
        app_builder({"config": config.model_dump(mode="json")}),
        name=APP_NAME,
        route_prefix="/",
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
    )
    return find_http(config, timeout_s=timeout_s)


def direct_ingress_enabled() -> bool:
    """Whether replicas serve HTTP themselves (``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``)."""
    return os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS", "0") == "1"


def start_http(config: Config, *, timeout_s: float = 60.0, fast: bool = True) -> str:
    """Deploy the ingress for the kvray runtime in ``config.namespace``; returns its base URL.

    The URL is the fast path's (``serve.fast_port``, see ``kvray.serve.fast``) unless it is off
    or ``fast`` is false; then Serve's own: with direct ingress the replica listens from port
    30000 up on the node, otherwise Serve's proxy on ``config.serve.port``. Either is the one
    that answered ``/healthz`` for this namespace.
    """
    s = config.serve
    serve.start(
        http_options={"host": s.host, "port": s.port},
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
    )
    serve.run(
        build_ingress(config.namespace, s.model_dump()),
        name=APP_NAME,
        route_prefix="/",
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
    )
    return find_http(config, timeout_s=timeout_s, fast=fast)


def find_http(config: Config, *, timeout_s: float = 10.0, fast: bool = True) -> str:
    """The base URL of a running kvray ingress (see ``start_http``).

    The fast path's URL comes from a replica itself (``fast_url`` through a deployment handle:
    right on any node); Serve's own endpoint is found by probing ``/healthz``.
    """
    import httpx

    s = config.serve
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
    candidates: list[str] = []
    if fast and s.fast_port is not None:
        try:
            url = serve.get_app_handle(APP_NAME).fast_url.remote().result(timeout_s=timeout_s)
        except Exception:  # no app (yet) or an older deployment: probe below
            url = None
        if url:
            candidates = [str(url)]
    if not candidates and direct_ingress_enabled():
        low = int(os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "30000"))
        candidates = [f"http://{host}:{p}" for p in range(low, low + 16)]
    elif not candidates:
        candidates = [f"http://{host}:{s.port}"]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for base in candidates:
            try:
                r = httpx.get(f"{base}/healthz", timeout=0.5)
                body = r.json() if r.status_code == 200 else {}
                # Match the namespace too: another kvray may serve on this machine.
                if body.get("app") == APP_NAME and body.get("namespace") == config.namespace:
                    return base
            except httpx.HTTPError:
                continue
        time.sleep(0.1)
    raise ConfigError(f"kvray's HTTP endpoint did not come up on {candidates}")


def stop_http() -> None:
    """Delete the Serve application (the runtime's actors are left running)."""
    serve.delete(APP_NAME)
