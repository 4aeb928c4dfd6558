"""Measuring request routers side by side inside Ray Serve LLM (``examples/serve_llm.py``).

* :class:`Ledger`: a named Ray actor that collects the stand-in engines' per-request rows
  (``kvray.serve.llm_engine``) and the routers' per-request overheads and fallbacks.
* ``Timed*`` routers: kvray's and Ray's routers with ``choose_replicas`` timed the same way and
  reported to the ledger. Serve resolves a router class by its import path in every process
  that routes, so they live in an importable module rather than in the example script.

Needs Ray Serve LLM's dependencies (see docs/serve-llm.md).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import ray
from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter
from ray.serve.llm.request_router import KVAwareRouter, PrefixCacheAffinityRouter

from kvray.serve.router import KvrayRequestRouter


@ray.remote(num_cpus=0)
class Ledger:
    """Per-request rows from the engines; overheads and fallback counts from the routers."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.overheads: list[float] = []
        self.tokenize: list[float] = []
        self.fallbacks: dict[str, dict[str, int]] = {}  # router instance -> cumulative counts
        self.base: dict[str, dict[str, int]] = {}  # ... as of the last take()
        self.seen: set[str] = set()  # router classes that routed since the last routers()

    def record(self, rows: list[dict[str, Any]]) -> None:
        self.rows.extend(rows)

    def record_route(
        self, router: str, overheads: list[float], tokenize: list[float], fallbacks: dict[str, int]
    ) -> None:
        self.overheads.extend(overheads)
        self.tokenize.extend(tokenize)
        self.fallbacks[router] = fallbacks
        self.seen.add(router.split("-", 1)[0])

    def routers(self) -> list[str]:
        """The router classes that reported since the last call (a run checks that the router
        it configured is the one that routed)."""
        seen, self.seen = sorted(self.seen), set()
        return seen

    def take(self) -> tuple[list[dict[str, Any]], list[float], list[float], dict[str, int]]:
        """Everything recorded since the last take (fallbacks as counts since then)."""
        fb: dict[str, int] = {}
        for uid, counts in self.fallbacks.items():
            base = self.base.get(uid, {})
            for reason, n in counts.items():
                if n > base.get(reason, 0):
                    fb[reason] = fb.get(reason, 0) + n - base.get(reason, 0)
            self.base[uid] = dict(counts)
        rows, over, tok = self.rows, self.overheads, self.tokenize
        self.rows, self.overheads, self.tokenize = [], [], []
        return rows, over, tok, fb


class _Timed:
    """Times ``choose_replicas`` and reports to the ledger named in the router kwargs."""

    def initialize_state(self, ledger: str = "", ledger_namespace: str = "", **kwargs: Any) -> None:
        self._ledger_name, self._ledger_ns = ledger, ledger_namespace or None
        self._ledger: Any = None
        self._times: list[float] = []
        self._tok_times: list[float] = []  # of which tokenizing (kvray's router only)
        self._tok_by_request: dict[str, float] = {}
        self._flush_due = False
        self._uid = f"{type(self).__name__}-{os.getpid()}-{id(self)}"
        self._no_tracker = 0
        super().initialize_state(**kwargs)  # type: ignore[misc]

    async def choose_replicas(self, candidate_replicas: Any, pending_request: Any = None) -> Any:
        t0 = time.perf_counter()
        try:
            return await super().choose_replicas(candidate_replicas, pending_request)  # type: ignore[misc]
        finally:
            dt = time.perf_counter() - t0
            rid = pending_request.metadata.internal_request_id if pending_request else None
            self._report(dt, self._tok_by_request.pop(rid, 0.0) if rid is not None else 0.0)

    def _tokenized(self, request_id: str, seconds: float) -> None:
        """kvray's router tokenizes inside ``choose_replicas``: its share, per request."""
        self._tok_by_request[request_id] = seconds

    def _report(self, dt: float, tokenize_s: float) -> None:
        if not self._ledger_name:
            return
        self._times.append(dt)
        self._tok_times.append(tokenize_s)
        if getattr(self, "_kv_token_tracker", "absent") is None:
            self._no_tracker += 1  # Ray's KVAwareRouter without its tracker: random choice
        if len(self._times) >= 16:
            self._flush()
        elif not self._flush_due:  # what is left goes out half a second later at the latest
            self._flush_due = True
            asyncio.get_running_loop().call_later(0.5, self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        if not self._times:
            return
        if self._ledger is None:
            self._ledger = ray.get_actor(self._ledger_name, namespace=self._ledger_ns)
        self._ledger.record_route.remote(self._uid, self._times, self._tok_times, self._fallbacks())
        self._times, self._tok_times = [], []

    def _fallbacks(self) -> dict[str, int]:
        counts = getattr(self, "fallbacks", None)  # kvray's router counts its own, by reason
        if counts is not None:
            return dict(counts)
        return {"no_kv_token_tracker": self._no_tracker} if self._no_tracker else {}


class TimedKvrayRequestRouter(_Timed, KvrayRequestRouter):  # type: ignore[misc]
    """kvray's router, timed."""


class TimedPrefixCacheAffinityRouter(_Timed, PrefixCacheAffinityRouter):  # type: ignore[misc]
    """Ray's ``PrefixCacheAffinityRouter``, timed."""


class TimedKVAwareRouter(_Timed, KVAwareRouter):  # type: ignore[misc]
    """Ray's ``KVAwareRouter``, timed."""


class TimedPowerOfTwoRouter(_Timed, PowerOfTwoChoicesRequestRouter):  # type: ignore[misc]
    """Serve's default power-of-two-choices router, timed."""


def stand_in_config(
    model: str,
    *,
    router: type | str,
    router_kwargs: dict[str, Any] | None = None,
    replicas: int = 2,
    engine: dict[str, Any] | None = None,
    lora_path: str | None = None,
    env: dict[str, str] | None = None,
) -> Any:
    """An ``LLMConfig`` for ``LLMServer`` replicas running the stand-in engine (the recipe of
    docs/serve-llm.md), with ``router`` choosing among them."""
    from ray.serve.llm import LLMConfig

    return LLMConfig(
        model_loading_config={"model_id": model},
        runtime_env={
            "env_vars": {
                "RAYLLM_VLLM_ENGINE_CLS": "kvray.serve.llm_engine.SimEngine",
                "HF_HUB_OFFLINE": "1",
                **(env or {}),
            }
        },
        experimental_configs={"kvray_sim_engine": dict(engine or {})},
        lora_config=(
            {"dynamic_lora_loading_path": lora_path, "max_num_adapters_per_replica": 4}
            if lora_path
            else None
        ),
        placement_group_config={"bundles": [{"CPU": 0.01}]},  # no GPU: a sliver of a CPU
        deployment_config={
            "num_replicas": replicas,
            "max_ongoing_requests": 64,
            "ray_actor_options": {"num_cpus": 0},
            "request_router_config": {
                "request_router_class": router,
                "request_router_kwargs": dict(router_kwargs or {}),
                "request_routing_stats_period_s": 1,
            },
        },
    )


TIMED = {
    "kvray": TimedKvrayRequestRouter,
    "prefix_cache_affinity": TimedPrefixCacheAffinityRouter,
    "kv_aware": TimedKVAwareRouter,
    "power_of_two": TimedPowerOfTwoRouter,
}


def keep_llm_servers(app: Any, version: str) -> Any:
    """Give the app's ``LLMServer`` deployments a fixed Serve code version (returns ``app``).

    ``serve.run`` gives a deployment without one a random version, so every run restarts its
    replicas. With a fixed one, Serve applies a change of router or replica count to the running
    replicas (``request_router_config`` and ``num_replicas`` reconfigure), and only the ingress,
    which has no fixed version, restarts and builds the new router. Ray 2.60 removed the public
    ``version`` option, so this sets the deployment's ``_version``: benchmark plumbing, not part
    of the recipe."""
    from ray.serve.deployment import Application

    todo = [app]
    while todo:
        a = todo.pop()
        d = a._bound_deployment
        if d.name.startswith("LLMServer"):
            d._version = version
        for arg in [*d._replica_config.init_args, *d._replica_config.init_kwargs.values()]:
            # Bound deployments appear as arguments, or inside a dict/list of them.
            inner = arg.values() if isinstance(arg, dict) else arg
            candidates = inner if isinstance(arg, dict | list | tuple) else [arg]
            todo.extend(x for x in candidates if isinstance(x, Application))
    return app
