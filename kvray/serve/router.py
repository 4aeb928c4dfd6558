"""``KvrayRequestRouter``: a Ray Serve request router (public API) that routes by kvray.

Plug it into a Serve (LLM) deployment::

    @serve.deployment(request_router_config=RequestRouterConfig(
        request_router_class="kvray.serve.router:KvrayRequestRouter",
        request_router_kwargs={"namespace": "kvray", "model": "Qwen/Qwen3-8B"}))

Built on ``ray.serve.request_router`` only (``RequestRouter`` with ``FIFOMixin`` and
``MultiplexMixin``). For each request:

* **Prompt:** the token ids Serve LLM's ingress forwards (``request_token_ids``), else the
  prompt it finds (``prompt``/``messages``/``token_ids``, as an attribute or a dict key, or a
  plain string), rendered and tokenized as vLLM does (chat template, ``tools``,
  ``add_generation_prompt``, ``chat_template_kwargs``, ``add_special_tokens``, ``cache_salt``
  from the request) by the model's tokenizer loaded in this process (``local_tokenizer``,
  default) or by kvray's tokenizer pool.
* **LoRA:** the request's multiplexed model id names the adapter whose key space the prompt's
  blocks live in.
* **Decision:** kvray's one decision function (``Client.route_keys_async``,
  ``kvray.core.routing``): cached prefix against the work this router has in flight on each
  replica (prompt blocks to prefill plus its decode: the request's ``max_tokens``, capped at
  ``routing.request_blocks`` blocks; from ``on_request_routed`` / ``on_request_completed``)
  and each pod's pool fullness; cold prompts spread. The choice is recorded as speculative
  entries (``record_routes``), in the background: the request does not wait for it.
* **Fallback:** power of two choices (Serve probes the two replicas' queues) whenever kvray
  cannot decide in ``timeout_s`` or is down, counted by reason in ``fallbacks``: routing never
  fails because of kvray.

**Which replica is which pod:** a replica's routing stats name it: ``kvray_pod`` (any engine),
or Serve LLM's ``kv_event_metadata`` (its KV-events endpoint, which a kvray-routed LLMServer
reports when its engine publishes events, see ``docs/serve-llm.md``). With ``register_pods``
(the default) the router registers each replica's endpoint with kvray as it appears
(``Client.add_pod``: kvray subscribes to the engine's PUB socket) and removes the pod when the
replica goes away. Without either stat the replica's unique id is the pod id.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
import weakref
from collections import Counter
from collections.abc import Sequence
from typing import Any

from ray.serve.request_router import (
    FIFOMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

log = logging.getLogger("kvray.router")

POD_STAT = "kvray_pod"
KV_EVENTS_STAT = "kv_event_metadata"
TOKEN_IDS_KWARG = "request_token_ids"

ROUTERS: weakref.WeakSet[KvrayRequestRouter] = weakref.WeakSet()
"""Every router instance in this process (its counters are read from here)."""


def extract_prompt(args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """The prompt of a request: token ids, chat messages or text (None when absent)."""
    return _find_prompt(args, kwargs)[0]


def _find_prompt(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """``(prompt, the request object it came from)``; see :func:`extract_prompt`."""
    ids = kwargs.get(TOKEN_IDS_KWARG)
    if ids:
        return list(ids), None
    for arg in (*args, *kwargs.values()):
        for name in ("token_ids", "prompt_token_ids", "messages", "prompt"):
            value = arg.get(name) if isinstance(arg, dict) else getattr(arg, name, None)
            if value is not None:
                return value, arg
        if isinstance(arg, str):
            return arg, None
    return None, None


def _field(request: Any, name: str, default: Any = None) -> Any:
    if request is None:
        return default
    value = request.get(name) if isinstance(request, dict) else getattr(request, name, None)
    return default if value is None else value


def _decode_tokens(request: Any, default: float) -> float:
    """The decode work a request brings, in tokens: the output it asks for (``max_tokens`` /
    ``max_completion_tokens``; each output token is one token of a batch step, as a prefill
    token is), capped at ``default`` (``routing.request_blocks`` blocks; 0: no cap), else
    ``default``."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = _field(request, name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return float(min(value, default)) if default > 0 else float(value)
    return default


def pod_of(replica: RunningReplica) -> str:
    """The pod id of a replica: its ``kvray_pod`` stat, else its unique id."""
    stats = replica.routing_stats or {}
    return str(stats.get(POD_STAT) or replica.replica_id.unique_id)


def events_endpoint(replica: RunningReplica) -> tuple[str, str | None] | None:
    """``(endpoint, replay endpoint)`` of the replica's KV-event publisher, if it reports one."""
    meta = (replica.routing_stats or {}).get(KV_EVENTS_STAT)
    if not isinstance(meta, dict) or not meta.get("endpoint"):
        return None
    return str(meta["endpoint"]), meta.get("replay_endpoint")


class KvrayRequestRouter(FIFOMixin, MultiplexMixin, RequestRouter):  # type: ignore[misc]
    """Route each request to the replica kvray's decision function picks."""

    def initialize_state(  # type: ignore[override]
        self,
        namespace: str = "kvray",
        model: str | None = None,
        timeout_s: float = 0.25,
        record_routes: bool = True,
        register_pods: bool = True,
        local_tokenizer: bool = True,
        **_: Any,
    ) -> None:
        """Args come from ``request_router_kwargs``.

        Args:
            namespace: Ray namespace of the kvray deployment.
            model: served model name used for tokenization and keys (required).
            timeout_s: budget for one kvray decision before falling back.
            record_routes: record speculative entries for the chosen replica.
            register_pods: register replicas' KV-event endpoints with kvray (and remove
                them when the replica goes away).
            local_tokenizer: tokenize prompts in this process (the model's tokenizer, loaded
                once, with its own prefix cache) instead of a round trip to kvray's tokenizer
                pool; used only when the ingress forwards no token ids.
        """
        self._kv_namespace = namespace
        self._kv_model = model
        self._kv_timeout_s = timeout_s
        self._kv_record = record_routes
        self._kv_register = register_pods
        self._kv_local_tok = local_tokenizer
        self._kv_tok: Any = None  # the in-process Tokenization, once loaded
        self._kv_tok_loading: threading.Thread | None = None
        self._kv_tok_retry_at = 0.0
        self._kv_client: Any = None
        self.decisions: Counter[str] = Counter()
        """kvray's decisions by reason (cache/load/spread)."""
        self.fallbacks: Counter[str] = Counter()
        """Power-of-two fallbacks by reason (no_model, no_prompt, timeout, error, ...)."""
        self._work: dict[str, float] = {}  # internal request id -> tokens of work estimated
        self._inflight: dict[ReplicaID, dict[str, float]] = {}  # replica -> request -> tokens
        self._registered: dict[ReplicaID, str] = {}  # replica -> pod registered with kvray
        self._tasks: set[asyncio.Task[Any]] = set()
        self._kv_loop: asyncio.AbstractEventLoop | None = None
        self._kv_unsynced = False
        self._kv_syncing = False
        # Serve may ship this class by value (its own copy of this module's globals): register
        # with the importable module's registry, the one callers read.
        import importlib

        importlib.import_module("kvray.serve.router").ROUTERS.add(self)
        self._kv_client_lock = threading.Lock()
        if self._kv_local_tok and self._kv_model:
            self._load_tokenizer()  # before the first request: it takes a second or two

    def _client(self) -> Any:
        with self._kv_client_lock:  # the tokenizer loader thread may connect first
            if self._kv_client is None:
                from kvray.client import connect

                self._kv_client = connect(self._kv_namespace)
            return self._kv_client

    # --- replicas come and go --------------------------------------------------------------

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        if self._kv_register:
            self._spawn(self._sync_pods(list(replicas)))

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._inflight.pop(replica_id, None)
        pod = self._registered.pop(replica_id, None)
        if pod is not None:
            self._spawn(self._forget(pod))

    def _spawn(self, coro: Any) -> None:
        """Run ``coro`` on the router's event loop (the caller may be on another thread)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            task = loop.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif self._kv_loop is not None and not self._kv_loop.is_closed():
            asyncio.run_coroutine_threadsafe(coro, self._kv_loop)
        else:  # no loop seen yet: the first request's routing picks the replicas up
            coro.close()
            self._kv_unsynced = True

    async def _sync_pods(self, replicas: list[RunningReplica]) -> None:
        """Register the replicas that report a KV-events endpoint; forget those gone."""
        if self._kv_syncing:
            self._kv_unsynced = True  # once more after this one
            return
        self._kv_syncing = True
        try:
            await self._sync_pods_now(replicas)
        finally:
            self._kv_syncing = False

    async def _sync_pods_now(self, replicas: list[RunningReplica]) -> None:
        live = {r.replica_id for r in replicas}
        for replica_id in [r for r in self._registered if r not in live]:
            await self._forget(self._registered.pop(replica_id))
        for r in replicas:
            ep = events_endpoint(r)
            if ep is None or r.replica_id in self._registered:
                continue
            pod = pod_of(r)
            try:
                await asyncio.to_thread(self._client().add_pod, ep[0], ep[1], pod, self._kv_model)
                self._registered[r.replica_id] = pod
                log.info("kvray: replica %s is pod %s (events at %s)", r.replica_id, pod, ep[0])
            except Exception as exc:  # kvray down: retried on the next replica update
                log.warning("kvray: could not register replica %s: %r", r.replica_id, exc)

    async def _forget(self, pod: str) -> None:
        try:
            await asyncio.to_thread(self._client().remove_pod, pod)
        except Exception as exc:
            log.warning("kvray: could not remove pod %s: %r", pod, exc)

    # --- load: the work this router has in flight per replica ------------------------------

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        rid = pending_request.metadata.internal_request_id
        work = self._work.pop(rid, None)
        if work is not None:
            self._inflight.setdefault(replica_id, {})[rid] = work

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        if self._inflight.get(replica_id, {}).pop(internal_request_id, None) is None:
            # A fast request can complete before Serve reports it routed: drop its estimate
            # now, or ``on_request_routed`` would count it in flight for good.
            self._work.pop(internal_request_id, None)

    def _load(self, replicas: dict[str, RunningReplica]) -> dict[str, float]:
        return {p: sum(self._inflight.get(r.replica_id, {}).values()) for p, r in replicas.items()}

    # --- the decision ----------------------------------------------------------------------

    async def _kv_rank(
        self, candidates: list[RunningReplica], pending: PendingRequest
    ) -> list[list[RunningReplica]] | str:
        """The ranking, or the reason there is none."""
        if not self._kv_model:
            return "no_model"
        prompt, request = _find_prompt(tuple(pending.args or ()), dict(pending.kwargs or {}))
        if prompt is None:
            return "no_prompt"
        client = self._client()
        lora = pending.metadata.multiplexed_model_id or None
        t0 = time.perf_counter()
        tokens = await self._tokens(client, prompt, request)
        self._tokenized(pending.metadata.internal_request_id, time.perf_counter() - t0)
        keys = client.block_keys(tokens, self._kv_model, lora, _field(request, "cache_salt"))
        if not keys:
            return "no_blocks"  # shorter than a block: nothing kvray knows helps
        by_pod = {pod_of(r): r for r in candidates}
        block = client.config.index.hashing_lookup()(self._kv_model).block_size
        d, _ = await client.route_keys_async(
            list(by_pod), keys, self._kv_model, load=self._load(by_pod), record=False
        )
        if self._kv_record:  # speculative entries, off the request's path
            self._spawn(self._record(client, d.pod, keys))
        self.decisions[d.reason] += 1
        self._work[pending.metadata.internal_request_id] = d.new_blocks * block + _decode_tokens(
            request, client.config.routing.request_blocks * block
        )
        top = by_pod[d.pod]
        rest = [r for r in candidates if r is not top]
        return [[top], rest] if rest else [[top]]

    def _tokenized(self, request_id: str, seconds: float) -> None:
        """Hook: a request's prompt took ``seconds`` to tokenize (``serve.llm_bench`` reports
        it as a share of the routing overhead; nothing is kept otherwise)."""

    async def _tokens(self, client: Any, prompt: Any, request: Any) -> list[int]:
        """The prompt's token ids, rendered as vLLM renders the request."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            return prompt
        chat = isinstance(prompt, list)
        if chat:
            prompt = [m if isinstance(m, dict) else dict(m) for m in prompt]
            opts = {
                "tools": _field(request, "tools"),
                "add_generation_prompt": bool(_field(request, "add_generation_prompt", True)),
                "chat_template_kwargs": _field(request, "chat_template_kwargs"),
            }
        else:
            opts = {"add_special_tokens": bool(_field(request, "add_special_tokens", True))}
        if not self._kv_local_tok or self._kv_tok is None:
            if self._kv_local_tok:
                self._load_tokenizer()  # meanwhile, kvray's tokenizer pool
            if chat:
                ids: list[int] = await client.tokenize_chat_async(prompt, self._kv_model, **opts)
            else:
                ids = await client.tokenize_async(str(prompt), self._kv_model, **opts)
            return ids
        if chat:
            return self._kv_tok.encode_chat(prompt, **opts)  # type: ignore[no-any-return]
        return self._kv_tok.encode(str(prompt), **opts)  # type: ignore[no-any-return]

    def _load_tokenizer(self) -> None:
        """Load the model's tokenizer once, on a thread (it takes a second or two); the
        tokenizer named in kvray's configuration for the model, else the model name."""
        if self._kv_tok_loading is not None or time.monotonic() < self._kv_tok_retry_at:
            return

        def load() -> None:
            from kvray.tokenization import load_tokenizer

            try:
                cfg = self._client().config.index.model(self._kv_model)
                self._kv_tok = load_tokenizer(str(cfg.tokenizer or self._kv_model))
            except Exception as exc:  # kvray not up yet, or no such tokenizer: retry later
                log.warning("kvray: no local tokenizer for %s yet: %r", self._kv_model, exc)
                self._kv_tok_retry_at = time.monotonic() + 10.0
                self._kv_tok_loading = None

        self._kv_tok_loading = threading.Thread(target=load, name="kvray-tokenizer", daemon=True)
        self._kv_tok_loading.start()

    async def _record(self, client: Any, pod: str, keys: list[int]) -> None:
        try:
            await client.record_route_async(pod, keys)
        except Exception as exc:  # speculative entries are an optimisation
            log.debug("kvray: could not record the route to %s: %r", pod, exc)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if self._kv_loop is None:
            self._kv_loop = asyncio.get_running_loop()
        if self._kv_register and (
            self._kv_unsynced
            or any(
                r.replica_id not in self._registered and events_endpoint(r) is not None
                for r in candidate_replicas
            )
        ):
            # Replicas report their endpoints in routing stats some time after they start:
            # pick up what changed since (Serve refreshes the candidates' stats in place).
            self._kv_unsynced = False
            self._spawn(self._sync_pods(list(self.curr_replicas.values())))
        reason = "no_request"
        if pending_request is not None:
            try:
                got = await asyncio.wait_for(
                    self._kv_rank(candidate_replicas, pending_request), self._kv_timeout_s
                )
            except TimeoutError:
                got = "timeout"
            except Exception as exc:  # kvray down or the request odd: never fail routing
                log.warning("kvray router falling back to power of two: %r", exc)
                got = "error"
            if not isinstance(got, str):
                return got
            reason = got
        self.fallbacks[reason] += 1
        # Power of two choices: Serve probes both replicas' queues and takes the shorter.
        k = min(2, len(candidate_replicas))
        return [random.sample(candidate_replicas, k)]
