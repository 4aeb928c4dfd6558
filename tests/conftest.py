"""Shared test setup: quiet, local-only Ray settings and fixture paths."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Before anything imports ray: keep every Ray process on 127.0.0.1, quiet and offline.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The replica serves HTTP itself (ports 30000+): ~1 ms instead of the proxy's ~15 ms here.
os.environ.setdefault("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1")
# Deleting an app waits for replicas to drain (~30 s by default); tests need no draining.
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "0")

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray cluster for the whole test session (started on first use)."""
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(
        include_dashboard=False,
        log_to_driver=False,
        logging_level="WARNING",
        object_store_memory=256 * 2**20,
        namespace="kvray-tests",
    )
    yield
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()
