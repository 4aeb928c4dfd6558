"""Names of kvray's actors inside its Ray namespace (shared by runtime, client and serve)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

CONTROLLER = "kvray-controller"

WAIT_GROUP = "wait"
"""The concurrency group of the blocking ``IndexShard.ingest_wait`` / ``Ingestor.wait_streams``
calls: threads of their own, so they never hold up the actor's other calls (a shard's default
group runs one call at a time)."""
WAIT_GROUPS = {WAIT_GROUP: 4}
"""``concurrency_groups`` of the shard and ingestor actors."""

_F = TypeVar("_F", bound=Callable[..., Any])


def in_wait_group(fn: _F) -> _F:
    """``ray.method(concurrency_group=WAIT_GROUP)``, typed (a plain call is unchanged)."""
    import ray

    return ray.method(concurrency_group=WAIT_GROUP)(fn)  # type: ignore[no-any-return]


def shard_name(i: int) -> str:
    return f"kvray-shard-{i}"


def ingestor_name(i: int) -> str:
    return f"kvray-ingestor-{i}"


def tokenizer_name(i: int) -> str:
    return f"kvray-tokenizer-{i}"


def ask_controller(namespace: str, method: str, *args: Any, timeout_s: float = 30.0) -> Any:
    """Call the controller's ``method`` (what a restarted actor asks it: its snapshot, the pods
    it read); None when there is no controller (a standalone actor) or it does not answer."""
    try:
        import ray

        ctl = ray.get_actor(CONTROLLER, namespace=namespace)
        return ray.get(getattr(ctl, method).remote(*args), timeout=timeout_s)
    except Exception:
        return None
