"""Names of kvray's actors inside its Ray namespace (shared by runtime, client and serve)."""

from __future__ import annotations

from typing import Any

CONTROLLER = "kvray-controller"


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
