"""Test helpers that drive a running kvray from outside (no test hooks on production actors)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

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
