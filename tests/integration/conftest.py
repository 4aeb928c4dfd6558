"""Integration fixtures: one local Ray cluster per session (only for tests that ask for it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    import ray

    ray.init(
        include_dashboard=False,
        log_to_driver=False,
        logging_level="WARNING",
        object_store_memory=256 * 2**20,
        namespace="kvray-tests",
    )
    yield
    ray.shutdown()
