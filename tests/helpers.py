"""Test helpers that drive a running kvray from outside (no test hooks on production actors)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from kvray.sim import SimPod, SimPublisher
from kvray.sim.applied import wait_applied

T = TypeVar("T")


def sync(client: Any, expect: dict[str, int] | None = None, timeout_s: float = 30.0) -> bool:
    """Wait until the events publishers sent are applied and visible to ``client``
    (``kvray.sim.applied.wait_applied``)."""
    return wait_applied(client, expect, timeout_s)


def wait_until(
    subject: T, predicate: Callable[[T], Any], timeout_s: float = 10.0, interval_s: float = 0.02
) -> bool:
    """Poll ``predicate(subject)`` until true (no fixed sleeps)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate(subject):
            return True
        time.sleep(interval_s)
    return False


def replaying_pod(client: Any, pod_id: str, num_blocks: int, model: str = "m") -> SimPod:
    """A simulated pod publishing to the deployment's first bound endpoint, its replay socket
    registered (so a restarted reader can catch up from it)."""
    pub = SimPublisher(
        client.endpoints[0][0], f"kv@{pod_id}@{model}", replay_endpoint="tcp://127.0.0.1:0"
    )
    assert pub.wait_connected()
    client.register_replay(pod_id, pub.replay_endpoint)
    return SimPod(pod_id, model, num_blocks=num_blocks, publisher=pub)
