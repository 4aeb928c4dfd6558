"""kvray as a Ray Serve application: the ingress deployment (``kvray.serve.ingress.Ingress``),
the runtime deployment that owns kvray's actors, the application builder, and helpers to start
and find the HTTP endpoint.

The ingress is kvray's one HTTP door: each replica's own ``__call__`` (with direct ingress, the
replica itself listens, ports 30000+), msgspec bodies, ``/docs`` and ``/openapi.json`` included.
Python callers inside Ray use ``serve.get_app_handle("kvray")`` and its dict methods
(``score_tokens_dict``, ``score_completions_dict``, ``score_chat_dict``, ``route_dict``,
``pods_dict``).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from ray import serve

from kvray.config import Config, ServeConfig, load_config
from kvray.errors import ConfigError
from kvray.serve.ingress import APP_NAME, Ingress

__all__ = [
    "APP_NAME",
    "Ingress",
    "app_builder",
    "build_ingress",
    "deploy",
    "find_http",
    "start_http",
    "stop_http",
]


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
    scale: dict[str, Any] = (
        {"autoscaling_config": cfg.autoscaling}
        if cfg.autoscaling
        else {"num_replicas": cfg.replicas}
    )
    deployment = serve.deployment(
        name="KvrayIngress",
        max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
        **scale,
    )(Ingress)
    return deployment.bind(namespace, cfg.model_dump(), config_fingerprint, runtime)


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


def start_http(config: Config, *, timeout_s: float = 60.0) -> str:
    """Deploy the ingress for the kvray runtime in ``config.namespace``; returns its base URL:
    with direct ingress the replica's own listener (port 30000 up on its node), otherwise
    Serve's proxy on ``config.serve.port`` (the one that answered ``/healthz`` for this
    namespace)."""
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
    return find_http(config, timeout_s=timeout_s)


def find_http(config: Config, *, timeout_s: float = 10.0) -> str:
    """The base URL of a running kvray ingress (see ``start_http``), found by probing
    ``/healthz`` for this namespace."""
    import httpx

    s = config.serve
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
    if direct_ingress_enabled():
        low = int(os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "30000"))
        candidates = [f"http://{host}:{p}" for p in range(low, low + 16)]
    else:
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
            except (httpx.HTTPError, ValueError):
                continue
        time.sleep(0.1)
    raise ConfigError(f"kvray's HTTP endpoint did not come up on {candidates}")


def stop_http() -> None:
    """Delete the Serve application (the runtime's actors are left running)."""
    serve.delete(APP_NAME)
