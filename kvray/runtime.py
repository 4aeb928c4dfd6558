"""Start and stop a kvray deployment on the current Ray cluster.

``start(config)`` creates the controller (which creates shards, ingestors and tokenizers) and
waits until every actor answers. ``stop(namespace)`` tears it all down.
"""

from __future__ import annotations

from typing import Any

import ray

from kvray.actors.controller import Controller
from kvray.actors.naming import CONTROLLER
from kvray.config import Config

# Non-detached actors live as long as a handle does: keep the controller's here until stop().
_controllers: dict[str, Any] = {}


def start(
    config: Config,
    *,
    detached: bool = False,
    snapshot_interval_s: float = 10.0,
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """Deploy kvray's actors in ``config.namespace``; returns the controller's ``info()``.

    Args:
        config: the deployment's configuration.
        detached: keep the actors alive after this driver exits (``kvray serve``).
        snapshot_interval_s: how often shard snapshots are taken for restarts.
        timeout_s: how long to wait for every actor to come up.
    """
    life = {"lifetime": "detached"} if detached else {}
    ctl = (
        ray.remote(Controller)  # type: ignore[attr-defined]
        .options(
            name=CONTROLLER,
            namespace=config.namespace,
            num_cpus=0,
            max_concurrency=8,
            max_restarts=0,
            **life,
        )
        .remote(config.model_dump(), snapshot_interval_s, detached)
    )
    _controllers[config.namespace] = ctl
    return ray.get(ctl.ready.remote(timeout_s), timeout=timeout_s + 10)  # type: ignore[no-any-return]


def stop(namespace: str = "kvray") -> bool:
    """Tear down the deployment in ``namespace``; returns whether one was running."""
    try:
        ctl = ray.get_actor(CONTROLLER, namespace=namespace)
    except ValueError:
        return False
    try:
        ray.get(ctl.shutdown.remote(), timeout=30)
    finally:
        ray.kill(ctl, no_restart=True)
        _controllers.pop(namespace, None)
    return True
