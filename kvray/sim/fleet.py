"""A fleet of simulated vLLM pods hosted together: caches, prefill queues and event streams.

Invariant: pod state changes only in ``serve``/``reset``, at non-decreasing simulated times, and
every cache change is handed to the pod's publisher before ``serve`` returns; so once kvray has
applied ``expected_seqs()`` its view of every pod equals the pod's cache (except for batches
deliberately dropped by ``drop_next`` and not yet healed by replay, flagged by ``Served.stale``).

Many pods share one process because on a small machine each Ray actor costs ~0.5 s to start and
~45 MiB: ``Fleet`` is a plain class (usable in-process), and ``RemoteFleet`` hosts it in one Ray
actor per ``pods_per_actor`` pods, with the same methods.

Each pod has a ``SimPod`` (finite LRU prefix cache, vLLM hashing, real event frames) with its own
``SimPublisher`` (topic ``kv@<pod>@<model>``, replay ROUTER), and a ``PrefillQueue``: the prefill
work it has been given and not yet done, drained at ``prefill_tps``. Work is only the tokens not
served from cache, so good routing also lowers load; load in turn delays time to first token.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvray.config import HashAlgoName
from kvray.core.hashing import BlockHasher
from kvray.core.keys import LoRA
from kvray.sim.pod import SimPod
from kvray.sim.publisher import SimPublisher


@dataclass(slots=True, frozen=True)
class FleetConfig:
    """How many pods, and how each caches, hashes, publishes and computes."""

    num_pods: int = 8
    """Pods in the fleet (ids ``<pod_prefix>00``, ``01``, ...)."""
    model: str = "qwen3"
    """Served model name (the topic's model part)."""
    num_blocks: int = 1024
    """KV cache capacity of each pod, in blocks (16k tokens at block size 16: small enough
    that the default workload's ~320k distinct tokens do not fit the fleet)."""
    block_size: int = 16
    """Tokens per block (vLLM ``--block-size``)."""
    hash_algo: HashAlgoName = "sha256"
    """vLLM ``--prefix-caching-hash-algo``."""
    hash_seed: str | None = None
    """The pods' PYTHONHASHSEED (None: unset, vLLM's default)."""
    prefill_tps: float = 5000.0
    """Prefill throughput of one pod, tokens per simulated second: what decode leaves for
    prefill (the default puts a cache-blind router near saturation at the default rate)."""
    legacy_events: bool = False
    """Publish vLLM <= 0.23 positional-array events instead of the map form. (``SimPod``
    hashes LoRA blocks in the >= 0.24 tagged form either way, so with LoRA traffic kvray's
    hash-contract check reports legacy pods as ``mismatch``; routing, which uses request
    keys, is unaffected.)"""
    replay: bool = True
    """Give every pod a replay ROUTER (kvray heals sequence gaps from it)."""
    lora_paths: Mapping[str, str] = field(default_factory=dict)
    """Adapter name -> path; vLLM hashes both into a LoRA request's blocks."""
    pod_prefix: str = "pod-"
    """Pod ids are this prefix plus a two-digit index."""

    def pod_ids(self) -> list[str]:
        """Every pod id, in index order."""
        return [f"{self.pod_prefix}{i:02d}" for i in range(self.num_pods)]

    @property
    def capacity_tokens(self) -> int:
        """One pod's cache capacity in tokens."""
        return self.num_blocks * self.block_size


class PrefillQueue:
    """One pod's outstanding prefill work: a FIFO drained at ``tps`` tokens per second.

    A simplification of vLLM's scheduler (no chunked-prefill interleaving, no decode): a request
    starts prefilling when the work ahead of it is done. Amortised O(1) per call.

    Args:
        tps: tokens prefilled per simulated second.
    """

    __slots__ = ("tps", "_jobs", "_outstanding", "_now")

    def __init__(self, tps: float) -> None:
        if tps <= 0:
            raise ValueError("prefill throughput must be > 0")
        self.tps = tps
        self._jobs: deque[float] = deque()  # remaining tokens per queued request, oldest first
        self._outstanding = 0.0
        self._now = 0.0

    def advance(self, now: float) -> None:
        """Do the work that fits between the last call and ``now`` (earlier times: no-op)."""
        if now <= self._now:
            return
        budget = (now - self._now) * self.tps
        self._now = now
        jobs = self._jobs
        while jobs and budget > 0:
            head = jobs[0]
            if head <= budget:
                budget -= head
                self._outstanding -= head
                jobs.popleft()
            else:
                jobs[0] = head - budget
                self._outstanding -= budget
                budget = 0.0
        if not jobs:
            self._outstanding = 0.0  # an idle pod is exactly idle: no float residue carried on

    def submit(self, tokens: float, now: float) -> float:
        """Queue ``tokens`` of prefill at ``now``; returns the wait before they start (s)."""
        self.advance(now)
        wait = self._outstanding / self.tps
        if tokens > 0:
            self._jobs.append(float(tokens))
            self._outstanding += tokens
        return wait

    @property
    def outstanding(self) -> float:
        """Tokens queued or being prefilled, as of the last ``advance``."""
        return self._outstanding

    @property
    def queue_len(self) -> int:
        """Requests not done prefilling, as of the last ``advance``."""
        return len(self._jobs)

    def reset(self) -> None:
        """Empty the queue and restart the clock at 0."""
        self._jobs.clear()
        self._outstanding = 0.0
        self._now = 0.0


@dataclass(slots=True, frozen=True)
class Served:
    """What one request did on its pod (the pod's ``cached_tokens`` report and the queue's)."""

    pod: str
    prompt_tokens: int
    cached_tokens: int
    """Tokens served from the prefix cache: what vLLM reports as ``cached_tokens``."""
    new_blocks: int
    evicted_blocks: int
    wait_s: float
    """Simulated wait behind the pod's earlier prefill work."""
    ttft_s: float
    """Simulated time to first token: wait plus this request's own uncached prefill."""
    stale: bool
    """The pod had dropped event batches not yet re-published when this request arrived, so
    an index built from its events could not know its full cache."""
    expect_seq: int
    """Next seq an index can have seen from this pod after this request (see
    ``Fleet.expected_seqs``)."""


@dataclass(slots=True, frozen=True)
class FleetView:
    """The fleet at one simulated time, as a router's metrics scrape would see it."""

    t: float
    loads: dict[str, float]
    """Outstanding prefill tokens per pod."""
    queue_lens: dict[str, int]
    """Requests still prefilling per pod."""
    truth: dict[str, int] | None = None
    """Leading blocks of the asked prompt cached on each pod (ground truth), when asked."""


@dataclass(slots=True)
class _PodState:
    pod: SimPod
    queue: PrefillQueue
    publisher: SimPublisher | None
    stale_from: int | None = None  # first seq lost on the wire and not yet re-announced


class Fleet:
    """Many simulated pods in one process.

    Args:
        config: the fleet's shape.
        endpoints: pod id -> the endpoint its publisher connects to (kvray's bound SUB); None:
            pods publish nothing (a pure simulation, e.g. for unit tests).
        pods: the subset of ``config.pod_ids()`` hosted here (default: all of them).
    """

    def __init__(
        self,
        config: FleetConfig,
        endpoints: Mapping[str, str] | None = None,
        pods: Sequence[str] | None = None,
    ) -> None:
        self.config = config
        self.hasher = BlockHasher(config.hash_algo, config.hash_seed, config.block_size)
        self._loras = {name: LoRA(name, path) for name, path in config.lora_paths.items()}
        self._pods: dict[str, _PodState] = {}
        for pod_id in pods if pods is not None else config.pod_ids():
            pub = None
            if endpoints is not None:
                pub = SimPublisher(
                    endpoints[pod_id],
                    f"kv@{pod_id}@{config.model}",
                    replay_endpoint="tcp://127.0.0.1:0" if config.replay else None,
                    legacy=config.legacy_events,
                )
            sim = SimPod(
                pod_id, config.model, num_blocks=config.num_blocks, hasher=self.hasher,
                publisher=pub,
            )  # fmt: skip
            self._pods[pod_id] = _PodState(sim, PrefillQueue(config.prefill_tps), pub)
        self._publishing = endpoints is not None
        self._lost = 0  # batches lost on the wire since the last reset

    # --- setup -----------------------------------------------------------------------------

    def pod_ids(self) -> list[str]:
        """The pods hosted here, in index order."""
        return list(self._pods)

    def wait_connected(self, timeout_s: float = 10.0) -> bool:
        """Wait until every publisher's subscriber completed its handshake."""
        return all(
            st.publisher.wait_connected(timeout_s=timeout_s)
            for st in self._pods.values()
            if st.publisher is not None
        )

    def replay_endpoints(self) -> dict[str, str]:
        """Pod id -> its replay ROUTER endpoint (ports resolved)."""
        return {
            p: st.publisher.replay_endpoint
            for p, st in self._pods.items()
            if st.publisher is not None and st.publisher.replay_endpoint is not None
        }

    def reset(self, *, publish: bool = True) -> dict[str, int]:
        """Empty every cache and queue (a fresh fleet for the next policy).

        Args:
            publish: whether events are published from now on. Turning it off spares the
                index the work while a policy that does not read it runs; the reset itself is
                published when turning it on, so the index starts from empty caches.

        Returns:
            ``expected_seqs()`` after the reset.
        """
        self._publishing = publish and any(st.publisher for st in self._pods.values())
        self._lost = 0
        for st in self._pods.values():
            st.queue.reset()
            st.pod.publisher = st.publisher if self._publishing else None
            if st.publisher is not None:
                st.publisher.drop_next = 0
            self._track(st, st.pod.reset)
        return self.expected_seqs()

    def close(self) -> None:
        """Close every publisher (idempotent)."""
        for st in self._pods.values():
            if st.publisher is not None:
                st.publisher.close()

    # --- traffic ---------------------------------------------------------------------------

    def observe(
        self, t: float, tokens: Sequence[int] | None = None, lora: str | None = None
    ) -> FleetView:
        """Loads at simulated time ``t`` and, when ``tokens`` is given, each pod's cached
        prefix of that prompt (the oracle's view: no side effects on the caches)."""
        loads: dict[str, float] = {}
        qlens: dict[str, int] = {}
        for p, st in self._pods.items():
            st.queue.advance(t)
            loads[p] = st.queue.outstanding
            qlens[p] = st.queue.queue_len
        truth = None
        if tokens is not None:
            lo = self._lora(lora)
            truth = {p: st.pod.cached_prefix_blocks(tokens, lo) for p, st in self._pods.items()}
        return FleetView(t, loads, qlens, truth)

    def serve(self, pod: str, tokens: Sequence[int], lora: str | None, t: float) -> Served:
        """Run one request's prefill on ``pod`` at simulated time ``t``; publish its events."""
        st = self._pods[pod]
        stale = st.stale_from is not None
        res = self._track(st, lambda: st.pod.serve(tokens, lora=self._lora(lora)))
        computed = res.prompt_tokens - res.cached_tokens
        wait = st.queue.submit(computed, t)
        return Served(
            pod, res.prompt_tokens, res.cached_tokens, res.new_blocks, res.evicted_blocks,
            wait, wait + computed / st.queue.tps, stale, self._expect(st),
        )  # fmt: skip

    def drop_next(self, pod: str, n: int) -> None:
        """Lose ``pod``'s next ``n`` event batches on the wire (they stay replayable)."""
        st = self._pods[pod]
        if st.publisher is not None:
            st.publisher.drop_next += n

    def expected_seqs(self) -> dict[str, int]:
        """Pod -> the seq an index is current at: the publisher's next seq, or, while the
        latest batches were lost on the wire, the first lost one (nothing announces the loss
        until the pod publishes again; an index waiting for more would wait forever)."""
        return {p: self._expect(st) for p, st in self._pods.items() if st.publisher is not None}

    def cached_blocks(self) -> dict[str, int]:
        """Blocks cached per pod now."""
        return {p: st.pod.cached_blocks for p, st in self._pods.items()}

    def lost_batches(self) -> int:
        """Event batches lost on the wire (``drop_next``) since the last reset."""
        return self._lost

    # --- internals -------------------------------------------------------------------------

    def _lora(self, name: str | None) -> LoRA | None:
        if name is None:
            return None
        lo = self._loras.get(name)
        return lo if lo is not None else LoRA(name)

    def _track(self, st: _PodState, action: Any) -> Any:
        # Watch what one cache step did to the wire: a batch sent in order (after lost ones)
        # lets the index see the gap and replay it; a dropped batch leaves the pod stale.
        pub = st.pod.publisher
        if pub is None:
            return action()
        seq0, drop0 = pub.seq, pub.drop_next
        out = action()
        if pub.seq > seq0:
            if pub.drop_next < drop0:
                self._lost += 1
                if st.stale_from is None:
                    st.stale_from = seq0
            else:
                st.stale_from = None
        return out

    def _expect(self, st: _PodState) -> int:
        if st.publisher is None:
            return 0
        return st.publisher.seq if st.stale_from is None else st.stale_from


class RemoteFleet:
    """A ``Fleet`` spread over Ray actors (``pods_per_actor`` pods each), driven from here.

    Same methods as ``Fleet``; calls go to the actor hosting the pod, fleet-wide calls to all
    actors at once. Actors ask for no CPU: they are mostly idle between requests.

    Args:
        config: the fleet's shape.
        endpoints: SUB endpoints the pods connect to; pod i uses ``endpoints[i % len]``.
        pods_per_actor: pods hosted per actor (None: all in one actor).
        timeout_s: bound on every call.
    """

    def __init__(
        self,
        config: FleetConfig,
        endpoints: Sequence[str],
        *,
        pods_per_actor: int | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        import ray  # the plain Fleet must stay importable (and unit-testable) without Ray

        self._ray = ray
        self.config = config
        self.timeout_s = timeout_s
        ids = config.pod_ids()
        per = pods_per_actor or len(ids)
        if per <= 0:
            raise ValueError("pods_per_actor must be > 0")
        eps = {p: endpoints[i % len(endpoints)] for i, p in enumerate(ids)}
        cls = ray.remote(Fleet).options(num_cpus=0, max_restarts=0)
        self._owner: dict[str, Any] = {}
        self._actors: list[Any] = []
        for i in range(0, len(ids), per):
            group = ids[i : i + per]
            actor = cls.remote(config, {p: eps[p] for p in group}, group)
            self._actors.append(actor)
            self._owner.update(dict.fromkeys(group, actor))

    def _all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        refs = [getattr(a, method).remote(*args, **kwargs) for a in self._actors]
        return list(self._ray.get(refs, timeout=self.timeout_s))

    def pod_ids(self) -> list[str]:
        return list(self._owner)

    def wait_connected(self, timeout_s: float = 10.0) -> bool:
        return all(self._all("wait_connected", timeout_s))

    def replay_endpoints(self) -> dict[str, str]:
        return {k: v for part in self._all("replay_endpoints") for k, v in part.items()}

    def reset(self, *, publish: bool = True) -> dict[str, int]:
        return {k: v for part in self._all("reset", publish=publish) for k, v in part.items()}

    def observe(
        self, t: float, tokens: Sequence[int] | None = None, lora: str | None = None
    ) -> FleetView:
        if len(self._actors) == 1:
            view: FleetView = self._ray.get(
                self._actors[0].observe.remote(t, tokens, lora), timeout=self.timeout_s
            )
            return view
        parts: list[FleetView] = self._all("observe", t, tokens, lora)
        truth = (
            None if tokens is None else {p: n for v in parts for p, n in (v.truth or {}).items()}
        )
        return FleetView(
            t,
            {p: x for v in parts for p, x in v.loads.items()},
            {p: x for v in parts for p, x in v.queue_lens.items()},
            truth,
        )

    def serve(self, pod: str, tokens: Sequence[int], lora: str | None, t: float) -> Served:
        ref = self._owner[pod].serve.remote(pod, tokens, lora, t)
        served: Served = self._ray.get(ref, timeout=self.timeout_s)
        return served

    def drop_next(self, pod: str, n: int) -> None:
        self._ray.get(self._owner[pod].drop_next.remote(pod, n), timeout=self.timeout_s)

    def expected_seqs(self) -> dict[str, int]:
        return {k: v for part in self._all("expected_seqs") for k, v in part.items()}

    def cached_blocks(self) -> dict[str, int]:
        return {k: v for part in self._all("cached_blocks") for k, v in part.items()}

    def lost_batches(self) -> int:
        return sum(self._all("lost_batches"))

    def close(self) -> None:
        """Close the publishers and end the actors (idempotent)."""
        if not self._actors:
            return
        try:
            self._all("close")
        finally:
            for a in self._actors:
                self._ray.kill(a, no_restart=True)
            self._actors = []
