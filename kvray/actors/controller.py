"""``Controller``: kvray's named entry point; owns pins, pods, replay sockets and snapshots.

``kvray.connect()`` looks it up by name. It restarts by itself (``max_restarts=-1``) and loses
nothing that matters when it does:

* **Its actors are not its children.** ``create_actors`` (called by ``kvray.runtime.start`` in
  the caller's process) creates the shards, ingestors, tokenizers and the shards' placement
  group; the controller adopts them by name. An actor's owner is the process that created it,
  and Ray kills owned actors when their owner dies: created here, a controller crash would take
  the whole index with it.
* **Its state is in Ray's GCS** (the internal KV, key ``controller/<namespace>``): pods added
  at runtime and the shard reading each, replay sockets, the ingestors' bound endpoints, the
  pins, the owner claim and the configuration's fingerprint. Every change is written before
  the method returns, so a call Ray retries after a restart (``max_task_retries=-1``) finds it.
* **Snapshots are not stored there**: they are as big as the index (GCS is a metadata store,
  and every snapshot interval would rewrite them). A restarted controller pulls a fresh one
  from every live shard at once instead. A shard that dies before that restarts empty, and the
  ingestors replay its pods' streams from their buffers (seq 0 when the buffer still has it).

A snapshot thread copies every shard's index every ``snapshots.interval_s`` into a file on the
controller's node (``SnapshotFiles``; not its memory: a snapshot is as big as the shard's
index); a restarted shard loads its latest copy in ``__init__`` and the ingestors replay what
came after from the pods.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import ray

from kvray.actors.ingestor import Ingestor
from kvray.actors.naming import WAIT_GROUPS, ingestor_name, shard_name, tokenizer_name
from kvray.actors.shard import IndexShard
from kvray.actors.tokenizer import TokenizerActor
from kvray.config import Config, PodEndpoint

log = logging.getLogger("kvray.controller")


_SHARD_CPU = 0.01
_SNAPSHOT_DUTY = 20
"""Pulls are spaced at least this many times the slowest shard's last snapshot: a shard spends
at most ~1/20 of its time snapshotting (the snapshot holds its write lock; at tens of millions
of pairs it takes seconds, and every write waits)."""
_KV_NAMESPACE = "kvray"
_STATE_VERSION = 1


class SnapshotFiles:
    """The shards' latest snapshots, a file per shard in a directory on the controller's node.

    They are kept on disk, not in the controller's memory: a snapshot is as big as the shard's
    index (17 B per pair at 16 pods x 1 M pairs, ``benchmarks/results/scale.md``), and it is
    read only when a shard restarts. A snapshot is written to a temporary file and renamed over
    the previous one, so a reader never sees half of one. A restarted controller keeps the
    previous life's files (``keep``): a shard that dies before the fresh pull still restores
    from one. If the directory cannot be written, snapshots stay in memory (logged)."""

    def __init__(self, directory: Path, keep: bool) -> None:
        self.dir = directory
        self._mem: dict[int, bytes] = {}
        self.on_disk = True
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if not keep:  # a new deployment: nothing of an earlier one is restored
                for old in directory.glob("shard-*"):
                    old.unlink()
        except OSError as exc:
            log.warning("snapshots kept in memory: cannot use %s: %s", directory, exc)
            self.on_disk = False

    def _path(self, shard_id: int) -> Path:
        return self.dir / f"shard-{shard_id}.snapshot"

    def put(self, shard_id: int, data: bytes) -> None:
        if self.on_disk:
            tmp = self._path(shard_id).with_suffix(".tmp")
            try:
                tmp.write_bytes(data)
                os.replace(tmp, self._path(shard_id))
                self._mem.pop(shard_id, None)
                return
            except OSError as exc:  # disk full, directory removed: this one stays in memory
                log.warning("snapshot of shard %d kept in memory: %s", shard_id, exc)
        self._mem[shard_id] = data

    def get(self, shard_id: int) -> bytes | None:
        if shard_id in self._mem:
            return self._mem[shard_id]
        try:
            return self._path(shard_id).read_bytes() if self.on_disk else None
        except FileNotFoundError:
            return None

    def in_memory_bytes(self) -> int:
        return sum(len(b) for b in self._mem.values())

    def remove(self) -> None:
        self._mem.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


def default_snapshot_dir(namespace: str) -> Path:
    """The default directory of a deployment's snapshots: the machine's temporary directory,
    named by the namespace and the Ray cluster (two clusters on one machine never share)."""
    cluster = hashlib.sha1(ray.get_runtime_context().gcs_address.encode()).hexdigest()[:12]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in namespace)
    return Path(tempfile.gettempdir()) / "kvray-snapshots" / f"{safe}-{cluster}"


def _state_key(namespace: str) -> bytes:
    return f"controller/{namespace}".encode()


def load_state(namespace: str) -> dict[str, Any] | None:
    """The controller state saved in the GCS for ``namespace`` (None: none)."""
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(_state_key(namespace), namespace=_KV_NAMESPACE)
    if not raw:
        return None
    doc: dict[str, Any] = json.loads(raw)
    return doc if doc.get("v") == _STATE_VERSION else None


def save_state(namespace: str, doc: dict[str, Any]) -> None:
    from ray.experimental import internal_kv

    raw = json.dumps({**doc, "v": _STATE_VERSION}, sort_keys=True).encode()
    internal_kv._internal_kv_put(
        _state_key(namespace), raw, overwrite=True, namespace=_KV_NAMESPACE
    )


def clear_state(namespace: str) -> None:
    """Forget the saved controller state of ``namespace`` (a deployment stopped or replaced)."""
    from ray.experimental import internal_kv

    with contextlib.suppress(Exception):
        internal_kv._internal_kv_del(_state_key(namespace), namespace=_KV_NAMESPACE)


def create_actors(config: Config, detached: bool = False) -> dict[str, Any]:
    """Create the shards, ingestors, tokenizers and the shards' placement group in the
    calling process (their owner; see the module docstring). Returns the handles and the
    placement group, for the caller to keep (non-detached actors live as long as a handle)."""
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    cfg = config.model_dump()
    ns = config.namespace
    life = {"lifetime": "detached"} if detached else {}
    # num_cpus=0: kvray's actors are I/O- and latency-bound; they must not starve the
    # cluster's schedulable CPUs (and a 2-core laptop could not place them otherwise).
    common: dict[str, Any] = {"num_cpus": 0, "max_restarts": -1, "namespace": ns, **life}
    # Shards go in a SPREAD placement group: one bundle per shard, on different nodes when
    # there are several (Ray's "SPREAD" task strategy and soft node affinity both packed
    # zero-CPU actors on one node here). Bundles are rescheduled when a node dies, and the
    # shard restarts in its bundle. 0.01 CPU each: a token amount, so a laptop fits them.
    pg = placement_group(
        [{"CPU": _SHARD_CPU}] * config.num_shards,
        strategy="SPREAD",
        lifetime="detached" if detached else None,
    )
    ray.get(pg.ready(), timeout=120)
    shard_cls = ray.remote(concurrency_groups=WAIT_GROUPS)(IndexShard)
    shard_common = {**common, "num_cpus": _SHARD_CPU}
    shards = [
        shard_cls.options(
            name=shard_name(i),
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=i
            ),
            **shard_common,
        ).remote(i, cfg)
        for i in range(config.num_shards)
    ]
    tok_cls = ray.remote(TokenizerActor)
    tokenizers = [
        tok_cls.options(name=tokenizer_name(i), **common).remote(i, cfg)
        for i in range(config.num_tokenizers)
    ]
    names = [shard_name(i) for i in range(config.num_shards)]
    ing_cls = ray.remote(concurrency_groups=WAIT_GROUPS)(Ingestor)
    ingestors = [
        ing_cls.options(
            name=ingestor_name(i), scheduling_strategy="SPREAD", max_concurrency=4, **common
        ).remote(i, cfg, names)
        for i in range(config.num_ingestors)
    ]
    return {"pg": pg, "shards": shards, "tokenizers": tokenizers, "ingestors": ingestors}


class Controller:
    """The controller actor's body (``max_concurrency`` > 1: shards call it while it works).

    Args:
        config: the deployment's configuration.
        snapshot_interval_s: how often every shard's snapshot is pulled (default:
            ``config.snapshots.interval_s``).
        snapshot_dir: where the snapshots are kept (default: ``config.snapshots.dir``, else
            ``default_snapshot_dir(namespace)``).
        detached: the deployment outlives its driver (informational).
        pg: the shards' placement group (``create_actors``), removed by ``shutdown``.
    """

    def __init__(
        self,
        config: dict[str, Any],
        snapshot_interval_s: float | None = None,
        detached: bool = False,
        pg: Any = None,
        snapshot_dir: str | None = None,
    ) -> None:
        from kvray import runtime
        from kvray._proc import pin_malloc_thresholds

        pin_malloc_thresholds()  # each snapshot pull is a burst of large buffers
        self.config = Config.model_validate(config)
        self.detached = detached
        self.pg = pg
        self._owner: str | None = None
        ns = self.config.namespace
        self._fingerprint = runtime.fingerprint(self.config)
        self.shard_names = [shard_name(i) for i in range(self.config.num_shards)]
        self.ingestor_names = [ingestor_name(i) for i in range(self.config.num_ingestors)]
        self.tokenizer_names = [tokenizer_name(i) for i in range(self.config.num_tokenizers)]
        # Adopted by name (created by create_actors; alive or restarting, the name holds).
        self.shards = [ray.get_actor(n, namespace=ns) for n in self.shard_names]
        self.tokenizers = [ray.get_actor(n, namespace=ns) for n in self.tokenizer_names]
        self.ingestors = [ray.get_actor(n, namespace=ns) for n in self.ingestor_names]
        self._ingestor_endpoints: dict[int, list[str]] = {}
        self._pods: dict[str, dict[str, Any]] = {}
        self._pod_shard: dict[str, int] = {}  # endpoint → the shard reading it itself
        self.placement = self.config.placement()  # named pods' pins (balanced), see sharding
        self._replay: dict[str, str] = {}
        self._state_lock = threading.Lock()
        self.restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        if self.restarted:
            self._load()
        self._save()
        self._snapshots = SnapshotFiles(
            Path(snapshot_dir or self.config.snapshots.dir or default_snapshot_dir(ns)),
            keep=self.restarted,
        )
        self._snapshot_times: dict[int, float] = {}
        self._snapshot_versions: dict[int, tuple[str, int]] = {}
        self._interval = (
            self.config.snapshots.interval_s if snapshot_interval_s is None else snapshot_interval_s
        )
        self._snapshot_took = 0.0  # the slowest shard's last snapshot, seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._snapshot_loop, daemon=True)
        self._thread.start()

    # --- state in the GCS ------------------------------------------------------------------

    def _load(self) -> None:
        """After a restart: pods, pins, replay sockets, endpoints and owner from the GCS."""
        doc = load_state(self.config.namespace)
        if doc is None or doc.get("fingerprint") != self._fingerprint:
            log.warning("controller restarted without saved state for this configuration")
            return
        self._owner = doc.get("owner")
        self._pods = dict(doc.get("pods", {}))
        self._pod_shard = {ep: int(i) for ep, i in doc.get("pod_shard", {}).items()}
        self._replay = dict(doc.get("replay", {}))
        self._ingestor_endpoints = {
            int(i): list(eps) for i, eps in doc.get("ingestor_endpoints", {}).items()
        }
        self.placement.update({p: int(i) for p, i in doc.get("pins", {}).items()})
        log.warning(
            "controller restarted: %d pods, %d replay sockets, %d pins restored",
            len(self._pods), len(self._replay), len(self.placement.pins()),
        )  # fmt: skip

    def _save(self) -> None:
        """Write the state to the GCS (before the changing method returns)."""
        with self._state_lock:
            save_state(
                self.config.namespace,
                {
                    "fingerprint": self._fingerprint,
                    "owner": self._owner,
                    "pods": self._pods,
                    "pod_shard": self._pod_shard,
                    "replay": self._replay,
                    "ingestor_endpoints": {str(i): e for i, e in self._ingestor_endpoints.items()},
                    "pins": self.placement.pins(),
                },
            )

    def claim(self, owner: str) -> str | None:
        """Make ``owner`` the one that may tear this deployment down (a Serve application's
        ``KvrayRuntime`` replica); returns the previous owner."""
        previous, self._owner = self._owner, owner
        self._save()
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
        """Config and actor names, for clients. The ingestors' bound endpoints are asked once
        and remembered (a restarted ingestor rebinds the same ones), so ``info`` answers while
        an ingestor restarts."""
        missing = [i for i in range(len(self.ingestors)) if i not in self._ingestor_endpoints]
        if missing:
            got = ray.get([self.ingestors[i].endpoints.remote() for i in missing], timeout=120)
            for i, eps in zip(missing, got, strict=True):
                self._ingestor_endpoints.setdefault(i, eps)
            self._save()
        endpoints = [self._ingestor_endpoints[i] for i in range(len(self.ingestors))]
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
        self._save()
        ray.get(
            [i.register_replay.remote(pod, replay_endpoint) for i in self.ingestors]
            + [s.register_replay.remote(pod, replay_endpoint) for s in self.shards]
        )

    def add_pod(self, pod: PodEndpoint, ingestor: int = 0) -> int | None:
        """Subscribe to a pod that binds (remembered across restarts); returns the shard that
        reads it, None when an ingestor does.

        A named pod is read by the shard that owns it (``events.shard_reads_named_pods``):
        its batches then skip the ingestor and a Ray call. It is pinned to the shard with the
        fewest pinned pods (``core.sharding.Placement``), all its data-parallel ranks with it;
        the ingestors learn the pin before the shard starts reading. Otherwise ``ingestor``
        reads it.
        """
        self._pods[pod.endpoint] = pod.model_dump()
        if pod.pod and self.config.events.shard_reads_named_pods:
            i = self.placement.place(pod.pod)
            self._pod_shard[pod.endpoint] = i
            self._save()
            ray.get([ing.pin.remote(pod.pod, i) for ing in self.ingestors])
            ray.get(self.shards[i].subscribe.remote(pod))
            return i
        self._save()
        ray.get(self.ingestors[ingestor].add_pod.remote(pod))
        return None

    # --- snapshots -------------------------------------------------------------------------

    def _snapshot_loop(self) -> None:
        if self.restarted:  # the snapshots were in the previous life's memory: pull them now
            self.snapshot_now()
        while not self._stop.wait(max(self._interval, _SNAPSHOT_DUTY * self._snapshot_took)):
            self.snapshot_now()

    def snapshot_now(self) -> int:
        """Snapshot every shard now (a shard with no write since its last snapshot keeps
        that one: ``IndexShard.snapshot_if_changed``); returns how many answered."""
        done, took = 0, -1.0
        for i, shard in enumerate(self.shards):
            try:
                # The ping answers when the shard starts on the snapshot (calls run in order),
                # so `took` is the snapshot's own time, not the writes queued before it.
                since = self._snapshot_versions.get(i)  # set with the snapshot it describes
                started, ref = shard.ping.remote(), shard.snapshot_if_changed.remote(since)
                ray.get(started, timeout=60)
                t0 = time.monotonic()
                version, data = ray.get(ref, timeout=60)
                if data is not None:
                    took = max(took, time.monotonic() - t0)
                    self._snapshots.put(i, data)
                    del data  # not held here: the file is the copy
                    self._snapshot_versions[i] = version
                self._snapshot_times[i] = time.time()  # the held snapshot is current now
                done += 1
            except Exception as exc:  # a shard restarting: keep its previous snapshot
                log.warning("snapshot of shard %d failed: %s", i, exc)
        if took >= 0:  # all unchanged: the spacing stays what the last copy took
            self._snapshot_took = took
        return done

    def latest_snapshot(self, shard_id: int) -> bytes | None:
        """The newest snapshot of a shard (None if none was taken yet)."""
        return self._snapshots.get(shard_id)

    def snapshot_ages(self) -> dict[int, float]:
        now = time.time()
        return {i: now - t for i, t in self._snapshot_times.items()}

    def status(self) -> dict[str, Any]:
        """Whether this controller restarted, its snapshots' ages and what it remembers."""
        return {
            "restarted": self.restarted,
            "snapshot_ages_s": self.snapshot_ages(),
            "snapshots": str(self._snapshots.dir) if self._snapshots.on_disk else "memory",
            "snapshot_bytes_in_memory": self._snapshots.in_memory_bytes(),
            "pods": len(self._pods),
            "replay_sockets": len(self._replay),
            "pins": len(self.placement.pins()),
            "owner": self._owner,
        }

    def shutdown(self) -> None:
        """Stop ingestors and kill every actor this controller created."""
        self._stop.set()
        with contextlib.suppress(Exception):
            ray.get([i.stop.remote() for i in self.ingestors], timeout=10)
        for a in [*self.ingestors, *self.shards, *self.tokenizers]:
            with contextlib.suppress(Exception):
                ray.kill(a, no_restart=True)
        from ray.util.placement_group import remove_placement_group

        if self.pg is not None:
            with contextlib.suppress(Exception):
                remove_placement_group(self.pg)
        clear_state(self.config.namespace)
        self._snapshots.remove()
