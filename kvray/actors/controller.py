"""``Controller``: creates kvray's actors, keeps shard snapshots, answers "where is what".

It is the one named entry point of a kvray deployment (``kvray.connect()`` looks it up). A
snapshot thread copies every shard's index into the controller's memory every
``snapshot_interval_s``; a restarted shard loads its latest copy in ``__init__`` and the
ingestors replay what came after from the pods.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

import ray

from kvray.actors.ingestor import Ingestor
from kvray.actors.naming import ingestor_name, shard_name, tokenizer_name
from kvray.actors.shard import IndexShard
from kvray.actors.tokenizer import TokenizerActor
from kvray.config import Config

log = logging.getLogger("kvray.controller")


_SHARD_CPU = 0.01


class Controller:
    """The controller actor's body (``max_concurrency`` > 1: shards call it while it works)."""

    def __init__(
        self,
        config: dict[str, Any],
        snapshot_interval_s: float = 10.0,
        detached: bool = False,
    ) -> None:
        self.config = Config.model_validate(config)
        self._owner: str | None = None
        cfg = self.config.model_dump()
        ns = self.config.namespace
        life = {"lifetime": "detached"} if detached else {}
        self.shard_names = [shard_name(i) for i in range(self.config.num_shards)]
        self.ingestor_names = [ingestor_name(i) for i in range(self.config.num_ingestors)]
        self.tokenizer_names = [tokenizer_name(i) for i in range(self.config.num_tokenizers)]
        # num_cpus=0: kvray's actors are I/O- and latency-bound; they must not starve the
        # cluster's schedulable CPUs (and a 2-core laptop could not place them otherwise).
        # SPREAD puts shards and ingestors on different nodes when there are several.
        common: dict[str, Any] = {"num_cpus": 0, "max_restarts": -1, "namespace": ns, **life}
        # Shards go in a SPREAD placement group: one bundle per shard, on different nodes when
        # there are several (Ray's "SPREAD" task strategy and soft node affinity both packed
        # zero-CPU actors on one node here). Bundles are rescheduled when a node dies, and the
        # shard restarts in its bundle. 0.01 CPU each: a token amount, so a laptop fits them.
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.pg = placement_group(
            [{"CPU": _SHARD_CPU}] * self.config.num_shards,
            strategy="SPREAD",
            lifetime="detached" if detached else None,
        )
        ray.get(self.pg.ready(), timeout=120)
        shard_cls = ray.remote(IndexShard)
        shard_common = {**common, "num_cpus": _SHARD_CPU}
        self.shards = [
            shard_cls.options(
                name=n,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.pg, placement_group_bundle_index=i
                ),
                **shard_common,
            ).remote(i, cfg)
            for i, n in enumerate(self.shard_names)
        ]
        tok_cls = ray.remote(TokenizerActor)
        self.tokenizers = [
            tok_cls.options(name=n, **common).remote(i, cfg)
            for i, n in enumerate(self.tokenizer_names)
        ]
        ing_cls = ray.remote(Ingestor)
        self.ingestors = [
            ing_cls.options(
                name=n, scheduling_strategy="SPREAD", max_concurrency=4, **common
            ).remote(i, cfg, self.shard_names)
            for i, n in enumerate(self.ingestor_names)
        ]
        self._ingestor_endpoints: dict[int, list[str]] = {}
        self._pods: dict[str, dict[str, Any]] = {}
        self._pod_shard: dict[str, int] = {}  # endpoint → the shard reading it itself
        self.placement = self.config.placement()  # named pods' pins (balanced), see sharding
        self._replay: dict[str, str] = {}
        self._snapshots: dict[int, bytes] = {}
        self._snapshot_times: dict[int, float] = {}
        self._interval = snapshot_interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._snapshot_loop, daemon=True)
        self._thread.start()

    def claim(self, owner: str) -> str | None:
        """Make ``owner`` the one that may tear this deployment down (a Serve application's
        ``KvrayRuntime`` replica); returns the previous owner."""
        previous, self._owner = self._owner, owner
        return previous

    def owner(self) -> str | None:
        return self._owner

    def node_id(self) -> str:
        """The Ray node this actor runs on (placement checks, fault tests)."""
        return str(ray.get_runtime_context().get_node_id())

    def ready(self, timeout_s: float = 120.0) -> dict[str, Any]:
        """Wait until every actor answers; returns ``info()``."""
        refs = [s.ping.remote() for s in self.shards]
        refs += [i.endpoints.remote() for i in self.ingestors]
        refs += [t.stats.remote() for t in self.tokenizers]
        ray.get(refs, timeout=timeout_s)
        return self.info()

    def info(self) -> dict[str, Any]:
        """Config and actor names, for clients."""
        endpoints = ray.get([i.endpoints.remote() for i in self.ingestors])
        for i, eps in enumerate(endpoints):
            self._ingestor_endpoints.setdefault(i, eps)
        return {
            "config": self.config.model_dump(),
            "shards": self.shard_names,
            "ingestors": self.ingestor_names,
            "tokenizers": self.tokenizer_names,
            "endpoints": endpoints,
            "pins": self.placement.pins(),
        }

    def pins(self) -> dict[str, int]:
        """Pod → shard for the pinned (named, shard-read) pods; other holders hash."""
        return self.placement.pins()

    def ingestor_memory(self, ingestor_id: int) -> dict[str, Any]:
        """What a restarted ingestor needs: the endpoints it bound in its first life (it
        rebinds them), pods added at runtime and known replay sockets."""
        return {
            "endpoints": self._ingestor_endpoints.get(ingestor_id, []),
            "pods": [
                p
                for ep, p in self._pods.items()
                if ep not in self._pod_shard
                and Ingestor.owner_of(ep, len(self.ingestors)) == ingestor_id
            ],
            "replay": dict(self._replay),
            "pins": self.placement.pins(),
        }

    def shard_memory(self, shard_id: int) -> dict[str, Any]:
        """What a restarted shard needs: the pods it read itself, and known replay sockets."""
        return {
            "pods": [self._pods[ep] for ep, i in self._pod_shard.items() if i == shard_id],
            "replay": dict(self._replay),
        }

    def register_replay(self, pod: str, replay_endpoint: str) -> None:
        """Remember a connecting pod's replay socket and tell every ingestor and shard."""
        self._replay[pod] = replay_endpoint
        ray.get(
            [i.register_replay.remote(pod, replay_endpoint) for i in self.ingestors]
            + [s.register_replay.remote(pod, replay_endpoint) for s in self.shards]
        )

    def add_pod(
        self,
        endpoint: str,
        replay_endpoint: str | None = None,
        pod: str | None = None,
        model: str | None = None,
        ingestor: int = 0,
    ) -> int | None:
        """Subscribe to a pod that binds (remembered across restarts); returns the shard that
        reads it, None when an ingestor does.

        A named pod is read by the shard that owns it (``events.shard_reads_named_pods``):
        its batches then skip the ingestor and a Ray call. It is pinned to the shard with the
        fewest pinned pods (``core.sharding.Placement``), all its data-parallel ranks with it;
        the ingestors learn the pin before the shard starts reading. Otherwise ``ingestor``
        reads it.
        """
        spec = {
            "endpoint": endpoint,
            "replay_endpoint": replay_endpoint,
            "pod": pod,
            "model": model,
        }
        self._pods[endpoint] = spec
        if pod and self.config.events.shard_reads_named_pods:
            i = self.placement.place(pod)
            self._pod_shard[endpoint] = i
            ray.get([ing.pin.remote(pod, i) for ing in self.ingestors])
            ray.get(self.shards[i].subscribe.remote(endpoint, replay_endpoint, pod, model))
            return i
        ray.get(self.ingestors[ingestor].add_pod.remote(endpoint, replay_endpoint, pod, model))
        return None

    # --- snapshots -------------------------------------------------------------------------

    def _snapshot_loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.snapshot_now()

    def snapshot_now(self) -> int:
        """Snapshot every shard now; returns how many answered."""
        done = 0
        for i, shard in enumerate(self.shards):
            try:
                self._snapshots[i] = ray.get(shard.snapshot.remote(), timeout=60)
                self._snapshot_times[i] = time.time()
                done += 1
            except Exception as exc:  # a shard restarting: keep its previous snapshot
                log.warning("snapshot of shard %d failed: %s", i, exc)
        return done

    def latest_snapshot(self, shard_id: int) -> bytes | None:
        """The newest snapshot of a shard (None if none was taken yet)."""
        return self._snapshots.get(shard_id)

    def snapshot_ages(self) -> dict[int, float]:
        now = time.time()
        return {i: now - t for i, t in self._snapshot_times.items()}

    def shutdown(self) -> None:
        """Stop ingestors and kill every actor this controller created."""
        self._stop.set()
        with contextlib.suppress(Exception):
            ray.get([i.stop.remote() for i in self.ingestors], timeout=10)
        for a in [*self.ingestors, *self.shards, *self.tokenizers]:
            with contextlib.suppress(Exception):
                ray.kill(a, no_restart=True)
        from ray.util.placement_group import remove_placement_group

        with contextlib.suppress(Exception):
            remove_placement_group(self.pg)
