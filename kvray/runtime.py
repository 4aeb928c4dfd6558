"""Start and stop a kvray deployment on the current Ray cluster.

``start(config)`` creates the shards, ingestors and tokenizers (owned by the caller, see
``kvray.actors.controller``), then the controller, which adopts them, and waits until every
actor answers. Every actor restarts by itself when it dies, the controller included: it keeps
its state in the GCS and pulls fresh snapshots from the shards when it comes back.
``stop(namespace)`` tears it all down. ``ensure`` and ``release`` do the same for an owner (a
Serve application's ``KvrayRuntime`` replica): start, adopt or replace the deployment so it
runs ``config``, and stop it only if that owner still holds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from typing import Any

import ray

from kvray.actors.controller import Controller, clear_state, create_actors
from kvray.actors.naming import CONTROLLER
from kvray.config import Config

log = logging.getLogger("kvray.runtime")

# Non-detached actors live as long as a handle does: keep the handles here until stop().
_controllers: dict[str, Any] = {}
_actors: dict[str, dict[str, Any]] = {}


def start(
    config: Config,
    *,
    detached: bool = False,
    snapshot_interval_s: float | None = None,
    snapshot_dir: str | None = None,
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """Deploy kvray's actors in ``config.namespace``; returns the controller's ``info()``.

    Args:
        config: the deployment's configuration.
        detached: keep the actors alive after this driver exits (``kvray serve``).
        snapshot_interval_s: how often shard snapshots are taken for restarts (default:
            ``config.snapshots.interval_s``).
        snapshot_dir: the directory, on the controller's node, that holds them (default:
            ``config.snapshots.dir``, else a directory per namespace and cluster in the
            machine's temporary directory).
        timeout_s: how long to wait for every actor to come up.
    """
    life = {"lifetime": "detached"} if detached else {}
    clear_state(config.namespace)  # a new deployment: nothing of an earlier one is restored
    actors = create_actors(config, detached)
    _actors[config.namespace] = actors
    ctl = (
        ray.remote(Controller)  # type: ignore[attr-defined]
        .options(
            name=CONTROLLER,
            namespace=config.namespace,
            num_cpus=0,
            max_concurrency=8,
            # Restarts by itself; calls in flight when it died are retried on the new
            # incarnation (its methods are idempotent and save state before returning).
            max_restarts=-1,
            max_task_retries=-1,
            **life,
        )
        .remote(config.model_dump(), snapshot_interval_s, detached, actors["pg"], snapshot_dir)
    )
    _controllers[config.namespace] = ctl
    return ray.get(ctl.ready.remote(timeout_s), timeout=timeout_s + 10)  # type: ignore[no-any-return]


def stop(namespace: str = "kvray") -> bool:
    """Tear down the deployment in ``namespace``; returns whether one was running."""
    try:
        ctl = ray.get_actor(CONTROLLER, namespace=namespace)
    except ValueError:
        return _kill_named(namespace) > 0
    try:
        ray.get(ctl.shutdown.remote(), timeout=30)
    finally:
        ray.kill(ctl, no_restart=True)
        _kill_named(namespace)  # whatever shutdown missed (it failed, or timed out)
        actors = _actors.pop(namespace, None)
        if actors is not None:
            from ray.util.placement_group import remove_placement_group

            with contextlib.suppress(Exception):
                remove_placement_group(actors["pg"])
        _controllers.pop(namespace, None)
        clear_state(namespace)
    return True


def _kill_named(namespace: str) -> int:
    """Kill kvray's shards, ingestors and tokenizers in ``namespace`` by name; returns how
    many were found."""
    from kvray.actors.naming import ingestor_name, shard_name, tokenizer_name

    found = 0
    for name_of in (shard_name, ingestor_name, tokenizer_name):
        i = 0
        while True:
            try:
                actor = ray.get_actor(name_of(i), namespace=namespace)
            except ValueError:
                break
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
            found += 1
            i += 1
    return found


def fingerprint(config: Config | dict[str, Any]) -> str:
    """A short digest of a configuration (equal configs, equal digests)."""
    doc = config.model_dump() if isinstance(config, Config) else config
    raw = json.dumps(doc, sort_keys=True, default=str).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def running_config(namespace: str, timeout_s: float = 60.0) -> dict[str, Any] | None:
    """The configuration of the deployment running in ``namespace`` (None: none runs)."""
    try:
        ctl = ray.get_actor(CONTROLLER, namespace=namespace)
    except ValueError:
        return None
    info: dict[str, Any] = ray.get(ctl.info.remote(), timeout=timeout_s)
    return dict(info["config"])


def ensure(config: Config, owner: str, *, timeout_s: float = 120.0) -> str:
    """Make the deployment in ``config.namespace`` run ``config``, owned by ``owner``.

    None running: start one (detached). One running with the same configuration: adopt it
    (its actors, index and snapshots carry on). One running with another configuration:
    replace it (the new actors start empty and fill from the pods' next events, and from
    replay where the pods keep a buffer). Returns what was done: started/adopted/replaced.
    """
    ns = config.namespace
    current = running_config(ns, timeout_s)
    if current is not None and fingerprint(current) == fingerprint(config):
        what = "adopted"
    else:
        what = "started"
        if current is not None:
            log.warning("kvray in namespace %r runs another configuration: replacing it", ns)
            stop(ns)
            what = "replaced"
        start(config, detached=True, timeout_s=timeout_s)
    ctl = ray.get_actor(CONTROLLER, namespace=ns)
    ray.get(ctl.claim.remote(owner), timeout=timeout_s)
    return what


def release(namespace: str, owner: str, *, grace_s: float = 10.0) -> bool:
    """Stop the deployment in ``namespace`` if ``owner`` still owns it after ``grace_s`` (a
    newer owner, e.g. the replica that replaces this one in a rolling update, claims it within
    that time and keeps it); returns whether it was stopped."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            ctl = ray.get_actor(CONTROLLER, namespace=namespace)
            if ray.get(ctl.owner.remote(), timeout=30) != owner:
                return False
        except Exception:  # gone already, or the cluster is shutting down
            return False
        if time.monotonic() >= deadline:
            return stop(namespace)
        time.sleep(0.5)
