"""Index backends by config name: ``"memory"`` (default) and ``"budget"`` here; adapters
register themselves (``kvray.backends`` adds ``"redis"`` when imported), so the core never
imports them.

``register_backend`` rejects a duplicate name; ``create_backend`` raises ``ConfigError`` naming
the known backends for an unknown one (vLLM's ``EventPublisherFactory`` pattern).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvray.core.index.base import IndexBackend
from kvray.core.index.budget import BudgetIndex
from kvray.core.index.memory import MemoryIndex
from kvray.errors import ConfigError

_registry: dict[str, Callable[..., IndexBackend]] = {
    "memory": MemoryIndex,
    "budget": BudgetIndex,
}


def register_backend(name: str, factory: Callable[..., IndexBackend]) -> None:
    """Add a backend under ``name``; ``KeyError`` if the name is taken."""
    if name in _registry:
        raise KeyError(f"index backend {name!r} is already registered")
    _registry[name] = factory


def is_registered(name: str) -> bool:
    return name in _registry


def create_backend(name: str, **options: Any) -> IndexBackend:
    """Build the backend called ``name`` with its keyword options."""
    try:
        factory = _registry[name]
    except KeyError as exc:
        raise ConfigError(
            f"unknown index backend {name!r}; known: {', '.join(sorted(_registry))}"
        ) from exc
    try:
        return factory(**options)
    except TypeError as exc:
        raise ConfigError(f"bad options for index backend {name!r}: {exc}") from exc
