"""``kvray.connect()``: a cluster client for Ray-hosted schedulers (no HTTP in the path).

The client computes block keys itself (same ``Keyer`` as the shards) and scores them on its
in-process read replica of the index (``kvray.changes.replica``; one prefix walk, no actor
call) once the replica is live, else fans ``score`` out to the shards and unions the disjoint
per-holder results (``replica.enabled: false``, or while the replica loads or follows a
restarted shard). Prompts and chats go to a tokenizer pool member chosen by the prompt's first
chunk, so repeats meet the same prefix cache.
Every read method has an ``async`` twin (``*_async``) for use inside Serve replicas and async
actors.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import pydantic
import ray

from kvray.actors.naming import CONTROLLER
from kvray.changes.replica import Replica
from kvray.config import Config, PodEndpoint
from kvray.core.apply import Keyer
from kvray.core.holders import base_pod
from kvray.core.keys import LoRA
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


class Client:
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

    # --- the controller (restarts by itself; looked up again by name when a call fails) ---

    def _resolve_controller(self) -> Any:
        try:
            return ray.get_actor(CONTROLLER, namespace=self.namespace)
        except ValueError as exc:
            raise ConfigError(
                f"no kvray deployment in Ray namespace {self.namespace!r} (start one with "
                "`kvray serve` or kvray.runtime.start)"
            ) from exc

    def _ctl(self, method: str, *args: Any) -> Any:
        """Call a controller method; while the controller is dead or restarting (or was
        replaced under the same name), look it up again and retry until ``timeout_s``."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                ref = getattr(self.controller, method).remote(*args)
                return ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
            except ray.exceptions.RayActorError:
                if time.monotonic() + _CTL_RETRY_S > deadline:
                    raise
                time.sleep(_CTL_RETRY_S)
                with contextlib.suppress(ConfigError):
                    self.controller = self._resolve_controller()

    async def _ctl_async(self, method: str, *args: Any) -> Any:
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                return await getattr(self.controller, method).remote(*args)
            except ray.exceptions.RayActorError:
                if time.monotonic() + _CTL_RETRY_S > deadline:
                    raise
                await asyncio.sleep(_CTL_RETRY_S)
                with contextlib.suppress(ConfigError):
                    self.controller = self._resolve_controller()

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
        self._refresh_pins([holder])
        return self.placement.owner(holder)

    def _sure(self, holders: Sequence[str]) -> bool:
        """Whether the cached pins answer for ``holders``: every one pinned, or the pins are
        fresh (a pod pinned since would be missed only for ``_PINS_FRESH_S``)."""
        if time.monotonic() - self._pins_at < _PINS_FRESH_S:
            return True
        return all(self.placement.is_pinned(h) for h in holders)

    def _refresh_pins(self, holders: Sequence[str]) -> None:
        if not self._sure(holders):
            self._set_pins(self._ctl("pins"))

    async def _refresh_pins_async(self, holders: Sequence[str]) -> None:
        if not self._sure(holders):
            self._set_pins(await self._ctl_async("pins"))

    def _set_pins(self, pins: dict[str, int]) -> None:
        self.placement.update(pins)
        self._pins_at = time.monotonic()

    # --- keys and tokens -------------------------------------------------------------------

    def block_keys(
        self,
        tokens: Sequence[int],
        model: str,
        lora: LoRA | str | None = None,
        cache_salt: str | None = None,
    ) -> list[int]:
        """The index keys of a prompt's full blocks."""
        return self.keyer.block_keys(tokens, model, lora=lora, cache_salt=cache_salt)

    def _tokenizer(self, text: str) -> Any:
        return self.tokenizers[first_chunk_route(text, len(self.tokenizers), _ROUTE_CHUNK_CHARS)]

    async def tokenize_async(
        self, prompt: str, model: str, *, add_special_tokens: bool = True
    ) -> list[int]:
        """Token ids of a completion prompt (``add_special_tokens`` as vLLM's request field)."""
        if not isinstance(prompt, str):
            raise BadRequest("prompt must be a string")
        actor = self._tokenizer(prompt)
        return await actor.encode.remote(model, prompt, add_special_tokens)  # type: ignore[no-any-return]

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
        return await actor.encode_chat.remote(  # type: ignore[no-any-return]
            model, messages, tools, add_generation_prompt, chat_template_kwargs
        )

    # --- scoring ---------------------------------------------------------------------------

    async def score_keys_async(
        self, keys: Sequence[int], pods: Sequence[str] | None = None
    ) -> dict[str, float]:
        """Score on the replica, else fan ``score`` out to the owning shards and merge."""
        if not keys:
            return {}
        rep = self._local(pods)
        if rep is not None:
            return rep.score(keys, pods)
        klist = list(keys)
        plist = None if pods is None else list(pods)
        if plist is not None:
            await self._refresh_pins_async(plist)
        parts = await asyncio.gather(*(s.score.remote(klist, plist) for s in self._owners(pods)))
        return merge_scores(parts)

    def _owner_ids(self, pods: Sequence[str]) -> list[int]:
        """The ids of the shards owning ``pods`` (by the cached pins)."""
        return sorted({self.placement.owner(p) for p in pods})

    def _owners(self, pods: Sequence[str] | None) -> list[Any]:
        """The shards to ask: all, or only those owning the requested holders."""
        if pods is None:
            return self.shards
        return [self.shards[i] for i in self._owner_ids(pods)]

    def score_keys(
        self, keys: Sequence[int], pods: Sequence[str] | None = None
    ) -> dict[str, float]:
        """Synchronous ``score_keys_async``."""
        if not keys:
            return {}
        rep = self._local(pods)
        if rep is not None:
            return rep.score(keys, pods)
        klist = list(keys)
        plist = None if pods is None else list(pods)
        if plist is not None:
            self._refresh_pins(plist)
        refs = [s.score.remote(klist, plist) for s in self._owners(pods)]
        return merge_scores(ray.get(refs, timeout=self.timeout_s))

    def score_tokens(
        self,
        tokens: Sequence[int],
        model: str,
        pods: Sequence[str] | None = None,
        lora: LoRA | str | None = None,
    ) -> dict[str, float]:
        """Scores of every holder (or ``pods``) for a prompt's token ids."""
        return self.score_keys(self.block_keys(tokens, model, lora), pods)

    async def score_tokens_async(
        self,
        tokens: Sequence[int],
        model: str,
        pods: Sequence[str] | None = None,
        lora: LoRA | str | None = None,
    ) -> dict[str, float]:
        return await self.score_keys_async(self.block_keys(tokens, model, lora), pods)

    async def score_prompt_async(
        self,
        prompt: str,
        model: str,
        pods: Sequence[str] | None = None,
        lora: str | None = None,
    ) -> tuple[dict[str, float], int]:
        """Tokenize, key and score a completion prompt; returns (scores, number of blocks)."""
        tokens = await self.tokenize_async(prompt, model)
        keys = self.block_keys(tokens, model, lora)
        return await self.score_keys_async(keys, pods), len(keys)

    def score_prompt(
        self, prompt: str, model: str, pods: Sequence[str] | None = None, lora: str | None = None
    ) -> dict[str, float]:
        """Synchronous prompt scoring (from a driver or a sync actor)."""
        tokens = ray.get(
            self._tokenizer(prompt).encode.remote(model, prompt), timeout=self.timeout_s
        )
        return self.score_tokens(tokens, model, pods, lora)

    # --- routing ---------------------------------------------------------------------------

    def pools(self) -> dict[str, tuple[int, int]]:
        """Holder → ``(blocks held, learned pool size)``: the replica's view when it has one,
        else the shards' (asked at most once a second)."""
        if self.replica is not None and self.replica.ready():
            return self.replica.pools()
        if time.monotonic() - self._pools_at >= _POOLS_FRESH_S:
            self._set_pools(
                ray.get([s.pools.remote() for s in self.shards], timeout=self.timeout_s)
            )
        return self._pools

    async def _pools_async(self) -> dict[str, tuple[int, int]]:
        if self.replica is not None and self.replica.ready():
            return self.replica.pools()
        if time.monotonic() - self._pools_at >= _POOLS_FRESH_S:
            self._set_pools(await asyncio.gather(*(s.pools.remote() for s in self.shards)))
        return self._pools

    def _set_pools(self, parts: Sequence[dict[str, Any]]) -> None:
        """Cache the shards' ``pools()`` answers (disjoint holders)."""
        self._pools = {h: (int(v[0]), int(v[1])) for part in parts for h, v in part.items()}
        self._pools_at = time.monotonic()

    def _decide(
        self,
        candidates: Sequence[str],
        keys: Sequence[int],
        scores: dict[str, float],
        pools: dict[str, tuple[int, int]],
        model: str,
        load: Mapping[str, float] | None,
        load_weight: float | None,
    ) -> Decision:
        block_size = self.config.index.hashing_lookup()(model).block_size
        return self.decider.choose(
            candidates, scores, keys, load=load, load_unit=1.0 / block_size, pools=pools,
            load_weight=load_weight,
        )  # fmt: skip

    async def route_keys_async(
        self,
        candidates: Sequence[str],
        keys: Sequence[int],
        model: str,
        *,
        load: Mapping[str, float] | None = None,
        load_weight: float | None = None,
        record: bool = True,
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

        Returns:
            The decision, and the candidates' scores it was based on.
        """
        if not candidates:
            raise BadRequest("no candidate pods")
        scores = await self.score_keys_async(keys, candidates) if keys else {}
        d = self._decide(candidates, keys, scores, await self._pools_async(), model, load,
                         load_weight)  # fmt: skip
        if record and keys:
            await self.record_route_async(d.pod, keys)
        return d, scores

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
        """Synchronous routing of a prompt's token ids (see ``route_keys_async``)."""
        if not candidates:
            raise BadRequest("no candidate pods")
        keys = self.block_keys(tokens, model, lora, cache_salt)
        scores = self.score_keys(keys, candidates) if keys else {}
        d = self._decide(candidates, keys, scores, self.pools(), model, load, load_weight)
        if record and keys:
            self.record_route(d.pod, model, keys=keys, ttl_s=ttl_s)
        return d, scores

    # --- routing feedback, status ----------------------------------------------------------

    def record_route(
        self,
        pod: str,
        model: str,
        tokens: Sequence[int] | None = None,
        *,
        keys: Sequence[int] | None = None,
        lora: LoRA | str | None = None,
        ttl_s: float | None = None,
    ) -> None:
        """Record that a prompt was routed to ``pod``: speculative entries until events arrive."""
        if keys is None:
            keys = self.block_keys(tokens or [], model, lora)
        i = self.owner(pod)
        at = ray.get(
            self.shards[i].record_route.remote(pod, list(keys), ttl_s), timeout=self.timeout_s
        )
        if self.replica is not None:  # read-your-writes: the next score sees the entries
            self.replica.wait_for({i: tuple(at)}, 1.0)

    async def record_route_async(
        self, pod: str, keys: Sequence[int], ttl_s: float | None = None
    ) -> None:
        await self._refresh_pins_async([pod])
        i = self.placement.owner(pod)
        at = await self.shards[i].record_route.remote(pod, list(keys), ttl_s)
        if self.replica is not None:
            await self.replica.wait_for_async({i: tuple(at)}, 1.0)

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

    def remove_pod(self, pod: str) -> None:
        """Forget a pod everywhere: its streams in the ingestors, its blocks in its shard
        (every data-parallel rank's holder too)."""
        ray.get(
            [i.forget_pod.remote(pod) for i in self.ingestors]
            + [s.forget_pod.remote(pod) for s in self.shards],
            timeout=self.timeout_s,
        )
        holders = [p["pod"] for p in self.pods() if base_pod(p["pod"]) == pod]
        targets = holders or [pod]
        owners = [self.owner(h) for h in targets]
        refs = [self.shards[i].clear_pod.remote(h) for i, h in zip(owners, targets, strict=True)]
        done = ray.get(refs, timeout=self.timeout_s)
        if self.replica is not None:
            self.replica.wait_for(_latest(owners, done), 5.0)

    def pods(self) -> list[dict[str, Any]]:
        """Every holder (``PodInfo`` as a JSON document, like ``GET /pods``): model, shard,
        last seq, idle time, hash-contract status, pool."""
        return _pod_docs(
            ray.get([s.pods_info.remote() for s in self.shards], timeout=self.timeout_s)
        )

    async def pods_async(self) -> list[dict[str, Any]]:
        return _pod_docs(await asyncio.gather(*(s.pods_info.remote() for s in self.shards)))

    def stats(self) -> ClusterStats:
        """Shard, ingestor and tokenizer stats. ``ingestors`` also lists the shards that read
        pods themselves (``ingestor="shard<i>"``)."""
        shards = [s.stats.remote() for s in self.shards]
        ings = [i.stats.remote() for i in self.ingestors]
        own = [s.ingest_stats.remote() for s in self.shards]
        toks = [t.stats.remote() for t in self.tokenizers]
        return ClusterStats(
            shards=ray.get(shards, timeout=self.timeout_s),
            ingestors=ray.get(ings, timeout=self.timeout_s)
            + [st for st in ray.get(own, timeout=self.timeout_s) if st is not None],
            tokenizers=ray.get(toks, timeout=self.timeout_s),
        )

    async def stats_async(self) -> ClusterStats:
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

    def sync(self, expect: dict[str, int] | None = None, timeout_s: float = 30.0) -> bool:
        """Wait until events are applied (tests, demo, benchmarks).

        Args:
            expect: pod (stream ``"<pod>#<rank>"`` or bare pod for rank 0) → the next seq its
                publisher will use, i.e. how many batches it sent. Without it, only what the
                ingestors already received is waited for.
            timeout_s: give up after this long (returns False).
        """
        deadline = time.monotonic() + timeout_s
        nap = _Backoff()  # polls are actor calls that compete with the work waited for
        if expect:
            want = {(k if "#" in k else f"{k}#0"): v for k, v in expect.items()}
            while True:
                seen: dict[str, int] = {}
                refs = [i.streams.remote() for i in self.ingestors]
                refs += [s.ingest_streams.remote() for s in self.shards]
                for part in ray.get(refs):
                    seen.update(part)
                if all(seen.get(k, 0) >= v for k, v in want.items()):
                    break
                if time.monotonic() > deadline:
                    return False
                nap()
        # Every reader (ingestor actors, shards reading their own pods): poll until what it
        # had received is applied.
        readers = [i.progress for i in self.ingestors] + [s.ingest_progress for s in self.shards]
        targets = [r for r, _, _ in ray.get([f.remote() for f in readers])]
        nap = _Backoff()
        while True:
            prog = ray.get([f.remote() for f in readers])
            if all(
                shipped >= t and not inflight
                for t, (_, shipped, inflight) in zip(targets, prog, strict=True)
            ):
                break
            if time.monotonic() > deadline:
                return False
            nap()
        if self.replica is None:
            return True
        at = ray.get([s.replica_seq.remote() for s in self.shards], timeout=self.timeout_s)
        left = max(0.1, deadline - time.monotonic())
        return self.replica.wait_for({i: tuple(a) for i, a in enumerate(at)}, left)

    def wait_until(self, predicate: Any, timeout_s: float = 10.0, interval_s: float = 0.02) -> bool:
        """Poll ``predicate(self)`` until true (tests and examples; no fixed sleeps)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(interval_s)
        return False


def _pod_endpoint(
    endpoint: str | PodEndpoint, replay: str | None, pod: str | None, model: str | None
) -> PodEndpoint:
    if isinstance(endpoint, PodEndpoint):
        return endpoint
    try:
        return PodEndpoint(endpoint=endpoint, replay_endpoint=replay, pod=pod, model=model)
    except pydantic.ValidationError as exc:
        raise ConfigError(f"bad pod endpoint: {exc}") from exc


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


class _Backoff:
    """Sleeps 1 ms, then 1.5× longer each call, up to 50 ms."""

    def __init__(self) -> None:
        self.s = 0.001

    def __call__(self) -> None:
        time.sleep(self.s)
        self.s = min(0.05, self.s * 1.5)


def _pod_docs(parts: Sequence[list[PodInfo]]) -> list[dict[str, Any]]:
    """The shards' ``PodInfo`` lists as one sorted list of JSON documents."""
    return sorted(
        (msgspec.structs.asdict(p) for part in parts for p in part), key=lambda d: d["pod"]
    )


def _latest(owners: list[int], marks: list[Any]) -> dict[int, tuple[str, int]]:
    """Per shard, the newest ``(stream, seq)`` among several calls' answers."""
    out: dict[int, tuple[str, int]] = {}
    for i, (stream, seq) in zip(owners, marks, strict=True):
        if i not in out or out[i][1] < seq:
            out[i] = (stream, seq)
    return out


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
