"""A Ray Serve request router that ranks an LLM deployment's replicas by kvray's scores.

Plug it into a Serve (LLM) deployment::

    @serve.deployment(request_router_config=RequestRouterConfig(
        request_router_class="kvray.serve.router:KvrayRequestRouter",
        request_router_kwargs={"namespace": "kvray", "model": "Qwen/Qwen3-8B"}))

Each replica is a vLLM engine publishing KV events as pod ``<pod>``; the router learns which
replica is which pod from the replica's routing stats (``record_routing_stats`` returning
``{"kvray_pod": pod}``) or, by default, takes the replica's unique id as the pod id. For each
request it extracts the prompt (``prompt``/``messages``/``token_ids`` attribute or dict key, or a
plain string) and lets kvray's one decision function (``Client.route_keys_async``, see
``kvray.core.routing``) pick the replica: the chosen one first, the rest after. When kvray
cannot answer (unreachable or slow) it falls back to Serve's default power-of-two-choices
policy, so routing never fails because of kvray.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter
from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.request_router.replica_wrapper import RunningReplica

log = logging.getLogger("kvray.router")

POD_STAT = "kvray_pod"


def extract_prompt(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The prompt of a request: token ids, chat messages or text (None when absent)."""
    for arg in (*args, *kwargs.values()):
        for name in ("token_ids", "messages", "prompt"):
            value = arg.get(name) if isinstance(arg, dict) else getattr(arg, name, None)
            if value is not None:
                return value
        if isinstance(arg, str):
            return arg
    return None


class KvrayRequestRouter(PowerOfTwoChoicesRequestRouter):  # type: ignore[misc]
    """Rank replicas by kvray's longest-cached-prefix score; fall back to power of two."""

    def initialize_state(  # type: ignore[override]
        self,
        namespace: str = "kvray",
        model: str | None = None,
        timeout_s: float = 0.25,
        record_routes: bool = True,
        **_: Any,
    ) -> None:
        """Args come from ``request_router_kwargs``.

        Args:
            namespace: Ray namespace of the kvray deployment.
            model: served model name used for tokenization and keys (required).
            timeout_s: budget for one kvray lookup before falling back.
            record_routes: record speculative entries for the chosen replica.
        """
        self._kv_namespace = namespace
        self._kv_model = model
        self._kv_timeout_s = timeout_s
        self._kv_record = record_routes
        self._kv_client: Any = None
        self.kv_decisions = {"kvray": 0, "fallback": 0}

    def _client(self) -> Any:
        if self._kv_client is None:
            from kvray.client import connect

            self._kv_client = connect(self._kv_namespace)
        return self._kv_client

    @staticmethod
    def pod_of(replica: RunningReplica) -> str:
        stats = getattr(replica, "routing_stats", None) or {}
        return str(stats.get(POD_STAT) or replica.replica_id.unique_id)

    async def _kv_rank(
        self, candidates: list[RunningReplica], pending: PendingRequest | None
    ) -> list[list[RunningReplica]] | None:
        if pending is None or not self._kv_model:
            return None
        prompt = extract_prompt(tuple(pending.args or ()), dict(pending.kwargs or {}))
        if prompt is None:
            return None
        client = self._client()
        by_pod = {self.pod_of(r): r for r in candidates}
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            tokens = prompt
        elif isinstance(prompt, list):
            tokens = await client.tokenize_chat_async(prompt, self._kv_model)
        else:
            tokens = await client.tokenize_async(str(prompt), self._kv_model)
        keys = client.block_keys(tokens, self._kv_model)
        # The one decision function (core.routing): cached prefix against kvray's own recent
        # routing load and pool fullness; cold prompts spread by rendezvous hashing.
        # Load: the requests Serve knows are queued at each replica (its queue-length cache),
        # each counted as a request's worth of work; kvray's own estimate only when Serve has
        # no figure for any candidate.
        cache = getattr(self, "_replica_queue_len_cache", None)
        qlens = {p: cache.get(r.replica_id) if cache else None for p, r in by_pod.items()}
        load = None
        if any(q is not None for q in qlens.values()):
            w = client.config.routing
            block = client.config.index.hashing_lookup()(self._kv_model).block_size
            load = {p: float(q or 0) * w.request_blocks * block for p, q in qlens.items()}
        d, _ = await client.route_keys_async(
            list(by_pod), keys, self._kv_model, load=load, record=self._kv_record
        )
        top = [by_pod[d.pod]]
        rest = [r for r in candidates if r is not top[0]]
        return [top, rest] if rest else [top]

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        try:
            ranked = await asyncio.wait_for(
                self._kv_rank(candidate_replicas, pending_request), self._kv_timeout_s
            )
        except Exception as exc:  # kvray down, slow or the request odd: never fail routing
            log.warning("kvray router falling back to power of two: %r", exc)
            ranked = None
        if ranked:
            self.kv_decisions["kvray"] += 1
            return ranked
        self.kv_decisions["fallback"] += 1
        return await super().choose_replicas(candidate_replicas, pending_request)  # type: ignore[no-any-return]
