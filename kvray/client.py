"""``kvray.connect()``: a cluster client for Ray-hosted schedulers (no HTTP in the path).

The client computes block keys itself (same ``Keyer`` as the shards) and scores them on its
in-process read replica of the index (``kvray.changes.replica``; one prefix walk, no actor
call) once the replica is live, else fans ``score`` out to the shards and unions the disjoint
per-holder results (``replica.enabled: false``, or while the replica loads or follows a
restarted shard). Prompts and chats go to a tokenizer pool member chosen by the prompt's first
chunk, so repeats meet the same prefix cache.

Async first: every method that calls actors is written once, as ``*_async`` (for Serve
replicas and async actors); the synchronous method of the same name takes the same arguments
and runs it to completion (``_run``). Reads the in-process replica can answer skip the event
loop entirely.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

import msgspec
import pydantic
import ray

from kvray.actors.naming import CONTROLLER
from kvray.changes.replica import Replica
from kvray.config import Config, PodEndpoint
from kvray.core.apply import Keyer
from kvray.core.holders import base_pod
from kvray.core.keyed import KeyedIndex
from kvray.core.keys import LoRA, MMFeature
from kvray.core.messages import ClusterStats, PodInfo
from kvray.core.prefix_store import first_chunk_route
from kvray.core.routing import Decider, Decision
from kvray.core.scoring import merge_scores
from kvray.core.sharding import Placement
from kvray.errors import BadRequest, ConfigError

_ROUTE_CHUNK_CHARS = 256  # first-chunk routing granularity (matches the prefix store's chunk)
_POOLS_FRESH_S = 1.0  # pool sizes asked of the shards (no replica) at most this often
_PINS_FRESH_S = 1.0  # pins this young are trusted for pods they do not name (hash placed)
_CTL_RETRY_S = 0.2  # pause before asking a dead or restarting controller again

# A dead controller, or one restarting (awaiting a ref surfaces that at once, where ray.get
# waited for the retried task).
_CONTROLLER_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)

T = TypeVar("T")
_THREAD = threading.local()  # each calling thread's private event loop (``_run``)


def _run(coro: Coroutine[Any, Any, T], timeout_s: float) -> T:
    """Run ``coro`` to completion from synchronous code, within ``timeout_s``.

    On a thread with no running event loop (a driver, a sync actor, ``asyncio.to_thread``)
    it runs on that thread's private loop; called from inside a running loop (sync code
    reached from async code), on a helper thread, like the blocking ``ray.get`` it replaces.
    """

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout_s)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        loop = getattr(_THREAD, "loop", None)
        if loop is None or loop.is_closed():
            loop = _THREAD.loop = asyncio.new_event_loop()
        return loop.run_until_complete(bounded())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, bounded()).result()


class Client(KeyedIndex[dict[str, float]]):
    """Handles to a running kvray deployment."""

    def __init__(
        self, namespace: str = "kvray", *, timeout_s: float = 60.0, replica: bool | None = None
    ) -> None:
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.controller = self._resolve_controller()
        info = self._ctl("info")
        self.config = Config.model_validate(info["config"])
        self.shards = [ray.get_actor(n, namespace=namespace) for n in info["shards"]]
        self.ingestors = [ray.get_actor(n, namespace=namespace) for n in info["ingestors"]]
        self.tokenizers = [ray.get_actor(n, namespace=namespace) for n in info["tokenizers"]]
        self.endpoints: list[list[str]] = info["endpoints"]
        self.placement = Placement(len(self.shards), info.get("pins"))
        self._pins_at = time.monotonic()
        self.keyer = Keyer(self.config.index.hashing_lookup(), self.config.index.keys)
        self.decider = Decider(self.config.routing.weights())
        """This client's routing decisions and its own load estimate (``core.routing``)."""
        self._pools: dict[str, tuple[int, int]] = {}
        self._pools_at = -1e9
        self.replica: Replica | None = None
        on = self.config.replicas_on()
        if replica and not on:
            raise ConfigError(
                "this deployment's shards do not publish changes (replica.enabled is off or "
                "the backend is redis): connect without replica=True"
            )
        if on if replica is None else replica:
            self.replica = Replica(self.shards, self.config)
            # A dropped client stops its follower thread (the thread keeps the replica alive).
            weakref.finalize(self, self.replica.stop_soon)
            self.replica.wait_ready(self.config.replica.ready_timeout_s)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return _run(coro, self.timeout_s)

    # --- the controller (restarts by itself; looked up again by name when a call fails) ---

    def _resolve_controller(self) -> Any:
        try:
            return ray.get_actor(CONTROLLER, namespace=self.namespace)
        except ValueError as exc:
            raise ConfigError(
                f"no kvray deployment in Ray namespace {self.namespace!r} (start one with "
                "`kvray serve` or kvray.runtime.start)"
            ) from exc

    async def _ctl_async(self, method: str, *args: Any) -> Any:
        """Call a controller method; while the controller is dead or restarting (or was
        replaced under the same name), look it up again and retry until ``timeout_s``."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                return await getattr(self.controller, method).remote(*args)
            except _CONTROLLER_GONE:
                if time.monotonic() + _CTL_RETRY_S > deadline:
                    raise
                await asyncio.sleep(_CTL_RETRY_S)
                with contextlib.suppress(ConfigError):
                    self.controller = self._resolve_controller()

    def _ctl(self, method: str, *args: Any) -> Any:
        return self._run(self._ctl_async(method, *args))

    def controller_status(self) -> dict[str, Any]:
        """The controller's ``status()``: restarted or not, snapshot ages, what it remembers."""
        return dict(self._ctl("status"))

    def close(self) -> None:
        """Stop the replica's follower thread (the client still scores through the shards)."""
        if self.replica is not None:
            self.replica.close()
            self.replica = None

    def _local(self, pods: Sequence[str] | None) -> Replica | None:
        """The replica, when it can answer for ``pods`` (every owning shard is live)."""
        rep = self.replica
        if rep is None:
            return None
        ids = None if pods is None or not self._sure(pods) else self._owner_ids(pods)
        return rep if rep.ready(ids) else None

    # --- placement (which shard owns a holder) ---------------------------------------------

    def owner(self, holder: str) -> int:
        """The shard owning ``holder``: its pod's pin (named pods that shards read are spread
        evenly by the controller), else the hash (``core.sharding``)."""
        if not self._sure([holder]):
            self._set_pins(self._ctl("pins"))
        return self.placement.owner(holder)

    async def owner_async(self, holder: str) -> int:
        await self._refresh_pins_async([holder])
        return self.placement.owner(holder)

    def _sure(self, holders: Sequence[str]) -> bool:
        """Whether the cached pins answer for ``holders``: every one pinned, or the pins are
        fresh (a pod pinned since would be missed only for ``_PINS_FRESH_S``)."""
        if time.monotonic() - self._pins_at < _PINS_FRESH_S:
            return True
        return all(self.placement.is_pinned(h) for h in holders)

    async def _refresh_pins_async(self, holders: Sequence[str]) -> None:
        if not self._sure(holders):
            self._set_pins(await self._ctl_async("pins"))

    def _set_pins(self, pins: dict[str, int]) -> None:
        self.placement.update(pins)
        self._pins_at = time.monotonic()

    def _owner_ids(self, pods: Sequence[str]) -> list[int]:
        """The ids of the shards owning ``pods`` (by the cached pins)."""
        return sorted({self.placement.owner(p) for p in pods})

    def _owners(self, pods: Sequence[str] | None) -> list[Any]:
        """The shards to ask: all, or only those owning the requested holders."""
        if pods is None:
            return self.shards
        return [self.shards[i] for i in self._owner_ids(pods)]

    # --- tokens ----------------------------------------------------------------------------

    def _tokenizer(self, text: str) -> Any:
        return self.tokenizers[first_chunk_route(text, len(self.tokenizers), _ROUTE_CHUNK_CHARS)]

    async def tokenize_async(
        self, prompt: str, model: str, *, add_special_tokens: bool = True
    ) -> list[int]:
        """Token ids of a completion prompt (``add_special_tokens`` as vLLM's request field)."""
        if not isinstance(prompt, str):
            raise BadRequest("prompt must be a string")
        actor = self._tokenizer(prompt)
        return await self._read(lambda: actor.encode.remote(model, prompt, add_special_tokens))  # type: ignore[no-any-return]

    def tokenize(self, prompt: str, model: str, *, add_special_tokens: bool = True) -> list[int]:
        return self._run(self.tokenize_async(prompt, model, add_special_tokens=add_special_tokens))

    async def tokenize_chat_async(
        self,
        messages: list[dict[str, Any]],
        model: str,
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """Token ids of a chat conversation rendered with the model's template."""
        first = ""
        if messages and isinstance(messages[0], dict):
            first = str(messages[0].get("content", ""))
        actor = self._tokenizer(first)
        return await self._read(  # type: ignore[no-any-return]
            lambda: actor.encode_chat.remote(
                model, messages, tools, add_generation_prompt, chat_template_kwargs
            )
        )

    def tokenize_chat(
        self,
        messages: list[dict[str, Any]],
        model: str,
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        return self._run(
            self.tokenize_chat_async(
                messages, model, tools=tools, add_generation_prompt=add_generation_prompt,
                chat_template_kwargs=chat_template_kwargs,
            )
        )  # fmt: skip

    # --- scoring ---------------------------------------------------------------------------

    def _score_here(
        self, keys: Sequence[int], pods: Sequence[str] | None
    ) -> dict[str, float] | None:
        """The answer without an actor call (no keys, or the replica is live), else None."""
        if not keys:
            return {}
        rep = self._local(pods)
        return rep.score(keys, pods) if rep is not None else None

    async def score_keys_async(
        self, keys: Sequence[int], pods: Sequence[str] | None = None
    ) -> dict[str, float]:
        """Score on the replica, else fan ``score`` out to the owning shards and merge."""
        here = self._score_here(keys, pods)
        if here is not None:
            return here
        klist = list(keys)
        plist = None if pods is None else list(pods)
        if plist is not None:
            await self._refresh_pins_async(plist)
        owners = self._owners(pods)

        async def ask() -> list[dict[str, float]]:
            return list(await asyncio.gather(*(s.score.remote(klist, plist) for s in owners)))

        return merge_scores(await self._read(ask))

    async def _read(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``, asked again while its actor is restarting (``ActorUnavailableError``:
        Ray restarts a killed shard or tokenizer). Only for reads, which are safe to repeat;
        gives up within the client's timeout."""
        deadline = time.monotonic() + self.timeout_s
        nap = 0.01
        while True:
            try:
                return await call()
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() + nap > deadline:
                    raise
                await asyncio.sleep(nap)
                nap = min(0.5, nap * 2)

    def score_keys(
        self, keys: Sequence[int], pods: Sequence[str] | None = None
    ) -> dict[str, float]:
        here = self._score_here(keys, pods)  # the common case needs no event loop
        return here if here is not None else self._run(self.score_keys_async(keys, pods))

    async def score_tokens_async(
        self,
        tokens: Sequence[int],
        model: str,
        pods: Sequence[str] | None = None,
        lora: LoRA | str | None = None,
        *,
        cache_salt: str | None = None,
        mm: Sequence[MMFeature] = (),
    ) -> dict[str, float]:
        keys = self.block_keys(tokens, model, lora, cache_salt, mm=mm)
        return await self.score_keys_async(keys, pods)

    async def score_prompt_async(
        self,
        prompt: str,
        model: str,
        pods: Sequence[str] | None = None,
        lora: str | None = None,
    ) -> dict[str, float]:
        """Tokenize, key and score a completion prompt."""
        tokens = await self.tokenize_async(prompt, model)
        return await self.score_tokens_async(tokens, model, pods, lora)

    def score_prompt(
        self, prompt: str, model: str, pods: Sequence[str] | None = None, lora: str | None = None
    ) -> dict[str, float]:
        return self._run(self.score_prompt_async(prompt, model, pods, lora))

    # --- routing ---------------------------------------------------------------------------

    async def pools_async(self) -> dict[str, tuple[int, int]]:
        """Holder → ``(blocks held, learned pool size)``: the replica's view when it has one,
        else the shards' (asked at most once a second)."""
        if self.replica is not None and self.replica.ready():
            return self.replica.pools()
        if time.monotonic() - self._pools_at >= _POOLS_FRESH_S:
            parts = await asyncio.gather(*(s.pools.remote() for s in self.shards))
            self._pools = {h: (int(v[0]), int(v[1])) for part in parts for h, v in part.items()}
            self._pools_at = time.monotonic()
        return self._pools

    def pools(self) -> dict[str, tuple[int, int]]:
        if self.replica is not None and self.replica.ready():
            return self.replica.pools()
        return self._run(self.pools_async())

    async def route_keys_async(
        self,
        candidates: Sequence[str],
        keys: Sequence[int],
        model: str,
        *,
        load: Mapping[str, float] | None = None,
        load_weight: float | None = None,
        record: bool = True,
        ttl_s: float | None = None,
    ) -> tuple[Decision, dict[str, float]]:
        """Choose a pod among ``candidates`` for a prompt's keys (``core.routing``), and
        record speculative entries for it unless ``record`` is false.

        Args:
            candidates: the pods to choose from (at least one).
            keys: the prompt's block keys (``block_keys``).
            model: served model name (its block size converts ``load``).
            load: queued work per candidate in tokens; None: kvray's own estimate.
            load_weight: overrides ``routing.load_weight``.
            record: record the choice (read-your-writes: the next score sees it).
            ttl_s: the speculative entries' lifetime (default ``index.speculative_ttl_s``).

        Returns:
            The decision, and the candidates' scores it was based on.
        """
        if not candidates:
            raise BadRequest("no candidate pods")
        scores = await self.score_keys_async(keys, candidates) if keys else {}
        block_size = self.config.index.hashing_lookup()(model).block_size
        d = self.decider.choose(
            candidates, scores, keys, load=load, load_unit=1.0 / block_size,
            pools=await self.pools_async(), load_weight=load_weight,
        )  # fmt: skip
        if record and keys:
            await self.record_keys_async(d.pod, keys, ttl_s)
        return d, scores

    def route_keys(
        self,
        candidates: Sequence[str],
        keys: Sequence[int],
        model: str,
        *,
        load: Mapping[str, float] | None = None,
        load_weight: float | None = None,
        record: bool = True,
        ttl_s: float | None = None,
    ) -> tuple[Decision, dict[str, float]]:
        return self._run(
            self.route_keys_async(
                candidates, keys, model, load=load, load_weight=load_weight, record=record,
                ttl_s=ttl_s,
            )
        )  # fmt: skip

    async def route_async(
        self,
        candidates: Sequence[str],
        model: str,
        tokens: Sequence[int],
        *,
        lora: LoRA | str | None = None,
        cache_salt: str | None = None,
        load: Mapping[str, float] | None = None,
        load_weight: float | None = None,
        record: bool = True,
        ttl_s: float | None = None,
    ) -> tuple[Decision, dict[str, float]]:
        """Route a prompt's token ids (``route_keys_async`` of its block keys)."""
        if not candidates:
            raise BadRequest("no candidate pods")
        return await self.route_keys_async(
            candidates, self.block_keys(tokens, model, lora, cache_salt), model, load=load,
            load_weight=load_weight, record=record, ttl_s=ttl_s,
        )  # fmt: skip

    def route(
        self,
        candidates: Sequence[str],
        model: str,
        tokens: Sequence[int],
        *,
        lora: LoRA | str | None = None,
        cache_salt: str | None = None,
        load: Mapping[str, float] | None = None,
        load_weight: float | None = None,
        record: bool = True,
        ttl_s: float | None = None,
    ) -> tuple[Decision, dict[str, float]]:
        return self._run(
            self.route_async(
                candidates, model, tokens, lora=lora, cache_salt=cache_salt, load=load,
                load_weight=load_weight, record=record, ttl_s=ttl_s,
            )
        )  # fmt: skip

    # --- routing feedback ------------------------------------------------------------------

    async def record_keys_async(
        self, pod: str, keys: Sequence[int], ttl_s: float | None = None
    ) -> None:
        """Speculative entries of ``keys`` for ``pod``; returns once this client's replica
        shows them (read-your-writes: the next score sees them)."""
        i = await self.owner_async(pod)
        at = await self.shards[i].record_route.remote(pod, list(keys), ttl_s)
        if self.replica is not None:
            await self.replica.wait_for_async({i: tuple(at)}, 1.0)

    def record_keys(self, pod: str, keys: Sequence[int], ttl_s: float | None = None) -> None:
        self._run(self.record_keys_async(pod, keys, ttl_s))

    async def record_route_async(
        self, pod: str, keys: Sequence[int], ttl_s: float | None = None
    ) -> None:
        """``record_keys_async`` under its older name (``kvray.serve.router`` calls it so)."""
        await self.record_keys_async(pod, keys, ttl_s)

    # --- pods ------------------------------------------------------------------------------

    def register_replay(self, pod: str, replay_endpoint: str) -> None:
        """Tell kvray where a (connecting) pod's replay ROUTER is; survives restarts."""
        self._ctl("register_replay", pod, replay_endpoint)

    def add_pod(
        self,
        endpoint: str | PodEndpoint,
        replay_endpoint: str | None = None,
        pod: str | None = None,
        model: str | None = None,
    ) -> None:
        """Subscribe to a pod that binds its PUB socket (vLLM's default topology).

        ``endpoint`` is a ``PodEndpoint``, or its fields: ``pod``/``model`` name the pod when
        it publishes with an empty topic.
        """
        spec = _pod_endpoint(endpoint, replay_endpoint, pod, model)
        shard = self._ctl("add_pod", spec)
        if shard is not None and spec.pod:  # pinned: this client routes to it from now on
            self.placement.pin(spec.pod, shard)

    async def remove_pod_async(self, pod: str) -> None:
        """Forget a pod everywhere: its streams in the ingestors, its blocks in its shard
        (every data-parallel rank's holder too)."""
        await asyncio.gather(
            *(i.forget_pod.remote(pod) for i in self.ingestors),
            *(s.forget_pod.remote(pod) for s in self.shards),
        )
        holders = [p["pod"] for p in await self.pods_async() if base_pod(p["pod"]) == pod]
        targets = holders or [pod]
        owners = [await self.owner_async(h) for h in targets]
        done = await asyncio.gather(
            *(self.shards[i].clear_pod.remote(h) for i, h in zip(owners, targets, strict=True))
        )
        if self.replica is not None:
            await self.replica.wait_for_async(_latest(owners, done), 5.0)

    def remove_pod(self, pod: str) -> None:
        self._run(self.remove_pod_async(pod))

    async def pods_async(self) -> list[dict[str, Any]]:
        """Every holder (``PodInfo`` as a JSON document, like ``GET /pods``): model, shard,
        last seq, idle time, hash-contract status, pool."""
        parts = await asyncio.gather(*(s.pods_info.remote() for s in self.shards))
        return _pod_docs(parts)

    def pods(self) -> list[dict[str, Any]]:
        return self._run(self.pods_async())

    # --- status ----------------------------------------------------------------------------

    async def stats_async(self) -> ClusterStats:
        """Shard, ingestor and tokenizer stats. ``ingestors`` also lists the shards that read
        pods themselves (``ingestor="shard<i>"``)."""
        shards, ings, own, toks = await asyncio.gather(
            asyncio.gather(*(s.stats.remote() for s in self.shards)),
            asyncio.gather(*(i.stats.remote() for i in self.ingestors)),
            asyncio.gather(*(s.ingest_stats.remote() for s in self.shards)),
            asyncio.gather(*(t.stats.remote() for t in self.tokenizers)),
        )
        return ClusterStats(
            shards=list(shards),
            ingestors=list(ings) + [st for st in own if st is not None],
            tokenizers=list(toks),
        )

    def stats(self) -> ClusterStats:
        return self._run(self.stats_async())


def _pod_endpoint(
    endpoint: str | PodEndpoint, replay: str | None, pod: str | None, model: str | None
) -> PodEndpoint:
    if isinstance(endpoint, PodEndpoint):
        return endpoint
    try:
        return PodEndpoint(endpoint=endpoint, replay_endpoint=replay, pod=pod, model=model)
    except pydantic.ValidationError as exc:
        raise ConfigError(f"bad pod endpoint: {exc}") from exc


def _pod_docs(parts: Sequence[list[PodInfo]]) -> list[dict[str, Any]]:
    """The shards' ``PodInfo`` lists as one sorted list of JSON documents."""
    docs = (msgspec.structs.asdict(p) for part in parts for p in part)
    return sorted(docs, key=lambda d: d["pod"])


def _latest(owners: list[int], marks: list[Any]) -> dict[int, tuple[str, int]]:
    """Per shard, the newest ``(stream, seq)`` among several calls' answers."""
    out: dict[int, tuple[str, int]] = {}
    for i, (stream, seq) in zip(owners, marks, strict=True):
        if i not in out or out[i][1] < seq:
            out[i] = (stream, seq)
    return out


def connect_when_ready(namespace: str = "kvray", timeout_s: float = 180.0) -> Client:
    """``Client(namespace)`` once the deployment exists: a Serve replica started next to the
    deployment that creates kvray's actors (``kvray.serve.app``) waits here for it.

    Raises:
        ConfigError: no deployment appeared in ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    nap = 0.05
    while True:
        try:
            return Client(namespace)
        except ConfigError:
            if time.monotonic() > deadline:
                raise
        time.sleep(nap)
        nap = min(1.0, nap * 1.5)


def connect(
    namespace: str = "kvray", *, timeout_s: float = 60.0, replica: bool | None = None
) -> Client:
    """A ``Client`` for the kvray deployment in Ray namespace ``namespace``.

    ``ray.init`` must have been called (or this runs inside a Ray task/actor). ``replica``
    overrides ``replica.enabled`` from the deployment's config (it cannot turn a replica on
    when the deployment's shards do not publish). With a replica the client keeps a local copy
    of the index (memory: about the shards' ``bytes_estimate``) and answers ``score_*``
    without an actor call.
    """
    return Client(namespace, timeout_s=timeout_s, replica=replica)
