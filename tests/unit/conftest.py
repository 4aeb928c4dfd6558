"""Unit tests exercise the pure core: Ray must never start here."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _disallow_ray_init(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        import ray
    except ImportError:  # pragma: no cover
        return

    def _refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Unit tests should not depend on Ray being initialized.")

    monkeypatch.setattr(ray, "init", _refuse)
